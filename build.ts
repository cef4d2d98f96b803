/**
 * Builds the payloads and the single-file bundle.
 *
 * - core payloads: `core.ts` (with the files it imports and the MessagePack
 *   library) as one minified script, raw-deflated, twice: for ES2022, and with
 *   its syntax lowered for Node 12 (private members become WeakMaps, ~15%
 *   slower per call, so modern runtimes get the first). The first stage runs
 *   one as `new Function("B", src)(boot)`; see CORE in frames.ts. Its files are
 *   what esbuild read (printed); the build fails if one of them imports anything
 *   but payload files, `node:` builtins and the packages the payload bundles, or
 *   is master-side ({@link checkPayloadImports}).
 * - parent module: `parent.ts` as a CommonJS script whose imports of the core
 *   are `require("mitogen")`, the running core (see evaluateModule in calls.ts),
 *   lowered for Node 12 (it runs in every context that starts children).
 * - `dist/mitogen.mjs`: `cli.ts` (the library and the CLI) with both payloads
 *   inlined as base64, ASCII only, class and function names kept, a launcher (node, or deno without one: {@link LAUNCHER}), and a
 *   `@ts-self-types` reference to its declarations (Deno).
 * - `dist/mitogen.d.ts`: the declarations of `cli.ts`, bundled into one file
 *   by dts-bundle-generator (npm's `types`, Deno's self-types), needing no
 *   other package's types.
 * - `dist/mitogen.cjs`: `require("mitogen")`, the ES module loaded with
 *   Node's require(esm).
 *
 * `node --import tsx build.ts` (npm run build) writes dist and prints sizes.
 *
 * @module
 */
