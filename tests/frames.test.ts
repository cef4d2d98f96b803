/**
 * Frames and routing security, in process: a real Router and Stream on one
 * side, forged bytes and messages on the other.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { ChannelError } from "../errors.ts";
import { FRAME, HANDLE, Message } from "../frames.ts";
import { installDispatcher } from "../dispatch.ts";
import { Router as CoreRouter } from "../router.ts";
import { Receiver } from "../channels.ts";
import { Stream } from "../stream.ts";
import { checkLeaks, routerWithLogs, transportPair, waitFor } from "./helpers.ts";

checkLeaks();

/** A master with one fake child (id 1) whose far end the test drives. */
function masterWithFakeChild() {
  const { router, logs } = routerWithLogs();
  const [far, near] = transportPair();
  const stream = new Stream("fake", near);
  const ctx = router.addChild({ stream, stop: async () => stream.close() }, 1, "fake");
  stream.start();
  const peer = new Stream("peer", far);
  const received: Message[] = [];
  peer.onMessage = (m) => received.push(m);
  peer.start();
  return { router, ctx, far, peer, received, logs };
}

function header(fields: { magic?: number; version?: number; length: number }): Uint8Array {
  const h = new Uint8Array(FRAME.HEADER_SIZE);
  const v = new DataView(h.buffer);
  v.setUint16(0, fields.magic ?? FRAME.MAGIC);
  v.setUint8(2, fields.version ?? FRAME.VERSION);
  v.setUint32(24, fields.length);
  return h;
}

test("bad magic closes the stream with StreamError and fails pending calls", async () => {
  const { router, ctx, far } = masterWithFakeChild();
  const pending = ctx.call(() => 1);
  far.inject(header({ magic: 0xdead, length: 0 }));
  assert.match(await ctx.disconnected(), /bad frame magic 0xdead/);
  await assert.rejects(pending, ChannelError);
  await router.shutdown();
});

test("a bad version closes the stream", async () => {
  const { router, ctx, far } = masterWithFakeChild();
  far.inject(header({ version: 9, length: 0 }));
  assert.match(await ctx.disconnected(), /unsupported frame version 9/);
  await router.shutdown();
});

test("an oversized length header is refused before any data arrives", async () => {
  const { router, ctx, far } = masterWithFakeChild();
  far.inject(header({ length: 2 ** 31 }));
  assert.match(await ctx.disconnected(), /frame of 2147483648 bytes exceeds maxMessageSize/);
  await router.shutdown();
});

test("a truncated frame at EOF closes the stream with StreamError", async () => {
  const { router, ctx, far } = masterWithFakeChild();
  const pending = ctx.call(() => 1);
  far.inject(header({ length: 100 }));
  far.inject(new Uint8Array(10));
  far.hangUp();
  assert.match(await ctx.disconnected(), /truncated frame \(EOF with 10 of 100 bytes\)/);
  await assert.rejects(pending, ChannelError);
  await router.shutdown();
});

test("forged src_id or auth_id is dropped and logged", async () => {
  const { router, peer, logs } = masterWithFakeChild();
  const recv = new Receiver(router);
  const forge = (src: number, auth: number, data: string) => peer.send(Message.encoded(data, { dst: 0, src, auth, handle: recv.handle }));
  forge(5, 5, "unknown auth"); // id 5 is not routed through this stream
  forge(0, 0, "claims to be the master");
  forge(5, 1, "src not behind this stream");
  forge(1, 1, "legit");
  const msg = await recv.get({ timeout: 2000 });
  assert.equal(msg.unpickle(), "legit");
  assert.ok(recv.empty());
  const drops = logs.records.filter((r) => /dropped .*(auth_id|src_id)/.test(r.message));
  assert.equal(drops.length, 3, JSON.stringify(logs.lines()));
  recv.close();
  await router.shutdown();
});

