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
import { MitogenError, TimeoutError } from "./errors.ts";
import { Abort } from "./runtime.ts";
import type { Message } from "./frames.ts";
import { type ServiceBody, serviceBody } from "./bodies.ts";
import { replyError, replySafely, type StandardResult, type StandardSchemaV1 } from "./calls.ts";
import type { Context } from "./context.ts";
import type { Router, ServiceCall, ServiceDef, ServiceMethod, ServicePool } from "./router.ts";

/** The master's own service that tells a context which module defines a service: `locate({ name })`. */
export const LOCATOR = "mitogen.services";

/**
 * The library's own services, by the name they are called by, and the shipped module that defines
 * each: activated on a first call without being registered, whoever calls (loading the library's
 * own module runs no one's code; each method's policy then decides).
 */
export const LIBRARY_SERVICES: Readonly<Record<string, string>> = {
  "mitogen.FileService": "mitogen:fileservice",
  "mitogen.ContextService": "mitogen:contextservice",
};

/** A refused call, a failed argument check, an unknown service or method. The caller sees a CallError of this name. */
export class ServiceError extends MitogenError {
  override name = "ServiceError";
}

const own = Object.prototype.hasOwnProperty;

/** Default of {@link ServicePool.size}. */
const POOL_SIZE = 16;

const pools = new WeakMap<Router, Pool>();

/** The services of `router`'s context and their pool, made on first use. */
export function pool(router: Router): ServicePool {
  let p = pools.get(router);
  if (!p) pools.set(router, (p = makePool(router)));
  return p;
}

