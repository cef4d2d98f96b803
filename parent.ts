/**
 * What a context needs to start children: the first stage, the bootstrap
 * handshake, and the connection methods (local, ssh, sudo, su, doas, and
 * container tools). The master has it built
 * in; a child fetches it (GET_MODULE "mitogen:parent") only when it first
 * starts a child of its own.
 *
 * Node builtins come from `process.getBuiltinModule`, so this module runs
 * unchanged when evaluated from the compressed payload inside a child.
 *
 * @module
 */
import { StreamError, TimeoutError } from "./errors.ts";
import { Secret } from "./codec.ts";
import { builtin, isDeno, joinParts, nodeProcess, nodeTransport, PDEATHSIG_ENV, runtimeCommand } from "./runtime.ts";
import { CORE, HANDLE, MARKER, Message } from "./frames.ts";
import { Stream } from "./stream.ts";
import { logRecordOf, type LogSource } from "./logapi.ts";
import { takesRouter } from "./calls.ts";
import type { Context } from "./context.ts";
import type { ContainerOptions, JailOptions, KubectlOptions, LocalOptions, SetnsOptions, SshOptions, SudoOptions, SuOptions } from "./options.ts";
import type { ChildLink, Router } from "./router.ts";
import type { ChildConfig } from "./child.ts";
import { type DenoProcess, denoSpawn, killGroup } from "./spawn.ts";

/** How to reach a new child: on this machine, or over ssh. */
export type Method =
  | { kind: "local"; runtime?: string; env?: Record<string, string>; cwd?: string }
  | ({ kind: "ssh" } & SshSpec)
  | ({ kind: "sudo" } & SudoSpec)
  | { kind: "wrap"; argv: string[]; runtime: string }
  | ({ kind: "su" } & TerminalSpec)
  | ({ kind: "doas" } & TerminalSpec);

/** What su and doas need. */
export interface TerminalSpec {
  username: string;
  password?: Secret;
  path?: string;
  args: string[];
  runtime?: string;
}

/** What the sudo method needs (see {@link SudoOptions}). */
export interface SudoSpec {
  username: string;
  password?: Secret;
  sudoPath: string;
  sudoArgs: string[];
  /** The runtime to run as the target user; default: this context's own executable. */
  runtime?: string;
}

/** Everything needed to start one child. */
export interface ConnectSpec {
  id: number;
  name: string;
  /** Milliseconds from spawn to the child's CONNECTED marker. */
  connectTimeout: number;
  method: Method;
}

/** What the ssh method needs (see {@link SshOptions}); plain data, so it can be sent to a `via` context. */
export interface SshSpec {
  hostname: string;
  username?: string;
  port?: number;
  identityFile?: string;
  password?: Secret | string;
  checkHostKeys: "enforce" | "accept" | "ignore";
  knownHostsFile?: string;
  sshArgs: string[];
  sshPath: string;
  compression: boolean;
  /** "auto" (the newest of node and nodejs, else deno), "node", "deno", or a path on the target. */
  runtime: string;
}

/**
 * How a Deno child runs its first stage. `--unstable-ffi`: Deno 1.46 has
 * `Deno.dlopen` (for the parent-death signal, see `watchParent`) only with it,
 * and would start the watchdog worker instead (20 to 35 ms); Deno 2 accepts
 * the flag. The V8 flag: Deno 2 gives every Error a detailed stack trace when
 * it is made, and V8 then re-parses each function on the stack for its source
 * positions; the core's top level (where the codec library makes two Errors
 * as it loads) cost 9 to 15 ms that way. Positions are recorded at compile
 * time instead.
 */
export const DENO_EVAL: readonly string[] = ["eval", "--no-config", "--unstable-ffi", "--v8-flags=--no-enable-lazy-source-positions"];

/**
 * The first stage, as evaluated by `node -e` or `deno eval` with argv
 * `<name>`. It writes the READY line (`MITO000 <runtime> <version>`), reads
 * the payload's length (u32, big-endian) and then exactly the payload,
 * inflates it (unless `plain`: the parent sends the script itself) and runs
 * it; on EOF or garbage it says why on stderr and exits 1. No single quotes,
 * so it is safe inside '...' in any POSIX shell. It parses on every runtime
 * that can report itself, so one too old to run the core is still named
 * (see {@link childRuntime}).
 *
 * Node reads its stream from fd 3 (see runtime.ts); Deno from fds 0/1. The
 * Node core gets `require` (`node -e` has it on every version) for builtins
 * where `process.getBuiltinModule` is missing (see `builtin` in runtime.ts).
 * The core gets the compressed payload too, to start children with; a plain
 * one it does not keep (see `childMain`).
 */
export function firstStage(kind: "node" | "deno", fds: "socket" | "split" | "tty" = "socket", plain = true): string {
  const ready = (version: string) => `"${MARKER.READY}${kind} "+${version}+"\\n"`;
  const fail = (exit: string) => `e=m=>{console.error("mitogen("+N+"): "+m);${exit}(1)}`;
  const run = (inflate: string, boot: string) => `try{new Function("B",${inflate}+"")(${boot})}catch(x){e("bad payload: "+x)}`;
  if (kind === "deno") {
    return (
      `const N=Deno.args[0],${fail("Deno.exit")},` +
      `r=async n=>{const b=new Uint8Array(n);for(let o=0,k;o<n;o+=k)if(!(k=await Deno.stdin.read(b.subarray(o))))e("EOF before payload");return b};` +
      `console.log("${MARKER.READY}deno "+Deno.version.deno);` +
      `const b=await r(new DataView((await r(4)).buffer).getUint32(0));` +
      (plain
        ? run("new TextDecoder().decode(b)", "{name:N}")
        : run(`await new Response(new Response(b).body.pipeThrough(new DecompressionStream("deflate-raw"))).text()`, "{name:N,payload:b}"))
    );
  }
  // Locally fd 3 is one socket both ways; through a shell (ssh) fd 3 reads and fd 4 writes.
  // Behind a terminal (su, doas) fds 3 and 4 are the pty, which only tty streams can use.
  const sockets = {
    socket: `s=new(g("net").Socket)({fd:3,readable:1,writable:1})`,
    split: `S=g("net").Socket,s=new S({fd:3,readable:1,writable:!1}),w=new S({fd:4,readable:!1,writable:1})`,
    tty: `T=g("tty"),s=new T.ReadStream(3),w=new T.WriteStream(4)`,
  }[fds];
  // READY goes out first, written at once: the parent sends the payload while this runtime loads `net` (~5 ms).
  return (
    `const g=require;g("fs").writeSync(${fds === "socket" ? 3 : 4},${ready("process.version")});` +
    `const N=process.argv.pop(),${sockets},${fail("process.exit")},` +
    `f=d=>{b=b?Buffer.concat([b,d]):d;if(b.length<4||b.length<(n=b.readUInt32BE()+4))return;s.pause().off("data",f).off("end",h);` +
    `const p=b.subarray(4,n);b.length>n&&s.unshift(b.subarray(n));` +
    `${run(plain ? "p" : `g("zlib").inflateRawSync(p)`, `{socket:s,${fds === "socket" ? "" : "out:w,"}name:N,${plain ? "" : "payload:p,"}require:g}`)}},` +
    `h=()=>e("EOF before payload");` +
    `let b,n;s.on("data",f).on("end",h)`
  );
}

