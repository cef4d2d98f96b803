/**
 * Master-only code: the master Router with `local()`, id allocation and the
 * log sink. Children never load this file.
 *
 * @module
 */
import {
  type Context,
  Router as CoreRouter,
  DEFAULT_MAX_MESSAGE_SIZE,
  HANDLE,
  type LogLevel,
  type LogRecord,
  type LogSource,
  Message,
  MitogenError,
  isDeno,
  type Stream,
} from "./core.ts";
import { type ConnectSpec, connectLocal } from "./parent.ts";
import { payloads } from "./payload.ts";

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

/** Options of {@link Router.local}. */
export interface LocalOptions {
  /** "node", "deno", or a path to either (default: the runtime the master runs on). */
  runtime?: string;
  /** Context name, shown in logs and in the process title (`mitogen:<name>`). */
  name?: string;
  /** Start the context from this one instead of the master. */
  via?: Context;
  /** Milliseconds allowed from spawn to connected (default 30 000). */
  connectTimeout?: number;
  /** Extra environment variables. */
  env?: Record<string, string>;
  /** Working directory. */
  cwd?: string;
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
  const tag = record.source === "log" ? `${record.level}: ` : "";
  process.stderr.write(`[${record.name}] ${tag}${record.message}\n`);
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
  readonly #parentModule = new Map<number, Promise<unknown>>();
  #closed = false;

  constructor(options: RouterOptions = {}) {
    super();
    this.#logger = options.log ?? defaultLogger;
    this.maxMessageSize = options.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE;
    this.unidirectional = options.unidirectional ?? false;
    this.debug = options.debug ?? false;
    this.addHandler((msg, stream) => this.#onForwardLog(msg, stream), { handle: HANDLE.FORWARD_LOG });
    this.addHandler((msg) => msg.reply(this.allocateId()), { handle: HANDLE.ALLOCATE_ID });
  }

  /** A fresh context id. */
  allocateId(): number {
    return this.#nextId++;
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
    const [id, name, level, source, text] = rec;
    if (typeof id !== "number" || typeof text !== "string") return;
    // A context may speak for itself and for contexts behind it (its children, even before
    // their route is announced), never for a context routed elsewhere.
    const routed = this.routeTo(id);
    const own = id === msg.src || (id !== this.myId && (routed === undefined || routed === stream));
    const origin = own ? id : msg.src;
    this.logRecord({
      contextId: origin,
      name: own && typeof name === "string" ? name : this.contextById(origin).name,
      level: (typeof level === "string" && level in LEVELS ? level : "info") as LogLevel,
      source: (source === "stdout" || source === "stderr" ? source : "log") as LogSource,
      message: text,
    });
  }

  /**
   * Start a local context running Node or Deno, directly or `via` another
   * context, and resolve with its Context once it is connected.
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
    if (this.#closed) throw new MitogenError("router is shut down");
    const built = await payloads();
    this.payload ??= built.core;
    const id = this.allocateId();
    const spec: ConnectSpec = {
      id,
      name: options.name ?? `local.${id}`,
      runtime: options.runtime ?? (isDeno ? "deno" : "node"),
      connectTimeout: options.connectTimeout ?? 30_000,
      ...(options.env ? { env: options.env } : {}),
      ...(options.cwd ? { cwd: options.cwd } : {}),
    };
    const via = options.via;
    if (!via) return connectLocal(this, spec);
    let loaded = this.#parentModule.get(via.contextId);
    if (!loaded) {
      loaded = via.sendAwait(Message.encoded(["mitogen:parent", built.parent], { handle: HANDLE.LOAD_MODULE }));
      this.#parentModule.set(via.contextId, loaded);
      loaded.catch(() => this.#parentModule.delete(via.contextId));
    }
    await loaded;
    await via.callModule("mitogen:parent", "proxyConnectLocal", spec);
    const ctx = this.contextById(id, spec.name);
    ctx.via = via;
    return ctx;
  }

  override shutdown(): Promise<void> {
    this.#closed = true;
    return super.shutdown();
  }
}
