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
    } catch {
      // not here, or not executable
    }
  }
  return null;
}