/** The oldest runtimes a child runs on: [major, minor]. */
export const OLDEST = { node: [12, 0], deno: [1, 46] } as const;
/** Node before this runs the core lowered for Node 12 (no ES2022 class syntax). */
const MODERN_NODE = [16, 11] as const;
const dotted = ([major, minor]: readonly number[]) => (minor ? `${major}.${minor}` : `${major}`);
const SUPPORTED = `children need node ${dotted(OLDEST.node)} or later, or deno ${dotted(OLDEST.deno)} or later`;

/** What a child's first stage reported, and the core payload it gets. */
export interface ChildRuntime {
  kind: "node" | "deno";
  /** As reported: `12.22.12`, `2.9.6`. */
  version: string;
  /** `node 12.22.12`, the form Context.runtime and ADD_ROUTE carry. */
  text: string;
  /** The core payload's module name (see CORE). */
  core: string;
}

const older = (v: readonly number[], than: readonly number[]) => (v[0] ?? 0) < (than[0] ?? 0) || (v[0] === than[0] && (v[1] ?? 0) < (than[1] ?? 0));

/**
 * Read a READY line's rest (`node 12.22.12`): the runtime, and which core
 * payload it runs; a StreamError for one too old, naming it and the range.
 */
export function childRuntime(ready: string, who: string): ChildRuntime {
  // Node's first stage says `node v12.22.12`, Deno's `deno 1.46.3`.
  const m = /^(node|deno) v?((\d+)\.(\d+)\S*)$/.exec(ready);
  if (!m) throw new StreamError(`${who}: the first stage reported ${JSON.stringify(ready)}, not a runtime and version`);
  const kind = m[1] as "node" | "deno";
  const version = m[2] as string;
  const v = [Number(m[3]), Number(m[4])];
  if (older(v, OLDEST[kind])) throw new StreamError(`${who}: ${kind} ${version} is too old: ${SUPPORTED}`);
  return { kind, version, text: `${kind} ${version}`, core: kind === "node" && older(v, MODERN_NODE) ? CORE.LOWERED : CORE.MODERN };
}

let stages: string[] | null = null;

/** `line` with any first stage in it replaced by `<first stage>`: a program that is no runtime may echo its argv. */
function withoutStages(line: string): string {
  if (!/const (g=require|N=Deno)/.test(line)) return line;
  stages ??= [true, false].flatMap((plain) => [
    ...(["socket", "split", "tty"] as const).map((fds) => firstStage("node", fds, plain)),
    firstStage("deno", "socket", plain),
  ]);
  for (const stage of stages) line = line.split(stage).join("<first stage>");
  return line;
}

const MAX_LINE = 64 * 1024;

/**
 * Split a byte stream into lines for the log; overlong lines are cut at 64 KiB. While `router`'s link to
 * its parent (where the lines go) is congested, the stream is not read.
 */
function forwardLines(
  router: Router,
  readable: { on(e: "data", cb: (d: Uint8Array) => void): unknown; on(e: "end", cb: () => void): unknown; pause?(): unknown; resume?(): unknown },
  sink: (line: string) => void,
  /** Sees an unfinished line (a prompt waits without a newline); true consumes it. */
  unfinished?: (partial: string) => boolean,
): void {
  const decoder = new TextDecoder();
  let partial = "";
  readable.on("data", (d) => {
    partial += decoder.decode(d, { stream: true });
    for (;;) {
      const nl = partial.indexOf("\n");
      if (nl >= 0 && nl <= MAX_LINE) {
        sink(partial.slice(0, nl));
        partial = partial.slice(nl + 1);
      } else if (partial.length > MAX_LINE) {
        sink(partial.slice(0, MAX_LINE));
        partial = partial.slice(MAX_LINE);
      } else break;
    }
    if (partial && unfinished?.(partial)) partial = "";
    const up = router.parent;
    if (up?.congested) {
      readable.pause?.();
      up.onDrain(() => readable.resume?.());
    }
  });
  readable.on("end", () => {
    partial += decoder.decode();
    if (partial) sink(partial);
    partial = "";
  });
}

/** How to start one child process, whatever the method. */
interface Launch {
  exe: string;
  args: string[];
  /** Words run in front of `exe` (`setpriv --pdeathsig KILL --`); messages still name `exe`. */
  prefix?: string[];
  env: Record<string, string | undefined>;
  cwd?: string;
  /** "fd3": a local node child's socket; "stdio": the child's stdin/stdout. */
  streamOn: "fd3" | "stdio";
  /** The first stage takes the core as it is, not deflated: the link is on this machine, or compressed by ssh. */
  plain?: boolean;
  /** A local node child: the core goes with V8's code cache for it, kept under this key (see {@link codeCached}). */
  codeCache?: string;
  /** The child's stdout is user output (only when the stream is elsewhere). */
  stdoutIsOutput: boolean;
  /**
   * Sees each stderr line while connecting: an Error fails at once, `true`
   * keeps the line out of the log. `answer` writes to the child's stdin
   * (a password, before the payload).
   */
  watch?: (line: string, answer: (text: string) => void) => Error | boolean | undefined;
  /**
   * A terminal method's text before the READY marker (prompts, echoes,
   * complaints): an Error fails at once; `answer` types into the terminal.
   */
  terminal?: (text: string, answer: (text: string) => void) => Error | undefined;
  /** A prompt that arrives without a newline, handed to `watch` as soon as it shows. */
  prompt?: RegExp;
  /** Runs once connecting is over, either way. */
  cleanup?: () => void;
}

/** Start a child by `spec.method` and bootstrap it. */
export async function connect(router: Router, spec: ConnectSpec): Promise<Context> {
  const m = spec.method;
  // connectTimeout counts from here: a runtime's --version probe included.
  const t0 = Date.now();
  const launch =
    m.kind === "ssh"
      ? sshLaunch(spec, m)
      : m.kind === "sudo"
        ? sudoLaunch(spec, m)
        : m.kind === "wrap"
          ? wrapLaunch(spec, m)
          : m.kind === "su" || m.kind === "doas"
            ? terminalLaunch(spec, m)
            : await localLaunch(spec, m, t0);
  return spawnAndBootstrap(router, spec, launch, t0);
}

/** A runtime named neither node nor deno: is it one? Its `--version` says (`v12.22.12`, `deno 2.9.6 (...)`). */
function oddName(runtime: string): boolean {
  return !/node|deno/.test(runtime.slice(runtime.lastIndexOf("/") + 1));
}

/**
 * Ask `exe --version` what it is; a StreamError when it is neither node nor deno. It runs in a
 * process group of its own, killed whole once it exits or at `deadline` (the start's
 * connectTimeout), with a TimeoutError then: a wrapper script and what it started go together.
 */
