/**
 * `mitogen:service`: serving services (Mitogen's `mitogen.service`), loaded by a context on the first
 * CALL_SERVICE it receives or the first {@link Router.serve}. Each context has one pool of the services
 * it serves ({@link pool}): a call is checked against its method's policy, then its argument against
 * the method's `args` (any Standard Schema), then runs when the pool has room. A service not served
 * here yet is activated: the master imports the module it registered under that name
 * (`router.registerService`); any other context asks the master which module that is (the master's
 * own service {@link LOCATOR}) and loads it as `ctx.import` does, fetched through its parents.
 *
 * @module
 */
import { MitogenError } from "./errors.ts";
import type { Message } from "./frames.ts";
import { serviceBody } from "./bodies.ts";
import { replyError, replySafely, type StandardResult, type StandardSchemaV1 } from "./calls.ts";
import type { Context } from "./context.ts";
import type { Router, ServiceCall, ServiceDef, ServiceMethod, ServicePolicy, ServicePool } from "./router.ts";

/** The master's own service that tells a context which module defines a service: `locate({ name })`. */
export const LOCATOR = "mitogen.services";

/** A refused call, a failed argument check, an unknown service or method. The caller sees a CallError of this name. */
export class ServiceError extends MitogenError {
  override name = "ServiceError";
}

/** Default of {@link ServicePool.size}. */
const POOL_SIZE = 16;

const pools = new WeakMap<Router, Pool>();

/** The services of `router`'s context and their pool, made on first use. */
export function pool(router: Router): ServicePool {
  let p = pools.get(router);
  if (!p) pools.set(router, (p = new Pool(router)));
  return p;
}

/** Serve one CALL_SERVICE (the core's handler hands each here). */
export function onCallService(router: Router, msg: Message): void {
  void (pool(router) as Pool).invoke(msg);
}

/** The service exported by module exports `m` under `name`, if any. */
export function findService(m: Record<string, unknown>, name: string): ServiceDef | undefined {
  for (const v of Object.values(m)) {
    const d = v as ServiceDef | null;
    if (typeof d === "object" && d !== null && d.name === name && typeof d.methods === "object" && d.methods !== null) return d;
  }
  return undefined;
}

/** What a master Router adds: the services it registered, imported (see master.ts). */
type Registry = { loadService?(name: string): Promise<ServiceDef | undefined> };

class Pool implements ServicePool {
  size = POOL_SIZE;
  readonly #router: Router;
  readonly #services = new Map<string, ServiceDef>();
  readonly #activating = new Map<string, Promise<ServiceDef>>();
  readonly #waiting: (() => void)[] = [];
  #running = 0;

  constructor(router: Router) {
    this.#router = router;
  }

  get running(): number {
    return this.#running;
  }

  get queued(): number {
    return this.#waiting.length;
  }

