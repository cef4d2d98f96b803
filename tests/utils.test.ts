/** mitogen.utils in TypeScript: runWithRouter, withRouter, main; disconnect, disconnectAll, enableDebug, getStats. */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { type LogRecord, main, type Router, runWithRouter, withRouter } from "../mod.ts";
import { alive, assertNoLeaks, captureLogs, checkLeaks, quietRouter, resources, routerWithLogs, underDeno, waitFor } from "./helpers.ts";

checkLeaks();

const SCRIPT = new URL("./fixtures/main-script.ts", import.meta.url).pathname;
const LOGGING = new URL("./fixtures/logging.ts", import.meta.url);

/** Run the main() fixture script; its exit code and stderr. */
function runScript(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; stderr: string }> {
  const argv = underDeno ? ["run", "-A", SCRIPT, ...args] : ["--import", "tsx", SCRIPT, ...args];
  const proc = spawn(process.execPath, argv, { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, ...env } });
  let stderr = "";
  proc.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      reject(new Error(`script still running after 60 s; stderr:\n${stderr}`));
    }, 60_000);
    proc.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stderr });
    });
  });
}

test("runWithRouter returns fn's result and shuts the router down", async () => {
  let pid = 0;
  const got = await runWithRouter(
    async (router, a: number, b: number) => {
      const ctx = await router.local({ name: "rwr" });
      pid = await ctx.call(() => process.pid);
      return ctx.call((x: number, y: number) => x + y, a, b);
    },
    20,
    22,
  );
  assert.equal(got, 42);
  assert.equal(alive(pid), false, "its context's process has gone before the result is returned");
});

test("runWithRouter rejects with fn's error once the router is down", async () => {
  let pid = 0;
  const boom = new TypeError("fn failed");
  await assert.rejects(
    runWithRouter(async (router) => {
      const ctx = await router.local({ name: "rwr-fail" });
      pid = await ctx.call(() => process.pid);
      throw boom;
    }),
    (err) => err === boom,
  );
  assert.equal(alive(pid), false);
});

test("withRouter wraps fn: arguments through, options for the router", async () => {
  const logs = captureLogs();
  const double = withRouter(
    async (router: Router, n: number) => {
      const ctx = await router.local({ name: "wrapped" });
      await ctx.call(() => console.log("wrapped says hi"));
      await waitFor(() => logs.lines("wrapped").includes("wrapped says hi"), 5000, "the line in the router's logger");
      return ctx.call((x: number) => x * 2, n);
    },
    { log: logs.log },
  );
  assert.equal(await double(21), 42);
  assert.equal(await double(4), 8, "each call has a router of its own");
});

