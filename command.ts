/**
 * `mitogen run|call|eval|put|get TARGETS ...`: one thing across many hosts,
 * through bastions and sudo, with a live per-host list on a terminal and
 * JSON lines otherwise. cli.ts dispatches here.
 *
 * @module
 */
import { closeSync, constants, fstatSync, mkdirSync, openSync, readSync, type Stats, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { setMaxListeners } from "node:events";
import { basename, join, resolve } from "node:path";
import { ReadStream } from "node:tty";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { constants as os } from "node:os";
import type { createLogUpdate } from "log-update";
import { levelFromEnv } from "./logs.ts";
import { type CallChain, CallError, type Context, type LogRecord, Receiver, Router, type Sender, TimeoutError } from "./mod.ts";
import { joinParts } from "./bytes.ts";
import { callExec } from "./tunnel.ts";
import type { ContextSpec } from "./contextservice.ts";
import { attach } from "./serve.ts";
import type { SshOptions } from "./options.ts";
import { sshExec } from "./sshexec.ts";

/** One target as given: `local`, or `[user@]host[:port]`. */
export interface Target {
  label: string;
  local: boolean;
  host: string;
  user?: string;
  port?: number;
}

/** What each host's line of output says (the JSON line, without the command's own fields). */
export interface HostResult {
  host: string;
  ok: boolean;
  exitCode?: number | null;
  stdout?: string;
  stderr?: string;
  result?: unknown;
  error?: string;
  /** Stopped by a signal to the CLI (SIGINT, SIGTERM, SIGHUP) before it finished. */
  interrupted?: boolean;
  /** What the host's contexts printed and logged (console output of call and eval, warnings), to {@link OUTPUT_CAP} bytes. */
  output?: string;
  ms: number;
}

/** A usage mistake: printed with the command's usage, exit status 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

const COMMON_OPTIONS = {
  via: { type: "string" },
  sudo: { type: "string" },
  user: { type: "string" },
  identity: { type: "string", short: "i" },
  "ssh-config": { type: "string", short: "F" },
  password: { type: "boolean" },
  "password-file": { type: "string" },
  runtime: { type: "string" },
  forks: { type: "string" },
  timeout: { type: "string" },
  "check-host-keys": { type: "boolean" },
  json: { type: "boolean" },
  stdin: { type: "boolean", short: "I" },
  gather: { type: "boolean", short: "b" },
  "output-dir": { type: "string", short: "o" },
  "no-serve": { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;

const COMMON_HELP = `targets:
  host,user@host:port,...   comma list; names from ~/.ssh/config work (OpenSSH resolves them)
  @FILE                     one target a line (# comments)
  local                     a local context

options:
  --via HOST[,HOST]         reach the targets through these hosts, in order
  --sudo[=USER]             run as USER (default root) through sudo on each target
  --user USER               ssh login name (default: as ssh decides)
  -i, --identity FILE       ssh identity file
  -F, --ssh-config FILE     ssh config for the connections this machine makes (the first hop)
  --password                ask once on the terminal for the ssh/sudo password
  --password-file FILE      read it from FILE instead (for scripts with no terminal)
  --runtime node|deno|auto  the runtime on the targets (default auto; run on plain
                            ssh targets starts none unless given)
  --forks N                 hosts at a time (default 10)
  --timeout MS              per host, connecting included (default 60000)
  --check-host-keys         refuse unknown host keys (default: learn new ones, refuse changed)
  --json                    one JSON object per host per line (the default when stdout is not a terminal)
  -I, --stdin               send this command's stdin (read to its end first) to every host's
                            command (run); without it, input on stdin is refused, not dropped
  -b, --gather              print identical output once, under the list of hosts that gave it
  -o, --output-dir DIR      also write each host's stdout and stderr (run), or result (call,
                            eval), to DIR/<host>.stdout, .stderr, .result
  --no-serve                start contexts of its own, not those of a running mitogen serve
  -h, --help                this text`;

/** The commands, their argument shapes and help. */
export const COMMANDS: Record<string, { args: string; summary: string; more?: string }> = {
  run: { args: "TARGETS [options] -- COMMAND...", summary: "run a shell command on each target: exit code, stdout and stderr per host" },
  call: {
    args: "TARGETS [options] FILE#EXPORT [JSON_ARGS]",
    summary: "call an exported function of a module (shipped with ctx.import) on each target",
    more: `JSON_ARGS is one JSON value: an array is spread as the arguments, anything else is the one
argument; none calls the function with none.
  mitogen call web1 ./tasks.ts#add '[1, 2]'            add(1, 2)
  mitogen call web1 ./tasks.ts#inventory '{"deep":true}'  inventory({ deep: true })
  mitogen call web1 ./tasks.ts#tag '[["a", "b"]]'     tag(["a", "b"]): an array as the one argument`,
  },
  eval: { args: "TARGETS [options] EXPR", summary: "evaluate a JavaScript expression on each target" },
  put: { args: "TARGETS [options] SRC DST", summary: "copy a local file to DST on each target" },
  get: { args: "TARGETS [options] SRC DSTDIR", summary: "copy SRC from each target to DSTDIR/<host>/<name>" },
};

/** The help of `command`. */
export function usage(command: string): string {
  const c = COMMANDS[command];
  return c ? `usage: mitogen ${command} ${c.args}\n\n${c.summary}\n${c.more ? `\n${c.more}\n` : ""}\n${COMMON_HELP}\n` : "";
}

/** The largest targets file read (`@FILE`): a host list, not a disk. */
export const MAX_TARGETS_FILE: number = 1024 * 1024;
/** How deep `@FILE` lines may include other files. */
const MAX_TARGETS_DEPTH = 16;

/**
 * Read a small regular file, `what` (as errors name it), of at most `max` bytes; `refuse` may turn it
 * down by its stat. Opened O_NONBLOCK: a FIFO opens at once (and is refused) instead of waiting for a
 * writer. Any failure is a UsageError naming the file and what is wrong.
 */
function readSmallFile(path: string, what: string, max: number, hint: string, refuse?: (st: Stats) => string | null): string {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    throw new UsageError(`cannot read ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? reason(err)}`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new UsageError(`${what} ${path} is not a regular file`);
    const refused = refuse?.(st);
    if (refused) throw new UsageError(refused);
    if (st.size > max) throw new UsageError(`${what} ${path} is over ${max} bytes (${st.size}): ${hint}`);
    // Read to the end (a file may hold more than its stat said), one byte past the bound at most.
    const buf = Buffer.alloc(max + 1);
    let n = 0;
    for (let got = -1; got !== 0 && n < buf.length; n += got) got = readSync(fd, buf, n, buf.length - n, null);
    if (n > max) throw new UsageError(`${what} ${path} is over ${max} bytes: ${hint}`);
    return buf.subarray(0, n).toString("utf8");
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(`cannot read ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? reason(err)}`);
  } finally {
    closeSync(fd);
  }
}

/** Read a targets file (`@FILE`): a regular file of at most {@link MAX_TARGETS_FILE} bytes; a UsageError naming the file and what is wrong otherwise. */
export function readTargetsFile(path: string): string {
  return readSmallFile(path, "targets file", MAX_TARGETS_FILE, "is it a host list?");
}

const TARGET = /^(?:([^@]+)@)?(\[[^\]]+\]|[^:@]+)(?::(\d+))?$/;

