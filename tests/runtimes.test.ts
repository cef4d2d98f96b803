/**
 * The runtime matrix: children on Node 12, 14, 16, 18, 20, 22, 24, 26 and
 * Deno 1.46 and 2 each run the same short scenario (bootstrap, calls, a
 * Sender stream, a Select, a shipped module with an npm dependency, log
 * forwarding, a deadline, a remote throw mapped to its source, `import()` in
 * shipped code, a grandchild
 * of the next runtime below it, orderly shutdown), all at once. Then the
 * runtimes that must be refused (Node 10, python, cat), locally and behind a
 * shell, and `runtime: "auto"` choosing among node, nodejs and deno.
 *
 * The binaries come from `.ci/install-runtimes` (see lab/matrix.ts). Missing
 * ones skip the test, saying so, except under CI=true, where they fail it.
 * The node master's run covers the matrix; under Deno it is skipped.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { CORE } from "../frames.ts";
import { CallError, type Context, Receiver, Router, Select, TimeoutError } from "../mod.ts";
import { captureLogs, checkLeaks, coresKept, quietRouter, underDeno, waitFor, whenConnected } from "./helpers.ts";
import { DENO2, INSTALL_HINT, matrix, node10, RUNTIMES_DIR } from "../lab/matrix.ts";

checkLeaks();

type Tasks = typeof import("./fixtures/tasks.ts");
const TASKS = new URL("./fixtures/tasks.ts", import.meta.url);
const FAIL_LINE =
  readFileSync(TASKS, "utf8")
    .split("\n")
    .findIndex((l) => l.includes('throw new RangeError("fixture failure")')) + 1;

const ALL = underDeno ? [] : matrix();
const MISSING = ALL.filter((r) => r.runtime === null).map((r) => r.name);
const OLD = underDeno ? null : node10();
const CI = process.env.CI === "true";

/** Skip (or, under CI, fail) when binaries are missing; skip under Deno, whose run would repeat the node master's. */
function skipReason(missing: string[]): string | false {
  if (underDeno) return "the matrix runs once, under the node master (it covers every child runtime)";
  if (!missing.length || CI) return false;
  return `not installed in ${RUNTIMES_DIR}: ${missing.join(", ")}; install with ${INSTALL_HINT}`;
}

if (underDeno) console.log(`tests/runtimes.test.ts: skipped: ${skipReason([])}`);

function assertInstalled(missing: string[]): void {
  assert.deepEqual(missing, [], `runtimes missing from ${RUNTIMES_DIR} (CI=true); install with ${INSTALL_HINT}`);
}

/** What a child says it is, from inside (no `process` on Deno 1.x). */
const selfReport = () =>
  typeof (globalThis as { Deno?: unknown }).Deno === "object"
    ? `deno ${(globalThis as unknown as { Deno: { version: { deno: string } } }).Deno.version.deno}`
    : `node ${process.versions.node}`;

/** Node before 16.11 runs the core lowered for Node 12; everything else the ES2022 one. */
const coreOf = (runtime: string) => {
  const [major, minor] = runtime.slice(5).split(".").map(Number) as [number, number];
  return runtime.startsWith("node") && (major < 16 || (major === 16 && minor < 11)) ? CORE.LOWERED : CORE.MODERN;
};

