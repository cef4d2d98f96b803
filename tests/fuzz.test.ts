/**
 * Property-based fuzz of the two decoders, the value codec (`decodeValue`)
 * and the frame reader (`Stream`). Both directions: the child payload is
 * core.ts with frames.ts and codec.ts, so the code fuzzed here is the code
 * that reads what a parent sends a child and what a child sends a parent.
 * Every property is bounded in runs and in time.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import fc from "fast-check";
import { BLOB_MIN, type Binder, decodeValue, EXT, encodeValue, Secret, WIRE_REF } from "../codec.ts";
import { CallError, ChannelError, MitogenError, StreamError, TimeoutError } from "../errors.ts";
import { FRAME, Message, writeHeader } from "../frames.ts";
import { Stream } from "../stream.ts";
import type { Transport } from "../transport.ts";
import { checkLeaks, transportPair } from "./helpers.ts";

checkLeaks();

/** Runs per property, and the time after which a property stops generating (a success). */
const RUNS = 400;
const limits = <T>(runs = RUNS): fc.Parameters<T> => ({ numRuns: runs, plugins: [fc.interruptAfterTimeLimit(3000)] });

const binder: Binder = {
  contextRef: (id, name) => ({ ref: "context", id, name }),
  senderRef: (id, handle) => ({ ref: "sender", id, handle }),
};

function joined(value: unknown): { bytes: Uint8Array; blobs: boolean } {
  const enc = encodeValue(value);
  const bytes = new Uint8Array(enc.length);
  let off = 0;
  for (const p of enc.parts) {
    bytes.set(p, off);
    off += p.byteLength;
  }
  return { bytes, blobs: enc.blobs };
}

/** Decode, and fail the property on anything thrown but a StreamError. */
function decodeOrStreamError(bytes: Uint8Array, blobs: boolean): void {
  try {
    decodeValue(bytes, blobs, binder);
  } catch (err) {
    if (!(err instanceof StreamError)) throw new Error(`decodeValue threw ${String(err)}, not a StreamError`, { cause: err });
  }
}

// ---------------------------------------------------------------------------
// Values that travel (see codec.ts)

const ERROR_NAMES = ["Error", "TypeError", "RangeError", "SyntaxError", "MitogenError", "ChannelError", "StreamError", "TimeoutError", "Custom"];
const ERROR_CLASSES: Record<string, new (message: string, options?: ErrorOptions) => Error> = {
  TypeError,
  RangeError,
  SyntaxError,
  MitogenError,
  ChannelError,
  StreamError,
  TimeoutError,
};

function makeError(name: string, message: string, cause: [boolean, unknown], code: string | number | null): Error {
  const Ctor = ERROR_CLASSES[name] ?? Error;
  const err = cause[0] ? new Ctor(message, { cause: cause[1] }) : new Ctor(message);
  if (err.name !== name) err.name = name;
  if (code !== null) (err as Error & { code?: unknown }).code = code;
  return err;
}

/** A reference as Context and Sender hand it to the encoder. */
function wireRef(type: number, fields: unknown[]): object {
  return { [WIRE_REF]: () => [type, fields] };
}

const key = fc.string({ unit: "binary", maxLength: 8 }).filter((k) => k !== "__proto__");
const leaf = fc.oneof(
  { weight: 20, arbitrary: fc.oneof(fc.constant(undefined), fc.constant(null), fc.boolean(), fc.integer(), fc.double(), fc.maxSafeInteger()) },
  { weight: 10, arbitrary: fc.oneof(fc.bigInt(), fc.string({ unit: "binary", maxLength: 20 }), fc.uint8Array({ maxLength: 16 })) },
  { weight: 4, arbitrary: fc.date({ noInvalidDate: true }) },
  {
    weight: 2,
    arbitrary: fc.oneof(
      fc.tuple(fc.nat(), fc.option(fc.string({ maxLength: 8 }))).map(([id, name]) => wireRef(EXT.CONTEXT, [id, name])),
      fc.tuple(fc.nat(), fc.nat()).map(([id, handle]) => wireRef(EXT.SENDER, [id, handle])),
    ),
  },
  {
    weight: 1,
    // Past the 8/16-bit headers, and out of band.
    arbitrary: fc.oneof(
      fc.integer({ min: 65_536, max: 65_600 }).map((n) => "s".repeat(n)),
      fc.integer({ min: 65_536, max: 65_600 }).map((n) => new Array<number>(n).fill(1)),
      fc.integer({ min: BLOB_MIN, max: BLOB_MIN + 64 }).map((n) => new Uint8Array(n).fill(n & 0xff)),
    ),
  },
);

