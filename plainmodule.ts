/**
 * Master-only: ships a module for {@link Context.import} without esbuild, where it needs no
 * bundling: a plain ES module (or TypeScript, where this runtime strips types: `node:module`'s
 * `stripTypeScriptTypes`, in Node 22.13+ and Deno 2.9, not 2.5) whose imports are only builtins, `mitogen` (or this library's own
 * file) and relative files that are such modules themselves. Each file's `import` and `export`
 * statements (found by es-module-lexer) become `require` calls and getters, and the files one
 * CommonJS script, as esbuild's would be. Anything else is refused, saying that it needs esbuild.
 *
 * @module
 */
import { readFileSync } from "node:fs";
import { builtinModules } from "node:module";
import { dirname, relative, resolve } from "node:path";
import { init, parse } from "es-module-lexer";
import { MitogenError } from "./errors.ts";

/** Why a module cannot go without esbuild. */
export class NeedsBundlerError extends MitogenError {
  override name = "NeedsBundlerError";
}

/** `node:module`'s type stripper, where this runtime has one (Node 22.13+, Deno 2.9). */
type Stripper = (code: string, options?: { mode?: "strip" | "transform" }) => string;

/**
 * The files of `entry` as one CommonJS script: `require("mitogen")` for the running core (`own`
 * says which files mean it), builtins as themselves. Throws {@link NeedsBundlerError} naming the
 * file and what in it needs esbuild.
 */
export async function plainModule(entry: string, own: (path: string) => boolean, strip: Stripper | undefined): Promise<{ text: string; files: string[] }> {
  await init;
  const root = dirname(entry);
  const defs: string[] = [];
  const seen = new Map<string, string>();
  const visit = (file: string): string => {
    const known = seen.get(file);
    if (known !== undefined) return known;
    const id = relative(root, file) || file;
    seen.set(file, id);
    defs.push(`${JSON.stringify(id)}: function (module, exports, require) {\n${transform(file, visit, own, strip)}\n}`);
    return id;
  };
  visit(entry);
  const text = [
    "var __defs = {",
    defs.join(",\n"),
    "};",
    "var __done = {};",
    "function __load(id) {",
    "  var m = __done[id];",
    "  if (m) return m.exports;",
    "  m = __done[id] = { exports: {} };",
    '  Object.defineProperty(m.exports, "__esModule", { value: true });',
    "  __defs[id](m, m.exports, function (s) { return Object.prototype.hasOwnProperty.call(__defs, s) ? __load(s) : require(s); });",
    "  return m.exports;",
    "}",
    `module.exports = __load(${JSON.stringify(seen.get(entry))});`,
  ].join("\n");
  return { text, files: [...seen.keys()] };
}

const BUILTINS = new Set(builtinModules);

/** `export * from` a module required as `from`: its names but `default`, as getters, unless exported already. */
const starExport = (from: string): string =>
  `Object.keys(${from}).forEach(function (k) { if (k !== "default" && !Object.prototype.hasOwnProperty.call(exports, k)) Object.defineProperty(exports, k, { enumerable: true, get: function () { return ${from}[k]; } }); });`;