/**
 * Parse a target list: commas, `@file` lines, `local`, `[user@]host[:port]` (IPv6 in brackets).
 * A file that includes itself (directly or not), one too large, missing or not a regular file, and
 * a bad line (named by its number, its text not shown: the file may not be a host list) are UsageErrors.
 */
export function parseTargets(spec: string, readFile: (path: string) => string = readTargetsFile): Target[] {
  const out: Target[] = [];
  const walk = (list: string, within: { path: string; key: string; line: number }[]) => {
    for (const item of list.split(",").map((s) => s.trim())) {
      if (!item) continue;
      const where = within.at(-1);
      if (item.startsWith("@")) {
        const path = item.slice(1);
        const key = resolve(path);
        const cycle = within.findIndex((f) => f.key === key);
        if (cycle >= 0) throw new UsageError(`targets file ${path} includes itself: ${[...within.slice(cycle).map((f) => f.path), path].join(" -> ")}`);
        if (within.length >= MAX_TARGETS_DEPTH) throw new UsageError(`targets files nest deeper than ${MAX_TARGETS_DEPTH} at ${path}`);
        const text = readFile(path);
        if (text.length > MAX_TARGETS_FILE) throw new UsageError(`targets file ${path} is over ${MAX_TARGETS_FILE} bytes: is it a host list?`);
        const lines = text.split("\n");
        for (let i = 0; i < lines.length; i++) {
          const t = (lines[i] as string).replace(/#.*/, "").trim();
          if (t) walk(t, [...within, { path, key, line: i + 1 }]);
        }
        continue;
      }
      if (item === "local") {
        out.push({ label: "local", local: true, host: "local" });
        continue;
      }
      const m = TARGET.exec(item);
      if (!m) {
        if (where)
          throw new UsageError(
            `line ${where.line} of targets file ${where.path} is not a target list: expected [user@]host[:port], @FILE or local, comma-separated`,
          );
        throw new UsageError(`bad target ${JSON.stringify(item)}: expected [user@]host[:port], @FILE or local`);
      }
      const host = (m[2] as string).replace(/^\[(.*)\]$/, "$1");
      out.push({ label: item, local: false, host, ...(m[1] ? { user: m[1] } : {}), ...(m[3] ? { port: Number(m[3]) } : {}) });
    }
  };
  walk(spec, []);
  // the same label twice is two lines of output that say the same: number them
  const seen = new Map<string, number>();
  for (const t of out) {
    const n = (seen.get(t.label) ?? 0) + 1;
    seen.set(t.label, n);
    if (n > 1) t.label = `${t.label}#${n}`;
  }
  return out;
}

interface Parsed {
  targets: Target[];
  rest: string[];
  via: Target[];
  sudo: string | null;
  user?: string;
  identity?: string;
  sshConfig?: string;
  passwordPrompt: boolean;
  passwordFile?: string;
  runtime?: string;
  forks: number;
  timeout: number;
  checkHostKeys: boolean;
  json: boolean;
  serve: boolean;
  /** `--stdin`: what every host's command reads. */
  input?: Uint8Array;
  gather: boolean;
  outputDir?: string;
}

function parse(command: string, argv: string[]): Parsed | "help" {
  // `--sudo` alone means root; parseArgs would take the next word (a target) as its value
  const args = argv.map((a) => (a === "--sudo" ? "--sudo=root" : a));
  let parsed: ReturnType<typeof parseArgs<{ args: string[]; options: typeof COMMON_OPTIONS; allowPositionals: true; tokens: true; strict: true }>>;
  try {
    parsed = parseArgs({ args, options: COMMON_OPTIONS, allowPositionals: true, tokens: true, strict: true });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const v = parsed.values;
  if (v.help) return "help";
  const terminator = parsed.tokens.find((t) => t.kind === "option-terminator");
  const before = parsed.tokens.filter((t) => t.kind === "positional" && (!terminator || t.index < terminator.index)).map((t) => (t as { value: string }).value);
  const after = terminator ? args.slice(terminator.index + 1) : [];
  const [targetSpec, ...rest] = before;
  if (!targetSpec) throw new UsageError("no targets given");
  const wanted = { run: 0, call: 1, eval: 1, put: 2, get: 2 }[command] ?? 0;
  if (command === "run") {
    if (rest.length) throw new UsageError(`unexpected ${JSON.stringify(rest[0])}: the command goes after --`);
    if (!after.length) throw new UsageError("no command given after --");
  } else if (command === "call") {
    if (rest.length < 1 || rest.length > 2) throw new UsageError("call needs FILE#EXPORT and, optionally, JSON arguments");
  } else if (command === "eval") {
    if (rest.length < 1) throw new UsageError("eval needs an expression");
  } else if (rest.length !== wanted) throw new UsageError(`${command} needs ${COMMANDS[command]?.args.split("] ")[1] ?? ""}`);
  const forks = v.forks === undefined ? 10 : Number(v.forks);
  if (!Number.isInteger(forks) || forks < 1) throw new UsageError(`--forks must be a whole number from 1, not ${JSON.stringify(v.forks)}`);
  const timeout = v.timeout === undefined ? 60_000 : Number(v.timeout);
  if (!Number.isFinite(timeout) || timeout <= 0) throw new UsageError(`--timeout must be milliseconds above 0, not ${JSON.stringify(v.timeout)}`);
  if (v.runtime !== undefined && !/^(node|deno|auto|\/.+)$/.test(v.runtime))
    throw new UsageError(`--runtime must be node, deno, auto or a path, not ${JSON.stringify(v.runtime)}`);
  if (v.password && v["password-file"]) throw new UsageError("--password and --password-file: choose one");
  if (v.stdin && command !== "run") throw new UsageError("--stdin is for run: other commands read no input");
  if (v.gather && v.json) throw new UsageError("--gather prints text: it does not go with --json");
  if (!v.stdin) refuseInput(command);
  const input = v.stdin ? readInput() : undefined;
  return {
    targets: parseTargets(targetSpec),
    rest: command === "run" ? after : command === "eval" ? [rest.join(" ")] : rest,
    via: v.via ? parseTargets(v.via) : [],
    sudo: v.sudo ?? null,
    ...(v.user ? { user: v.user } : {}),
    ...(v.identity ? { identity: v.identity } : {}),
    ...(v["ssh-config"] ? { sshConfig: v["ssh-config"] } : {}),
    passwordPrompt: v.password ?? false,
    ...(v["password-file"] ? { passwordFile: v["password-file"] } : {}),
    ...(v.runtime ? { runtime: v.runtime } : {}),
    forks,
    timeout,
    checkHostKeys: v["check-host-keys"] ?? false,
    json: v.json ?? (!process.stdout.isTTY && !v.gather),
    serve: !v["no-serve"],
    ...(input ? { input } : {}),
    gather: v.gather ?? false,
    ...(v["output-dir"] ? { outputDir: v["output-dir"] } : {}),
  };
}

/** The most `--stdin` takes: it is held in memory and sent to every host. */
export const MAX_INPUT: number = 64 * 1024 * 1024;

/** `--stdin`: this process's stdin, read to its end; a UsageError past {@link MAX_INPUT} or from a terminal. */
function readInput(): Uint8Array {
  if (process.stdin.isTTY) throw new UsageError("--stdin reads stdin to its end, which is a terminal here: pipe or redirect the input");
  const parts: Buffer[] = [];
  let size = 0;
  for (;;) {
    const buf = Buffer.alloc(Math.min(1 << 20, MAX_INPUT + 1 - size));
    let n: number;
    try {
      n = readSync(0, buf, 0, buf.length, null);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "EAGAIN") continue; // a non-blocking stdin: wait for more
      if ((err as NodeJS.ErrnoException).code === "EOF") break;
      throw new UsageError(`cannot read stdin: ${reason(err)}`);
    }
    if (n === 0) break;
    parts.push(buf.subarray(0, n));
    size += n;
    if (size > MAX_INPUT) throw new UsageError(`--stdin takes at most ${MAX_INPUT} bytes (it is sent to every host); put bigger input on the hosts with put`);
  }
  return Buffer.concat(parts, size);
}

/**
 * Without `--stdin`: input waiting on stdin (a file with bytes, or a pipe with bytes already in it,
 * as `echo x | mitogen run ...` makes) is refused rather than dropped. A pipe no one has written to
 * yet (as a test harness leaves one) passes, and so does a socket (it cannot be looked into without
 * reading it): what they may carry later is not looked at.
 */
function refuseInput(command: string): void {
  if (process.stdin.isTTY) return;
  let waiting = false;
  try {
    const st = fstatSync(0);
    if (st.isFile()) waiting = st.size > 0;
    else if (st.isFIFO()) {
      // A second opening of the pipe, non-blocking: a byte there means someone piped input.
      const fd = openSync("/proc/self/fd/0", constants.O_RDONLY | constants.O_NONBLOCK);
      try {
        waiting = readSync(fd, Buffer.alloc(1), 0, 1, null) > 0;
      } catch {
        // EAGAIN: nothing in it
      } finally {
        closeSync(fd);
      }
    }
  } catch {
    return; // no stdin, or one that cannot be looked at: nothing to refuse
  }
  if (waiting) {
    const hint =
      command === "run"
        ? "give -I (--stdin) to send it to every host's command, or redirect stdin from /dev/null"
        : `${command} reads no input: redirect stdin from /dev/null`;
    throw new UsageError(`stdin holds input, which would be dropped: ${hint}`);
  }
}

/** Ask for a password on the terminal, without echo; once. */
function askPassword(prompt: string): Promise<string> {
  let fd: number;
  try {
    fd = openSync("/dev/tty", "r+");
  } catch {
    throw new UsageError("--password needs a terminal; use --password-file FILE");
  }
  const tty = new ReadStream(fd);
  tty.setRawMode(true); // no echo before the prompt shows: what is typed after it never appears
  process.stderr.write(prompt);
  return new Promise((resolvePw, reject) => {
    let pw = "";
    tty.on("data", (chunk: Buffer) => {
      for (const ch of chunk.toString("utf8")) {
        if (ch === "\r" || ch === "\n") {
          tty.setRawMode(false);
          tty.destroy();
          process.stderr.write("\n");
          resolvePw(pw);
          return;
        }
        if (ch === "\u0003") {
          tty.setRawMode(false);
          tty.destroy();
          process.stderr.write("\n");
          reject(new UsageError("interrupted"));
          return;
        }
        if (ch === "\u007f" || ch === "\b") pw = pw.slice(0, -1);
        else pw += ch;
      }
    });
  });
}

/** Most bytes kept of each stream a host prints (its command's stdout, stderr, and its contexts' output); the rest is counted. */
export const OUTPUT_CAP: number = 1024 * 1024;
/** How long a stopped command (a timeout, a signal) has to end, its output read to the end, before its host's record is written. */
const STOP_GRACE = 5000;
/** Exit status for each signal that stops the command: 128 + its number. */
const SIGNALS = { SIGINT: 130, SIGTERM: 143, SIGHUP: 129 } as const;
type StopSignal = keyof typeof SIGNALS;

/** Text kept up to {@link OUTPUT_CAP} bytes, the rest counted; `text()` ends with a note of how much was cut. */
class Capped {
  readonly #parts: Uint8Array[] = [];
  #size = 0;
  #cut = 0;
  #lastByte = 10;
  static readonly #encoder = new TextEncoder();
  static readonly #decoder = new TextDecoder();

  add(chunk: Uint8Array | string): void {
    const bytes = typeof chunk === "string" ? Capped.#encoder.encode(chunk) : chunk;
    if (this.#cut || this.#size + bytes.byteLength > OUTPUT_CAP) this.#cut += bytes.byteLength;
    else {
      this.#parts.push(bytes);
      this.#size += bytes.byteLength;
      if (bytes.byteLength) this.#lastByte = bytes[bytes.byteLength - 1] as number;
    }
  }

  get empty(): boolean {
    return this.#size === 0 && this.#cut === 0;
  }

  text(): string {
    const note = this.#cut ? `${this.#lastByte === 10 ? "" : "\n"}[mitogen: ${this.#cut} more bytes cut; ${OUTPUT_CAP} kept]\n` : "";
    return Capped.#decoder.decode(joinParts(this.#parts, this.#size)) + note;
  }
}

/** Read a Receiver of raw chunks to its end into `into`. */
async function collect(recv: Receiver, into: Capped): Promise<void> {
  for await (const msg of recv) {
    const chunk = msg.unpickle();
    if (chunk instanceof Uint8Array) into.add(chunk);
  }
}

/** Resolves after `ms`, or at once when `signal` aborts; its timer goes either way. */
function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** What one host's action gives back (its record, less the host and time). */
type Outcome = Omit<HostResult, "host" | "ms">;

/**
 * Run `command` in `ctx` through mitogen:tunnel, with `input` (or none); its status and output. When
 * `signal` aborts (a timeout, an interrupt) the call is cancelled, which kills the command's
 * process group there; this waits (up to {@link STOP_GRACE}) for its output to end, so what it
 * printed so far is kept, then rejects with the signal's reason carrying that output.
 */
async function runIn(router: Router, ctx: Context, command: string, timeout: number, signal: AbortSignal, input?: Uint8Array): Promise<Outcome> {
  const out = new Receiver(router, { respondent: ctx });
  const err = new Receiver(router, { respondent: ctx });
  const ctl = new Receiver(router, { respondent: ctx });
  const stdout = new Capped();
  const stderr = new Capped();
  const output = Promise.all([collect(out, stdout), collect(err, stderr)]);
  output.catch(() => {});
  try {
    const call = callExec(ctx.with({ timeout, signal }), { command, ctl: ctl.toSender(), stdout: out.toSender(), stderr: err.toSender() });
    void ctl.getData().then(
      async (ready) => {
        const stdin = (ready as { ready: Sender }).ready;
        // Blocks of at most 1 MiB, each as the window allows; then EOF.
        for (let at = 0; input && at < input.byteLength; at += 1 << 20) await stdin.send(input.subarray(at, at + (1 << 20)));
        stdin.close();
      },
      () => {},
    );
    try {
      const [result] = await Promise.all([call, output]);
      // Killed by a signal: 128 + its number, as a shell (and a command run over ssh) says it.
      const signalled = result.signal ? 128 + ((os.signals as Record<string, number>)[result.signal] ?? 0) : null;
      return { ok: result.code === 0, exitCode: result.code ?? signalled, stdout: stdout.text(), stderr: stderr.text() };
    } catch (e) {
      if (!signal.aborted) throw e;
      // Cancelled: the command's group is being killed there; its pipes close once it has gone.
      await Promise.race([output, pause(STOP_GRACE)]);
      throw new Stopped(signal.reason, { exitCode: null, stdout: stdout.text(), stderr: stderr.text() });
    }
  } finally {
    out.close();
    err.close();
    ctl.close();
  }
}

/**
 * `run` on a plain ssh target: the command over ssh itself, with no context (sshexec.ts), at
 * pdsh's cost; the same record as {@link runIn}'s, and stopped the same way.
 */
async function runOverSsh(options: SshOptions, command: string, timeout: number, signal: AbortSignal): Promise<Outcome> {
  const stdout = new Capped();
  const stderr = new Capped();
  try {
    const code = await sshExec(options, command, { connectTimeout: timeout, signal, stdout: (c) => stdout.add(c), stderr: (c) => stderr.add(c) });
    return { ok: code === 0, exitCode: code, stdout: stdout.text(), stderr: stderr.text() };
  } catch (e) {
    if (!signal.aborted) throw e;
    throw new Stopped(signal.reason, { exitCode: null, stdout: stdout.text(), stderr: stderr.text() });
  }
}

/** An action ended by its host's timeout or an interrupt, with what it had printed. */
class Stopped extends Error {
  override name = "Stopped";
  readonly outcome: Partial<Outcome>;
  constructor(cause: unknown, outcome: Partial<Outcome>) {
    super(reason(cause), { cause });
    this.outcome = outcome;
  }
}

/** Why a host was stopped: its `--timeout`, or a signal to the CLI. */
class Interrupted extends Error {
  override name = "Interrupted";
  readonly signal: StopSignal;
  constructor(signal: StopSignal) {
    super(`interrupted (${signal})`);
    this.signal = signal;
  }
}

/**
 * The context's output so far, marked: under `mitogen serve` a context is not shut down after the
 * command, so its pipes are not read to the end, and what it printed travels on them (to the parent
 * reading its stdout and stderr) apart from the reply. After the call, in the same chain (so after
 * it ends, failed or not), the context writes the mark to its stdout and to its stderr; once both
 * have come (see HostLogs), so has what it printed before them.
 */
class Flush {
  sent = false;
  readonly mark: string;
  constructor(mark: string) {
    this.mark = mark;
  }

  /** Send the mark behind `chain`'s calls so far. */
  after(chain: CallChain): void {
    chain.reset();
    chain.callNoReply(writeMark, this.mark);
    this.sent = true;
  }
}

/** Runs in the context: `mark` and a newline to stdout and to stderr (under Deno its stdout goes to stderr: two there). */
function writeMark(mark: string): void {
  const line = `${mark}\n`;
  const deno = (globalThis as { Deno?: { stdout: { writeSync(b: Uint8Array): number }; stderr: { writeSync(b: Uint8Array): number } } }).Deno;
  if (deno) {
    const bytes = new TextEncoder().encode(line);
    deno.stdout.writeSync(bytes);
    deno.stderr.writeSync(bytes);
  } else {
    process.stdout.write(line);
    process.stderr.write(line);
  }
}

type Action = (router: Router, ctx: Context, target: Target, signal: AbortSignal, flush: Flush | null) => Promise<Outcome>;

function action(command: string, p: Parsed): Action {
  const [a, b] = p.rest;
  switch (command) {
    case "run": {
      const line = p.rest.join(" ");
      return (router, ctx, _t, signal) => runIn(router, ctx, line, p.timeout, signal, p.input);
    }
    case "call": {
      const [file, name] = (a as string).split("#");
      if (!file || !name) throw new UsageError(`call needs FILE#EXPORT, not ${JSON.stringify(a)}`);
      let args: unknown[] = [];
      if (b !== undefined) {
        try {
          const v = JSON.parse(b) as unknown;
          args = Array.isArray(v) ? v : [v];
        } catch (err) {
          throw new UsageError(`JSON_ARGS is not JSON: ${(err as Error).message}`);
        }
      }
      const url = pathToFileURL(resolve(file));
      return async (_router, ctx, _t, signal, flush) => {
        const chain = ctx.with({ timeout: p.timeout, signal }).chain();
        const mod = (await chain.import<Record<string, (...x: unknown[]) => Promise<unknown>>>(url)) as Record<string, unknown>;
        const fn = mod[name];
        if (typeof fn !== "function") throw new Error(`${file} has no exported function ${name}`);
        const result = (fn as (...x: unknown[]) => Promise<unknown>)(...args);
        flush?.after(chain);
        return { ok: true, result: await result };
      };
    }
    case "eval":
      return async (_router, ctx, _t, signal, flush) => {
        const chain = ctx.with({ timeout: p.timeout, signal }).chain();
        const result = chain.call((code: string) => new Function(`return (${code}\n)`)(), a as string);
        flush?.after(chain);
        return { ok: true, result: await result };
      };
    case "put":
      return async (_router, ctx, _t, signal) => {
        const r = await ctx.putFile(a as string, b as string, { signal });
        return { ok: true, result: { bytes: r.bytes, sha256: r.sha256 } };
      };
    case "get":
      return async (_router, ctx, target, signal) => {
        const dir = join(b as string, target.label.replace(/[/\\]/g, "_"));
        mkdirSync(dir, { recursive: true });
        const r = await ctx.getFile(a as string, join(dir, basename(a as string)), { signal });
        return { ok: true, result: { bytes: r.bytes, sha256: r.sha256, path: join(dir, basename(a as string)) } };
      };
    default:
      throw new UsageError(`unknown command ${command}`);
  }
}

type State = "queued" | "connecting" | "running" | "ok" | "failed" | "interrupted";

const SPINNER = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];

/** The terminal's live list: one line per host, redrawn in place (log-update, loaded only for it). */
class LiveList {
  readonly #rows: { label: string; state: State; t0: number; ms?: number; note?: string }[];
  #frame = 0;
  readonly #timer: ReturnType<typeof setInterval>;
  readonly #width: number;
  readonly #update: ReturnType<typeof createLogUpdate>;

  /** Load log-update (its string-width makes an `Intl.Segmenter` as it loads, 10-15 ms) and draw the list. */
  static async open(targets: Target[]): Promise<LiveList> {
    return new LiveList(targets, (await import("log-update")).createLogUpdate);
  }

  private constructor(targets: Target[], create: typeof createLogUpdate) {
    // A terminal that reports no size (0 rows, as under `script`) still gets the whole list.
    const out = process.stdout;
    const sized = new Proxy(out, {
      get(target, key) {
        if (key === "rows") return target.rows || targets.length + 1;
        if (key === "columns") return target.columns || 120;
        const v = Reflect.get(target, key) as unknown;
        return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
    this.#update = create(sized);
    this.#rows = targets.map((t) => ({ label: t.label, state: "queued" as State, t0: 0 }));
    this.#width = Math.max(...targets.map((t) => t.label.length), 4);
    this.#timer = setInterval(() => this.draw(), 80);
    this.draw();
  }

  set(i: number, state: State, note?: string): void {
    const row = this.#rows[i];
    if (!row) return;
    if (state === "connecting") row.t0 = performance.now();
    if (state === "ok" || state === "failed" || state === "interrupted") row.ms = row.t0 ? performance.now() - row.t0 : 0;
    row.state = state;
    if (note !== undefined) row.note = note;
    this.draw();
  }

  draw(): void {
    this.#frame = (this.#frame + 1) % SPINNER.length;
    const lines = this.#rows.map((r) => {
      const mark = r.state === "ok" ? "✔" : r.state === "failed" || r.state === "interrupted" ? "✖" : r.state === "queued" ? " " : SPINNER[this.#frame];
      const secs = r.state === "queued" ? "" : `${(((r.ms ?? performance.now() - r.t0) as number) / 1000).toFixed(1)}s`;
      const note = r.note ? `  ${r.note.split("\n")[0]?.slice(0, 100)}` : "";
      return `${mark} ${r.label.padEnd(this.#width)}  ${r.state.padEnd(11)} ${secs.padStart(6)}${note}`;
    });
    this.#update(lines.join("\n"));
  }

  done(): void {
    clearInterval(this.#timer);
    this.draw();
    this.#update.done();
  }
}

/** What one host's record shows as text, each line after `prefix` (`web1: `, or none when gathered). */
function hostText(r: HostResult, prefix: string, exitCode = false): string {
  const prefixed = (out: string, head: string) => `${out.replace(/\n$/, "").replace(/^/gm, head)}\n`;
  let text = "";
  if (r.output) text += prefixed(r.output, `${prefix}(output) `);
  if (r.stdout) text += prefixed(r.stdout, prefix);
  if (r.stderr) text += prefixed(r.stderr, `${prefix}(stderr) `);
  if (r.result !== undefined) text += `${prefix}${JSON.stringify(r.result)}\n`;
  if (r.error) text += `${prefix}${r.interrupted ? "" : "error: "}${r.error}\n`;
  if (exitCode && r.exitCode !== undefined && r.exitCode !== 0) text += `${prefix}(exit ${r.exitCode})\n`;
  return text;
}

/** `--gather`: each distinct output once, under the hosts that gave it (as clush -b, dshbak -c), the most common first. */
function gathered(results: HostResult[]): string {
  const groups = new Map<string, string[]>();
  for (const r of results) {
    const text = hostText(r, "", true) || "(no output)\n";
    const hosts = groups.get(text);
    if (hosts) hosts.push(r.host);
    else groups.set(text, [r.host]);
  }
  let out = "";
  for (const [text, hosts] of [...groups].sort((a, b) => b[1].length - a[1].length)) {
    const head = `${hosts.join(",")} (${hosts.length})`;
    const rule = "-".repeat(Math.min(Math.max(head.length, 16), 80));
    out += `${rule}\n${head}\n${rule}\n${text}`;
  }
  return out;
}

/** `--output-dir`: the host's stdout, stderr (with what its contexts printed) and result, each in a file of its own. */
function writeHostFiles(dir: string, r: HostResult): void {
  const base = join(dir, r.host.replace(/[/\\]/g, "_"));
  writeFileSync(`${base}.stdout`, r.stdout ?? "");
  writeFileSync(`${base}.stderr`, `${r.output ?? ""}${r.stderr ?? ""}${r.error ? `mitogen: ${r.error}\n` : ""}`);
  if (r.result !== undefined) writeFileSync(`${base}.result`, `${JSON.stringify(r.result)}\n`);
}

/** The message of a failure, as the library words it. */
function reason(err: unknown): string {
  // ssh ends its lines with \r\n when it has a terminal: none of that in a record.
  return (err instanceof Error ? err.message : String(err)).replace(/\r+(?=\n|$)/g, "");
}

/** The most bytes a --password-file may hold. */
const MAX_PASSWORD_FILE = 64 * 1024;

/** The password in `path` (its last newline dropped): a regular file no group or other may read or write, as ssh wants of a key. */
function readPasswordFile(path: string): string {
  const open = (st: Stats) =>
    st.mode & 0o077
      ? `--password-file ${path} is open to group or others (mode ${(st.mode & 0o777).toString(8).padStart(4, "0")}): a password file must be for its owner only (chmod 600 ${path})`
      : null;
  return readSmallFile(path, "--password-file", MAX_PASSWORD_FILE, "is it a password?", open).replace(/\r?\n$/, "");
}

/** A host's `output` without the lines its `error` already says (ssh's complaint, which a failed start quotes), or undefined if none is left. */
function besideError(output: string | undefined, error: string | undefined): string | undefined {
  if (output === undefined || !error) return output;
  const said = (line: string) => {
    const text = line.replace(/^[\w.-]+: /, "").trim();
    return text !== "" && error.includes(text);
  };
  const text = output
    .split("\n")
    .filter((l) => !said(l))
    .join("\n");
  return text.trim() ? text : undefined;
}

/**
 * Where the log records of the run go: each to the host whose context (or one below it) made it,
 * kept to {@link OUTPUT_CAP} bytes per host; a record of no host still running (a `--via` hop, a
 * host already written) to stderr, to {@link OUTPUT_CAP} bytes in all. Debug records only with
 * MITOGEN_LOG=debug. Nothing is kept beyond those bounds, however much a target prints.
 */
class HostLogs {
  readonly #byName = new Map<string, number>();
  readonly #open: (Capped | null)[];
  #stray = 0;
  #strayCut = 0;
  readonly #debug = levelFromEnv() === "debug";

  /** Per host, the {@link Flush} marks come so far, and who waits for both. */
  readonly #marks: { seen: number; wake?: () => void }[];

  /** What the contexts write to say their output so far has come (see {@link Flush}). */
  readonly mark: string;

  constructor(targets: Target[]) {
    this.mark = `mitogen:flushed:${randomBytes(12).toString("hex")}`;
    targets.forEach((t, i) => {
      this.#byName.set(t.label, i);
      this.#byName.set(`${t.label}:sudo`, i);
    });
    this.#open = targets.map(() => new Capped());
    this.#marks = targets.map(() => ({ seen: 0 }));
  }

  /** Resolves once host `i`'s context has written {@link mark} to its stdout and stderr and both have come. */
  flushed(i: number): Promise<void> {
    const m = this.#marks[i];
    if (!m || m.seen >= 2) return Promise.resolve();
    return new Promise((resolve) => (m.wake = resolve));
  }

  readonly sink = (r: LogRecord): void => {
    if (r.level === "debug" && !this.#debug) return;
    const path = Array.isArray(r.path) ? r.path : [];
    let host: number | undefined;
    for (let j = path.length - 1; j >= 0 && host === undefined; j--) host = this.#byName.get(path[j] as string);
    const output = r.source === "stdout" || r.source === "stderr";
    let message = r.message;
    const m = host === undefined ? undefined : this.#marks[host];
    const marked = output ? /mitogen:flushed:[0-9a-f]{24}$/.exec(message) : null;
    if (marked) {
      // A mark (after a line left unfinished, if any): not kept, and counted if ours (another command's
      // comes here when the two share the server's context).
      if (m && marked[0] === this.mark && ++m.seen >= 2) m.wake?.();
      message = message.slice(0, marked.index);
      if (!message) return;
    }
    const line = output ? `${message}\n` : `[${r.level}] ${message}\n`;
    const into = host === undefined ? null : this.#open[host];
    if (into) {
      into.add(line);
      return;
    }
    // No host is collecting it: straight to stderr, bounded.
    const text = `mitogen: ${path.slice(1).join(" -> ") || r.name}: ${line}`;
    if (this.#stray + text.length > OUTPUT_CAP) this.#strayCut += text.length;
    else {
      this.#stray += text.length;
      process.stderr.write(text);
    }
  };

  /** Host `i`'s output so far, its buffer released; later records of it go to stderr. */
  take(i: number): string | undefined {
    const c = this.#open[i];
    this.#open[i] = null;
    return c && !c.empty ? c.text() : undefined;
  }

  /** Say how much stderr output was cut, if any. */
  end(): void {
    if (this.#strayCut) process.stderr.write(`mitogen: ${this.#strayCut} more bytes of log output cut\n`);
  }
}

/** Run `mitogen <command> ...argv`; resolves with the exit status. */
export async function runCommand(command: string, argv: string[]): Promise<number> {
  let p: Parsed | "help";
  let act: Action;
  try {
    p = parse(command, argv);
    if (p === "help") {
      process.stdout.write(usage(command));
      return 0;
    }
    act = action(command, p);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`mitogen ${command}: ${err.message}\n\n${usage(command)}`);
    return 2;
  }
  const opts = p;
  let password: string | undefined;
  try {
    if (opts.outputDir) mkdirSync(opts.outputDir, { recursive: true });
    if (opts.passwordFile) password = readPasswordFile(opts.passwordFile);
    else if (opts.passwordPrompt) password = await askPassword("password: ");
  } catch (err) {
    process.stderr.write(`mitogen ${command}: ${reason(err)}\n`);
    return 2;
  }
  // SIGINT, SIGTERM, SIGHUP: stop every host's command (its process group is killed there), write a
  // record for each host, exit 128 + the signal's number. A second one exits at once.
  const stop = new AbortController();
  setMaxListeners(0, stop.signal); // one listener per host running, --forks of them: no leak
  let stoppedBy: StopSignal | null = null;
  let hard: ReturnType<typeof setTimeout> | undefined;
  const onSignal = (sig: StopSignal) => {
    if (stoppedBy) process.exit(SIGNALS[stoppedBy]);
    stoppedBy = sig;
    stop.abort(new Interrupted(sig));
    // Whatever happens, this process ends: the hosts had their grace, shutting down has its own bound.
    hard = setTimeout(() => process.exit(SIGNALS[sig]), STOP_GRACE + 10_000);
    hard.unref?.();
  };
  const handlers = Object.keys(SIGNALS).map((sig) => [sig, () => onSignal(sig as StopSignal)] as const);
  for (const [sig, h] of handlers) process.on(sig, h);
  try {
    const failed = await runHosts(command, opts, act, password, stop.signal);
    if (stoppedBy) return SIGNALS[stoppedBy];
    return failed ? 1 : 0;
  } finally {
    for (const [sig, h] of handlers) process.off(sig, h);
    clearTimeout(hard);
  }
}

/** Run `act` on every target, `forks` at a time, writing each host's record; resolves with how many failed. */
async function runHosts(command: string, opts: Parsed, act: Action, password: string | undefined, stop: AbortSignal): Promise<number> {
  const logs = new HostLogs(opts.targets);
  // With a `mitogen serve` running, its contexts (serve.ts): got per target spec and given back, not started and shut down here.
  await using server = opts.serve ? await attach(logs.sink) : null;
  await using own = server ? null : new Router({ log: logs.sink });
  const router = server?.router ?? (own as Router);
  // The live list is for a terminal; text to a pipe (--gather) is only the end's.
  const live = opts.json || !process.stdout.isTTY ? null : await LiveList.open(opts.targets);
  // With --json a record is written as it comes and only what the summary needs is kept.
  const results: HostResult[] = new Array(opts.targets.length);
  const sshOptions = (t: Target, via: Context | undefined) => ({
    hostname: t.host,
    name: t.label,
    connectTimeout: opts.timeout,
    checkHostKeys: opts.checkHostKeys ? ("enforce" as const) : ("accept" as const),
    ...((t.user ?? opts.user) ? { username: (t.user ?? opts.user) as string } : {}),
    ...(t.port ? { port: t.port } : {}),
    ...(opts.identity ? { identityFile: opts.identity } : {}),
    ...(password !== undefined ? { password } : {}),
    ...(opts.runtime ? { runtime: opts.runtime } : {}),
    ...(via ? { via } : opts.sshConfig ? { sshArgs: ["-F", opts.sshConfig] } : {}),
  });
  const connect = async (t: Target, via: Context | undefined): Promise<Context> =>
    t.local
      ? router.local({ name: t.label, ...(opts.runtime && opts.runtime !== "auto" ? { runtime: opts.runtime } : {}), ...(via ? { via } : {}) })
      : router.ssh(sshOptions(t, via));
  // A target as the server's spec: the same options, less the per-command connect timeout, paths made absolute.
  const specOf = (t: Target, via: ContextSpec | undefined): ContextSpec => {
    const { connectTimeout: _, sshArgs: _args, identityFile, ...rest } = sshOptions(t, undefined) as Record<string, unknown>;
    const options = t.local
      ? { name: t.label, ...(opts.runtime && opts.runtime !== "auto" ? { runtime: opts.runtime } : {}) }
      : {
          ...rest,
          ...(typeof identityFile === "string" ? { identityFile: resolve(identityFile) } : {}),
          ...(!via && opts.sshConfig ? { sshArgs: ["-F", resolve(opts.sshConfig)] } : {}),
        };
    return { method: t.local ? "local" : "ssh", options: { ...options, ...(via ? { via } : {}) } };
  };
  let viaSpec: ContextSpec | undefined;
  for (const hop of opts.via) viaSpec = specOf(hop, viaSpec);
  // The bastions, once, in order; a failure there fails every target with its reason.
  let via: Promise<Context | undefined> = Promise.resolve(undefined);
  if (server && viaSpec) via = server.acquire(viaSpec, stop);
  else if (!server) for (const hop of opts.via) via = via.then((prev) => connect(hop, prev));
  via.catch(() => {});
  // `run` needs no context where there is no hop, sudo, input, password, server or asked-for runtime: plain ssh does it.
  const overSsh =
    command === "run" && !server && !opts.via.length && !opts.sudo && !opts.input && password === undefined && !opts.runtime ? opts.rest.join(" ") : null;
  let next = 0;
  const one = async (i: number, t: Target): Promise<HostResult> => {
    const t0 = performance.now();
    const ms = () => Math.round(performance.now() - t0);
    if (stop.aborted) return { host: t.label, ok: false, interrupted: true, error: `${reason(stop.reason)} before it started`, ms: 0 };
    live?.set(i, "connecting");
    // This host's stop: its timeout (connecting included), or the CLI's.
    const mine = new AbortController();
    const onStop = () => mine.abort(stop.reason);
    stop.addEventListener("abort", onStop, { once: true });
    const timer = setTimeout(() => mine.abort(new TimeoutError(`timed out after ${opts.timeout} ms`)), opts.timeout);
    let ctx: Context | undefined;
    const held: Context[] = [];
    let acting = false;
    const flush = server ? new Flush(logs.mark) : null;
    let answered = false;
    try {
      const job = (async () => {
        if (overSsh !== null && !t.local) {
          live?.set(i, "running");
          acting = true;
          return runOverSsh(sshOptions(t, undefined), overSsh, opts.timeout, mine.signal);
        }
        const hop = await via.catch((err: unknown) => {
          throw new Error(`via ${opts.via.map((v) => v.label).join(",")}: ${reason(err)}`);
        });
        let c = server ? await server.acquire(specOf(t, viaSpec), mine.signal) : await connect(t, hop);
        ctx = c;
        const sudo = { username: opts.sudo as string, name: `${t.label}:sudo`, ...(password !== undefined ? { password } : {}) };
        // An ssh context is handed out before it has connected: a failed start fails what is done with it, with
        // its own error, which is what this host reports, whichever step meets it first.
        const started = c.connected();
        const unless = <T>(step: Promise<T>) => Promise.race([step, started.then(() => step)]);
        if (opts.sudo && server) {
          c = await server.acquire({ method: "sudo", options: { ...sudo, via: specOf(t, viaSpec) } }, mine.signal);
          held.push(c);
        } else if (opts.sudo) c = await unless(router.sudo({ ...sudo, via: c, connectTimeout: opts.timeout }));
        if (mine.signal.aborted) throw mine.signal.reason;
        started.then(
          () => {
            live?.set(i, "running");
            acting = true;
          },
          () => {},
        );
        const acted = act(router, c, t, mine.signal, flush);
        // A reply, or the call's own failure, came: so does the mark, if sent (not on a timeout or a lost context).
        acted.then(
          () => (answered = true),
          (err: unknown) => (answered = err instanceof CallError),
        );
        return unless(acted);
      })();
      job.catch(() => {});
      // Connecting is left behind at once when stopped (shutting the router down ends it); `run` ends its command first.
      const stopped = new Promise<never>((_, reject) => {
        const go = () => {
          if (!(acting && command === "run")) reject(mine.signal.reason);
        };
        if (mine.signal.aborted) go();
        else mine.signal.addEventListener("abort", go, { once: true });
      });
      stopped.catch(() => {});
      const r = await Promise.race([job, stopped]);
      return { host: t.label, ...r, ms: ms() };
    } catch (err) {
      const why = err instanceof Stopped ? err.cause : mine.signal.aborted ? mine.signal.reason : err;
      return {
        host: t.label,
        ok: false,
        ...(err instanceof Stopped ? err.outcome : {}),
        ...(why instanceof Interrupted ? { interrupted: true } : {}),
        error: reason(why),
        ms: ms(),
      };
    } finally {
      clearTimeout(timer);
      stop.removeEventListener("abort", onStop);
      // Its context goes now, so that everything it printed has arrived (its pipes are read to the end) before its record is written.
      // The server's stays: what it printed has come once its marks have (see Flush).
      if (flush?.sent && answered) await Promise.race([logs.flushed(i), pause(STOP_GRACE)]);
      if (server && ctx) {
        const back = [...held.reverse(), ctx].map((c) => server.release(c).catch(() => {}));
        await Promise.race([Promise.all(back), pause(STOP_GRACE)]);
      } else if (ctx) await Promise.race([ctx.shutdown({ wait: true }).catch(() => {}), pause(STOP_GRACE)]);
    }
  };
  let failed = 0;
  let interrupted = 0;
  let slowest: { host: string; ms: number } | null = null;
  const worker = async () => {
    for (;;) {
      const i = next++;
      const t = opts.targets[i];
      if (!t) return;
      const result = await one(i, t);
      const output = besideError(logs.take(i), result.error);
      if (output !== undefined) result.output = output;
      if (!result.ok) failed++;
      if (result.interrupted) interrupted++;
      if (!slowest || result.ms > slowest.ms) slowest = { host: result.host, ms: result.ms };
      live?.set(
        i,
        result.interrupted ? "interrupted" : result.ok ? "ok" : "failed",
        result.ok ? (result.exitCode !== undefined ? `exit ${result.exitCode}` : "") : (result.error ?? `exit ${result.exitCode}`),
      );
      if (opts.outputDir) writeHostFiles(opts.outputDir, result);
      if (opts.json) process.stdout.write(`${JSON.stringify(result)}\n`);
      else results[i] = result;
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.forks, opts.targets.length) }, worker));
  live?.done();
  if (!opts.json) {
    if (opts.gather) process.stdout.write(gathered(results));
    else for (const r of results) process.stdout.write(hostText(r, `${r.host}: `));
    const s = slowest as { host: string; ms: number } | null;
    const parts = [`${opts.targets.length - failed} ok`, `${failed - interrupted} failed`, ...(interrupted ? [`${interrupted} interrupted`] : [])];
    process.stdout.write(`\n${parts.join(", ")}${s ? `; slowest ${s.host} (${(s.ms / 1000).toFixed(1)} s)` : ""}\n`);
  }
  logs.end();
  return failed;
}
