/**
 * Decoding is bounded by what arrived: crafted bytes on real streams, both
 * ways (a child writing frames to the master, the master sending a crafted
 * CALL_FUNCTION to a child), on Node and Deno children. Each refusal names
 * its limit, and everyone stays up and answers the next call.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { decodeValue, encodeValue, MAX_DEPTH, Secret } from "../codec.ts";
import { FRAME, HANDLE, type MessageFields, writeHeader } from "../frames.ts";
import { MitogenError } from "../errors.ts";
import { type CallContext, CallError, ChannelError, Message, Receiver, StreamError, takesRouter } from "../mod.ts";
import { checkLeaks, quietRouter, routerWithLogs, RUNTIMES, waitFor } from "./helpers.ts";

checkLeaks();

/** A frame as it travels: header, then `body`. */
function frame(fields: MessageFields, body: Uint8Array): Uint8Array {
  const out = new Uint8Array(FRAME.HEADER_SIZE + body.byteLength);
  writeHeader(new Message(fields, [body], body.byteLength), out);
  out.set(body, FRAME.HEADER_SIZE);
  return out;
}

/** An msgpack array32 header claiming `count` elements, at the start of `size` bytes (zeros, i.e. fixint 0, after it). */
function array32(count: number, size = 320): Uint8Array {
  const b = new Uint8Array(size);
  b[0] = 0xdd;
  new DataView(b.buffer).setUint32(1, count);
  return b;
}

/** 64 KiB of nested array32 headers, each claiming no more than the bytes left after it: together far more than the message. */
function nestedHeaders(): Uint8Array {
  const size = 64 * 1024;
  const b = new Uint8Array(size);
  const v = new DataView(b.buffer);
  for (let i = 0; i < 16; i++) {
    b[i * 5] = 0xdd;
    v.setUint32(i * 5 + 1, size - 5 * (i + 1));
  }
  return b;
}

/** 1 M nested one-element arrays around a nil. */
function deepArrays(): Uint8Array {
  const n = 1024 * 1024;
  const b = new Uint8Array(n + 1).fill(0x91);
  b[n] = 0xc0;
  return b;
}

const BAD_BODIES: [string, () => Uint8Array, RegExp][] = [
  ["an array32 claiming 33 M elements", () => array32(33_554_432), /array of 33554432 elements exceeds the 315 bytes left to decode/],
  ["nested headers", nestedHeaders, /arrays and maps claim more elements than the 65536 bytes of the message/],
  ["1 M nested arrays", deepArrays, /value nested deeper than 512 levels/],
];

/**
 * Runs in the child: write `bytes` onto its parent stream as they are. With
 * `asReply`, the frame's handle (header bytes 16..19) becomes this call's
 * reply handle first, so the master takes it as the call's answer (the real
 * answer then finds the handle gone).
 */
const inject = takesRouter((bytes: Uint8Array, asReply: boolean, call: CallContext) => {
  if (asReply) new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).setUint32(16, call.msg.replyTo);
  call.router.parent?.writeRaw(bytes);
  return "written";
});

