/**
 * The version gate: the runtimes a child runs on (node 12 and later, deno 1.46 and later), what a
 * first stage's READY line says (which runtime, too old, or which core payload it runs), and how a
 * program that is no runtime is named in errors. Part of `mitogen:parent`.
 *
 * @module
 */
import { CORE } from "./frames.ts";
import { StreamError } from "./errors.ts";

/** The oldest runtimes a child runs on: [major, minor]. */
export const OLDEST = { node: [12, 0], deno: [1, 46] } as const;
/** Node before this runs the core lowered for Node 12 (no ES2022 class syntax). */
export const MODERN_NODE = [16, 11] as const;
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

/** `<exe> is not node or deno (its --version says "Python 3.11.2"): children need ...`. */
export function notRuntime(exe: string, said: string): string {
  return `${exe} is not node or deno (${said ? `its --version says ${JSON.stringify(said.slice(0, 100))}` : "it prints no --version"}): ${SUPPORTED}`;
}
