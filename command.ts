/**
 * `mitogen run|call|eval|put|get TARGETS ...`: one thing across many hosts,
 * through bastions and sudo, with a live per-host list on a terminal and
 * JSON lines otherwise. cli.ts dispatches here.
 *
 * @module
 */
import { mkdirSync, openSync, readFileSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { ReadStream } from "node:tty";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import type { createLogUpdate } from "log-update";
import { type Context, type LogRecord, Receiver, Router, type Sender } from "./mod.ts";
import { joinParts } from "./runtime.ts";
import type { ExecResult } from "./tunnel.ts";

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
  --runtime node|deno|auto  the runtime on the targets (default auto)
  --forks N                 hosts at a time (default 10)
  --timeout MS              per host, connecting included (default 60000)
  --check-host-keys         refuse unknown host keys (default: learn new ones, refuse changed)
  --json                    one JSON object per host per line (the default when stdout is not a terminal)
  -h, --help                this text`;

/** The commands, their argument shapes and help. */
export const COMMANDS: Record<string, { args: string; summary: string }> = {
  run: { args: "TARGETS [options] -- COMMAND...", summary: "run a shell command on each target: exit code, stdout and stderr per host" },
  call: { args: "TARGETS [options] FILE#EXPORT [JSON_ARGS]", summary: "call an exported function of a module (shipped with ctx.import) on each target" },
  eval: { args: "TARGETS [options] EXPR", summary: "evaluate a JavaScript expression on each target" },
  put: { args: "TARGETS [options] SRC DST", summary: "copy a local file to DST on each target" },
  get: { args: "TARGETS [options] SRC DSTDIR", summary: "copy SRC from each target to DSTDIR/<host>/<name>" },
};

/** The help of `command`. */
export function usage(command: string): string {
  const c = COMMANDS[command];
  return c ? `usage: mitogen ${command} ${c.args}\n\n${c.summary}\n\n${COMMON_HELP}\n` : "";
}

/** Parse a target list: commas, `@file` lines, `local`, `[user@]host[:port]` (IPv6 in brackets). */
export function parseTargets(spec: string, readFile: (path: string) => string = (p) => readFileSync(p, "utf8")): Target[] {
  const out: Target[] = [];
  for (const item of spec.split(",").map((s) => s.trim())) {
    if (!item) continue;
    if (item.startsWith("@")) {
      const text = readFile(item.slice(1));
      for (const line of text.split("\n")) {
        const t = line.replace(/#.*/, "").trim();
        if (t) out.push(...parseTargets(t, readFile));
      }
      continue;
    }
    if (item === "local") {
      out.push({ label: "local", local: true, host: "local" });
      continue;
    }
    const m = /^(?:([^@]+)@)?(\[[^\]]+\]|[^:@]+)(?::(\d+))?$/.exec(item);
    if (!m) throw new UsageError(`bad target ${JSON.stringify(item)}: expected [user@]host[:port], @FILE or local`);
    const host = (m[2] as string).replace(/^\[(.*)\]$/, "$1");
    out.push({ label: item, local: false, host, ...(m[1] ? { user: m[1] } : {}), ...(m[3] ? { port: Number(m[3]) } : {}) });
  }
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
    json: v.json ?? !process.stdout.isTTY,
  };
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

const OUTPUT_CAP = 1024 * 1024;
const text = new TextDecoder();

/** Collect what a Receiver of raw chunks gets, up to the cap. */
async function collect(recv: Receiver): Promise<string> {
  const parts: Uint8Array[] = [];
  let size = 0;
  let cut = false;
  for await (const msg of recv) {
    const chunk = msg.unpickle();
    if (!(chunk instanceof Uint8Array)) continue;
    if (size + chunk.byteLength > OUTPUT_CAP) cut = true;
    else {
      parts.push(chunk);
      size += chunk.byteLength;
    }
  }
  return text.decode(joinParts(parts, size)) + (cut ? `\n[mitogen: output cut at ${OUTPUT_CAP} bytes]\n` : "");
}

/** Run `command` in `ctx` through mitogen:tunnel, with no input; its status and output. */
async function runIn(router: Router, ctx: Context, command: string, timeout: number): Promise<{ exitCode: number | null; stdout: string; stderr: string }> {
  const out = new Receiver(router, { respondent: ctx });
  const err = new Receiver(router, { respondent: ctx });
  const ctl = new Receiver(router, { respondent: ctx });
  try {
    const call = ctx
      .with({ timeout })
      .callModule("mitogen:tunnel", "exec", { command, ctl: ctl.toSender(), stdout: out.toSender(), stderr: err.toSender() }) as Promise<ExecResult>;
    call.catch(() => {});
    void ctl.getData().then(
      (ready) => (ready as { ready: Sender }).ready.close(),
      () => {},
    );
    const [result, stdout, stderr] = await Promise.all([call, collect(out), collect(err)]);
    return { exitCode: result.code ?? (result.signal ? 128 : null), stdout, stderr };
  } finally {
    out.close();
    err.close();
    ctl.close();
  }
}

type Action = (router: Router, ctx: Context, target: Target) => Promise<Omit<HostResult, "host" | "ms">>;

function action(command: string, p: Parsed): Action {
  const [a, b] = p.rest;
  switch (command) {
    case "run": {
      const line = p.rest.join(" ");
      return async (router, ctx) => {
        const r = await runIn(router, ctx, line, p.timeout);
        return { ok: r.exitCode === 0, ...r };
      };
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
      return async (_router, ctx) => {
        const mod = (await ctx.with({ timeout: p.timeout }).import<Record<string, (...x: unknown[]) => Promise<unknown>>>(url)) as Record<string, unknown>;
        const fn = mod[name];
        if (typeof fn !== "function") throw new Error(`${file} has no exported function ${name}`);
        return { ok: true, result: await (fn as (...x: unknown[]) => Promise<unknown>)(...args) };
      };
    }
    case "eval":
      return async (_router, ctx) => ({
        ok: true,
        result: await ctx.with({ timeout: p.timeout }).call((code: string) => new Function(`return (${code}\n)`)(), a as string),
      });
    case "put":
      return async (_router, ctx) => {
        const r = await ctx.putFile(a as string, b as string);
        return { ok: true, result: { bytes: r.bytes, sha256: r.sha256 } };
      };
    case "get":
      return async (_router, ctx, target) => {
        const dir = join(b as string, target.label.replace(/[/\\]/g, "_"));
        mkdirSync(dir, { recursive: true });
        const r = await ctx.getFile(a as string, join(dir, basename(a as string)));
        return { ok: true, result: { bytes: r.bytes, sha256: r.sha256, path: join(dir, basename(a as string)) } };
      };
    default:
      throw new UsageError(`unknown command ${command}`);
  }
}

type State = "queued" | "connecting" | "running" | "ok" | "failed";

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
    if (state === "ok" || state === "failed") row.ms = performance.now() - row.t0;
    row.state = state;
    if (note !== undefined) row.note = note;
    this.draw();
  }

  draw(): void {
    this.#frame = (this.#frame + 1) % SPINNER.length;
    const lines = this.#rows.map((r) => {
      const mark = r.state === "ok" ? "✔" : r.state === "failed" ? "✖" : r.state === "queued" ? " " : SPINNER[this.#frame];
      const secs = r.state === "queued" ? "" : `${(((r.ms ?? performance.now() - r.t0) as number) / 1000).toFixed(1)}s`;
      const note = r.note ? `  ${r.note.split("\n")[0]?.slice(0, 100)}` : "";
      return `${mark} ${r.label.padEnd(this.#width)}  ${r.state.padEnd(10)} ${secs.padStart(6)}${note}`;
    });
    this.#update(lines.join("\n"));
  }

  done(): void {
    clearInterval(this.#timer);
    this.draw();
    this.#update.done();
  }
}

