/**
 * The parent-death signal for a local node child: util-linux's `setpriv --pdeathsig KILL`, found
 * once per process, and its complaint when it could not run the runtime. Part of `mitogen:parent`.
 *
 * @module
 */
import { builtin, isDeno, nodeProcess } from "./runtime.ts";
import { StreamError } from "./errors.ts";
import { which } from "./which.ts";

let setpriv: Promise<string | null> | undefined;

/**
 * util-linux's `setpriv` where it has `--pdeathsig` (2.33 and later), found on PATH and tried once
 * per process; null elsewhere (not Linux, or a Deno context, which runs children through a shell).
 */
export function pdeathsigTool(): Promise<string | null> {
  setpriv ??= new Promise((resolve) => {
    const proc = nodeProcess();
    if (isDeno || proc.platform !== "linux") return resolve(null);
    const found = which("setpriv", proc.env.PATH ?? "/usr/bin:/bin");
    if (!found) return resolve(null);
    builtin("node:child_process").execFile(found, ["--pdeathsig", "KILL", "true"], { timeout: 5000 }, (err) => resolve(err ? null : found));
  });
  return setpriv;
}

/** setpriv's complaint that it could not run `exe` (it exits 127 or 126), as a start that failed. */
export function failedExec(line: string, exe: string): StreamError | undefined {
  const said = `setpriv: failed to execute ${exe}: `;
  return line.startsWith(said) ? new StreamError(`cannot start ${exe}: ${line.slice(said.length)}`) : undefined;
}
