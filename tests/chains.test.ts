/**
 * Call chains (ctx.chain(), Mitogen's pipelined `mitogen.parent.CallChain`): calls of one chain run
 * in the callee one after another, in the order sent; the first failure is latched and fails every
 * later call of the chain until reset() (Mitogen's `Dispatcher._error_by_chain_id` and
 * `forget_chain`); chains are per caller; plain calls stay concurrent.
 */
import assert from "node:assert/strict";
import { chmodSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { type CallChain, type CallContext, CallError, connect, type Context, type ListenOptions, takesRouter, TimeoutError } from "../mod.ts";
import { checkLeaks, quietRouter, routerWithLogs, RUNTIMES } from "./helpers.ts";

checkLeaks();

const scratch = mkdtempSync(join(tmpdir(), "mitogen-chains-test-"));
chmodSync(scratch, 0o700);
after(() => rmSync(scratch, { recursive: true, force: true }));

/** Push `value` onto the global list `name`, after `ms` milliseconds. */
const pushLater = async (name: string, value: unknown, ms: number): Promise<void> => {
  await new Promise((resolve) => setTimeout(resolve, ms));
  const g = globalThis as unknown as Record<string, unknown[]>;
  (g[name] ??= []).push(value);
};
/** The global list `name` of the context it runs in. */
const read = (name: string): unknown[] => (globalThis as unknown as Record<string, unknown[]>)[name] ?? [];
/** Wait until the global gate `name` is opened (by {@link open}), in the context it runs in. */
const waitGate = (name: string): Promise<string> => {
  const g = globalThis as unknown as Record<string, { p: Promise<void>; open: () => void }>;
  if (!g[name]) {
    let open = () => {};
    const p = new Promise<void>((resolve) => {
      open = resolve;
    });
    g[name] = { p, open };
  }
  return g[name].p.then(() => `${name} passed`);
};
/** Open the global gate `name` (made if no one waits yet). */
const open = (name: string): string => {
  const g = globalThis as unknown as Record<string, { p: Promise<void>; open: () => void }>;
  if (!g[name]) g[name] = { p: Promise.resolve(), open: () => {} };
  g[name].open();
  return `${name} opened`;
};
/** How many call chains the context it runs in keeps (busy or failed). */
const chainsKept = takesRouter((call: CallContext) => call.router.chains.size);

/** A chain into `ctx` numbered `id` (numbers are per process): the same number from two callers. */
const chainNumbered = (ctx: Context, id: number): CallChain => Object.assign(ctx.chain(), { chainId: id });

for (const runtime of RUNTIMES) {
  describe(`call chains into a ${runtime} child`, () => {
    test("100 pipelined callNoReply run in the order sent, each after the one before; then a call sees them all", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      await using chain = ctx.chain();
      // Later calls sleep less: run concurrently, they would finish in reverse.
      for (let i = 0; i < 100; i++) chain.callNoReply(pushLater, "ordered", i, (100 - i) % 7);
      assert.deepEqual(
        await chain.call(read, "ordered"),
        Array.from({ length: 100 }, (_, i) => i),
      );
      // callAsync is in the chain too
      chain.callNoReply(pushLater, "ordered", 100, 20);
      const recv = chain.callAsync(read, "ordered");
      assert.equal(((await recv.get()).unpickle() as unknown[]).length, 101);
      assert.equal(await ctx.call(chainsKept), 0, "an idle chain that did not fail is not kept");
    });

    test("the first failure is latched: the calls after it do not run and fail with it, until reset()", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "latched" });
      const chain = ctx.chain();
      chain.callNoReply(pushLater, "latched", 1, 0);
      chain.callNoReply(() => {
        throw new RangeError("setup failed");
      });
      chain.callNoReply(pushLater, "latched", 2, 0);
      const first = await chain.call(read, "latched").catch((e: unknown) => e);
      assert.ok(first instanceof CallError);
      assert.equal(first.remoteName, "RangeError");
      assert.equal(first.remoteMessage, "setup failed");
      // and every later one, whichever way it is made
      await assert.rejects(
        chain.call(() => 1),
        /setup failed/,
      );
      await assert.rejects(async () => (await chain.callAsync(() => 1).get()).unpickle(), /setup failed/);
      chain.callNoReply(pushLater, "latched", 3, 0);
      await assert.rejects(chain.callModule("mitogen:files", "nothing"), /setup failed/);
      assert.deepEqual(await ctx.call(read, "latched"), [1], "nothing after the failure ran");
      assert.equal(await ctx.call(chainsKept), 1, "the failed chain is kept until reset");
      chain.reset();
      assert.deepEqual(await chain.call(read, "latched"), [1]);
      chain.callNoReply(pushLater, "latched", 4, 0);
      assert.deepEqual(await chain.call(read, "latched"), [1, 4]);
      assert.equal(await ctx.call(chainsKept), 0, "reset forgets it");
      // A chained call's failure is the chain's next call's to raise: not logged (Mitogen's CallChain).
      assert.ok(!logs.lines().some((l) => /callNoReply failed/.test(l)), logs.lines().join("\n"));
      // a failing call raises its own error, and latches it too
      await assert.rejects(
        chain.call(() => {
          throw new Error("own");
        }),
        /own/,
      );
      await assert.rejects(
        chain.call(() => 1),
        /own/,
      );
      chain.reset();
      assert.equal(await chain.call(() => 2), 2);
    });

    test("chains are independent of each other, and plain calls still run concurrently beside them", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      // a chain from a scope: its calls carry the scope's deadline (a stuck chain fails the test fast)
      const a = ctx.with({ timeout: 10_000 }).chain();
      const b = ctx.with({ timeout: 10_000 }).chain();
      a.callNoReply(() => {
        throw new Error("a failed");
      });
      await assert.rejects(
        a.call(() => 1),
        /a failed/,
      );
      assert.equal(await b.call(() => "b ok"), "b ok", "another chain does not see a's failure");
      // b's next call waits for a gate that a chain c, then a plain call, open: neither waits for b
      a.reset();
      const waiting = b.call(waitGate, "g1");
      assert.equal(await a.call(open, "g1"), "g1 opened");
      assert.equal(await waiting, "g1 passed");
      const waiting2 = b.call(waitGate, "g2");
      assert.equal(await ctx.call(open, "g2"), "g2 opened");
      assert.equal(await waiting2, "g2 passed");
      // plain calls: concurrent among themselves, as before
      const plain = ctx.call(waitGate, "g3");
      ctx.callNoReply(open, "g3");
      assert.equal(await plain, "g3 passed");
      // a chained call past its deadline (that heeds its signal) fails the chain with TimeoutError
      const short = ctx.with({ timeout: 50 }).chain();
      const stuck = takesRouter((call: CallContext) => new Promise((_, reject) => call.signal.addEventListener("abort", () => reject(call.signal.reason))));
      await assert.rejects(short.call(stuck), TimeoutError);
      await new Promise((resolve) => setTimeout(resolve, 200)); // its deadline passes in the child too
      await assert.rejects(
        short.call(() => 1),
        /deadline of 50 ms passed/,
      );
      short.reset();
      b.reset();
      assert.equal(await short.call(() => "after reset"), "after reset");
      assert.equal(await b.call(() => "b idle"), "b idle");
      assert.equal(await ctx.call(chainsKept), 0);
    });

    test("chains of two callers are independent, even under the same number", async () => {
      await using router = quietRouter();
      const mid = await router.local({ runtime: "node", name: "mid" });
      const ctx = await router.local({ runtime, via: mid, name: "leaf" });
      const mine = chainNumbered(ctx, 7);
      await assert.rejects(
        mine.call(() => {
          throw new Error("master's chain failed");
        }),
        /master's chain failed/,
      );
      // mid (a parent of leaf too) calls leaf in a chain of its own numbered 7, and resets it
      const fromMid = takesRouter(async (leafId: number, call: CallContext) => {
        const seven = Object.assign(call.router.contextById(leafId).chain(), { chainId: 7 });
        const got = [await seven.call(() => "mid's chain runs"), await seven.call(() => "still")];
        seven.callNoReply(() => {
          throw new Error("mid's chain failed");
        });
        await seven.call(() => 0).catch((e: Error) => got.push(e.message.replace(/^Error: /, "")));
        seven.reset();
        got.push(await seven.call(() => "reset"));
        return got;
      });
      assert.deepEqual(await mid.call(fromMid, ctx.contextId), ["mid's chain runs", "still", "mid's chain failed", "reset"]);
      await assert.rejects(
        mine.call(() => 1),
        /master's chain failed/,
        "the master's chain is still failed",
      );
      assert.equal(await ctx.call(chainsKept), 1);
      mine.reset();
      assert.equal(await mine.call(() => 3), 3);
      assert.equal(await ctx.call(chainsKept), 0);
    });

    test("a caller's failed chains are forgotten when it disconnects", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime: "node", name: "a" });
      const b = await router.local({ runtime, via: a, name: "b" });
      const path = join(scratch, `${runtime}.sock`);
      await a.call(
        takesRouter(async (options: ListenOptions, call: CallContext) => {
          const l = await call.router.listen(options);
          (globalThis as unknown as { listener?: unknown }).listener = l;
        }),
        { path },
      );
      try {
        const session = await connect({ path, log: () => {} });
        const sb = session.router.contextById(b.contextId);
        const chain = sb.chain();
        await assert.rejects(
          chain.call(() => {
            throw new Error("session's chain failed");
          }),
          /session's chain failed/,
        );
        await assert.rejects(
          chain.call(() => 1),
          /session's chain failed/,
        );
        // and one on the listener itself, the session's own stream
        const onA = session.context.chain();
        onA.callNoReply(() => {
          throw new Error("x");
        });
        await assert.rejects(
          onA.call(() => 1),
          /x/,
        );
        assert.equal(await b.call(chainsKept), 1);
        assert.equal(await a.call(chainsKept), 1);
        await session.close();
        const end = Date.now() + 10_000;
        for (;;) {
          const left = [await a.call(chainsKept), await b.call(chainsKept)];
          if (left[0] === 0 && left[1] === 0) break;
          assert.ok(Date.now() < end, `chains still kept after the session closed: ${left}`);
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      } finally {
        await a.call(async () => {
          await (globalThis as unknown as { listener: { close(): Promise<void> } }).listener.close();
        });
      }
    });
  });
}
