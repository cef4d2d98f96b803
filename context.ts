/**
 * Context: a reference to a context, to call functions in it and send it messages; CallScope, its
 * calls under a timeout or signal (`ctx.with()`); CallChain, its ordered calls (`ctx.chain()`); and the
 * types of its file transfers (files.ts does them).
 * Part of the child payload.
 *
 * @module
 */
import { AbortError, TimeoutError } from "./errors.ts";
import { WIRE_REF, type WireRef } from "./codec.ts";
import { asyncDispose } from "./runtime.ts";
import { HANDLE, Message } from "./frames.ts";
import { type ChannelHost, Receiver } from "./channels.ts";
import type { GetOptions } from "./select.ts";
import { CALL, callBody, serviceBody } from "./bodies.ts";
import { type ArgsIn, type CallContextShape, type CallOptions, callMessage, chained, limits } from "./calls.ts";

/** What a Context needs of its router (the Router is one). */
export interface ContextHost extends ChannelHost {
  readonly name: string;
  route(msg: Message): void;
  delHandler(handle: number): void;
  _expectReply(respondent: number, fn: (msg: Message) => void): number;
  bundleModule(specifier: string | URL, runtime: string | null): Promise<string>;
  /** The file URL `specifier` means, read while the caller of ctx.import is still on the stack (see {@link Context.import}). */
  moduleURL?(specifier: string | URL): URL;
  /** The exported names of a module bundled here, when the bundle tells (see {@link ContextHost.bundleModule}). */
  moduleExports?(name: string): string[] | undefined;
  requireModule(name: string): Promise<Record<string, unknown>>;
  pushDown(to: number, names: string[], ids?: number[]): void;
}

/** Options of {@link Context.putFile}, {@link Context.getFile} and {@link Router.putFile}. */
export interface FileOptions {
  /**
   * Mode of the written file (default: the source's permission bits, without setuid, setgid and
   * sticky unless {@link keepSetuid}). A mode given here is set as given.
   */
  mode?: number;
  /** With the source's mode, keep its setuid, setgid and sticky bits too (default: they are cleared). */
  keepSetuid?: boolean;
  /** Keep the source's mtime. */
  preserveTimes?: boolean;
  /** Aborting it cancels the transfer; the destination is left as it was. */
  signal?: AbortSignal;
  /** Called at least every 250 ms while a transfer runs, and once at its end, per target context. */
  onProgress?: (progress: FileProgress) => void;
}

/** What {@link FileOptions.onProgress} is told. */
export interface FileProgress {
  /** Bytes the context has written so far. */
  bytes: number;
  /** The file's size. */
  total: number;
  context: Context;
}

/** One context's file, written and checked. */
export interface FileResult {
  context: Context;
  bytes: number;
  /** sha256 of what was written, hex. */
  sha256: string;
}

/** One context's failure in a transfer. */
export interface FileFailure {
  context: Context;
  error: Error;
}

/** The functions of the shipped module `mitogen:files` (files.ts) a Context calls. */
interface FilesModule {
  putOne(router: ContextHost, context: Context, src: string, dst: string, options: FileOptions): Promise<FileResult>;
  getFile(router: ContextHost, context: Context, src: string, dst: string, options: FileOptions): Promise<FileResult>;
}

/** A shipped module as the caller sees it: each exported function, async, without its CallContext argument. */
export type Remote<T> = {
  [K in keyof T as T[K] extends (...args: any[]) => unknown ? K : never]: T[K] extends (...args: infer A) => infer R
    ? (...args: A extends [...infer Head, CallContextShape] ? Head : A) => Promise<Awaited<R>>
    : never;
};

/**
 * What a caller needs of a service's definition ({@link defineService} in router.ts makes them): its
 * name, and its methods' argument checks and results, for the types of {@link Context.service}.
 */
export interface ServiceShape {
  readonly name: string;
  readonly methods: object;
}

/** The argument list of calling method `M` of a service: its checked argument, or an optional one when it has no check. */
export type ServiceArgs<M> = M extends { args: infer S } ? [args: ArgsIn<S>] : [args?: unknown];

/** What calling method `M` of a service resolves with: its result, or nothing for a noReply method. */
export type ServiceResult<M> = M extends { noReply: true } ? undefined : M extends { run(...a: never[]): infer R } ? Awaited<R> : unknown;

