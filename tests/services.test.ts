/** Services (Mitogen's mitogen.service): serving, calling, policies, argument checks, the pool, noReply, activation, sessions. */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { AbortError, type CallContext, CallError, connect, defineService, type StandardSchemaV1, TimeoutError, takesRouter } from "../mod.ts";
import { z } from "zod";
import { checkLeaks, quietRouter, routerWithLogs, RUNTIMES, waitFor } from "./helpers.ts";

checkLeaks();

type Fixture = typeof import("./fixtures/services.ts");
const FIXTURE = new URL("./fixtures/services.ts", import.meta.url);

/** A hand-written Standard Schema: a non-negative integer. */
const count: StandardSchemaV1<number> = {
  "~standard": {
    version: 1,
    vendor: "test",
    validate: (v) => (Number.isInteger(v) && (v as number) >= 0 ? { value: v as number } : { issues: [{ message: "expected a count" }] }),
  },
};

/** The master's store: its children may read it. */
const store = defineService({
  name: "test.store",
  policy: "children",
  methods: {
    get: { args: { key: count }, run: ({ key }, { caller }) => ({ value: `v${key}`, caller: caller.contextId }) },
    whole: { args: count, run: (n) => n * 2 },
  },
});

/** Ask the master's store from a context (shipped source: no free variables). */
const askMaster = takesRouter((method: string, args: unknown, call: CallContext) => call.router.contextById(0).callService("test.store", method, args));

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("a child calls a service of its master, and a grandchild through its via chain; typed calls are checked by tsc", async () => {
      await using router = quietRouter();
      await router.serve(store);
      const a = await router.local({ runtime, name: "svc-a" });
      const b = await router.local({ runtime, name: "svc-b", via: a });
      assert.deepEqual(await a.call(askMaster, "get", { key: 1 }), { value: "v1", caller: a.contextId });
      assert.deepEqual(await b.call(askMaster, "get", { key: 2 }), { value: "v2", caller: b.contextId });
      assert.equal(await b.call(askMaster, "whole", 21), 42);
      // The master's own typed client, through the same route (a context calling itself).
      const client = router.myself().service(store);
      const got: { value: string; caller: number } = await client.get({ key: 3 });
      assert.equal(got.value, "v3");
      const doubled: number = await router.myself().callService(store, "whole", 4);
      assert.equal(doubled, 8);
      // @ts-expect-error: key is a number
      await assert.rejects(client.get({ key: "3" }), CallError);
      // @ts-expect-error: no such method
      assert.equal(typeof client.nope, "function");
    });

    test("a context calls a sibling's service; allowParents refuses a sibling with a CallError naming it, logged at the callee", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "svc-server" });
      const b = await router.local({ runtime, name: "svc-sibling" });
      const inA = await a.import<Fixture>(FIXTURE);
      const inB = await b.import<Fixture>(FIXTURE);
      assert.equal(await inA.serveHere(["open", "parental"]), "svc-server");
      assert.equal(await inB.callFromHere(a.contextId, "fixture.open", "hello", { who: "b" }), "hello b from svc-server");
      const err = await inB.callFromHere(a.contextId, "fixture.parents", "hello", { who: "b" }).catch((e: unknown) => e);
      assert.ok(err instanceof CallError, String(err));
      assert.match(err.message, /ServiceError: context\d+ \(context \d+\) may not call fixture\.parents\.hello in svc-server: refused by policy allowParents/);
      await waitFor(() => logs.records.some((r) => r.name === "svc-server" && r.level === "warn" && /refused by policy allowParents/.test(r.message)));
      // Its parent (the master) may.
      assert.equal(await a.callService("fixture.parents", "hello", { who: "master" }), "hello master from svc-server");
    });

    test("a predicate policy lets in whom it says, and a refusal names it", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "svc-guard" });
      const b = await router.local({ runtime, name: "svc-guest" });
      const inA = await a.import<Fixture>(FIXTURE);
      await inA.serveHere(["guarded"]);
      await assert.rejects(a.callService("fixture.guarded", "hello", { who: "master" }), /refused by policy predicate allowListed/);
      await inA.allow(b.contextId);
      const inB = await b.import<Fixture>(FIXTURE);
      assert.equal(await inB.callFromHere(a.contextId, "fixture.guarded", "hello", { who: "guest" }), "hello guest from svc-guard");
    });

    test("an argument failing its check is refused before the method runs, naming the argument", async () => {
      await using router = quietRouter();
      await router.serve(store);
      const a = await router.local({ runtime, name: "svc-args" });
      const err = await a.call(askMaster, "get", { key: "x" }).catch((e: unknown) => e);
      assert.ok(err instanceof CallError);
      assert.equal(err.remoteName, "ServiceError");
      assert.match(err.message, /test\.store\.get: argument "key": expected a count/);
      await assert.rejects(a.call(askMaster, "get", 5), /test\.store\.get: its argument must be an object of key/);
      await assert.rejects(a.call(askMaster, "whole", -1), /test\.store\.whole: its argument: expected a count/);
      await assert.rejects(a.call(askMaster, "nope", {}), /service test\.store has no method "nope"/);
      await assert.rejects(router.myself().callService("test.store", "get", { key: 1, cb: () => 1 }), /args\.cb/, "an argument that cannot travel is named");
    });

    test("a service registered at the master is loaded on its first call: in the master, in a child, in a grandchild", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "svc-lazy" });
      const b = await router.local({ runtime, name: "svc-lazy-below", via: a });
      await assert.rejects(
        a.callService("fixture.lazy", "where"),
        /no service fixture\.lazy in svc-lazy, and none is registered under that name at the master/,
      );
      router.registerService("fixture.lazy", FIXTURE);
      assert.deepEqual(await a.callService("fixture.lazy", "where"), { name: "svc-lazy", isMaster: false });
      assert.deepEqual(await b.callService("fixture.lazy", "where"), { name: "svc-lazy-below", isMaster: false });
      const fromBelow = takesRouter((call: CallContext) => call.router.contextById(0).callService("fixture.lazy", "where"));
      assert.deepEqual(await b.call(fromBelow), { name: "master", isMaster: true });
    });

    test("as Mitogen's Activator (service.py), only a call from a parent activates a service a context does not serve yet", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      router.registerService("fixture.lazy", FIXTURE);
      const a = await router.local({ runtime, name: "svc-activate" });
      const b = await router.local({ runtime, name: "svc-activate-sibling" });
      const inB = await b.import<Fixture>(FIXTURE);
      await assert.rejects(
        inB.callFromHere(a.contextId, "fixture.lazy", "where", undefined),
        new RegExp(
          `service fixture\\.lazy is not served in svc-activate yet, and only a call from a parent activates one: \\S+ \\(context ${b.contextId}\\) is not one`,
        ),
      );
      await waitFor(() =>
        logs.records.some((r) => r.name === "svc-activate" && r.level === "warn" && /only a call from a parent activates one/.test(r.message)),
      );
      assert.deepEqual(await a.callService("fixture.lazy", "where"), { name: "svc-activate", isMaster: false });
      // Served now, its policy ("any") lets the sibling in.
      assert.deepEqual(await inB.callFromHere(a.contextId, "fixture.lazy", "where", undefined), { name: "svc-activate", isMaster: false });
    });

    test("ctx.with({ timeout, signal }) reaches a service call: the caller rejects as ctx.call does, the method's signal aborts where it runs", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "svc-limits" });
      const inA = await a.import<Fixture>(FIXTURE);
      await inA.serveHere(["waiter"]);
      await assert.rejects(a.with({ timeout: 100 }).callService("fixture.waiter", "wait"), TimeoutError);
      const controller = new AbortController();
      const cancelled = a.with({ signal: controller.signal }).callService("fixture.waiter", "wait");
      setTimeout(() => controller.abort(), 50);
      await assert.rejects(cancelled, AbortError);
      assert.deepEqual((await inA.abortedHere(2)).sort(), [
        "AbortError: call cancelled by its caller (context 0)",
        "TimeoutError: deadline of 100 ms passed in svc-limits",
      ]);
    });

    test("a child's deadline and signal reach a service of its master", async () => {
      await using router = quietRouter();
      const reasons: string[] = [];
      let settled = 0;
      // It answers well after its signal: the caller's own deadline (the same 100 ms) always fires first.
      const wait = (_: unknown, { signal }: { signal: AbortSignal }) =>
        new Promise((resolve) =>
          signal.addEventListener("abort", () => {
            reasons.push(`${signal.reason?.name}: ${signal.reason?.message}`);
            setTimeout(() => resolve(settled++), 300);
          }),
        );
      await router.serve(defineService({ name: "test.waiter", policy: "children", methods: { wait: { run: wait } } }));
      const a = await router.local({ runtime, name: "svc-limits-up" });
      const ask = takesRouter(async (call: CallContext) => {
        const master = call.router.contextById(0);
        const names: string[] = [];
        await master
          .with({ timeout: 100 })
          .callService("test.waiter", "wait")
          .catch((e: Error) => names.push(e.name));
        const c = new AbortController();
        setTimeout(() => c.abort(), 50);
        await master
          .with({ signal: c.signal })
          .callService("test.waiter", "wait")
          .catch((e: Error) => names.push(e.name));
        return names;
      });
      assert.deepEqual(await a.call(ask), ["TimeoutError", "AbortError"]);
      await waitFor(() => reasons.length === 2);
      assert.deepEqual(reasons.sort(), [
        `AbortError: call cancelled by its caller (context ${a.contextId})`,
        "TimeoutError: deadline of 100 ms passed in master",
      ]);
      await waitFor(() => settled === 2);
    });
  });
}

