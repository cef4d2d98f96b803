/** Flow control: a Sender's window, held-back messages, credit through hops, and peers that ignore it. */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { describe, test } from "node:test";
import { type CallContext, ChannelError, Receiver, type Sender, takesRouter } from "../mod.ts";
import { FLOW } from "../flow.ts";
import { FRAME } from "../frames.ts";
import { checkLeaks, quietRouter, routerWithLogs, RUNTIMES, underDeno, waitFor } from "./helpers.ts";

checkLeaks();

const MiB = 1024 * 1024;
const run = promisify(execFile);

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("1 GiB (64 x 16 MiB) from a grandchild to a slow Receiver: in order, and every process stays within its bound", async () => {
      // In a master of its own, as a user's script runs it: not in the test runner, whose own
      // bookkeeping (Deno's test sanitizers) would be measured too.
      const script = fileURLToPath(new URL("./fixtures/stream-master.ts", import.meta.url));
      const args = underDeno ? ["run", "-A", script, runtime] : ["--import", "tsx", script, runtime];
      const { stdout } = await run(process.execPath, args, { timeout: 120_000 });
      const got = JSON.parse(stdout.trim().split("\n").at(-1) ?? "{}") as Record<string, number | boolean>;
      assert.equal(got.blocks, 64, "every block arrived");
      assert.equal(got.intact, true, "in order and intact");
      for (const who of ["master", "hop", "sender"]) {
        const mib = got[who] as number;
        assert.ok(mib < 160, `${who} grew by ${mib.toFixed(0)} MiB (bound 160): ${stdout.trim()}`);
      }
    });

    test("an unread Receiver stops the sender at the window; reading lets it go on", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      await using recv = new Receiver(router);
      // Sends 1 MiB blocks until the window is full, then one more (held back), and reports.
      const fill = takesRouter(async (s: Sender, call: CallContext) => {
        const block = new Uint8Array(1024 * 1024);
        let sent = 0;
        while (call.router.flow.pending.bytes < 16 * 1024 * 1024 && sent < 1000) {
          void s.send(block);
          sent++;
        }
        let resolved = false;
        const last = s.send(block).then(() => (resolved = true));
        (globalThis as Record<string, unknown>).lastSend = last;
        await new Promise((r) => setTimeout(r, 100));
        return { sent, resolved, pending: call.router.flow.pending };
      });
      const first = await ctx.call(fill, recv.toSender());
      assert.equal(first.sent, FLOW.WINDOW / MiB, "sent exactly a window");
      assert.equal(first.resolved, false, "the next send waits");
      assert.equal(first.pending.held, 1, "the next block is held back, not sent");
      assert.ok(first.pending.bytes >= FLOW.WINDOW && first.pending.bytes < FLOW.WINDOW + MiB, `outstanding: ${first.pending.bytes}`);
      // Consume: credit flows back, the held block goes out, the waiting send resolves.
      for (let i = 0; i < first.sent + 1; i++) await recv.get({ timeout: 10_000 });
      const after = await ctx.call(async () => {
        await (globalThis as Record<string, unknown>).lastSend;
        return true;
      });
      assert.equal(after, true);
    });

    test("messages sent without awaiting are held in order, and close() comes after them", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      await using recv = new Receiver(router);
      await ctx.call((s: Sender) => {
        const block = new Uint8Array(1024 * 1024);
        for (let i = 0; i < 40; i++) void s.send([i, block]);
        s.close();
      }, recv.toSender());
      const got: number[] = [];
      for await (const msg of recv) got.push((msg.unpickle() as [number])[0]);
      assert.deepEqual(
        got,
        Array.from({ length: 40 }, (_, i) => i),
      );
    });

    test("a Receiver closed while its sender waits: the wait ends and the next send throws ChannelError", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      const recv = new Receiver(router);
      const streaming = ctx.call(async (s: Sender) => {
        const block = new Uint8Array(1024 * 1024);
        for (let i = 0; i < 1000; i++) await s.send(block);
        return "never";
      }, recv.toSender());
      await recv.get({ timeout: 10_000 }); // the stream is under way
      recv.close();
      await assert.rejects(streaming, (err: Error) => /ChannelError/.test(err.message) && /closed/.test(err.message));
    });

    test("the receiving context dies while the master waits on its window: ready() and send() fail with ChannelError", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      // A Receiver in the child that nobody reads; its Sender comes back to the master.
      const fixtures = await ctx.import<typeof import("./fixtures/flow.ts")>(new URL("./fixtures/flow.ts", import.meta.url));
      const sender = await fixtures.unreadReceiver();
      const block = new Uint8Array(1024 * 1024);
      while (router.flow.pending.bytes < FLOW.WINDOW) void sender.send(block);
      const waiting = sender.ready();
      const pid = await ctx.call(() => process.pid);
      process.kill(pid, "SIGKILL");
      await assert.rejects(waiting, ChannelError);
      assert.throws(() => sender.send(block), ChannelError);
    });

    test("a peer that ignores its window is cut off: the Receiver closes with a ChannelError naming it", async () => {
      await using fixture = routerWithLogs({ maxMessageSize: 1024 * 1024 });
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "flooder" });
      await using recv = new Receiver(router);
      await ctx.call(
        takesRouter((handle: number, flag: number, call: CallContext) => {
          const M = call.msg.constructor as unknown as {
            raw(b: Uint8Array, f: Record<string, number>): { flags: number };
          };
          const block = new Uint8Array(1000 * 1024);
          for (let i = 0; i < 40; i++) {
            const m = M.raw(block, { dst: 0, handle, replyTo: 0 });
            m.flags |= flag;
            call.router.route(m as never);
          }
        }),
        recv.handle,
        FRAME.FLAG_FLOW,
      );
      await waitFor(() => logs.lines().some((l) => /flooder sent \d+ unconsumed bytes/.test(l)), 10_000, "the overrun to be logged");
      await assert.rejects(
        (async () => {
          for (;;) await recv.get({ timeout: 10_000 });
        })(),
        (err: Error) => err instanceof ChannelError && /flooder sent \d+ unconsumed bytes, more than its flow-control window allows/.test(err.message),
      );
      assert.equal(await ctx.call(() => "still up"), "still up");
    });
  });
}