async function scenario(
  router: Router,
  logs: ReturnType<typeof captureLogs>,
  name: string,
  exe: string,
  runtime: string,
  below: { exe: string; runtime: string },
): Promise<void> {
  const ctx = await router.local({ runtime: exe, name, connectTimeout: 30_000 });
  assert.equal(ctx.runtime, runtime, "the runtime its first stage reported");
  assert.equal(await ctx.call(selfReport), runtime);
  assert.equal(await ctx.call((x: number) => x * 2, 21), 42);
  // Deno 1.46 and 2 alike set their parent-death signal through FFI (Deno 1.46 only has it with --unstable-ffi).
  if (runtime.startsWith("deno"))
    assert.deepEqual(
      logs.lines(name).filter((l) => l.startsWith("watchdog:")),
      ["watchdog: kernel"],
    );
  // A local child gets the core as a plain script and keeps none: it fetches the compressed one a child of its own needs (below).
  assert.deepEqual(await ctx.call(coresKept), []);

  const tasks = await ctx.import<Tasks>(TASKS);
  assert.equal(await tasks.same({ a: [1, { b: 2 }] }, { a: [1, { b: 2 }] }), true, "the npm dependency (dequal)");
  // import() in shipped code: a builtin in a call; a builtin and a bundled npm dependency in a module.
  const platform = process.platform;
  assert.equal(await ctx.call(async () => (await import("node:os")).platform()), platform, "import() in a call");
  assert.deepEqual(await tasks.dynamicImports(), { platform, same: true, sep: "/" }, "import() in a module");

  // A Sender stream into the master, and a Select over two calls.
  const inbox = new Receiver(router);
  assert.equal(await tasks.count(inbox.toSender(), 5), 5);
  const got: unknown[] = [];
  for await (const msg of inbox) got.push(msg.unpickle());
  assert.deepEqual(got, [0, 1, 2, 3, 4]);
  const sel = new Select([ctx.callAsync(() => "one"), ctx.callAsync(() => "two")]);
  const picked: unknown[] = [];
  for await (const ev of sel) picked.push((ev.data as { unpickle(): unknown }).unpickle());
  assert.deepEqual(picked.sort(), ["one", "two"]);

  // Log forwarding: the library's logger and what the child prints.
  await tasks.chatty();
  await waitFor(() => logs.records.some((r) => r.name === name && r.message === "console says hi"), 10_000, `${name}: printed line`);
  assert.ok(
    logs.records.some((r) => r.name === name && r.source === "user" && r.message === "module says" && (r.data as { n?: number } | undefined)?.n === 1),
    `${name}: log record`,
  );

  // A deadline reaches the callee's signal, with its reason (AbortController stands in on Node 12 and 14).
  const aborts = new Receiver(router);
  const late = await ctx.with({ timeout: 300 }).import<Tasks>(TASKS);
  // The caller's timer and the callee's late answer race on a loaded machine: either is an end.
  const outcome = await late.waitForAbort(aborts.toSender()).catch((e: unknown) => e);
  assert.ok(outcome instanceof TimeoutError || outcome === "too late", String(outcome));
  assert.equal((await aborts.get({ timeout: 10_000 })).unpickle(), `aborted in ${name}: TimeoutError`);
  aborts.close();

  // A remote throw, its stack mapped back to the TypeScript source.
  const err = await tasks.fail().catch((e: unknown) => e);
  assert.ok(err instanceof CallError, String(err));
  assert.equal(err.remoteName, "RangeError");
  assert.match(err.remoteStack, new RegExp(`fixtures/tasks\\.ts:${FAIL_LINE}:\\d+`), err.remoteStack);

  // A grandchild of another runtime, started from this one; the module bundled for it, fetched through this one.
  const grandchild = await whenConnected(router.local({ runtime: below.exe, name: `${name}.below`, via: ctx, connectTimeout: 30_000 }));
  assert.equal(grandchild.runtime, below.runtime);
  // The core for its own runtime went ahead of the start; the grandchild's, where another, it fetched.
  assert.deepEqual((await ctx.call(coresKept)).sort(), [...new Set([coreOf(runtime), coreOf(below.runtime)])].sort());
  assert.equal(await grandchild.call(selfReport), below.runtime);
  const deeper = await grandchild.import<Tasks>(TASKS);
  assert.equal(await deeper.add(40, 2), 42);
  assert.equal(await grandchild.call(async () => (await import("node:os")).platform()), platform, "import() in a call, grandchild");
  assert.deepEqual(await deeper.dynamicImports(), { platform, same: true, sep: "/" }, "import() in a module, grandchild");

  await grandchild.shutdown({ wait: true });
  await ctx.shutdown({ wait: true });
  assert.ok(ctx.isDisconnected);
}