test("route changes are accepted only from the immediate child that owns them, for ids allocated through it", async () => {
  const { router, peer, received, logs } = masterWithFakeChild();
  await router.allocateId(); // the fake child's id 1
  /** ALLOCATE_ID from the fake child `src` on `p`, as a real child asks its parent. */
  const allocate = async (p: Stream, src: number, got: Message[]): Promise<number> => {
    const replyTo = 5000 + got.length;
    p.send(Message.encoded(null, { dst: 0, src, auth: src, handle: HANDLE.ALLOCATE_ID, replyTo }));
    await waitFor(() => got.some((m) => m.handle === replyTo), 2000, "ALLOCATE_ID answer");
    return got.find((m) => m.handle === replyTo)?.unpickle() as number;
  };
  const g = await allocate(peer, 1, received);
  peer.send(Message.encoded([g, "grandchild", 1], { dst: 0, src: 1, auth: 1, handle: HANDLE.ADD_ROUTE }));
  await waitFor(() => router.contextById(g).name === "grandchild", 2000, "route to g");
  // g is now behind the stream, but may not add routes itself
  const n = await allocate(peer, 1, received);
  peer.send(Message.encoded([n, "nine", g], { dst: 0, src: g, auth: g, handle: HANDLE.ADD_ROUTE }));
  await waitFor(() => logs.records.some((r) => /refused .*handle 103/.test(r.message)), 2000, "refusal");
  const recv = new Receiver(router);
  router.route(Message.encoded(null, { dst: n, handle: 1234, replyTo: recv.handle }));
  await assert.rejects(recv.get({ timeout: 2000 }), new RegExp(`no route to context ${n}`));
  // nor may the child claim an id it was not allocated (the next one to be given out)
  const next = g + 10;
  peer.send(Message.encoded([next, "squat", 1], { dst: 0, src: 1, auth: 1, handle: HANDLE.ADD_ROUTE }));
  await waitFor(
    () => logs.records.some((r) => r.message.startsWith(`refused ADD_ROUTE for ${next} (parent 1) from fake: not allocated`)),
    2000,
    "squat refusal",
  );
  assert.equal(router.routeTo(next), undefined);
  // a second child may not take over g, nor put an id of its own below a context it does not lead to
  const f2 = await router.allocateId();
  const [far2, near2] = transportPair();
  const stream2 = new Stream("fake2", near2);
  router.addChild({ stream: stream2, stop: async () => stream2.close() }, f2, "fake2");
  stream2.start();
  const peer2 = new Stream("peer2", far2);
  const received2: Message[] = [];
  peer2.onMessage = (m) => received2.push(m);
  peer2.start();
  peer2.send(Message.encoded([g, "hijack", f2], { dst: 0, src: f2, auth: f2, handle: HANDLE.ADD_ROUTE }));
  await waitFor(() => logs.records.some((r) => r.message.startsWith(`refused ADD_ROUTE for ${g} (parent ${f2}) from fake2`)), 2000, "hijack refusal");
  const own = await allocate(peer2, f2, received2);
  peer2.send(Message.encoded([own, "misplaced", g], { dst: 0, src: f2, auth: f2, handle: HANDLE.ADD_ROUTE }));
  await waitFor(() => logs.records.some((r) => r.message.startsWith(`refused ADD_ROUTE for ${own} (parent ${g}) from fake2`)), 2000, "parent refusal");
  assert.equal(router.routeTo(g), router.routeTo(1));
  assert.equal(router.routeTo(own), undefined);
  await router.shutdown();
});

test("CALL_FUNCTION is refused from a non-parent and served from a parent", async () => {
  // A child router: id 1, parent 0, with its own child 2.
  const child = new CoreRouter();
  child.myId = 1;
  child.parentIds = [0];
  child.name = "child";
  installDispatcher(child);
  const [parentFar, parentNear] = transportPair();
  const parentStream = new Stream("to-parent", parentNear);
  child.setParent(parentStream);
  parentStream.start();
  const [kidFar, kidNear] = transportPair();
  const kidStream = new Stream("to-kid", kidNear);
  child.addChild({ stream: kidStream, stop: async () => kidStream.close() }, 2, "kid");
  kidStream.start();

  const fromParent: Message[] = [];
  const parentPeer = new Stream("parent-peer", parentFar);
  parentPeer.onMessage = (m) => fromParent.push(m);
  parentPeer.start();
  const fromKid: Message[] = [];
  const kidPeer = new Stream("kid-peer", kidFar);
  kidPeer.onMessage = (m) => fromKid.push(m);
  kidPeer.start();

  const g = globalThis as { __mitogenRan?: number };
  g.__mitogenRan = 0;
  const body = [0, "() => ++globalThis.__mitogenRan", []];
  kidPeer.send(Message.encoded(body, { dst: 1, src: 2, auth: 2, handle: HANDLE.CALL_FUNCTION, replyTo: 1500 }));
  await waitFor(() => fromKid.length > 0, 2000, "refusal");
  const refusal = fromKid[0] as Message;
  assert.ok(refusal.isDead);
  assert.equal(refusal.handle, 1500);
  assert.throws(() => refusal.unpickle(), /refused by policy/);
  assert.equal(g.__mitogenRan, 0, "the function did not run");

  parentPeer.send(Message.encoded(body, { dst: 1, src: 0, auth: 0, handle: HANDLE.CALL_FUNCTION, replyTo: 1501 }));
  await waitFor(() => fromParent.some((m) => m.handle === 1501), 2000, "reply");
  const reply = fromParent.find((m) => m.handle === 1501) as Message;
  assert.equal(reply.unpickle(), 1);
  assert.equal(g.__mitogenRan, 1);
  delete g.__mitogenRan;
  parentStream.close();
  kidStream.close();
  await child.shutdown();
});
