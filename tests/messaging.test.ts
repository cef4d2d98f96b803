/** Receiver, Latch, Select, Channel, Secret and log forwarding semantics. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { Channel, ChannelError, Latch, LatchError, Receiver, Secret, Select, SelectError, Sender, TimeoutError } from "../mod.ts";
import { checkLeaks, quietRouter, routerWithLogs, RUNTIMES, waitFor } from "./helpers.ts";

checkLeaks();

describe("local primitives", () => {
  test("Receiver.get times out with TimeoutError and leaves no timer", async () => {
    await using router = quietRouter();
    await using recv = new Receiver(router);
    await assert.rejects(recv.get({ timeout: 30 }), TimeoutError);
    assert.ok(recv.empty());
  });

  test("Receiver: values before close are delivered, then iteration ends; close() fails waiters", async () => {
    await using router = quietRouter();
    const recv = new Receiver(router);
    const sender = recv.toSender();
    sender.send(1);
    sender.send(2);
    sender.close();
    const got: unknown[] = [];
    for await (const msg of recv) got.push(msg.unpickle());
    assert.deepEqual(got, [1, 2]);
    await assert.rejects(recv.get(), ChannelError);
    const other = new Receiver(router);
    const waiting = other.get();
    other.close();
    await assert.rejects(waiting, /closed/);
  });

  test("Latch: put, get, timeout, close", async () => {
    const latch = new Latch<number>();
    latch.put(1);
    assert.equal(latch.size(), 1);
    assert.equal(await latch.get(), 1);
    await assert.rejects(latch.get({ timeout: 20 }), TimeoutError);
    const waiting = latch.get();
    latch.close();
    await assert.rejects(waiting, LatchError);
    assert.throws(() => latch.put(2), LatchError);
  });

  test("Select: timeout, nesting, oneshot off, remove", async () => {
    const a = new Latch<string>();
    const b = new Latch<string>();
    const inner = new Select([b]);
    await using sel = new Select([a, inner], { oneshot: false });
    await assert.rejects(sel.get({ timeout: 20 }), TimeoutError);
    b.put("from inner");
    a.put("from a");
    const first = await sel.getEvent({ timeout: 1000 });
    const second = await sel.getEvent({ timeout: 1000 });
    assert.deepEqual(new Set([first.data, second.data]), new Set(["from a", "from inner"]));
    assert.equal(sel.sources.length, 2, "oneshot off keeps sources");
    sel.remove(a);
    assert.equal(sel.sources.length, 1);
    assert.throws(() => sel.remove(a), /not in this Select/);
    const empty = new Select();
    await assert.rejects(empty.get(), SelectError);
  });

  test("Channel: both ends send and receive", async () => {
    await using router = quietRouter();
    const me = router.myself();
    // Each end learns the other's handle, as in Mitogen.
    const left = new Channel(router, me, 0);
    const right = new Channel(router, me, left.handle);
    left.dstHandle = right.handle;
    left.send("to right");
    right.send("to left");
    assert.equal((await right.get({ timeout: 1000 })).unpickle(), "to right");
    assert.equal((await left.get({ timeout: 1000 })).unpickle(), "to left");
    left.close();
    await assert.rejects(right.get({ timeout: 1000 }), ChannelError);
    right.close();
  });
});

for (const runtime of RUNTIMES) {
  describe(`${runtime} child`, () => {
    test("a Secret arrives intact and prints as [secret]", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "secretive" });
      const revealed = await ctx.call((s: Secret) => {
        console.log("secret is", s, `${s}`, JSON.stringify({ s }));
        return s.reveal();
      }, new Secret("hunter2"));
      assert.equal(revealed, "hunter2");
      await waitFor(() => logs.lines("secretive").some((l) => l.startsWith("secret is")), 5000, "log line");
      const line = logs.lines("secretive").find((l) => l.startsWith("secret is")) as string;
      assert.ok(!line.includes("hunter2"), line);
      assert.match(line, /\[secret\]/);
    });

    test("output of a grandchild reaches the master's logger under its own name", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "log-a" });
      const b = await router.local({ runtime, name: "log-b", via: a });
      await b.call(() => {
        console.log("out of b");
        console.error("err of b");
      });
      await waitFor(() => logs.lines("log-b").includes("out of b") && logs.lines("log-b").includes("err of b"), 5000, "b's output");
      const rec = logs.records.find((r) => r.message === "out of b");
      assert.equal(rec?.contextId, b.contextId);
    });

    test("unidirectional mode stops children talking to each other", async () => {
      await using fixture = routerWithLogs({ unidirectional: true });
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "uni-a" });
      const b = await router.local({ runtime, name: "uni-b" });
      await a.call((s: Sender) => s.send("hello sibling"), new Sender(b, 4321));
      await waitFor(() => logs.records.some((r) => /unidirectional mode forbids/.test(r.message)), 5000, "refusal");
      // the parent may still talk to both
      assert.deepEqual(await Promise.all([a.call(() => 1), b.call(() => 2)]), [1, 2]);
    });
  });
}