test("every runtime of the matrix runs the scenario, with a grandchild of the next one", { skip: skipReason(MISSING) }, async () => {
  assertInstalled(MISSING);
  assert.equal(ALL.length, 10);
  const logs = captureLogs();
  const results = await Promise.allSettled(
    ALL.map(async (r, i) => {
      const below = ALL[(i + 1) % ALL.length] as (typeof ALL)[number];
      await using router = new Router({ log: logs.log, debug: true });
      await scenario(router, logs, `m.${r.name}`, r.exe, r.runtime as string, { exe: below.exe, runtime: below.runtime as string });
    }),
  );
  const failed = results.flatMap((res, i) => (res.status === "rejected" ? [`${ALL[i]?.name}: ${(res.reason as Error)?.stack ?? res.reason}`] : []));
  assert.deepEqual(failed, [], failed.join("\n\n"));
});

// ---------------------------------------------------------------------------
// Refused runtimes, and runtime "auto"

const RANGE = /children need node 12 or later, or deno 1\.46 or later/;
let dir = "";

before(() => {
  dir = mkdtempSync(join(tmpdir(), "mitogen-runtimes-"));
  // Stand-in for a container tool: drop the arguments before "/bin/sh", run the rest here with PATH=$MITOGEN_TEST_PATH.
  writeFileSync(join(dir, "shell-tool"), `#!/bin/sh\nwhile [ $# -gt 0 ] && [ "$1" != /bin/sh ]; do shift; done\nexec env PATH="$MITOGEN_TEST_PATH" "$@"\n`, {
    mode: 0o755,
  });
  // Stand-in for ssh: drop the options, the "--" and the host; run the remote command here.
  writeFileSync(join(dir, "ssh"), `#!/bin/sh\nwhile [ $# -gt 0 ] && [ "$1" != -- ]; do shift; done\nexec /bin/sh -c "$3"\n`, { mode: 0o755 });
});

after(() => rmSync(dir, { recursive: true, force: true }));

/** A directory holding links `name -> target`, to be a target's whole PATH. */
function pathOf(label: string, links: Record<string, string>): string {
  const path = mkdtempSync(join(dir, `${label}-`));
  for (const [name, target] of Object.entries(links)) symlinkSync(target, join(path, name));
  return path;
}

/** Start a context behind a shell (the remote command, as ssh and containers run it) with `PATH=path`. */
function behindShell(router: Router, path: string, options: { runtime?: string; name: string }): Promise<Context> {
  process.env.MITOGEN_TEST_PATH = path;
  return router.docker({ container: "c", path: join(dir, "shell-tool"), connectTimeout: 15_000, ...options });
}

const quick = async (what: Promise<unknown>, pattern: RegExp) => {
  const t0 = Date.now();
  await assert.rejects(what, pattern);
  assert.ok(Date.now() - t0 < 10_000, "it failed at once, not by timeout");
};

test("a runtime too old or not JavaScript fails at once, naming it and the supported range", { skip: skipReason(OLD ? [] : ["node10"]) }, async () => {
  assertInstalled(OLD ? [] : ["node10"]);
  const old = OLD as { exe: string; runtime: string };
  const version = old.runtime.slice(5).replace(/\./g, "\\.");
  await using router = quietRouter();
  const tooOld = new RegExp(`node ${version} is too old: ${RANGE.source}`);
  // Locally: the runtime itself is started.
  await quick(router.local({ runtime: old.exe }), tooOld);
  await quick(router.local({ runtime: "python3" }), new RegExp(`python3 is not node or deno \\(its --version says "Python 3[^"]*"\\): ${RANGE.source}`));
  await quick(
    router.local({ runtime: "/bin/cat" }),
    new RegExp(`/bin/cat is not node or deno \\(its --version says "cat \\(GNU coreutils\\)[^"]*"\\): ${RANGE.source}`),
  );
  // Behind a shell: the remote command asks a runtime of another name what it is.
  const path = pathOf("old", { node: old.exe, python3: "/usr/bin/python3", cat: "/bin/cat" });
  await quick(behindShell(router, path, { runtime: "node", name: "old.node" }), tooOld);
  await quick(
    behindShell(router, path, { runtime: "python3", name: "old.python" }),
    new RegExp(`python3 is not node or deno \\(its --version says "Python 3[^"]*"\\): ${RANGE.source}`),
  );
  const cat = await behindShell(router, path, { runtime: "/bin/cat", name: "old.cat" }).catch((e: Error) => e);
  assert.ok(cat instanceof Error);
  assert.match(cat.message, new RegExp(`/bin/cat is not node or deno \\(its --version says "cat \\(GNU coreutils\\)[^"]*"\\): ${RANGE.source}`));
  // Never the first stage's source text, even from a program that is no runtime but is named like one.
  assert.doesNotMatch(cat.message, /const g=require|Deno\.args/);
  const disguised = pathOf("disguised", { node: "/bin/cat" });
  const named = await router.local({ runtime: join(disguised, "node") }).catch((e: Error) => e);
  assert.ok(named instanceof Error);
  assert.match(named.message, /exited with code 1 before connecting; stderr:\n.*<first stage>/);
  assert.doesNotMatch(named.message, /const g=require/);
});

