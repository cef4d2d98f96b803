/**
 * The parent watchdog: a child kills itself (SIGKILL) once its parent is
 * gone, even while user code blocks its event loop (see ARCHITECTURE.md,
 * "The watchdog").
 *
 * @module
 */
import { builtin, deno } from "./runtime.ts";

/**
 * The environment variable a parent sets when it starts a Node child under `setpriv --pdeathsig KILL`
 * (see ARCHITECTURE.md, "The watchdog"): `<pid>:<euid>`, the process whose death kills the child and the
 * effective uid it was set under (a change of credentials clears the signal).
 */
export const PDEATHSIG_ENV = "MITOGEN_PDEATHSIG";

/** Did this process start with AT_SECURE (setuid, setgid, file capabilities), which clears the parent-death signal? Unknown: true. */
function secureExec(): boolean {
  try {
    // openSync and readSync: readFileSync costs a first caller twice as much (1 to 2 ms).
    const fs = builtin("node:fs") as typeof import("node:fs");
    const fd = fs.openSync("/proc/self/auxv", "r");
    const a = Buffer.alloc(4096);
    const n = fs.readSync(fd, a, 0, a.length, 0);
    fs.closeSync(fd);
    const w = /64/.test(process.arch) ? 8 : 4;
    const le = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
    const at = (i: number) => (le ? a.readUInt32LE(i) : a.readUInt32BE(i + w - 4));
    for (let i = 0; i + 2 * w <= n; i += 2 * w) if (at(i) === 23) return at(i + w) !== 0; // AT_SECURE
  } catch {
    // no /proc: nothing is known
  }
  return true;
}

/**
 * Kill this process (SIGKILL) once its parent is gone, even while user code
 * blocks the event loop, and say how: `kernel` when the parent started this
 * Node process under `setpriv --pdeathsig KILL` (it sets {@link PDEATHSIG_ENV}
 * to its own pid, which must be our parent's) or, on Linux, a Deno process
 * (`prctl(PR_SET_PDEATHSIG)` through FFI): the kernel does it when the parent
 * process dies; not if a wrapper in between forked (another parent) or
 * changed user (another euid), or if the runtime started with AT_SECURE.
 * Otherwise `worker`: a worker thread checks every 200 ms
 * whether the parent process changed (getppid). `pid` is the parent context,
 * when it runs on this machine but is not the parent process (sudo, su, doas,
 * a wrapper script between them): the worker also ends this process when
 * `pid` has gone.
 */
export function watchParent(pid = 0): "kernel" | "worker" {
  const ppid = deno ? deno.ppid : process.ppid;
  pid = pid === ppid ? 0 : pid | 0;
  const src = (d: string) =>
    `const k=${d}.kill,g=p=>{try{k(p,0)}catch(e){return/ESRCH|NotFound/.test(e.code+e.name)}};` +
    `setInterval(()=>{if(${d}.ppid!==${ppid}||${pid}&&g(${pid}))k(${d}.pid,"SIGKILL")},200)`;
  if (deno) {
    try {
      // PR_SET_PDEATHSIG (1), SIGKILL (9)
      if (deno.build.os === "linux" && deno.dlopen("libc.so.6", { prctl: { parameters: ["i32", "i32"], result: "i32" } }).symbols.prctl?.(1, 9) === 0 && !pid)
        return "kernel";
    } catch {
      // no FFI here: the worker watches the parent too
    }
    new (globalThis as unknown as { Worker: new (url: string, o: object) => unknown }).Worker(`data:text/javascript,${encodeURIComponent(src("Deno"))}`, {
      type: "module",
    });
    return "worker";
  }
  // Set for this process only: user code and the children it starts do not see it.
  const by = process.env[PDEATHSIG_ENV];
  delete process.env[PDEATHSIG_ENV];
  if (!pid && by === `${ppid}:${process.geteuid?.()}` && !secureExec()) return "kernel";
  // A failing watchdog must not take the process with it. Its own stdio (not piped to ours) and a shared
  // environment make it cheaper to start.
  const wt = builtin("node:worker_threads");
  new wt.Worker(src("process"), { eval: true, stdout: true, stderr: true, env: wt.SHARE_ENV }).on("error", () => {}).unref();
  return "worker";
}