import * as esbuild from "esbuild";
import { deflateRawSync } from "node:zlib";
import { mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { type Payloads, type PayloadsJson, PREBUILT, SHIPPED, type ShippedName } from "./payload.ts";
import { CORE } from "./frames.ts";
import { ESBUILD_VERSION } from "./bundler.ts";
import * as runningCore from "./core.ts";

const root = dirname(fileURLToPath(import.meta.url));

const common: esbuild.BuildOptions = {
  absWorkingDir: root,
  bundle: true,
  write: false,
  platform: "neutral",
  mainFields: ["module", "main"],
  target: "es2022",
  charset: "ascii",
  minify: true,
  keepNames: false,
  legalComments: "none",
  logLevel: "error",
};

/**
 * `MITOGEN_READABLE_PAYLOAD=1`: the payloads (not dist's own code) keep their identifiers (for profiles,
 * e.g. bench/profile.ts); esbuild ignores `minifyIdentifiers: false` under
 * `minify: true`, so the other two minifications are asked for one by one.
 */
const readable = (): esbuild.BuildOptions =>
  process.env.MITOGEN_READABLE_PAYLOAD === "1" ? { minify: false, minifySyntax: true, minifyWhitespace: true } : {};

/** Build one script: its text, the files of this repository it was built from, and esbuild's metafile. */
async function script(options: esbuild.BuildOptions): Promise<{ text: string; files: string[]; metafile: esbuild.Metafile }> {
  const out = await esbuild.build({ ...common, ...options, metafile: true });
  const file = out.outputFiles?.[0];
  if (!file || !out.metafile) throw new Error("esbuild produced no output");
  const files = Object.keys(out.metafile.inputs).filter((f) => !/(^|\/)node_modules\//.test(f));
  return { text: file.text, files, metafile: out.metafile };
}

/** The packages the child payload bundles (the codec's MessagePack); any other package is master-only. */
const PAYLOAD_PACKAGES = ["@msgpack/msgpack"];
/**
 * Files master-side by what they are, never in the payload: the modules shipped on their own (a child
 * fetches them when it needs them), the library's and the CLI's entries, and the bundler and the build.
 */
const MASTER_SIDE = new Set<string>([...Object.values(SHIPPED), "master.ts", "mod.ts", "cli.ts", "bundler.ts", "build.ts", "payload.ts"]);

/**
 * Throws unless each file of the payload (`files`, what the core build read) imports only other payload
 * files, `node:` builtins and the files of {@link PAYLOAD_PACKAGES}, and none is {@link MASTER_SIDE};
 * the message names the file, the import and how core.ts reaches the file. Type-only imports are not
 * in esbuild's metafile: `npm run cycles` (.dependency-cruiser.cjs) checks those.
 */
export function checkPayloadImports(metafile: esbuild.Metafile, files: string[]): void {
  const inPayload = new Set(files);
  const packageOf = (path: string) => /(?:^|\/)node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(path)?.[1];
  const via = new Map<string, string>();
  for (const file of files) for (const imp of metafile.inputs[file]?.imports ?? []) if (!via.has(imp.path)) via.set(imp.path, file);
  const chain = (file: string): string => {
    const seen: string[] = [file];
    for (let at = via.get(file); at !== undefined && !seen.includes(at); at = via.get(at)) seen.unshift(at);
    return seen.join(" -> ");
  };
  const problems: string[] = [];
  for (const file of files) {
    if (MASTER_SIDE.has(file)) problems.push(`${file} is master-only, but the payload reaches it: ${chain(file)}`);
    for (const imp of metafile.inputs[file]?.imports ?? []) {
      const name = imp.original ?? imp.path;
      const pkg = packageOf(imp.path);
      const ok = imp.external ? imp.path.startsWith("node:") : pkg !== undefined ? PAYLOAD_PACKAGES.includes(pkg) : inPayload.has(imp.path);
      if (!ok)
        problems.push(
          `${file} imports ${JSON.stringify(name)}, which is not a payload file, a node: builtin or one of ${PAYLOAD_PACKAGES.join(", ")} (${chain(file)})`,
        );
    }
  }
  if (problems.length) throw new Error(`build.ts: the child payload imports what it must not:\n  ${problems.join("\n  ")}`);
}

/**
 * The child payload leaves out the stream decoding of `@msgpack/msgpack`'s Decoder (`decodeAsync`,
 * `decodeStream` and the rest, about 340 bytes compressed): the codec decodes whole frames only. Each
 * method goes from its header to the closing brace at the same indent; a version of the library
 * without one of them fails the build, naming it.
 */
const STREAM_DECODING = [
  "appendBuffer(buffer)",
  "*decodeMulti(buffer)",
  "async decodeAsync(stream)",
  "decodeArrayStream(stream)",
  "decodeStream(stream)",
  "async *decodeMultiAsync(stream, isArray)",
];
const withoutStreamDecoding: esbuild.Plugin = {
  name: "without-stream-decoding",
  setup(build) {
    build.onLoad({ filter: /@msgpack[\\/]msgpack[\\/]dist\.esm[\\/]Decoder\.mjs$/ }, (args) => {
      let src = readFileSync(args.path, "utf8");
      for (const method of STREAM_DECODING) {
        const start = src.indexOf(`\n    ${method} {\n`);
        const end = start < 0 ? -1 : src.indexOf("\n    }\n", start);
        if (end < 0) throw new Error(`build.ts: @msgpack/msgpack's Decoder has no method ${method} to leave out; update STREAM_DECODING`);
        src = src.slice(0, start) + src.slice(end + "\n    }".length);
      }
      return { contents: src, loader: "js" };
    });
  },
};

/**
 * Throws unless every value shipped module `name` imports from a payload file (`inCore`; in the
 * child that import is the running core) is one core.ts exports: core.ts lists its exports by hand,
 * to keep the payload small, and a name missing there would be undefined in every child.
 */
export function checkCoreNames(name: string, files: string[], inCore: Set<string>): void {
  const exported = new Set(Object.keys(runningCore));
  for (const file of files) {
    const text = readFileSync(join(root, file), "utf8");
    for (const [, typeOnly, list, from] of text.matchAll(/^import (type )?\{([^}]*)\} from "(\.[^"]+\.ts)";$/gm)) {
      if (typeOnly || !inCore.has(resolve(root, dirname(file), from as string))) continue;
      for (const item of (list as string).split(",").map((x) => x.trim())) {
        const imported = item.split(/\s+as\s+/)[0] as string;
        if (imported && !imported.startsWith("type ") && !exported.has(imported))
          throw new Error(
            `${name}: ${file} imports ${imported} from ${from}, which core.ts does not export (in a child that import is the running core): add it to core.ts's exports`,
          );
      }
    }
  }
}

/** The oldest runtime a child runs on, for esbuild. */
const OLDEST_TARGET = "node12";

