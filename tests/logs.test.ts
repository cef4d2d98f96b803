/** Log records: structured data, time and context, connection steps, adapters, text and file sinks. */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { Console } from "node:console";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PassThrough } from "node:stream";
import { describe, test } from "node:test";
import { formatRecord, type LevelLogger, log, type LogRecord, logTo, logToFile, Router } from "../mod.ts";
import { checkLeaks, routerWithLogs, RUNTIMES, waitFor } from "./helpers.ts";

checkLeaks();

type Logging = typeof import("./fixtures/logging.ts");
const LOGGING = new URL("./fixtures/logging.ts", import.meta.url);
/** Line of `text` in the fixture (1-based). */
const fixtureLine = (text: string) =>
  readFileSync(LOGGING, "utf8")
    .split("\n")
    .findIndex((l) => l.includes(text)) + 1;

const STEPS = ["spawn", "ready", "payload", "configure", "connected", "adopted"];
const stepsOf = (records: LogRecord[], name: string) =>
  records.filter((r) => r.level === "debug" && (r.data as { context?: string } | undefined)?.context === name);

for (const runtime of RUNTIMES) {
  describe(`${runtime} child`, () => {
    test("records carry time, level, context, message and the data user code passed", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "rec-top" });
      const b = await router.local({ runtime, name: "rec-leaf", via: a });
      const m = await b.import<Logging>(LOGGING);
      const before = await m.structured();
      const after = Date.now();
      await waitFor(() => logs.records.some((r) => r.message === "no data"), 5000, "the last record");
      const user = logs.records.filter((r) => r.source === "user");
      const by = (message: string) => user.find((r) => r.message === message);
      const context = { id: b.contextId, name: "rec-leaf", path: ["master", "rec-top", "rec-leaf"] };
      const deployed = by("deployed");
      assert.deepEqual(
        { ...deployed, time: 0 },
        {
          time: 0,
          level: "info",
          source: "user",
          context,
          message: "deployed",
          category: "user",
          data: { version: 3, host: "a" },
          contextId: b.contextId,
          name: "rec-leaf",
          path: context.path,
        },
      );
      // Made in the child, on this machine's clock, during the call.
      assert.ok(deployed && deployed.time >= before && deployed.time <= after, `time ${deployed?.time} within the call`);
      assert.deepEqual(by("mixed")?.data, [1, "two"], "values that are not all plain objects stay a list");
      assert.equal(by("mixed")?.level, "warn");
      assert.deepEqual(by("one value")?.data, [1, 2], "a single value is the data");
      assert.equal(by("not forwarded without debug"), undefined);
      assert.match(String(by("cyclic")?.data), /"name":"loop".*"\[cycle\]"/, "a cycle travels as text");
      assert.equal(typeof by("unsendable")?.data, "string", "a function travels as text");
      assert.equal("data" in (by("no data") ?? {}), false);
    });

    test("logged errors arrive as { name, message, stack }, the stack mapped to the source", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "errs" });
      const m = await ctx.import<Logging>(LOGGING);
      await m.failLogged();
      await waitFor(() => logs.records.some((r) => r.message === "caught"), 5000, "the caught record");
      const line = fixtureLine('throw new RangeError("logged failure")');
      const alone = logs.records.find((r) => r.message === "RangeError: logged failure");
      const err = alone?.data as { name: string; message: string; stack: string };
      assert.equal(err.name, "RangeError");
      assert.equal(err.message, "logged failure");
      assert.match(err.stack, new RegExp(`fixtures/logging\\.ts:${line}:\\d+`), err.stack);
      assert.doesNotMatch(err.stack, /mitogen:\/\/\//);
      const caught = logs.records.find((r) => r.message === "caught")?.data as { err: { stack: string }; step: number };
      assert.equal(caught.step, 2);
      assert.match(caught.err.stack, new RegExp(`fixtures/logging\\.ts:${line}:\\d+`));
    });

    test("records keep the name of the logger that made them: log.child names, user, mitogen; printed lines at info under stdout and stderr (Mitogen: stdout.[ctx], stderr.[ctx] at INFO)", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "cat-top" });
      const b = await router.local({ runtime, name: "cat-leaf", via: a });
      const m = await b.import<Logging>(LOGGING);
      await m.named();
      b.callNoReply(() => {
        throw new Error("no one waits");
      });
      const by = (message: string) => logs.records.find((r) => r.name === "cat-leaf" && r.message.startsWith(message));
      await waitFor(() => ["printed to stdout", "printed to stderr", "callNoReply failed"].every((t) => by(t)), 5000, "the leaf's records");
      const seen = (message: string) => {
        const r = by(message);
        return [r?.category, r?.level, r?.source];
      };
      assert.deepEqual(seen("from db"), ["db", "info", "user"]);
      assert.deepEqual(by("from db")?.data, { q: 1 });
      assert.deepEqual(seen("from db.pool"), ["db.pool", "warn", "user"]);
      assert.deepEqual(seen("from plain log"), ["user", "info", "user"]);
      assert.deepEqual(seen("callNoReply failed"), ["mitogen", "warn", "log"]);
      assert.deepEqual(seen("printed to stderr"), ["stderr", "info", "stderr"]);
      // stdout: its own category, unless a shell behind Deno joined it to stderr.
      const out = by("printed to stdout");
      assert.equal(out?.level, "info");
      assert.equal(out?.category, out?.source);
      assert.deepEqual(by("printed to stderr")?.path, ["master", "cat-top", "cat-leaf"]);
    });

    test("each connection step is a debug record of the starting context, with ms", async () => {
      await using fixture = routerWithLogs({ debug: true });
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "steps-top" });
      await router.local({ runtime, name: "steps-leaf", via: a });
      await waitFor(() => stepsOf(logs.records, "steps-leaf").length >= STEPS.length, 5000, "the leaf's steps");
      for (const [name, starter] of [
        ["steps-top", "master"],
        ["steps-leaf", "steps-top"],
      ] as const) {
        const steps = stepsOf(logs.records, name);
        assert.deepEqual(
          steps.map((r) => (r.data as { step: string }).step),
          STEPS,
          name,
        );
        assert.ok(
          steps.every((r) => r.name === starter && r.source === "log"),
          `${name}: records of ${starter}`,
        );
        const ms = steps.map((r) => (r.data as { ms: number }).ms);
        assert.deepEqual(
          [...ms].sort((x, y) => x - y),
          ms,
          `${name}: ms only grow`,
        );
        assert.match(steps[0]?.message ?? "", new RegExp(`^${name}: started .* \\(\\+\\d+ ms\\)$`));
        assert.match(steps[1]?.message ?? "", new RegExp(`^${name}: first stage READY \\(${runtime} `));
      }
    });
  });
}

