/**
 * Master-only code: the master Router with `local()`, id allocation and the
 * log sink. Children never load this file.
 *
 * @module
 */
import { CallError, MitogenError } from "./errors.ts";
import { CORE, DEFAULT_MAX_MESSAGE_SIZE, HANDLE, type Message } from "./frames.ts";
import type { Stream } from "./stream.ts";
import { type LogLevel, type LogRecord, logRecordOf, type LogSource, setActiveRouter } from "./logapi.ts";
import type { Context } from "./context.ts";
import type { ContextInfo, SshOptions } from "./options.ts";
import { defineService, Router as CoreRouter, type ServiceDef } from "./router.ts";
import { logBody } from "./bodies.ts";
import { bundle, bundleTarget, mapStack, moduleFile } from "./bundler.ts";
import { pathToFileURL } from "node:url";
import * as parentModule from "./parent.ts";
import * as tunnelModule from "./tunnel.ts";
import * as filesModule from "./files.ts";
import * as listenModule from "./listen.ts";
import * as serviceModule from "./service.ts";
import * as fileServiceModule from "./fileservice.ts";
import * as contextServiceModule from "./contextservice.ts";
import { payloads, type ShippedName } from "./payload.ts";
import { cleanRecord, defaultLogger, LEVELS, type LevelLogger, type LogSink, levelFromEnv, textLogger, toSink } from "./logs.ts";

export { defaultLogger };

/** The master's own copy of each shipped module (see SHIPPED in payload.ts). */
const BUILT_IN: Record<ShippedName, Record<string, unknown>> = {
  "mitogen:parent": parentModule as unknown as Record<string, unknown>,
  "mitogen:tunnel": tunnelModule as unknown as Record<string, unknown>,
  "mitogen:files": filesModule as unknown as Record<string, unknown>,
  "mitogen:listen": listenModule as unknown as Record<string, unknown>,
  "mitogen:service": serviceModule as unknown as Record<string, unknown>,
  "mitogen:fileservice": fileServiceModule as unknown as Record<string, unknown>,
  "mitogen:contextservice": contextServiceModule as unknown as Record<string, unknown>,
};

/** Options of the master {@link Router}. */
export interface RouterOptions {
  /**
   * Receives every log record of every context: a function, or a logger object (LogTape, pino,
   * console: see {@link logTo}). Default: print to stderr, see {@link defaultLogger}.
   */
  log?: LogSink | LevelLogger;
  /** Cap on one message's data in bytes (default 128 MiB); every child inherits it. */
  maxMessageSize?: number;
  /** Forbid messages between sibling contexts. */
  unidirectional?: boolean;
  /** Forward debug-level records from children too (default: true when MITOGEN_LOG=debug). */
  debug?: boolean;
}

/** What {@link Router.getStats} reports. */
export interface RouterStats {
  /** Contexts routed below this one (every descendant, and attached sessions). */
  contexts: number;
  /** Streams to directly connected contexts. */
  streams: number;
  /** Bytes of frames over each of those streams (headers included) and the frames, by the context at the other end. */
  links: { id: number; name: string; bytesIn: number; bytesOut: number; framesIn: number; framesOut: number }[];
  /** Modules (the core payloads and shipped modules included) sent down, asked for (GET_MODULE) or ahead of need (LOAD_MODULE), and their compressed bytes. */
  modulesSent: number;
  moduleBytesSent: number;
}

/**
 * The master's router: starts contexts and receives their logs. Disposable:
 * `await using router = new Router()` stops every context at scope exit.
 *
 * @example
 * ```ts
 * import { Router } from "mitogen";
 * await using router = new Router();
 * const a = await router.local({ runtime: "node", name: "a" });
 * const b = await router.local({ runtime: "deno", via: a });
 * console.log(await b.call((x: number) => x * 2, 21)); // 42
 * await b.shutdown({ wait: true });
 * ```
 */
export class Router extends CoreRouter {
  readonly #logger: LogSink;
  /** Set by enableDebug: the default logger shows the library's debug records too. */
  #verbose = false;
  #nextId = 1;