/** A service as a caller sees it ({@link Context.service}): each method, async, taking its one argument. */
export type ServiceClient<S extends ServiceShape> = {
  readonly [K in keyof S["methods"]]: (...args: ServiceArgs<S["methods"][K]>) => Promise<ServiceResult<S["methods"][K]>>;
};

/** Options of {@link Context.shutdown}. */
export interface ShutdownOptions {
  /** Resolve only once the context has gone. */
  wait?: boolean;
}

/**
 * A reference to a context, used to call functions in it and send it
 * messages. Serialisable: sending a Context to another context gives a
 * Context bound to the receiver's router.
 */
export class Context implements WireRef, AsyncDisposable {
  readonly router: ContextHost;
  readonly contextId: number;
  name: string;
  /** The context this one was started through, if known. */
  via: Context | null = null;
  /**
   * The runtime it runs on, as its first stage reported it (`node 12.22.12`, `deno 2.9.6`); null when
   * not known here (a context above this one). The master bundles `import`ed modules for it.
   */
  runtime: string | null = null;
  /** How it was started (`local`, `ssh`, `sudo`, `docker`..., `session` for an attached one); null when not known here. */
  method: string | null = null;
  #disconnected: string | null = null;
  #waiters: ((reason: string) => void)[] = [];
  #connected: Promise<this> | null = null;

  constructor(router: ContextHost, contextId: number, name: string) {
    this.router = router;
    this.contextId = contextId;
    this.name = name;
  }

  /** Send a prepared message to this context. */
  send(msg: Message): void {
    msg.dst = this.contextId;
    this.router.route(msg);
  }

  /** Send `msg` and return a Receiver for its reply. */
  sendAsync(msg: Message, options: { persist?: boolean } = {}): Receiver {
    const recv = new Receiver(this.router, { persist: options.persist ?? false, respondent: this });
    msg.replyTo = recv.handle;
    this.send(msg);
    return recv;
  }

  /**
   * Send `msg` and await the decoded reply: the one way to ask and wait. Without a timeout no
   * Receiver is made (the reply goes to a one-shot handler); with one, as `sendAsync(msg).get()`.
   */
  sendAwait(msg: Message, options: GetOptions = {}): Promise<unknown> {
    if (options.timeout !== undefined)
      return this.sendAsync(msg)
        .get(options)
        .then((reply) => reply.unpickle());
    return new Promise((resolve, reject) => {
      const router = this.router;
      const handle = router._expectReply(this.contextId, (reply) => {
        try {
          resolve(reply.unpickle());
        } catch (err) {
          reject(err);
        }
      });
      msg.replyTo = handle;
      try {
        this.send(msg);
      } catch (err) {
        router.delHandler(handle);
        reject(err);
      }
    });
  }

  /**
   * Start `fn(...args)` in this context and return a Receiver for the result.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local();
   * const recv = ctx.callAsync(() => process.pid);
   * console.log((await recv.get()).unpickle());
   * ```
   */
  callAsync<A extends unknown[], R, C extends CallContextShape>(fn: (...args: [...A, C]) => R, ...args: A): Receiver;
  callAsync<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Receiver;
  callAsync<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Receiver {
    return this.#scope().callAsync(fn, ...args);
  }

  /**
   * Run `fn(...args)` in this context and resolve with its result (awaited
   * there if it is a promise). Rejects with CallError if it throws.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local({ runtime: "node" });
   * console.log(await ctx.call((x: number) => x * 2, 21)); // 42
   * ```
   */
  call<A extends unknown[], R, C extends CallContextShape>(fn: (...args: [...A, C]) => R, ...args: A): Promise<Awaited<R>>;
  call<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Promise<Awaited<R>>;
  call<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Promise<Awaited<R>> {
    return this.#scope().call(fn, ...args);
  }