test("the pool runs at most `size` calls at once, the others in the order they came", async () => {
  await using router = quietRouter();
  let now = 0;
  let most = 0;
  const order: number[] = [];
  const slow = defineService({
    name: "test.slow",
    methods: {
      work: {
        args: count,
        run: async (n) => {
          most = Math.max(most, ++now);
          order.push(n);
          await new Promise((r) => setTimeout(r, 30));
          now--;
          return n;
        },
      },
    },
  });
  const pool = await router.serve(slow);
  pool.size = 2;
  const me = router.myself().service(slow);
  const all = Promise.all([0, 1, 2, 3, 4, 5].map((n) => me.work(n)));
  await waitFor(() => pool.queued === 4, 2000, "four calls queued");
  assert.equal(pool.running, 2);
  assert.deepEqual(await all, [0, 1, 2, 3, 4, 5]);
  assert.equal(most, 2);
  assert.deepEqual(order, [0, 1, 2, 3, 4, 5]);
});

test("a long queue of synchronous methods behind a full pool drains in a loop, not nested (no stack overflow)", async () => {
  await using router = quietRouter();
  let release = () => {};
  const gate = new Promise<void>((r) => (release = r));
  const pool = await router.serve(defineService({ name: "test.queue", methods: { hold: { run: () => gate }, echo: { run: (v: unknown) => v } } }));
  pool.size = 1;
  const me = router.myself();
  const first = me.callService("test.queue", "hold");
  const all = Array.from({ length: 20_000 }, (_, i) => me.callService("test.queue", "echo", i));
  assert.equal(pool.queued, 20_000);
  release();
  await first;
  const got = await Promise.all(all);
  assert.equal(got.length, 20_000);
  assert.equal(got[19_999], 19_999);
  assert.equal(pool.running, 0);
});

