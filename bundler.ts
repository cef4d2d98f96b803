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
 * Under Deno it also resolves what Deno users write: `npm:` and `jsr:`
 * specifiers and the names of the nearest deno.json's `imports` (see
 * {@link denoResolve}, {@link jsrResolve}; under Node `jsr:` is refused),
 * and it takes esbuild from `npm:esbuild@<ESBUILD_VERSION>` when there is no
 * `esbuild` to import.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { existsSync, readFileSync, realpathSync, statSync } from "node:fs";
import { execFile } from "node:child_process";
import * as nodeModule from "node:module";
import { createRequire, isBuiltin, SourceMap } from "node:module";
import { basename, dirname, isAbsolute, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { deflateRawSync } from "node:zlib";
import { MitogenError } from "./errors.ts";
import { NeedsBundlerError, plainModule } from "./plainmodule.ts";

/** A bundled module, ready to ship. */
export interface Bundle {
  /** `<file>@<hash>`: the module's name on the wire. */
  name: string;
  /** The raw-deflated CommonJS script. */
  code: Uint8Array;
  /** Bytes before compression. */
  rawSize: number;
  /** The names the module exports, as the script's own export table gives them; null where it has none (a CommonJS entry). */
  exports: string[] | null;
}

type Entry = Bundle & { inputs: [path: string, mtimeMs: number, size: number][] };

/** The esbuild a Deno master without one fetches (`npm:esbuild@...`); build.ts checks it is package.json's. */
export const ESBUILD_VERSION = "0.28.2";
/**
 * This package's own entry points, and the core's files that define its public names: importing them
 * from a shipped module means the running core. So does the file this module was loaded from, which
 * is the single file (`./mitogen.mjs`, copied beside the script) when the library runs from it.
 */
const OWN_FILES = ["mod.ts", "core.ts", "frames.ts", "stream.ts", "select.ts", "channels.ts", "context.ts", "router.ts", "calls.ts", "master.ts", "cli.ts"];
/** Files whose stack frames are this library's, not the caller of ctx.import (see {@link callerFile}). */
const LIBRARY_FRAMES = new Set([
  import.meta.url,
  ...["bundler.ts", "master.ts", "core.ts", "context.ts", "router.ts", "session.ts"].map((f) => new URL(f, import.meta.url).href),
]);
let own: Set<string> | undefined;
/** OWN_FILES and this module's own file, as real paths; empty when this module was loaded from elsewhere than a file (a URL, JSR). */
function ownFiles(): Set<string> {
  own ??= new Set(
    import.meta.url.startsWith("file:")
      ? [import.meta.url, ...OWN_FILES.map((f) => new URL(f, import.meta.url).href)].map((url) => real(fileURLToPath(url)))
      : [],
  );
  return own;
}

/** `path` with its symlinks resolved, or as it is when it does not exist. */
function real(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}
const cache = new Map<string, Promise<Entry>>();
/** Source maps of every module bundled here, by module name, for {@link mapStack}. */
const maps = new Map<string, { map: SourceMap; dir: string }>();
/** evaluateModule (calls.ts) puts one line of its own before the script. */
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
  // Before any await: the stack still holds the caller of ctx.import.
  const file = moduleFile(specifier);
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

/** The file `specifier` (a file URL, a path, or `./x.ts` beside the file that called the library) means. */
export function moduleFile(specifier: string | URL): string {
  return specifier instanceof URL || specifier.startsWith("file:")
    ? fileURLToPath(specifier)
    : /^\.\.?\//.test(specifier)
      ? relativeToCaller(specifier)
      : resolve(specifier);
}

/** The file a relative `ctx.import("./x.ts")` means: beside the file that called it. */
function relativeToCaller(specifier: string): string {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 30;
  const stack = new Error().stack ?? "";
  Error.stackTraceLimit = limit;
  const caller = callerFile(stack);
  if (!caller) {
    throw new MitogenError(
      `cannot tell which file ctx.import(${JSON.stringify(specifier)}) is relative to: pass new URL(${JSON.stringify(specifier)}, import.meta.url)`,
    );
  }
  return resolve(dirname(caller), specifier);
}

/** The first file in `stack` that is not this library's (a path), or null. */
export function callerFile(stack: string): string | null {
  for (const line of stack.split("\n").slice(1)) {
    // "    at f (file:///a/b.ts:1:2)", "    at file:///a/b.ts:1:2", "    at /a/b.js:1:2", "    at async file:///a/b.ts:1:2"
    const m = /(?:\(|at (?:async )?)((?:file:\/\/|\/)[^()]*?):\d+:\d+\)?$/.exec(line.trim());
    if (!m?.[1]) continue;
    const url = m[1].startsWith("file:") ? m[1] : pathToFileURL(m[1]).href;
    if (!LIBRARY_FRAMES.has(url)) return fileURLToPath(url);
  }
  return null;
}

const isDeno = typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";

type Esbuild = typeof import("esbuild");

/** What a Deno master without `--allow-run` for esbuild is told. */
const RUN_DENIED =
  "which this Deno process may not start: run deno with --allow-run, or name esbuild's binary in --allow-run=... (under Deno's npm cache: .../@esbuild/<platform>/<version>/bin/esbuild)";

/** Under Deno: whether starting processes is not granted everywhere (esbuild's own start then fails with "reading 'unref'"). */
function runDenied(): boolean {
  const deno = (globalThis as { Deno?: { permissions: { querySync(d: { name: "run" }): { state: string } } } }).Deno;
  return deno !== undefined && deno.permissions.querySync({ name: "run" }).state !== "granted";
}

/** esbuild from the master's node_modules, or under Deno from npm (Deno fetches it). */
async function loadEsbuild(): Promise<Esbuild> {
  try {
    return await import("esbuild");
  } catch (err) {
    if (isDeno) {
      // Not a literal: the single file's own build leaves it alone.
      const spec = `npm:esbuild@${ESBUILD_VERSION}`;
      try {
        return (await import(spec)) as Esbuild;
      } catch (err2) {
        throw new MitogenError(`ctx.import() needs esbuild on the master: under Deno it imports ${spec}, which failed (is the npm registry reachable?)`, {
          cause: err2,
        });
      }
    }
    throw new MitogenError(`ctx.import() needs the esbuild package on the master: npm install esbuild@${ESBUILD_VERSION}`, { cause: err });
  }
}

/** `node:module`'s `stripTypeScriptTypes` (Node 22.13+, Deno 2.9), where this runtime has it. */
function typeStripper(): Parameters<typeof plainModule>[2] {
  return (nodeModule as { stripTypeScriptTypes?: Parameters<typeof plainModule>[2] }).stripTypeScriptTypes;
}

/** Without esbuild: the module as it is, if it needs no bundling (see plainmodule.ts); else why not, and why no esbuild. */
async function buildPlain(file: string, noEsbuild: Error): Promise<Entry> {
  let built: { text: string; files: string[] };
  try {
    built = await plainModule(file, (path) => ownFiles().has(real(path)), typeStripper());
  } catch (err) {
    if (err instanceof NeedsBundlerError) throw new MitogenError(`${err.message} (${noEsbuild.message})`, { cause: noEsbuild });
    throw err;
  }
  const hash = createHash("sha256").update(built.text).digest("hex").slice(0, 16);
  const name = `${basename(file)}@${hash}`;
  const text = `${built.text}\n//# sourceURL=mitogen:///${name}\n`;
  const inputs: Entry["inputs"] = built.files.map((path) => {
    const st = statSync(path);
    return [path, st.mtimeMs, st.size];
  });
  // Its export names are known once it has loaded (the child answers them).
  return { name, code: deflateRawSync(text), rawSize: Buffer.byteLength(text), exports: null, inputs };
}

async function build(file: string, target: string): Promise<Entry> {
  let esbuild: Esbuild;
  try {
    esbuild = await loadEsbuild();
  } catch (err) {
    return buildPlain(file, err as Error);
  }
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
            b.onResolve({ filter: /\.[cm]?[jt]s$/ }, (args) => {
              if (!/^(\.\.?\/|\/|file:)/.test(args.path)) return undefined;
              const target = args.path.startsWith("file:") ? fileURLToPath(args.path) : resolve(args.resolveDir, args.path);
              return ownFiles().has(real(target)) ? { path: "mitogen", external: true } : undefined;
            });
          },
        },
        ...(isDeno ? [denoResolve(), jsrResolve()] : [jsrRefused()]),
      ],
    });
    const js = out.outputFiles?.find((f) => f.path.endsWith(".js"))?.text ?? "";
    const mapText = out.outputFiles?.find((f) => f.path.endsWith(".js.map"))?.text;
    const hash = createHash("sha256").update(js).digest("hex").slice(0, 16);
    const name = `${basename(file)}@${hash}`;
    // Stack frames of the shipped code then read mitogen:///<name>:line:col (see mapStack).
    const text = `${js}\n//# sourceURL=mitogen:///${name}\n`;
    if (mapText) maps.set(name, { map: new SourceMap(JSON.parse(mapText)), dir: dirname(file) });
    // Files only: what Deno's graph gave (`deno-graph:https://...`) is immutable in its cache.
    const files = Object.keys(out.metafile?.inputs ?? {}).filter((p) => !p.startsWith("deno-graph:"));
    const inputs: Entry["inputs"] = files.map((p) => {
      const abs = resolve(dirname(file), p);
      const st = statSync(abs);
      return [abs, st.mtimeMs, st.size];
    });
    return { name, code: deflateRawSync(text), rawSize: Buffer.byteLength(text), exports: exportNames(js), inputs };
  } catch (err) {
    const errors = (err as { errors?: { text: string; location?: { file: string; line: number; column: number } | null }[] }).errors;
    if (!errors?.length) throw runDenied() ? new MitogenError(`ctx.import() runs esbuild, ${RUN_DENIED}`, { cause: err }) : err;
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

/**
 * The export names of esbuild's CommonJS script for an ES module entry: the keys of the `__export(x, {...})`
 * table whose object `module.exports = __toCommonJS(x)` sets. Null when there is none, or `export *` adds to it.
 */
export function exportNames(js: string): string[] | null {
  const object = /^module\.exports = __toCommonJS\(([\w$]+)\);$/m.exec(js)?.[1];
  // `export * from` re-exports what is known only once it runs.
  if (!object || js.includes(`__reExport(${object},`)) return null;
  const start = js.indexOf(`__export(${object}, {\n`);
  const end = start < 0 ? -1 : js.indexOf("\n});", start);
  if (end < 0) return js.includes(`__export(${object},`) ? null : [];
  const names: string[] = [];
  for (const line of js.slice(start, end).split("\n").slice(1)) {
    const m = /^\s+(?:([\w$]+)|("(?:[^"\\]|\\.)*")): \(\) =>/.exec(line);
    if (!m) return null;
    names.push(m[1] ?? (JSON.parse(m[2] as string) as string));
  }
  return names;
}

/** The `imports` of the deno.json (or deno.jsonc without comments) nearest `dir`, and its directory; cached per directory. */
const importMaps = new Map<string, { imports: Record<string, string>; dir: string } | null>();
function importMap(dir: string): { imports: Record<string, string>; dir: string } | null {
  const hit = importMaps.get(dir);
  if (hit !== undefined) return hit;
  let found: { imports: Record<string, string>; dir: string } | null = null;
  for (const name of ["deno.json", "deno.jsonc"]) {
    const path = join(dir, name);
    if (!existsSync(path)) continue;
    try {
      const text = readFileSync(path, "utf8").replace(/^\s*\/\/.*$/gm, "");
      found = { imports: (JSON.parse(text) as { imports?: Record<string, string> }).imports ?? {}, dir };
    } catch (err) {
      throw new MitogenError(`cannot read the import map in ${path}`, { cause: err });
    }
    break;
  }
  if (!found && dirname(dir) !== dir && !existsSync(join(dir, ".git"))) found = importMap(dirname(dir));
  importMaps.set(dir, found);
  return found;
}

/** `spec` through an import map: an exact key, or the longest key ending in "/" that prefixes it. */
function mapped(spec: string, imports: Record<string, string>): string | null {
  const exact = imports[spec];
  if (exact !== undefined) return exact;
  let best = "";
  for (const key of Object.keys(imports)) if (key.endsWith("/") && spec.startsWith(key) && key.length > best.length) best = key;
  return best ? `${imports[best]}${spec.slice(best.length)}` : null;
}

/** npm packages Deno has loaded for this process: then Node's require resolution finds them in Deno's npm cache. */
const npmLoaded = new Map<string, Promise<void>>();
function loadNpm(pkg: string): Promise<void> {
  let p = npmLoaded.get(pkg);
  if (!p) {
    // The package.json alone, where the package lets it be imported; else the package itself.
    p = import(`npm:${pkg}/package.json`, { with: { type: "json" } }).then(
      () => {},
      () => import(`npm:${pkg}`).then(() => {}),
    );
    npmLoaded.set(pkg, p);
  }
  return p;
}

/**
 * Deno only: resolve `npm:name@version/sub` (Deno fetches the package into its cache) and
 * the names of the nearest deno.json's `imports`, for code written for `deno run`. Bare
 * imports inside the packages resolve as Deno's own require would.
 */
function denoResolve(): import("esbuild").Plugin {
  return {
    name: "mitogen-deno-resolve",
    setup(b) {
      const npm = async (spec: string, importer: string, kind: string) => {
        const m = /^npm:\/?((?:@[^/@]+\/)?[^/@]+)(?:@([^/]+))?(\/.*)?$/.exec(spec);
        if (!m?.[1]) return { errors: [{ text: `not an npm: specifier: ${spec}` }] };
        const [, name, version, sub = ""] = m;
        await loadNpm(version ? `${name}@${version}` : name);
        try {
          const path = createRequire(importer).resolve(`${name}${sub}`);
          return { path };
        } catch {
          // ESM-only exports: let esbuild resolve it from the package's directory
          const pkgJson = createRequire(importer).resolve(`${name}/package.json`);
          return b.resolve(sub ? `.${sub}` : ".", { resolveDir: dirname(pkgJson), kind: kind as "import-statement" });
        }
      };
      b.onResolve({ filter: /^npm:/ }, (args) => npm(args.path, args.importer || join(args.resolveDir, "x.js"), args.kind));
      b.onResolve({ filter: /^[^./]/ }, async (args) => {
        if (/^(node|mitogen|jsr|https?|data|file):|^mitogen$/.test(args.path) || isAbsolute(args.path) || isBuiltin(args.path)) return undefined;
        const importer = args.importer || join(args.resolveDir, "x.js");
        const map = importer.includes("/node_modules/") || importer.includes("/npm/registry.") ? null : importMap(args.resolveDir);
        const to = map ? mapped(args.path, map.imports) : null;
        if (to !== null) {
          if (to.startsWith("npm:")) return npm(to, importer, args.kind);
          if (to.startsWith("jsr:")) return b.resolve(to, { resolveDir: map?.dir ?? args.resolveDir, kind: args.kind });
          if (/^\.\.?\//.test(to)) return { path: resolve(map?.dir ?? args.resolveDir, to) };
          if (to.startsWith("file:")) return { path: fileURLToPath(to) };
          return { errors: [{ text: `${args.path} maps to ${to} in deno.json: only npm:, jsr:, relative and file: targets can be shipped` }] };
        }
        // Inside a package in Deno's npm cache (no node_modules there): Deno's require knows its dependencies.
        if (!importer.includes("/npm/registry.")) return undefined;
        try {
          return { path: createRequire(importer).resolve(args.path) };
        } catch {
          return undefined;
        }
      });
    },
  };
}

/** A module of Deno's graph (`deno info --json`): its file in Deno's cache, its kind and its imports, resolved. */
interface GraphModule {
  local: string;
  mediaType: string;
  deps: Map<string, string>;
}

/** The modules of every graph `deno info` gave this process, by specifier. */
const graph = new Map<string, GraphModule>();
/** `jsr:` specifiers already resolved, per directory they were asked from: the specifier of their first module. */
const jsrRoots = new Map<string, Promise<string>>();

/** `deno info --json <spec>` run from `dir` (so that its deno.json and lock file apply): Deno fetches and caches the graph. */
function denoInfo(spec: string, dir: string): Promise<string> {
  const key = `${dir}\0${spec}`;
  let p = jsrRoots.get(key);
  if (!p) {
    p = new Promise<string>((resolveRoot, reject) => {
      const deno = (globalThis as unknown as { Deno: { execPath(): string } }).Deno;
      execFile(deno.execPath(), ["info", "--json", spec], { cwd: dir, maxBuffer: 64 << 20, env: { ...process.env, NO_COLOR: "1" } }, (err, stdout, stderr) => {
        if (err) return reject(new MitogenError(`deno info ${spec} failed: ${stderr.trim() || err.message}`, { cause: err }));
        const info = JSON.parse(stdout) as {
          redirects?: Record<string, string>;
          modules: { specifier: string; local?: string; mediaType?: string; dependencies?: { specifier: string; code?: { specifier: string } }[] }[];
        };
        for (const m of info.modules) {
          if (!m.local || !m.mediaType) continue;
          graph.set(m.specifier, {
            local: m.local,
            mediaType: m.mediaType,
            deps: new Map((m.dependencies ?? []).flatMap((d) => (d.code ? [[d.specifier, d.code.specifier]] : []))),
          });
        }
        const root = info.redirects?.[spec] ?? spec;
        if (!graph.has(root)) return reject(new MitogenError(`deno info ${spec}: its module is not in Deno's cache`));
        resolveRoot(root);
      });
    });
    jsrRoots.set(key, p);
    p.catch(() => jsrRoots.delete(key));
  }
  return p;
}

const LOADERS: Record<string, "ts" | "tsx" | "js" | "jsx" | "json"> = {
  TypeScript: "ts",
  Mts: "ts",
  Cts: "ts",
  TSX: "tsx",
  JavaScript: "js",
  Mjs: "js",
  Cjs: "js",
  JSX: "jsx",
  Json: "json",
};

/**
 * Deno only: `jsr:` specifiers resolved as Deno resolves them (`deno info`, with the importer's
 * deno.json and lock file), their files read from Deno's cache, and their own imports followed
 * through the same graph (`npm:` ones as {@link denoResolve} does).
 */
function jsrResolve(): import("esbuild").Plugin {
  return {
    name: "mitogen-jsr",
    setup(b) {
      b.onResolve({ filter: /^jsr:/ }, async (args) => {
        try {
          return { path: await denoInfo(args.path, args.resolveDir), namespace: "deno-graph" };
        } catch (err) {
          return { errors: [{ text: (err as Error).message }] };
        }
      });
      b.onResolve({ filter: /.*/, namespace: "deno-graph" }, (args) => {
        const to = graph.get(args.importer)?.deps.get(args.path);
        if (args.path.startsWith("node:") || isBuiltin(args.path)) return { path: args.path, external: true };
        if (to?.startsWith("npm:")) return b.resolve(to, { resolveDir: process.cwd(), kind: args.kind });
        if (to && graph.has(to)) return { path: to, namespace: "deno-graph" };
        return { errors: [{ text: `${args.path}, imported by ${args.importer}, is not in Deno's graph of it` }] };
      });
      b.onLoad({ filter: /.*/, namespace: "deno-graph" }, (args) => {
        const m = graph.get(args.path);
        const loader = m ? LOADERS[m.mediaType] : undefined;
        if (!m || !loader) return { errors: [{ text: `${args.path}: cannot ship a module of type ${m?.mediaType ?? "unknown"}` }] };
        return { contents: readFileSync(m.local, "utf8"), loader };
      });
    },
  };
}

/** Node: a `jsr:` specifier is refused, saying what to do instead. */
function jsrRefused(): import("esbuild").Plugin {
  return {
    name: "mitogen-jsr-refused",
    setup(b) {
      b.onResolve({ filter: /^jsr:/ }, (args) => {
        const name = /^jsr:\/?(@[^/@]+\/[^/@]+)/.exec(args.path)?.[1] ?? "@scope/name";
        return {
          errors: [
            {
              text: `${args.path}: jsr: specifiers are resolved on a Deno master only (Deno's own resolution and cache); on Node, add the package from npm (npx jsr add ${name}) and import it by its npm name`,
            },
          ],
        };
      });
    },
  };
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
