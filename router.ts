/**
 * Router: routes messages between this context, its parent and its children, and dispatches the ones
 * addressed here to handlers; starts children (through the shipped `mitogen:parent`), holds shipped
 * modules, and forwards log records. Part of the child payload.
 *
 * @module
 */
import { AbortError, type CallError, MitogenError, StreamError } from "./errors.ts";
import type { Binder } from "./codec.ts";
import { asyncDispose, builtin, builtinsReady } from "./runtime.ts";
import { DEFAULT_MAX_MESSAGE_SIZE, FIRST_DYNAMIC_HANDLE, HANDLE, handleName, Message } from "./frames.ts";
import type { LinkCounts, Stream } from "./stream.ts";
import { FlowControl } from "./flow.ts";
import { Sender } from "./channels.ts";
import { defaultCategory, type LogLevel, type LogRecord, type LogSource, logRecordOf, safeJson } from "./logapi.ts";
import { addRouteBody, type Body, delRouteBody, loadModuleBody, logBody, type LogBody } from "./bodies.ts";
import { type ArgSpec, type ArgsOut, type ChainState, evaluateModule, replyError, replySafely } from "./calls.ts";
import { Context, type FileOptions, type FileResult } from "./context.ts";
import type {
  ContainerOptions,
  JailOptions,
  KubectlOptions,
  Listener,
  ListenOptions,
  LocalOptions,
  SetnsOptions,
  SshOptions,
  SudoOptions,
  SuOptions,
} from "./options.ts";

/** Dead replies a context may provoke from another per second (messages to unknown handles, refused ones); the rest are dropped. */
const DEAD_PER_SECOND = 1000;
/** The library's own records (not debug) a context makes per second; the rest are counted, in one record. */
const LOG_PER_SECOND = 100;

/** Bytes of one FORWARD_LOG beyond which its data is sent as (cut) text. */
const LOG_DATA_MAX = 65536;

/** The shipped module `mitogen:files` (files.ts), loaded on first use. */
const files = (router: Router) =>
  router.requireModule("mitogen:files") as Promise<unknown> as Promise<{
    putFile(router: Router, contexts: Context[], src: string, dst: string, options: FileOptions): Promise<FileResult[]>;
  }>;

// ---------------------------------------------------------------------------
// Services: their definitions (serving them is the shipped module mitogen:service, service.ts)

/**
 * Who may call a service (or one method): `"parents"` (the default, Mitogen's AllowParents: this context
 * and its parents, or a session its listener vouches for), `"children"` (this context and those started below
 * it), `"any"` (Mitogen's AllowAny), or a predicate over the calling context (a refusal names it).
 */
export type ServicePolicy = "parents" | "children" | "any" | ((caller: Context, msg: Message) => boolean | Promise<boolean>);

/** What a service method receives beside its argument. */
export interface ServiceCall {
  router: Router;
  /** The calling context. */
  caller: Context;
  /** The CALL_SERVICE message. */
  msg: Message;
  /**
   * Aborted when the caller cancels or the call's deadline passes (`ctx.with({ timeout, signal })`),
   * as a call's CallContext `signal`: pass it on to nested calls so they end too.
   */
  readonly signal: AbortSignal;
}

/** One method of a service. */
export interface ServiceMethod<S = ArgSpec | undefined> {
  /** The check of its argument (a Standard Schema, or one per property): run before the method, a failure names the argument. */
  args?: S;
  /** Who may call this method, instead of the service's policy. */
  policy?: ServicePolicy;
  /** The caller hears nothing from the method: it is answered (nil) once the call is admitted, and a failure is logged here. */
  noReply?: boolean;
  /** The method: its checked argument, and who called. */
  run(args: ArgsOut<S>, call: ServiceCall): unknown;
}

/** A service's methods, each typed by its own `args`. */
export type ServiceMethods<A> = { [K in keyof A]: ServiceMethod<A[K]> };

/** A service: methods registered in a context under a name ({@link defineService}). */
export interface ServiceDef<N extends string = string, M = object> {
  readonly name: N;
  /** Who may call its methods (default `"parents"`, as Mitogen's). */
  readonly policy?: ServicePolicy;
  readonly methods: M;
}

/**
 * Define a service: a name, a policy, and methods, each with its argument's check. Returns the
 * definition, typed: `router.serve(def)` serves it in a context, `ctx.service(def)` calls it, checked
 * by tsc. A module that exports it can be registered at the master ({@link Router.registerService}),
 * so that any context loads it on its first call.
 *
 * @example
 * ```ts
 * import { type CallContext, defineService, Router, type StandardSchemaV1, takesRouter } from "mitogen";
 * // Any Standard Schema (zod, valibot, arktype...), here one by hand:
 * const int: StandardSchemaV1<number> = {
 *   "~standard": { version: 1, vendor: "example", validate: (v) => (Number.isInteger(v) ? { value: v as number } : { issues: [{ message: "not an integer" }] }) },
 * };
 * const adder = defineService({ name: "adder", policy: "children", methods: { add: { args: { a: int, b: int }, run: ({ a, b }) => a + b } } });
 * await using router = new Router();
 * await router.serve(adder);
 * const child = await router.local();
 * console.log(await child.call(takesRouter(({ router }: CallContext) => router.contextById(0).callService("adder", "add", { a: 1, b: 2 })))); // 3
 * ```
 */
export function defineService<const N extends string, A, M extends ServiceMethods<A>>(def: {
  name: N;
  policy?: ServicePolicy;
  methods: M & ServiceMethods<A>;
}): ServiceDef<N, M> {
  return def;
}

/** A context's services and the pool their calls run in (Mitogen's Pool): {@link Router.serve}. */
export interface ServicePool {
  /** How many calls run at once (default 16); the others wait, in the order they came. */
  size: number;
  /** Calls running, and waiting. */
  readonly running: number;
  readonly queued: number;
  /** Serve these services here too (a name served already throws). */
  add(...services: ServiceDef[]): ServicePool;
  /** Names of the services served here. */
  names(): string[];
}

/** The shipped module `mitogen:service` (service.ts), loaded on first use. */
const servicesOf = (router: Router) => router.requireModule("mitogen:service") as Promise<unknown> as Promise<ServiceModule>;
type ServiceModule = { pool(router: Router): ServicePool; onCallService(router: Router, msg: Message): void };