test("a service call past its deadline while it waits for a place in the pool does not start", async () => {
  await using router = quietRouter();
  let release = () => {};
  const gate = new Promise<void>((r) => (release = r));
  const ran: string[] = [];
  const hold = async (v: unknown) => {
    ran.push(String(v));
    await gate;
  };
  const pool = await router.serve(defineService({ name: "test.gated", methods: { hold: { run: hold } } }));
  pool.size = 1;
  const me = router.myself();
  const first = me.callService("test.gated", "hold", "first");
  await assert.rejects(me.with({ timeout: 50 }).callService("test.gated", "hold", "late"), TimeoutError);
  assert.equal(pool.queued, 1);
  release();
  await first;
  await me.callService("test.gated", "hold", "after");
  assert.deepEqual(ran, ["first", "after"]);
  assert.equal(pool.queued, 0);
});

test("noReply: the caller hears at once, the method runs after; its failure is logged where it ran", async () => {
  await using fixture = routerWithLogs();
  const { router, logs } = fixture;
  const seen: string[] = [];
  let release = () => {};
  const gate = new Promise<void>((r) => (release = r));
  await router.serve(
    defineService({
      name: "test.sink",
      policy: "children",
      methods: {
        put: {
          noReply: true,
          run: async (v: unknown) => {
            await gate;
            if (v === "bad") throw new Error("bad value");
            seen.push(String(v));
          },
        },
      },
    }),
  );
  const a = await router.local({ name: "svc-noreply" });
  // A caller that asks for an answer hears nil before the method ends.
  assert.equal(await a.call(takesRouter((call: CallContext) => call.router.contextById(0).callService("test.sink", "put", "one"))), undefined);
  await a.call(takesRouter((call: CallContext) => call.router.contextById(0).callServiceNoReply("test.sink", "put", "bad")));
  await a.call(takesRouter((call: CallContext) => call.router.contextById(0).callServiceNoReply("test.sink", "put", "two")));
  assert.deepEqual(seen, []);
  release();
  await waitFor(() => seen.length === 2);
  assert.deepEqual(seen.sort(), ["one", "two"]);
  await waitFor(() => logs.records.some((r) => r.level === "warn" && /test\.sink\.put failed: bad value/.test(r.message)));
});

