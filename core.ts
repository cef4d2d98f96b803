/**
 * Everything a child context needs, and nothing more: the Router, Context,
 * the call dispatcher and the child's main loop. This file, with what it
 * imports, is the bootstrap payload, so its size is a budget: `npm run build`
 * prints it and the files it is made of.
 *
 * @module
 */
import type { Listener, ListenOptions } from "./listen.ts";
import { AbortError, CallError, MitogenError, StreamError, TimeoutError } from "./errors.ts";
import { type Binder, type Secret, WIRE_REF, type WireRef } from "./codec.ts";
import { Abort, asyncDispose, builtin, builtinsReady, compilersForShipped, exitProcess, hasOwn, onUncaught, setTitle } from "./runtime.ts";
import { type Boot, childTransport } from "./transport.ts";
import { watchParent } from "./watchdog.ts";
import { CORE, DEFAULT_MAX_MESSAGE_SIZE, FIRST_DYNAMIC_HANDLE, HANDLE, type LinkCounts, MARKER, Message, Stream } from "./frames.ts";
import { type GetOptions, Receiver, Sender } from "./select.ts";
import { FlowControl } from "./flow.ts";
import type { FileOptions, FileResult } from "./files.ts";

export * from "./errors.ts";
export * from "./codec.ts";
export * from "./runtime.ts";
export * from "./bytes.ts";
export * from "./transport.ts";
export * from "./watchdog.ts";
export * from "./frames.ts";
export * from "./select.ts";
export * from "./flow.ts";

const ascii = new TextEncoder();

// ---------------------------------------------------------------------------
// Roles (Mitogen: mitogen.is_master, context_id, parent_id, parent_ids)

/** True in the master; false in every child. */
export let isMaster = true;
/** This context's id; the master is 0. */
export let contextId = 0;
/** Id of the immediate parent, or null in the master. */
export let parentId: number | null = null;
/** Ids of every parent, the nearest first and the master (0) last; empty in the master. */
export let parentIds: readonly number[] = [];

// ---------------------------------------------------------------------------
// Router

/** Where a log line came from: the library itself, user code's {@link log}, or what a child printed. */
export type LogSource = "log" | "user" | "stdout" | "stderr";
/** Log severity. */
export type LogLevel = "debug" | "info" | "warn" | "error";

/** One log record from any context, as the master's logger sees it. */
export interface LogRecord {
  /** When it was made, in ms since the epoch, by the clock of the context that made it. */
  time: number;
  level: LogLevel;
  source: LogSource;
  /** The context it is about: id, name, and names from the master down (`["master", "a", "b"]`). */
  context: { id: number; name: string; path: string[] };
  message: string;
  /** What user code passed after the message (`log.info("x", { version: 3 })`: `{ version: 3 }`); absent if nothing. */
  data?: unknown;
  /** Same as `context.id`. */
  contextId: number;
  /** Same as `context.name`. */
  name: string;
  /** Same as `context.path`. */
  path: string[];
}

/** A record of context `id`, made now. */
export function logRecordOf(id: number, name: string, path: string[], level: LogLevel, source: LogSource, message: string, data?: unknown): LogRecord {
  const rec: LogRecord = { time: Date.now(), level, source, context: { id, name, path }, message, contextId: id, name, path };
  if (data !== undefined) rec.data = data;
  return rec;
}

/** Options of {@link Router.addHandler}. */
export interface HandlerOptions {
  /** Explicit handle; otherwise a fresh one is allocated. */
  handle?: number;
  /** Keep the handler after its first message (default true). */
  persist?: boolean;
  /** Context whose disconnection delivers a dead message to this handler. */
  respondent?: Context | null;
  /** Called first; returning false drops the message (with a dead reply). */
  policy?: (msg: Message, stream: Stream | null) => boolean;
  /** Replace a handler already registered for `handle` instead of throwing. */
  overwrite?: boolean;
}

type Handler = { fn: (msg: Message, stream: Stream | null) => void; persist: boolean; respondent: number | null; policy: HandlerOptions["policy"] };

/** Options of {@link Router.local}. */
export interface LocalOptions {
  /** "node", "deno", or a path to either (default: the runtime this context runs on). */
  runtime?: string;
  /** Context name, shown in logs and in the process title (`mitogen:<name>`). */
  name?: string;
  /** Start the context from this one instead. */
  via?: Context;
  /** Milliseconds allowed from spawn to connected (default 30 000). */
  connectTimeout?: number;
  /** Extra environment variables. */
  env?: Record<string, string>;
  /** Working directory. */
  cwd?: string;
}

