/**
 * A subprocess in this context with its stdin, stdout and stderr tunnelled
 * through the tree: the remote half of fakessh (`rsync --server`, `scp -t`,
 * `git-upload-pack`). Shipped as `mitogen:tunnel`, fetched by a context the
 * first time it runs one; not part of the child payload.
 *
 * Every direction is flow-controlled: stdout and stderr are read only while
 * their Sender's window has room, and stdin is taken from its Receiver only
 * as fast as the process drains its pipe.
 *
 * @module
 */
import { builtin, isDeno, nodeProcess } from "./runtime.ts";
import { Receiver, type Sender } from "./channels.ts";
import { takesRouter } from "./calls.ts";
import type { CallContext } from "./dispatch.ts";
import { denoSpawn, killGroup, type PipeWriter } from "./spawn.ts";

/** Between SIGTERM and SIGKILL when a command is stopped: time for rsync or scp to remove a partial file. */
const GRACE_MS = 2000;

/** What {@link exec} runs, and where its output goes. */
export interface ExecSpec {
  /** A shell command line, run as ssh runs one: `sh -c <command>` in the home directory. */
  command: string;
  /** Variables added to this context's environment for the command. */
  env?: Record<string, string>;
  /** Receives `{ ready: Sender }` (where stdin goes) once the process runs. */
  ctl: Sender;
  stdout: Sender;
  stderr: Sender;
}

/** Where a call can go: a Context, or a CallScope of one (`ctx.with({ signal })`). */
interface Callee {
  callModule(module: string, name: string, ...args: unknown[]): Promise<unknown>;
}

/**
 * The one way to call {@link exec} in `ctx` (PROTOCOL.md, "Library calls"):
 *
 *     mitogen:tunnel#exec   { command, env?, ctl, stdout, stderr }   reply { code, signal }
 *       ctl <- { ready: Sender } (where stdin goes); stdout, stderr <- chunks, each closed at its end
 */
export function callExec(ctx: Callee, spec: ExecSpec): Promise<ExecResult> {
  return ctx.callModule("mitogen:tunnel", "exec", spec) as Promise<ExecResult>;
}

/** How the process ended: its exit code, or the signal that killed it. */
export interface ExecResult {
  code: number | null;
  signal: string | null;
}

/** The readable half both runtimes give: data events, with pause and resume. */
interface Readable {
  on(event: "data", cb: (chunk: Uint8Array) => void): unknown;
  on(event: "end" | "close", cb: () => void): unknown;
  on(event: "error", cb: (err: Error) => void): unknown;
  pause(): unknown;
  resume(): unknown;
}

interface Proc {
  stdin: PipeWriter;
  stdout: Readable;
  stderr: Readable;
  /** Resolves once it exited and its output was read to the end. */
  ended: Promise<ExecResult>;
  /** Stop it as a hang-up does: SIGTERM to its process group, SIGKILL after {@link GRACE_MS}. */
  stop(): void;
}

/**
 * A command's guard: a `sh` started with it, given its process group, reading
 * a pipe only this process holds (close-on-exec). It reads EOF when this
 * context ends, however it ends (shutdown, its parent gone, SIGKILL), and then
 * stops the group as a hang-up does: SIGTERM, then SIGKILL after the grace
 * period. Once the command is done with, it is killed. It first closes fds 3
 * and 4, the context's stream behind a shell (ssh: not close-on-exec), so that
 * it never holds an ssh session open while it waits.
 */
const GUARD = `exec 3<&- 4>&-; trap '' HUP INT TERM PIPE; read -r _; kill -s TERM -- -$0 2>/dev/null && sleep ${GRACE_MS / 1000} && kill -s KILL -- -$0 2>/dev/null`;

/** Start the guard of process group `pgid`; returns what ends it. Without one (it cannot start), nothing. */
function guard(pgid: number): () => void {
  try {
    if (isDeno) {
      type DenoGuard = { pid: number; unref(): void; kill(signal: string): void; status: Promise<unknown> };
      const Command = (globalThis as unknown as { Deno: { Command: new (exe: string, o: object) => { spawn(): DenoGuard } } }).Deno.Command;
      const child = new Command("/bin/sh", { args: ["-c", GUARD, String(pgid)], stdin: "piped", stdout: "null", stderr: "null", detached: true }).spawn();
      child.unref();
      child.status.catch(() => {});
      return () => {
        try {
          child.kill("SIGKILL");
        } catch {
          // gone
        }
      };
    }
    const child = builtin("node:child_process").spawn("/bin/sh", ["-c", GUARD, String(pgid)], { stdio: ["pipe", "ignore", "ignore"], detached: true });
    child.on("error", () => {});
    child.stdin?.on("error", () => {});
    child.unref();
    return () => child.kill("SIGKILL");
  } catch {
    return () => {};
  }
}