/** Options of {@link Router.addHandler}. */
export interface HandlerOptions {
  /** Explicit handle; otherwise a fresh one is allocated. */
  handle?: number;
  /** Keep the handler after its first message (default true). */
  persist?: boolean;
  /** Context whose disconnection delivers a dead message to this handler. */
  respondent?: { readonly contextId: number } | null;
  /** Called first; returning false drops the message (with a dead reply). */
  policy?: (msg: Message, stream: Stream | null) => boolean;
  /** Replace a handler already registered for `handle` instead of throwing. */
  overwrite?: boolean;
}

type Handler = { fn: (msg: Message, stream: Stream | null) => void; persist: boolean; respondent: number | null; policy: HandlerOptions["policy"] };

/** What a connection method reports about a live child. */
export interface ChildLink {
  stream: Stream;
  /** The child's runtime, as its first stage reported it (`node 12.22.12`, `deno 2.9.6`). */
  runtime?: string;
  /** How it was started: `local`, `ssh`, `sudo`, `docker`..., `session`. */
  method?: string;
  /** Ask the child to stop; resolves when it has gone (killing it after a grace period). */
  stop(): Promise<void>;
  /** How its process ended ("exited with code 3"), waiting at most `ms` for it; null if it still runs. */
  ended?(ms: number): Promise<string | null>;
  /**
   * A child adopted before it has connected (a pipelined start): settles once it has (CONNECTED), or
   * rejects with why it could not; calls to it, and the stream's end meanwhile, then fail with that error.
   */
  connecting?: Promise<unknown>;
  /**
   * For a stream that is not a child of ours (an attached session, see listen.ts): checks, and may
   * rewrite, each message from it before it is routed; a string refuses the message with that reason.
   */
  admit?(msg: Message): string | null;
}

/** The event loop is the broker; this object owns the streams' lifetime for {@link Router}. */
export class Broker {
  readonly #router: Router;
  constructor(router: Router) {
    this.#router = router;
  }
  /** Stop every child and close every stream. */
  shutdown(): Promise<void> {
    return this.#router.shutdown();
  }
}

/**
 * Routes messages between this context, its parent and its children, and
 * dispatches the ones addressed here to handlers.
 */
export class Router implements Binder, AsyncDisposable {
  /** This context's id (0 in the master). */
  myId = 0;
  /** Ids of every parent, the nearest first and the master last (Mitogen's `parent_ids`). */
  parentIds: number[] = [];
  /** This context's name. */
  name = "master";
  /** Cap on one message's data; propagated to every child. */
  maxMessageSize: number = DEFAULT_MAX_MESSAGE_SIZE;
  /** When true, children may not talk to each other, only to their parents. */
  unidirectional = false;
  /** The stream to the parent (null in the master). */
  parent: Stream | null = null;
  readonly broker: Broker;
  /** The compressed core payload this context can start children with. */
  payload: Uint8Array | null = null;
  /** Names of the contexts from the master down to this one, for error reports. */
  path: string[] = ["master"];
  /** Evaluated shipped modules, by name (a content hash, or "mitogen:parent"). */
  readonly modules: Map<string, Record<string, unknown>> = new Map();
  /** Compressed code of shipped modules this context holds, for itself and its children. */
  readonly moduleCode: Map<string, Uint8Array> = new Map();
  /**
   * Counters: modules this context sent to its children (GET_MODULE answers, LOAD_MODULE) and their bytes; bytes of
   * frames over each link, by the id of the context at its other end (children and parent).
   */
  readonly stats: { modulesSent: number; moduleBytesSent: number; links: Map<number, LinkCounts> } = { modulesSent: 0, moduleBytesSent: 0, links: new Map() };
  /** Windows of the flow-controlled channels this context sends on (Sender). */
  readonly flow: FlowControl = new FlowControl(this);
  /** @internal The call chains served here (dispatch.ts), by "<caller id>:<chain>", while busy or failed. */
  readonly chains: Map<string, ChainState> = new Map();
  /** @internal Calls and service calls running here that their caller may cancel (CANCEL_CALL), by "<caller id>:<reply handle>". */
  readonly cancels: Map<string, AbortController> = new Map();
  readonly #fetching = new Map<string, Promise<Uint8Array>>();
  readonly #loading = new Map<string, Promise<Record<string, unknown>>>();

  readonly #handlers = new Map<number, Handler>();
  readonly #routes = new Map<number, Stream>();
  readonly #links = new Map<Stream, ChildLink>();
  readonly #contexts = new Map<number, Context>();
  readonly #respondents = new Map<number, Set<number>>();
  /** Ids allocated through each child stream (ALLOCATE_ID, LOAD_MODULE), until announced by ADD_ROUTE; LOAD_MODULE's are routed there meanwhile. */
  readonly #allocated = new Map<number, Stream>();
  /** Shipped modules each context below holds, as far as this one sent them (LOAD_MODULE, GET_MODULE answers). */
  readonly #held = new Map<number, Set<string>>();
  /** Children about to start here (LOAD_MODULE's ids): the messages for each, held until it is connected. */
  readonly #pending = new Map<number, Message[]>();
  /** Ids to be started by such a child, once it is: their messages wait with its own. */
  readonly #later = new Map<number, number>();
  /** The parent of each context routed below this one, as adopted (ADD_ROUTE). */
  readonly #parentOf = new Map<number, number>();
  /** Why each lost context is gone, for dead messages to it. */
  readonly #deadReasons = new Map<number, string>();
  /** The error each context adopted while connecting failed with, for dead messages to it here. */
  readonly #startErrors = new Map<number, Error>();
  /** Ids SHUTDOWN went to from here, so their exit reads "was shut down". */
  readonly #shutdownSent = new Set<number>();
  /** Streams closed whose reason is still to come (the exit status), for dead messages meanwhile. */
  readonly #closing = new Map<Stream, Promise<string>>();
  readonly #atShutdown = new Set<() => Promise<void>>();
  #nextHandle = FIRST_DYNAMIC_HANDLE;
  #shuttingDown: Promise<void> | null = null;