async function probeRuntime(exe: string, who: string, deadline: number, connectTimeout: number): Promise<"node" | "deno"> {
  const said = await new Promise<string>((resolve, reject) => {
    let text = "";
    const add = (d: Uint8Array | string) => {
      if (text.length < 4096) text += typeof d === "string" ? d : new TextDecoder().decode(d);
    };
    let pid = 0;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let settled = false;
    let exited: () => void = () => {};
    const exit = new Promise<void>((resolve) => (exited = resolve));
    const settle = (err: Error | null) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      killGroup(pid); // what it left in its group goes with it
      if (!err) return resolve(text.trim().split("\n")[0] ?? "");
      // Rejected once it has gone (or 1 s on): a caller that looks finds nothing of it running.
      let late: ReturnType<typeof setTimeout> | undefined;
      void Promise.race([exit, new Promise<void>((r) => (late = setTimeout(r, 1000)))]).then(() => {
        clearTimeout(late);
        reject(err);
      });
    };
    const cannot = (err: Error) => new StreamError(`cannot start ${exe}: ${err.message}`, { cause: err });
    if (isDeno) {
      try {
        const p = denoSpawn(exe, ["--version"], nodeProcess().env, undefined, () => {});
        pid = p.pid;
        p.stdin.end();
        p.stdout.on("data", add);
        p.stderr.on("data", add);
        void p.gone.then(() => {
          exited();
          settle(null);
        });
      } catch (err) {
        return reject(cannot(err as Error));
      }
    } else {
      const proc = builtin("node:child_process").spawn(exe, ["--version"], { detached: true, stdio: ["ignore", "pipe", "pipe"] });
      pid = proc.pid ?? 0;
      proc.stdout?.on("data", add);
      proc.stderr?.on("data", add);
      proc.once("error", (err) => settle((err as { code?: unknown }).code === "ENOENT" ? cannot(err) : null));
      proc.once("exit", () => {
        killGroup(pid);
        exited();
      });
      proc.once("close", () => settle(null));
    }
    timer = setTimeout(
      () => settle(new TimeoutError(`${who}: not connected within ${connectTimeout} ms (${exe} --version did not answer)`)),
      Math.max(0, deadline - Date.now()),
    );
  });
  if (/^v\d+\./.test(said)) return "node";
  if (/^deno \d+\./.test(said)) return "deno";
  throw new StreamError(`${who}: ${notRuntime(exe, said)}`);
}

/** `<exe> is not node or deno (its --version says "Python 3.11.2"): children need ...`. */
function notRuntime(exe: string, said: string): string {
  return `${exe} is not node or deno (${said ? `its --version says ${JSON.stringify(said.slice(0, 100))}` : "it prints no --version"}): ${SUPPORTED}`;
}

let setpriv: Promise<string | null> | undefined;

/**
 * util-linux's `setpriv` where it has `--pdeathsig` (2.33 and later), found on PATH and tried once
 * per process; null elsewhere (not Linux, or a Deno context, which runs children through a shell).
 */
function pdeathsigTool(): Promise<string | null> {
  setpriv ??= new Promise((resolve) => {
    const proc = nodeProcess();
    if (isDeno || proc.platform !== "linux") return resolve(null);
    const fs = builtin("node:fs");
    const usable = (f: string) => {
      try {
        fs.accessSync(f, fs.constants.X_OK);
        return true;
      } catch {
        return false;
      }
    };
    const found = (proc.env.PATH ?? "/usr/bin:/bin")
      .split(":")
      .filter((d) => d.startsWith("/"))
      .map((d) => `${d}/setpriv`)
      .find(usable);
    if (!found) return resolve(null);
    builtin("node:child_process").execFile(found, ["--pdeathsig", "KILL", "true"], { timeout: 5000 }, (err) => resolve(err ? null : found));
  });
  return setpriv;
}

/** setpriv's complaint that it could not run `exe` (it exits 127 or 126), as a start that failed. */
function failedExec(line: string, exe: string): StreamError | undefined {
  const said = `setpriv: failed to execute ${exe}: `;
  return line.startsWith(said) ? new StreamError(`cannot start ${exe}: ${line.slice(said.length)}`) : undefined;
}

async function localLaunch(spec: ConnectSpec, m: Extract<Method, { kind: "local" }>, t0: number): Promise<Launch> {
  // Default: the runtime of the context doing the starting (decided here, not where the request came from).
  const runtime = m.runtime ?? (isDeno ? "deno" : "node");
  const cmd = oddName(runtime)
    ? { kind: await probeRuntime(runtime, spec.name, t0 + spec.connectTimeout, spec.connectTimeout), exe: runtime }
    : runtimeCommand(runtime);
  const stage = firstStage(cmd.kind);
  const env: Record<string, string | undefined> = { ...nodeProcess().env, DENO_NO_UPDATE_CHECK: "1", DENO_NO_PROMPT: "1", ...m.env };
  if (isDeno && cmd.kind === "node") {
    // Deno starts processes with three pipes only (see spawnLaunch): a node child's stream is moved
    // to fds 3 and 4 by a shell, as behind ssh, and what it prints arrives as stderr.
    return {
      exe: "/bin/sh",
      args: ["-c", remoteCommand(cmd.exe, spec.name, false, true, true)],
      env,
      ...(m.cwd === undefined ? {} : { cwd: m.cwd }),
      streamOn: "stdio",
      plain: true,
      codeCache: `${cmd.exe}\0${env.NODE_OPTIONS ?? ""}`,
      stdoutIsOutput: false,
      watch: (line) => (line.includes(`${cmd.exe}: not found`) ? new StreamError(`cannot start ${cmd.exe}: not found (ENOENT)`) : failedExec(line, cmd.exe)),
    };
  }
  // The kernel kills a node child when this process dies (see watchParent in runtime.ts); Deno does it itself.
  const tool = cmd.kind === "node" ? await pdeathsigTool() : null;
  return {
    exe: cmd.exe,
    args: cmd.kind === "node" ? ["-e", stage, spec.name] : [...DENO_EVAL, stage, spec.name],
    ...(tool ? { prefix: [tool, "--pdeathsig", "KILL", "--"], watch: (line: string) => failedExec(line, cmd.exe) } : {}),
    env: tool ? { ...env, [PDEATHSIG_ENV]: `${nodeProcess().pid}:${nodeProcess().geteuid?.()}` } : env,
    ...(m.cwd === undefined ? {} : { cwd: m.cwd }),
    streamOn: cmd.kind === "node" ? "fd3" : "stdio",
    stdoutIsOutput: cmd.kind === "node",
    plain: true,
    ...(cmd.kind === "node" ? { codeCache: `${cmd.exe}\0${env.NODE_OPTIONS ?? ""}` } : {}),
  };
}

/** Quote a word for any POSIX shell. */
export function shellQuote(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'"'"'`)}'`;
}

