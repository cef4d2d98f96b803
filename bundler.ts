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
import { basename, dirname, resolve } from "node:path";
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
const OWN = new Set(["mod.ts", "core.ts", "master.ts", "cli.ts"].map((f) => resolve(root, f)));
const cache = new Map<string, Promise<Entry>>();
let building = 0;

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

/** Bundle the module at `specifier` (a file URL or path); cached while its inputs are unchanged. */
export async function bundle(specifier: string | URL): Promise<Bundle> {
  const file = specifier instanceof URL || specifier.startsWith("file:") ? fileURLToPath(specifier) : resolve(specifier);
  const hit = cache.get(file);
  if (hit) {
    const entry = await hit.catch(() => null);
    if (entry && unchanged(entry)) return entry;
  }
  const pending = build(file);
  cache.set(file, pending);
  pending.catch(() => cache.delete(file));
  return pending;
}

async function build(file: string): Promise<Entry> {
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
      target: "es2022",
      metafile: true,
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
    const text = out.outputFiles?.[0]?.text ?? "";
    const hash = createHash("sha256").update(text).digest("hex").slice(0, 16);
    const inputs: Entry["inputs"] = Object.keys(out.metafile?.inputs ?? {}).map((p) => {
      const abs = resolve(dirname(file), p);
      const st = statSync(abs);
      return [abs, st.mtimeMs, st.size];
    });
    return { name: `${basename(file)}@${hash}`, code: deflateRawSync(text), rawSize: text.length, inputs };
  } catch (err) {
    const errors = (err as { errors?: { text: string; location?: { file: string; line: number; column: number } | null }[] }).errors;
    if (!errors?.length) throw err;
    const where = errors.map((e) => (e.location ? `${resolve(dirname(file), e.location.file)}:${e.location.line}:${e.location.column}: ${e.text}` : e.text));
    throw new MitogenError(`cannot bundle ${file}:\n${where.join("\n")}`, { cause: err });
  } finally {
    // No esbuild service process outlives the bundling (the cache makes rebuilds rare).
    if (--building === 0) await esbuild.stop();
  }
}
