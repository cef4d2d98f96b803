/** Shipping real code: ctx.import, takesRouter, hints for free identifiers. */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { pathToFileURL } from "node:url";
import { type CallContext, CallError, MitogenError, Receiver, takesRouter } from "../mod.ts";
import { inflateRawSync } from "node:zlib";
import { createHash } from "node:crypto";
import { createServer } from "node:http";
import { bundle, bundleTarget, callerFile } from "../bundler.ts";
import { isDeno } from "../runtime.ts";
import { checkLeaks, linkFrames, quietRouter, routerWithLogs, RUNTIMES, waitFor, whenConnected } from "./helpers.ts";

checkLeaks();

type Tasks = typeof import("./fixtures/tasks.ts");
const TASKS = new URL("./fixtures/tasks.ts", import.meta.url);

for (const runtime of RUNTIMES) {
  describe(`${runtime} child`, () => {
    test("a module with a relative import, an npm dependency and node: builtins runs there", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "modular" });
      const tasks = await ctx.import<Tasks>(TASKS);
      assert.equal(await tasks.add(1, 2), 3);
      const report = await tasks.inventory({ deep: true });
      assert.deepEqual(report, { host: report.host, deep: true, runtime, shouted: "HI!" });
      assert.equal(await tasks.same({ a: [1, { b: 2 }] }, { a: [1, { b: 2 }] }), true);
      assert.deepEqual(await tasks.roles(), { isMaster: false });
      const err = await tasks.fail().catch((e: unknown) => e);
      assert.ok(err instanceof CallError);
      assert.equal(err.remoteName, "RangeError");
      // the remote stack points at the original TypeScript
      const line =
        readFileSync(TASKS, "utf8")
          .split("\n")
          .findIndex((l) => l.includes('throw new RangeError("fixture failure")')) + 1;
      assert.match(err.remoteStack, new RegExp(`fixtures/tasks\\.ts:${line}:\\d+`), err.remoteStack);
      assert.match(err.stack ?? "", new RegExp(`fixtures/tasks\\.ts:${line}:\\d+`));
      assert.match(err.remoteStack, /\[master -> modular\]/, "the hop path");
      const caused = await tasks.failWithCause().catch((e: unknown) => e);
      assert.ok(caused instanceof CallError);
      assert.ok(caused.cause instanceof TypeError, "the cause chain survives");
      assert.equal((caused.cause as Error).message, "inner");
    });

    test('a relative ctx.import("./x.ts") is read at the call: from a module\'s top level that awaits something else while the context connects', async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "relative", via: await router.local({ runtime, name: "relative-parent" }) });
      // Handed out before its READY (ctx.runtime is null): the import waits for it to connect. Not asserted: a
      // master held up for the child's start (a loaded CI machine) could read READY before this line runs.
      const global = globalThis as { relativeImportContext?: unknown };
      global.relativeImportContext = ctx;
      try {
        const fixture = new URL(`./fixtures/import-relative.ts?${runtime}`, import.meta.url);
        assert.equal(((await import(fixture.href)) as { sum: number }).sum, 5);
      } finally {
        delete global.relativeImportContext;
      }
    });

    test("shipped code may use import(): a builtin in a call, a builtin and a bundled npm dependency in a module, child and grandchild", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "importer" });
      const b = await router.local({ runtime, name: "importer-below", via: a });
      for (const ctx of [a, b]) {
        // A Node child whose core was compiled by the code-cache loader (vm.Script) had no loader for import().
        assert.equal(await ctx.call(async () => (await import("node:os")).platform()), process.platform, ctx.name);
        assert.equal(await ctx.call(async (p: string) => (await import(p)).sep, "node:path"), "/", `${ctx.name}: a specifier from an argument`);
        const tasks = await ctx.import<Tasks>(TASKS);
        assert.deepEqual(await tasks.dynamicImports(), { platform: process.platform, same: true, sep: "/" }, ctx.name);
      }
    });

    test("shipped code logging reaches the master with the context name and hop path", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "log-top" });
      const b = await router.local({ runtime, name: "log-leaf", via: a });
      const tasks = await b.import<Tasks>(TASKS);
      await tasks.chatty();
      await waitFor(() => logs.records.some((r) => r.message === "console says hi"), 5000, "console line");
      const said = logs.records.find((r) => r.source === "user");
      assert.deepEqual(
        { name: said?.name, path: said?.path, level: said?.level, message: said?.message, data: said?.data },
        { name: "log-leaf", path: ["master", "log-top", "log-leaf"], level: "info", message: "module says", data: { n: 1 } },
      );
      const printed = logs.records.find((r) => r.message === "console says hi");
      assert.deepEqual(printed?.path, ["master", "log-top", "log-leaf"]);
    });

    test('"mitogen" inside a shipped module is the running core', async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "core-identity" });
      const tasks = await ctx.import<Tasks>(TASKS);
      await using recv = new Receiver(router);
      assert.equal(await tasks.coreIdentity(recv.toSender()), true);
      assert.equal((await recv.get({ timeout: 5000 })).unpickle(), true, "a Sender decoded there is bound to the running router");
      await using made = new Receiver(router);
      await tasks.sendFromHere(made.handle);
      assert.equal((await made.get({ timeout: 5000 })).unpickle(), "made in core-identity", "a Sender the module creates reaches the master");
      await using counted = new Receiver(router);
      assert.equal(await tasks.count(counted.toSender(), 3), 3);
      const got: unknown[] = [];
      for await (const msg of counted) got.push(msg.unpickle());
      assert.deepEqual(got, [0, 1, 2]);
    });

    test("a takesRouter function starts a grandchild and returns its result", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "spawner" });
      const tasks = await ctx.import<Tasks>(TASKS);
      assert.equal(await tasks.spawnAndCall(runtime), 42);
      // a plain function marked with takesRouter gets { router, econtext } too
      const seen = await ctx.call(takesRouter((call: CallContext) => [call.router.myId, call.econtext === call.router]));
      assert.deepEqual(seen, [ctx.contextId, true]);
      const withArg = await ctx.call(
        takesRouter((a: number, call: CallContext) => a + call.router.myId),
        10,
      );
      assert.equal(withArg, 10 + ctx.contextId);
    });

    test("a free identifier in shipped source names itself and suggests ctx.import", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "closure" });
      const outside = 5;
      await assert.rejects(
        ctx.call(() => outside + 1),
        (err: unknown) => err instanceof CallError && /outside is not defined in context closure/.test(err.message) && /ctx\.import/.test(err.message),
      );
    });
  });
}