/** One file's source with its imports and exports made CommonJS; relative imports through `visit`. */
function transform(file: string, visit: (file: string) => string, own: (path: string) => boolean, strip: Stripper | undefined): string {
  const needs = (what: string) => new NeedsBundlerError(`${file}: ${what}: shipping it needs esbuild on the master`);
  let source = readFileSync(file, "utf8");
  if (/\.[cm]?tsx?$/.test(file)) {
    if (!strip) throw needs("TypeScript, and this runtime strips no types (Node 22.13+ and Deno 2.9 do)");
    try {
      source = strip(source, { mode: "strip" });
    } catch (err) {
      throw new NeedsBundlerError(`${file}: its types cannot be stripped (${(err as Error).message}): shipping it needs esbuild on the master`, { cause: err });
    }
  }
  let imports: ReturnType<typeof parse>[0];
  let exports: ReturnType<typeof parse>[1];
  try {
    [imports, exports] = parse(source, file);
  } catch (err) {
    throw new NeedsBundlerError(`${file}: not an ES module es-module-lexer can read: shipping it needs esbuild on the master`, { cause: err });
  }
  /** What `require(...)` gets for `spec`. */
  const target = (spec: string): string => {
    if (spec === "mitogen") return "mitogen";
    if (spec.startsWith("node:") || BUILTINS.has(spec)) return spec;
    if (/^\.\.?\//.test(spec)) {
      const path = resolve(dirname(file), spec);
      return own(path) ? "mitogen" : visit(path);
    }
    throw needs(`it imports ${JSON.stringify(spec)}, neither a builtin, "mitogen" nor a relative file`);
  };
  const edits: [start: number, end: number, text: string][] = [];
  const getters: string[] = [];
  const getter = (name: string, value: string) =>
    getters.push(`Object.defineProperty(exports, ${JSON.stringify(name)}, { enumerable: true, get: function () { return ${value}; } });`);
  const modules: string[] = [];
  const reexports: [start: number, end: number, text: string][] = [];
  for (const [index, imp] of imports.entries()) {
    if (imp.type === "import-meta") throw needs("it uses import.meta");
    if (imp.type === "dynamic") {
      if (imp.specifier === undefined || !(imp.specifier.startsWith("node:") || BUILTINS.has(imp.specifier))) {
        throw needs(`it imports ${imp.specifier === undefined ? "a computed specifier" : JSON.stringify(imp.specifier)} dynamically`);
      }
      continue;
    }
    if (imp.type !== "static" && imp.type !== "reexport-star") throw needs("it uses an import phase");
    const statement = source.slice(imp.importStart, imp.importEnd);
    if (imp.typeOnly) {
      edits.push([imp.importStart, imp.importEnd, ""]);
      continue;
    }
    const local = `__import${index}`;
    modules[index] = local;
    const head = `const ${local} = require(${JSON.stringify(target(imp.specifier))});`;
    if (imp.type === "reexport-star" || statement.startsWith("export")) {
      // Its exports are added with the exports below.
      reexports[index] = [imp.importStart, imp.importEnd, head];
      continue;
    }
    // import d, * as ns, { a as b, c } from "x"; import "x"
    const clause = /^import\s*([\s\S]*?)\s*from\s*["']/.exec(statement)?.[1] ?? "";
    const bindings: string[] = [];
    const named = /\{([\s\S]*)\}/.exec(clause);
    for (const part of (named?.[1] ?? "").split(",")) {
      const m = /^\s*(type\s+)?([\w$]+|"[^"]*"|'[^']*')(?:\s+as\s+([\w$]+))?\s*$/.exec(part);
      if (!m) continue;
      if (m[1]) continue; // `type X` in a mixed TypeScript import
      const from = m[2] as string;
      bindings.push(`const ${m[3] ?? from} = ${local}[${from.startsWith('"') || from.startsWith("'") ? from : JSON.stringify(from)}];`);
    }
    const rest = clause.replace(/\{[\s\S]*\}/, "");
    const ns = /\*\s*as\s+([\w$]+)/.exec(rest);
    if (ns) bindings.push(`const ${ns[1]} = ${local};`);
    const def = /^\s*([\w$]+)/.exec(rest);
    if (def && def[1] !== "type") bindings.push(`const ${def[1]} = ${local} && ${local}.__esModule ? ${local}.default : ${local};`);
    edits.push([imp.importStart, imp.importEnd, [head, ...bindings].join(" ")]);
  }
  const removed = new Set<number>();
  for (const exp of exports) {
    if (exp.typeOnly) continue;
    const from = exp.type === "direct" ? undefined : modules[exp.importIndex];
    const statement = exp.type === "direct" ? undefined : reexports[exp.importIndex];
    if (exp.type === "reexport-all") {
      // Where the module is required: a star reads its keys.
      if (from && statement) statement[2] += ` ${starExport(from)}`;
      continue;
    }
    const after = source.slice(exp.exportStart + "export".length);
    // What the name is bound to: an imported module's export, or a local.
    const bound =
      exp.type === "reexport"
        ? from === undefined
          ? exp.name
          : exp.importName === null
            ? from
            : `${from}[${JSON.stringify(exp.importName)}]`
        : (exp.localName ?? exp.name);
    if (exp.type === "reexport" && statement) {
      // export { a as b } from "x": the require stays, the names become getters.
      getter(exp.name, bound);
    } else if (/^\s*\{/.test(after)) {
      // export { a, b as c }: the statement goes, its names become getters.
      if (!removed.has(exp.exportStart)) {
        removed.add(exp.exportStart);
        const close = source.indexOf("}", exp.exportStart);
        const end = source[close + 1] === ";" ? close + 2 : close + 1;
        edits.push([exp.exportStart, end, ""]);
      }
      getter(exp.name, bound);
    } else if (exp.name === "default" && /^\s*default\b/.test(after)) {
      const keyword = exp.exportStart + "export".length + (/^\s*default/.exec(after)?.[0].length ?? 0);
      const local = exp.type === "direct" ? exp.localName : undefined;
      const declared = /^\s*(async\s+function|function|class)\b/.test(source.slice(keyword)) && local !== undefined;
      edits.push([exp.exportStart, keyword, declared ? "" : "const __default ="]);
      getter("default", declared ? local : "__default");
    } else {
      // export function f / class / const / let / var: the declaration stays, without `export`.
      if (!removed.has(exp.exportStart)) {
        removed.add(exp.exportStart);
        edits.push([exp.exportStart, exp.exportStart + "export".length, ""]);
      }
      getter(exp.name, bound);
    }
  }
  for (const statement of reexports) if (statement) edits.push(statement);
  let out = source;
  for (const [start, end, text] of edits.sort((a, b) => b[0] - a[0])) out = out.slice(0, start) + text + out.slice(end);
  // Getters first, on one line: calls and cycles see every export, and the lines stay the file's own.
  return `${getters.join(" ")}\n${out}`;
}