  /**
   * Run `fn(...args)` in this context without waiting for, or hearing of, a result; a failure is
   * logged there. It runs concurrently with other calls into the context: for calls that must run
   * in order, use a {@link Context.chain}.
   */
  callNoReply<A extends unknown[], R, C extends CallContextShape>(fn: (...args: [...A, C]) => R, ...args: A): void;
  callNoReply<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): void;
  callNoReply<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): void {
    this.send(callMessage(fn, args, {}));
  }

  /** Call the exported function `name` of shipped module `module` (fetched on demand there). */
  callModule(module: string, name: string, ...args: unknown[]): Promise<unknown> {
    return this.#scope().callModule(module, name, ...args);
  }

  /**
   * Call `method` of service `service` in this context (Mitogen's `call_service`), where the service's
   * policy lets this context call it: the argument is checked there before the method runs, a refusal
   * or a failed check rejects with CallError. A context that does not hold the service yet loads the
   * module the master registered it from ({@link Router.registerService}). Given the service's
   * definition, the call is typed; {@link Context.service} reads better.
   *
   * @example
   * ```ts
   * import { type CallContext, defineService, Router, takesRouter } from "mitogen";
   * await using router = new Router();
   * await router.serve(defineService({ name: "clock", policy: "children", methods: { now: { run: () => Date.now() } } }));
   * const child = await router.local();
   * // The child asks its master (context 0):
   * console.log(await child.call(takesRouter(({ router }: CallContext) => router.contextById(0).callService("clock", "now")))); // 1735689600000
   * ```
   */
  callService<S extends ServiceShape, K extends keyof S["methods"] & string>(
    service: S,
    method: K,
    ...args: ServiceArgs<S["methods"][K]>
  ): Promise<ServiceResult<S["methods"][K]>>;
  callService(service: string, method: string, args?: unknown): Promise<unknown>;
  callService(service: string | ServiceShape, method: string, args?: unknown): Promise<unknown> {
    return this.#scope().callService(service as string, method, args);
  }

  /** As {@link Context.callService}, returning the Receiver of its reply (Mitogen's `call_service_async`). */
  callServiceAsync(service: string | ServiceShape, method: string, args?: unknown): Receiver {
    return this.#scope().callServiceAsync(service, method, args);
  }

  /** As {@link Context.callService}, without a reply: a failure is logged where the service runs. */
  callServiceNoReply(service: string | ServiceShape, method: string, args?: unknown): void {
    this.send(serviceMessage(service, method, args, {}));
  }

  /**
   * Service `service` of this context as an object whose methods call it ({@link Context.callService}),
   * typed by its definition: pass the definition, or its name with its type (`service<typeof files>("files")`).
   *
   * @example
   * ```ts
   * import { defineService, Router } from "mitogen";
   * const greeter = defineService({ name: "greeter", policy: "any", methods: { hello: { run: (who: unknown) => `hello ${who}` } } });
   * await using router = new Router();
   * await router.serve(greeter);
   * console.log(await router.myself().service(greeter).hello("world")); // hello world
   * ```
   */
  service<S extends ServiceShape>(service: S | S["name"]): ServiceClient<S> {
    return this.#scope().service(service);
  }

  /**
   * Ship a TypeScript or JavaScript module (with its relative imports and npm
   * dependencies, bundled by the master) to this context, and return an
   * object whose functions run there. Only the master can bundle. `specifier` is a
   * file URL, a path, or `"./x.ts"` beside the file that calls this (read from its
   * stack frame at the call; `new URL("./x.ts", import.meta.url)` does not depend on it).
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local();
   * const tasks = await ctx.import<typeof import("./examples/tasks.ts")>(new URL("./examples/tasks.ts", import.meta.url));
   * console.log(await tasks.inventory({ deep: false })); // { host: "web1", platform: "linux", cpus: 8, runtime: "node v22.12.0" }
   * ```
   */
  import<T>(specifier: string | URL): Promise<Remote<T>> {
    return this.#scope().import<T>(specifier);
  }

  /**
   * Calls into this context bounded by `options`: a `timeout` (ms) that
   * travels with each call, and/or an AbortSignal. Either rejects the caller
   * at once (TimeoutError, AbortError) and aborts the `signal` the remote
   * function gets in its CallContext, however many hops away.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local();
   * await ctx.with({ timeout: 100 }).call(() => new Promise(() => {})).catch((e) => console.log(e.name)); // TimeoutError
   * ```
   */
  with(options: CallOptions): CallScope {
    return new CallScope(this, options);
  }

  /**
   * A new {@link CallChain} into this context (Mitogen's pipelined `CallChain`): its calls run
   * there one after another in the order sent, and after one fails the later ones fail with its
   * error until {@link CallChain.reset}. Plain calls into a context run concurrently.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local();
   * await using chain = ctx.chain(); // reset() at the end of the block
   * chain.callNoReply(() => { (globalThis as { steps?: string[] }).steps = ["setup"]; });
   * console.log(await chain.call(() => (globalThis as { steps?: string[] }).steps)); // [ "setup" ]
   * ```
   */
  chain(): CallChain {
    return new CallChain(this);
  }

  #plain: CallScope | null = null;
  /** The scope of calls without options. */
  #scope(): CallScope {
    return (this.#plain ??= new CallScope(this, {}));
  }

  /**
   * Copy file `src` of the calling context to `dst` in this one: streamed, written to a temporary name
   * and renamed, sha256 checked; mode kept (or `options.mode`), mtime with `preserveTimes`.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local();
   * const { bytes, sha256 } = await ctx.putFile("./README.md", "/tmp/README.copy", { mode: 0o644 });
   * console.log(bytes, sha256);
   * ```
   */
  async putFile(src: string, dst: string, options: FileOptions = {}): Promise<FileResult> {
    return (await files(this.router)).putOne(this.router, this, src, dst, options);
  }

  /**
   * Copy file `src` of this context to `dst` in the calling one, as {@link Context.putFile} the other way.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local();
   * await ctx.getFile("/etc/hostname", "/tmp/hostname.copy", { preserveTimes: true });
   * ```
   */
  async getFile(src: string, dst: string, options: FileOptions = {}): Promise<FileResult> {
    return (await files(this.router)).getFile(this.router, this, src, dst, options);
  }

  /**
   * Resolves once the context has connected (Mitogen's `router.ssh()` returns then); rejects with the
   * error its start failed with, the one its calls reject with. A method that cannot be asked for a
   * password on the stream (ssh) resolves as soon as it has sent the core, and a context started
   * `via` another as soon as the request to start it is sent, so that the first calls go with them
   * (they wait in the `via` context until it is connected): await this where a failure must be seen
   * before anything else is done.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const hop = await router.local();
   * const child = await (await router.local({ via: hop, name: "child" })).connected();
   * console.log(await child.call(() => 6 * 7)); // 42
   * ```
   */
  connected(): Promise<this> {
    return this.#connected ?? Promise.resolve(this);
  }

  /** @internal Its start goes on: `connected()` waits for `until`. */
  _connecting(until: Promise<unknown>): void {
    const p = until.then(() => this);
    p.catch(() => {});
    this.#connected = p;
  }

  /** Resolves with the reason once the context is gone. */
  disconnected(): Promise<string> {
    if (this.#disconnected !== null) return Promise.resolve(this.#disconnected);
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  /** True once the context is gone. */
  get isDisconnected(): boolean {
    return this.#disconnected !== null;
  }

  /** @internal The router saw this context go. */
  _disconnected(reason: string): void {
    if (this.#disconnected !== null) return;
    this.#disconnected = reason;
    for (const w of this.#waiters.splice(0)) w(reason);
  }

  /**
   * Ask the context to exit; its children exit with it. With `wait`,
   * resolves once it has gone.
   */
  async shutdown(options: ShutdownOptions = {}): Promise<void> {
    if (this.#disconnected !== null) return;
    this.send(Message.encoded(null, { handle: HANDLE.SHUTDOWN }));
    if (options.wait) await this.disconnected();
  }

  [WIRE_REF](): readonly [number, readonly unknown[]] {
    return [5, [this.contextId, this.name]];
  }

  toString(): string {
    return `Context(${this.contextId}, ${JSON.stringify(this.name)})`;
  }

  [asyncDispose](): Promise<void> {
    return this.shutdown({ wait: true });
  }
}

/** A CALL_SERVICE message: `method` of `service` (a name or a definition) with `args`, under `options`. */
const serviceMessage = (service: string | ServiceShape, method: string, args: unknown, options: CallOptions): Message => {
  const lim = limits(options);
  const name = typeof service === "string" ? service : service.name;
  return serviceBody.encode(lim ? [name, method, args, lim] : [name, method, args]);
};

/** The shipped module `mitogen:files` (files.ts), loaded on first use. */
const files = (router: ContextHost) => router.requireModule("mitogen:files") as Promise<unknown> as Promise<FilesModule>;
/**
 * Calls into a context under {@link CallOptions} (from {@link Context.with}).
 * Functions of modules imported through it carry the same options.
 */
export class CallScope {
  readonly context: Context;
  readonly options: CallOptions;
  /** The number of the {@link CallChain} the calls belong to (unique in this process); undefined outside one. */
  readonly chainId: number | undefined;

  constructor(context: Context, options: CallOptions, chainId?: number) {
    this.context = context;
    this.options = options;
    this.chainId = chainId;
  }

  /** As {@link Context.callAsync}. */
  callAsync<A extends unknown[], R, C extends CallContextShape>(fn: (...args: [...A, C]) => R, ...args: A): Receiver;
  callAsync<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Receiver;
  callAsync<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Receiver {
    return this.#start(callMessage(fn, args, this.options, this.chainId));
  }

  /** As {@link Context.call}. */
  call<A extends unknown[], R, C extends CallContextShape>(fn: (...args: [...A, C]) => R, ...args: A): Promise<Awaited<R>>;
  call<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Promise<Awaited<R>>;
  call<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Promise<Awaited<R>> {
    return this.#request(() => callMessage(fn, args, this.options, this.chainId)) as Promise<Awaited<R>>;
  }

  /** As {@link Context.callModule}. */
  callModule(module: string, name: string, ...args: unknown[]): Promise<unknown> {
    // The module goes ahead of the call where the callee is below us and not known to hold it.
    this.context.router.pushDown(this.context.contextId, [module]);
    return this.#request(() => callBody.encode(chained([CALL.MODULE, `${module}#${name}`, args, 0, limits(this.options)], this.chainId)));
  }

  /**
   * As {@link Context.callService}, under this scope's options: past the deadline, or once the signal
   * aborts, the caller rejects (TimeoutError, AbortError) and the method's `signal` aborts where it
   * runs. A chain does not order its service calls.
   *
   * @example
   * ```ts
   * import { defineService, Router } from "mitogen";
   * const slow = defineService({
   *   name: "slow",
   *   policy: "any",
   *   methods: { wait: { run: (_: unknown, { signal }) => new Promise(() => signal.addEventListener("abort", () => console.log("stopped:", signal.reason.name))) } },
   * });
   * await using router = new Router();
   * await router.serve(slow);
   * await router.myself().with({ timeout: 100 }).callService("slow", "wait").catch((e) => console.log(e.name)); // TimeoutError
   * ```
   */
  callService<S extends ServiceShape, K extends keyof S["methods"] & string>(
    service: S,
    method: K,
    ...args: ServiceArgs<S["methods"][K]>
  ): Promise<ServiceResult<S["methods"][K]>>;
  callService(service: string, method: string, args?: unknown): Promise<unknown>;
  callService(service: string | ServiceShape, method: string, args?: unknown): Promise<unknown> {
    return this.#request(() => serviceMessage(service, method, args, this.options));
  }

  /** As {@link Context.callServiceAsync}. */
  callServiceAsync(service: string | ServiceShape, method: string, args?: unknown): Receiver {
    return this.#start(serviceMessage(service, method, args, this.options));
  }

  /** As {@link Context.service}: its methods called under this scope's options. */
  service<S extends ServiceShape>(service: S | S["name"]): ServiceClient<S> {
    return new Proxy({} as ServiceClient<S>, {
      get: (_, method) => (typeof method === "string" && method !== "then" ? (args?: unknown) => this.callService(service as string, method, args) : undefined),
    });
  }

  /** A new {@link CallChain} into the context, its calls under this scope's options (see {@link Context.chain}). */
  chain(): CallChain {
    return new CallChain(this.context, this.options);
  }

  /** Send the call `make()` builds and resolve with the decoded reply; without a timeout or signal, no Receiver is made. */
  #request(make: () => Message): Promise<unknown> {
    let msg: Message;
    try {
      msg = make();
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.options.signal === undefined && this.options.timeout === undefined) return this.context.sendAwait(msg);
    return this.#start(msg)
      .get()
      .then((reply) => reply.unpickle());
  }

  /** As {@link Context.import}; the functions returned carry this scope's options. */
  async import<T>(specifier: string | URL): Promise<Remote<T>> {
    const ctx = this.context;
    const router = ctx.router;
    // Before anything waits: a relative specifier is read against the caller's frame.
    const module = router.moduleURL?.(specifier) ?? specifier;
    // Bundled for its runtime: a context still starting tells it once connected.
    if (ctx.runtime === null) await ctx.connected();
    const name = await router.bundleModule(module, ctx.runtime);
    router.pushDown(ctx.contextId, [name]);
    const load = callBody.encode(chained([CALL.LOAD, name, [], 0, limits(this.options)], this.chainId));
    const loaded = this.#start(load)
      .get()
      .then((reply) => reply.unpickle() as string[]);
    const remote: Record<string, (...args: unknown[]) => Promise<unknown>> = {};
    let failed: { error: unknown } | null = null;
    const add = (fn: string) => (remote[fn] = (...args) => (failed ? Promise.reject(failed.error) : this.callModule(name, fn, ...args)));
    const known = router.moduleExports?.(name);
    if (!known) {
      for (const fn of await loaded) add(fn);
      return remote as Remote<T>;
    }
    // The bundle names the exports: the first calls go behind the load, and fail as it does. Exports that
    // are not functions go once it answers.
    for (const fn of known) add(fn);
    loaded.then(
      (fns) => {
        for (const fn of known) if (!fns.includes(fn)) delete remote[fn];
      },
      (error: unknown) => {
        failed = { error };
      },
    );
    return remote as Remote<T>;
  }

  /** Send a call; enforce the timeout and signal on the caller's side and tell the callee. */
  #start(msg: Message): Receiver {
    const { signal, timeout } = this.options;
    const ctx = this.context;
    if (signal?.aborted) {
      // Already cancelled: nothing is sent, the caller fails at once.
      const recv = new Receiver(ctx.router, { persist: false });
      recv._fail(new AbortError(`call to ${ctx.name} aborted`, { cause: signal.reason }));
      return recv;
    }
    const recv = ctx.sendAsync(msg);
    if (signal === undefined && timeout === undefined) return recv;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const onAbort = () => stop(new AbortError(`call to ${ctx.name} aborted`, { cause: signal?.reason }));
    const stop = (reason: Error) => {
      recv._fail(reason);
      ctx.send(Message.encoded(recv.handle, { handle: HANDLE.CANCEL_CALL }));
    };
    recv._onSettle(() => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    });
    signal?.addEventListener("abort", onAbort, { once: true });
    if (timeout !== undefined) timer = setTimeout(() => stop(new TimeoutError(`call to ${ctx.name} did not finish within ${timeout} ms`)), timeout);
    return recv;
  }
}

/** The last chain number given in this process. */
let lastChain = 0;

/**
 * Ordered, pipelined calls into a context: Mitogen's `CallChain` in pipelined mode (from
 * {@link Context.chain}). The context runs the calls of one chain one after another, each once the
 * one before it has settled, in the order they were sent, however they were sent (`callNoReply`
 * returns at once); calls of other chains, and plain calls, run meanwhile. After a call of the chain
 * fails, every later call of it fails with that same error, without running (a `callNoReply`'s
 * failure is not logged: the next `call` raises it), until {@link CallChain.reset}. The context
 * keeps a failed chain's error until then (or until this context is gone): reset a chain when done,
 * or use it with `await using`.
 *
 * A deadline (`ctx.with({ timeout }).chain()`) counts, in the called context, from the call's start
 * after those before it; a function that ignores its signal past its deadline holds the chain up
 * until it ends (the caller has its TimeoutError at once).
 *
 * @example
 * ```ts
 * import { Router } from "mitogen";
 * await using router = new Router();
 * const ctx = await router.local();
 * const chain = ctx.chain();
 * chain.callNoReply(() => { throw new Error("setup failed"); });
 * chain.callNoReply(() => console.log("never runs"));
 * await chain.call(() => 1).catch((e) => console.log(e.message)); // setup failed
 * chain.reset();
 * console.log(await chain.call(() => 2)); // 2
 * ```
 */
export class CallChain extends CallScope implements AsyncDisposable {
  constructor(context: Context, options: CallOptions = {}) {
    super(context, options, ++lastChain);
  }

  /** As {@link Context.callNoReply}, in the chain: returns at once; a failure fails the chain's next calls. */
  callNoReply<A extends unknown[], R, C extends CallContextShape>(fn: (...args: [...A, C]) => R, ...args: A): void;
  callNoReply<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): void;
  callNoReply<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): void {
    this.context.send(callMessage(fn, args, this.options, this.chainId));
  }

  /**
   * Have the context forget the chain's failure, once the calls sent before have run: calls sent
   * after run again. Returns at once (as Mitogen's, nothing is answered).
   */
  reset(): void {
    this.context.send(callBody.encode(chained([CALL.FORGET, "", []], this.chainId)));
  }

  /** `await using chain = ctx.chain()`: {@link CallChain.reset} at the end of the block. */
  [asyncDispose](): Promise<void> {
    this.reset();
    return Promise.resolve();
  }
}