test("a module imported in 10 contexts below one parent crosses the master's link once", async () => {
  await using router = quietRouter();
  const parent = await router.local({ name: "fanout" });
  const kids = await Promise.all(Array.from({ length: 10 }, (_, i) => router.local({ name: `leaf${i}`, via: parent })));
  const before = router.stats.modulesSent;
  const imported = await Promise.all(kids.map((k) => k.import<Tasks>(TASKS)));
  assert.deepEqual(await Promise.all(imported.map((t, i) => t.add(i, 1))), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.equal(router.stats.modulesSent - before, 1, "the master sent the module once");
  const parentSent = await parent.call(takesRouter((call: CallContext) => call.router.stats.modulesSent));
  assert.ok((parentSent as number) >= 10, `the parent served its ten children (${parentSent})`);
});

test("a first import and its first call go in one flight: the module ahead of them, no GET_MODULE, no wait for the export names", async () => {
  await using router = quietRouter();
  const hop = await router.local({ name: "one-flight-hop" });
  const leaf = await whenConnected(router.local({ name: "one-flight-leaf", via: hop }));
  const frames = linkFrames(router, hop);
  const tasks = await leaf.import<Tasks>(TASKS);
  assert.deepEqual(frames.up, [], "import resolved before anything came back");
  assert.equal(await tasks.add(2, 3), 5);
  assert.deepEqual(frames.down, ["LOAD_MODULE", "CALL_FUNCTION", "CALL_FUNCTION"], "module, LOAD, call");
  await waitFor(() => frames.up.length === 2, 5000, "the LOAD's reply");
  assert.deepEqual(frames.up, ["reply", "reply"], "no GET_MODULE from below");
  // The hop kept it: a sibling below it gets it from there.
  const sibling = await whenConnected(router.local({ name: "one-flight-sibling", via: hop }));
  frames.down.length = 0;
  assert.equal(await (await sibling.import<Tasks>(TASKS)).add(1, 1), 2);
  const pushed = frames.down.filter((h) => h === "LOAD_MODULE").length;
  assert.equal(pushed, 1, "one LOAD_MODULE, naming the module the hop holds");
});

test("a module that throws as it loads: import resolves, its calls reject with the error; exports that are not functions go", async () => {
  const dir = mkdtempSync(join(tmpdir(), "mitogen-mod-"));
  try {
    await using router = quietRouter();
    const ctx = await router.local({ name: "thrower" });
    const bad = join(dir, "bad.ts");
    writeFileSync(bad, 'export function f(): number {\n  return 1;\n}\nthrow new TypeError("broken at load");\n');
    const mod = await ctx.import<{ f(): number }>(pathToFileURL(bad));
    assert.deepEqual(Object.keys(mod), ["f"]);
    for (let i = 0; i < 2; i++)
      await assert.rejects(mod.f(), (err: unknown) => err instanceof CallError && err.remoteName === "TypeError" && /broken at load/.test(err.message));
    const mixed = join(dir, "mixed.ts");
    writeFileSync(mixed, "export const n = 5;\nexport function g(): number {\n  return n;\n}\n");
    const m = await ctx.import<{ g(): number }>(pathToFileURL(mixed));
    assert.equal(await m.g(), 5);
    await waitFor(() => Object.keys(m).join() === "g", 5000, "n removed once the load answered");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("editing a module between two imports re-sends it; an unchanged one is reused", async () => {
  const dir = mkdtempSync(join(tmpdir(), "mitogen-mod-"));
  try {
    const file = join(dir, "edit.ts");
    writeFileSync(file, "export const version = (): number => 1;\n");
    await using router = quietRouter();
    const ctx = await router.local({ name: "editor" });
    const first = await ctx.import<{ version(): number }>(pathToFileURL(file));
    assert.equal(await first.version(), 1);
    const sent = router.stats.modulesSent;
    await ctx.import<{ version(): number }>(pathToFileURL(file));
    assert.equal(router.stats.modulesSent, sent, "unchanged: not sent again");
    writeFileSync(file, "export const version = (): number => 2; // edited\n");
    const second = await ctx.import<{ version(): number }>(pathToFileURL(file));
    assert.equal(await second.version(), 2);
    assert.equal(router.stats.modulesSent, sent + 1, "changed: sent again");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a module that fails to bundle names the file and line; the context stays usable", async () => {
  const dir = mkdtempSync(join(tmpdir(), "mitogen-mod-"));
  try {
    await using router = quietRouter();
    const ctx = await router.local({ name: "broken" });
    const syntax = join(dir, "syntax.ts");
    writeFileSync(syntax, "export function ok() {\n  return 1 +;\n}\n");
    await assert.rejects(ctx.import(pathToFileURL(syntax)), (err: unknown) => err instanceof MitogenError && /syntax\.ts:2:\d+/.test(err.message));
    const missing = join(dir, "missing.ts");
    writeFileSync(missing, 'import { nothing } from "./not-there.ts";\nexport const f = () => nothing;\n');
    await assert.rejects(
      ctx.import(pathToFileURL(missing)),
      (err: unknown) => err instanceof MitogenError && /missing\.ts:1:\d+: Could not resolve/.test(err.message),
    );
    assert.equal(await ctx.call(() => "usable"), "usable");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** A JSR registry of one package, `@test/quad` 1.0.0 (two files), as Deno fetches from `JSR_URL`. */
async function fakeJsr(): Promise<{ url: string; close(): Promise<void> }> {
  const files: Record<string, string> = {
    "/mod.ts": 'import { twice } from "./lib.ts";\nexport const quad = (n: number): number => twice(twice(n));\n',
    "/lib.ts": "export const twice = (n: number): number => 2 * n;\n",
  };
  const sha = (text: string) => `sha256-${createHash("sha256").update(text).digest("hex")}`;
  const manifest = Object.fromEntries(Object.entries(files).map(([k, v]) => [k, { size: v.length, checksum: sha(v) }]));
  const routes: Record<string, string> = {
    "/@test/quad/meta.json": JSON.stringify({ scope: "test", name: "quad", latest: "1.0.0", versions: { "1.0.0": {} } }),
    "/@test/quad/1.0.0_meta.json": JSON.stringify({ manifest, exports: { ".": "./mod.ts" } }),
    ...Object.fromEntries(Object.entries(files).map(([k, v]) => [`/@test/quad/1.0.0${k}`, v])),
  };
  const server = createServer((req, res) => {
    const body = routes[req.url ?? ""];
    if (body === undefined) return void res.writeHead(404).end();
    res.writeHead(200, { "content-type": req.url?.endsWith(".ts") ? "application/typescript" : "application/json" }).end(body);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}/`,
    close: async () => {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    },
  };
}

test("jsr: in a shipped module: bundled through Deno's own resolution on a Deno master; on Node refused, saying what to do", async () => {
  const dir = mkdtempSync(join(tmpdir(), "mitogen-jsr-"));
  const saved = { JSR_URL: process.env.JSR_URL, DENO_DIR: process.env.DENO_DIR };
  const registry = await fakeJsr();
  try {
    writeFileSync(join(dir, "uses-jsr.ts"), 'import { quad } from "jsr:@test/quad";\nexport const probe = (n: number): number => quad(n);\n');
    // deno info, run by the master, fetches from this registry into a cache of the test's own.
    process.env.JSR_URL = registry.url;
    process.env.DENO_DIR = join(dir, "deno-dir");
    await using router = quietRouter();
    const ctx = await router.local({ name: "jsr" });
    const uses = pathToFileURL(join(dir, "uses-jsr.ts"));
    if (isDeno) {
      const mod = await ctx.import<{ probe(n: number): number }>(uses);
      assert.equal(await mod.probe(3), 12);
    } else {
      await assert.rejects(ctx.import(uses), /jsr:@test\/quad: jsr: specifiers are resolved on a Deno master only .*npx jsr add @test\/quad/);
    }
  } finally {
    for (const [k, v] of Object.entries(saved))
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    await registry.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("modules are bundled for the runtime the importing context reported, cached per target", async () => {
  assert.equal(bundleTarget("node 12.22.12"), "node12.22");
  assert.equal(bundleTarget("deno 1.46.3"), "deno1.46");
  assert.equal(bundleTarget(null), "node12", "unknown: the oldest a child runs on");
  const dir = mkdtempSync(join(tmpdir(), "mitogen-mod-"));
  try {
    const file = join(dir, "modern.ts");
    writeFileSync(file, "export const pick = (o?: { a?: number }): number => o?.a ?? 7;\n");
    const text = async (target: string) => {
      const b = await bundle(file, target);
      return { name: b.name, code: inflateRawSync(b.code).toString() };
    };
    const old = await text("node12.22");
    const fresh = await text("node22.1");
    assert.doesNotMatch(old.code, /\?\?|\?\./, "lowered for Node 12");
    assert.match(fresh.code, /\?\?/, "kept for Node 22");
    assert.notEqual(old.name, fresh.name);
    assert.equal((await text("node12.22")).name, old.name, "cached per target");
    // A context says what it runs on; its imports are bundled for that.
    await using router = quietRouter();
    const ctx = await router.local({ name: "reports" });
    const self = (globalThis as { Deno?: { version: { deno: string } } }).Deno;
    assert.equal(ctx.runtime, self ? `deno ${self.version.deno}` : `node ${process.versions.node}`);
    const mod = await ctx.import<{ pick(o?: { a?: number }): number }>(pathToFileURL(file));
    assert.deepEqual([await mod.pick(), await mod.pick({ a: 1 })], [7, 1]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the caller of a relative ctx.import is the first frame outside the library, async frames too", () => {
  const lib = new URL("../bundler.ts", import.meta.url).href;
  const stack = (caller: string) => `Error\n    at relativeToCaller (${lib}:139:17)\n    at CallScope.import (${lib}:559:31)\n${caller}`;
  assert.equal(callerFile(stack("    at main (file:///a/main.ts:8:20)")), "/a/main.ts");
  assert.equal(callerFile(stack("    at file:///a/main.ts:8:20")), "/a/main.ts");
  assert.equal(callerFile(stack("    at async file:///a/main.ts:8:20")), "/a/main.ts", "Deno's top level, after an await");
  assert.equal(callerFile(stack("    at async <anonymous> (/a/main.ts:8:20)")), "/a/main.ts", "Node's, through tsx");
  assert.equal(callerFile(stack("    at node:internal/process/task_queues:95:5")), null);
});
