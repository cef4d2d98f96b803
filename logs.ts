/**
 * Log records at the master: the clean-up every record gets before a sink sees it
 * (errors as plain `{ name, message, stack }`, stack frames of shipped modules mapped back
 * to the sources), the default text format, adapters to other loggers ({@link logTo}) and a
 * file sink ({@link logToFile}). Children never load this file.
 *
 * @module
 */
import { appendFileSync, writeFileSync } from "node:fs";
import { mapStack } from "./bundler.ts";
import type { LogLevel, LogRecord } from "./logapi.ts";
import { nodeProcess } from "./runtime.ts";

/** Where the master's records go: the `log` option of the master Router. */
export type LogSink = (record: LogRecord) => void;

/**
 * A logger object with a method per level, as LogTape's `getLogger()`, pino's `pino()` and
 * `console` have. {@link logTo} turns one into a {@link LogSink}.
 */
export interface LevelLogger {
  debug(...args: never[]): unknown;
  info(...args: never[]): unknown;
  warn(...args: never[]): unknown;
  error(...args: never[]): unknown;
  /** LogTape's: the logger of a subcategory ({@link logTo} hands each record to the one of its category). */
  getChild?(...args: never[]): unknown;
  /** pino's: a child logger with bindings ({@link logTo} makes one per category, bound as `{ category }`). */
  child?(...args: never[]): unknown;
}

/**
 * How {@link logTo} calls a logger: `logtape` as `logger.info(message, properties)` (braces in
 * the message doubled, so they are not placeholders), `pino` as `logger.info(fields, message)`,
 * `console` as `console.info("[a -> b] message", data)`.
 */
export type LoggerStyle = "logtape" | "pino" | "console";

/** Levels by rank. */
export const LEVELS: Readonly<Record<LogLevel, number>> = Object.freeze({ debug: 0, info: 1, warn: 2, error: 3 });

/** `MITOGEN_LOG` as a level, or `fallback` when it is unset or not a level. */
export function levelFromEnv(fallback: LogLevel = "warn"): LogLevel {
  const said = nodeProcess().env.MITOGEN_LOG?.toLowerCase();
  return said !== undefined && said in LEVELS ? (said as LogLevel) : fallback;
}

const isPlain = (v: unknown): v is Record<string, unknown> =>
  v !== null && typeof v === "object" && (Object.getPrototypeOf(v) === Object.prototype || Object.getPrototypeOf(v) === null);

/** Deepest nesting of data a sink sees; below it, "[too deep]". */
const MAX_DATA_DEPTH = 32;
/** Most values (nodes) of one record's data a sink sees; past it, "[too many values]". */
const MAX_DATA_NODES = 10_000;

/**
 * The record a sink sees: stack frames of shipped modules (`mitogen:///...`) in the message and in
 * data strings mapped to the original files, Errors in data as plain `{ name, message, stack }`
 * (and `cause`, `code` when set), a cycle as "[cycle]", nesting and size bounded.
 */
export function cleanRecord(record: LogRecord): LogRecord {
  const out: LogRecord = { ...record, context: { ...record.context }, message: mapped(record.message) };
  if ("data" in record) out.data = cleanData(record.data);
  return out;
}

function mapped(text: string): string {
  return text.includes("mitogen:///") ? mapStack(text) : text;
}

/** {@link cleanRecord}'s walk over data: a copy, errors as plain fields, frames mapped. */
function cleanData(value: unknown): unknown {
  const seen = new Set<object>();
  let nodes = 0;
  const walk = (v: unknown, depth: number): unknown => {
    if (typeof v === "string") return mapped(v);
    if (v === null || typeof v !== "object") return v;
    if (seen.has(v)) return "[cycle]";
    if (depth > MAX_DATA_DEPTH) return "[too deep]";
    if (++nodes > MAX_DATA_NODES) return "[too many values]";
    seen.add(v);
    try {
      if (v instanceof Error) {
        const e: Record<string, unknown> = { name: v.name, message: mapped(v.message), stack: mapped(v.stack ?? String(v)) };
        if (v.cause !== undefined) e.cause = walk(v.cause, depth + 1);
        const code = (v as { code?: unknown }).code;
        if (code !== undefined) e.code = walk(code, depth + 1);
        return e;
      }
      if (Array.isArray(v)) return v.map((item) => walk(item, depth + 1));
      if (isPlain(v)) {
        const o: Record<string, unknown> = {};
        for (const [k, item] of Object.entries(v)) if (k !== "__proto__") o[k] = walk(item, depth + 1);
        return o;
      }
      return v; // Date, Map, Set, Uint8Array, Context...: as they are
    } finally {
      seen.delete(v);
    }
  };
  return walk(value, 0);
}