test("an attached session calls a service of its listener, and one below it, as its listener vouches", async () => {
  await using router = quietRouter();
  const dir = mkdtempSync(join(tmpdir(), "mitogen-svc-"));
  try {
    const hi = { run: (who: unknown) => `hi ${who}` };
    await router.serve(
      store,
      defineService({ name: "test.hello", methods: { hi } }),
      defineService({ name: "test.contexts-only", policy: (caller) => caller.runtime !== "session", methods: { hi } }),
    );
    const a = await router.local({ name: "svc-listener" });
    await using listener = await router.listen({ path: join(dir, "s.sock") });
    await using session = await connect({ path: listener.path as string, log: () => {} });
    assert.equal(await session.context.callService("test.hello", "hi", "session"), "hi session");
    // The listener vouches for its sessions (auth_id): its own policies let them in as from itself...
    assert.equal(await session.context.callService(store, "whole", 2), 4);
    // ...and a predicate over the caller can tell them apart.
    await assert.rejects(session.context.callService("test.contexts-only", "hi", "session"), /refused by policy predicate policy/);
    router.registerService("fixture.lazy", FIXTURE);
    assert.deepEqual(await session.router.contextById(a.contextId).callService("fixture.lazy", "where"), { name: "svc-listener", isMaster: false });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

const isRoot = process.getuid?.() === 0;

test("through sudo, below a local child: the sudo context calls its master's service, and serves one the master registered", {
  skip: isRoot ? false : "needs root (sudo to nobody without a password)",
}, async () => {
  await using router = quietRouter();
  await router.serve(store);
  router.registerService("fixture.lazy", FIXTURE);
  const hop = await router.local({ name: "svc-hop" });
  // The runtime of this test's own process (node or deno), as nobody.
  const sudo = await router.sudo({
    username: "nobody",
    via: hop,
    name: "svc-sudo",
    runtime: process.execPath,
    sudoArgs: ["--preserve-env=MITOGEN_TEST_TOKEN"],
  });
  assert.notEqual(await sudo.call(() => process.getuid?.()), 0);
  assert.deepEqual(await sudo.call(askMaster, "get", { key: 7 }), { value: "v7", caller: sudo.contextId });
  assert.deepEqual(await sudo.callService("fixture.lazy", "where"), { name: "svc-sudo", isMaster: false });
});

test("zod's schemas are Standard Schemas: checked, transformed, typed, and a failure names the argument", async () => {
  await using router = quietRouter();
  const zoned = defineService({
    name: "test.zod",
    policy: "children",
    methods: {
      shout: { args: { word: z.string().min(2), times: z.number().int().default(1) }, run: ({ word, times }) => word.toUpperCase().repeat(times) },
      sum: { args: z.object({ xs: z.array(z.number()) }), run: ({ xs }) => xs.reduce((a, b) => a + b, 0) },
    },
  });
  await router.serve(zoned);
  const me = router.myself().service(zoned);
  const shouted: string = await me.shout({ word: "ab", times: 2 });
  assert.equal(shouted, "ABAB");
  assert.equal(await me.shout({ word: "hi" }), "HI", "zod's default filled in");
  assert.equal(await me.sum({ xs: [1, 2, 3] }), 6);
  const child = await router.local({ name: "svc-zod" });
  const ask = takesRouter((method: string, args: unknown, call: CallContext) => call.router.contextById(0).callService("test.zod", method, args));
  await assert.rejects(child.call(ask, "shout", { word: "a" }), /test\.zod\.shout: argument "word": Too small/);
  await assert.rejects(child.call(ask, "sum", { xs: [1, "2"] }), /test\.zod\.sum: argument "xs" at 1: Invalid input: expected number/);
});