const { value: travels } = fc.letrec<{ value: unknown }>((tie) => ({
  value: fc.oneof(
    { depthSize: "small", withCrossShrink: true },
    leaf,
    fc.array(tie("value"), { maxLength: 5 }),
    fc.dictionary(key, tie("value"), { maxKeys: 5, noNullPrototype: true }),
    fc.array(fc.tuple(tie("value"), tie("value")), { maxLength: 4 }).map((entries) => new Map(entries)),
    fc.array(tie("value"), { maxLength: 4 }).map((members) => new Set(members)),
    tie("value").map((v) => new Secret(v)),
    fc
      .tuple(
        fc.constantFrom(...ERROR_NAMES),
        fc.string({ maxLength: 20 }),
        fc.tuple(fc.boolean(), tie("value")),
        fc.option(fc.oneof(fc.string({ maxLength: 5 }), fc.integer())),
      )
      .map(([name, message, cause, code]) => makeError(name, message, cause, code)),
    fc
      .tuple(fc.string({ maxLength: 10 }), fc.string({ maxLength: 20 }), fc.string({ maxLength: 20 }), fc.tuple(fc.boolean(), tie("value")))
      .map(([name, message, stack, [hasCause, cause]]) => new CallError(name, message, stack, hasCause ? { cause } : undefined)),
  ),
}));

/** What a value looks like for comparison: classes without visible state (Secret, errors, references) become plain data. */
function normal(v: unknown): unknown {
  if (typeof v !== "object" || v === null || v instanceof Date || v instanceof Uint8Array) return v;
  if (WIRE_REF in v) {
    const [type, fields] = (v as { [WIRE_REF](): [number, unknown[]] })[WIRE_REF]();
    return type === EXT.CONTEXT
      ? { ref: "context", id: fields[0], name: typeof fields[1] === "string" ? fields[1] : null }
      : { ref: "sender", id: fields[0], handle: fields[1] };
  }
  if (v instanceof Secret) return { secret: normal(v.reveal()) };
  const withCause = (e: Error) => ("cause" in e ? { cause: normal(e.cause) } : {});
  if (v instanceof CallError) return { callError: [v.remoteName, v.message, v.remoteStack], ...withCause(v) };
  if (v instanceof Error) {
    const code = (v as { code?: unknown }).code;
    return { error: [Object.getPrototypeOf(v).constructor.name, v.name, v.message, code], ...withCause(v) };
  }
  if (Array.isArray(v)) return v.map(normal);
  if (v instanceof Map) return new Map([...v].map(([k, x]) => [normal(k), normal(x)]));
  if (v instanceof Set) return new Set([...v].map(normal));
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, normal(x)]));
}

// ---------------------------------------------------------------------------
// msgpack headers of an encoded value (outside extension payloads, whose lengths would no longer hold)

type Head = { at: number; size: number; family: "array" | "map" | "str" | "bin" | "ext"; extType: number };

