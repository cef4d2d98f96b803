/** Cancellation and deadlines that travel with a call. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { AbortError, type CallContext, CallError, Receiver, type Sender, TimeoutError, takesRouter } from "../mod.ts";
import { checkLeaks, quietRouter, RUNTIMES } from "./helpers.ts";

checkLeaks();

/** Waits for its signal, reports the abort through `s`, then settles. */
const waitForAbort = takesRouter(
  (s: Sender, call: CallContext) =>
    new Promise((resolve) => {
      call.signal.addEventListener("abort", () => {
        s.send(`aborted in ${call.router.name}: ${(call.signal.reason as Error).name}`);
        resolve("too late");
      });
    }),
);

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("abort reaches a remote function two hops down and rejects at once", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "abort-a" });
      const b = await router.local({ runtime, name: "abort-b", via: a });
      await using recv = new Receiver(router);
      const ac = new AbortController();
      const pending = b.with({ signal: ac.signal }).call(waitForAbort, recv.toSender());
      await new Promise((r) => setTimeout(r, 50));
      const t0 = Date.now();
      ac.abort();
      await assert.rejects(pending, AbortError);
      assert.ok(Date.now() - t0 < 500, "rejected at once");
      assert.equal((await recv.get({ timeout: 5000 })).unpickle(), "aborted in abort-b: AbortError");
      assert.equal(await b.call(() => "still usable"), "still usable");
    });

    test("a deadline set at the master expires a nested call", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "deadline-a" });
      await using recv = new Receiver(router);
      const tasks = await a.with({ timeout: 1500 }).import<typeof import("./fixtures/tasks.ts")>(new URL("./fixtures/tasks.ts", import.meta.url));
      const t0 = Date.now();
      // The master's own timer ends the call (TimeoutError); on a loaded machine its timer may fire
      // after the callee's, whose deadline then ends the call there first (a CallError caused by it).
      await assert.rejects(
        tasks.nestedUntilAbort(recv.toSender(), runtime),
        (err: Error) =>
          err instanceof TimeoutError ||
          (err instanceof CallError && (err.cause as Error | undefined)?.name === "TimeoutError" && /deadline of 1500 ms passed/.test(String(err.cause))),
      );
      assert.ok(Date.now() - t0 < 3000);
      const report = (await recv.get({ timeout: 5000 })).unpickle();
      assert.equal(report, "aborted in deadline-inner: AbortError");
    });

    test("an already aborted signal rejects without running anything; a timeout rejects with TimeoutError", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "quick-abort" });
      const ac = new AbortController();
      ac.abort(new Error("no thanks"));
      const err = await ctx
        .with({ signal: ac.signal })
        .call(() => 1)
        .catch((e: unknown) => e);
      assert.ok(err instanceof AbortError);
      assert.equal((err.cause as Error).message, "no thanks");
      await assert.rejects(
        ctx.with({ timeout: 50 }).call(() => new Promise(() => {})),
        /did not finish within 50 ms/,
      );
      assert.equal(await ctx.with({ timeout: 5000 }).call(() => "in time"), "in time");
    });
  });
}