/**
 * The command the remote shell runs. Node reads the stream from fd 3 and
 * writes it to fd 4, with stdin at /dev/null and stdout joined to stderr, so
 * nothing it (or a subprocess) prints can reach the stream. Deno keeps the
 * stream on 0/1 (it cannot read an inherited fd 3).
 *
 * `auto` runs the newest of `node` and `nodejs` on PATH (by `--version`),
 * or `deno` when neither is there or the newest is older than Node 12. A
 * runtime named neither node nor deno is asked `--version` first, and runs
 * as what it says it is.
 *
 * With `pdeathsig` (not for sudo and the terminal methods, whose child
 * watches the parent context's pid anyway), node runs under `setpriv
 * --pdeathsig KILL` where the target has one that can, and is told so
 * (see watchParent in runtime.ts). With `plain` the first stage takes the
 * core undeflated (see {@link firstStage}).
 */
export function remoteCommand(runtime: string, name: string, terminal = false, pdeathsig = !terminal, plain = false): string {
  // Behind a terminal stdout and stderr are the stream's own device: what the child prints is dropped.
  const out = terminal ? ">/dev/null 2>&1" : "1>&2";
  const tool = pdeathsig
    ? `P=;setpriv --pdeathsig KILL true 2>/dev/null&&P="setpriv --pdeathsig KILL --"&&export ${PDEATHSIG_ENV}=$PPID:\${EUID:-$(id -u)};exec $P `
    : "exec ";
  const node = (exe: string) => `${tool}${exe} -e '${firstStage("node", terminal ? "tty" : "split", plain)}' ${shellQuote(name)} 3<&0 4>&1 </dev/null ${out}`;
  const deno = (exe: string) =>
    `DENO_NO_UPDATE_CHECK=1 exec ${exe} ${DENO_EVAL.join(" ")} '${firstStage("deno", "socket", plain)}' ${shellQuote(name)}${terminal ? " 2>/dev/null" : ""}`;
  if (runtime === "auto") {
    const [major, minor] = OLDEST.node;
    // p: the newest node found, q: its major * 1000 + minor (a --version that is not a version counts as 0).
    return (
      `p=;q=-1;for c in node nodejs;do command -v $c >/dev/null 2>&1||continue;v=$($c --version 2>/dev/null </dev/null);v=\${v#v};` +
      `M=\${v%%.*};m=\${v#*.};m=\${m%%.*};case $M.$m in *[!0-9.]*|.*|*.)M=0 m=0;;esac;[ $((M*1000+m)) -gt $q ]&&p=$c q=$((M*1000+m));done;` +
      `if [ -n "$p" ]&&{ [ $q -ge ${major * 1000 + minor} ]||! command -v deno >/dev/null 2>&1;};then ${node("$p")};` +
      `elif command -v deno >/dev/null 2>&1;then ${deno("deno")};` +
      `else echo "mitogen: neither node nor deno found on $(hostname)" >&2;exit 127;fi`
    );
  }
  const exe = shellQuote(runtime);
  if (oddName(runtime)) {
    return (
      `v=$(${exe} --version 2>&1 </dev/null);case $v in v[0-9]*)${node(exe)};;"deno "[0-9]*)${deno(exe)};;` +
      `*)echo "mitogen: ${exe.replace(/["$`\\]/g, "")} is not node or deno; its --version says: $v" >&2;exit 126;;esac`
    );
  }
  return runtimeCommand(runtime).kind === "deno" ? deno(exe) : node(exe);
}

let askpass: { dir: string; path: string } | null = null;

/** A tiny SSH_ASKPASS program: it reports each prompt on stderr and answers with $MITOGEN_SSH_PASSWORD. */
function askpassProgram(): string {
  if (askpass) return askpass.path;
  const fs = builtin("node:fs");
  const os = builtin("node:os");
  const dir = fs.mkdtempSync(`${os.tmpdir()}/mitogen-askpass-`);
  const path = `${dir}/askpass`;
  fs.writeFileSync(path, `#!/bin/sh\nprintf '${ASKPASS_MARK} %s\\n' "$1" >&2\nprintf '%s\\n' "$MITOGEN_SSH_PASSWORD"\n`, { mode: 0o700 });
  askpass = { dir, path };
  nodeProcess().once("exit", () => {
    try {
      fs.unlinkSync(path);
      fs.rmdirSync(dir);
    } catch {
      // gone already
    }
  });
  return path;
}

const ASKPASS_MARK = "MITOGEN_ASKPASS";

function sshLaunch(spec: ConnectSpec, m: SshSpec): Launch {
  const host = m.username ? `${m.username}@${m.hostname}` : m.hostname;
  const args = ["-T", "-o", `ConnectTimeout=${Math.max(1, Math.ceil(spec.connectTimeout / 1000))}`, "-o", "ServerAliveInterval=15"];
  if (m.username) args.push("-l", m.username);
  if (m.port !== undefined) args.push("-p", String(m.port));
  if (m.identityFile) args.push("-i", m.identityFile, "-o", "IdentitiesOnly=yes");
  args.push("-o", `StrictHostKeyChecking=${{ enforce: "yes", accept: "accept-new", ignore: "no" }[m.checkHostKeys]}`);
  if (m.checkHostKeys === "ignore") args.push("-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR");
  else if (m.knownHostsFile) args.push("-o", `UserKnownHostsFile=${m.knownHostsFile}`);
  const password = m.password instanceof Secret ? m.password.reveal() : m.password;
  const env: Record<string, string | undefined> = { ...nodeProcess().env };
  if (password === undefined) args.push("-o", "BatchMode=yes");
  else {
    args.push("-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=2");
    Object.assign(env, { SSH_ASKPASS: askpassProgram(), SSH_ASKPASS_REQUIRE: "force", DISPLAY: env.DISPLAY ?? ":0", MITOGEN_SSH_PASSWORD: password });
  }
  if (m.compression) args.push("-C");
  // With -C ssh compresses the core (in C, on both ends): the child is spared inflating it.
  args.push(...m.sshArgs, "--", m.hostname, remoteCommand(m.runtime, spec.name, false, true, m.compression));
  let prompts = 0;
  let changed = false;
  const fail = (what: string) => new StreamError(`ssh to ${host}: ${what}`);
  return {
    exe: m.sshPath,
    args,
    env,
    streamOn: "stdio",
    stdoutIsOutput: false,
    plain: m.compression,
    watch(line) {
      if (line.startsWith(ASKPASS_MARK)) {
        prompts++;
        if (password === undefined) return fail("password required");
        return prompts > 1 ? fail("incorrect password (refused by the server)") : true;
      }
      if (/REMOTE HOST IDENTIFICATION HAS CHANGED/.test(line)) changed = true;
      if (/Host key verification failed/.test(line)) {
        return fail(changed ? `the host key has CHANGED (checkHostKeys: ${m.checkHostKeys})` : `unknown host key (checkHostKeys: ${m.checkHostKeys})`);
      }
      const denied = /Permission denied \((.*)\)/.exec(line);
      if (denied) {
        const methods = denied[1] ?? "";
        if (password === undefined && /password|keyboard-interactive/.test(methods)) return fail(`password required (the server offers ${methods})`);
        return fail(password === undefined ? `authentication failed (the server offers ${methods})` : "incorrect password (refused by the server)");
      }
      const missing = missingRuntime(line);
      if (missing) return fail(missing);
      if (/Could not resolve hostname|Connection refused|Connection timed out|No route to host|Network is unreachable|Invalid argument/.test(line)) {
        return fail(line.replace(/^ssh: /, ""));
      }
      return undefined;
    },
  };
}

