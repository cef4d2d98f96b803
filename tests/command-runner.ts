/** Runs the built `mitogen` command (dist/mitogen.mjs) as a process, for the CLI tests. */
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { findProgram } from "../lab/hosts.ts";

/** The single file the tests run. */
export const DIST: string = fileURLToPath(new URL("../dist/mitogen.mjs", import.meta.url));
/** The node that runs it (the one on PATH, as `npx` would). */
export const NODE: string = findProgram("node") ?? "node";

/** Run `mitogen ...args`; its exit code, stdout and stderr (never rejects). */
export function mitogen(args: string[], options: { timeout: number }): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(NODE, [DIST, ...args], { timeout: options.timeout, env: { ...process.env, NO_COLOR: "1" } }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? 1) : 0;
      resolve({ code: typeof code === "number" ? code : 1, stdout, stderr });
    });
  });
}
