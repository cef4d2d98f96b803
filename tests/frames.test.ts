/**
 * Frames and routing security, in process: a real Router and Stream on one
 * side, forged bytes and messages on the other.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { ChannelError, FRAME, HANDLE, installDispatcher, Message, Router as CoreRouter, Receiver, Stream } from "../core.ts";
import { Router } from "../master.ts";
import { captureLogs, checkLeaks, transportPair, waitFor } from "./helpers.ts";

checkLeaks();

/** A master with one fake child (id 1) whose far end the test drives. */
function masterWithFakeChild() {
  const logs = captureLogs();
  const router = new Router({ log: logs.log });
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

test("route changes are accepted only from the immediate child that owns them", async () => {
  const { router, peer, logs } = masterWithFakeChild();
  peer.send(Message.encoded([7, "grandchild"], { dst: 0, src: 1, auth: 1, handle: HANDLE.ADD_ROUTE }));
  await waitFor(() => router.contextById(7).name === "grandchild", 2000, "route to 7");
  // 7 is now behind the stream, but may not add routes itself
  peer.send(Message.encoded([9, "nine"], { dst: 0, src: 7, auth: 7, handle: HANDLE.ADD_ROUTE }));
  await waitFor(() => logs.records.some((r) => /refused .*handle 103/.test(r.message)), 2000, "refusal");
  const recv = new Receiver(router);
  router.route(Message.encoded(null, { dst: 9, handle: 1234, replyTo: recv.handle }));
  await assert.rejects(recv.get({ timeout: 2000 }), /no route to context 9/);
  // a second child may not take over 7
  const [far2, near2] = transportPair();
  const stream2 = new Stream("fake2", near2);
  router.addChild({ stream: stream2, stop: async () => stream2.close() }, 2, "fake2");
  stream2.start();
  const peer2 = new Stream("peer2", far2);
  peer2.start();
  peer2.send(Message.encoded([7, "hijack"], { dst: 0, src: 2, auth: 2, handle: HANDLE.ADD_ROUTE }));
  await waitFor(() => logs.records.some((r) => /refused ADD_ROUTE for 7 from fake2: already routed via fake/.test(r.message)), 2000, "hijack refusal");
  assert.equal(router.routeTo(7), router.routeTo(1));
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
