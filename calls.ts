/**
 * Calls and shipped code: a call's limits, encoding a call of a function ({@link callMessage}; the
 * CALL_FUNCTION body itself is bodies.ts's), marking functions that take a CallContext, turning shipped
 * source into a function ({@link compile}) and running a shipped module ({@link evaluateModule}), and
 * replying safely. Serving calls is dispatch.ts. Part of the child payload.
 *
 * @module
 */
import { CallError, MitogenError } from "./errors.ts";
import { builtin, compilersForShipped } from "./runtime.ts";
import type { Message } from "./frames.ts";
import { CALL, type CallBody, type CallLimits, callBody } from "./bodies.ts";

/** Any function whose source can be shipped: self-contained, no free variables. */
// deno-lint-ignore no-explicit-any
export type Shippable = (...args: any[]) => unknown;

/**
 * What context.ts needs to recognise a CallContext as a function's last parameter (the CallContext of
 * dispatch.ts, whose router is the Router, is one).
 */
export interface CallContextShape {
  router: unknown;
  econtext: unknown;
  msg: Message;
  signal: AbortSignal;
}

/** Limits a call carries: see {@link Context.with}. */
export interface CallOptions {
  /** Aborting it cancels the call. */
  signal?: AbortSignal;
  /** Milliseconds the call may take, in total, counted from sending it. */
  timeout?: number;
}

/** The wire form of `options`, or undefined when it sets no limit (the body then ends before it). */
export function limits(options: CallOptions): CallLimits | undefined {
  if (options.signal === undefined && options.timeout === undefined) return undefined;
  return { ...(options.timeout === undefined ? {} : { timeout: options.timeout }), ...(options.signal ? { cancel: true } : {}) };
}

// ---------------------------------------------------------------------------
// Encoding a call

const TAKES = Symbol.for("mitogen.takes");

/** Was `fn` marked by {@link takesRouter}? */
export function isTakesRouter(fn: unknown): boolean {
  return (fn as Record<symbol, boolean> | null)?.[TAKES] === true;
}

/** Mark `fn` to receive `{ router, econtext }` as an extra last argument when run by CALL_FUNCTION. */
export function takesRouter<F extends Shippable>(fn: F): F {
  (fn as unknown as Record<symbol, boolean>)[TAKES] = true;
  return fn;
}

/** Mitogen's other name for {@link takesRouter}: the router is the execution context. */
export const takesEcontext: typeof takesRouter = takesRouter;

const shippedSource = new WeakMap<object, string>();

/** A CALL_FUNCTION message calling `fn(...args)` under `options`, in call chain `chain` if given. */
export function callMessage(fn: unknown, args: unknown[], options: CallOptions, chain?: number): Message {
  if (typeof fn !== "function") throw new MitogenError(`call needs a function, got ${typeof fn}`);
  let src = shippedSource.get(fn);
  if (src === undefined) {
    src = Function.prototype.toString.call(fn);
    if (/\{\s*\[native code\]\s*\}$/.test(src)) throw new MitogenError(`cannot ship native function ${fn.name || "(anonymous)"}: its source is not available`);
    if (/^class\b/.test(src)) throw new MitogenError(`cannot call class ${fn.name}: pass a function`);
    shippedSource.set(fn, src);
  }
  const flags = isTakesRouter(fn) ? CALL.TAKES_ROUTER : 0;
  const lim = limits(options);
  // Trailing defaults stay off the wire (flags 0, no limits): the commonest call is three fields.
  const body: CallBody = lim ? [CALL.SOURCE, src, args, flags, lim] : flags ? [CALL.SOURCE, src, args, flags] : [CALL.SOURCE, src, args];
  return callBody.encode(chained(body, chain));
}

/** `body` in call chain `chain`: the chain last, after the fields before it; as it is without a chain. */
export const chained = (body: CallBody, chain: number | undefined): CallBody =>
  chain === undefined ? body : [body[0], body[1], body[2], body[3] ?? 0, body[4], chain];

/** What the callee (dispatch.ts) keeps of one call chain, under "<caller id>:<chain>" in `Router.chains`. */
export interface ChainState {
  /** The chain's last call so far: the next one runs after it settles. */
  tail: Promise<void>;
  /** The first failure, latched until a FORGET: every later call of the chain fails with it. */
  failed?: unknown;
}

// ---------------------------------------------------------------------------
// Shipped code: functions and modules

const compiled = new Map<string, Shippable>();

const keepName = <T>(target: T, value: string): T => Object.defineProperty(target, "name", { value, configurable: true });

