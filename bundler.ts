/**
 * Master-only: bundles a module for {@link Context.import} with esbuild.
 *
 * The module and everything it imports (TypeScript, relative imports, npm
 * packages from the caller's node_modules) become one CommonJS script.
 * `node:` builtins stay external (the child's runtime has them), and so does
 * `mitogen` (the core already running in the child). The script is named by
 * its content hash, so a changed file is a new module and an unchanged one is
 * bundled once per master process.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { statSync } from "node:fs";
import { SourceMap } from "node:module";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { deflateRawSync } from "node:zlib";
import { MitogenError } from "./core.ts";

/** A bundled module, ready to ship. */
export interface Bundle {
  /** `<file>@<hash>`: the module's name on the wire. */
  name: string;
  /** The raw-deflated CommonJS script. */
  code: Uint8Array;
  /** Bytes before compression. */
  rawSize: number;
}

type Entry = Bundle & { inputs: [path: string, mtimeMs: number, size: number][] };

const root = dirname(fileURLToPath(import.meta.url));
/** This package's own entry points: importing them from a shipped module means the running core. */
const OWN = new Set(["mod.ts", "core.ts", "frames.ts", "select.ts", "master.ts", "cli.ts"].map((f) => resolve(root, f)));
const cache = new Map<string, Promise<Entry>>();
/** Source maps of every module bundled here, by module name, for {@link mapStack}. */
const maps = new Map<string, { map: SourceMap; dir: string }>();
/** evaluateModule (core.ts) puts one line of its own before the script. */
const FUNCTION_HEADER_LINES = 1;
let building = 0;
let idle: ReturnType<typeof setTimeout> | undefined;
/** esbuild's service process is stopped after this long without a build. */
const IDLE_STOP_MS = 300;

function unchanged(entry: Entry): boolean {
  for (const [path, mtimeMs, size] of entry.inputs) {
    try {
      const st = statSync(path);
      if (st.mtimeMs !== mtimeMs || st.size !== size) return false;
    } catch {
      return false;
    }
  }
  return true;
}

/**
 * The esbuild target for a context's runtime (`node 12.22.12` is `node12.22`, `deno 1.46.3` is
 * `deno1.46`); for an unknown one, the oldest a child runs on.
 */
export function bundleTarget(runtime: string | null): string {
  const m = runtime ? /^(node|deno) (\d+)\.(\d+)/.exec(runtime) : null;
  return m ? `${m[1]}${m[2]}.${m[3]}` : "node12";
}

/**
 * Bundle the module at `specifier` (a file URL or path) for esbuild `target`
 * (see {@link bundleTarget}); cached per target while its inputs are unchanged.
 */
export async function bundle(specifier: string | URL, target = "es2022"): Promise<Bundle> {
  const file = specifier instanceof URL || specifier.startsWith("file:") ? fileURLToPath(specifier) : resolve(specifier);
  const key = `${target}:${file}`;
  const hit = cache.get(key);
  if (hit) {
    const entry = await hit.catch(() => null);
    if (entry && unchanged(entry)) return entry;
  }
  const pending = build(file, target);
  cache.set(key, pending);
  pending.catch(() => cache.delete(key));
  return pending;
}

async function build(file: string, target: string): Promise<Entry> {
  const esbuild = await import("esbuild").catch((err: unknown) => {
    throw new MitogenError("ctx.import() needs the esbuild package on the master (npm install esbuild)", { cause: err });
  });
  building++;
  try {
    const out = await esbuild.build({
      entryPoints: [file],
      absWorkingDir: dirname(file),
      bundle: true,
      write: false,
      format: "cjs",
      platform: "node",
      target,
      metafile: true,
      sourcemap: "external",
      outfile: join(dirname(file), "mitogen-bundle.js"),
      logLevel: "silent",
      plugins: [
        {
          name: "mitogen-is-the-running-core",
          setup(b) {
            b.onResolve({ filter: /^mitogen$/ }, () => ({ path: "mitogen", external: true }));
            b.onResolve({ filter: /\.ts$/ }, (args) => {
              const target = resolve(args.resolveDir, args.path);
              return OWN.has(target) ? { path: "mitogen", external: true } : undefined;
            });
          },
        },
      ],
    });
    const js = out.outputFiles?.find((f) => f.path.endsWith(".js"))?.text ?? "";
    const mapText = out.outputFiles?.find((f) => f.path.endsWith(".js.map"))?.text;
    const hash = createHash("sha256").update(js).digest("hex").slice(0, 16);
    const name = `${basename(file)}@${hash}`;
    // Stack frames of the shipped code then read mitogen:///<name>:line:col (see mapStack).
    const text = `${js}\n//# sourceURL=mitogen:///${name}\n`;
    if (mapText) maps.set(name, { map: new SourceMap(JSON.parse(mapText)), dir: dirname(file) });
    const inputs: Entry["inputs"] = Object.keys(out.metafile?.inputs ?? {}).map((p) => {
      const abs = resolve(dirname(file), p);
      const st = statSync(abs);
      return [abs, st.mtimeMs, st.size];
    });
    return { name, code: deflateRawSync(text), rawSize: Buffer.byteLength(text), inputs };
  } catch (err) {
    const errors = (err as { errors?: { text: string; location?: { file: string; line: number; column: number } | null }[] }).errors;
    if (!errors?.length) throw err;
    const where = errors.map((e) => (e.location ? `${resolve(dirname(file), e.location.file)}:${e.location.line}:${e.location.column}: ${e.text}` : e.text));
    throw new MitogenError(`cannot bundle ${file}:\n${where.join("\n")}`, { cause: err });
  } finally {
    // Keep esbuild's service for bursts of bundling, but let no process outlive them for long.
    if (--building === 0) {
      clearTimeout(idle);
      idle = setTimeout(() => {
        if (building === 0) void esbuild.stop();
      }, IDLE_STOP_MS);
      (idle as { unref?: () => void }).unref?.();
    }
  }
}

/** Rewrite stack frames in shipped modules (`mitogen:///<name>:line:col`) to the original file and line. */
export function mapStack(stack: string): string {
  // Node prints "mitogen:///name:5:7"; Deno "mitogen:///name, <anonymous>:5:7".
  return stack.replace(/mitogen:\/\/\/([^:,\s()]+)(?:, <anonymous>)?:(\d+):(\d+)/g, (whole, name: string, line: string, column: string) => {
    const known = maps.get(name);
    if (!known) return whole;
    const entry = known.map.findEntry(Number(line) - 1 - FUNCTION_HEADER_LINES, Number(column) - 1) as {
      originalSource?: string;
      originalLine?: number;
      originalColumn?: number;
    };
    if (entry.originalSource === undefined || entry.originalLine === undefined) return whole;
    const source = entry.originalSource.startsWith("file:") ? fileURLToPath(entry.originalSource) : resolve(known.dir, entry.originalSource);
    return `${source}:${entry.originalLine + 1}:${(entry.originalColumn ?? 0) + 1}`;
  });
}
