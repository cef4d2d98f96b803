/**
 * `mitogen:contextservice`: Mitogen's ContextService, a shipped module a context loads on the first
 * call of {@link CONTEXT_SERVICE} (activation: the master maps the name to this module, see
 * LIBRARY_SERVICES in service.ts). The context that serves it (the master, or a listening context) keeps one context
 * per spec (method, options, via chain): every caller that asks for the same spec, attached sessions
 * included, gets the same context, started once, so several processes attached to one long-lived
 * master share one connection per host. A context that goes away is forgotten (the next `get` starts
 * a new one); a start that fails is not kept.
 *
 * @module
 */
import { MitogenError } from "./errors.ts";
import { Context } from "./context.ts";
import { defineService, type Router, type ServiceCall, type ServiceDef } from "./router.ts";

/** The name the context service is called by (Mitogen's `mitogen.service.ContextService`). */
export const CONTEXT_SERVICE = "mitogen.ContextService";

/** The connection methods the context service starts contexts with (the Router's methods of these names). */
export const METHODS = ["local", "ssh", "sudo", "su", "doas", "docker", "podman", "buildah", "kubectl", "lxc", "lxd", "incus", "setns", "jail"] as const;

/** A connection method of {@link METHODS}. */
export type ContextMethod = (typeof METHODS)[number];

/**
 * What to get or start: a method and its options, as `router[method](options)` takes them. `via` is
 * a Context, or the spec of one (got or started the same way first). Options must travel on the
 * wire (no functions).
 */
export interface ContextSpec {
  method: ContextMethod;
  options?: Record<string, unknown> & { via?: Context | ContextSpec };
}

/** Started contexts by spec key, per serving router. */
const started = new WeakMap<Router, Map<string, Promise<Context>>>();

/** A stable text of `value`: object keys sorted, Contexts by id. */
function keyOf(value: unknown): string {
  if (value instanceof Context) return `context:${value.contextId}`;
  if (Array.isArray(value)) return `[${value.map(keyOf).join(",")}]`;
  if (value instanceof Uint8Array) return `bytes:${Array.from(value).join(".")}`;
  if (typeof value === "object" && value !== null) {
    const v = value as Record<string, unknown>;
    return `{${Object.keys(v)
      .filter((k) => v[k] !== undefined)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${keyOf(v[k])}`)
      .join(",")}}`;
  }
  return JSON.stringify(value) ?? String(value);
}

/** The context of `spec` in `router`: the one started for the same spec before, else a new one. */
async function getOrStart(router: Router, spec: ContextSpec, depth = 0): Promise<Context> {
  if (depth > 32) throw new MitogenError("context service: a via chain deeper than 32");
  const method = spec?.method;
  if (!(METHODS as readonly string[]).includes(method))
    throw new MitogenError(`context service: ${JSON.stringify(method)} is not a connection method (${METHODS.join(", ")})`);
  const options: Record<string, unknown> = { ...(spec.options ?? {}) };
  const via = options.via;
  if (via !== undefined && !(via instanceof Context)) options.via = await getOrStart(router, via as ContextSpec, depth + 1);
  const key = `${method}:${keyOf(options)}`;
  let map = started.get(router);
  if (!map) started.set(router, (map = new Map()));
  const known = map;
  let pending = known.get(key);
  if (!pending) {
    const start = (router as unknown as Record<string, (o: unknown) => Promise<Context>>)[method] as (o: unknown) => Promise<Context>;
    // Connected, as Mitogen's: a start that fails fails this call (and is not kept).
    const made: Promise<Context> = start.call(router, options).then((ctx) => ctx.connected());
    known.set(key, made);
    made.then(
      (ctx) => {
        void ctx.disconnected().then(() => {
          if (known.get(key) === made) known.delete(key);
        });
      },
      () => {
        if (known.get(key) === made) known.delete(key);
      },
    );
    pending = made;
  }
  const ctx = await pending;
  if (ctx.isDisconnected) {
    if (known.get(key) === pending) known.delete(key);
    return getOrStart(router, spec, depth);
  }
  return ctx;
}

/** The context of `spec` from `router`'s own context service, as its `get` gives it, without a service call (`mitogen serve` leases contexts with it). */
export function contextOf(router: Router, spec: ContextSpec): Promise<Context> {
  return getOrStart(router, spec);
}

/** The context service's method (see {@link contextService}): the context of a spec. */
export interface ContextServiceMethods {
  get: { run(spec: ContextSpec, call: ServiceCall): Promise<Context> };
}

/**
 * The context service (Mitogen's ContextService): `get(spec)` returns the context of that spec,
 * starting it on the first call; later calls from anyone (children, attached sessions) get the same.
 * Policy: parents, as Mitogen's (this context, its parents, and sessions its listener vouches for).
 *
 * @example
 * ```ts
 * import { contextService, Router } from "mitogen";
 * await using router = new Router();
 * const spec = { method: "local", options: { name: "worker" } } as const;
 * const a = await router.myself().service(contextService).get(spec);
 * const b = await router.myself().callService(contextService, "get", spec);
 * console.log(a === b); // true
 * ```
 */
export const contextService: ServiceDef<typeof CONTEXT_SERVICE, ContextServiceMethods> = defineService({
  name: CONTEXT_SERVICE,
  methods: {
    get: { run: (spec: ContextSpec, { router }) => getOrStart(router, spec) },
  },
});

/** The services this module defines, for activation by name. */
export const services: ServiceDef[] = [contextService];

/**
 * The context of `spec` from the context service of `server` (the master's `router.myself()`, or an
 * attached session's `session.context`): started there on the first call for that spec, the same
 * context for every later caller, in this process or any other attached to it.
 *
 * @example
 * ```ts
 * import { connect, getContext, Router } from "mitogen";
 * import { tmpdir } from "node:os";
 * await using router = new Router();
 * await using listener = await router.listen({ path: `${tmpdir()}/mitogen-example.sock` });
 * // Two processes attached to the same master (here two sessions of this one):
 * await using one = await connect({ path: listener.path as string });
 * await using two = await connect({ path: listener.path as string });
 * const spec = { method: "local", options: { name: "web1" } } as const; // { method: "ssh", options: { hostname: "web1" } } alike
 * const [a, b] = await Promise.all([getContext(one.context, spec), getContext(two.context, spec)]);
 * console.log(a.contextId === b.contextId, (await router.contexts()).length); // true 3 (web1 and the two sessions)
 * ```
 */
export function getContext(server: Context, spec: ContextSpec): Promise<Context> {
  return server.callService(CONTEXT_SERVICE, "get", spec) as Promise<Context>;
}