/** Build the payloads (minified and compressed). */
export async function buildPayloads(): Promise<Payloads & { coreFiles: string[] }> {
  // Each core tells childMain which one it is, so that context can hand it on to children of its own.
  const core = async (target: string, name: string) => {
    const built = await script({
      entryPoints: ["core.ts"],
      format: "iife",
      globalName: "M",
      target,
      define: { "globalThis.MITOGEN_MODERN_CORE": String(name === CORE.MODERN) },
      plugins: [withoutStreamDecoding],
      ...readable(),
    });
    return { text: `${built.text}M.childMain(B,M,${JSON.stringify(name)});`, files: built.files, metafile: built.metafile };
  };
  const { text: modern, files: coreFiles, metafile } = await core("es2022", CORE.MODERN);
  checkPayloadImports(metafile, coreFiles);
  const { text: lowered } = await core(OLDEST_TARGET, CORE.LOWERED);
  // The payload's files are what the core build read, not a list kept by hand.
  const inCore = new Set(coreFiles.map((f) => join(root, f)));
  // Shipped modules like any other (see evaluateModule in calls.ts): their imports of the core are the running core.
  const shipped = async (source: string) =>
    await script({
      entryPoints: [source],
      format: "cjs",
      target: OLDEST_TARGET,
      ...readable(),
      // tweetnacl asks for Node's `crypto` where it has no Web Crypto: the running core's require gives the builtin
      external: ["crypto"],
      plugins: [
        {
          name: "core-is-running",
          setup(build) {
            build.onResolve({ filter: /\.ts$/ }, (args) => (inCore.has(resolve(args.resolveDir, args.path)) ? { path: "mitogen", external: true } : undefined));
          },
        },
      ],
    });
  const names = Object.keys(SHIPPED) as ShippedName[];
  const sources = await Promise.all(names.map((name) => shipped(SHIPPED[name])));
  await esbuild.stop(); // no service process outlives the build
  const modules = {} as Record<ShippedName, Uint8Array>;
  const modulesRaw = {} as Record<ShippedName, number>;
  names.forEach((name, i) => {
    const { text: src, files } = sources[i] as { text: string; files: string[] };
    checkCoreNames(name, files, inCore);
    modules[name] = deflateRawSync(src, { level: 9 });
    modulesRaw[name] = src.length;
  });
  return {
    core: deflateRawSync(modern, { level: 9 }),
    coreLowered: deflateRawSync(lowered, { level: 9 }),
    modules,
    coreRaw: modern.length,
    coreLoweredRaw: lowered.length,
    modulesRaw,
    coreFiles,
  };
}

/** Write dist/mitogen.mjs; returns the sizes it printed. */
export async function buildDist(): Promise<{ bundle: number; payloads: Payloads & { coreFiles: string[] } }> {
  const pkg = JSON.parse(readFileSync(`${root}/package.json`, "utf8")) as { version: string; dependencies: Record<string, string> };
  const pinned = pkg.dependencies.esbuild;
  if (pinned !== ESBUILD_VERSION) throw new Error(`bundler.ts ESBUILD_VERSION is ${ESBUILD_VERSION}, package.json pins esbuild ${pinned}`);
  const p = await buildPayloads();
  const json: PayloadsJson = {
    core: Buffer.from(p.core).toString("base64"),
    coreLowered: Buffer.from(p.coreLowered).toString("base64"),
    modules: Object.fromEntries(Object.entries(p.modules).map(([k, v]) => [k, Buffer.from(v).toString("base64")])) as PayloadsJson["modules"],
    coreRaw: p.coreRaw,
    coreLoweredRaw: p.coreLoweredRaw,
    modulesRaw: p.modulesRaw,
  };
  // The version goes into the file: a copy of it alone still says which it is (`mitogen --version`).
  const define = { MITOGEN_PAYLOADS: JSON.stringify(json), MITOGEN_VERSION: JSON.stringify(pkg.version) };
  // The same payloads for a copy of the sources served over http (JSR), which cannot build them.
  mkdirSync(`${root}/dist`, { recursive: true });
  writeFileSync(`${root}/${PREBUILT.slice(2)}`, JSON.stringify(json));
  const outfile = `${root}/dist/mitogen.mjs`;
  const { text } = await script({
    entryPoints: ["cli.ts"],
    format: "esm",
    platform: "node",
    target: "node20",
    minify: false,
    // Class names as written: esbuild renames a class whose name another one in the bundle has (users
    // saw `_CallError [CallError]` in console.log and `_Message`). The payloads, built above, stay as
    // they are (errors.ts names its error classes itself).
    keepNames: true,
    define,
    external: ["esbuild", "ssh2"],
    // CommonJS dependencies (tweetnacl asks for `crypto`) get a real require.
    banner: {
      js: `${LAUNCHER}// @ts-self-types="./mitogen.d.ts"\nimport { createRequire as __mitogenRequire } from "node:module";\nconst require = __mitogenRequire(import.meta.url);`,
    },
  });
  mkdirSync(dirname(outfile), { recursive: true });
  const nonAscii = text.search(/[\u0080-\uffff]/);
  if (nonAscii >= 0) throw new Error(`dist/mitogen.mjs must be ASCII only; found ${JSON.stringify(text.slice(nonAscii - 40, nonAscii + 10))}`);
  writeFileSync(outfile, text, { mode: 0o755 });
  writeFileSync(`${root}/dist/mitogen.cjs`, REQUIRE_WRAPPER);
  await esbuild.stop();
  writeFileSync(`${root}/dist/mitogen.d.ts`, await declarations());
  const bundle = statSync(outfile).size;
  return { bundle, payloads: p };
}