  add(...services: ServiceDef[]): ServicePool {
    for (const s of services) {
      if (typeof s?.name !== "string" || typeof s.methods !== "object" || s.methods === null)
        throw new ServiceError("a service needs a name and methods (see defineService)");
      if (this.#services.has(s.name)) throw new ServiceError(`service ${s.name} is already served in ${this.#router.name}`);
      this.#services.set(s.name, s);
    }
    return this;
  }

  names(): string[] {
    return [...this.#services.keys()];
  }

  /** Check and run the call `msg`, and answer it. */
  async invoke(msg: Message): Promise<void> {
    const router = this.#router;
    let what = "a service";
    let noReply = false;
    try {
      const body = serviceBody.decode(msg);
      const [name, method, sent] = Array.isArray(body) ? body : [];
      if (typeof name !== "string" || typeof method !== "string") throw new ServiceError("CALL_SERVICE needs [service, method, args]");
      what = `${name}.${method}`;
      const service = this.#services.get(name) ?? (await this.#activate(name));
      const m = Object.hasOwn(service.methods, method) ? (service.methods as Record<string, ServiceMethod>)[method] : undefined;
      const caller = router.contextById(msg.src);
      const refused = await refusedBy(m?.policy ?? service.policy ?? "parents", router, caller, msg);
      if (refused) {
        const text = `${caller.name} (context ${caller.contextId}) may not call ${what} in ${router.name}: refused by policy ${refused}`;
        router.log("warn", text, "log", { service: name, method, caller: caller.contextId, policy: refused });
        throw new ServiceError(text);
      }
      if (!m || typeof m.run !== "function") throw new ServiceError(`service ${name} has no method ${JSON.stringify(method)} in ${router.name}`);
      const args = await check(m.args, sent, what);
      const call: ServiceCall = { router, caller, msg };
      if ((noReply = m.noReply === true) && msg.replyTo) replySafely(msg, undefined, router);
      const result = await this.#slot(() => m.run(args, call));
      if (!noReply && msg.replyTo) replySafely(msg, result, router);
    } catch (err) {
      if (noReply || !msg.replyTo) router.log("warn", `${what} failed: ${(err as Error)?.message ?? err}`, "log", { caller: msg.src });
      else replyError(msg, err, router);
    }
  }

  /** Run `fn` when fewer than {@link size} calls run. */
  async #slot<T>(fn: () => T): Promise<Awaited<T>> {
    if (this.#running >= this.size) await new Promise<void>((go) => this.#waiting.push(go));
    this.#running++;
    try {
      return await fn();
    } finally {
      this.#running--;
      if (this.#running < this.size) this.#waiting.shift()?.();
    }
  }

  /** Load service `name`, once however many calls ask at the same time. */
  #activate(name: string): Promise<ServiceDef> {
    let pending = this.#activating.get(name);
    if (!pending) {
      pending = this.#load(name).finally(() => this.#activating.delete(name));
      this.#activating.set(name, pending);
    }
    return pending;
  }

  async #load(name: string): Promise<ServiceDef> {
    const router = this.#router;
    const registry = router as Router & Registry;
    let found: ServiceDef | undefined;
    if (registry.loadService) found = await registry.loadService(name);
    else {
      const module = await router.contextById(0).callService(LOCATOR, "locate", { name });
      if (typeof module === "string") found = findService(await router.requireModule(module), name);
    }
    if (!found) throw new ServiceError(`no service ${name} in ${router.name}, and none is registered under that name at the master`);
    if (!this.#services.has(name)) this.add(found);
    return this.#services.get(name) as ServiceDef;
  }
}

/** The name of `policy` when it refuses `caller`'s call, else null. */
async function refusedBy(policy: ServicePolicy, router: Router, caller: Context, msg: Message): Promise<string | null> {
  if (policy === "any") return null;
  if (policy === "parents") return msg.auth === router.myId || router.parentIds.includes(msg.auth) ? null : "allowParents";
  if (policy === "children") return msg.auth === router.myId || router.routeTo(msg.auth) ? null : "allowChildren";
  const named = `predicate ${policy.name || "(anonymous)"}`;
  try {
    return (await policy(caller, msg)) === true ? null : named;
  } catch (err) {
    return `${named} (it threw ${(err as Error)?.message ?? err})`;
  }
}

/** Check `value` against `spec` (a schema, or one per property); the value the method gets, or a ServiceError naming the argument. */
async function check(spec: ServiceMethod["args"], value: unknown, what: string): Promise<unknown> {
  if (spec === undefined) return value;
  if (isSchema(spec)) return passed(await spec["~standard"].validate(value), what, null);
  if (typeof value !== "object" || value === null || Array.isArray(value))
    throw new ServiceError(`${what}: its argument must be an object of ${Object.keys(spec).join(", ")}`);
  const out: Record<string, unknown> = { ...value };
  for (const [arg, schema] of Object.entries(spec)) out[arg] = passed(await schema["~standard"].validate((value as Record<string, unknown>)[arg]), what, arg);
  return out;
}

const isSchema = (v: unknown): v is StandardSchemaV1 => typeof (v as StandardSchemaV1)?.["~standard"]?.validate === "function";

/** The checked value of `result`, or a ServiceError naming the argument (`arg`, else the issue's first path key). */
function passed(result: StandardResult<unknown>, what: string, arg: string | null): unknown {
  if (!result.issues) return result.value;
  const said = result.issues.map((issue) => {
    const path = (issue.path ?? []).map((p) => String(typeof p === "object" ? p.key : p));
    const named = arg === null ? path.shift() : arg;
    return `${named === undefined ? "its argument" : `argument ${JSON.stringify(named)}`}${path.length ? ` at ${path.join(".")}` : ""}: ${issue.message}`;
  });
  throw new ServiceError(`${what}: ${said.join("; ")}`);
}