  constructor(options: RouterOptions = {}) {
    super();
    this.#logger =
      options.log === undefined
        ? (record) => (this.#verbose ? textLogger({ level: "debug", time: "clock" })(record) : defaultLogger(record))
        : toSink(options.log);
    this.maxMessageSize = options.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE;
    this.unidirectional = options.unidirectional ?? false;
    this.debug = options.debug ?? levelFromEnv() === "debug";
    this.addHandler((msg, stream) => this.#onForwardLog(msg, stream), { handle: HANDLE.FORWARD_LOG });
    setActiveRouter(this, true);
  }

  /** A fresh context id; the core's ALLOCATE_ID handler answers children with these too. */
  override allocateId(): Promise<number> {
    return Promise.resolve(this.#nextId++);
  }

  /** Hand a record to the logger, cleaned ({@link cleanRecord}: shipped-module stacks mapped to the sources). */
  override logRecord(record: LogRecord): void {
    try {
      this.#logger(cleanRecord(record));
    } catch {
      // a failing logger must not break routing
    }
  }

  /**
   * Debug records from contexts started from now on are forwarded too, and the default logger
   * shows the library's debug records (each connection step, with ms). Mitogen's
   * `enable_debug` also writes every context's log to a file in /tmp; here use
   * {@link logToFile} for that.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * router.enableDebug();
   * await router.local({ name: "worker" }); // stderr: [master] debug: worker: started node (+2 ms) ...
   * ```
   */
  enableDebug(): void {
    this.debug = true;
    this.#verbose = true;
  }

  /**
   * Counts for this router: contexts, streams, bytes per link, modules sent.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local({ name: "worker" });
   * await ctx.call(() => 1);
   * console.log(router.getStats()); // { contexts: 1, streams: 1, links: [{ id: 1, name: "worker", ... }], ... }
   * ```
   */
  getStats(): RouterStats {
    const links = this.children.flatMap(({ stream }) =>
      stream.remoteId === null ? [] : [{ id: stream.remoteId, name: this.contextById(stream.remoteId).name, ...stream.counts }],
    );
    return {
      contexts: this.routedIds().length,
      streams: links.length,
      links,
      modulesSent: this.stats.modulesSent,
      moduleBytesSent: this.stats.moduleBytesSent,
    };
  }

  /**
   * Close the stream to `context`, a directly connected context (else do nothing), and resolve
   * once it has gone: it and the contexts below it end as on losing their parent, and calls
   * waiting on them fail. As Mitogen's `Router.disconnect`; `ctx.shutdown()` asks it to stop instead.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const ctx = await router.local();
   * await router.disconnect(ctx);
   * console.log(ctx.isDisconnected); // true
   * ```
   */
  async disconnect(context: Context): Promise<void> {
    const link = this.children.find((l) => l.stream.remoteId === context.contextId);
    if (!link) return;
    link.stream.close();
    await context.disconnected();
  }

  /**
   * {@link Router.disconnect} every directly connected context at once; the router stays usable.
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * await Promise.all([router.local(), router.local()]);
   * await router.disconnectAll();
   * console.log(router.getStats().streams); // 0
   * ```
   */
  async disconnectAll(): Promise<void> {
    const ids = this.children.flatMap((l) => (l.stream.remoteId === null ? [] : [l.stream.remoteId]));
    await Promise.all(ids.map((id) => this.disconnect(this.contextById(id))));
  }

  /**
   * The contexts this router can reach, the oldest first: for the master every context below it
   * (attached sessions too), with the name, method (`local`, `ssh`, `sudo`...), parent and
   * runtime each was announced with; for an attached session the listening context and, as its
   * listener's `route` admits, the contexts below it (asked of the listener).
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * const a = await router.local({ name: "a" });
   * await router.local({ via: a });
   * console.log(await router.contexts()); // [{ id: 1, name: "a", method: "local", parent: 0, ... }, { id: 2, name: "local.4242", parent: 1, ... }]
   * ```
   */
  contexts(): Promise<ContextInfo[]> {
    return Promise.resolve(listenModule.contextsBelow(this));
  }

  /**
   * The one context {@link Router.contexts} lists under `name`; throws if there is none, or more
   * than one (default names such as `sudo.root` repeat: give contexts names, or pick by `parent`).
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * await router.local({ name: "worker" });
   * const worker = await router.contextByName("worker");
   * console.log(await worker.call(() => 1 + 1)); // 2
   * ```
   */
  async contextByName(name: string): Promise<Context> {
    const found = (await this.contexts()).filter((c) => c.name === name);
    const [info] = found;
    if (!info || found.length > 1)
      throw new MitogenError(
        info
          ? `${found.length} contexts are named ${name} (ids ${found.map((c) => c.id).join(", ")}): give them names, or pick one from contexts()`
          : `no context named ${name} is reachable from ${this.name}`,
      );
    const ctx = this.contextById(info.id, name);
    ctx.runtime ??= info.runtime;
    ctx.method ??= info.method;
    return ctx;
  }

  #onForwardLog(msg: Message, stream: Stream | null): void {
    const rec = logBody.decode(msg);
    if (!Array.isArray(rec)) return;
    const [id, name, level, source, text, path, time, data, category] = rec;
    if (typeof id !== "number" || typeof text !== "string") return;
    // A context may speak for itself and for contexts behind it (its children, even before
    // their route is announced), never for a context routed elsewhere.
    const routed = this.routeTo(id);
    const own = id === msg.src || (id !== this.myId && (routed === undefined || routed === stream));
    const origin = own ? id : msg.src;
    const named = own && typeof name === "string" ? name : this.contextById(origin).name;
    const record = logRecordOf(
      origin,
      named,
      own && Array.isArray(path) ? path.map(String) : ["master", named],
      (typeof level === "string" && level in LEVELS ? level : "info") as LogLevel,
      (source === "stdout" || source === "stderr" || source === "user" ? source : "log") as LogSource,
      text,
      data,
      typeof category === "string" ? category : undefined,
    );
    if (typeof time === "number" && Number.isFinite(time)) record.time = time;
    this.logRecord(record);
  }

  /** The library's shipped modules are built in here: no need to fetch them; their code is held for children. */
  override async requireModule(name: string): Promise<Record<string, unknown>> {
    if (name in BUILT_IN && !this.payload) {
      const built = await payloads();
      this.payload ??= built.core;
      this.moduleCode.set(CORE.MODERN, built.core);
      this.moduleCode.set(CORE.LOWERED, built.coreLowered);
      for (const [shipped, code] of Object.entries(built.modules)) {
        this.moduleCode.set(shipped, code);
        this.modules.set(shipped, BUILT_IN[shipped as ShippedName]);
      }
    }
    return super.requireModule(name);
  }

  /**
   * Register the service `name` as defined by the module at `specifier` (a file URL or path; `./x.ts`
   * is beside the calling file), which exports it ({@link defineService}). Nothing is loaded now: the
   * first call of the service in any context loads the module there (the master imports it; a child
   * gets it bundled for its runtime, fetched through its parents as `ctx.import`'s modules are).
   *
   * @example
   * ```ts
   * import { Router } from "mitogen";
   * await using router = new Router();
   * router.registerService("tasks", new URL("./examples/tasks-service.ts", import.meta.url));
   * const child = await router.local();
   * console.log(await child.callService("tasks", "hostname")); // web1
   * ```
   */
  registerService(name: string, specifier: string | URL): void {
    this.#registry.set(name, moduleFile(specifier));
  }

  readonly #registry = new Map<string, string>();

  /** @internal mitogen:service activating `name` here: the locator, or the module registered under it, imported. */
  async loadService(name: string): Promise<ServiceDef | undefined> {
    if (name === serviceModule.LOCATOR) return this.#locator;
    const shipped = Object.hasOwn(serviceModule.LIBRARY_SERVICES, name) ? (serviceModule.LIBRARY_SERVICES[name] as ShippedName) : undefined;
    if (shipped) return serviceModule.findService(await this.requireModule(shipped), name);
    const file = this.#registry.get(name);
    return file === undefined ? undefined : serviceModule.findService(await import(pathToFileURL(file).href), name);
  }

  /** Tells a context which module (bundled for its runtime) defines a registered service; null when none. */
  readonly #locator: ServiceDef = defineService({
    name: serviceModule.LOCATOR,
    policy: "any",
    methods: {
      locate: {
        run: ({ name }: { name?: unknown }, { caller }) => {
          if (typeof name === "string" && Object.hasOwn(serviceModule.LIBRARY_SERVICES, name)) return serviceModule.LIBRARY_SERVICES[name];
          const file = typeof name === "string" ? this.#registry.get(name) : undefined;
          return file === undefined ? null : this.bundleModule(pathToFileURL(file), caller.runtime);
        },
      },
    },
  });