/**
 * The single file's first lines: run as a program, sh starts it with node, or with deno where there
 * is no node. To JavaScript the second line opens a block comment that the third closes; to sh, the
 * second line's first word is a pattern (slash, star, slash, true) matching /bin/true, and its exec
 * never returns, so sh never reads the third.
 */
export const LAUNCHER: string = '#!/bin/sh\n/*/true;if command -v node >/dev/null 2>&1;then exec node "$0" "$@";fi;exec deno run -A "$0" "$@"\n*/\n';

/** `require("mitogen")`: the ES module through Node's require(esm) (it has no top-level await). */
const REQUIRE_WRAPPER = `"use strict";
// require("mitogen"): the ES module, through Node's require(esm) (flagless from Node 20.19 and 22.12).
try {
  module.exports = require("./mitogen.mjs");
} catch (err) {
  if (err && err.code === "ERR_REQUIRE_ESM") {
    throw new Error('mitogen is an ES module: use import("mitogen"), or Node 20.19+ / 22.12+, whose require() loads ES modules', { cause: err });
  }
  throw err;
}
`;

/** One declaration file for `cli.ts` (the library and the CLI's exports). */
async function declarations(): Promise<string> {
  // dts-bundle-generator is a devDependency, imported here only, at build time.
  const { generateDtsBundle } = (await import("dts-bundle-generator")) as typeof import("dts-bundle-generator");
  const [dts] = generateDtsBundle([{ filePath: `${root}/cli.ts`, output: { noBanner: true } }], {
    preferredConfigPath: `${root}/tsconfig.json`,
  });
  if (!dts) throw new Error("dts-bundle-generator produced no output");
  if (/^import |^\/\/\/ <reference (types|path)=/m.test(dts)) throw new Error("dist/mitogen.d.ts must not need other packages' types");
  // Router, Context, Receiver and Select are AsyncDisposable, whatever the consumer's target.
  return `// Declarations of mitogen.mjs, generated by build.ts.\n/// <reference lib="es2022" />\n/// <reference lib="esnext.disposable" />\n${dts}`;
}

const kib = (n: number) => `${(n / 1024).toFixed(1)} KiB`;

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const { bundle, payloads } = await buildDist();
  console.log(`dist/mitogen.mjs        ${kib(bundle)}`);
  console.log(`child payload (core)    ${kib(payloads.coreRaw)} raw, ${kib(payloads.core.byteLength)} compressed (goal <= 24 KiB, ceiling 40)`);
  console.log(`  lowered for node 12    ${kib(payloads.coreLoweredRaw)} raw, ${kib(payloads.coreLowered.byteLength)} compressed`);
  console.log(`  made of ${payloads.coreFiles.join(", ")} (what the core build read)`);
  for (const name of Object.keys(SHIPPED) as ShippedName[]) {
    console.log(`${`${name} module`.padEnd(31)}${kib(payloads.modulesRaw[name])} raw, ${kib(payloads.modules[name].byteLength)} compressed`);
  }
  if (Math.max(payloads.core.byteLength, payloads.coreLowered.byteLength) > 40 * 1024) {
    console.error("child payload is over its 40 KiB ceiling");
    process.exit(1);
  }
}
