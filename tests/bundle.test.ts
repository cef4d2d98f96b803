/**
 * dist/mitogen.mjs on its own: copied into an empty folder (no node_modules),
 * it works as a library under node and under deno, with node or deno children.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { LAUNCHER } from "../build.ts";
import { runtimeCommand } from "../runtime.ts";
import { which } from "../which.ts";
import { matrix } from "../lab/matrix.ts";
import { checkLeaks } from "./helpers.ts";

checkLeaks();

const run = promisify(execFile);
const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist", "mitogen.mjs");
let dir = "";

before(async () => {
  if (!existsSync(dist)) {
    const { buildDist } = await import("../build.ts");
    await buildDist();
  }
  dir = mkdtempSync(join(tmpdir(), "mitogen-bundle-"));
  copyFileSync(dist, join(dir, "mitogen.mjs"));
  writeFileSync(
    join(dir, "use.mjs"),
    `import { inspect } from "node:util";
import { CallError, LatchError, Message, Router, Select, isMaster, contextId } from "./mitogen.mjs";
const router = new Router();
try {
  const a = await router.local({ runtime: "node", name: "bundle-a" });
  const b = await router.local({ runtime: "deno", name: "bundle-b", via: a });
  const c = await router.local({ runtime: "node", name: "bundle-c", via: b });
  const kinds = await Promise.all([a, b, c].map((ctx) => ctx.call(() => (typeof Deno === "undefined" ? "node" : "deno"))));
  const doubled = await c.call((x) => x * 2, 21);
  // what console.log shows of the bundle's classes: their own names
  const thrown = await c.call(() => { throw new TypeError("t"); }).catch((err) => err);
  const first = (v) => inspect(v).split("\\n")[0];
  const names = [CallError.name, LatchError.name, Message.name, Select.name, Router.name, first(thrown), first(new LatchError("l"))];
  console.log(JSON.stringify({ isMaster, contextId, kinds, doubled, names }));
} finally {
  await router.shutdown();
}
`,
  );
});

after(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test("run as a program, the single file starts with node, or with deno where there is no node", async () => {
  const onlyDeno = mkdtempSync(join(tmpdir(), "mitogen-only-deno-"));
  try {
    const deno = runtimeCommand("deno").exe;
    const denoPath = deno.startsWith("/") ? deno : which(deno);
    assert.ok(denoPath, "deno is on PATH (a devDependency)");
    symlinkSync(denoPath, join(onlyDeno, "deno"));
    const runtimeOf = async (path: string) =>
      (
        await run(join(dir, "mitogen.mjs"), ["eval", "local", 'typeof Deno === "undefined" ? "node" : "deno"'], {
          cwd: dir,
          timeout: 60_000,
          env: { ...process.env, PATH: path },
        })
      ).stdout.trim();
    assert.match(await runtimeOf(process.env.PATH ?? ""), /"result":"node"/);
    assert.match(await runtimeOf(onlyDeno), /"result":"deno"/);
  } finally {
    rmSync(onlyDeno, { recursive: true, force: true });
  }
});

test("the bundle is one ASCII file that starts with its launcher", () => {
  const text = readFileSync(dist, "latin1");
  assert.ok(text.startsWith(LAUNCHER));
  assert.equal(text.search(/[\u0080-\u00ff]/), -1, "ASCII only");
  assert.doesNotMatch(text, /from "@msgpack|require\("@msgpack/, "the codec library is inlined");
});

for (const host of ["node", "deno"] as const) {
  test(`copied alone, it works as a library under ${host}`, async () => {
    const exe = runtimeCommand(host).exe;
    const args = host === "node" ? ["use.mjs"] : ["run", "-A", "use.mjs"];
    const { stdout } = await run(exe, args, { cwd: dir, env: { ...process.env, DENO_NO_UPDATE_CHECK: "1" }, timeout: 60_000 });
    assert.deepEqual(JSON.parse(stdout.trim()), {
      isMaster: true,
      contextId: 0,
      kinds: ["node", "deno", "node"],
      doubled: 42,
      // not _CallError, _Message, Router2, nor `_CallError [CallError]: ...` (esbuild's renames)
      names: ["CallError", "LatchError", "Message", "Select", "Router", "CallError: TypeError: t", "LatchError: l"],
    });
  });
}

/** Modules shipped with no esbuild anywhere (the single file copied alone): plain ones go as they are. */
const PLAIN = {
  "lib.mjs": 'export const twice = (n) => 2 * n;\nexport default "lib-default";\n',
  "entry.mjs": [
    'import { hostname } from "node:os";',
    'import def, { twice } from "./lib.mjs";',
    'import * as all from "./lib.mjs";',
    'import { isMaster, log } from "../mitogen.mjs";',
    "export function probe(n) {",
    '  log.info("probing");',
    "  return [twice(n), def, isMaster, typeof hostname(), Object.keys(all).sort()];",
    "}",
    "export { twice as double };",
    'export * from "./lib.mjs";',
    'export default function fallback() { return "entry-default"; }',
    "",
  ].join("\n"),
  "typed.ts": 'import { twice } from "./lib.mjs";\ntype N = number;\nexport function t(n: N): N {\n  return twice(n);\n}\n',
  "npm.mjs": 'import { dequal } from "dequal";\nexport const f = () => dequal(1, 1);\n',
  "use-plain.mjs": [
    'import { Router } from "../mitogen.mjs";',
    "const router = new Router();",
    "const out = {};",
    "try {",
    "  const ctx = await router.local();",
    '  const entry = await ctx.import(new URL("./entry.mjs", import.meta.url));',
    "  out.probe = await entry.probe(3);",
    "  out.double = await entry.double(4);",
    "  out.twice = await entry.twice(5);",
    "  out.fallback = await entry.default();",
    '  for (const name of ["typed.ts", "npm.mjs"]) {',
    "    try {",
    "      const m = await ctx.import(new URL(name, import.meta.url));",
    "      out[name] = await (m.t ?? m.f)(6);",
    "    } catch (err) {",
    "      out[name] = err.message;",
    "    }",
    "  }",
    "} finally {",
    "  await router.shutdown();",
    "}",
    "console.log(JSON.stringify(out));",
    "",
  ].join("\n"),
};