/** This context's own executable, which is also there for another user on the same machine. */
function ownRuntime(): string {
  return runtimeCommand(isDeno ? "deno" : "node").exe;
}

/** The remote command's complaint that the target has no runtime (see remoteCommand), or null. */
export function missingRuntime(line: string): string | null {
  if (/neither node nor deno found/.test(line)) return line.replace(/^mitogen: /, "");
  const odd = /mitogen: (.*) is not node or deno; its --version says: ?(.*)/.exec(line);
  return odd ? notRuntime(odd[1] ?? "", odd[2] ?? "") : null;
}

function sudoLaunch(spec: ConnectSpec, m: SudoSpec): Launch {
  // A prompt nobody else prints: answered once; a second one means the password was wrong.
  const prompt = `mitogen-sudo-${spec.id}-password:`;
  const runtime = m.runtime ?? ownRuntime();
  const args = ["-S", "-p", prompt, "-H", "-u", m.username, ...m.sudoArgs, "--", "/bin/sh", "-c", remoteCommand(runtime, spec.name, false, false)];
  let prompts = 0;
  const fail = (what: string) => new StreamError(`sudo to ${m.username}: ${what}`);
  return {
    exe: m.sudoPath,
    args,
    env: { ...nodeProcess().env },
    streamOn: "stdio",
    stdoutIsOutput: false,
    prompt: new RegExp(`${prompt}\\s*$`),
    watch(line, answer) {
      if (line.includes(prompt)) {
        prompts++;
        if (!m.password) return fail("password required");
        if (prompts > 1) return fail("incorrect password");
        answer(`${m.password.reveal()}\n`);
        return true;
      }
      if (/Sorry, try again/.test(line)) return fail("incorrect password");
      if (/unknown user/.test(line)) return fail(`unknown user (${line.trim()})`);
      if (/is not in the sudoers file|is not allowed to (run|execute)|may not run sudo/.test(line)) return fail(`not allowed (${line.trim()})`);
      if (/incorrect password attempt|a password is required/.test(line)) return fail(m.password ? "incorrect password" : "password required");
      const missing = missingRuntime(line);
      return missing ? fail(missing) : undefined;
    },
  };
}

/** A command that runs another command somewhere (docker exec, kubectl exec, nsenter...): it runs `/bin/sh -c`. */
function wrapLaunch(spec: ConnectSpec, m: Extract<Method, { kind: "wrap" }>): Launch {
  const [exe, ...prefix] = m.argv;
  if (!exe) throw new StreamError(`${spec.name}: empty command`);
  return {
    exe,
    args: [...prefix, "/bin/sh", "-c", remoteCommand(m.runtime, spec.name)],
    env: { ...nodeProcess().env },
    streamOn: "stdio",
    stdoutIsOutput: false,
    watch(line) {
      const missing = missingRuntime(line);
      return missing ? new StreamError(`${spec.name}: ${missing}`) : undefined;
    },
  };
}

/**
 * su and doas read passwords from a terminal only: run them in a pty made by
 * `script`, answer the prompt there, then switch the pty to raw mode
 * (`stty raw -echo`) before the first stage, so the stream passes 8-bit clean.
 * The child's own output goes to /dev/null: on a pty it would share the stream.
 */
function terminalLaunch(spec: ConnectSpec, m: Extract<Method, { kind: "su" | "doas" }>): Launch {
  const inner = `stty raw -echo; ${remoteCommand(m.runtime ?? ownRuntime(), spec.name, true)}`;
  const argv =
    m.kind === "su"
      ? [m.path ?? "su", ...m.args, m.username, "-s", "/bin/sh", "-c", inner]
      : [m.path ?? "doas", ...m.args, "-u", m.username, "/bin/sh", "-c", inner];
  let seen = "";
  let prompts = 0;
  const fail = (what: string) => new StreamError(`${m.kind} to ${m.username}: ${what}`);
  return {
    exe: "script",
    args: ["-q", "-e", "-c", argv.map(shellQuote).join(" "), "/dev/null"],
    env: { ...nodeProcess().env },
    streamOn: "stdio",
    stdoutIsOutput: false,
    terminal(text, answer) {
      seen += text;
      const missing = missingRuntime(seen);
      if (missing) return fail(missing);
      if (/Authentication fail|incorrect password|Permission denied/i.test(seen)) return fail("incorrect password");
      if (/Operation not permitted|not allowed|does not exist|[Uu]nknown user|No passwd entry/.test(seen))
        return fail(`not allowed (${seen.trim().split("\n").pop()})`);
      if (/[Pp]assword[^\n]*:\s*$/.test(seen)) {
        prompts++;
        if (!m.password) return fail("password required");
        if (prompts > 1) return fail("incorrect password");
        answer(`${m.password.reveal()}\n`);
        seen = "";
      }
      return undefined;
    },
  };
}

type R = Parameters<typeof nodeTransport>[0];
type W = Parameters<typeof nodeTransport>[1];

/** A started child: a process, or anything shaped like one (an in-process ssh channel). */
export interface Spawned {
  /** What was started, for messages ("ssh", "/usr/bin/node"). */
  what: string;
  reader: R;
  writer: W;
  /** User output, when the stream is elsewhere (a local node child's stdout). */
  stdout?: R;
  stderr: R;
  /** Resolves once it has gone and its output is drained. */
  gone: Promise<void>;
  /** How it ended ("exited with code 1"), or null while it runs. */
  status(): string | null;
  kill(): void;
  onError(cb: (err: Error) => void): void;
}

/**
 * Start `launch` as a process, in a session (and process group) of its own:
 * `kill()` ends the whole group, so a wrapper script and whatever it started
 * go together. Once the process has exited, what is left of its group is
 * killed, and our ends of its pipes are closed if something outside the
 * group (a process of another user) still holds them 200 ms later.
 */