/** Every array/map/str/bin/ext header in `b`, a complete msgpack value. */
function heads(b: Uint8Array): Head[] {
  const out: Head[] = [];
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const uint = (at: number, width: number) => (width === 1 ? v.getUint8(at) : width === 2 ? v.getUint16(at) : v.getUint32(at));
  const FIXED: Record<number, number> = { 202: 4, 203: 8, 204: 1, 205: 2, 206: 4, 207: 8, 208: 1, 209: 2, 210: 4, 211: 8 };
  const WIDTH: Record<number, [Head["family"], number]> = {
    217: ["str", 1],
    218: ["str", 2],
    219: ["str", 4],
    196: ["bin", 1],
    197: ["bin", 2],
    198: ["bin", 4],
    220: ["array", 2],
    221: ["array", 4],
    222: ["map", 2],
    223: ["map", 4],
    199: ["ext", 1],
    200: ["ext", 2],
    201: ["ext", 4],
  };
  let pos = 0;
  for (let pending = 1; pending > 0 && out.length < 10_000; pending--) {
    const at = pos;
    const t = b[pos++] as number;
    if (t <= 0x7f || t >= 0xe0 || t === 0xc0 || t === 0xc2 || t === 0xc3) continue;
    if (t <= 0x8f) {
      out.push({ at, size: 1, family: "map", extType: 0 });
      pending += 2 * (t - 0x80);
    } else if (t <= 0x9f) {
      out.push({ at, size: 1, family: "array", extType: 0 });
      pending += t - 0x90;
    } else if (t <= 0xbf) {
      out.push({ at, size: 1, family: "str", extType: 0 });
      pos += t - 0xa0;
    } else if (FIXED[t] !== undefined) pos += FIXED[t];
    else if (t >= 0xd4 && t <= 0xd8) {
      out.push({ at, size: 2, family: "ext", extType: v.getInt8(pos) });
      pos += 1 + 2 ** (t - 0xd4);
    } else {
      const [family, width] = WIDTH[t] ?? assert.fail(`unexpected type byte 0x${t.toString(16)}`);
      const n = uint(pos, width);
      pos += width;
      if (family === "array") pending += n;
      else if (family === "map") pending += 2 * n;
      else if (family === "ext") {
        out.push({ at, size: 1 + width + 1, family, extType: v.getInt8(pos) });
        pos += 1 + n;
        continue;
      } else pos += n;
      out.push({ at, size: 1 + width, family, extType: 0 });
    }
  }
  return out;
}

/** `b` with the header `h` replaced by its 32-bit form claiming `count`. */
function claimHuge(b: Uint8Array, h: Head, count: number): Uint8Array {
  const type = { array: 0xdd, map: 0xdf, str: 0xdb, bin: 0xc6, ext: 0xc9 }[h.family];
  const head = new Uint8Array(h.family === "ext" ? 6 : 5);
  const v = new DataView(head.buffer);
  v.setUint8(0, type);
  v.setUint32(1, count);
  if (h.family === "ext") v.setInt8(5, h.extType);
  return new Uint8Array([...b.subarray(0, h.at), ...head, ...b.subarray(h.at + h.size)]);
}