/** Options of {@link Router.ssh}. */
export interface SshOptions {
  /** Host name or address (ssh_config aliases work: this runs the OpenSSH client). */
  hostname: string;
  username?: string;
  port?: number;
  /** A private key file (`ssh -i`); otherwise the agent and ~/.ssh as usual. */
  identityFile?: string;
  /** transport "ssh2" only: a private key held in memory (PEM or OpenSSH format). */
  privateKey?: string | Uint8Array | Secret;
  /** "openssh" (default): run the ssh client; "ssh2": connect in process (master only, no `via`). */
  transport?: "openssh" | "ssh2";
  /** Answered once if the server asks; a second prompt is "incorrect password". Never logged. */
  password?: string | Secret;
  /** "enforce": only known hosts; "accept": learn new ones, refuse changed ones; "ignore": anything. Default "enforce". */
  checkHostKeys?: "enforce" | "accept" | "ignore";
  /** known_hosts file to use instead of ~/.ssh/known_hosts. */
  knownHostsFile?: string;
  /** Extra arguments for ssh, before the host name (e.g. ["-F", "ssh_config"]). */
  sshArgs?: string[];
  /** The ssh client to run (default "ssh"). */
  sshPath?: string;
  /** Compress the link (`ssh -C`, default false: the payload is compressed already, and zlib on every small frame costs latency). */
  compression?: boolean;
  /** Milliseconds from starting ssh to the child's CONNECTED (default 30 000). */
  connectTimeout?: number;
  /** "auto" (default: the newest of node and nodejs on the target's PATH, else deno), "node", "deno", or a path on the target. */
  runtime?: string;
  /** Run ssh from this context instead. */
  via?: Context;
  name?: string;
}

/** Options of {@link Router.sudo}. */
export interface SudoOptions {
  /** Target user (default "root"). */
  username?: string;
  /** Answered once at sudo's prompt (forced to a unique string); never logged. */
  password?: string | Secret;
  /** The sudo program (default "sudo"). */
  sudoPath?: string;
  /** Extra arguments for sudo, before the command. */
  sudoArgs?: string[];
  /** Runtime to run as the target user (default: the executable of the context running sudo). */
  runtime?: string;
  /** Milliseconds from starting sudo to the child's CONNECTED (default 30 000). */
  connectTimeout?: number;
  /** Run sudo in this context (on its machine) instead. */
  via?: Context;
  name?: string;
}

/** What every way of starting a context in a container accepts. */
export interface StartOptions {
  name?: string;
  /** Start it from this context instead (on that context's machine). */
  via?: Context;
  /** Milliseconds until the child must be connected (default 30 000). */
  connectTimeout?: number;
  /** "auto" (default: the newest of node and nodejs on the target's PATH, else deno), "node", "deno", or a path inside the target. */
  runtime?: string;
  /** The tool's executable (default: its usual name, looked up on PATH). */
  path?: string;
  /** Extra arguments for the tool, before the target. */
  args?: string[];
}

/** Options of {@link Router.docker}, {@link Router.podman}, {@link Router.lxc} and {@link Router.lxd}. */
export interface ContainerOptions extends StartOptions {
  container: string;
  /** User inside the container (docker/podman). */
  username?: string;
}

/** Options of {@link Router.kubectl}. */
export interface KubectlOptions extends StartOptions {
  pod: string;
  namespace?: string;
  container?: string;
}

/** Options of {@link Router.setns}. */
export interface SetnsOptions extends StartOptions {
  /** A process whose namespaces to enter (a container's init, say). */
  pid: number;
}

/** Options of {@link Router.jail}. */
export interface JailOptions extends StartOptions {
  jail: string;
  username?: string;
}

/** Options of {@link Router.su} and {@link Router.doas}. */
export interface SuOptions extends StartOptions {
  /** Target user (default "root"). */
  username?: string;
  /** Typed at the prompt once; never logged. */
  password?: string | Secret;
}

/** What a connection method reports about a live child. */
export interface ChildLink {
  stream: Stream;
  /** The child's runtime, as its first stage reported it (`node 12.22.12`, `deno 2.9.6`). */
  runtime?: string;
  /** Ask the child to stop; resolves when it has gone (killing it after a grace period). */
  stop(): Promise<void>;
  /** How its process ended ("exited with code 3"), waiting at most `ms` for it; null if it still runs. */
  ended?(ms: number): Promise<string | null>;
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
   * Counters: modules this context sent to its children (GET_MODULE answers) and their bytes; bytes of
   * frames over each link, by the id of the context at its other end (children and parent).
   */
  readonly stats: { modulesSent: number; moduleBytesSent: number; links: Map<number, LinkCounts> } = { modulesSent: 0, moduleBytesSent: 0, links: new Map() };
  /** Windows of the flow-controlled channels this context sends on (Sender). */
  readonly flow: FlowControl = new FlowControl(this);
  readonly #fetching = new Map<string, Promise<Uint8Array>>();
  readonly #loading = new Map<string, Promise<Record<string, unknown>>>();

