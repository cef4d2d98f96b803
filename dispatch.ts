/**
 * Serving CALL_FUNCTION: the callee's side of a call, with the CallContext a
 * takesRouter function gets. The body is bodies.ts's, shipped code calls.ts's. Part of the child payload.
 *
 * @module
 */
import { type CallError, MitogenError, TimeoutError } from "./errors.ts";
import { Abort, hasOwn } from "./runtime.ts";
import { HANDLE, type Message } from "./frames.ts";
import { CALL, type CallLimits, callBody, moduleTarget } from "./bodies.ts";
import { compile, isTakesRouter, replyError, replySafely, type Shippable } from "./calls.ts";
import type { Router } from "./router.ts";

/** What a takesRouter/takesEcontext function receives as its last argument. */
export interface CallContext {
  router: Router;
  econtext: Router;
  /** The message that started the call. */
  msg: Message;
  /**
   * Aborted when the caller cancels or the call's deadline passes. Pass it on
   * to nested calls (`ctx.with({ signal })`) so they end too.
   */
  signal: AbortSignal;
}

const dispatching = new WeakSet<Router>();

/** Serve CALL_FUNCTION on `router`: accepted only from this context's parents. */
export function installDispatcher(router: Router): void {
  if (dispatching.has(router)) return;
  dispatching.add(router);
  // Calls that can be cancelled, by "<caller id>:<reply handle>": only their caller can (the router serves CANCEL_CALL).
  const running = router.cancels;
  // A chained call's failure is not logged: the chain's next call raises it (Mitogen's CallChain).
  const fail = (msg: Message, err: unknown, kind: number, chained?: boolean): CallError => {
    const error = replyError(msg, withHint(err, kind, router), router);
    if (!msg.replyTo && !chained) router.log("warn", `callNoReply failed: ${error.message}`);
    return error;
  };
  const chains = router.chains;
  const done = (msg: Message, result: unknown): void => {
    if (msg.replyTo) replySafely(msg, result, router);
  };
  router.addHandler(
    (msg) => {
      let kind = -1;
      try {
        const [k, target, sent, flags = 0, lim, chain] = callBody.decode(msg);
        kind = k;
        const args = Array.isArray(sent) ? sent : [];
        if (chain !== undefined) {
          // A call chain (CallChain): its calls run one after another, in the order sent; the first
          // failure is latched, and fails every later call of the chain until a FORGET (reset()).
          // The router drops a caller's chains when it hears the caller is gone.
          const key = `${msg.src}:${chain}`;
          const state = chains.get(key) || { tail: Promise.resolve() };
          chains.set(key, state);
          const tail: Promise<void> = (state.tail = state.tail.then(async () => {
            if (kind === CALL.FORGET) state.failed = undefined;
            else if (state.failed) fail(msg, state.failed, kind, true);
            else state.failed = await runCall(msg, kind, target, args, flags, lim, true);
            // Idle (no call after this one) and not failed: forgotten.
            if (state.tail === tail && !state.failed) chains.delete(key);
          }));
          return;
        }
        // The common case, a plain call of shipped source or of a module already loaded here: no deadline, no
        // CallContext, answered in this tick when it is synchronous. Anything else (loading, errors) goes to runCall.
        if (!lim && !(flags & CALL.TAKES_ROUTER) && (kind === CALL.SOURCE || kind === CALL.MODULE)) {
          const fn = kind === CALL.SOURCE ? compile(target) : loadedExport(router, target);
          if (fn && !isTakesRouter(fn)) {
            const result = fn(...args);
            if (isThenable(result))
              result.then(
                (v) => done(msg, v),
                (err: unknown) => fail(msg, err, kind),
              );
            else done(msg, result);
            return;
          }
        }
        void runCall(msg, kind, target, args, flags, lim);
      } catch (err) {
        fail(msg, err, kind);
      }
    },
    { handle: HANDLE.CALL_FUNCTION, policy: (msg) => fromParent(router, msg) },
  );

  /** Any other call: a module's function, a load, or one with limits or a CallContext. */
  const runCall = async (
    msg: Message,
    kind: number,
    target: string,
    args: unknown[],
    flags: number,
    lim: CallLimits | undefined,
    chained?: boolean,
  ): Promise<CallError | undefined> => {
    let result: unknown;
    // Made only for calls that can be cancelled, have a deadline, or take a CallContext.
    let controller: AbortController | undefined;
    const key = `${msg.src}:${msg.replyTo}`;
    let deadline: ReturnType<typeof setTimeout> | undefined;
    try {
      if (lim) {
        const c = (controller = new Abort());
        if (lim.cancel && msg.replyTo) running.set(key, c);
        const ms = lim.timeout;
        if (typeof ms === "number") deadline = setTimeout(() => c.abort(new TimeoutError(`deadline of ${ms} ms passed in ${router.name}`)), ms);
      }
      if (kind === CALL.LOAD) {
        const m = await router.requireModule(target);
        result = Object.keys(m).filter((k) => typeof m[k] === "function");
      } else {
        let fn: Shippable;
        if (kind === CALL.MODULE) {
          const [mod, name] = moduleTarget(target);
          const f = exported(await router.requireModule(mod), name);
          if (!f) throw new MitogenError(`${mod} has no exported function ${JSON.stringify(name)}`);
          fn = f;
        } else fn = compile(target);
        const extra =
          flags & CALL.TAKES_ROUTER || isTakesRouter(fn)
            ? [{ router, econtext: router, msg, signal: (controller ??= new Abort()).signal } satisfies CallContext]
            : [];
        // Cancelled (or past its deadline) while its module loaded: it does not start.
        if (controller?.signal.aborted) throw controller.signal.reason;
        result = await fn(...args, ...extra);
      }
    } catch (err) {
      return fail(msg, err, kind, chained);
    } finally {
      if (deadline !== undefined) clearTimeout(deadline);
      running.delete(key);
    }
    done(msg, result);
  };
}