test("copied alone (no esbuild), it ships plain modules as they are, TypeScript where the runtime strips types, and says what needs esbuild", async () => {
  const plain = join(dir, "plain");
  mkdirSync(plain, { recursive: true });
  for (const [name, text] of Object.entries(PLAIN)) writeFileSync(join(plain, name), text);
  const node24 = matrix().find((r) => r.name === "node24" && r.runtime !== null);
  for (const exe of [runtimeCommand("node").exe, ...(node24 ? [node24.exe] : [])]) {
    const { stdout } = await run(exe, [join(plain, "use-plain.mjs")], { cwd: plain, timeout: 60_000 });
    const out = JSON.parse(stdout.trim()) as Record<string, unknown>;
    assert.deepEqual(out.probe, [6, "lib-default", false, "string", ["default", "twice"]]);
    assert.equal(out.double, 8);
    assert.equal(out.twice, 10);
    assert.equal(out.fallback, "entry-default");
    assert.match(
      String(out["npm.mjs"]),
      /npm\.mjs: it imports "dequal", neither a builtin, "mitogen" nor a relative file: shipping it needs esbuild on the master \(ctx\.import\(\) needs the esbuild package/,
    );
    const strips = typeof (await import("node:module")).stripTypeScriptTypes === "function" && exe === process.execPath;
    if (exe === node24?.exe || strips) assert.equal(out["typed.ts"], 12);
    else
      assert.match(
        String(out["typed.ts"]),
        /typed\.ts: TypeScript, and this runtime strips no types \(Node 22\.13\+ and Deno 2\.9 do\): shipping it needs esbuild/,
      );
  }
  // A Deno master without esbuild: an empty cache and --cached-only, so npm:esbuild cannot come. Deno 2.9's node:module strips types.
  const denoDir = mkdtempSync(join(tmpdir(), "mitogen-deno-dir-"));
  try {
    const { stdout } = await run(runtimeCommand("deno").exe, ["run", "-A", "--cached-only", join(plain, "use-plain.mjs")], {
      cwd: plain,
      timeout: 60_000,
      env: { ...process.env, DENO_DIR: denoDir, DENO_NO_UPDATE_CHECK: "1" },
    });
    const out = JSON.parse(stdout.trim()) as Record<string, unknown>;
    assert.deepEqual(out.probe, [6, "lib-default", false, "string", ["default", "twice"]]);
    assert.equal(out["typed.ts"], 12);
    assert.match(String(out["npm.mjs"]), /npm\.mjs: it imports "dequal".*needs esbuild on the master: under Deno it imports npm:esbuild@[\d.]+, which failed/);
  } finally {
    rmSync(denoDir, { recursive: true, force: true });
  }
});

test("copied alone, it runs as the mitogen command", async () => {
  const { stdout } = await run(runtimeCommand("node").exe, ["mitogen.mjs", "eval", "local", "6 * 7"], { cwd: dir, timeout: 60_000 });
  const line = JSON.parse(stdout.trim()) as { host: string; ok: boolean; result: unknown };
  assert.deepEqual([line.host, line.ok, line.result], ["local", true, 42]);
  await assert.rejects(run(runtimeCommand("node").exe, ["mitogen.mjs", "frobnicate"], { cwd: dir, timeout: 60_000 }), /unknown command "frobnicate"/);
});
