/**
 * Select, Latch, Receiver and Channel as Mitogen's (mitogen/select.py and the
 * Latch, Receiver and Channel of mitogen/core.py); handle registration;
 * parentIds order.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { HANDLE } from "../frames.ts";
import { CallError, Channel, ChannelError, Latch, LatchError, type Message, MitogenError, Receiver, Select, SelectError, TimeoutError } from "../mod.ts";
import { checkLeaks, quietRouter, RUNTIMES } from "./helpers.ts";

checkLeaks();

const FIXTURE = new URL("./fixtures/select.ts", import.meta.url);
type Fixture = typeof import("./fixtures/select.ts");

const text = (ev: { data: unknown }): unknown => (ev.data as Message).unpickle();

/** Drain a Select by iteration; returns what it yielded and what it threw. */
async function drain(sel: Select, map: (ev: { data: unknown }) => unknown = (ev) => ev.data): Promise<{ got: unknown[]; error: unknown }> {
  const got: unknown[] = [];
  try {
    for await (const ev of sel) got.push(map(ev));
  } catch (err) {
    return { got, error: err };
  }
  return { got, error: undefined };
}

describe("Select", () => {
  // mitogen/select.py (0.3.3): close() closes the Select's latch, so a get() asleep in it raises
  // mitogen.core.LatchError; a later get_event() finds no receivers and raises select.Error.
  test("close() wakes a pending get() and a pending iteration with LatchError; a closed Select stays closed (select.py close, get_event)", async () => {
    const latch = new Latch<number>();
    const sel = new Select([latch]);
    const waiting = sel.get();
    const iterating = sel[Symbol.asyncIterator]().next();
    sel.close();
    await assert.rejects(waiting, (err: unknown) => err instanceof LatchError && /Select closed/.test(err.message));
    await assert.rejects(iterating, LatchError);
    await assert.rejects(sel.get(), (err: unknown) => err instanceof SelectError && /Select instance is empty \(closed\)/.test(err.message));
    assert.throws(() => sel.add(new Latch()), LatchError);
    assert.throws(() => sel.empty(), LatchError, "Select.empty() asks its closed latch: LatchError");
    assert.equal(latch.notify, null, "close() detached the source");
    // the latch is free for another Select
    latch.put(1);
    await using again = new Select([latch]);
    assert.equal(await again.get({ timeout: 1000 }), 1);
    // an inner Select closed while an outer one waits on it wakes the outer one too
    const inner = new Select([new Latch()]);
    await using outer = new Select([inner, new Latch()]);
    const outerWaiting = outer.get();
    inner.close();
    await assert.rejects(outerWaiting, /Select closed/);
  });

  test("oneshot: false returns every item a source buffered before add(), one per get()", async () => {
    await using router = quietRouter();
    const latch = new Latch<number>();
    latch.put(1);
    latch.put(2);
    latch.put(3);
    await using recv = new Receiver(router);
    recv.toSender().send("a");
    recv.toSender().send("b");
    await using sel = new Select([latch, recv], { oneshot: false });
    const got: unknown[] = [];
    for (let i = 0; i < 5; i++) {
      const ev = await sel.getEvent({ timeout: 1000 });
      got.push(ev.source === latch ? ev.data : (ev.data as Message).unpickle());
    }
    assert.deepEqual(
      got.filter((v) => typeof v === "number"),
      [1, 2, 3],
    );
    assert.deepEqual(
      got.filter((v) => typeof v === "string"),
      ["a", "b"],
    );
    await assert.rejects(sel.get({ timeout: 20 }), TimeoutError);
    // the same through a nested Select
    const deep = new Latch<string>();
    deep.put("x");
    deep.put("y");
    await using outer = new Select([new Select([deep], { oneshot: false })], { oneshot: false });
    assert.deepEqual([await outer.get({ timeout: 1000 }), await outer.get({ timeout: 1000 })], ["x", "y"]);
    // with oneshot, a source yields once and keeps the rest
    const many = new Latch<number>();
    many.put(1);
    many.put(2);
    const once = await drain(new Select([many]));
    assert.deepEqual(once, { got: [1], error: undefined });
    assert.equal(many.size(), 1);
    assert.equal(many.notify, null);
  });

  test("adding a Select that would make a cycle is refused", async () => {
    const a = new Select();
    const b = new Select([a]);
    const c = new Select([b]);
    const cycle = (err: unknown) => err instanceof SelectError && err instanceof MitogenError && /Select cycle/.test(err.message);
    assert.throws(() => a.add(a), cycle);
    assert.throws(() => a.add(b), cycle);
    assert.throws(() => a.add(c), cycle);
    assert.deepEqual(a.sources, [], "a refused add changes nothing");
    // and the tree still works: an item put below a reaches c
    const latch = new Latch<string>();
    a.add(latch);
    latch.put("up");
    const ev = await c.getEvent({ timeout: 1000 });
    assert.equal(ev.source, latch);
    assert.equal(ev.data, "up");
    c.close();
  });

  test("in nested Selects an event's source is the Receiver or Latch it came from", async () => {
    await using router = quietRouter();
    await using recv = new Receiver(router);
    const latch = new Latch<string>();
    await using sel = new Select([new Select([new Select([recv])]), latch]);
    recv.toSender().send("from recv");
    latch.put("from latch");
    const events: { source: unknown; data: unknown }[] = [];
    for await (const ev of sel) events.push(ev);
    assert.equal(events.length, 2);
    const fromRecv = events.find((e) => e.source === recv);
    const fromLatch = events.find((e) => e.source === latch);
    assert.ok(fromRecv && fromLatch, "each event names its own source");
    assert.equal((fromRecv.data as Message).unpickle(), "from recv");
    assert.equal((fromRecv.data as Message).receiver, recv);
    assert.equal(fromLatch.data, "from latch");
  });

  // mitogen/select.py (0.3.3) remove(): "if the receiver has notified prior to remove(), it will
  // still be returned by a subsequent get()"; but get_event() first raises select.Error
  // ('Cannot get(), Select instance is empty') when no receiver is left.
  test("a notification given before remove() is still returned by a later get() while other sources are left (select.py remove, get_event)", async () => {
    const a = new Latch<string>();
    const b = new Latch<string>();
    await using sel = new Select([a, b]);
    a.put("before remove");
    sel.remove(a);
    assert.equal(a.notify, null);
    assert.equal(await sel.get({ timeout: 1000 }), "before remove");
    a.put("after remove");
    b.put("b");
    assert.equal(await sel.get({ timeout: 1000 }), "b");
    assert.equal(a.size(), 1, "what came after remove() stays in the source");
    // not when the removed source was the only one: get() throws, the item stays in the source
    const c = new Latch<number>();
    await using solo = new Select([c], { oneshot: false });
    c.put(1);
    solo.remove(c);
    await assert.rejects(solo.get({ timeout: 1000 }), (err: unknown) => err instanceof SelectError && /Select instance is empty$/.test(err.message));
    assert.equal(c.size(), 1);
    assert.deepEqual(await drain(solo), { got: [], error: undefined }, "iteration ends: no source is left (select.py iter_events)");
    await assert.rejects(new Select().get(), SelectError);
  });

  // mitogen/select.py (0.3.3) empty() is `self._latch.empty()`: false while a notification is pending,
  // also one from a source removed since, which remove()'s docstring says get() still returns
  // (size() is the members' sum, so it says 0 then).
  test("empty() is false while a removed source's notification is pending (select.py empty, remove)", async () => {
    const a = new Latch<string>();
    const b = new Latch<string>();
    await using sel = new Select([a, b], { oneshot: false });
    assert.ok(sel.empty());
    a.put("x");
    assert.equal(sel.empty(), false);
    sel.remove(a);
    assert.equal(sel.empty(), false, "get() returns a's item");
    assert.equal(sel.size(), 0, "size() sums the members' sizes, as Mitogen's");
    assert.equal(await sel.get({ timeout: 1000 }), "x");
    assert.ok(sel.empty());
    // with oneshot; Mitogen's get_event() would take the item, then raise select.Error from its own
    // remove() of the source (not_present_msg), losing it: here get() returns it (GUIDE.md, Departures)
    const c = new Latch<number>();
    await using once = new Select([c, new Latch()]);
    c.put(1);
    once.remove(c);
    assert.equal(once.empty(), false);
    assert.equal(await once.get({ timeout: 1000 }), 1);
    assert.ok(once.empty());
    // through a nested Select, and not for a notification whose item was taken from the source directly
    const d = new Latch<number>();
    const inner = new Select([d, new Latch()], { oneshot: false });
    await using outer = new Select([inner]);
    d.put(2);
    inner.remove(d);
    assert.equal(outer.empty(), false);
    await d.get();
    assert.ok(outer.empty(), "nothing left to return");
    inner.close();
  });

  // mitogen/select.py (0.3.3): misuse raises mitogen.select.Error, a mitogen.core.Error: a cycle
  // (loop_msg), a receiver owned by another Select (owned_msg), remove() of what is not a member
  // (not_present_msg), get() with no receiver (empty_msg).
  test("misuse throws SelectError (select.py Error: loop_msg, owned_msg, not_present_msg, empty_msg)", async () => {
    const latch = new Latch();
    await using a = new Select([latch]);
    await using b = new Select();
    assert.throws(
      () => a.add(a),
      (err: unknown) => err instanceof SelectError && /cycle/.test(err.message),
    );
    assert.throws(
      () => b.add(latch),
      (err: unknown) => err instanceof SelectError && /already belongs/.test(err.message),
    );
    assert.deepEqual(b.sources, [], "a refused add() leaves the Select as it was (Mitogen's appends first)");
    assert.throws(
      () => b.remove(latch),
      (err: unknown) => err instanceof SelectError && /not in this Select/.test(err.message),
    );
    await assert.rejects(b.get(), (err: unknown) => err instanceof SelectError && err.message === "Cannot get(), Select instance is empty");
    await assert.rejects(b.getEvent({ timeout: 1000 }), SelectError);
    assert.ok(!(new SelectError() instanceof ChannelError) && new SelectError() instanceof MitogenError);
  });

  test("a dead source throws ChannelError in iteration, whether or not it is the last source", async () => {
    await using router = quietRouter();
    // not the last: a latch that never gets anything stays in the Select
    await using dead = new Receiver(router);
    dead.toSender().close();
    const idle = new Latch();
    await using sel = new Select([dead, idle]);
    const first = await drain(sel);
    assert.ok(first.error instanceof ChannelError, String(first.error));
    assert.match(first.error.message, /sender closed/);
    assert.deepEqual(sel.sources, [idle], "oneshot removed the dead source, the other one stays");
    // the last: what came before the dead message, then ChannelError
    await using last = new Receiver(router);
    last.toSender().send(1);
    last.toSender().close();
    const second = await drain(new Select([last], { oneshot: false }), text);
    assert.deepEqual(second.got, [1]);
    assert.ok(second.error instanceof ChannelError, String(second.error));
    // a Receiver closed while a Select waits on it wakes the Select
    await using closing = new Receiver(router);
    await using third = new Select([closing, new Latch()]);
    const waiting = third.get();
    closing.close();
    await assert.rejects(waiting, ChannelError);
  });

  test("Select.all returns every receiver's data in arrival order", async () => {
    await using router = quietRouter();
    await using r1 = new Receiver(router);
    await using r2 = new Receiver(router);
    await using r3 = new Receiver(router);
    const all = Select.all([r1, r2, r3]);
    r3.toSender().send("three");
    r1.toSender().send("one");
    r2.toSender().send("two");
    assert.deepEqual(await all, ["three", "one", "two"]);
    assert.deepEqual(await Select.all([]), []);
    // a dead one rejects, and the others are detached
    await using bad = new Receiver(router);
    await using rest = new Receiver(router);
    const failing = Select.all([bad, rest]);
    bad.toSender().close();
    await assert.rejects(failing, ChannelError);
    assert.equal(rest.notify, null);
  });

  test("size() counts buffered items as Mitogen's size(); sources lists what is registered", async () => {
    await using router = quietRouter();
    const latch = new Latch<number>();
    assert.equal(latch.size(), 0);
    assert.ok(latch.empty());
    latch.put(1);
    latch.put(2);
    assert.equal(latch.size(), 2);
    await using recv = new Receiver(router);
    recv.toSender().send("x");
    assert.equal(recv.size(), 1);
    recv.toSender().close();
    assert.equal(recv.size(), 2, "the dead message counts, as in Mitogen");
    await using sel = new Select([latch, recv], { oneshot: false });
    assert.equal(sel.size(), 4);
    assert.equal(await sel.get({ timeout: 1000 }), 1);
    assert.equal(sel.size(), 3);
    assert.deepEqual(sel.sources, [latch, recv]);
    await using outer = new Select([new Select([new Latch()])]);
    assert.equal(outer.size(), 0);
    assert.ok(outer.empty());
    sel.close();
    assert.equal(sel.size(), 0);
    assert.deepEqual(sel.sources, []);
    latch.close();
    assert.throws(() => latch.size(), LatchError, "size() of a closed latch throws, as Mitogen's LatchError");
    recv.close();
    assert.throws(() => recv.size(), LatchError);
  });
});