async function spawnLaunch(launch: Launch): Promise<Spawned> {
  if (isDeno) return denoLaunch(launch);
  const { spawn } = builtin("node:child_process");
  const [tool, ...words] = launch.prefix ?? [];
  const proc = spawn(tool ?? launch.exe, tool ? [...words, launch.exe, ...launch.args] : launch.args, {
    stdio: launch.streamOn === "fd3" ? ["ignore", "pipe", "pipe", "pipe"] : ["pipe", "pipe", "pipe"],
    env: launch.env,
    detached: true,
    ...(launch.cwd === undefined ? {} : { cwd: launch.cwd }),
  });
  const kill = () => killGroup(proc.pid as number);
  const [stdin, stdout, stderr, fd3] = proc.stdio as unknown as [W | undefined, R | undefined, R | undefined, (R & W) | undefined];
  const reader = launch.streamOn === "fd3" ? fd3 : stdout;
  const writer = launch.streamOn === "fd3" ? fd3 : stdin;
  if (!reader || !writer || !stdout || !stderr) {
    // Spawning failed outright (Deno reports it this way; Node through "error").
    const err = await new Promise<Error>((resolve) => {
      const timer = setTimeout(() => resolve(new Error("no stdio")), 1000);
      proc.once("error", (e) => {
        clearTimeout(timer);
        resolve(e);
      });
    });
    throw new StreamError(`cannot start ${launch.exe}: ${err.message}`, { cause: err });
  }
  return {
    what: launch.exe,
    reader,
    writer,
    ...(launch.stdoutIsOutput ? { stdout } : {}),
    stderr,
    gone: new Promise<void>((resolve) => {
      proc.once("close", () => resolve());
      proc.once("exit", () => {
        kill();
        const timer = setTimeout(() => {
          for (const s of proc.stdio) (s as { destroy?(): void } | null)?.destroy?.();
        }, 200);
        proc.once("close", () => clearTimeout(timer));
      });
    }),
    status: () => (proc.exitCode === null && proc.signalCode === null ? null : endedAs(proc.exitCode, proc.signalCode)),
    kill,
    onError: (cb) => proc.once("error", (err) => cb(new StreamError(`cannot start ${launch.exe}: ${err.message}`, { cause: err }))),
  };
}

/** How a process ended, as errors say it: "was killed by SIGKILL", "exited with code 3". */
export function endedAs(code: number | null, signal: string | null): string {
  return signal ? `was killed by ${signal}` : `exited with code ${code}`;
}

/**
 * Start `launch` under Deno: through Deno.Command (see spawn.ts), whose pipes
 * a Deno process reads without the garbage `node:child_process` leaves; in a
 * session of its own, as spawnLaunch does.
 */
function denoLaunch(launch: Launch): Spawned {
  if (launch.streamOn !== "stdio") throw new StreamError(`cannot start ${launch.exe}: a Deno context hands a child three pipes only`);
  let pid = 0;
  const kill = () => killGroup(pid);
  let p: DenoProcess;
  try {
    p = denoSpawn(launch.exe, launch.args, launch.env, launch.cwd, kill);
  } catch (err) {
    throw new StreamError(`cannot start ${launch.exe}: ${(err as Error).message}`, { cause: err });
  }
  pid = p.pid;
  return {
    what: launch.exe,
    reader: p.stdout,
    writer: p.stdin,
    stderr: p.stderr,
    gone: p.gone,
    status: () => {
      const s = p.status();
      return s === null ? null : endedAs(s.code, s.signal);
    },
    kill,
    onError: () => {},
  };
}

/** Start `launch` and bootstrap the child. */
async function spawnAndBootstrap(router: Router, spec: ConnectSpec, launch: Launch, t0: number): Promise<Context> {
  let child: Spawned;
  try {
    child = await spawnLaunch(launch);
  } catch (err) {
    launch.cleanup?.();
    throw err;
  }
  step(router, spec, t0, "spawn", `started ${launch.exe}`);
  return bootstrap(router, spec, child, launch, t0);
}

/** A connection step, as a debug record of this context: `<name>: <what> (+<ms> ms)`, data `{ step, ms }`. */
function step(router: Router, spec: ConnectSpec, t0: number, name: string, what: string): void {
  const ms = Date.now() - t0;
  router.log("debug", `${spec.name}: ${what} (+${ms} ms)`, "log", { step: name, context: spec.name, ms });
}

/**
 * Bootstrap a started child. Resolves with its Context once it has sent
 * CONNECTED; rejects with TimeoutError after `connectTimeout`, or StreamError
 * if it ends, breaks, reports a runtime too old, or `hooks.watch` reports a
 * failure first. The core payload for the child's runtime comes from this
 * context's module cache, or its parent's (GET_MODULE).
 */
export async function bootstrap(
  router: Router,
  spec: ConnectSpec,
  child: Spawned,
  hooks: Pick<Launch, "watch" | "prompt" | "cleanup" | "terminal" | "plain" | "codeCache">,
  t0: number = Date.now(),
): Promise<Context> {
  const stream = new Stream(spec.name, nodeTransport(child.reader, child.writer), router.maxMessageSize);
  let connecting = true;
  let failed: (err: Error) => void = () => {};
  const failure = new Promise<never>((_, reject) => (failed = reject));
  const tail: string[] = [];
  const answer = (text: string) => stream.writeRaw(new TextEncoder().encode(text));
  const output = (source: LogSource) => (said: string) => {
    const line = withoutStages(said);
    if (source === "stderr") {
      if (connecting && hooks.watch) {
        const verdict = hooks.watch(line, answer);
        if (verdict instanceof Error) failed(verdict);
        if (verdict === true) return;
      }
      tail.push(line);
      if (tail.length > 20) tail.shift();
    }
    router.logRecord(logRecordOf(spec.id, spec.name, [...router.path, spec.name], source === "stderr" ? "warn" : "info", source, line));
  };
  if (child.stdout) forwardLines(router, child.stdout, output("stdout"));
  // Prompts come without a newline: let the method see unfinished lines while connecting.
  forwardLines(router, child.stderr, output("stderr"), (partial) => {
    if (!connecting || !hooks.watch || !hooks.prompt?.test(partial)) return false;
    const verdict = hooks.watch(partial, answer);
    if (verdict instanceof Error) failed(verdict);
    return true;
  });

  const stop = async (): Promise<void> => {
    if (child.status() === null) {
      if (!stream.closed) stream.send(Message.encoded(null, { dst: spec.id, src: router.myId, auth: router.myId, handle: HANDLE.SHUTDOWN }));
      const timer = setTimeout(() => child.kill(), 3000);
      await child.gone;
      clearTimeout(timer);
    } else await child.gone;
    stream.close();
  };
  const ended = (ms: number) =>
    new Promise<string | null>((resolve) => {
      const timer = setTimeout(() => resolve(child.status()), ms);
      void child.gone.then(() => {
        clearTimeout(timer);
        resolve(child.status());
      });
    });
  const link: ChildLink = { stream, stop, ended };

  // Frames that arrive between CONNECTED and adoption are held, not lost.
  const early: Message[] = [];
  stream.onMessage = (msg) => early.push(msg);
  // EOF during bootstrap means the child is ending: how it ended (below) says more.
  stream.onClose = (err) => err instanceof StreamError && failed(err);
  child.onError(failed);
  const exitError = () => {
    const said = tail.length ? `; stderr:\n${tail.join("\n")}` : "";
    return new StreamError(`${spec.name}: ${child.what} ${child.status() ?? "ended"} before connecting${said}`);
  };
  // Report an exit once the last stderr lines are in.
  void child.gone.then(() => failed(exitError()));
  const timer = setTimeout(
    () => failed(new TimeoutError(`${spec.name}: not connected within ${spec.connectTimeout} ms`)),
    Math.max(0, spec.connectTimeout - (Date.now() - t0)),
  );
  let cached: ReturnType<typeof codeCached> | null = null;

  try {
    stream.start();
    const terminal = hooks.terminal;
    const ready = stream.expectMarker(
      MARKER.READY,
      terminal &&
        ((text) => {
          for (const line of text.split(/\r?\n/)) if (line.trim()) tail.push(line);
          tail.splice(0, Math.max(0, tail.length - 20));
          const verdict = terminal(text, answer);
          if (verdict) failed(verdict);
        }),
    );
    const connected = stream.expectMarker(MARKER.CONNECTED);
    connected.catch(() => {}); // awaited below, unless bootstrap fails first
    // A marker lost to EOF is reported through `failure`, with the exit status.
    const settle = <T>(marker: Promise<T>) => marker.catch((err: Error) => (err instanceof StreamError && !stream.closed ? Promise.reject(err) : failure));
    const runtime = childRuntime(await Promise.race([settle(ready), failure]), spec.name);
    step(router, spec, t0, "ready", `first stage READY (${runtime.text})`);
    link.runtime = runtime.text;
    const core = await Promise.race([router.fetchModuleCode(runtime.core), failure]);
    cached = hooks.codeCache === undefined ? null : codeCached(router, `${hooks.codeCache}\0${runtime.text}\0${runtime.core}`, core, spec.id);
    const payload = cached ? LOADER : hooks.plain ? plainCore(core) : core;
    const length = new Uint8Array(4);
    new DataView(length.buffer).setUint32(0, payload.byteLength);
    stream.writeRaw(length);
    stream.writeRaw(payload);
    if (cached) stream.writeRaw(cached.rest);
    step(router, spec, t0, "payload", `payload sent (${runtime.core}, ${payload.byteLength} bytes)`);
    const config: ChildConfig = {
      contextId: spec.id,
      parentIds: [router.myId, ...router.parentIds],
      name: spec.name,
      maxMessageSize: router.maxMessageSize,
      unidirectional: router.unidirectional,
      debug: router.debug,
      path: [...router.path, spec.name],
      // The child watches this pid when it shares our machine (see watchParent).
      ...(/^(local|sudo|su|doas)$/.test(spec.method.kind) ? { parentPid: nodeProcess().pid } : {}),
      ...(cached?.reply ? { codeCache: cached.reply } : {}),
    };
    stream.send(Message.encoded(config, { dst: spec.id, src: router.myId, auth: router.myId, handle: HANDLE.CONFIGURE }));
    step(router, spec, t0, "configure", "CONFIGURE sent");
    await Promise.race([settle(connected), failure]);
    step(router, spec, t0, "connected", "CONNECTED");
  } catch (err) {
    if (cached?.reply) cached.drop();
    step(router, spec, t0, "failed", `failed: ${(err as Error).message}`);
    child.kill();
    await child.gone;
    stream.close();
    throw err;
  } finally {
    connecting = false;
    clearTimeout(timer);
    hooks.cleanup?.();
  }
  const ctx = router.addChild(link, spec.id, spec.name);
  if (cached?.reply) void ctx.disconnected().then(cached.drop);
  for (const msg of early.splice(0)) stream.onMessage(msg);
  step(router, spec, t0, "adopted", `connected as context ${spec.id}`);
  return ctx;
}