test("MITOGEN_LOG=debug makes children forward debug records", async () => {
  const saved = process.env.MITOGEN_LOG;
  process.env.MITOGEN_LOG = "debug";
  try {
    await using fixture = routerWithLogs();
    const { router, logs } = fixture;
    assert.equal(router.debug, true);
    const a = await router.local({ name: "env-top" });
    await router.local({ name: "env-leaf", via: a });
    await waitFor(() => stepsOf(logs.records, "env-leaf").length >= STEPS.length, 5000, "steps from env-top");
  } finally {
    if (saved === undefined) delete process.env.MITOGEN_LOG;
    else process.env.MITOGEN_LOG = saved;
  }
  assert.equal(new Router({ log: () => {} }).debug, false, "and only then");
});

const record = (over: Partial<LogRecord>): LogRecord => {
  const context = { id: 2, name: "web", path: ["master", "hop", "web"] };
  return {
    time: Date.UTC(2026, 0, 2, 3, 4, 5, 6),
    level: "info",
    source: "user",
    context,
    message: "up",
    contextId: 2,
    name: "web",
    path: context.path,
    ...over,
  };
};

test("the text format: message, then key=value or JSON of the data, then error frames", () => {
  assert.equal(formatRecord(record({ data: { version: 3, who: "a b", ok: true } })), `[hop -> web] info: up version=3 who="a b" ok=true`);
  assert.equal(formatRecord(record({ data: [1, "two"] })), `[hop -> web] info: up [1,"two"]`);
  assert.equal(formatRecord(record({ source: "stderr", level: "warn", message: "printed" })), "[hop -> web] printed");
  assert.equal(formatRecord(record({}), { time: "iso" }), "2026-01-02T03:04:05.006Z [hop -> web] info: up");
  assert.match(formatRecord(record({}), { time: "clock" }), /^\d\d:\d\d:\d\d\.006 \[hop -> web\] info: up$/);
  const stack = "TypeError: bad\n    at f (/src/a.ts:3:9)\n    at g (/src/a.ts:7:1)";
  assert.equal(
    formatRecord(record({ level: "error", message: "failed", data: { err: { name: "TypeError", message: "bad", stack } } })),
    `[hop -> web] error: failed err="TypeError: bad"\n    at f (/src/a.ts:3:9)\n    at g (/src/a.ts:7:1)`,
  );
});