describe("Latch, Receiver, Channel", () => {
  // mitogen/core.py (0.3.3) Latch: once close() has set `closed`, get(), put() and size() (so
  // empty()) raise LatchError, and close() wakes sleeping get()s with it. Receiver.size() and
  // empty() are its latch's, so LatchError too, while Receiver.get() turns the LatchError into
  // ChannelError('the Receiver has been closed'). LatchError and ChannelError are siblings.
  test("a closed Latch throws LatchError; a closed Receiver's size() and empty() throw LatchError, its get() ChannelError (core.py Latch, Receiver)", async () => {
    const latch = new Latch<number>();
    latch.put(1);
    const asleep = new Latch<number>();
    const waiting = asleep.get();
    latch.close();
    asleep.close();
    assert.throws(() => latch.size(), LatchError);
    assert.throws(() => latch.empty(), LatchError);
    assert.throws(() => latch.put(2), LatchError);
    await assert.rejects(latch.get(), LatchError);
    await assert.rejects(waiting, LatchError);
    await using router = quietRouter();
    await using recv = new Receiver(router);
    recv.toSender().send(1);
    recv.close();
    assert.throws(() => recv.size(), LatchError);
    assert.throws(() => recv.empty(), LatchError);
    await assert.rejects(recv.get(), (err: unknown) => err instanceof ChannelError && !(err instanceof LatchError));
    assert.ok(!(new LatchError() instanceof ChannelError) && new LatchError() instanceof MitogenError);
    // here a Receiver whose dead message was taken is closed too (GUIDE.md, Departures)
    await using ended = new Receiver(router);
    ended.toSender().close();
    assert.equal(ended.size(), 1, "the dead message counts, as in Mitogen");
    await assert.rejects(ended.get(), ChannelError);
    assert.throws(
      () => ended.size(),
      (err: unknown) => err instanceof LatchError && err.cause instanceof ChannelError && /sender closed/.test(err.message),
    );
  });

  test("after close(), get() rejects even if items are queued: LatchError from a Latch, ChannelError from a Receiver", async () => {
    const latch = new Latch<number>();
    latch.put(1);
    latch.put(2);
    latch.close();
    await assert.rejects(latch.get(), LatchError);
    assert.throws(() => latch.put(3), LatchError);
    await using router = quietRouter();
    const recv = new Receiver(router);
    recv.toSender().send(1);
    recv.toSender().send(2);
    recv.close();
    await assert.rejects(recv.get(), ChannelError);
    const after: unknown[] = [];
    for await (const msg of recv) after.push(msg);
    assert.deepEqual(after, [], "iteration of a closed receiver ends at once");
    const me = router.myself();
    const chan = new Channel(router, me, 0);
    chan.dstHandle = chan.handle; // talk to itself
    chan.put("queued");
    assert.equal(chan.size(), 1);
    chan.close();
    await assert.rejects(chan.get(), ChannelError);
  });

  test("Channel is a Sender too (put) and is re-pointed at the other end's handle", async () => {
    await using router = quietRouter();
    const me = router.myself();
    const left = new Channel(router, me, 0);
    const right = new Channel(router, me, left.handle);
    assert.equal(left.dstHandle, 0);
    left.dstHandle = right.handle;
    assert.equal(left.dstHandle, right.handle);
    assert.equal(left.sender.dstHandle, right.handle);
    assert.equal(left.context, me);
    left.put("put to right");
    right.send("sent to left");
    assert.equal((await right.get({ timeout: 1000 })).unpickle(), "put to right");
    assert.equal((await left.get({ timeout: 1000 })).unpickle(), "sent to left");
    left.close();
    await assert.rejects(right.get({ timeout: 1000 }), ChannelError);
    right.close();
  });

  test("registering a handle that exists throws; the first handler keeps it", async () => {
    await using router = quietRouter();
    await using recv = new Receiver(router);
    const taken = (err: unknown) => err instanceof MitogenError && new RegExp(`handle ${recv.handle} is already registered`).test(err.message);
    assert.throws(() => new Receiver(router, { handle: recv.handle }), taken);
    assert.throws(() => router.addHandler(() => {}, { handle: recv.handle }), taken);
    assert.throws(() => router.addHandler(() => {}, { handle: HANDLE.ALLOCATE_ID }), /handle 105 is already registered/);
    recv.toSender().send("still mine");
    assert.equal((await recv.get({ timeout: 1000 })).unpickle(), "still mine");
    // Mitogen's overwrite replaces on purpose
    const got: unknown[] = [];
    router.addHandler((msg) => got.push(msg.unpickle()), { handle: recv.handle, overwrite: true });
    recv.toSender().send("to the new handler");
    assert.deepEqual(got, ["to the new handler"]);
    // a fresh handle skips one registered explicitly
    await using probe = new Receiver(router);
    router.addHandler(() => {}, { handle: probe.handle + 1 });
    await using fresh = new Receiver(router);
    assert.notEqual(fresh.handle, probe.handle + 1);
    router.delHandler(probe.handle + 1);
  });
});