const plainCores = new WeakMap<Uint8Array, Uint8Array>();

/** The script of a compressed core payload, inflated once. */
function plainCore(core: Uint8Array): Uint8Array {
  let plain = plainCores.get(core);
  if (!plain) plainCores.set(core, (plain = new Uint8Array(builtin("node:zlib").inflateRawSync(core))));
  return plain;
}

/** Per child runtime (executable, NODE_OPTIONS, version, core): what follows the loader, with V8's code cache of the core; or "asked". */
const codeCaches = new Map<string, { rest: Uint8Array } | "asked">();

/**
 * The payload for a local node child whose core goes with a code cache: it reads `<u32 n><u32 m>`, the core's
 * script (n bytes) and the cache (m bytes, none yet when m is 0) that follow it on the stream, and compiles the
 * script with `vm.Script` (see {@link codeCached}).
 */
const LOADER = new TextEncoder().encode(
  'const s=B.socket,f=d=>{b=b?Buffer.concat([b,d]):d;if(b.length<8)return;const n=b.readUInt32BE(),m=b.readUInt32BE(4),e=8+n+m;if(b.length<e)return;s.pause().off("data",f);b.length>e&&s.unshift(b.subarray(e));' +
    'const c=new(B.require("vm").Script)(b.toString("latin1",8,8+n),m?{cachedData:b.subarray(8+n,e)}:{});c.runInThisContext()(Object.assign(B,{script:c}))};' +
    'let b;s.on("data",f).resume()',
);

/** The core's script, made a function of the boot object as `new Function("B", script)` would. */
const WRAP = [new TextEncoder().encode("(function(B){"), new TextEncoder().encode("\n})")] as const;

/**
 * What a local node child gets after {@link LOADER}: the core, and V8's code cache for that runtime once a child
 * has made one (the core then compiles in about 1 ms instead of 5, and the functions that child ran start
 * compiled). Without one yet, the first such child is asked for it: its CONFIGURE gets `codeCache`, a handle
 * here, and it answers with `createCachedData()` before it runs any call, so no code sent to it has run when it
 * is made. `drop` forgets an answer that never came.
 */
function codeCached(router: Router, key: string, core: Uint8Array, id: number): { rest: Uint8Array; reply?: number; drop: () => void } {
  const have = codeCaches.get(key);
  if (have && have !== "asked") return { rest: have.rest, drop: () => {} };
  const script = plainCore(core);
  const rest = (cache = new Uint8Array(0)) => {
    const head = new Uint8Array(8);
    new DataView(head.buffer).setUint32(0, WRAP[0].byteLength + script.byteLength + WRAP[1].byteLength);
    new DataView(head.buffer).setUint32(4, cache.byteLength);
    const parts = [head, WRAP[0], script, WRAP[1], cache];
    return joinParts(
      parts,
      parts.reduce((n, p) => n + p.byteLength, 0),
    );
  };
  if (have === "asked") return { rest: rest(), drop: () => {} };
  codeCaches.set(key, "asked");
  let reply = 0;
  const drop = () => {
    router.delHandler(reply);
    if (codeCaches.get(key) === "asked") codeCaches.delete(key);
  };
  reply = router.addHandler(
    (msg) => {
      let cache: unknown = null;
      try {
        cache = msg.src === id && !msg.isDead ? msg.unpickle() : null;
      } catch {
        // not a value: no cache
      }
      if (cache instanceof Uint8Array && cache.byteLength <= 8 * 1024 * 1024) codeCaches.set(key, { rest: rest(new Uint8Array(cache)) });
      else drop();
    },
    { persist: false },
  );
  return { rest: rest(), reply, drop };
}

/** What `proxyConnect` needs: a spec whose id (and default name) the `via` context makes. */
export interface ProxySpec {
  name?: string;
  /** Default name, before the id: `local.` names the context `local.<id>`. */
  prefix: string;
  connectTimeout: number;
  method: Method;
}