/** Turn shipped source into a function (cached by source). */
export function compile(src: string): Shippable {
  let fn = compiled.get(src);
  if (!fn) {
    // Method shorthand (`foo() {}`) is not an expression; make it one.
    const expr = /^(async\s+)?(function\b|\(|[\w$]+\s*=>|async\s*[\w$(])/.test(src) ? src : src.replace(/^(async\s+)?(\*?)\s*/, "$1function$2 ");
    // `__name` is what esbuild's keepNames (tsx, bundlers) wraps functions in.
    fn = compilersForShipped().fn("__name", `"use strict";return (${expr}\n);`)(keepName) as Shippable;
    compiled.set(src, fn);
  }
  return fn;
}

/** The running core's exports: what `import ... from "mitogen"` means in a shipped module. */
let runningCore: Record<string, unknown> | null = null;

/** @internal childMain: the running core's exports are `core`. */
export function setRunningCore(core: Record<string, unknown>): void {
  runningCore = core;
}

/**
 * Run a shipped module (a CommonJS bundle) and return its exports.
 * `require("mitogen")` is the core already running here; `node:` builtins
 * come from the runtime; nothing else can be required.
 */
export function evaluateModule(src: string, name: string): Record<string, unknown> {
  const module = { exports: {} as Record<string, unknown> };
  const require = (id: string): unknown => {
    if (id === "mitogen") return runningCore ?? {};
    const found = builtin(id);
    if (found) return found;
    throw new MitogenError(`module ${name} requires ${JSON.stringify(id)}, which is neither "mitogen" nor a runtime builtin`);
  };
  // Indirect eval of a wrapper, not `new Function`: the lines `new Function` adds before the body differ
  // between V8 versions (none on Node 12, two later), and shipped modules' stacks are mapped by line.
  const wrapped = compilersForShipped().eval(`(function (module, exports, require, __name) {\n${src}\n})`) as (...args: unknown[]) => void;
  wrapped(module, module.exports, require, keepName);
  return module.exports;
}

// ---------------------------------------------------------------------------
// Replying

/** Where a failure happened: a context, by its path from the master. */
type Where = { readonly path: readonly string[] };

const failure = (err: unknown, router: Where): CallError => CallError.fromThrown(err, router.path.join(" -> "));

/** Answer `msg`, if it asks for an answer, with `err` as a CallError from `router`'s context (see {@link replySafely}); returns that. */
export function replyError(msg: Message, err: unknown, router: Where): CallError {
  const e = failure(err, router);
  if (msg.replyTo) replySafely(msg, e, router, e);
  return e;
}

/**
 * Reply `value` to `msg`. When it cannot be sent (it cannot be encoded, it is
 * too large), reply `failed` (the call's own CallError) or the error that
 * stopped it, without its cause, then cut short: the caller always hears.
 */
export function replySafely(msg: Message, value: unknown, router: Where, failed: CallError | null = null): void {
  try {
    msg.reply(value);
  } catch (err) {
    const e = failed ?? failure(err, router);
    const bare = (n?: number) => new CallError(e.remoteName, e.remoteMessage.slice(0, n), e.remoteStack.slice(0, n));
    try {
      msg.reply(bare());
    } catch {
      msg.reply(bare(1000));
    }
  }
}

// ---------------------------------------------------------------------------
// Services: argument checks (the definitions are router.ts's, the machinery the shipped mitogen:service)

/**
 * The Standard Schema interface, version 1 (https://standardschema.dev): what zod, valibot, arktype
 * and others implement. A service method's `args` takes one (or one per argument); the library
 * depends on none of them, this is its own copy of the types-only spec.
 */
export interface StandardSchemaV1<Input = unknown, Output = Input> {
  readonly "~standard": {
    readonly version: 1;
    readonly vendor: string;
    readonly validate: (value: unknown) => StandardResult<Output> | Promise<StandardResult<Output>>;
    readonly types?: { readonly input: Input; readonly output: Output } | undefined;
  };
}

/** What a Standard Schema's `validate` gives: the (maybe transformed) value, or issues. */
export type StandardResult<Output> =
  | { readonly value: Output; readonly issues?: undefined }
  | { readonly issues: ReadonlyArray<{ readonly message: string; readonly path?: ReadonlyArray<PropertyKey | { readonly key: PropertyKey }> | undefined }> };

/** A method's argument check: one schema for its argument, or one per property of it (Mitogen's `arg_spec`). */
export type ArgSpec = StandardSchemaV1 | { readonly [arg: string]: StandardSchemaV1 };

/** The argument a caller passes to a method checked by `S` (a property whose check takes undefined may be left out). */
export type ArgsIn<S> = S extends StandardSchemaV1
  ? NonNullable<S["~standard"]["types"]>["input"]
  : S extends { readonly [arg: string]: StandardSchemaV1 }
    ? { [K in keyof S as undefined extends ArgsIn<S[K]> ? never : K]: ArgsIn<S[K]> } & {
        [K in keyof S as undefined extends ArgsIn<S[K]> ? K : never]?: ArgsIn<S[K]>;
      }
    : unknown;

/** The argument a method checked by `S` receives (what the schemas made of it). */
export type ArgsOut<S> = S extends StandardSchemaV1
  ? NonNullable<S["~standard"]["types"]>["output"]
  : S extends { readonly [arg: string]: StandardSchemaV1 }
    ? { [K in keyof S]: ArgsOut<S[K]> }
    : unknown;
