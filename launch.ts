/**
 * Starting one child process, whatever the method: the `Launch` a method's launch builder makes
 * (executable, arguments, where the stream is, how to read the child's stderr while it connects),
 * the `Spawned` child it becomes, and `spawnLaunch`, which starts it in a session of its own
 * (through `node:child_process`, or Deno.Command under Deno: see spawn.ts). Part of `mitogen:parent`.
 *
 * @module
 */
import { builtin, isDeno } from "./runtime.ts";
import type { nodeTransport } from "./transport.ts";
import { StreamError } from "./errors.ts";
import { type DenoProcess, denoSpawn, killGroup } from "./spawn.ts";

/** A child being started, as the launch builders and bootstrap see it (start.ts's ConnectSpec is one). */
export interface Starting {
  id: number;
  name: string;
  /** Milliseconds from spawn to the child's CONNECTED marker. */
  connectTimeout: number;
  /** Its method ("local", "ssh", ...): a child on this machine watches this context's pid. */
  method: { kind: string };
  /** The method as contexts list it (`docker` where `method.kind` is `wrap`); default `method.kind`. */
  label?: string;
  /** Named by default after the process: `name` is the prefix, `.<pid>` is added once it runs. */
  namedByPid?: boolean;
}

/** How to start one child process, whatever the method. */
export interface Launch {
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
  /**
   * No prompt can come on the stream (OpenSSH asks through SSH_ASKPASS): the core and CONFIGURE go at
   * once, without waiting for READY, and the child is handed out before it has connected.
   */
  pipeline?: boolean;
  /** A local node child: the core goes with V8's code cache for it, kept under this key (see codecache.ts). */
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

type R = Parameters<typeof nodeTransport>[0];
type W = Parameters<typeof nodeTransport>[1];

/** A started child: a process, or anything shaped like one (an in-process ssh channel). */
export interface Spawned {
  /** What was started, for messages ("ssh", "/usr/bin/node"). */
  what: string;
  /** Its process id, when it is a process here (a default `local.<pid>` name takes it). */
  pid?: number;
  reader: R;
  writer: W;
  /** User output, when the stream is elsewhere (a local node child's stdout). */
  stdout?: R;
  stderr: R;
  /** Resolves once it has gone and its output is drained. */
  gone: Promise<void>;
  /** How it ended ("exited with code 1"), or null while it runs. */
  status(): string | null;
  /** A process's exit code once it has exited; null while it runs or when a signal ended it. */
  exitCode?(): number | null;
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
export async function spawnLaunch(launch: Launch): Promise<Spawned> {
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
    ...(proc.pid === undefined ? {} : { pid: proc.pid }),
    reader,
    writer,
    ...(launch.stdoutIsOutput ? { stdout } : {}),
    stderr,
    gone: new Promise<void>((resolve) => {
      proc.once("close", () => resolve());
      proc.once("exit", () => {
        kill();
        // Our ends close once nothing has come on them for 200 ms. The check runs after a poll phase (setImmediate):
        // on a busy loop the timer may fire before output already in the pipes is read, which would be lost.
        // A reader paused by its consumer (flow control) counts as busy: what waits in its pipe is still to be read.
        const pipes = proc.stdio as unknown as ({ bytesRead?: number; readableFlowing?: boolean | null; destroy?(): void } | null)[];
        const read = () => pipes.reduce((n, p) => n + (p?.bytesRead ?? 0), 0);
        let seen = read();
        let timer: ReturnType<typeof setTimeout> | undefined;
        let closed = false;
        const check = () => {
          if (closed) return;
          const now = read();
          if (now === seen && !pipes.some((p) => p?.readableFlowing === false)) for (const p of pipes) p?.destroy?.();
          else {
            seen = now;
            arm();
          }
        };
        const arm = () => {
          timer = setTimeout(() => setImmediate(check), 200);
        };
        arm();
        proc.once("close", () => {
          closed = true;
          clearTimeout(timer);
        });
      });
    }),
    status: () => (proc.exitCode === null && proc.signalCode === null ? null : endedAs(proc.exitCode, proc.signalCode)),
    exitCode: () => proc.exitCode,
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
    pid,
    reader: p.stdout,
    writer: p.stdin,
    stderr: p.stderr,
    gone: p.gone,
    status: () => {
      const s = p.status();
      return s === null ? null : endedAs(s.code, s.signal);
    },
    exitCode: () => {
      const s = p.status();
      return s === null || s.signal ? null : s.code;
    },
    kill,
    onError: () => {},
  };
}