test("a local Sender (same context) is flow-controlled too", async () => {
  await using router = quietRouter();
  await using recv = new Receiver(router);
  const s = recv.toSender();
  const block = new Uint8Array(MiB);
  const blocks = FLOW.WINDOW / MiB;
  for (let i = 0; i < blocks; i++) void s.send(block);
  assert.equal(router.flow.pending.held, 0);
  assert.ok(router.flow.pending.bytes >= FLOW.WINDOW);
  let resolved = false;
  const held = s.send(block).then(() => (resolved = true));
  assert.equal(router.flow.pending.held, 1);
  for (let i = 0; i < 5; i++) await recv.get();
  await held;
  assert.equal(resolved, true);
  for (let i = 0; i < blocks + 1 - 5; i++) await recv.get();
  assert.ok(router.flow.pending.bytes < FLOW.GRANT, "what is not granted back yet stays under one grant");
});

test("a channel's window is forgotten once all is granted back, or once the receiver closed", async () => {
  await using router = quietRouter();
  for (let i = 0; i < 50; i++) {
    const recv = new Receiver(router);
    void recv.toSender().send(i); // a few bytes: not granted back before the close
    await recv.get();
    assert.equal(router.flow.pending.channels, 1);
    recv.close();
  }
  assert.deepEqual(router.flow.pending, { bytes: 0, held: 0, channels: 0 });
  await using recv = new Receiver(router);
  const s = recv.toSender();
  const block = new Uint8Array(MiB);
  for (let i = 0; i < 8; i++) void s.send(block);
  for (let i = 0; i < 8; i++) await recv.get();
  assert.deepEqual(router.flow.pending, { bytes: 0, held: 0, channels: 0 }, "8 MiB taken: two grants, nothing left outstanding");
  // A closed channel's next send still says why.
  const gone = new Receiver(router);
  const late = gone.toSender();
  void late.send(1);
  gone.close();
  assert.throws(
    () => late.send(2),
    (err: Error) => err instanceof ChannelError && /the receiver closed/.test(err.message),
  );
});