  /** As the core's, plus `transport: "ssh2"`: an in-process connection from the master. */
  override async ssh(options: SshOptions): Promise<Context> {
    if (options.transport !== "ssh2") return super.ssh(options);
    if (options.via) throw new MitogenError("transport ssh2 runs in the master only: it cannot be used with via");
    await this.requireModule("mitogen:parent");
    const id = await this.allocateId();
    const { connectSsh2 } = await import("./ssh2.ts");
    return connectSsh2(this, options, id, options.name ?? `ssh.${parentModule.sshWhere(options)}`);
  }

  /**
   * Bundle `specifier` with esbuild for a context on `runtime` (cached per runtime while its sources are
   * unchanged) and hold it for GET_MODULE.
   */
  override async bundleModule(specifier: string | URL, runtime: string | null = null): Promise<string> {
    const { name, code, exports } = await bundle(specifier, bundleTarget(runtime));
    this.moduleCode.set(name, code);
    if (exports) this.#exports.set(name, exports);
    return name;
  }

  /** The file URL `specifier` means: a relative one is beside the file that called the library. */
  moduleURL(specifier: string | URL): URL {
    return pathToFileURL(moduleFile(specifier));
  }

  readonly #exports = new Map<string, string[]>();

  /** The names module `name` (bundled here) exports, when its bundle tells. */
  moduleExports(name: string): string[] | undefined {
    return this.#exports.get(name);
  }

  /** Remote stacks point into shipped bundles; point them at the original TypeScript instead. */
  override rewriteCallError(err: CallError): CallError {
    if (!err.remoteStack.includes("mitogen:///")) return err;
    const options = "cause" in err ? { cause: err.cause } : undefined;
    return new CallError(err.remoteName, err.remoteMessage, mapStack(err.remoteStack), options);
  }
}
