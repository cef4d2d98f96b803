/**
 * dist/mitogen.mjs on its own: copied into an empty folder (no node_modules),
 * it works as a library under node and under deno, with node or deno children.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { LAUNCHER } from "../build.ts";
import { runtimeCommand } from "../runtime.ts";
import { which } from "../which.ts";
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

test("copied alone, it runs as the mitogen command", async () => {
  const { stdout } = await run(runtimeCommand("node").exe, ["mitogen.mjs", "eval", "local", "6 * 7"], { cwd: dir, timeout: 60_000 });
  const line = JSON.parse(stdout.trim()) as { host: string; ok: boolean; result: unknown };
  assert.deepEqual([line.host, line.ok, line.result], ["local", true, 42]);
  await assert.rejects(run(runtimeCommand("node").exe, ["mitogen.mjs", "frobnicate"], { cwd: dir, timeout: 60_000 }), /unknown command "frobnicate"/);
});
