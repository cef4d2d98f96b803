/**
 * Master-only code: the master Router with `local()`, id allocation and the
 * log sink. Children never load this file.
 *
 * @module
 */
import {
  CallError,
  type Context,
  CORE,
  Router as CoreRouter,
  DEFAULT_MAX_MESSAGE_SIZE,
  HANDLE,
  type LogLevel,
  type LogRecord,
  type LogSource,
  type Message,
  MitogenError,
  setActiveRouter,
  type SshOptions,
  type Stream,
} from "./core.ts";
import { bundle, bundleTarget, mapStack } from "./bundler.ts";
import * as parentModule from "./parent.ts";
import * as tunnelModule from "./tunnel.ts";
import * as filesModule from "./files.ts";
import * as listenModule from "./listen.ts";
import { payloads, type ShippedName } from "./payload.ts";

/** The master's own copy of each shipped module (see SHIPPED in payload.ts). */
const BUILT_IN: Record<ShippedName, Record<string, unknown>> = {
  "mitogen:parent": parentModule as unknown as Record<string, unknown>,
  "mitogen:tunnel": tunnelModule as unknown as Record<string, unknown>,
  "mitogen:files": filesModule as unknown as Record<string, unknown>,
  "mitogen:listen": listenModule as unknown as Record<string, unknown>,
};

/** Options of the master {@link Router}. */
export interface RouterOptions {
  /** Receives every log line of every context (default: print to stderr, see {@link defaultLogger}). */
  log?: (record: LogRecord) => void;
  /** Cap on one message's data in bytes (default 128 MiB); every child inherits it. */
  maxMessageSize?: number;
  /** Forbid messages between sibling contexts. */
  unidirectional?: boolean;
  /** Forward debug-level records from children too. */
  debug?: boolean;
}

const LEVELS: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };

/**
 * The default log sink: what children print, and warnings and errors, go to
 * stderr as `[name] line`. Debug and info records of the library itself are
 * shown only with MITOGEN_LOG=debug (or info).
 */
export function defaultLogger(record: LogRecord): void {
  const min = LEVELS[(process.env.MITOGEN_LOG as LogLevel | undefined) ?? "warn"] ?? LEVELS.warn;
  if (record.source === "log" && LEVELS[record.level] < min) return;
  const tag = record.source === "log" || record.source === "user" ? `${record.level}: ` : "";
  const where = record.path.length > 1 ? record.path.slice(1).join(" -> ") : record.name;
  process.stderr.write(`[${where}] ${tag}${record.message}\n`);
}

/**
 * The master's router: starts contexts and receives their logs. Disposable:
 * `await using router = new Router()` stops every context at scope exit.
 *
 * @example
 * ```ts
 * import { Router } from "./mod.ts";
 * await using router = new Router();
 * const a = await router.local({ runtime: "node", name: "a" });
 * const b = await router.local({ runtime: "deno", via: a });
 * console.log(await b.call((x: number) => x * 2, 21)); // 42
 * await b.shutdown({ wait: true });
 * ```
 */
export class Router extends CoreRouter {
  readonly #logger: (record: LogRecord) => void;
  #nextId = 1;

  constructor(options: RouterOptions = {}) {
    super();
    this.#logger = options.log ?? defaultLogger;
    this.maxMessageSize = options.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE;
    this.unidirectional = options.unidirectional ?? false;
    this.debug = options.debug ?? false;
    this.addHandler((msg, stream) => this.#onForwardLog(msg, stream), { handle: HANDLE.FORWARD_LOG });
    setActiveRouter(this, true);
  }

  /** A fresh context id; the core's ALLOCATE_ID handler answers children with these too. */
  override allocateId(): Promise<number> {
    return Promise.resolve(this.#nextId++);
  }

  override logRecord(record: LogRecord): void {
    try {
      this.#logger(record);
    } catch {
      // a failing logger must not break routing
    }
  }

  #onForwardLog(msg: Message, stream: Stream | null): void {
    const rec = msg.unpickle() as unknown[];
    if (!Array.isArray(rec)) return;
    const [id, name, level, source, text, path] = rec;
    if (typeof id !== "number" || typeof text !== "string") return;
    // A context may speak for itself and for contexts behind it (its children, even before
    // their route is announced), never for a context routed elsewhere.
    const routed = this.routeTo(id);
    const own = id === msg.src || (id !== this.myId && (routed === undefined || routed === stream));
    const origin = own ? id : msg.src;
    const named = own && typeof name === "string" ? name : this.contextById(origin).name;
    this.logRecord({
      contextId: origin,
      name: named,
      path: own && Array.isArray(path) ? path.map(String) : ["master", named],
      level: (typeof level === "string" && level in LEVELS ? level : "info") as LogLevel,
      source: (source === "stdout" || source === "stderr" || source === "user" ? source : "log") as LogSource,
      message: text,
    });
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

  /** As the core's, plus `transport: "ssh2"`: an in-process connection from the master. */
  override async ssh(options: SshOptions): Promise<Context> {
    if (options.transport !== "ssh2") return super.ssh(options);
    if (options.via) throw new MitogenError("transport ssh2 runs in the master only: it cannot be used with via");
    await this.requireModule("mitogen:parent");
    const id = await this.allocateId();
    const { connectSsh2 } = await import("./ssh2.ts");
    return connectSsh2(this, options, id, options.name ?? `ssh.${options.hostname}.${id}`);
  }

  /**
   * Bundle `specifier` with esbuild for a context on `runtime` (cached per runtime while its sources are
   * unchanged) and hold it for GET_MODULE.
   */
  override async bundleModule(specifier: string | URL, runtime: string | null = null): Promise<string> {
    const { name, code } = await bundle(specifier, bundleTarget(runtime));
    this.moduleCode.set(name, code);
    return name;
  }

  /** Remote stacks point into shipped bundles; point them at the original TypeScript instead. */
  override rewriteCallError(err: CallError): CallError {
    if (!err.remoteStack.includes("mitogen:///")) return err;
    const options = "cause" in err ? { cause: err.cause } : undefined;
    return new CallError(err.remoteName, err.message.slice(err.remoteName.length + 2), mapStack(err.remoteStack), options);
  }
}