/** The message of a failure, as the library words it. */
function reason(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
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
    if (opts.passwordFile) password = readFileSync(opts.passwordFile, "utf8").replace(/\r?\n$/, "");
    else if (opts.passwordPrompt) password = await askPassword("password: ");
  } catch (err) {
    process.stderr.write(`mitogen ${command}: ${reason(err)}\n`);
    return 2;
  }
  const logs: LogRecord[] = [];
  await using router = new Router({ log: (r) => void logs.push(r) });
  const live = opts.json ? null : await LiveList.open(opts.targets);
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
  // The bastions, once, in order; a failure there fails every target with its reason.
  let via: Promise<Context | undefined> = Promise.resolve(undefined);
  for (const hop of opts.via) via = via.then((prev) => connect(hop, prev));
  via.catch(() => {});
  let next = 0;
  const worker = async () => {
    for (;;) {
      const i = next++;
      const t = opts.targets[i];
      if (!t) return;
      const t0 = performance.now();
      live?.set(i, "connecting");
      let result: HostResult;
      let timer: ReturnType<typeof setTimeout> | undefined;
      try {
        const job = (async () => {
          const hop = await via.catch((err: unknown) => {
            throw new Error(`via ${opts.via.map((v) => v.label).join(",")}: ${reason(err)}`);
          });
          let ctx = await connect(t, hop);
          if (opts.sudo)
            ctx = await router.sudo({
              username: opts.sudo,
              via: ctx,
              name: `${t.label}:sudo`,
              connectTimeout: opts.timeout,
              ...(password !== undefined ? { password } : {}),
            });
          live?.set(i, "running");
          return act(router, ctx, t);
        })();
        const late = new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`timed out after ${opts.timeout} ms`)), opts.timeout);
        });
        job.catch(() => {});
        const r = await Promise.race([job, late]);
        result = { host: t.label, ...r, ms: Math.round(performance.now() - t0) };
      } catch (err) {
        result = { host: t.label, ok: false, error: reason(err), ms: Math.round(performance.now() - t0) };
      } finally {
        clearTimeout(timer);
      }
      results[i] = result;
      live?.set(
        i,
        result.ok ? "ok" : "failed",
        result.ok ? (result.exitCode !== undefined ? `exit ${result.exitCode}` : "") : (result.error ?? `exit ${result.exitCode}`),
      );
      if (opts.json) process.stdout.write(`${JSON.stringify(result)}\n`);
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.forks, opts.targets.length) }, worker));
  live?.done();
  const failed = results.filter((r) => !r.ok);
  if (!opts.json) {
    const prefixed = (out: string, prefix: string) => `${out.replace(/\n$/, "").replace(/^/gm, prefix)}\n`;
    for (const r of results) {
      if (r.stdout) process.stdout.write(prefixed(r.stdout, `${r.host}: `));
      if (r.stderr) process.stdout.write(prefixed(r.stderr, `${r.host} (stderr): `));
      if (r.result !== undefined) process.stdout.write(`${r.host}: ${JSON.stringify(r.result)}\n`);
      if (r.error) process.stdout.write(`${r.host}: error: ${r.error}\n`);
    }
    const slowest = results.reduce((a, b) => (b.ms > a.ms ? b : a));
    process.stdout.write(`\n${results.length - failed.length} ok, ${failed.length} failed; slowest ${slowest.host} (${(slowest.ms / 1000).toFixed(1)} s)\n`);
  }
  return failed.length ? 1 : 0;
}