/** The function `module#name` of a module evaluated here already, if it exports one by that name. */
function loadedExport(router: Router, target: string): Shippable | undefined {
  const [mod, name] = moduleTarget(target);
  return exported(router.modules.get(mod), name);
}

/** The function `name` of a module's exports `m`, if it exports one by that name. */
function exported(m: Record<string, unknown> | undefined, name: string): Shippable | undefined {
  const f = m && hasOwn(m, name) ? m[name] : undefined;
  return typeof f === "function" ? (f as Shippable) : undefined;
}

/** Has `v` a `then` method? (A primitive has none: its prototype's are the runtime's.) */
function isThenable(v: unknown): v is PromiseLike<unknown> {
  return (typeof v === "object" || typeof v === "function") && v !== null && typeof (v as { then?: unknown }).then === "function";
}
/** A free identifier in shipped source fails remotely; say why, and what to do instead. */
function withHint(err: unknown, kind: number, router: Router): unknown {
  try {
    if (kind !== CALL.SOURCE || !(err instanceof ReferenceError)) return err;
    const name = /^(\S+) is not defined/.exec(err.message)?.[1];
    if (!name) return err;
    const hinted = new ReferenceError(
      `${name} is not defined in context ${router.name}: a function passed to call() is shipped as source, without the variables around it; ` +
        `pass ${name} as an argument, or ship a module with ctx.import()`,
    );
    hinted.stack = `${hinted.name}: ${hinted.message}\n${(err.stack ?? "").split("\n").slice(1).join("\n")}`;
    return hinted;
  } catch {
    return err; // unreadable (a Proxy, a throwing getter): fromThrown says what it can
  }
}

/** Is `msg` from this context or one of its parents? */
export function fromParent(router: Router, msg: Message): boolean {
  return msg.auth === router.myId || router.parentIds.includes(msg.auth);
}
