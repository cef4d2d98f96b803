/**
 * The local method: a child on this machine, run by node or deno (or any executable that is one,
 * asked `--version` first), under `setpriv --pdeathsig` where it can be. Part of `mitogen:parent`.
 *
 * @module
 */
import { builtin, compiledDeno, isDeno, nodeProcess, runtimeCommand } from "./runtime.ts";
import { PDEATHSIG_ENV } from "./watchdog.ts";
import { StreamError, TimeoutError } from "./errors.ts";
import { DENO_EVAL, firstStage, missingRuntime, oddName, remoteCommand } from "./firststage.ts";
import type { Launch, Starting } from "./launch.ts";
import { failedExec, pdeathsigTool } from "./setpriv.ts";
import { denoSpawn, killGroup } from "./spawn.ts";
import { notRuntime } from "./versions.ts";
import { which } from "./which.ts";

/** What the local method needs (see LocalOptions); plain data, so it can be sent to a `via` context. */
export interface LocalSpec {
  runtime?: string;
  env?: Record<string, string>;
  cwd?: string;
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

/**
 * A runtime named `node` or `deno` that is not on PATH. A program made with `deno compile`
 * (`compiled`) says why it looked there: its own executable runs only itself.
 */
export function notOnPath(name: string, kind: "node" | "deno", path: string | undefined, compiled = false): StreamError {
  const why = compiled ? "this program was made with deno compile, whose executable runs only itself, and there is " : "";
  const other = kind === "node" ? "deno" : "node";
  return new StreamError(
    `${name}: runtime "${kind}": ${why}no ${kind} on PATH (${path ?? ""}); install ${kind === "node" ? "Node" : "Deno"}, or give runtime: "${other}" or the path of a ${kind}`,
  );
}

/** The local method's launch builder (options: LocalOptions). */
export async function localLaunch(spec: Starting, m: LocalSpec, t0: number): Promise<Launch> {
  // Default: the runtime of the context doing the starting (decided here, not where the request came from).
  const runtime = m.runtime ?? (isDeno ? "deno" : "node");
  const cmd = oddName(runtime)
    ? { kind: await probeRuntime(runtime, spec.name, t0 + spec.connectTimeout, spec.connectTimeout), exe: runtime }
    : runtimeCommand(runtime);
  const stage = firstStage(cmd.kind);
  const env: Record<string, string | undefined> = { ...nodeProcess().env, DENO_NO_UPDATE_CHECK: "1", DENO_NO_PROMPT: "1", ...m.env };
  // A bare name is looked up here, to say so if it is missing (not "spawn deno ENOENT"). Where there is no node, a
  // Deno master's child processes would run Deno's own node shim, which is no Node ("require is not defined").
  const bare = cmd.exe === "node" || cmd.exe === "deno" ? cmd.exe : null;
  const exe = bare ? which(bare, env.PATH) : cmd.exe;
  if (bare && exe === null) throw notOnPath(spec.name, bare, env.PATH, compiledDeno && bare === "deno");
  if (isDeno && cmd.kind === "node" && exe) {
    // Deno starts processes with three pipes only (see spawnLaunch): a node child's stream is moved
    // to fds 3 and 4 by a shell, as behind ssh, and what it prints arrives as stderr.
    return {
      exe: "/bin/sh",
      args: ["-c", remoteCommand(exe, spec.name, false, true, true)],
      env,
      ...(m.cwd === undefined ? {} : { cwd: m.cwd }),
      streamOn: "stdio",
      plain: true,
      codeCache: `${cmd.exe}\0${env.NODE_OPTIONS ?? ""}`,
      stdoutIsOutput: false,
      // The shell's complaint, or the remote command's own (see remoteCommand): as a failed spawn says it.
      watch: (line) =>
        line.includes(`${cmd.exe}: not found`) || missingRuntime(line)
          ? new StreamError(`cannot start ${cmd.exe}: not found (ENOENT)`)
          : failedExec(line, cmd.exe),
    };
  }
  // The kernel kills a node child when this process dies (see watchParent in watchdog.ts); Deno does it itself.
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