describe("decodeValue", () => {
  test("arbitrary bytes: only ever a StreamError", () => {
    // Bytes alone seldom make a structure; tokens (headers with random counts, ext headers) do.
    const u32 = fc.integer({ min: 0, max: 2 ** 32 - 1 });
    const token = fc.oneof(
      fc.uint8Array({ maxLength: 8 }),
      fc.integer({ min: 0x80, max: 0x9f }).map((t) => new Uint8Array([t])),
      fc
        .tuple(fc.constantFrom(0xdc, 0xdd, 0xde, 0xdf, 0xdb, 0xc6), u32)
        .map(([t, n]) => new Uint8Array([t, n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255])),
      fc.tuple(fc.integer({ min: 0, max: 40 }), fc.integer({ min: -1, max: 9 })).map(([n, type]) => new Uint8Array([0xc7, n, type & 0xff])),
      fc.integer({ min: -1, max: 9 }).map((type) => new Uint8Array([0xd4 + (Math.abs(type) % 5), type & 0xff])),
    );
    const tokens = fc.array(token, { maxLength: 60 });
    const body = fc.oneof(
      fc.uint8Array({ maxLength: 512 }),
      tokens.map((parts) => new Uint8Array(parts.flatMap((p) => [...p]))),
      // An array around the tokens, so the decoder reads on past the first value.
      tokens.map((parts) => new Uint8Array([0xdc, parts.length >> 8, parts.length & 255, ...parts.flatMap((p) => [...p])])),
    );
    // With the BLOBS flag: mostly a body length that fits, then what may be blobs.
    const message = fc.oneof(
      body.map((b) => ({ b, blobs: false })),
      fc.tuple(body, fc.uint8Array({ maxLength: 64 }), fc.boolean()).map(([b, tail, fits]) => {
        const len = fits ? b.byteLength : b.byteLength + tail.byteLength + 1;
        return { b: new Uint8Array([len >>> 24, (len >>> 16) & 255, (len >>> 8) & 255, len & 255, ...b, ...tail]), blobs: true };
      }),
    );
    fc.assert(
      fc.property(message, ({ b, blobs }) => decodeOrStreamError(b, blobs)),
      limits(10 * RUNS),
    );
  });

  test("a valid value with one length or count made huge: a StreamError naming the limit, without allocating it", () => {
    const rssBefore = process.memoryUsage().rss;
    const mutated = travels
      .map((value) => joined(value))
      .filter(({ bytes, blobs }) => !blobs && heads(bytes).length > 0)
      .chain(({ bytes }) => {
        const all = heads(bytes);
        return fc.tuple(fc.constant(bytes), fc.constantFrom(...all), fc.integer({ min: 2 ** 25, max: 2 ** 32 - 1 }));
      });
    fc.assert(
      fc.property(mutated, ([bytes, head, count]) => {
        const b = claimHuge(bytes, head, count);
        assert.throws(
          () => decodeValue(b, false, binder),
          (err: unknown) => err instanceof StreamError && /exceeds the \d+ bytes left to decode|claim more elements than/.test(err.message),
        );
      }),
      limits(),
    );
    // Claims of 32 M to 4 G elements (256 MiB and more), had any been allocated, would show here.
    const grown = (process.memoryUsage().rss - rssBefore) / 2 ** 20;
    assert.ok(grown < 192, `RSS grew ${grown.toFixed(0)} MiB`);
  });

  test("round trip: every value that travels decodes to itself", () => {
    fc.assert(
      fc.property(travels, (value) => {
        const { bytes, blobs } = joined(value);
        assert.deepStrictEqual(normal(decodeValue(bytes, blobs, binder)), normal(value));
      }),
      limits(),
    );
  });
});

// ---------------------------------------------------------------------------
// The frame reader

const settle = () => new Promise((resolve) => setTimeout(resolve, 0));

/** Feed `chunks` to a Stream over an in-memory transport; report what came out, and anything thrown out of its callbacks. */
async function readFrames(chunks: Uint8Array[], options: { maxMessageSize?: number; hangUp?: boolean; relays?: (dst: number) => boolean } = {}) {
  const [far, near] = transportPair();
  const thrown: unknown[] = [];
  const guard =
    <A extends unknown[]>(fn: (...args: A) => void) =>
    (...args: A) => {
      try {
        fn(...args);
      } catch (err) {
        thrown.push(err);
      }
    };
  const guarded: Transport = { ...near, start: (onData, onEnd) => near.start(guard(onData), guard(onEnd)) };
  const stream = new Stream("fuzz", guarded, options.maxMessageSize ?? 1024);
  if (options.relays) stream.relays = options.relays;
  const messages: Message[] = [];
  const closes: (Error | undefined)[] = [];
  stream.onMessage = (msg) => {
    if (closes.length) thrown.push(new Error("message after close"));
    messages.push(msg);
  };
  stream.onClose = (err) => closes.push(err);
  stream.start();
  for (const c of chunks) far.inject(c);
  if (options.hangUp ?? true) far.hangUp();
  await settle();
  return { messages, closes, thrown, stream };
}

const fields = fc.record(
  {
    dst: fc.nat(),
    src: fc.nat(),
    auth: fc.nat(),
    handle: fc.nat(),
    replyTo: fc.nat(),
    flags: fc.integer({ min: 0, max: 255 }),
  },
  { noNullPrototype: true },
);

function frameBytes(f: { dst: number; src: number; auth: number; handle: number; replyTo: number; flags: number }, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(FRAME.HEADER_SIZE + data.byteLength);
  writeHeader(new Message(f, [data], data.byteLength), out);
  out.set(data, FRAME.HEADER_SIZE);
  return out;
}