test("main: a failing script logs the source-mapped error and exits with code 1", async () => {
  const failed = await runScript(["fail"]);
  assert.equal(failed.code, 1, failed.stderr);
  const line = readFileSync(LOGGING, "utf8")
    .split("\n")
    .findIndex((l) => l.includes('throw new RangeError("boom in shipped code")'));
  assert.match(failed.stderr, /\[master\] error: CallError: RangeError: boom in shipped code/, failed.stderr);
  assert.match(failed.stderr, new RegExp(`fixtures/logging\\.ts:${line + 1}:\\d+`), "the remote frame, mapped");
  assert.match(failed.stderr, /\[scripted\] error: RangeError: logged failure\n\s+at .*fixtures\/logging\.ts:\d+:\d+/, "a child's logged error, mapped");
  const ok = await runScript([]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.match(ok.stderr, /^\[master\] info: started context=scripted$/m);
});

test("main with MITOGEN_LOG=debug: timed lines, each connection step with ms", async () => {
  const { code, stderr } = await runScript([], { MITOGEN_LOG: "debug" });
  assert.equal(code, 0, stderr);
  for (const step of ["started ", "first stage READY", "payload sent", "CONFIGURE sent", "CONNECTED", "connected as context"]) {
    assert.match(stderr, new RegExp(`^\\d\\d:\\d\\d:\\d\\d\\.\\d{3} \\[master\\] debug: scripted: ${step}.*\\(\\+\\d+ ms\\)`, "m"), `${step}\n${stderr}`);
  }
});

test("main in process: resolves, sets the exit code on failure", async () => {
  const saved = process.exitCode;
  const logs = captureLogs();
  try {
    await main(
      () => {
        throw new RangeError("main failed");
      },
      { log: logs.log },
    );
    assert.equal(process.exitCode, 1);
  } finally {
    process.exitCode = saved;
  }
  const rec = logs.records.find((r) => r.message === "RangeError: main failed");
  assert.equal(rec?.level, "error");
  assert.equal((rec?.data as { name: string } | undefined)?.name, "RangeError");
});

test("disconnect: a direct child goes, with what is below it; others and the router stay", async () => {
  await using router = quietRouter();
  const a = await router.local({ name: "dis-a" });
  const b = await router.local({ name: "dis-b", via: a });
  const c = await router.local({ name: "dis-c" });
  await router.disconnect(b); // not directly connected: nothing happens
  assert.equal(await b.call(() => 1), 1);
  await router.disconnect(a);
  assert.equal(a.isDisconnected, true);
  await waitFor(() => b.isDisconnected, 5000, "b, below a");
  await assert.rejects(a.call(() => 1));
  assert.equal(await c.call(() => 2), 2);
  assert.deepEqual(
    router.getStats().links.map((l) => l.name),
    ["dis-c"],
  );
  const d = await router.local({ name: "dis-d" });
  assert.equal(await d.call(() => 3), 3, "the router starts contexts as before");
});

test("disconnectAll: every direct child goes; the router stays usable", async () => {
  await using router = quietRouter();
  const kids = await Promise.all([router.local({ name: "all-1" }), router.local({ name: "all-2" })]);
  await router.disconnectAll();
  assert.deepEqual(
    kids.map((k) => k.isDisconnected),
    [true, true],
  );
  assert.equal(router.getStats().streams, 0);
  const again = await router.local({ name: "all-3" });
  assert.equal(await again.call(() => 4), 4);
});

test("enableDebug: contexts started afterwards forward their debug records", async () => {
  await using fixture = routerWithLogs();
  const { router, logs } = fixture;
  const before = await router.local({ name: "dbg-before" });
  await router.local({ name: "dbg-before-leaf", via: before });
  router.enableDebug();
  assert.equal(router.debug, true);
  const after = await router.local({ name: "dbg-after" });
  await router.local({ name: "dbg-after-leaf", via: after });
  const steps = (from: string) => logs.records.filter((r: LogRecord) => r.name === from && r.level === "debug");
  await waitFor(() => steps("dbg-after").some((r) => /CONNECTED/.test(r.message)), 5000, "steps from dbg-after");
  assert.deepEqual(steps("dbg-before"), [], "a context started before keeps its setting");
});

test("getStats: contexts, streams, bytes and frames per link, modules sent", async () => {
  await using router = quietRouter();
  const zero = router.getStats();
  const a = await router.local({ name: "stats-a" });
  await (await router.local({ name: "stats-b", via: a })).connected();
  await a.call(() => "x".repeat(10_000));
  const stats = router.getStats();
  assert.equal(stats.contexts, 2);
  assert.equal(stats.streams, 1);
  assert.equal(stats.links.length, 1);
  const [link] = stats.links;
  assert.equal(link?.id, a.contextId);
  assert.equal(link?.name, "stats-a");
  assert.ok((link?.bytesIn ?? 0) > 10_000, "the reply crossed the link");
  assert.ok((link?.bytesOut ?? 0) > 0);
  // A call and its reply: one frame each way.
  const frames = () => router.getStats().links[0] ?? { framesIn: Number.NaN, framesOut: Number.NaN };
  const before = frames();
  await a.call(() => 0);
  assert.deepEqual([frames().framesOut - before.framesOut, frames().framesIn - before.framesIn], [1, 1]);
  assert.ok(stats.modulesSent > zero.modulesSent, "stats-a fetched the core for stats-b");
  assert.ok(stats.moduleBytesSent > zero.moduleBytesSent);
});

test("the leak check waits for what is still ending, even when as many of the baseline's have gone meanwhile", {
  skip: underDeno ? "Deno's process.getActiveResourcesInfo() lists nothing: there the leak check counts processes only" : false,
}, async () => {
  // The baseline as it was with two timers that have fired since (the count of live resources is back where it was).
  const baseline = [...resources(), "Timeout", "Timeout"].sort();
  // A process (and its stdout pipe) that ends 200 ms from now, without the test token (it is no leaked process).
  const child = spawn("/bin/sleep", ["0.2"], { stdio: ["ignore", "pipe", "ignore"], env: {} });
  child.stdout.resume();
  await assertNoLeaks(baseline);
  assert.notEqual(child.exitCode, null, "the check waited for the process to end");
});