for (const runtime of RUNTIMES) {
  describe(`${runtime} child`, () => {
    test("a call whose context is killed throws ChannelError from a Select that has other sources", async () => {
      await using router = quietRouter();
      const victim = await router.local({ runtime, name: "victim" });
      const survivor = await router.local({ runtime, name: "survivor" });
      const pid = (await victim.call(() => process.pid)) as number;
      const idle = new Latch<string>();
      await using sel = new Select([victim.callAsync(() => new Promise(() => {})), survivor.callAsync(() => "answered"), idle]);
      const got: unknown[] = [];
      const error = await (async () => {
        try {
          for await (const ev of sel) {
            got.push((ev.data as Message).unpickle());
            process.kill(pid, "SIGKILL");
          }
        } catch (err) {
          return err;
        }
        return undefined;
      })();
      assert.deepEqual(got, ["answered"]);
      assert.ok(error instanceof ChannelError, String(error));
      assert.deepEqual(sel.sources, [idle], "the latch is still waited on");
      // Select.all over live calls, and a failing one
      assert.deepEqual((await Select.all([survivor.callAsync(() => 2), survivor.callAsync(() => 3)])).sort(), [2, 3]);
      await assert.rejects(
        Select.all([
          survivor.callAsync(() => {
            throw new RangeError("no");
          }),
        ]),
        (err: unknown) => err instanceof CallError && /RangeError/.test(String(err)),
      );
    });

    // mitogen/core.py (0.3.3): LatchError is a class of its own that callers catch by name; here
    // it crosses the wire by name like the other errors, and a child prints it by its name.
    test("a child's LatchError and SelectError reach the master as themselves, and print as themselves in the child", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "errors" });
      const fx = await ctx.import<Fixture>(FIXTURE);
      const got = await fx.closedErrors();
      assert.ok(got.latch instanceof LatchError, String(got.latch));
      assert.ok(got.select instanceof SelectError, String(got.select));
      assert.deepEqual(got.shown, ["LatchError: latch closed", "SelectError: Cannot get(), Select instance is empty"], "not `w [LatchError]`");
      await assert.rejects(fx.throwLatchError(), (err: unknown) => err instanceof CallError && err.remoteName === "LatchError");
    });

    test("parentIds lists the nearest parent first, down a chain of three", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "pa" });
      const b = await router.local({ runtime, name: "pb", via: a });
      const c = await router.local({ runtime, name: "pc", via: b });
      const expected = [
        [a, [0]],
        [b, [a.contextId, 0]],
        [c, [b.contextId, a.contextId, 0]],
      ] as const;
      for (const [ctx, parents] of expected) {
        // The import travels by GET_MODULE to each context's nearest parent.
        const fx = await ctx.import<Fixture>(FIXTURE);
        assert.deepEqual(await fx.where(), {
          contextId: ctx.contextId,
          parentId: parents[0],
          parentIds: parents,
          routerParentIds: parents,
        });
      }
      // c's route was announced to b, then by b to a, then by a to the master
      assert.equal(await c.call(() => "reached"), "reached");
    });

    test("a Channel with a child, re-pointed at its handle; a child's reserved handle cannot be taken", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "chan" });
      const fx = await ctx.import<Fixture>(FIXTURE);
      await using chan = new Channel(router, ctx, 0);
      chan.dstHandle = await fx.echoChannel(chan.handle);
      for (const n of [1, 2, 21]) {
        chan.put(n);
        assert.equal((await chan.get({ timeout: 5000 })).unpickle(), n * 2);
      }
      assert.match(await fx.registerTwice(HANDLE.CALL_FUNCTION), /handle 101 is already registered in chan/);
    });
  });
}