/** Serve one CALL_SERVICE (the core's handler hands each here). */
export function onCallService(router: Router, msg: Message): void {
  (pool(router) as Pool).invoke(msg);
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

/** One call as its method sees it; its signal is made when asked for, unless the call has limits. */
class Call implements ServiceCall {
  readonly router: Router;
  readonly caller: Context;
  readonly msg: Message;
  /** Set for a call with limits (a deadline, or a caller that may cancel it), with its timer and its key in `router.cancels`. */
  controller: AbortController | undefined;
  deadline: ReturnType<typeof setTimeout> | undefined;
  key = "";
  constructor(router: Router, caller: Context, msg: Message) {
    this.router = router;
    this.caller = caller;
    this.msg = msg;
  }
  get signal(): AbortSignal {
    return (this.controller ??= new Abort()).signal;
  }
}

/** A value that is not known yet: what {@link check} returns when a schema answers with a promise. */
class Later {
  readonly promise: Promise<unknown>;
  constructor(promise: Promise<unknown>) {
    this.promise = promise;
  }
}

/** A pool that can also serve a CALL_SERVICE. */
type Pool = ServicePool & { invoke(msg: Message): void };

/** A call admitted while the pool was full: it starts as another ends, in the order admitted. */
type Waiting = { call: Call; m: ServiceMethod; args: unknown; what: string; noReply: boolean };

/**
 * The pool of `router`'s context. Its state lives in this closure, not in private members: shipped
 * modules are lowered for Node 12, where each `#member` access is a WeakMap lookup. A call is handled
 * synchronously as far as it can be: a service served here, a named policy, checks that answer at
 * once and a pool with room run the method in the tick its message arrived.
 */
function makePool(router: Router): Pool {
  const services = new Map<string, ServiceDef>();
  const activating = new Map<string, Promise<ServiceDef>>();
  const waiting: Waiting[] = [];
  let running = 0;
  let draining = false;

  const self: Pool = {
    size: POOL_SIZE,
    get running(): number {
      return running;
    },
    get queued(): number {
      return waiting.length;
    },
    add(...defs: ServiceDef[]): ServicePool {
      for (const s of defs) {
        if (typeof s?.name !== "string" || typeof s.methods !== "object" || s.methods === null)
          throw new ServiceError("a service needs a name and methods (see defineService)");
        if (services.has(s.name)) throw new ServiceError(`service ${s.name} is already served in ${router.name}`);
        services.set(s.name, s);
      }
      return self;
    },
    names: (): string[] => [...services.keys()],
    invoke,
  };

  /** Check and run the call `msg`, and answer it. */
  function invoke(msg: Message): void {
    let what = "a service";
    try {
      const body = serviceBody.decode(msg);
      const b: Partial<ServiceBody> = Array.isArray(body) ? body : [];
      const name = b[0];
      const method = b[1];
      const sent = b[2];
      const lim = b[3];
      if (typeof name !== "string" || typeof method !== "string") throw new ServiceError("CALL_SERVICE needs [service, method, args]");
      what = `${name}.${method}`;
      const call = new Call(router, router.contextById(msg.src), msg);
      if (lim) {
        // As a call's limits (dispatch.ts): the deadline counts from arrival, activation and a wait in the pool included.
        const c = (call.controller = new Abort());
        if (lim.cancel && msg.replyTo) router.cancels.set((call.key = `${msg.src}:${msg.replyTo}`), c);
        const ms = lim.timeout;
        if (typeof ms === "number") call.deadline = setTimeout(() => c.abort(new TimeoutError(`deadline of ${ms} ms passed in ${router.name}`)), ms);
      }
      const service = services.get(name);
      if (service) admit(call, service, method, sent, what);
      else
        activate(name, call).then(
          (s) => admit(call, s, method, sent, what),
          (err: unknown) => fail(call, what, false, err),
        );
    } catch (err) {
      if (!msg.replyTo) router.log("warn", `${what} failed: ${(err as Error)?.message ?? err}`, "log", { caller: msg.src });
      else replyError(msg, err, router);
    }
  }

  /** The policy first (a refusal is logged here), then the method and its argument's check. */
  function admit(call: Call, service: ServiceDef, method: string, sent: unknown, what: string): void {
    try {
      // Not Object.hasOwn: a Node 12 child runs this module too.
      const m = own.call(service.methods, method) ? (service.methods as Record<string, ServiceMethod>)[method] : undefined;
      const policy = m?.policy ?? service.policy ?? "parents";
      if (typeof policy === "function")
        predicate(policy, call).then(
          (refused) => checked(call, service, method, m, sent, what, refused),
          (err: unknown) => fail(call, what, false, err),
        );
      else checked(call, service, method, m, sent, what, refusedBy(policy, call));
    } catch (err) {
      fail(call, what, false, err);
    }
  }

  function checked(call: Call, service: ServiceDef, method: string, m: ServiceMethod | undefined, sent: unknown, what: string, refused: string | null): void {
    try {
      const caller = call.caller;
      if (refused) {
        const text = `${caller.name} (context ${caller.contextId}) may not call ${what} in ${router.name}: refused by policy ${refused}`;
        router.log("warn", text, "log", { service: service.name, method, caller: caller.contextId, policy: refused });
        throw new ServiceError(text);
      }
      if (!m || typeof m.run !== "function") throw new ServiceError(`service ${service.name} has no method ${JSON.stringify(method)} in ${router.name}`);
      const args = check(m.args, sent, what);
      if (args instanceof Later)
        args.promise.then(
          (v) => start(call, m, v, what),
          (err: unknown) => fail(call, what, false, err),
        );
      else start(call, m, args, what);
    } catch (err) {
      fail(call, what, false, err);
    }
  }

  /** Admitted: a noReply method's caller hears nil now; the method runs when fewer than `size` calls run. */
  function start(call: Call, m: ServiceMethod, args: unknown, what: string): void {
    const noReply = m.noReply === true;
    if (noReply && call.msg.replyTo) replySafely(call.msg, undefined, router);
    if (running >= self.size) waiting.push({ call, m, args, what, noReply });
    else run(call, m, args, what, noReply);
  }

  function run(call: Call, m: ServiceMethod, args: unknown, what: string, noReply: boolean): void {
    // Cancelled (or past its deadline) while it waited: it does not start.
    const signal = call.controller?.signal;
    if (signal?.aborted) {
      fail(call, what, noReply, signal.reason);
      return;
    }
    running++;
    let result: unknown;
    try {
      result = m.run(args, call);
    } catch (err) {
      end(call, what, noReply, err, true);
      return;
    }
    if (isThenable(result))
      result.then(
        (v) => end(call, what, noReply, v, false),
        (err: unknown) => end(call, what, noReply, err, true),
      );
    else end(call, what, noReply, result, false);
  }

  /** A method ended: its place goes to the next call waiting, and it is answered. */
  function end(call: Call, what: string, noReply: boolean, value: unknown, failed: boolean): void {
    running--;
    if (failed) fail(call, what, noReply, value);
    else {
      if (!noReply && call.msg.replyTo) replySafely(call.msg, value, router);
      settle(call);
    }
    drain();
  }

  /** Start the calls waiting while there is room: in a loop, not from each ending method (a queue of synchronous ones would nest). */
  function drain(): void {
    if (draining) return;
    draining = true;
    try {
      for (let next = waiting[0]; next && running < self.size; next = waiting[0]) {
        waiting.shift();
        run(next.call, next.m, next.args, next.what, next.noReply);
      }
    } finally {
      draining = false;
    }
  }

  /** Answer `call` with `err`, or log it when nobody hears an answer. */
  function fail(call: Call, what: string, noReply: boolean, err: unknown): void {
    const msg = call.msg;
    if (noReply || !msg.replyTo) router.log("warn", `${what} failed: ${(err as Error)?.message ?? err}`, "log", { caller: msg.src });
    else replyError(msg, err, router);
    settle(call);
  }

  /**
   * Load service `name`, once however many calls ask at the same time. As Mitogen's Activator, only a
   * call from a parent (or this context) loads one; at the master, a service it registered is loaded
   * for any caller (registering it there is the master's own choice, as adding one to Mitogen's Pool),
   * and anywhere, one of {@link LIBRARY_SERVICES}.
   */
  function activate(name: string, call: Call): Promise<ServiceDef> {
    const { msg, caller } = call;
    const library = Object.hasOwn(LIBRARY_SERVICES, name);
    if (!(router as Router & Registry).loadService && !library && !fromParent(router, msg)) {
      const text = `service ${name} is not served in ${router.name} yet, and only a call from a parent activates one: ${caller.name} (context ${caller.contextId}) is not one`;
      router.log("warn", text, "log", { service: name, caller: caller.contextId });
      return Promise.reject(new ServiceError(text));
    }
    let pending = activating.get(name);
    if (!pending) {
      pending = load(name).finally(() => activating.delete(name));
      activating.set(name, pending);
    }
    return pending;
  }

  async function load(name: string): Promise<ServiceDef> {
    const registry = router as Router & Registry;
    let found: ServiceDef | undefined;
    if (registry.loadService) found = await registry.loadService(name);
    else {
      const module = await router.contextById(0).callService(LOCATOR, "locate", { name });
      if (typeof module === "string") found = findService(await router.requireModule(module), name);
    }
    if (!found) throw new ServiceError(`no service ${name} in ${router.name}, and none is registered under that name at the master`);
    if (!services.has(name)) self.add(found);
    return services.get(name) as ServiceDef;
  }

  return self;
}

/** A call settled: its deadline and its place among the cancellable calls go. */
function settle(call: Call): void {
  if (!call.controller) return;
  clearTimeout(call.deadline);
  if (call.key) call.router.cancels.delete(call.key);
}

/** Is `msg` from this context or one of its parents (Mitogen's has_parent_authority)? */
const fromParent = (router: Router, msg: Message): boolean => msg.auth === router.myId || router.parentIds.includes(msg.auth);

/** The name of named `policy` when it refuses `call`, else null. */
function refusedBy(policy: "parents" | "children" | "any", call: Call): string | null {
  const { router, msg } = call;
  if (policy === "any") return null;
  if (policy === "parents") return fromParent(router, msg) ? null : "allowParents";
  return msg.auth === router.myId || router.routeTo(msg.auth) ? null : "allowChildren";
}

/** The name of predicate `policy` when it refuses `call`, else null. */
async function predicate(policy: (caller: Context, msg: Message) => boolean | Promise<boolean>, call: Call): Promise<string | null> {
  const named = `predicate ${policy.name || "(anonymous)"}`;
  try {
    return (await policy(call.caller, call.msg)) === true ? null : named;
  } catch (err) {
    return `${named} (it threw ${(err as Error)?.message ?? err})`;
  }
}

/** Has `v` a `then` method? */
function isThenable(v: unknown): v is PromiseLike<unknown> {
  return (typeof v === "object" || typeof v === "function") && v !== null && typeof (v as { then?: unknown }).then === "function";
}

/**
 * Check `value` against `spec` (a schema, or one per property): the value the method gets, or a
 * ServiceError naming the argument; {@link Later} when a schema answers with a promise.
 */
function check(spec: ServiceMethod["args"], value: unknown, what: string): unknown {
  if (spec === undefined) return value;
  if (isSchema(spec)) {
    const result = spec["~standard"].validate(value);
    return isThenable(result) ? new Later(Promise.resolve(result).then((r) => passed(r, what, null))) : passed(result, what, null);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value))
    throw new ServiceError(`${what}: its argument must be an object of ${Object.keys(spec).join(", ")}`);
  const out: Record<string, unknown> = { ...value };
  const pending: Promise<void>[] = [];
  for (const [arg, schema] of Object.entries(spec)) {
    const result = schema["~standard"].validate((value as Record<string, unknown>)[arg]);
    if (isThenable(result)) pending.push(Promise.resolve(result).then((r) => void (out[arg] = passed(r, what, arg))));
    else out[arg] = passed(result, what, arg);
  }
  return pending.length ? new Later(Promise.all(pending).then(() => out)) : out;
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