/** `bytes` cut at the given points (in any order, repeated or out of range: they are sorted and clamped). */
function cut(bytes: Uint8Array, points: number[]): Uint8Array[] {
  const at = [...new Set(points.map((p) => p % (bytes.byteLength + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let from = 0;
  for (const p of [...at, bytes.byteLength]) {
    if (p > from) out.push(bytes.subarray(from, p));
    from = Math.max(from, p);
  }
  return out;
}

describe("Stream (frame reader)", () => {
  test("valid frames, cut anywhere: the same messages, in order, then a clean close", async () => {
    const frames = fc.array(fc.tuple(fields, fc.uint8Array({ maxLength: 200 })), { maxLength: 8 });
    await fc.assert(
      fc.asyncProperty(frames, fc.array(fc.nat(), { maxLength: 20 }), async (sent, points) => {
        const all = new Uint8Array(sent.flatMap(([f, d]) => [...frameBytes(f, d)]));
        const { messages, closes, thrown } = await readFrames(cut(all, points));
        assert.deepEqual(thrown, []);
        assert.deepEqual(closes, [undefined]);
        assert.deepEqual(
          messages.map((m) => [{ dst: m.dst, src: m.src, auth: m.auth, handle: m.handle, replyTo: m.replyTo, flags: m.flags }, new Uint8Array(m.data)]),
          sent.map(([f, d]) => [f, new Uint8Array(d)]),
        );
      }),
      limits(),
    );
  });

  test("large frames (gathered in place, or kept in chunks when relayed), cut anywhere: the same messages, in order", async () => {
    // Over 64 KiB a frame for this context is gathered into one buffer as it arrives; one to relay keeps its chunks.
    const big = fc.tuple(fields, fc.integer({ min: 60 * 1024, max: 300 * 1024 }), fc.integer({ min: 0, max: 255 }));
    const frames = fc.array(fc.oneof(big, fc.tuple(fields, fc.integer({ min: 0, max: 300 }), fc.integer({ min: 0, max: 255 }))), {
      minLength: 1,
      maxLength: 4,
    });
    await fc.assert(
      fc.asyncProperty(frames, fc.array(fc.nat(), { maxLength: 30 }), fc.nat(), async (spec, points, relayOdd) => {
        const sent = spec.map(([f, n, seed]) => [f, Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 255)] as const);
        const all = new Uint8Array(sent.reduce((n, [, d]) => n + FRAME.HEADER_SIZE + d.byteLength, 0));
        let at = 0;
        for (const [f, d] of sent) {
          all.set(frameBytes(f, d), at);
          at += FRAME.HEADER_SIZE + d.byteLength;
        }
        const relays = (dst: number) => (dst + relayOdd) % 2 === 1;
        const { messages, closes, thrown } = await readFrames(cut(all, points), { maxMessageSize: 1024 * 1024, relays });
        assert.deepEqual(thrown, []);
        assert.deepEqual(closes, [undefined]);
        assert.equal(messages.length, sent.length);
        for (const [i, m] of messages.entries()) {
          const [f, d] = sent[i] as (typeof sent)[number];
          assert.deepEqual({ dst: m.dst, src: m.src, auth: m.auth, handle: m.handle, replyTo: m.replyTo, flags: m.flags }, f);
          assert.equal(m.length, d.byteLength);
          assert.ok(Buffer.from(m.data).equals(Buffer.from(d)), `frame ${i} of ${d.byteLength} bytes differs`);
        }
      }),
      { ...limits(), numRuns: 60 },
    );
  });

  test("arbitrary bytes: messages or a close with StreamError, nothing thrown out of the transport callback", async () => {
    // Random bytes rarely pass the magic: mostly valid frames, then corrupted (bytes set, garbage appended), cut anywhere.
    const encoded = fc.tuple(fields, travels).map(([f, v]) => {
      const { bytes, blobs } = joined(v);
      return [{ ...f, flags: blobs ? FRAME.FLAG_BLOBS : 0 }, bytes] as const;
    });
    const frames = fc.array(fc.oneof(fc.tuple(fields, fc.uint8Array({ maxLength: 100 })), encoded), { maxLength: 6 });
    const edits = fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 3 });
    const corrupted = fc.tuple(frames, edits, fc.uint8Array({ maxLength: 64 }), fc.array(fc.nat(), { maxLength: 10 })).map(([sent, set, garbage, points]) => {
      const all = new Uint8Array([...sent.flatMap(([f, d]) => [...frameBytes(f, d)]), ...garbage]);
      for (const [at, byte] of set) if (all.byteLength) all[at % all.byteLength] = byte;
      return cut(all, points);
    });
    const stream = fc.oneof(fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 10 }), corrupted);
    await fc.assert(
      fc.asyncProperty(stream, async (chunks) => {
        const { messages, closes, thrown } = await readFrames(chunks);
        assert.deepEqual(thrown, []);
        assert.equal(closes.length, 1, "closed once, at the latest on hang-up");
        assert.ok(closes[0] === undefined || closes[0] instanceof StreamError, String(closes[0]));
        for (const m of messages) {
          assert.ok(m.length <= 1024);
          // What arrived is decoded by the same code on either side of a stream.
          try {
            m.unpickle();
          } catch (err) {
            assert.ok(err instanceof StreamError || err instanceof ChannelError || err instanceof CallError, String(err));
          }
        }
      }),
      limits(),
    );
  });

  test("a header claiming more than maxMessageSize closes the stream before its data arrives", async () => {
    await fc.assert(
      fc.asyncProperty(fields, fc.integer({ min: 1025, max: 2 ** 32 - 1 }), fc.uint8Array({ maxLength: 64 }), async (f, length, some) => {
        const h = frameBytes(f, new Uint8Array(0));
        new DataView(h.buffer).setUint32(24, length);
        const { messages, closes, thrown, stream } = await readFrames([h, some], { hangUp: false });
        assert.deepEqual(thrown, []);
        assert.deepEqual(messages, []);
        assert.ok(stream.closed);
        assert.equal(closes.length, 1);
        assert.ok(closes[0] instanceof StreamError);
        assert.match(closes[0].message, new RegExp(`frame of ${length} bytes exceeds maxMessageSize 1024`));
      }),
      limits(),
    );
  });
});

