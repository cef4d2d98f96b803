/**
 * The import rules of the repository, checked by `npm run cycles` (part of `npm run check`):
 *
 * - no-circular: no file imports a file that imports it back, type-only imports included
 *   (`tsPreCompilationDeps: true` keeps them in the graph). Floors, not circles.
 * - payload-imports-payload: the child payload (core.ts and what it imports) imports nothing else of
 *   this repository, not even a type. The payload's files are derived here as build.ts derives them:
 *   what esbuild reads building core.ts; files with no code (types only, e.g. options.ts) may be
 *   imported too, and are held to the same rule.
 *
 * `npm run floors` prints the files by floor and what each imports, to check ARCHITECTURE.md against.
 */
const { readdirSync, readFileSync } = require("node:fs");
const { join } = require("node:path");
const esbuild = require("esbuild");

const root = __dirname;
const literal = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
const anyOf = (files) => `^(${files.map(literal).join("|")})$`;

/** The files esbuild reads building core.ts (value imports; type-only ones are erased). */
const built = Object.keys(
  esbuild.buildSync({
    absWorkingDir: root,
    entryPoints: ["core.ts"],
    bundle: true,
    write: false,
    metafile: true,
    platform: "neutral",
    mainFields: ["module", "main"],
    logLevel: "silent",
  }).metafile.inputs,
).filter((f) => !/(^|\/)node_modules\//.test(f));

/** Files of the repository's root with no code: only types (esbuild compiles them to nothing). */
const typesOnly = readdirSync(root).filter(
  (f) =>
    f.endsWith(".ts") &&
    esbuild
      .transformSync(readFileSync(join(root, f), "utf8"), { loader: "ts", format: "esm" })
      .code.replace(/^export \{\s*\};?\s*$/m, "")
      .trim() === "",
);

const payload = anyOf([...built, ...typesOnly]);

/** @type {import('dependency-cruiser').IConfiguration} */
module.exports = {
  forbidden: [
    {
      name: "no-circular",
      severity: "error",
      comment: "A file imports a file that imports it back (type-only imports count): lower files define the narrow interfaces they need instead.",
      from: {},
      to: { circular: true },
    },
    {
      name: "payload-imports-master-only",
      severity: "error",
      comment: `The child payload imports only its own files (${built.join(", ")}), types-only files, node: builtins and the packages it bundles: master-only code never, not even a type.`,
      from: { path: payload },
      to: { path: "^[^/]+\\.ts$", pathNot: payload },
    },
    {
      name: "not-to-unresolvable",
      severity: "error",
      comment: "An import the cruiser cannot resolve.",
      from: {},
      to: { couldNotResolve: true },
    },
  ],
  options: {
    tsPreCompilationDeps: true,
    doNotFollow: { path: "node_modules" },
    exclude: { path: "^(node_modules|dist)/" },
    moduleSystems: ["es6", "cjs"],
    enhancedResolveOptions: {
      exportsFields: ["exports"],
      conditionNames: ["import", "require", "node", "default", "types"],
      mainFields: ["module", "main", "types"],
    },
  },
};