/** An Error as {@link cleanRecord} leaves it. */
function errorShaped(v: unknown): v is { name: string; message: string; stack: string } {
  return isPlain(v) && typeof v.name === "string" && typeof v.message === "string" && typeof v.stack === "string";
}

/** JSON for the text format: Map and Set as object and array, bytes as `<n bytes>`, bigint as text. */
function json(value: unknown): string {
  try {
    return (
      JSON.stringify(value, (_k, v: unknown) => {
        if (typeof v === "bigint") return String(v);
        if (v instanceof Map) return Object.fromEntries(v);
        if (v instanceof Set) return [...v];
        if (v instanceof Uint8Array) return `<${v.byteLength} bytes>`;
        return v;
      }) ?? String(value)
    );
  } catch {
    return String(value);
  }
}

const pad = (n: number, width = 2) => String(n).padStart(width, "0");

/** `HH:MM:SS.mmm`, local time. */
function clock(time: number): string {
  const d = new Date(time);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** Options of {@link formatRecord}. */
export interface FormatOptions {
  /** Put the time first: `clock` as `HH:MM:SS.mmm` (local), `iso` as ISO 8601 (UTC); default none. */
  time?: "clock" | "iso" | false;
}

/**
 * A record as text: `[a -> b] level: message key=value ...` for `log` and `user` records,
 * `[a -> b] line` for printed lines (the path without `master`; the master's own records
 * read `[master]`). Data that is a plain object prints as `key=value` (strings bare when
 * they hold no space, quote or `=`, the rest as JSON), other data as JSON; the stack frames
 * of errors in data follow on their own lines.
 *
 * @example
 * ```ts
 * import { formatRecord } from "mitogen";
 * const context = { id: 1, name: "web", path: ["master", "web"] };
 * const line = formatRecord({ time: Date.now(), level: "info", source: "user", context, message: "up", data: { version: 3 }, contextId: 1, name: "web", path: context.path });
 * console.log(line); // [web] info: up version=3
 * ```
 */
export function formatRecord(record: LogRecord, options: FormatOptions = {}): string {
  const where = record.path.length > 1 ? record.path.slice(1).join(" -> ") : record.name;
  const tag = record.source === "log" || record.source === "user" ? `${record.level}: ` : "";
  const when = options.time === "iso" ? `${new Date(record.time).toISOString()} ` : options.time === "clock" ? `${clock(record.time)} ` : "";
  const stacks: string[] = [];
  let text = "";
  const data = record.data;
  if (errorShaped(data)) stacks.push(data.stack);
  else if (isPlain(data)) {
    for (const [k, v] of Object.entries(data)) {
      if (errorShaped(v)) stacks.push(v.stack);
      const shown = errorShaped(v) ? `${v.name}: ${v.message}` : v;
      text += ` ${k}=${typeof shown === "string" && /^[^\s"=]+$/.test(shown) ? shown : json(shown)}`;
    }
  } else if ("data" in record && data !== undefined) text = ` ${json(data)}`;
  const frames = stacks.flatMap((s) => s.split("\n").filter((line) => /^\s+at /.test(line)));
  return `${when}[${where}] ${tag}${record.message}${text}${frames.map((f) => `\n${f}`).join("")}`;
}

/** Options of a text sink ({@link textLogger}, {@link logToFile}). */
export interface TextLogOptions {
  /**
   * Lowest level of the library's own records (source `log`) to write; records of user code and
   * printed lines are always written. A function is asked at each record.
   */
  level?: LogLevel | (() => LogLevel);
  /** See {@link FormatOptions.time}. */
  time?: FormatOptions["time"];
  /** Where each formatted line (without its newline) goes; default stderr. */
  write?: (line: string) => void;
}

/** A sink writing {@link formatRecord} lines. */
export function textLogger(options: TextLogOptions = {}): LogSink {
  const level = options.level ?? "warn";
  const write = options.write ?? ((line: string) => nodeProcess().stderr.write(`${line}\n`));
  return (record) => {
    const min = typeof level === "function" ? level() : level;
    if (record.source === "log" && LEVELS[record.level] < LEVELS[min]) return;
    write(formatRecord(record, options.time ? { time: options.time } : {}));
  };
}

/**
 * The default log sink: what children print, everything code logs with `log`, and the library's
 * warnings and errors go to stderr (see {@link formatRecord}). `MITOGEN_LOG=info` or `debug`
 * also shows the library's info or debug records (with `debug`, each connection step), and when
 * MITOGEN_LOG is set at all each line starts with the time the record was made (`HH:MM:SS.mmm`).
 */
export function defaultLogger(record: LogRecord): void {
  const asked = nodeProcess().env.MITOGEN_LOG;
  textLogger({ level: levelFromEnv(), time: asked ? "clock" : false })(record);
}

/** The fields {@link logTo} hands a structured logger: the data's own, plus `mitogen`. */
function fieldsOf(record: LogRecord): Record<string, unknown> {
  const data = record.data;
  const own = isPlain(data) ? data : data === undefined ? {} : { data };
  return { ...own, mitogen: { time: record.time, context: record.context, source: record.source } };
}

/** The style of `logger`: pino has `bindings()`, LogTape a `category` array; else console. */
function styleOf(logger: LevelLogger): LoggerStyle {
  const l = logger as { bindings?: unknown; category?: unknown };
  if (typeof l.bindings === "function") return "pino";
  if (Array.isArray(l.category)) return "logtape";
  return "console";
}

/** Most child loggers {@link logTo} keeps (one per category); past it, it starts again. */
const MAX_CHILD_LOGGERS = 1000;

/**
 * A sink for the `log` option that hands records to a logger object (the Router does this itself
 * when `log` is an object). `style` says how it is called (default: detected, see
 * {@link LoggerStyle}): LogTape gets `(message, fields)`, pino `(fields, message)`, where `fields` is
 * the record's data (a plain object's keys, or `{ data }`) plus `mitogen: { time, context, source }`;
 * console gets `("[a -> b] message", data)`. Each record goes to the method of its level, of the
 * logger of its category where the logger has them: LogTape's `getChild(["db", "pool"])` for
 * category `db.pool`, pino's `child({ category: "db.pool" })`; so the logger's own configuration
 * can filter by category (`mitogen`, `stdout`, `stderr`, `user`, or user code's `log.child` names).
 *
 * @example
 * ```ts
 * import { log, logTo, Router } from "mitogen";
 * await using router = new Router({ log: logTo(console, "console") });
 * log.info("deploying", { version: 3 }); // console.info("[master] deploying", { version: 3 })
 * ```
 */
export function logTo(logger: LevelLogger, style: LoggerStyle = styleOf(logger)): LogSink {
  const children = new Map<string, LevelLogger>();
  const of = (category: string): LevelLogger => {
    let child = children.get(category);
    if (!child) {
      if (style === "logtape" && typeof logger.getChild === "function") child = (logger.getChild as (sub: string[]) => LevelLogger)(category.split("."));
      else if (style === "pino" && typeof logger.child === "function") child = (logger.child as (bindings: object) => LevelLogger)({ category });
      else child = logger;
      if (children.size >= MAX_CHILD_LOGGERS) children.clear();
      children.set(category, child);
    }
    return child;
  };
  return (record) => {
    const to = typeof record.category === "string" && record.category ? of(record.category) : logger;
    const method = (to[record.level] as (...args: unknown[]) => unknown).bind(to);
    if (style === "pino") method(fieldsOf(record), record.message);
    else if (style === "logtape")
      method(
        record.message.replace(/[{}]/g, (b) => b + b),
        fieldsOf(record),
      );
    else {
      const where = record.path.length > 1 ? record.path.slice(1).join(" -> ") : record.name;
      method(`[${where}] ${record.message}`, ...(record.data === undefined ? [] : [record.data]));
    }
  };
}

/** The `log` option as a sink: a function as it is, an object through {@link logTo}, none: {@link defaultLogger}. */
export function toSink(log: LogSink | LevelLogger | undefined): LogSink {
  if (log === undefined) return defaultLogger;
  return typeof log === "function" ? log : logTo(log);
}

/** Options of {@link logToFile}. */
export interface LogToFileOptions {
  /** Lowest level of the library's own records written (default "info"; `MITOGEN_LOG`, when set, wins, as in Mitogen). */
  level?: LogLevel;
}

/**
 * A sink (for the `log` option) writing records as text lines, each starting with its ISO time,
 * to the file `path`, which it empties first (as Mitogen's `log_to_file`). Records of user code
 * and printed lines are always written; the library's own from `level` up. Each line is appended
 * as it comes, so nothing is lost when the process ends.
 *
 * @example
 * ```ts
 * import { logToFile, Router } from "mitogen";
 * await using router = new Router({ log: logToFile("/tmp/mitogen.log", { level: "debug" }), debug: true });
 * await router.local({ name: "worker" }); // its connection steps are in /tmp/mitogen.log
 * ```
 */
export function logToFile(path: string, options: LogToFileOptions = {}): LogSink {
  writeFileSync(path, "");
  return textLogger({ level: levelFromEnv(options.level ?? "info"), time: "iso", write: (line) => appendFileSync(path, `${line}\n`) });
}