describe("limits, in process", () => {
  const joined = (value: unknown): Uint8Array => {
    const enc = encodeValue(value);
    assert.equal(enc.parts.length, 1);
    return enc.parts[0] as Uint8Array;
  };

  test("lengths and counts beyond the bytes left are refused, each naming its limit", () => {
    const head = (bytes: number[]) => new Uint8Array([...bytes, ...new Uint8Array(20)]);
    const cases: [number[], RegExp][] = [
      [[0xdd, 0x02, 0, 0, 0], /^array of 33554432 elements exceeds the 20 bytes left to decode/],
      [[0xdf, 0, 0, 0, 11], /^map of 11 entries exceeds the 20 bytes left to decode \(an entry takes two bytes/],
      [[0xdb, 0xff, 0xff, 0xff, 0xff], /^string of 4294967295 bytes exceeds the 20 bytes left to decode/],
      [[0xc6, 0, 0, 0, 21], /^binary of 21 bytes exceeds the 20 bytes left to decode/],
      [[0xc9, 0, 0x10, 0, 0, 2], /^extension of 1048576 bytes exceeds the 20 bytes left to decode/],
      // inside a Set's payload: bounded by the payload's own length
      [[0xc7, 6, 3, 0xdd, 0, 0, 0, 2], /^array of 2 elements exceeds the 1 bytes left to decode/],
    ];
    for (const [bytes, names] of cases) {
      assert.throws(
        () => decodeValue(head(bytes), false, null),
        (err: unknown) => err instanceof StreamError && names.test(err.message),
        names.source,
      );
    }
  });

  test("a message full of elements still decodes: the limit is what arrived, not a fixed size", () => {
    const big = Array.from({ length: 200_000 }, (_, i) => i % 100);
    assert.deepEqual(decodeValue(joined(big), false, null), big);
    const map = Object.fromEntries(Array.from({ length: 20_000 }, (_, i) => [`k${i}`, [i]]));
    assert.deepEqual(decodeValue(joined(map), false, null), map);
  });

  test(`the decoder takes the deepest value the encoder sends (level ${MAX_DEPTH}), and refuses one level more`, () => {
    const wraps: [string, (v: unknown) => unknown][] = [
      ["arrays", (v) => [v]],
      ["objects", (v) => ({ v })],
      ["Sets", (v) => new Set([v])],
      ["Maps", (v) => new Map([[1, v]])],
      ["Secrets", (v) => new Secret(v)],
      ["Errors", (v) => new Error("e", { cause: v })],
    ];
    for (const [what, wrap] of wraps) {
      for (const leaf of [1, [], [1]]) {
        let value: unknown = leaf;
        let deepest: unknown = leaf;
        for (let i = 0; i < 2 * MAX_DEPTH; i++) {
          const next = wrap(value);
          try {
            encodeValue(next);
          } catch (err) {
            assert.ok(err instanceof MitogenError && /nested deeper than 512 levels/.test(err.message), String(err));
            break;
          }
          deepest = value = next;
        }
        const bytes = joined(deepest);
        decodeValue(bytes, false, null); // no throw
        // One level more: the encoder refuses [deepest] exactly when the decoder refuses it.
        const deeper = new Uint8Array([0x91, ...bytes]);
        let encodes = true;
        try {
          encodeValue([deepest]);
        } catch {
          encodes = false;
        }
        if (encodes) decodeValue(deeper, false, null);
        else assert.throws(() => decodeValue(deeper, false, null), /value nested deeper than 512 levels/, `${what} around ${JSON.stringify(leaf)}`);
      }
    }
  });
});

for (const runtime of RUNTIMES) {
  describe(`${runtime} child`, () => {
    test("a child's reply that claims more than it holds fails the call with a StreamError; everyone stays up", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "liar" });
      const other = await router.local({ runtime, name: "bystander" });
      const fields = { dst: 0, src: ctx.contextId, auth: ctx.contextId };
      for (const [what, body, names] of BAD_BODIES) {
        await assert.rejects(ctx.call(inject, frame(fields, body()), true), (err: unknown) => err instanceof StreamError && names.test(err.message), what);
        assert.equal(await ctx.call(() => 6 * 7), 42, `${what}: the child answers`);
        assert.equal(await other.call(() => "still here"), "still here", `${what}: the master routes`);
      }
    });

    test("a CALL_FUNCTION that claims more than it holds gets a CallError naming the limit; the child stays up", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "callee" });
      for (const [what, body, names] of BAD_BODIES) {
        const recv = new Receiver(router, { persist: false, respondent: ctx });
        router.route(new Message({ dst: ctx.contextId, handle: HANDLE.CALL_FUNCTION, replyTo: recv.handle }, [body()]));
        await assert.rejects(
          recv.getData({ timeout: 10_000 }),
          (err: unknown) => err instanceof CallError && err.remoteName === "StreamError" && names.test(err.message),
          what,
        );
        assert.equal(await ctx.call(() => 6 * 7), 42, `${what}: the child answers`);
      }
    });

    test("a malformed message to another handler is logged with its limit; the master stays up", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "noisy" });
      const fields = { dst: 0, src: ctx.contextId, auth: ctx.contextId, handle: HANDLE.FORWARD_LOG };
      await ctx.call(inject, frame(fields, array32(33_554_432)), false);
      await waitFor(() => logs.records.some((r) => /threw: StreamError: array of 33554432 elements exceeds/.test(r.message)), 5000, "the refusal in the log");
      assert.equal(await ctx.call(() => 6 * 7), 42);
    });

    test("a bad frame header drops that child's stream with a StreamError naming the problem; the others stay up", async () => {
      await using router = quietRouter();
      const other = await router.local({ runtime, name: "bystander" });
      const cases: [Uint8Array, RegExp][] = [
        [frame({}, new Uint8Array(0)).fill(0xee, 0, 2), /bad frame magic 0xeeee/],
        [frame({}, new Uint8Array(0)).fill(0xff, 24, 28), /frame of 4294967295 bytes exceeds maxMessageSize 134217728/],
      ];
      for (const [bytes, names] of cases) {
        const ctx = await router.local({ runtime, name: "garbler" });
        await assert.rejects(ctx.call(inject, bytes, false), (err: unknown) => err instanceof ChannelError && names.test(err.message));
        assert.match(await ctx.disconnected(), names);
        assert.equal(await other.call(() => "still here"), "still here");
      }
    });
  });
}
