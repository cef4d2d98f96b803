/**
 * The log API of every context: {@link log} for user code, the {@link LogRecord} the master's logger
 * sees, and the router that carries records (set by childMain, or by the master's first Router). The
 * master's side (formatting, sinks) is logs.ts. Part of the child payload.
 *
 * @module
 */

/** Where a log line came from: the library itself, user code's {@link log}, or what a child printed. */
export type LogSource = "log" | "user" | "stdout" | "stderr";
/** Log severity. */
export type LogLevel = "debug" | "info" | "warn" | "error";

/** The category of a record that names none: `mitogen` for the library's, `user` for {@link log}'s, else its source. */
export const defaultCategory = (source: LogSource): string => (source === "log" ? "mitogen" : source);

/** One log record from any context, as the master's logger sees it. */
export interface LogRecord {
  /** When it was made, in ms since the epoch, by the clock of the context that made it. */
  time: number;
  level: LogLevel;
  source: LogSource;
  /** The context it is about: id, name, and names from the master down (`["master", "a", "b"]`). */
  context: { id: number; name: string; path: string[] };
  message: string;
  /**
   * The logger it came from, as named in the context that made it: `mitogen` (the library),
   * `stdout` or `stderr` (printed lines), `user` ({@link log}), or the name given to
   * {@link Logger.child} (`db`, `db.pool`). {@link logTo} makes it the LogTape category or pino child
   * logger. Every record the library makes has one.
   */
  category?: string;
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
export function logRecordOf(
  id: number,
  name: string,
  path: string[],
  level: LogLevel,
  source: LogSource,
  message: string,
  data?: unknown,
  category: string = defaultCategory(source),
): LogRecord {
  const rec: LogRecord = { time: Date.now(), level, source, context: { id, name, path }, message, category, contextId: id, name, path };
  if (data !== undefined) rec.data = data;
  return rec;
}

/** What the log API needs of the router of this context (the Router is one). */
export interface LogHost {
  log(level: LogLevel, message: string, source?: LogSource, data?: unknown, category?: string): void;
}

/** The router of the context this code runs in (set by childMain, or by the master's first Router). */
let activeRouter: LogHost | null = null;

/** @internal */
export function setActiveRouter(router: LogHost, replace: boolean): void {
  if (replace || !activeRouter) activeRouter = router;
}

function say(level: LogLevel, parts: unknown[], category?: string): void {
  // The first string is the message; what follows is data: one value, plain objects merged, or the list.
  const first = parts[0];
  const rest = typeof first === "string" ? parts.slice(1) : parts;
  const plain = rest.every((p) => p !== null && typeof p === "object" && Object.getPrototypeOf(p) === Object.prototype);
  const data = rest.length < 2 ? rest[0] : plain ? Object.assign({}, ...rest) : rest;
  activeRouter?.log(level, typeof first === "string" ? first : first instanceof Error ? String(first) : "", "user", data, category);
}

/** JSON of `value`, a cycle shown as "[cycle]"; String(value) if even that fails. */
export function safeJson(value: unknown): string {
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

/** A logger: a method per level, and {@link Logger.child} for a logger under a name of its own. */
export interface Logger extends Readonly<Record<LogLevel, (...parts: unknown[]) => void>> {
  /** A logger whose records carry category `name` (below a named logger: `parent.name`). */
  child(name: string): Logger;
}

const logger = (category?: string): Logger =>
  Object.freeze({
    debug: (...parts: unknown[]) => say("debug", parts, category),
    info: (...parts: unknown[]) => say("info", parts, category),
    warn: (...parts: unknown[]) => say("warn", parts, category),
    error: (...parts: unknown[]) => say("error", parts, category),
    child: (name: string) => logger(category ? `${category}.${name}` : name),
  });

/**
 * Log from code running in any context. At the master the records go to its
 * logger; in a child they travel there, tagged with the context's name and
 * path (`record.path`). The default logger prints them all. Their category is
 * `user`; `log.child("db")` logs under `db`, so a LogTape or pino logger can
 * filter by it (see logTo).
 *
 * @example
 * ```ts
 * import { log } from "mitogen";
 * log.info("deploying", { version: 3 });
 * log.child("db").warn("slow query", { ms: 900 }); // category "db"
 * ```
 */
export const log: Logger = logger();
