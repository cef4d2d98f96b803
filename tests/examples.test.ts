/**
 * Every JSDoc `@example` in the library's modules (the repository's .ts files outside tests/,
 * bench/, examples/, dist/ and node_modules/), type-checked and run, so
 * an example that stops working fails the tests. Under Node the examples are type-checked by
 * tsc and run by `node --import tsx`; under Deno, by `deno check` and `deno run`.
 *
 * An example is the fenced block after an `@example` tag. It imports the library as a user
 * would, from `"mitogen"`; a relative import fails the test, except of the sample modules in
 * `./examples/` (what a user's own module would be). Each example is written to a file of its
 * own in a temporary directory, beside a link to `examples/`, with `"mitogen"` pointed at this
 * repository's mod.ts (nothing else in it is changed), and run, in the repository's directory
 * (so `./README.md` is a file to copy; `tmpdir()` is in the temporary directory, removed
 * afterwards), in a fresh process that must exit with status 0 by
 * itself within {@link RUN_MS}: an example that leaves a context open hangs, and fails. Every
 * process it started must be gone afterwards (the leak check of every test file).
 *
 * An example that needs what a test machine does not have (an ssh host, sudo with a password, a
 * container) says so on its fence, with the reason: ```` ```ts no_run: needs an ssh host ````.
 * It is type-checked and not run; the test says it was skipped, and why.
 *
 * `MITOGEN_EXAMPLES=core.ts` (any part of a test's label, e.g. `core.ts:417` or `Router.local`)
 * type-checks and runs only the examples it names.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { checkLeaks, underDeno } from "./helpers.ts";

checkLeaks();

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
/** How long one example may run, start to exit (local contexts only; the machine may be busy). */
const RUN_MS = 60_000;
/** How long the type-check of all examples may take. */
const CHECK_MS = 180_000;

/** One `@example` block: where it is, whose it is, its code, and why it is not run (if it is not). */
interface Example {
  file: string;
  line: number;
  symbol: string;
  code: string;
  noRun: string | null;
}

/** The `@example` blocks of one source text, with the symbol each documents. */
function extractExamples(file: string, text: string): Example[] {
  const lines = text.split("\n");
  const out: Example[] = [];
  let owner: string | null = null;
  for (let i = 0; i < lines.length; i++) {
    const decl = /^(?:export )?(?:default )?(?:abstract )?(?:class|interface) (\w+)/.exec(lines[i] ?? "");
    if (decl) owner = decl[1] ?? null;
    if (!/^\s*\/\*\*/.test(lines[i] ?? "")) continue;
    // One JSDoc comment: lines i..end.
    let end = i;
    while (end < lines.length && !(lines[end] ?? "").includes("*/")) end++;
    const body = lines.slice(i, end + 1).map((l) => l.replace(/^\s*\/?\*+\/?\s?/, "").replace(/\s*\*\/\s*$/, ""));
    const symbol = symbolAfter(
      lines,
      end + 1,
      owner,
      body.some((l) => /^@module\b/.test(l)),
      /^\s/.test(lines[i] ?? ""),
    );
    for (let j = 0; j < body.length; j++) {
      if (!/^@example\b/.test(body[j] ?? "")) continue;
      let k = j + 1;
      while (k < body.length && (body[k] ?? "").trim() === "") k++;
      const fence = /^```\s*(\w+)?\s*(.*)$/.exec(body[k] ?? "");
      if (!fence) throw new Error(`${file}:${i + k + 1}: @example without a fenced code block`);
      const info = fence[2]?.trim() ?? "";
      const noRun = /^no_run\b:?\s*(.*)$/.exec(info);
      if (info && !noRun) throw new Error(`${file}:${i + k + 1}: unknown fence attribute ${JSON.stringify(info)} (only "no_run: <reason>")`);
      if (noRun && !noRun[1]) throw new Error(`${file}:${i + k + 1}: no_run without a reason ("no_run: needs ...")`);
      const start = k + 1;
      let stop = start;
      while (stop < body.length && !/^```\s*$/.test(body[stop] ?? "")) stop++;
      if (stop >= body.length) throw new Error(`${file}:${i + k + 1}: unclosed code block`);
      out.push({ file, line: i + j + 1, symbol, code: `${body.slice(start, stop).join("\n")}\n`, noRun: noRun ? (noRun[1] ?? "") : null });
      j = stop;
    }
    i = end;
  }
  return out;
}