function signalGroup(pgid: number, signal: "SIGTERM" | "SIGKILL"): void {
  try {
    nodeProcess().kill(-pgid, signal);
  } catch {
    // the group is empty
  }
}

/**
 * `sh -c command` in a process group of its own, known to the guard. At its
 * exit, what it left behind in its group is killed; once stopped, the group
 * gets SIGTERM and, whatever is left of it after the grace period, SIGKILL.
 */
function start(spec: ExecSpec): Proc {
  const home = builtin("node:os").homedir();
  const env = { ...nodeProcess().env, ...spec.env };
  let pid = 0;
  let stopping = false;
  let finished = false;
  let unguard = () => {};
  /** Done with the group: nothing of it is left running (killed), and its guard goes. */
  const finish = () => {
    if (!pid || finished) return; // never started: no group (and kill(-0) would be this process's own)
    finished = true;
    killGroup(pid);
    unguard();
  };
  const stop = () => {
    if (stopping || finished || !pid) return;
    stopping = true;
    signalGroup(pid, "SIGTERM");
    setTimeout(finish, GRACE_MS);
  };
  /** At the exit of `sh`: its leftovers go with it, unless the grace period runs. */
  const exited = () => {
    if (!stopping) finish();
  };
  if (isDeno) {
    // Its output is read to the end, as under Node (and sshd): the group is gone by then, unless something left it.
    const p = denoSpawn("/bin/sh", ["-c", spec.command], env, home, exited, null);
    pid = p.pid;
    unguard = guard(pid);
    return {
      stdin: p.stdin,
      stdout: p.stdout as unknown as Readable,
      stderr: p.stderr as unknown as Readable,
      ended: p.gone.then(() => p.status() ?? { code: null, signal: null }),
      stop,
    };
  }
  const proc = builtin("node:child_process").spawn("/bin/sh", ["-c", spec.command], { cwd: home, env, detached: true, stdio: "pipe" });
  pid = proc.pid ?? 0;
  if (pid) unguard = guard(pid);
  return {
    stdin: proc.stdin as unknown as PipeWriter,
    stdout: proc.stdout as unknown as Readable,
    stderr: proc.stderr as unknown as Readable,
    ended: new Promise((resolve, reject) => {
      proc.once("error", reject);
      proc.once("close", (code: number | null, signal: string | null) => {
        exited();
        resolve({ code, signal });
      });
    }),
    stop,
  };
}

/** Send what `from` reads to `to`, pausing while the window is full; closes `to` at the end. */
function pump(from: Readable, to: Sender): Promise<void> {
  return new Promise<void>((resolve) => {
    let sending = Promise.resolve();
    from.on("data", (chunk) => {
      from.pause();
      sending = to.send(chunk).then(
        () => void from.resume(),
        () => void from.resume(), // the other end is gone: read on to the end, dropping it
      );
    });
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      void sending.then(() => {
        to.close();
        resolve();
      });
    };
    from.on("end", finish);
    from.on("close", finish);
    from.on("error", finish);
  });
}

/**
 * Run `spec.command` here with its stdio tunnelled: stdin from the Sender
 * this sends on `spec.ctl` (a closed channel is end of input), stdout and
 * stderr to `spec.stdout` and `spec.stderr` (each closed at its end).
 * Resolves with how it ended once its output is all sent. The call's
 * cancellation or deadline stops its process group (SIGTERM, then SIGKILL
 * after 2 s), and so does the end of this context (see the guard).
 */
export const exec: (spec: ExecSpec, call: CallContext) => Promise<ExecResult> = takesRouter(async (spec: ExecSpec, call: CallContext): Promise<ExecResult> => {
  const proc = start(spec);
  const stdin = new Receiver(call.router, { respondent: spec.ctl.context });
  const onAbort = () => {
    proc.stop();
    stdin.close();
  };
  call.signal.addEventListener("abort", onAbort);
  try {
    const output = Promise.all([pump(proc.stdout, spec.stdout), pump(proc.stderr, spec.stderr)]);
    proc.stdin.on("error", () => {}); // it exited without reading all of its input
    void (async () => {
      try {
        for await (const msg of stdin) {
          const data = msg.unpickle();
          if (!(data instanceof Uint8Array)) continue;
          if (!proc.stdin.write(data)) await new Promise<void>((resolve) => proc.stdin.once("drain", resolve));
        }
      } catch {
        // the channel failed: end its input as at EOF
      }
      proc.stdin.end();
    })();
    await spec.ctl.send({ ready: stdin.toSender() });
    const [result] = await Promise.all([proc.ended, output]);
    return result;
  } finally {
    call.signal.removeEventListener("abort", onAbort);
    stdin.close();
  }
});