/** Resolve a method's options into a spec, start the child here or `via` another context. */
async function start(router: Router, options: { name?: string; via?: Context; connectTimeout?: number }, method: Method, prefix: string): Promise<Context> {
  const connectTimeout = options.connectTimeout ?? 30_000;
  const via = options.via;
  if (!via) {
    const id = await router.allocateId();
    return connect(router, { id, name: options.name ?? `${prefix}${id}`, connectTimeout, method });
  }
  // The via context allocates the id: every id a context announces was allocated through its own link.
  const spec: ProxySpec = { ...(options.name === undefined ? {} : { name: options.name }), prefix, connectTimeout, method };
  const [id, name] = (await via.callModule("mitogen:parent", "proxyConnect", spec)) as [number, string];
  const ctx = router.contextById(id, name);
  ctx.via = via;
  return ctx;
}

/** {@link Router.local}: start a local context below `router`, or below `options.via`. */
export function local(router: Router, options: LocalOptions): Promise<Context> {
  const method: Method = {
    kind: "local",
    ...(options.runtime ? { runtime: options.runtime } : {}),
    ...(options.env ? { env: options.env } : {}),
    ...(options.cwd ? { cwd: options.cwd } : {}),
  };
  return start(router, options, method, "local.");
}

/** {@link Router.ssh}: start a context on another machine through the OpenSSH client. */
export function ssh(router: Router, options: SshOptions): Promise<Context> {
  if (!options.hostname) return Promise.reject(new StreamError("ssh: hostname is required"));
  const method: Method = {
    kind: "ssh",
    hostname: options.hostname,
    ...(options.username === undefined ? {} : { username: options.username }),
    ...(options.port === undefined ? {} : { port: options.port }),
    ...(options.identityFile === undefined ? {} : { identityFile: options.identityFile }),
    ...(options.password === undefined ? {} : { password: options.password instanceof Secret ? options.password : new Secret(options.password) }),
    ...(options.knownHostsFile === undefined ? {} : { knownHostsFile: options.knownHostsFile }),
    checkHostKeys: options.checkHostKeys ?? "enforce",
    sshArgs: options.sshArgs ?? [],
    sshPath: options.sshPath ?? "ssh",
    compression: options.compression ?? false,
    runtime: options.runtime ?? "auto",
  };
  return start(router, options, method, `ssh.${options.hostname}.`);
}

/** {@link Router.sudo}: start a context as another user on the machine of `router` (or of `options.via`). */
export function sudo(router: Router, options: SudoOptions): Promise<Context> {
  const username = options.username ?? "root";
  const method: Method = {
    kind: "sudo",
    username,
    ...(options.password === undefined ? {} : { password: options.password instanceof Secret ? options.password : new Secret(options.password) }),
    sudoPath: options.sudoPath ?? "sudo",
    sudoArgs: options.sudoArgs ?? [],
    ...(options.runtime ? { runtime: options.runtime } : {}),
  };
  return start(router, options, method, `sudo.${username}.`);
}

const wrap = (argv: (string | false | undefined)[], runtime?: string): Method => ({
  kind: "wrap",
  argv: argv.filter((a): a is string => typeof a === "string"),
  runtime: runtime ?? "auto",
});

/** {@link Router.docker}: `docker exec -i [-u user] <container> /bin/sh -c ...`. */
export function docker(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "docker", "exec", "-i", ...(o.username ? ["-u", o.username] : []), ...(o.args ?? []), o.container], o.runtime);
  return start(router, o, argv, `docker.${o.container}.`);
}

/** {@link Router.podman}: `podman exec -i [-u user] <container> /bin/sh -c ...`. */
export function podman(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "podman", "exec", "-i", ...(o.username ? ["-u", o.username] : []), ...(o.args ?? []), o.container], o.runtime);
  return start(router, o, argv, `podman.${o.container}.`);
}

/** {@link Router.kubectl}: `kubectl exec -i [-n namespace] [-c container] <pod> -- /bin/sh -c ...`. */
export function kubectl(router: Router, o: KubectlOptions): Promise<Context> {
  const argv = wrap(
    [
      o.path ?? "kubectl",
      ...(o.args ?? []),
      "exec",
      "-i",
      ...(o.namespace ? ["-n", o.namespace] : []),
      ...(o.container ? ["-c", o.container] : []),
      o.pod,
      "--",
    ],
    o.runtime,
  );
  return start(router, o, argv, `kubectl.${o.pod}.`);
}

/** {@link Router.lxc}: `lxc-attach -n <container> -- /bin/sh -c ...` (classic LXC). */
export function lxc(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "lxc-attach", ...(o.args ?? []), "-n", o.container, "--"], o.runtime);
  return start(router, o, argv, `lxc.${o.container}.`);
}

/** {@link Router.lxd}: `lxc exec --mode=non-interactive <container> -- /bin/sh -c ...` (LXD, Incus). */
export function lxd(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "lxc", "exec", "--mode=non-interactive", ...(o.args ?? []), o.container, "--"], o.runtime);
  return start(router, o, argv, `lxd.${o.container}.`);
}

/** {@link Router.setns}: enter every namespace of process `pid` (`nsenter -t <pid> -a`); needs root. */
export function setns(router: Router, o: SetnsOptions): Promise<Context> {
  const argv = wrap([o.path ?? "nsenter", "-t", String(o.pid), "-a", ...(o.args ?? []), "--"], o.runtime);
  return start(router, o, argv, `setns.${o.pid}.`);
}

/** {@link Router.jail}: `jexec [-U user] <jail> /bin/sh -c ...` (FreeBSD). */
export function jail(router: Router, o: JailOptions): Promise<Context> {
  const argv = wrap([o.path ?? "jexec", ...(o.username ? ["-U", o.username] : []), ...(o.args ?? []), o.jail], o.runtime);
  return start(router, o, argv, `jail.${o.jail}.`);
}

/** {@link Router.su}: start a context as another user through su (in a pty). */
export function su(router: Router, options: SuOptions): Promise<Context> {
  return terminalMethod(router, "su", options);
}

/** {@link Router.doas}: start a context as another user through doas (in a pty). */
export function doas(router: Router, options: SuOptions): Promise<Context> {
  return terminalMethod(router, "doas", options);
}

function terminalMethod(router: Router, kind: "su" | "doas", o: SuOptions): Promise<Context> {
  const username = o.username ?? "root";
  const method: Method = {
    kind,
    username,
    args: o.args ?? [],
    ...(o.password === undefined ? {} : { password: o.password instanceof Secret ? o.password : new Secret(o.password) }),
    ...(o.path ? { path: o.path } : {}),
    ...(o.runtime ? { runtime: o.runtime } : {}),
  };
  return start(router, o, method, `${kind}.${username}.`);
}

/** Run in a `via` context: allocate an id, start a child there. Resolves with its id and name. */
export const proxyConnect: (spec: ProxySpec, call: { router: Router }) => Promise<[number, string]> = takesRouter(
  async (spec: ProxySpec, call: { router: Router }): Promise<[number, string]> => {
    const ctx = await start(
      call.router,
      { ...(spec.name === undefined ? {} : { name: spec.name }), connectTimeout: spec.connectTimeout },
      spec.method,
      spec.prefix,
    );
    return [ctx.contextId, ctx.name];
  },
);
