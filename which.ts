/**
 * `which`: where a command is on a PATH. Not in the child payload; the master
 * and `mitogen:parent` (which looks for setpriv) use it, on Node and Deno.
 *
 * @module
 */
import { builtin, nodeProcess } from "./runtime.ts";

/**
 * The first `<dir>/<name>` that this process may execute, for the directories of `path` (default:
 * this process's PATH) in order; null when there is none. Only absolute directories are looked in:
 * an empty or relative entry means the working directory, no place to find a tool in.
 */
export function which(name: string, path: string = nodeProcess().env.PATH ?? ""): string | null {
  const fs = builtin("node:fs");
  for (const dir of path.split(":")) {
    if (!dir.startsWith("/")) continue;
    const file = `${dir}/${name}`;
    try {
      fs.accessSync(file, fs.constants.X_OK);
      return file;
    } catch (err) {
      // Not here, or not executable; or Deno, which asks --allow-sys=uid for X_OK: then the mode says.
      if (!(err instanceof Error) || /^E[A-Z]+$/.test((err as { code?: string }).code ?? "")) continue;
      try {
        const st = fs.statSync(file);
        if (st.isFile() && (st.mode & 0o111) !== 0) return file;
      } catch {
        // not here
      }
    }
  }
  return null;
}