test("the master's own records: cycles cut, errors as fields, a failing logger ignored", async () => {
  const { router, logs } = routerWithLogs();
  const cyclic: Record<string, unknown> = { n: 1 };
  cyclic.self = cyclic;
  log.info("cyclic at master", cyclic, { err: new TypeError("t") });
  const rec = logs.records.find((r) => r.message === "cyclic at master");
  const data = rec?.data as { n: number; self: unknown; err: { name: string; message: string; stack: string } };
  assert.equal(data.n, 1);
  assert.deepEqual(data.self, { n: 1, self: "[cycle]" }, "the merged copy holds the cyclic object, cut where it repeats");
  assert.deepEqual({ ...data.err, stack: typeof data.err.stack }, { name: "TypeError", message: "t", stack: "string" });
  assert.equal(cyclic.self, cyclic, "the caller's value is left alone");
  assert.deepEqual(rec?.context, { id: 0, name: router.name, path: router.path });
  await router.shutdown();
  const failing = new Router({
    log: () => {
      throw new Error("logger down");
    },
  });
  log.warn("into a failing logger");
  await failing.shutdown();
});

function must<T>(value: T | undefined, what = "present"): T {
  assert.ok(value !== undefined, what);
  return value;
}

/** A logger shaped like LogTape's: `category`, and `(message, properties)` per level. */
function logtapeLike(): LevelLogger & { category: string[]; calls: unknown[][] } {
  const calls: unknown[][] = [];
  const at = (level: string) => (message: string, props?: unknown) => calls.push([level, message, props]);
  return { category: ["app"], calls, debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}

/** A logger shaped like pino's: `bindings()`, and `(object, message)` per level. */
function pinoLike(): LevelLogger & { bindings(): object; calls: unknown[][] } {
  const calls: unknown[][] = [];
  const at = (level: string) => (obj: unknown, message?: string) => calls.push([level, obj, message]);
  return { bindings: () => ({}), calls, debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}

test("the log option takes LogTape-, pino- and console-style loggers", async () => {
  const tape = logtapeLike();
  const pino = pinoLike();
  const out = new PassThrough();
  let printed = "";
  out.on("data", (c: Buffer) => (printed += c.toString()));
  const konsole = new Console({ stdout: out, stderr: out });
  for (const [logger, name] of [
    [tape, "tape"],
    [pino, "pino"],
    [konsole, "console"],
  ] as const) {
    await using router = new Router({ log: logger });
    const ctx = await router.local({ name });
    await ctx.call(() => console.log("printed {braces}"));
    log.warn("from master", { version: 3 });
    await waitFor(
      () =>
        name === "console"
          ? printed.includes("printed {braces}")
          : (logger as { calls: unknown[][] }).calls.some((c) => String(c[1]).startsWith("printed") || c[2] === "printed {braces}"),
      5000,
      `${name}: records`,
    );
  }
  type Fields = { version?: number; mitogen: { context: { name: string }; source: string } };
  const tapeMaster = must(tape.calls.find((c) => c[1] === "from master"));
  assert.equal(tapeMaster[0], "warn");
  assert.deepEqual(Object.keys(tapeMaster[2] as object), ["version", "mitogen"]);
  assert.equal((tapeMaster[2] as Fields).version, 3);
  const tapePrinted = must(
    tape.calls.find((c) => c[1] === "printed {{braces}}"),
    "braces doubled: not LogTape placeholders",
  );
  assert.equal((tapePrinted[2] as Fields).mitogen.context.name, "tape");
  const pinoMaster = must(pino.calls.find((c) => c[2] === "from master"));
  assert.equal(pinoMaster[0], "warn");
  assert.equal((pinoMaster[1] as Fields).version, 3);
  assert.equal((pinoMaster[1] as Fields).mitogen.source, "user");
  // A line a child printed: at info, from a node child's stdout or a deno child's (moved to stderr).
  assert.ok(pino.calls.some((c) => c[2] === "printed {braces}" && (c[1] as Fields).mitogen.source.startsWith("std")));
  assert.match(printed, /\[console\] printed \{braces\}/);
  assert.match(printed, /\[master\] from master \{ version: 3 \}/);
  // Explicit style wins over detection.
  const seen: unknown[][] = [];
  const sink = logTo({ debug: () => {}, info: (...a: unknown[]) => seen.push(a), warn: () => {}, error: () => {} }, "pino");
  sink(record({ data: "plain" }));
  assert.deepEqual(seen, [[{ data: "plain", mitogen: { time: record({}).time, context: record({}).context, source: "user" } }, "up"]]);
});

test("logTo hands each record to the logger of its category: LogTape's getChild, pino's child (one per category)", () => {
  const made: unknown[] = [];
  const tape = logtapeLike();
  const tapeChildren = new Map<string, ReturnType<typeof logtapeLike>>();
  const tapeWithChildren = Object.assign(tape, {
    getChild(sub: string[]) {
      made.push(["tape", sub]);
      const key = sub.join(".");
      if (!tapeChildren.has(key)) tapeChildren.set(key, logtapeLike());
      return tapeChildren.get(key);
    },
  });
  const pino = pinoLike();
  const pinoChildren: { bindings: object; logger: ReturnType<typeof pinoLike> }[] = [];
  const pinoWithChildren = Object.assign(pino, {
    child(bindings: object) {
      const logger = pinoLike();
      pinoChildren.push({ bindings, logger });
      return logger;
    },
  });
  const toTape = logTo(tapeWithChildren);
  const toPino = logTo(pinoWithChildren);
  for (const category of ["db.pool", "db.pool", "stdout", "mitogen"]) {
    toTape(record({ category, message: category }));
    toPino(record({ category, message: category }));
  }
  assert.deepEqual(made, [
    ["tape", ["db", "pool"]],
    ["tape", ["stdout"]],
    ["tape", ["mitogen"]],
  ]);
  assert.equal(tape.calls.length, 0, "nothing to the logger itself");
  assert.deepEqual(
    tapeChildren.get("db.pool")?.calls.map((c) => c[1]),
    ["db.pool", "db.pool"],
  );
  assert.deepEqual(
    pinoChildren.map((c) => c.bindings),
    [{ category: "db.pool" }, { category: "stdout" }, { category: "mitogen" }],
  );
  assert.deepEqual(
    pinoChildren[0]?.logger.calls.map((c) => c[2]),
    ["db.pool", "db.pool"],
  );
  // A record without a category (made by hand) goes to the logger itself.
  toPino(record({}));
  assert.equal(pino.calls.length, 1);
});

test("logToFile writes time-stamped lines from level up, emptying the file first", async () => {
  const dir = mkdtempSync(join(tmpdir(), "mitogen-logs-"));
  try {
    const path = join(dir, "run.log");
    const sink = logToFile(path, { level: "debug" });
    {
      await using router = new Router({ log: sink, debug: true });
      await router.local({ name: "filed" });
      log.info("into the file", { n: 1 });
    }
    const lines = readFileSync(path, "utf8").trim().split("\n");
    assert.ok(
      lines.every((l) => /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[/.test(l)),
      lines.join("\n"),
    );
    assert.ok(lines.some((l) => /\[master\] debug: filed: CONNECTED \(\+\d+ ms\) step=connected context=filed ms=\d+$/.test(l)));
    assert.ok(lines.some((l) => l.endsWith("[master] info: into the file n=1")));
    logToFile(path, { level: "warn" })(record({ source: "log", level: "info", message: "below warn" }));
    assert.equal(readFileSync(path, "utf8"), "", "emptied, and info of the library left out");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