  constructor() {
    this.broker = new Broker(this);
    this.addHandler((msg, stream) => this.#onAddRoute(msg, stream), { handle: HANDLE.ADD_ROUTE, policy: (m, s) => this.#fromChild(m, s) });
    this.addHandler((msg, stream) => this.#onDelRoute(msg, stream), {
      handle: HANDLE.DEL_ROUTE,
      policy: (m, s) => this.#fromChild(m, s) || (s !== null && s === this.parent && m.auth === this.parentIds[0]),
    });
    const below = (_m: Message, s: Stream | null) => s !== null && s !== this.parent;
    this.addHandler((msg) => this.#onGetModule(msg), { handle: HANDLE.GET_MODULE, policy: below });
    this.addHandler((msg) => this.#onLoadModule(msg), {
      handle: HANDLE.LOAD_MODULE,
      policy: (m, s) => s !== null && s === this.parent && m.auth === this.parentIds[0],
    });
    this.addHandler((msg, stream) => this.#onAllocateId(msg, stream as Stream), { handle: HANDLE.ALLOCATE_ID, policy: below });
    // Services are served by the shipped mitogen:service, loaded on the first call; it checks each call's policy.
    this.addHandler(
      (msg) => {
        const m = this.modules.get("mitogen:service") as ServiceModule | undefined;
        if (m) m.onCallService(this, msg);
        else
          servicesOf(this).then(
            (m) => m.onCallService(this, msg),
            (err: unknown) => replyError(msg, err, this),
          );
      },
      { handle: HANDLE.CALL_SERVICE },
    );
    // Only a call's caller can cancel it: the key holds the sender's id.
    this.addHandler((msg) => this.cancels.get(`${msg.src}:${msg.unpickle()}`)?.abort(new AbortError(`call cancelled by its caller (context ${msg.src})`)), {
      handle: HANDLE.CANCEL_CALL,
    });
  }

  /**
   * The services of this context and their pool, with `services` added: callable from other contexts
   * as their policies allow ({@link Context.callService}). Any context can serve.
   *
   * @example
   * ```ts
   * import { defineService, Router } from "mitogen";
   * await using router = new Router();
   * const pool = await router.serve(defineService({ name: "echo", methods: { echo: { run: (v: unknown) => v } } }));
   * pool.size = 4; // at most 4 calls at once
   * console.log(pool.names()); // ["echo"]
   * ```
   */
  async serve(...services: ServiceDef[]): Promise<ServicePool> {
    return (await servicesOf(this)).pool(this).add(...services);
  }

  // -- shipped modules ------------------------------------------------------

  /**
   * The compressed code of module `name`: from this context's cache, else
   * from the parent (GET_MODULE), once however many ask at the same time.
   */
  fetchModuleCode(name: string): Promise<Uint8Array> {
    const have = this.moduleCode.get(name);
    if (have) return Promise.resolve(have);
    let pending = this.#fetching.get(name);
    if (!pending) {
      const up = this.parentIds[0];
      if (!this.parent || up === undefined) return Promise.reject(new MitogenError(`module ${name} is unknown in ${this.name}`));
      pending = this.contextById(up)
        .sendAwait(Message.encoded(name, { handle: HANDLE.GET_MODULE }))
        .then((code) => {
          if (!(code instanceof Uint8Array)) throw new StreamError(`GET_MODULE ${name}: parent answered with no code`);
          this.moduleCode.set(name, code);
          return code;
        })
        .finally(() => this.#fetching.delete(name));
      this.#fetching.set(name, pending);
    }
    return pending;
  }

  /** The exports of shipped module `name`, fetched and evaluated on first use. */
  requireModule(name: string): Promise<Record<string, unknown>> {
    const done = this.modules.get(name);
    if (done) return Promise.resolve(done);
    let pending = this.#loading.get(name);
    if (!pending) {
      pending = Promise.all([this.fetchModuleCode(name), builtinsReady()])
        .then(([code]) => {
          const m = evaluateModule(builtin("node:zlib").inflateRawSync(code).toString(), name);
          this.modules.set(name, m);
          return m;
        })
        .finally(() => this.#loading.delete(name));
      this.#loading.set(name, pending);
    }
    return pending;
  }

  #onGetModule(msg: Message): void {
    if (!msg.replyTo) return;
    void (async () => {
      const name = msg.unpickle();
      if (typeof name !== "string") throw new MitogenError("GET_MODULE needs a module name");
      const code = await this.fetchModuleCode(name);
      this.#hold(msg.src, name);
      this.stats.modulesSent++;
      this.stats.moduleBytesSent += code.byteLength;
      return code;
    })().then(
      (code) => replySafely(msg, code, this),
      (err: unknown) => replyError(msg, err, this),
    );
  }

  /** @internal Context `id` below holds module `name` (a child keeps the compressed core it was started with). */
  noteHeld(id: number, name: string): void {
    this.#hold(id, name);
  }

  /** Note that context `id` holds module `name`; true if it was noted already. */
  #hold(id: number, name: string): boolean {
    let names = this.#held.get(id);
    if (!names) this.#held.set(id, (names = new Set()));
    return names.size === names.add(name).size;
  }

  /**
   * Send what context `to` below this one is about to need ahead of the message that needs it, hop by
   * hop (LOAD_MODULE): the modules `names` it is not known to hold (each hop's copy goes only where
   * the next hop lacks it) and `ids` of children it is about to start, routed toward it from here on.
   * Does nothing for a context not below this one, or for a module this one lacks.
   */
  pushDown(to: number, names: string[], ids: number[] = []): void {
    // A child still starting here gets it with the messages held for it.
    const held = this.#pending.get(to);
    const stream = held ? undefined : (this.#routes.get(to) ?? (this.#parentOf.has(to) ? this.#allocated.get(to) : undefined));
    const next = held ? to : stream?.remoteId;
    if (next === undefined || next === null || stream?.closed) return;
    const modules: [string, Uint8Array | null][] = [];
    let room = this.maxMessageSize - 4096;
    for (const name of names) {
      // Code that would not fit is left to GET_MODULE, which says so.
      const code = this.moduleCode.get(name);
      if (this.#held.get(to)?.has(name) || !(this.#held.get(next)?.has(name) || (code && code.byteLength < room))) continue;
      const sent = this.#hold(next, name) ? null : (code ?? null);
      room -= sent?.byteLength ?? 0;
      modules.push([name, sent]);
      this.#hold(to, name);
      if (sent) {
        this.stats.modulesSent++;
        this.stats.moduleBytesSent += sent.byteLength;
      }
    }
    for (const id of ids) {
      if (stream) this.#allocated.set(id, stream);
      else this.#later.set(id, to);
      this.#parentOf.set(id, to);
    }
    if (!modules.length && !ids.length) return;
    const msg = loadModuleBody.encode([to, modules, ids], { dst: next, src: this.myId, auth: this.myId });
    if (stream) stream.send(msg);
    else held?.push(msg);
  }

  /** LOAD_MODULE from the parent: keep the modules, pass the rest on toward `to`; ids for this context's children are awaited. */
  #onLoadModule(msg: Message): void {
    const [to, modules, ids] = loadModuleBody.decode(msg);
    if (typeof to !== "number" || !Array.isArray(modules) || !Array.isArray(ids)) return;
    const names: string[] = [];
    for (const m of modules) {
      if (!Array.isArray(m) || typeof m[0] !== "string") continue;
      if (m[1] instanceof Uint8Array && !this.moduleCode.has(m[0])) this.moduleCode.set(m[0], m[1]);
      names.push(m[0]);
    }
    const fresh = ids.filter((id): id is number => typeof id === "number" && id !== this.myId && !this.#routes.has(id) && !this.parentIds.includes(id));
    if (to !== this.myId) this.pushDown(to, names, fresh);
    else for (const id of fresh) if (!this.#pending.has(id)) this.#pending.set(id, []);
  }

  /**
   * A child about to start here or below (see {@link pushDown}'s ids) failed to: the messages held for
   * it are answered dead with `reason`, and it is lost (DEL_ROUTE up) as a child that ended.
   */
  failChild(id: number, reason: string): void {
    const held = this.#pending.get(id);
    if (this.#routes.has(id) || (!held && !this.#allocated.has(id))) return;
    this.#pending.delete(id);
    this.#allocated.delete(id);
    for (const [later, by] of this.#later) if (by === id) this.#later.delete(later);
    for (const msg of held ?? []) this.#sendDead(msg, reason);
    this.#lost(id, reason);
  }

  /** A CallError as the caller should see it (the master maps shipped-module frames to their sources). */
  rewriteCallError(err: CallError): CallError {
    return err;
  }

  /** Bundle a module for {@link Context.import}, for a context on `runtime` (see {@link Context.runtime}); only the master can. */
  bundleModule(specifier: string | URL, _runtime: string | null = null): Promise<string> {
    return Promise.reject(new MitogenError(`cannot bundle ${specifier} in ${this.name}: only the master bundles modules`));
  }

  // -- starting children ----------------------------------------------------

  /** A fresh context id, from the master through every parent between (ALLOCATE_ID). */
  async allocateId(): Promise<number> {
    const id = await this.contextById(this.parentIds[0] ?? 0).sendAwait(Message.encoded(null, { handle: HANDLE.ALLOCATE_ID }));
    if (typeof id !== "number") throw new StreamError("ALLOCATE_ID: bad answer");
    return id;
  }

  /** ALLOCATE_ID from below: an id from our own parent (or counter), noted as allocated through `stream`. */
  #onAllocateId(msg: Message, stream: Stream): void {
    if (!msg.replyTo) return;
    this.allocateId().then(
      (id) => {
        this.#allocated.set(id, stream);
        replySafely(msg, id, this);
      },
      (err: unknown) => replyError(msg, err, this),
    );
  }

  /**
   * Start a local context (node or deno) below this one, or `via` another
   * context. Works in any context: a child fetches the parent-side code from
   * its parent the first time.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local({ runtime: "deno", name: "worker" });
   * console.log(await ctx.call(() => "Deno" in globalThis)); // true
   * ```
   */
  async local(options: LocalOptions = {}): Promise<Context> {
    return (await this.#connector("local"))(this, options);
  }

  /**
   * Start a context on another machine over ssh (the OpenSSH client), with
   * nothing installed there but node or deno.
   *
   * @example
   * ```ts no_run: needs an ssh server, here a host named bastion
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const host = await router.ssh({ hostname: "bastion", checkHostKeys: "accept" });
   * console.log(await host.call(() => process.version));
   * ```
   */
  async ssh(options: SshOptions): Promise<Context> {
    if (options.transport === "ssh2") throw new MitogenError("transport ssh2 runs in the master only (this is context " + this.name + ")");
    return (await this.#connector("ssh"))(this, options);
  }

  /**
   * Start a context as another user (default root) through sudo, on this
   * machine or on the machine of `via`.
   *
   * @example
   * ```ts no_run: needs sudo, and the password of the user who runs it
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const root = await router.sudo({ username: "root", password: "..." });
   * console.log(await root.call(() => process.getuid?.()));
   * ```
   */
  async sudo(options: SudoOptions = {}): Promise<Context> {
    return (await this.#connector("sudo"))(this, options);
  }

  /**
   * Start a context as another user through su. su reads the password from a
   * terminal only, so it runs in a pty (`script`); what that context prints is
   * dropped (it would share the pty with the stream).
   */
  async su(options: SuOptions = {}): Promise<Context> {
    return (await this.#connector("su"))(this, options);
  }

  /** Start a context as another user through doas (in a pty, as {@link Router.su}). */
  async doas(options: SuOptions = {}): Promise<Context> {
    return (await this.#connector("doas"))(this, options);
  }

  /** Start a context in a running Docker container (`docker exec`). */
  async docker(options: ContainerOptions): Promise<Context> {
    return (await this.#connector("docker"))(this, options);
  }

  /** Start a context in a running Podman container (`podman exec`). */
  async podman(options: ContainerOptions): Promise<Context> {
    return (await this.#connector("podman"))(this, options);
  }

  /**
   * Start a context in a Buildah working container (`buildah run`), as Mitogen's buildah method.
   *
   * @example
   * ```ts no_run: needs buildah and a working container
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.buildah({ container: "fedora-working-container", username: "app" });
   * console.log(await ctx.call(() => process.pid));
   * ```
   */
  async buildah(options: ContainerOptions): Promise<Context> {
    return (await this.#connector("buildah"))(this, options);
  }

  /** Start a context in a Kubernetes pod (`kubectl exec`). */
  async kubectl(options: KubectlOptions): Promise<Context> {
    return (await this.#connector("kubectl"))(this, options);
  }

  /** Start a context in an LXC container (`lxc-attach`). */
  async lxc(options: ContainerOptions): Promise<Context> {
    return (await this.#connector("lxc"))(this, options);
  }

  /** Start a context in an LXD container (`lxc exec`; Incus's own client is {@link Router.incus}). */
  async lxd(options: ContainerOptions): Promise<Context> {
    return (await this.#connector("lxd"))(this, options);
  }

  /**
   * Start a context in an Incus container or VM (`incus exec`), as Mitogen's incus method.
   *
   * @example
   * ```ts no_run: needs incus and a running instance
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.incus({ container: "web1" });
   * console.log(await ctx.call(() => process.pid));
   * ```
   */
  async incus(options: ContainerOptions): Promise<Context> {
    return (await this.#connector("incus"))(this, options);
  }

  /** Start a context inside the namespaces of another process (`nsenter`). */
  async setns(options: SetnsOptions): Promise<Context> {
    return (await this.#connector("setns"))(this, options);
  }

  /** Start a context in a FreeBSD jail (`jexec`). */
  async jail(options: JailOptions): Promise<Context> {
    return (await this.#connector("jail"))(this, options);
  }

  /**
   * Listen for other processes attaching to this context (`connect()`), on a unix socket
   * (`path`) or over TCP (`host`, `port`, key pairs); see listen.ts. Any context can listen.
   *
   * @example
   * ```ts
   * import { mkdtempSync } from "node:fs";
   * import { tmpdir } from "node:os";
   * import { connect, Router } from "mitogen";
   * await using router = new Router();
   * const dir = mkdtempSync(`${tmpdir()}/mitogen-`); // owner-only
   * await using listener = await router.listen({ path: `${dir}/mitogen.sock` });
   * await using session = await connect({ path: listener.path as string });
   * console.log(await session.context.call(() => 6 * 7)); // 42
   * ```
   */
  async listen(options: ListenOptions): Promise<Listener> {
    const m = await this.requireModule("mitogen:listen");
    return (m.listen as (router: Router, options: ListenOptions) => Promise<Listener>)(this, options);
  }

  async #connector<O>(
    method: "local" | "ssh" | "sudo" | "su" | "doas" | "docker" | "podman" | "buildah" | "kubectl" | "lxc" | "lxd" | "incus" | "setns" | "jail",
  ): Promise<(router: Router, options: O) => Promise<Context>> {
    if (this.#shuttingDown) throw new MitogenError(`router ${this.name} is shut down`);
    const parent = await this.requireModule("mitogen:parent");
    return parent[method] as (router: Router, options: O) => Promise<Context>;
  }

  // -- handlers -------------------------------------------------------------

  /** Register `fn` for messages to a handle; returns the handle. Throws if `handle` is registered already (unless `overwrite`). */
  addHandler(fn: (msg: Message, stream: Stream | null) => void, options: HandlerOptions = {}): number {
    let handle = options.handle;
    if (handle === undefined) {
      do handle = this.#nextHandle++;
      while (this.#handlers.has(handle));
    } else if (this.#handlers.has(handle)) {
      if (!options.overwrite) throw new MitogenError(`handle ${handle} is already registered in ${this.name}`);
      this.delHandler(handle);
    }
    return this.#register(handle, fn, options.persist ?? true, options.respondent?.contextId ?? null, options.policy);
  }

  /** @internal A one-shot handler for the reply from `respondent` to a request; returns its handle. */
  _expectReply(respondent: number, fn: (msg: Message) => void): number {
    let handle: number;
    do handle = this.#nextHandle++;
    while (this.#handlers.has(handle));
    return this.#register(handle, fn, false, respondent, undefined);
  }

  #register(handle: number, fn: Handler["fn"], persist: boolean, respondent: number | null, policy: Handler["policy"]): number {
    this.#handlers.set(handle, { fn, persist, respondent, policy });
    if (respondent !== null) {
      let set = this.#respondents.get(respondent);
      if (!set) this.#respondents.set(respondent, (set = new Set()));
      set.add(handle);
      if (!this.#canReach(respondent))
        queueMicrotask(() => this.#deliverDead(handle, this.#deadReasons.get(respondent) ?? `context ${respondent} is not connected`, respondent));
    }
    return handle;
  }

  /** Remove the handler of `handle`. */
  delHandler(handle: number): void {
    const h = this.#handlers.get(handle);
    if (!h) return;
    this.#handlers.delete(handle);
    if (h.respondent !== null) this.#respondents.get(h.respondent)?.delete(handle);
  }

  /** Fail `handle`'s handler with a dead message: `reason`, or the error `about`'s start failed with. */
  #deliverDead(handle: number, reason: string, about?: number): void {
    const h = this.#handlers.get(handle);
    if (!h) return;
    const msg = Message.dead(
      reason,
      { dst: this.myId, src: this.myId, auth: this.myId, handle },
      about === undefined ? undefined : this.#startErrors.get(about),
    );
    msg.router = this;
    this.delHandler(handle);
    h.fn(msg, null);
  }

  // -- contexts -------------------------------------------------------------

  /** The Context for `id` (one object per id). */
  contextById(id: number, name: string | null = null): Context {
    let ctx = this.#contexts.get(id);
    if (!ctx) {
      ctx = new Context(this, id, name ?? `context${id}`);
      this.#contexts.set(id, ctx);
    } else if (name && ctx.name.startsWith("context")) ctx.name = name;
    return ctx;
  }

  /** This context, as a Context. */
  myself(): Context {
    return this.contextById(this.myId, this.name);
  }

  /** Binder: decoded Context references. */
  contextRef(id: number, name: string | null): Context {
    return this.contextById(id, name);
  }

  /** Binder: decoded Sender references. */
  senderRef(id: number, handle: number): Sender {
    return new Sender(this.contextById(id), handle);
  }

  /** The parent of context `id` below this one, as adopted or announced (ADD_ROUTE); undefined for any other. */
  parentOf(id: number): number | undefined {
    return this.#parentOf.get(id);
  }

  /**
   * Copy local file `src` to `dst` in each of `contexts` (fan-out: each byte crosses each link of the
   * tree once; a context on the way relays). Resolves with one result per context; if any failed,
   * rejects with a `FileTransferError` holding the results and failures (the others still finish).
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const hop = await router.local();
   * const kids = [await router.local({ via: hop }), await router.local({ via: hop })];
   * const done = await router.putFile(kids, "./README.md", "/tmp/README.copy");
   * console.log(done.map((r) => r.bytes));
   * ```
   */
  async putFile(contexts: Context[], src: string, dst: string, options: FileOptions = {}): Promise<FileResult[]> {
    return (await files(this)).putFile(this, contexts, src, dst, options);
  }

  /** The stream that leads to `id`, if it is below this context. */
  routeTo(id: number): Stream | undefined {
    return this.#routes.get(id);
  }

  /** @internal Is `id` a context starting here or below (see {@link pushDown}), not connected yet? */
  starting(id: number): boolean {
    return this.#pending.has(id) || this.#later.has(id) || (this.#allocated.has(id) && this.#parentOf.has(id));
  }

  /** Ids of the contexts routed below this one. */
  routedIds(): number[] {
    return [...this.#routes.keys()];
  }

  #canReach(id: number): boolean {
    return id === this.myId || this.#routes.has(id) || this.starting(id) || (this.parent !== null && !this.parent.closed);
  }

  // -- streams and routes ---------------------------------------------------

  /**
   * Adopt a child's stream: route `remoteId` through it. `announce` false (a child adopted while it
   * connects, its runtime not known yet) leaves ADD_ROUTE to {@link Router.announceChild}.
   */
  addChild(link: ChildLink, remoteId: number, name: string, announce = true): Context {
    if (this.#shuttingDown) {
      void link.stop();
      throw new MitogenError(`router ${this.name} shut down while ${name} was connecting`);
    }
    const stream = link.stream;
    stream.remoteId = remoteId;
    this.#links.set(stream, link);
    this.#routes.set(remoteId, stream);
    stream.onMessage = (msg) => this.#inbound(msg, stream);
    stream.onClose = (err) => this.#onStreamClosed(stream, err);
    stream.relays = (dst) => dst !== this.myId;
    this.#parentOf.set(remoteId, this.myId);
    this.stats.links.set(remoteId, stream.counts);
    const ctx = this.contextById(remoteId, name);
    ctx.name = name;
    ctx.method = link.method ?? null;
    if (link.connecting) ctx._connecting(link.connecting);
    if (announce) this.announceChild(link);
    // What was sent to it while it started goes now, in order; the ids it is to start route through it.
    const held = this.#pending.get(remoteId);
    this.#pending.delete(remoteId);
    for (const [id, by] of this.#later) {
      if (by !== remoteId) continue;
      this.#later.delete(id);
      this.#allocated.set(id, stream);
    }
    for (const msg of held ?? []) stream.send(msg);
    return ctx;
  }

  /** A child adopted by {@link Router.addChild}: note its runtime, tell the parent (ADD_ROUTE). */
  announceChild(link: ChildLink): void {
    const id = link.stream.remoteId as number;
    const ctx = this.contextById(id);
    ctx.runtime = link.runtime ?? null;
    this.#announce(addRouteBody, [id, ctx.name, this.myId, ctx.runtime, ctx.method]);
  }

  /** Adopt the stream to the parent. */
  setParent(stream: Stream): void {
    this.parent = stream;
    this.stats.links.set(this.parentIds[0] ?? 0, stream.counts);
    stream.onMessage = (msg) => this.#inbound(msg, stream);
    stream.onClose = (err) => this.#onStreamClosed(stream, err);
    stream.relays = (dst) => dst !== this.myId;
  }

  /** Tell the parent (ADD_ROUTE, DEL_ROUTE), if there is one. */
  #announce<T>(codec: Body<T>, body: T): void {
    const up = this.parentIds[0];
    if (this.parent && up !== undefined) this.route(codec.encode(body, { dst: up }));
  }

  /** Policy: route changes are accepted only from the immediate child owning the stream. */
  #fromChild(msg: Message, stream: Stream | null): boolean {
    return stream !== null && stream !== this.parent && stream.remoteId === msg.auth && msg.src === msg.auth;
  }

  #onAddRoute(msg: Message, stream: Stream | null): void {
    const [id, name, parent, runtime, method] = addRouteBody.decode(msg);
    // Only an id this context allocated through that stream, below a parent behind it too: no child takes another's id.
    if (!stream || this.#allocated.get(id) !== stream || (parent !== stream.remoteId && this.#routes.get(parent) !== stream)) {
      this.log("warn", `refused ADD_ROUTE for ${id} (parent ${parent}) from ${stream?.name}: not allocated through that stream`);
      return;
    }
    this.#allocated.delete(id);
    this.#routes.set(id, stream);
    this.#parentOf.set(id, parent);
    const ctx = this.contextById(id, typeof name === "string" ? name : null);
    ctx.runtime = typeof runtime === "string" ? runtime : null;
    ctx.method = typeof method === "string" ? method : null;
    this.#announce(addRouteBody, [id, name, parent, ctx.runtime, ctx.method]);
  }

  #onDelRoute(msg: Message, stream: Stream | null): void {
    const [id, reason] = delRouteBody.decode(msg);
    if (typeof id !== "number") return;
    const why = typeof reason === "string" ? reason : "route deleted";
    if (stream !== this.parent) {
      // A routed context, or one whose start through that stream failed.
      if (this.#routes.get(id) === stream || (!this.#routes.has(id) && this.#allocated.get(id) === stream)) {
        this.#allocated.delete(id);
        this.#lost(id, why);
      }
      return;
    }
    // From the parent: a context this one talked to, elsewhere in the tree, is gone (never one below here).
    if (this.#routes.has(id) || id === this.myId || this.parentIds.includes(id)) return;
    this.#unroute(id, why);
    this.#contexts.get(id)?._disconnected(why);
  }

  /** `id` is gone: drop its route, fail whoever waits on it, tell the parent. */
  #lost(id: number, reason: string): void {
    this.#unroute(id, reason);
    this.#gone(id, reason);
  }

  /** First half of losing `id`: no more routing to it, and whoever waits on it fails at once. */
  #unroute(id: number, reason: string): void {
    this.#routes.delete(id);
    this.#held.delete(id);
    // The call chains it made here (dispatch.ts) are forgotten.
    for (const key of this.chains.keys()) if (key.startsWith(`${id}:`)) this.chains.delete(key);
    this.#deadReasons.set(id, reason);
    this.#shutdownSent.delete(id);
    const handles = this.#respondents.get(id);
    this.#respondents.delete(id);
    for (const h of handles ?? []) this.#deliverDead(h, reason, id);
    // Children that sent to it may wait on it too: tell them (Mitogen's _propagate_down).
    for (const s of this.#links.keys()) {
      if (s.talkedTo.delete(id) && !s.closed && s.remoteId !== null && s.remoteId !== id) {
        this.route(delRouteBody.encode([id, reason], { dst: s.remoteId }));
      }
    }
  }

  /** Second half: the context is gone (its process has exited, where we own it); tell the parent. */
  #gone(id: number, reason: string): void {
    this.#announce(delRouteBody, [id, reason]);
    this.#contexts.get(id)?._disconnected(reason);
  }

  #onStreamClosed(stream: Stream, err?: Error): void {
    const link = this.#links.get(stream);
    this.#links.delete(stream);
    if (stream === this.parent) {
      this.log("debug", `parent stream closed${err ? `: ${err.message}` : ""}`);
      // Whatever waits on a context through the parent fails now (a child exits next; an attached session lives on).
      const why = `lost the connection to ${this.parentIds[0] === undefined ? "the parent" : `context ${this.parentIds[0]}`}${err ? `: ${err.message}` : ""}`;
      for (const id of new Set([...this.#respondents.keys(), ...this.#contexts.keys()])) {
        if (id === this.myId || this.#routes.has(id)) continue;
        this.#unroute(id, why);
        this.#contexts.get(id)?._disconnected(why);
      }
      this.onParentLost(err);
      return;
    }
    const remote = stream.remoteId ?? -1;
    const who = this.#contexts.get(remote)?.name ?? stream.name;
    const ids = [...this.#routes].filter(([, s]) => s === stream).map(([id]) => id);
    // Children still starting below it are lost with it.
    for (const [id, s] of this.#allocated) {
      if (s !== stream) continue;
      this.#allocated.delete(id);
      if (this.#parentOf.has(id)) ids.push(id);
    }
    // Calls fail once the exit status is in (at most 500 ms): a death explains a reset or a truncated
    // frame; bad input (a StreamError) is the reason unless the process died of something else.
    // "disconnected" (and DEL_ROUTE upward) waits for the process to exit.
    // A child closed while connecting is gone for the reason its start failed.
    const failed = link?.connecting
      ? link.connecting.then(
          () => null,
          (e: Error) => e,
        )
      : Promise.resolve(null);
    // A failed start says why itself (an ssh that could not connect leaves an EPIPE on its stdin): no warning beside it.
    if (err) void failed.then((e) => this.log(e ? "debug" : "warn", `stream to ${who} failed: ${err.message}`));
    const reason = failed.then(async (e) => {
      if (e) {
        this.#startErrors.set(remote, e);
        return e.message;
      }
      const status = link?.ended ? await link.ended(500) : null;
      const how =
        status !== null && status !== "exited with code 0"
          ? status
          : err && (err instanceof StreamError || !status)
            ? `disconnected: ${err.message}`
            : status && this.#shutdownSent.has(remote)
              ? "was shut down"
              : (status ?? "disconnected");
      return `context ${who} ${how}`;
    });
    // Meanwhile, what is routed to the closed stream gets its dead message with that reason too.
    this.#closing.set(stream, reason);
    void reason.then((r) => {
      for (const id of ids) this.#unroute(id, r);
      this.#closing.delete(stream);
      return (link ? link.stop() : Promise.resolve()).finally(() => {
        for (const id of ids) this.#gone(id, r);
      });
    });
  }

  /** Called when the parent stream is gone; a child exits. */
  onParentLost(_err?: Error): void {}

  // -- routing --------------------------------------------------------------

  #inbound(msg: Message, stream: Stream): void {
    // Mitogen's rules: a message must arrive on the stream that routes to its auth_id and src_id.
    if (this.#expected(msg.auth) !== stream) {
      this.log("warn", `dropped ${msg}: auth_id ${msg.auth} did not arrive on its own route (${stream.name})`);
      return;
    }
    if (msg.src !== msg.auth && this.#expected(msg.src) !== stream) {
      this.log("warn", `dropped ${msg}: src_id ${msg.src} did not arrive on its own route (${stream.name})`);
      return;
    }
    const refused = this.#links.get(stream)?.admit?.(msg);
    if (refused) {
      this.log("warn", `refused ${msg} from ${stream.name}: ${refused}`);
      this.#sendDead(msg, refused);
      return;
    }
    if (stream !== this.parent && msg.dst !== this.myId) stream.talkedTo.add(msg.dst);
    if (this.unidirectional && stream !== this.parent && msg.dst !== this.myId && !this.parentIds.includes(msg.dst)) {
      const back = this.#routes.get(msg.dst);
      if (back && back !== this.parent) {
        this.log("warn", `dropped ${msg}: unidirectional mode forbids child-to-child messages`);
        this.#sendDead(msg, "unidirectional mode forbids messages between children");
        return;
      }
    }
    this.route(msg, stream);
  }

  /** The stream a message from `id` must arrive on: its route, else the parent's (null for this context). */
  #expected(id: number): Stream | null {
    return this.#routes.get(id) ?? (id === this.myId || this.#routes.has(id) ? null : this.parent);
  }

  /** Deliver or forward `msg`. Locally-created messages get src/auth filled in. */
  route(msg: Message, inStream: Stream | null = null): void {
    if (!inStream) {
      msg.src ||= this.myId;
      msg.auth ||= this.myId;
    }
    if (msg.length > this.maxMessageSize) {
      const text = `message of ${msg.length} bytes exceeds maxMessageSize ${this.maxMessageSize} (${msg})`;
      // The sender learns at once; a peer that sent one anyway gets a dead reply.
      if (!inStream) throw new MitogenError(text);
      this.log("warn", text);
      this.#sendDead(msg, text);
      return;
    }
    if (msg.dst === this.myId) {
      msg.router = this;
      this.#invoke(msg, inStream);
      return;
    }
    let out = this.#routes.get(msg.dst);
    if (!out) {
      // A child starting here, or one it is to start: held until it is connected (see pushDown).
      const held = this.#pending.get(msg.dst) ?? this.#pending.get(this.#later.get(msg.dst) ?? -1);
      if (held) {
        if (msg.handle === HANDLE.SHUTDOWN) this.#shutdownSent.add(msg.dst);
        held.push(msg);
        return;
      }
      // One being started below (not merely allocated, ALLOCATE_ID) is routed toward it.
      out = (this.#parentOf.has(msg.dst) ? this.#allocated.get(msg.dst) : undefined) ?? this.parent ?? undefined;
    }
    if (!out || out.closed) {
      const later = out && this.#closing.get(out);
      // A context whose start failed: its calls fail with that error here (a caller elsewhere gets its text).
      if (later) void later.then((r) => this.#sendDead(msg, r, this.#startErrors.get(msg.dst)));
      else this.#sendDead(msg, this.#deadReasons.get(msg.dst) ?? `no route to context ${msg.dst} from ${this.name}`, this.#startErrors.get(msg.dst));
      return;
    }
    if (out === inStream) {
      this.log("warn", `dropped ${msg}: it would route back where it came from`);
      this.#sendDead(msg, this.#deadReasons.get(msg.dst) ?? `no route to context ${msg.dst} from ${this.name}`);
      return;
    }
    if (msg.handle === HANDLE.SHUTDOWN) this.#shutdownSent.add(msg.dst);
    out.send(msg);
    // Backpressure: a link whose frames go to a congested one is not read until that drains.
    if (inStream && out.congested) inStream.waitFor(out);
  }

  #invoke(msg: Message, stream: Stream | null): void {
    const h = this.#handlers.get(msg.handle);
    if (!h) {
      this.#sendDead(msg, `no handler for handle ${handleName(msg.handle)} in ${this.name}`);
      return;
    }
    // A reply comes from its respondent; a dead one may also come from a context on the route to it.
    if (h.respondent !== null && msg.src !== h.respondent && !(msg.isDead && this.#onRouteTo(h.respondent, msg.src))) {
      this.log("warn", `dropped ${msg}: reply from unexpected context ${msg.src} (expected ${h.respondent})`);
      return;
    }
    if (h.policy && !h.policy(msg, stream)) {
      this.log("warn", `refused ${msg}: policy of handle ${handleName(msg.handle)} rejected it`);
      this.#sendDead(msg, `refused by policy of handle ${handleName(msg.handle)} in ${this.name}`);
      return;
    }
    if (!h.persist) this.delHandler(msg.handle);
    try {
      h.fn(msg, stream);
    } catch (err) {
      this.log("error", `handler for ${msg} threw: ${(err as Error)?.stack ?? err}`);
    }
  }

  /** Is `id` this context, one of its parents, or a parent of `respondent` below here (as ADD_ROUTE told)? */
  #onRouteTo(respondent: number, id: number): boolean {
    if (id === this.myId || this.parentIds.includes(id)) return true;
    for (let at = this.#parentOf.get(respondent), n = 0; at !== undefined && n <= this.#parentOf.size; at = this.#parentOf.get(at), n++) {
      if (at === id) return true;
    }
    return false;
  }

  /**
   * Answer `msg` with a dead message. Those a context provokes from elsewhere are counted per second,
   * and past {@link DEAD_PER_SECOND}, or while its link is congested, dropped.
   */
  #sendDead(msg: Message, reason: string, error?: Error): void {
    const src = msg.src;
    if (!msg.replyTo || msg.isDead) return;
    if (src !== this.myId) {
      this.#tick();
      const n = this.#dead.get(src) ?? [0, 0];
      this.#dead.set(src, n);
      const ok = (n[0] as number) < DEAD_PER_SECOND && !(this.#routes.get(src) ?? this.parent)?.congested;
      (n[ok ? 0 : 1] as number)++;
      if (!ok) return;
    }
    this.route(Message.dead(reason, { dst: src, handle: msg.replyTo }, error));
  }

  /** Dead replies sent and dropped in this second, by the context they answer. */
  readonly #dead = new Map<number, number[]>();
  /** This library's records (warnings, errors, info) in this second; past LOG_PER_SECOND they are only counted. */
  #logged = 0;
  #ticking = false;

  /** Count in seconds: at the end of each, say what was counted. */
  #tick(): void {
    if (this.#ticking) return;
    this.#ticking = true;
    (setTimeout(() => this.#report(), 1000) as { unref?(): void }).unref?.();
  }

  #report(): void {
    const over = this.#logged - LOG_PER_SECOND;
    this.#ticking = false;
    this.#logged = 0;
    if (over > 0) this.log("warn", `${over} records dropped in 1 s (over ${LOG_PER_SECOND}/s)`, "log", { dropped: over });
    for (const [id, [sent, dropped]] of this.#dead)
      this.log(dropped ? "warn" : "debug", `dead replies to ${this.contextById(id).name} in 1 s: ${sent} sent, ${dropped} dropped`, "log", { sent, dropped });
    this.#dead.clear();
  }

  // -- logging --------------------------------------------------------------

  /** Log from this context, with optional structured `data`. The master hands it to its logger; children forward it. */
  log(level: LogLevel, message: string, source: LogSource = "log", data?: unknown, category?: string): void {
    // What a peer can provoke (a warning per bad frame) is bounded: past LOG_PER_SECOND, only counted.
    if (source === "log" && level !== "debug") {
      this.#tick();
      if (++this.#logged > LOG_PER_SECOND) return;
    }
    this.logRecord(logRecordOf(this.myId, this.name, this.path, level, source, message, data, category));
  }

  /** Deliver a log record: children forward to the master (FORWARD_LOG). */
  logRecord(rec: LogRecord): void {
    if (!this.parent || this.parent.closed) return;
    if (rec.level === "debug" && !this.debug) return;
    const fields: LogBody = [rec.contextId, rec.name, rec.level, rec.source, rec.message, rec.path, rec.time, rec.data];
    if (rec.category !== defaultCategory(rec.source)) fields.push(rec.category);
    let msg: Message;
    // To the master: dst 0, a new message's own.
    try {
      msg = logBody.encode(fields);
      if (msg.length > LOG_DATA_MAX) throw msg;
    } catch {
      // Data that cannot travel (cyclic, a function, too big) goes as text.
      fields[7] = safeJson(rec.data).slice(0, LOG_DATA_MAX);
      msg = logBody.encode(fields);
    }
    this.route(msg);
  }

  /** Forward debug-level records too. */
  debug = false;

  // -- lifetime -------------------------------------------------------------

  /** Run `fn` (once) when this router shuts down, alongside stopping its children (listeners close this way). */
  atShutdown(fn: () => Promise<void>): void {
    this.#atShutdown.add(fn);
  }

  /** Stop every child context and close every stream. Safe to call twice. */
  shutdown(): Promise<void> {
    this.#shuttingDown ??= (async () => {
      for (const s of this.#links.keys()) this.#shutdownSent.add(s.remoteId ?? -1);
      await Promise.all([...[...this.#links.values()].map((l) => l.stop()), ...[...this.#atShutdown].map((f) => f())]);
      for (const [h] of [...this.#handlers]) if (h >= FIRST_DYNAMIC_HANDLE) this.#deliverDead(h, `router ${this.name} shut down`);
    })();
    return this.#shuttingDown;
  }

  /** Direct children, as their links. */
  get children(): ChildLink[] {
    return [...this.#links.values()];
  }

  [asyncDispose](): Promise<void> {
    return this.shutdown();
  }
}