/** The name declared at or after line `from` (blank lines skipped). */
function symbolAfter(lines: string[], from: number, owner: string | null, isModule: boolean, member: boolean): string {
  if (isModule) return "(module)";
  for (let i = from; i < lines.length; i++) {
    const l = (lines[i] ?? "").trim();
    if (l === "") continue;
    const m =
      /^(?:export )?(?:default )?(?:declare )?(?:abstract )?(?:async )?(?:function\*?|class|interface|type|const|let|var) (\w+)/.exec(l) ??
      /^(?:(?:public|private|protected|static|readonly|override|abstract|async|get|set|declare) )*(\*?[#\w]+)\s*[(<:=?;]/.exec(l);
    const name = m?.[1] ?? l.slice(0, 40);
    return member && owner ? `${owner}.${name}` : name;
  }
  return "(end of file)";
}

/** Folders whose files are not the library's modules. */
const NOT_MODULES = new Set(["node_modules", "dist", "tests", "bench", "examples"]);

/** The library's modules: the .ts files of the repository, but for those under {@link NOT_MODULES} or a dot folder. */
function moduleFiles(sub = ""): string[] {
  return readdirSync(join(ROOT, sub), { withFileTypes: true })
    .sort((a, b) => (a.name < b.name ? -1 : 1))
    .flatMap((d) => {
      const path = sub ? `${sub}/${d.name}` : d.name;
      if (d.isDirectory()) return d.name.startsWith(".") || NOT_MODULES.has(d.name) ? [] : moduleFiles(path);
      return d.isFile() && d.name.endsWith(".ts") && !d.name.endsWith(".d.ts") ? [path] : [];
    });
}

/** Every example of every module, in file order. */
function allExamples(): Example[] {
  return moduleFiles().flatMap((f) => extractExamples(f, readFileSync(join(ROOT, f), "utf8")));
}

/** The module specifiers an example imports (static imports and `import()` of a literal). */
function importsOf(code: string): string[] {
  const specs: string[] = [];
  for (const m of code.matchAll(/\b(?:from|import)\s*\(?\s*["']([^"']+)["']/g)) specs.push(m[1] ?? "");
  return specs;
}

const label = (e: Example): string => `${e.file}:${e.line} ${e.symbol}`;
/** `MITOGEN_EXAMPLES=core.ts` (or `core.ts:417`, `Router.local`): only the examples whose label holds it. */
const only = process.env.MITOGEN_EXAMPLES;
const examples = allExamples().filter((e) => !only || label(e).includes(only));
const dir = mkdtempSync(join(tmpdir(), "mitogen-examples-"));
// Removed as the test process exits (Deno's test runner runs a top-level after() with the first test, not the last).
const removeDir = (): void => rmSync(dir, { recursive: true, force: true });
if (underDeno) (globalThis as unknown as EventTarget).addEventListener("unload", removeDir);
else process.on("exit", removeDir);
symlinkSync(join(ROOT, "examples"), join(dir, "examples"));
// The linked samples are ES modules, as in the repository.
writeFileSync(join(dir, "package.json"), '{ "type": "module" }\n');
/** The examples' TMPDIR (what `tmpdir()` returns in them), removed with the rest. */
const TMP = join(dir, "tmp");
mkdirSync(TMP);

const fileOf = (e: Example): string => join(dir, `${e.file.replace(/\.ts$/, "").replaceAll("/", "_")}-${e.line}.mts`);
const MOD = join(ROOT, "mod.ts");
for (const e of examples) {
  writeFileSync(fileOf(e), e.code.replace(/(\bfrom\s*|\bimport\s*\(\s*)(["'])mitogen\2/g, `$1${JSON.stringify(MOD)}`));
}

/** Run `cmd args` in ROOT; resolves to its status and output; kills it (and fails) after `ms`. */
function run(
  cmd: string,
  args: string[],
  ms: number,
  env: Record<string, string> = {},
): Promise<{ code: number | null; signal: string | null; out: string; timedOut: boolean }> {
  return new Promise((done, fail) => {
    const child = spawn(cmd, args, { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "1", ...env } });
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (out += d.toString()));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, ms);
    child.on("error", (err) => {
      clearTimeout(timer);
      fail(err);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      done({ code, signal, out, timedOut });
    });
  });
}

test("the modules' JSDoc holds examples", () => {
  assert.ok(examples.length > 0, "no @example found");
});

test('every example imports the library from "mitogen"', () => {
  const bad = examples.flatMap((e) =>
    importsOf(e.code)
      .filter((s) => (s.startsWith(".") || s.startsWith("/")) && !s.startsWith("./examples/"))
      .map((s) => `${label(e)} imports ${JSON.stringify(s)}`),
  );
  assert.deepEqual(bad, [], 'examples import from "mitogen", as a user would');
});

test(`every example type-checks (${underDeno ? "deno check" : "tsc"})`, { timeout: CHECK_MS + 10_000 }, async () => {
  let r: Awaited<ReturnType<typeof run>>;
  if (underDeno) {
    r = await run(process.execPath, ["check", "-q", "--config", join(ROOT, "deno.json"), ...examples.map(fileOf)], CHECK_MS);
  } else {
    const config = join(dir, "tsconfig.json");
    writeFileSync(
      config,
      JSON.stringify({
        extends: join(ROOT, "tsconfig.json"),
        compilerOptions: { typeRoots: [join(ROOT, "node_modules/@types")], moduleDetection: "force" },
        include: [],
        files: examples.map(fileOf),
      }),
    );
    r = await run(process.execPath, [join(ROOT, "node_modules/typescript/bin/tsc"), "-p", config, "--pretty", "false"], CHECK_MS);
  }
  // Name the example (file, line, symbol) beside each error, not the temporary file.
  let report = r.out;
  for (const e of examples) report = report.replaceAll(fileOf(e), `[example ${label(e)}]`).replaceAll(relative(ROOT, fileOf(e)), `[example ${label(e)}]`);
  assert.ok(!r.timedOut, `type-check did not finish within ${CHECK_MS / 1000} s`);
  assert.equal(r.code, 0, `examples do not type-check:\n${report}`);
});

for (const e of examples) {
  // The reason is in the name too: Deno's reporter prints a skipped test's name, not its reason.
  const skip = e.noRun === null ? false : `type-checked only, not run: ${e.noRun}`;
  const name = skip ? `example ${label(e)} (${skip})` : `example ${label(e)} runs`;
  test(name, { skip, timeout: RUN_MS + 10_000 }, async () => {
    const args = underDeno ? ["run", "-A", "-q", "--config", join(ROOT, "deno.json"), fileOf(e)] : ["--import", "tsx", fileOf(e)];
    const r = await run(process.execPath, args, RUN_MS, { TMPDIR: TMP });
    const how = r.timedOut
      ? `did not exit within ${RUN_MS / 1000} s (a context left open?)`
      : r.code !== 0
        ? `exited with ${r.code === null ? `signal ${r.signal}` : `status ${r.code}`}`
        : "";
    assert.equal(how, "", `the example of ${e.symbol} (${e.file}:${e.line}) ${how}:\n${e.code}\n--- its output:\n${r.out}`);
  });
}