// ---------------------------------------------------------------------------
// The frame writer

describe("Stream (frame writer)", () => {
  test("small frames batched per tick, large ones written from their parts, with flush and close between: all arrive, intact and in order", async () => {
    // Each step sends one frame (small ones are batched until the end of the tick, large ones written at once),
    // and may end the tick, flush, or (last) close the stream.
    const step = fc.tuple(
      fc.oneof(fc.integer({ min: 0, max: 300 }), fc.integer({ min: 60 * 1024, max: 200 * 1024 })),
      fc.constantFrom("same", "tick", "flush"),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(step, { minLength: 1, maxLength: 12 }), fc.boolean(), async (steps, closeAtEnd) => {
        const [far, near] = transportPair();
        const writer = new Stream("writer", near, 1024 * 1024);
        const reader = new Stream("reader", far, 1024 * 1024);
        const got: Message[] = [];
        const closes: (Error | undefined)[] = [];
        reader.onMessage = (m) => got.push(m);
        reader.onClose = (e) => closes.push(e);
        writer.start();
        reader.start();
        const sent: Uint8Array[] = [];
        for (const [i, [size, then]] of steps.entries()) {
          const data = Uint8Array.from({ length: size }, (_, k) => (k * 7 + i) & 255);
          sent.push(data);
          writer.send(Message.raw(data, { dst: 1, src: 0, auth: 0, handle: 1000 + i }));
          if (then === "tick") await Promise.resolve();
          else if (then === "flush") await writer.flush();
        }
        if (closeAtEnd) writer.close();
        await settle();
        await settle();
        assert.equal(got.length, sent.length, "every frame arrived");
        for (const [i, m] of got.entries()) {
          assert.equal(m.handle, 1000 + i, "in the order sent");
          assert.ok(Buffer.from(m.data).equals(Buffer.from(sent[i] as Uint8Array)), `frame ${i} intact`);
        }
        assert.deepEqual(closes, closeAtEnd ? [undefined] : []);
        reader.close();
        writer.close();
      }),
      { ...limits(), numRuns: 60 },
    );
  });
});