  readonly #handlers = new Map<number, Handler>();
  readonly #routes = new Map<number, Stream>();
  readonly #links = new Map<Stream, ChildLink>();
  readonly #contexts = new Map<number, Context>();
  readonly #respondents = new Map<number, Set<number>>();
  /** Ids this context allocated for each child stream (ALLOCATE_ID), until announced by ADD_ROUTE. */
  readonly #allocated = new WeakMap<Stream, Set<number>>();
  /** The parent of each context routed below this one, as adopted (ADD_ROUTE). */
  readonly #parentOf = new Map<number, number>();
  /** Why each lost context is gone, for dead messages to it. */
  readonly #deadReasons = new Map<number, string>();
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
    this.addHandler((msg, stream) => this.#onAllocateId(msg, stream as Stream), { handle: HANDLE.ALLOCATE_ID, policy: below });
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
      this.stats.modulesSent++;
      this.stats.moduleBytesSent += code.byteLength;
      return code;
    })().then(
      (code) => replySafely(msg, code, this),
      (err: unknown) => {
        const e = CallError.fromThrown(err, this.path.join(" -> "));
        replySafely(msg, e, this, e);
      },
    );
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
        let ids = this.#allocated.get(stream);
        if (!ids) this.#allocated.set(stream, (ids = new Set()));
        ids.add(id);
        replySafely(msg, id, this);
      },
      (err: unknown) => {
        const e = CallError.fromThrown(err, this.path.join(" -> "));
        replySafely(msg, e, this, e);
      },
    );
  }

  /**
   * Start a local context (node or deno) below this one, or `via` another
   * context. Works in any context: a child fetches the parent-side code from
   * its parent the first time.
   *
   * @example
   * ```ts
   * import { Router } from "./mod.ts";
   * await using router = new Router();
   * const ctx = await router.local({ runtime: "deno", name: "worker" });
   * console.log(await ctx.call(() => typeof Deno)); // "object"
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
   * ```ts
   * import { Router } from "./mod.ts";
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
   * ```ts
   * import { Router } from "./mod.ts";
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

  /** Start a context in a Kubernetes pod (`kubectl exec`). */
  async kubectl(options: KubectlOptions): Promise<Context> {
    return (await this.#connector("kubectl"))(this, options);
  }

  /** Start a context in an LXC container (`lxc-attach`). */
  async lxc(options: ContainerOptions): Promise<Context> {
    return (await this.#connector("lxc"))(this, options);
  }

  /** Start a context in an LXD or Incus container (`lxc exec`). */
  async lxd(options: ContainerOptions): Promise<Context> {
    return (await this.#connector("lxd"))(this, options);
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
   * import { connect, Router } from "./mod.ts";
   * await using router = new Router();
   * const dir = Deno.makeTempDirSync();
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
    method: "local" | "ssh" | "sudo" | "su" | "doas" | "docker" | "podman" | "kubectl" | "lxc" | "lxd" | "setns" | "jail",
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
        queueMicrotask(() => this.#deliverDead(handle, this.#deadReasons.get(respondent) ?? `context ${respondent} is not connected`));
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

  #deliverDead(handle: number, reason: string): void {
    const h = this.#handlers.get(handle);
    if (!h) return;
    const msg = Message.dead(reason, { dst: this.myId, src: this.myId, auth: this.myId, handle });
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
   * import { Router } from "./mod.ts";
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

  /** Ids of the contexts routed below this one. */
  routedIds(): number[] {
    return [...this.#routes.keys()];
  }

  #canReach(id: number): boolean {
    return id === this.myId || this.#routes.has(id) || (this.parent !== null && !this.parent.closed);
  }

  // -- streams and routes ---------------------------------------------------

  /** Adopt a child's stream: route `remoteId` through it. */
  addChild(link: ChildLink, remoteId: number, name: string): Context {
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
    ctx.runtime = link.runtime ?? null;
    this.#announce(HANDLE.ADD_ROUTE, [remoteId, name, this.myId, ctx.runtime]);
    return ctx;
  }

  /** Adopt the stream to the parent. */
  setParent(stream: Stream): void {
    this.parent = stream;
    this.stats.links.set(this.parentIds[0] ?? 0, stream.counts);
    stream.onMessage = (msg) => this.#inbound(msg, stream);
    stream.onClose = (err) => this.#onStreamClosed(stream, err);
    stream.relays = (dst) => dst !== this.myId;
  }

  #announce(handle: number, data: unknown[]): void {
    const up = this.parentIds[0];
    if (this.parent && up !== undefined) this.route(Message.encoded(data, { dst: up, handle }));
  }

  /** Policy: route changes are accepted only from the immediate child owning the stream. */
  #fromChild(msg: Message, stream: Stream | null): boolean {
    return stream !== null && stream !== this.parent && stream.remoteId === msg.auth && msg.src === msg.auth;
  }

  #onAddRoute(msg: Message, stream: Stream | null): void {
    const [id, name, parent, runtime] = msg.unpickle() as [number, string, number, string | null];
    // Only an id this context allocated through that stream, below a parent behind it too: no child takes another's id.
    const ids = stream ? this.#allocated.get(stream) : undefined;
    if (!stream || !ids?.has(id) || (parent !== stream.remoteId && this.#routes.get(parent) !== stream)) {
      this.log("warn", `refused ADD_ROUTE for ${id} (parent ${parent}) from ${stream?.name}: not allocated through that stream`);
      return;
    }
    ids.delete(id);
    this.#routes.set(id, stream);
    this.#parentOf.set(id, parent);
    this.contextById(id, typeof name === "string" ? name : null).runtime = typeof runtime === "string" ? runtime : null;
    this.#announce(HANDLE.ADD_ROUTE, [id, name, parent, runtime ?? null]);
  }

  #onDelRoute(msg: Message, stream: Stream | null): void {
    const [id, reason] = msg.unpickle() as [number, string];
    if (typeof id !== "number") return;
    const why = typeof reason === "string" ? reason : "route deleted";
    if (stream !== this.parent) {
      if (this.#routes.get(id) === stream) this.#lost(id, why);
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
    this.#deadReasons.set(id, reason);
    this.#shutdownSent.delete(id);
    const handles = this.#respondents.get(id);
    this.#respondents.delete(id);
    for (const h of handles ?? []) this.#deliverDead(h, reason);
    // Children that sent to it may wait on it too: tell them (Mitogen's _propagate_down).
    for (const s of this.#links.keys()) {
      if (s.talkedTo.delete(id) && !s.closed && s.remoteId !== null && s.remoteId !== id) {
        this.route(Message.encoded([id, reason], { dst: s.remoteId, handle: HANDLE.DEL_ROUTE }));
      }
    }
  }

  /** Second half: the context is gone (its process has exited, where we own it); tell the parent. */
  #gone(id: number, reason: string): void {
    this.#announce(HANDLE.DEL_ROUTE, [id, reason]);
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
    if (err) this.log("warn", `stream to ${who} failed: ${err.message}`);
    const ids = [...this.#routes].filter(([, s]) => s === stream).map(([id]) => id);
    // Calls fail once the exit status is in (at most 500 ms): a death explains a reset or a truncated
    // frame; bad input (a StreamError) is the reason unless the process died of something else.
    // "disconnected" (and DEL_ROUTE upward) waits for the process to exit.
    const reason = (link?.ended ? link.ended(500) : Promise.resolve(null)).then((status) => {
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
    const out = this.#routes.get(msg.dst) ?? this.parent;
    if (!out || out.closed) {
      const later = out && this.#closing.get(out);
      if (later) void later.then((r) => this.#sendDead(msg, r));
      else this.#sendDead(msg, this.#deadReasons.get(msg.dst) ?? `no route to context ${msg.dst} from ${this.name}`);
      return;
    }
    if (out === inStream) {
      this.log("warn", `dropped ${msg}: it would route back where it came from`);
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
      this.#sendDead(msg, `no handler for handle ${msg.handle} in ${this.name}`);
      return;
    }
    // A reply comes from its respondent; a dead one may also come from a context on the route to it.
    if (h.respondent !== null && msg.src !== h.respondent && !(msg.isDead && this.#onRouteTo(h.respondent, msg.src))) {
      this.log("warn", `dropped ${msg}: reply from unexpected context ${msg.src} (expected ${h.respondent})`);
      return;
    }
    if (h.policy && !h.policy(msg, stream)) {
      this.log("warn", `refused ${msg}: policy of handle ${msg.handle} rejected it`);
      this.#sendDead(msg, `refused by policy of handle ${msg.handle} in ${this.name}`);
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
  #sendDead(msg: Message, reason: string): void {
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
    this.route(Message.dead(reason, { dst: src, handle: msg.replyTo }));
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
  log(level: LogLevel, message: string, source: LogSource = "log", data?: unknown): void {
    // What a peer can provoke (a warning per bad frame) is bounded: past LOG_PER_SECOND, only counted.
    if (source === "log" && level !== "debug") {
      this.#tick();
      if (++this.#logged > LOG_PER_SECOND) return;
    }
    this.logRecord(logRecordOf(this.myId, this.name, this.path, level, source, message, data));
  }

  /** Deliver a log record: children forward to the master (FORWARD_LOG). */
  logRecord(rec: LogRecord): void {
    if (!this.parent || this.parent.closed) return;
    if (rec.level === "debug" && !this.debug) return;
    const fields = [rec.contextId, rec.name, rec.level, rec.source, rec.message, rec.path, rec.time, rec.data];
    const to = { dst: 0, handle: HANDLE.FORWARD_LOG };
    let msg: Message;
    try {
      msg = Message.encoded(fields, to);
      if (msg.length > LOG_DATA_MAX) throw msg;
    } catch {
      // Data that cannot travel (cyclic, a function, too big) goes as text.
      fields[7] = safeJson(rec.data).slice(0, LOG_DATA_MAX);
      msg = Message.encoded(fields, to);
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

// ---------------------------------------------------------------------------
// Context

/** Any function whose source can be shipped: self-contained, no free variables. */
// deno-lint-ignore no-explicit-any
export type Shippable = (...args: any[]) => unknown;

/** A shipped module as the caller sees it: each exported function, async, without its CallContext argument. */
export type Remote<T> = {
  [K in keyof T as T[K] extends (...args: any[]) => unknown ? K : never]: T[K] extends (...args: infer A) => infer R
    ? (...args: A extends [...infer Head, CallContext] ? Head : A) => Promise<Awaited<R>>
    : never;
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
  readonly router: Router;
  readonly contextId: number;
  name: string;
  /** The context this one was started through, if known. */
  via: Context | null = null;
  /**
   * The runtime it runs on, as its first stage reported it (`node 12.22.12`, `deno 2.9.6`); null when
   * not known here (a context above this one). The master bundles `import`ed modules for it.
   */
  runtime: string | null = null;
  #disconnected: string | null = null;
  #waiters: ((reason: string) => void)[] = [];

  constructor(router: Router, contextId: number, name: string) {
    this.router = router;
    this.contextId = contextId;
    this.name = name;
  }

  /** Send a prepared message to this context. */
  send(msg: Message): void {
    msg.dst = this.contextId;
    this.router.route(msg);
  }

  /** @internal Send `msg` and resolve with its decoded reply (what `sendAsync(msg).get()` then `unpickle()` give, without a Receiver). */
  _request(msg: Message): Promise<unknown> {
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

  /** Send `msg` and return a Receiver for its reply. */
  sendAsync(msg: Message, options: { persist?: boolean } = {}): Receiver {
    const recv = new Receiver(this.router, { persist: options.persist ?? false, respondent: this });
    msg.replyTo = recv.handle;
    this.send(msg);
    return recv;
  }

  /** Send `msg` and await the decoded reply. */
  async sendAwait(msg: Message, options: GetOptions = {}): Promise<unknown> {
    return (await this.sendAsync(msg).get(options)).unpickle();
  }

  /**
   * Start `fn(...args)` in this context and return a Receiver for the result.
   *
   * @example
   * ```ts
   * import { Router } from "./mod.ts";
   * await using router = new Router();
   * const ctx = await router.local();
   * const recv = ctx.callAsync(() => process.pid);
   * console.log((await recv.get()).unpickle());
   * ```
   */
  callAsync<A extends unknown[], R>(fn: (...args: [...A, CallContext]) => R, ...args: A): Receiver;
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
   * import { Router } from "./mod.ts";
   * await using router = new Router();
   * const ctx = await router.local({ runtime: "node" });
   * console.log(await ctx.call((x: number) => x * 2, 21)); // 42
   * ```
   */
  call<A extends unknown[], R>(fn: (...args: [...A, CallContext]) => R, ...args: A): Promise<Awaited<R>>;
  call<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Promise<Awaited<R>>;
  call<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Promise<Awaited<R>> {
    return this.#scope().call(fn, ...args);
  }

  /** Run `fn(...args)` in this context without waiting for, or hearing of, a result. */
  callNoReply<A extends unknown[], R>(fn: (...args: [...A, CallContext]) => R, ...args: A): void;
  callNoReply<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): void;
  callNoReply<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): void {
    this.send(callMessage(fn, args, {}));
  }

  /** Call the exported function `name` of shipped module `module` (fetched on demand there). */
  callModule(module: string, name: string, ...args: unknown[]): Promise<unknown> {
    return this.#scope().callModule(module, name, ...args);
  }

  /**
   * Ship a TypeScript or JavaScript module (with its relative imports and npm
   * dependencies, bundled by the master) to this context, and return an
   * object whose functions run there. Only the master can bundle.
   *
   * @example
   * ```ts
   * import { Router } from "./mod.ts";
   * await using router = new Router();
   * const ctx = await router.local();
   * const tasks = await ctx.import<typeof import("./tests/fixtures/tasks.ts")>(new URL("./tests/fixtures/tasks.ts", import.meta.url));
   * console.log(await tasks.add(1, 2)); // 3
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
   * import { Router } from "./mod.ts";
   * await using router = new Router();
   * const ctx = await router.local();
   * await ctx.with({ timeout: 100 }).call(() => new Promise(() => {})).catch((e) => console.log(e.name)); // TimeoutError
   * ```
   */
  with(options: CallOptions): CallScope {
    return new CallScope(this, options);
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
   * import { Router } from "./mod.ts";
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
   * import { Router } from "./mod.ts";
   * await using router = new Router();
   * const ctx = await router.local();
   * await ctx.getFile("/etc/hostname", "/tmp/hostname.copy", { preserveTimes: true });
   * ```
   */
  async getFile(src: string, dst: string, options: FileOptions = {}): Promise<FileResult> {
    return (await files(this.router)).getFile(this.router, this, src, dst, options);
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

/** The shipped module `mitogen:files` (files.ts), loaded on first use. */
const files = (router: Router) => router.requireModule("mitogen:files") as Promise<unknown> as Promise<typeof import("./files.ts")>;

/** Limits a call carries: see {@link Context.with}. */
export interface CallOptions {
  /** Aborting it cancels the call. */
  signal?: AbortSignal;
  /** Milliseconds the call may take, in total, counted from sending it. */
  timeout?: number;
}

/** The wire form of CallOptions, last in a CALL_FUNCTION body. */
type CallLimits = { timeout?: number; cancel?: true };

function limits(options: CallOptions): CallLimits | undefined {
  if (options.signal === undefined && options.timeout === undefined) return undefined;
  return { ...(options.timeout === undefined ? {} : { timeout: options.timeout }), ...(options.signal ? { cancel: true } : {}) };
}

/**
 * Calls into a context under {@link CallOptions} (from {@link Context.with}).
 * Functions of modules imported through it carry the same options.
 */
export class CallScope {
  readonly context: Context;
  readonly options: CallOptions;

  constructor(context: Context, options: CallOptions) {
    this.context = context;
    this.options = options;
  }

  /** As {@link Context.callAsync}. */
  callAsync<A extends unknown[], R>(fn: (...args: [...A, CallContext]) => R, ...args: A): Receiver;
  callAsync<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Receiver;
  callAsync<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Receiver {
    return this.#start(callMessage(fn, args, this.options));
  }

  /** As {@link Context.call}. */
  call<A extends unknown[], R>(fn: (...args: [...A, CallContext]) => R, ...args: A): Promise<Awaited<R>>;
  call<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Promise<Awaited<R>>;
  call<A extends unknown[], R>(fn: (...args: A) => R, ...args: A): Promise<Awaited<R>> {
    return this.#request(() => callMessage(fn, args, this.options)) as Promise<Awaited<R>>;
  }

  /** As {@link Context.callModule}. */
  callModule(module: string, name: string, ...args: unknown[]): Promise<unknown> {
    return this.#request(() =>
      Message.encoded([CALL.MODULE, `${module}#${name}`, args, 0, limits(this.options)], { handle: HANDLE.CALL_FUNCTION }, "args", args),
    );
  }

  /** Send the call `make()` builds and resolve with the decoded reply; without a timeout or signal, no Receiver is made. */
  #request(make: () => Message): Promise<unknown> {
    let msg: Message;
    try {
      msg = make();
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.options.signal === undefined && this.options.timeout === undefined) return this.context._request(msg);
    return this.#start(msg)
      .get()
      .then((reply) => reply.unpickle());
  }

  /** As {@link Context.import}; the functions returned carry this scope's options. */
  async import<T>(specifier: string | URL): Promise<Remote<T>> {
    const name = await this.context.router.bundleModule(specifier, this.context.runtime);
    const load = Message.encoded([CALL.LOAD, name, [], 0, limits(this.options)], { handle: HANDLE.CALL_FUNCTION });
    const exported = (await this.#start(load).get()).unpickle() as string[];
    const remote: Record<string, (...args: unknown[]) => Promise<unknown>> = {};
    for (const fn of exported) remote[fn] = (...args) => this.callModule(name, fn, ...args);
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

const shippedSource = new WeakMap<object, string>();

function callMessage(fn: unknown, args: unknown[], options: CallOptions): Message {
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
  const body = lim ? [CALL.SOURCE, src, args, flags, lim] : flags ? [CALL.SOURCE, src, args, flags] : [CALL.SOURCE, src, args];
  return Message.encoded(body, { handle: HANDLE.CALL_FUNCTION }, "args", args);
}

// ---------------------------------------------------------------------------
// Calls: marking and dispatch

/** The router of the context this code runs in (set by childMain, or by the master's first Router). */
let activeRouter: Router | null = null;

/** @internal */
export function setActiveRouter(router: Router, replace: boolean): void {
  if (replace || !activeRouter) activeRouter = router;
}

/** Dead replies a context may provoke from another per second (messages to unknown handles, refused ones); the rest are dropped. */
const DEAD_PER_SECOND = 1000;
/** The library's own records (not debug) a context makes per second; the rest are counted, in one record. */
const LOG_PER_SECOND = 100;

/** Bytes of one FORWARD_LOG beyond which its data is sent as (cut) text. */
const LOG_DATA_MAX = 65536;

function say(level: LogLevel, parts: unknown[]): void {
  // The first string is the message; what follows is data: one value, plain objects merged, or the list.
  const first = parts[0];
  const rest = typeof first === "string" ? parts.slice(1) : parts;
  const plain = rest.every((p) => p !== null && typeof p === "object" && Object.getPrototypeOf(p) === Object.prototype);
  const data = rest.length < 2 ? rest[0] : plain ? Object.assign({}, ...rest) : rest;
  activeRouter?.log(level, typeof first === "string" ? first : first instanceof Error ? String(first) : "", "user", data);
}

/** JSON of `value`, a cycle shown as "[cycle]"; String(value) if even that fails. */
function safeJson(value: unknown): string {
  const seen = new Set<unknown>();
  try {
    return (
      JSON.stringify(value, (_k, v: unknown) => {
        if (typeof v === "bigint") return String(v);
        if (v === null || typeof v !== "object") return v;
        if (seen.has(v)) return "[cycle]";
        seen.add(v);
        return v instanceof Error ? { name: v.name, message: v.message, stack: v.stack } : v;
      }) ?? String(value)
    );
  } catch {
    return String(value);
  }
}

/**
 * Log from code running in any context. At the master the records go to its
 * logger; in a child they travel there, tagged with the context's name and
 * path (`record.path`). The default logger prints them all.
 *
 * @example
 * ```ts
 * import { log } from "./mod.ts";
 * log.info("deploying", { version: 3 });
 * ```
 */
export const log: Readonly<Record<LogLevel, (...parts: unknown[]) => void>> = Object.freeze({
  debug: (...parts: unknown[]) => say("debug", parts),
  info: (...parts: unknown[]) => say("info", parts),
  warn: (...parts: unknown[]) => say("warn", parts),
  error: (...parts: unknown[]) => say("error", parts),
});

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

const TAKES = Symbol.for("mitogen.takes");

/** Mark `fn` to receive `{ router, econtext }` as an extra last argument when run by CALL_FUNCTION. */
export function takesRouter<F extends Shippable>(fn: F): F {
  (fn as unknown as Record<symbol, boolean>)[TAKES] = true;
  return fn;
}

/** Mitogen's other name for {@link takesRouter}: the router is the execution context. */
export const takesEcontext: typeof takesRouter = takesRouter;

const compiled = new Map<string, Shippable>();

const keepName = <T>(target: T, value: string): T => Object.defineProperty(target, "name", { value, configurable: true });

/** Turn shipped source into a function (cached by source). */
function compile(src: string): Shippable {
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

const dispatching = new WeakSet<Router>();

/** Kinds of CALL_FUNCTION body: `[kind, target, args, flags?, limits?]`. */
export const CALL = {
  /** target: a function's source. */
  SOURCE: 0,
  /** target: `module#export`, a function exported by a shipped module. */
  MODULE: 1,
  /** target: a module name; load it and answer with its exported function names. */
  LOAD: 2,
  /** flags bit: hand the function `{ router, econtext }` as an extra last argument. */
  TAKES_ROUTER: 1,
} as const;

function isTakesRouter(fn: unknown): boolean {
  return (fn as Record<symbol, boolean> | null)?.[TAKES] === true;
}

/** Serve CALL_FUNCTION on `router`: accepted only from this context's parents. */
export function installDispatcher(router: Router): void {
  if (dispatching.has(router)) return;
  dispatching.add(router);
  // Calls that can be cancelled, by "<caller id>:<reply handle>": only their caller can.
  const running = new Map<string, AbortController>();
  router.addHandler(
    (msg) => {
      const handle = msg.unpickle();
      running.get(`${msg.src}:${handle}`)?.abort(new AbortError(`call cancelled by its caller (context ${msg.src})`));
    },
    { handle: HANDLE.CANCEL_CALL },
  );
  const fail = (msg: Message, err: unknown, kind: number): void => {
    const error = CallError.fromThrown(withHint(err, kind, router), router.path.join(" -> "));
    if (msg.replyTo) replySafely(msg, error, router, error);
    else router.log("warn", `callNoReply failed: ${error.message}`);
  };
  const done = (msg: Message, result: unknown): void => {
    if (msg.replyTo) replySafely(msg, result, router);
  };
  router.addHandler(
    (msg) => {
      let kind = -1;
      try {
        const body = msg.unpickle() as [number, string, unknown[], number?, CallLimits?];
        kind = body[0];
        const [, target, args, flags = 0, lim] = body;
        // The common case, a plain call of shipped source or of a module already loaded here: no deadline, no
        // CallContext, answered in this tick when it is synchronous. Anything else (loading, errors) goes to runCall.
        if (!lim && !(flags & CALL.TAKES_ROUTER) && (kind === CALL.SOURCE || kind === CALL.MODULE)) {
          const fn = kind === CALL.SOURCE ? compile(target) : loadedExport(router, target);
          if (fn && !isTakesRouter(fn)) {
            const result = fn(...(Array.isArray(args) ? args : []));
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
  const runCall = async (msg: Message, kind: number, target: string, args: unknown[], flags: number, lim: CallLimits | undefined): Promise<void> => {
    let result: unknown;
    // Made only for calls that can be cancelled, have a deadline, or take a CallContext.
    let controller: AbortController | undefined;
    const key = `${msg.src}:${msg.replyTo}`;
    let deadline: ReturnType<typeof setTimeout> | undefined;
    try {
      if (lim) controller = new Abort();
      if (lim?.cancel && msg.replyTo && controller) running.set(key, controller);
      if (typeof lim?.timeout === "number") {
        const ms = lim.timeout;
        const c = controller;
        deadline = setTimeout(() => c?.abort(new TimeoutError(`deadline of ${ms} ms passed in ${router.name}`)), ms);
      }
      if (kind === CALL.LOAD) {
        const m = await router.requireModule(target);
        result = Object.keys(m).filter((k) => typeof m[k] === "function");
      } else {
        let fn: Shippable;
        if (kind === CALL.MODULE) {
          const hash = target.lastIndexOf("#");
          const mod = target.slice(0, hash);
          const name = target.slice(hash + 1);
          const m = await router.requireModule(mod);
          const f = hasOwn(m, name) ? m[name] : undefined;
          if (typeof f !== "function") throw new MitogenError(`${mod} has no exported function ${JSON.stringify(name)}`);
          fn = f as Shippable;
        } else fn = compile(target);
        const extra =
          flags & CALL.TAKES_ROUTER || isTakesRouter(fn)
            ? [{ router, econtext: router, msg, signal: (controller ??= new Abort()).signal } satisfies CallContext]
            : [];
        // Cancelled (or past its deadline) while its module loaded: it does not start.
        if (controller?.signal.aborted) throw controller.signal.reason;
        result = await fn(...(Array.isArray(args) ? args : []), ...extra);
      }
    } catch (err) {
      fail(msg, err, kind);
      return;
    } finally {
      if (deadline !== undefined) clearTimeout(deadline);
      running.delete(key);
    }
    done(msg, result);
  };
}

/** The function `module#name` of a module evaluated here already, if it exports one by that name. */
function loadedExport(router: Router, target: string): Shippable | undefined {
  const hash = target.lastIndexOf("#");
  const m = router.modules.get(target.slice(0, hash));
  const f = m && hasOwn(m, target.slice(hash + 1)) ? m[target.slice(hash + 1)] : undefined;
  return typeof f === "function" ? (f as Shippable) : undefined;
}

function isThenable(v: unknown): v is PromiseLike<unknown> {
  return (typeof v === "object" || typeof v === "function") && v !== null && typeof (v as { then?: unknown }).then === "function";
}

/**
 * Reply `value` to `msg`. When it cannot be sent (it cannot be encoded, it is
 * too large), reply `failed` (the call's own CallError) or the error that
 * stopped it, without its cause, then cut short: the caller always hears.
 */
function replySafely(msg: Message, value: unknown, router: Router, failed: CallError | null = null): void {
  try {
    msg.reply(value);
  } catch (err) {
    const e = failed ?? CallError.fromThrown(err, router.path.join(" -> "));
    const bare = (n?: number) => new CallError(e.remoteName, e.message.slice(e.remoteName.length + 2).slice(0, n), e.remoteStack.slice(0, n));
    try {
      msg.reply(bare());
    } catch {
      msg.reply(bare(1000));
    }
  }
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

function fromParent(router: Router, msg: Message): boolean {
  return msg.auth === router.myId || router.parentIds.includes(msg.auth);
}

// ---------------------------------------------------------------------------
// The child's main loop

/** The configuration a parent sends a new child in its first frame. */
export interface ChildConfig {
  contextId: number;
  parentIds: number[];
  name: string;
  maxMessageSize: number;
  unidirectional: boolean;
  debug: boolean;
  /** Names from the master down to this context. */
  path: string[];
  /** The parent context's pid, when it runs on the same machine (local, sudo, su, doas). */
  parentPid?: number;
  /** A handle of the parent's: send it V8's code cache of the core (only a core compiled by the parent's loader can). */
  codeCache?: number;
}

/** Entry point of the payload: the first stage calls this with what it read. */
export function childMain(boot: Boot, core: Record<string, unknown>, payloadName: string = CORE.MODERN): void {
  runningCore = core;
  const transport = childTransport(boot);
  const router = new Router();
  setActiveRouter(router, true);
  // A plain (undeflated) core is not kept: a first grandchild fetches the compressed one (GET_MODULE).
  if (boot.payload) {
    router.payload = boot.payload;
    router.moduleCode.set(payloadName, boot.payload);
  }
  router.name = boot.name;
  const stream = new Stream("parent", transport);
  setTitle(`mitogen:${boot.name}`);
  let configured = false;
  stream.onMessage = (msg) => {
    if (configured || msg.handle !== HANDLE.CONFIGURE) {
      stream.close(new StreamError("first frame was not CONFIGURE"));
      return;
    }
    configured = true;
    const cfg = msg.unpickle() as ChildConfig;
    router.myId = contextId = cfg.contextId;
    router.parentIds = cfg.parentIds;
    parentIds = cfg.parentIds;
    parentId = cfg.parentIds[0] ?? null;
    isMaster = false;
    router.name = cfg.name;
    router.path = Array.isArray(cfg.path) ? cfg.path.map(String) : [cfg.name];
    router.maxMessageSize = stream.maxMessageSize = cfg.maxMessageSize;
    router.unidirectional = cfg.unidirectional;
    router.debug = cfg.debug;
    setTitle(`mitogen:${cfg.name}`);
    router.setParent(stream);
    // Die with the parent even while user code blocks the event loop (see ARCHITECTURE.md, "The watchdog").
    router.log("debug", `watchdog: ${watchParent(cfg.parentPid)}`);
    // The code cache its parent asked for (see codeCached in parent.ts), made before any call has run here, and
    // after the watchdog and a log record, so that what they ran starts compiled in the next child too.
    const script = boot.script;
    if (cfg.codeCache && script) {
      // A value of each common kind encoded first, so that the cache holds the encoder too.
      Message.encoded([0, "", [null, true, 1.5, -1, 1 << 20], { a: [] }, new Uint8Array(1)], {});
      router.route(Message.encoded(script.createCachedData(), { dst: parentId ?? 0, handle: cfg.codeCache }));
    }
    if (script?.cachedDataRejected !== undefined) router.log("debug", `code cache ${script.cachedDataRejected ? "rejected" : "used"}`);
  };
  // Parent gone: nothing left to say to it, and our children see EOF when we exit.
  stream.onClose = () => exitProcess(0);
  // SHUTDOWN: stop our children first (bounded), let the last writes out, then exit. Without children, no
  // timers: the first one costs a new child about 1 ms, and the parent kills a child that does not go.
  let exiting = false;
  const exit = (code: number) => {
    if (exiting) return;
    exiting = true;
    const bounded = router.children.length > 0;
    const timer = bounded ? setTimeout(() => exitProcess(code), 2000) : undefined;
    void (bounded ? Promise.race([router.shutdown(), new Promise((r) => setTimeout(r, 1500))]) : router.shutdown())
      .then(() => stream.flush())
      .finally(() => {
        // Not clearTimeout(undefined): Deno 2 loads its Node timers for that (15 to 20 ms in a new child).
        if (timer !== undefined) clearTimeout(timer);
        exitProcess(code);
      });
  };
  router.onParentLost = () => exitProcess(0);
  installDispatcher(router);
  router.addHandler(() => exit(0), { handle: HANDLE.SHUTDOWN, policy: (m) => fromParent(router, m) });
  onUncaught((what, err) => router.log("error", `${what}: ${(err as Error)?.stack ?? err}`));
  stream.start();
  stream.writeRaw(ascii.encode(MARKER.CONNECTED));
}