test('runtime "auto" runs the newest of node and nodejs, and deno when no node is new enough', {
  skip: skipReason(OLD ? MISSING : [...MISSING, "node10"]),
}, async () => {
  assertInstalled(OLD ? MISSING : [...MISSING, "node10"]);
  const exe = (name: string) => ALL.find((r) => r.name === name)?.exe as string;
  await using router = quietRouter();
  const newer = await behindShell(router, pathOf("auto1", { node: exe("node12"), nodejs: exe("node26"), deno: DENO2 }), { name: "auto.nodejs" });
  assert.equal(newer.runtime, ALL.find((r) => r.name === "node26")?.runtime);
  const plain = await behindShell(router, pathOf("auto2", { node: exe("node18"), nodejs: exe("node14") }), { name: "auto.node" });
  assert.equal(plain.runtime, ALL.find((r) => r.name === "node18")?.runtime);
  const deno = await behindShell(router, pathOf("auto3", { node: (OLD as { exe: string }).exe, deno: exe("deno1.46") }), { name: "auto.deno" });
  assert.equal(deno.runtime, ALL.find((r) => r.name === "deno1.46")?.runtime);
  assert.equal(await deno.call(selfReport), deno.runtime);
  await quick(behindShell(router, pathOf("auto4", { node: (OLD as { exe: string }).exe }), { name: "auto.old" }), /node 10\.\d+\.\d+ is too old/);
});

test("a pipelined start (ssh's) on every runtime: calls sent before READY run on the core the runtime can run", { skip: skipReason(MISSING) }, async () => {
  assertInstalled(MISSING);
  await using router = quietRouter();
  const start = (exe: string, name: string, compression: boolean) =>
    router.ssh({ hostname: "here", sshPath: join(dir, "ssh"), runtime: exe, compression, name, connectTimeout: 30_000 });
  const results = await Promise.allSettled(
    ALL.map(async (r, i) => {
      // Deflated or plain (ssh -C), alternately: the picker and the core it reads come in the first stage's form.
      const compression = i % 2 === 1;
      const ctx = await start(r.exe, `p.${r.name}`, compression);
      assert.equal(ctx.runtime, null, "handed out before its READY line was read");
      const [who, sum] = await Promise.all([ctx.call(selfReport), ctx.call((a: number, b: number) => a + b, 40, 2)]);
      assert.equal(who, r.runtime);
      assert.equal(sum, 42);
      assert.equal(await ctx.connected(), ctx);
      assert.equal(ctx.runtime, r.runtime);
      assert.deepEqual(await ctx.call(coresKept), compression ? [] : [coreOf(r.runtime as string)], "the core it runs, kept for its children");
      await ctx.shutdown({ wait: true });
    }),
  );
  const failed = results.flatMap((res, i) => (res.status === "rejected" ? [`${ALL[i]?.name}: ${(res.reason as Error)?.stack ?? res.reason}`] : []));
  assert.deepEqual(failed, [], failed.join("\n\n"));
  if (OLD) {
    // Too old for either core: the version gate's error fails the first call.
    const ctx = await start(OLD.exe, "p.old", false);
    const err = await ctx.call(() => 1).catch((e: unknown) => e);
    assert.match(String(err), new RegExp(`StreamError: p\\.old: node ${OLD.runtime.slice(5).replace(/\./g, "\\.")} is too old: ${RANGE.source}`));
  }
});
