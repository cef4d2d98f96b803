/** The value codec: round trips, bad values on send, and safe decoding of hostile input. */
import assert from "node:assert/strict";
import { inspect } from "node:util";
import { encode } from "@msgpack/msgpack";
import { describe, test } from "node:test";
import { BLOB_MIN, type Binder, decodeValue, encodeValue, Secret, WIRE_REF } from "../codec.ts";
import { CallError, ChannelError, LatchError, MitogenError, SelectError, StreamError, TimeoutError } from "../errors.ts";
import { checkLeaks } from "./helpers.ts";

checkLeaks();

const binder: Binder = {
  contextRef: (id, name) => ({ kind: "context", id, name }),
  senderRef: (id, handle) => ({ kind: "sender", id, handle }),
};

function roundTrip(value: unknown): unknown {
  const enc = encodeValue(value);
  const joined = new Uint8Array(enc.length);
  let off = 0;
  for (const p of enc.parts) {
    joined.set(p, off);
    off += p.byteLength;
  }
  return decodeValue(joined, enc.blobs, binder);
}

describe("round trip", () => {
  const cases: [string, unknown][] = [
    ["undefined", undefined],
    ["null", null],
    ["true", true],
    ["false", false],
    ["integers", [0, 1, -1, 127, 128, -33, 65535, 2 ** 32, -(2 ** 40), Number.MAX_SAFE_INTEGER]],
    ["floats", [0.5, -1.25, Number.MAX_VALUE, Number.MIN_VALUE, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]],
    ["bigint", [0n, -1n, 2n ** 64n, -(2n ** 200n) - 7n]],
    ["strings", ["", "hello", "ünïcödé ☃ 😀", "x".repeat(100_000)]],
    ["Uint8Array", new Uint8Array([0, 1, 255])],
    ["empty Uint8Array", new Uint8Array(0)],
    ["array with holes of undefined", [1, undefined, "three", null]],
    ["plain object", { a: 1, b: { c: [1, 2, { d: "e" }] }, u: undefined }],
    ["null-prototype object becomes plain", { x: 1 }],
    [
      "Map",
      new Map<unknown, unknown>([
        [1, "one"],
        ["two", 2],
        [{ k: 1 }, [3]],
      ]),
    ],
    ["Set", new Set([1, "a", null])],
    ["Date", new Date(1_700_000_000_123)],
    ["nested containers", new Map([["s", new Set([new Map([[1n, new Date(0)]])])]])],
  ];
  for (const [name, value] of cases) {
    test(name, () => assert.deepEqual(roundTrip(value), value));
  }

  test("a top-level small value is the encoder's one byte, with or without headroom for a header", () => {
    const values: unknown[] = [null, true, false, -0, 0.5, Number.NaN, 2 ** 53, "a", undefined];
    for (let i = -40; i <= 140; i++) values.push(i);
    for (const value of values) {
      const reference = encode(value);
      for (const headroom of [0, 28]) {
        const enc = encodeValue(value, "value", value, headroom);
        const bytes = Buffer.concat(enc.parts);
        if (typeof value === "number" && Object.is(value, -0)) assert.equal(bytes[0], 0xcb, "-0 stays a float");
        else if (value !== undefined) assert.deepEqual(new Uint8Array(bytes), reference, `${inspect(value)} with headroom ${headroom}`);
        if (headroom && enc.framed) assert.equal(enc.framed.byteLength, headroom + enc.length, "room for the header in front");
        assert.ok(Object.is(decodeValue(new Uint8Array(bytes), enc.blobs, binder), value), inspect(value));
      }
    }
  });

  test("-0 and NaN", () => {
    assert.ok(Object.is(roundTrip(-0), -0));
    assert.ok(Number.isNaN(roundTrip(Number.NaN)));
  });

  test("large Uint8Array travels out of band, intact", () => {
    const big = new Uint8Array(BLOB_MIN * 3 + 17).map((_, i) => i % 251);
    const enc = encodeValue({ a: big, b: [big.subarray(5, 9)] });
    assert.equal(enc.blobs, true);
    assert.ok(enc.parts.includes(big), "blob is written as is, not copied");
    const back = roundTrip({ a: big, b: [big.subarray(5, 9)], c: new Map([["k", big]]) }) as { a: Uint8Array; b: Uint8Array[]; c: Map<string, Uint8Array> };
    assert.deepEqual(back.a, big);
    assert.deepEqual(back.b[0], big.subarray(5, 9));
    assert.deepEqual(back.c.get("k"), big);
  });

  test("errors keep name, message, stack, cause and code", () => {
    const cause = new RangeError("inner");
    const err = new TypeError("outer", { cause });
    (err as { code?: string }).code = "E_TEST";
    const back = roundTrip(err) as TypeError & { code: string };
    assert.ok(back instanceof TypeError);
    assert.equal(back.message, "outer");
    assert.equal(back.stack, err.stack);
    assert.ok(back.cause instanceof RangeError);
    assert.equal((back.cause as Error).message, "inner");
    assert.equal(back.code, "E_TEST");
    for (const Cls of [MitogenError, ChannelError, LatchError, SelectError, StreamError, TimeoutError]) {
      const e = roundTrip(new Cls("m")) as Error;
      assert.ok(e instanceof Cls, Cls.name);
      assert.equal(e.name, Cls.name);
    }
    class CustomError extends Error {
      override name = "CustomError";
    }
    const custom = roundTrip(new CustomError("c")) as Error;
    assert.equal(custom.name, "CustomError");
    assert.equal(Object.getPrototypeOf(custom), Error.prototype, "unknown error classes decode as Error");
    const call = roundTrip(new CallError("TypeError", "x", "remote stack")) as CallError;
    assert.ok(call instanceof CallError);
    assert.equal(call.remoteName, "TypeError");
    assert.equal(call.remoteStack, "remote stack");
  });

  test("Context and Sender references are bound by the receiver's binder", () => {
    const ctx = { [WIRE_REF]: () => [5, [7, "seven"]] as const };
    const snd = { [WIRE_REF]: () => [6, [7, 1234]] as const };
    assert.deepEqual(roundTrip([ctx, snd]), [
      { kind: "context", id: 7, name: "seven" },
      { kind: "sender", id: 7, handle: 1234 },
    ]);
  });

  test("Secret travels intact and never prints", () => {
    const s = new Secret("hunter2");
    const back = roundTrip({ pw: s }) as { pw: Secret };
    assert.ok(back.pw instanceof Secret);
    assert.equal(back.pw.reveal(), "hunter2");
    for (const shown of [String(s), `${s}`, JSON.stringify({ s }), inspect(s), inspect({ s })]) {
      assert.ok(!shown.includes("hunter2"), shown);
      assert.match(shown, /\[secret\]/);
    }
  });
});

describe("bad values fail on the sending side", () => {
  const bad: [string, unknown, RegExp][] = [
    ["function", [1, { opts: { cb: () => 0 } }], /args\[1\]\.opts\.cb: a function/],
    ["symbol", { s: Symbol("x") }, /args\.s: a symbol/],
    ["class instance", { list: [new (class Widget {})()] }, /args\.list\[0\]: an instance of Widget/],
    ["typed array", { f: new Float64Array(2) }, /args\.f: a Float64Array/],
    ["in a Map", new Map([["k", () => 0]]), /args\.get\("k"\): a function/],
    ["in a Set", new Set([Symbol.iterator]), /args\.values\(\): a symbol/],
    ["odd key", { "a-b": () => 0 }, /args\["a-b"\]: a function/],
    ["invalid Date", [new Date(Number.NaN)], /args\[0\]: an invalid Date/],
  ];
  for (const [name, value, pattern] of bad) {
    test(name, () => {
      assert.throws(
        () => encodeValue(value, "args"),
        (err: unknown) => err instanceof MitogenError && pattern.test(err.message),
      );
    });
  }
  test("cyclic value", () => {
    const a: Record<string, unknown> = {};
    a.self = a;
    assert.throws(() => encodeValue(a, "args"), /nested deeper than|cyclic/);
  });
});

describe("safe decode", () => {
  test("__proto__ keys never set a prototype", () => {
    // {"__proto__": {"polluted": true}} as msgpack
    const bytes = new Uint8Array([0x81, 0xa9, ...new TextEncoder().encode("__proto__"), 0x81, 0xa8, ...new TextEncoder().encode("polluted"), 0xc3]);
    let out: unknown;
    try {
      out = decodeValue(bytes, false, binder);
    } catch (err) {
      assert.ok(err instanceof StreamError, String(err));
    }
    if (out !== undefined) assert.equal(Object.getPrototypeOf(out), Object.prototype);
    assert.equal(({} as { polluted?: boolean }).polluted, undefined);
  });

  test("a constructor key is plain data", () => {
    const back = roundTrip({ constructor: { prototype: { x: 1 } }, toString: 5 }) as Record<string, unknown>;
    assert.deepEqual(Object.keys(back), ["constructor", "toString"]);
    assert.equal(Object.getPrototypeOf(back), Object.prototype);
    assert.equal(back.toString, 5);
  });

  test("10 000-deep nesting is refused with a StreamError, never crashes", () => {
    const depth = 10_000;
    const arrays = new Uint8Array(depth + 1).fill(0x91);
    arrays[depth] = 0xc0;
    assert.throws(
      () => decodeValue(arrays, false, binder),
      (e) => e instanceof StreamError && /deeper than 512 levels/.test(e.message),
    );
    // the same depth through extension types (nested Sets) is refused too
    let inner = new Uint8Array([0x90]); // []
    for (let i = 0; i < depth; i++) {
      const len = inner.byteLength;
      const head = new Uint8Array([0xc9, 0, 0, 0, 0, 3]); // ext32 type 3 (Set)
      new DataView(head.buffer).setUint32(1, len + 1);
      const arr = new Uint8Array(1 + head.byteLength + len);
      arr[0] = 0x91;
      arr.set(head, 1);
      arr.set(inner, 1 + head.byteLength);
      inner = arr;
    }
    assert.throws(() => decodeValue(inner, false, binder), StreamError);
  });

  test("truncated input fails with StreamError", () => {
    const enc = encodeValue({ a: "hello", b: [1, 2, 3], c: new Map([[1, 2]]) });
    const whole = enc.parts[0] as Uint8Array;
    for (let cut = 0; cut < whole.byteLength; cut++) {
      assert.throws(() => decodeValue(whole.subarray(0, cut), false, binder), StreamError, `cut at ${cut}`);
    }
  });

  test("a bigint travels as hexadecimal text (linear to parse); anything else in ext 1 is refused", () => {
    const huge = 16n ** 200_000n - 1n; // 200 000 hex digits; as decimal text it would take seconds to parse
    const enc = encodeValue(-huge);
    assert.equal(decodeValue(enc.parts[0] as Uint8Array, false, binder), -huge);
    const ext = (text: string) => new Uint8Array([0xc7, text.length, 1, ...new TextEncoder().encode(text)]);
    assert.equal(decodeValue(ext("-ff"), false, binder), -255n);
    for (const bad of ["", "-", "0x1f", "12.5", "+1", " 1"]) {
      assert.throws(() => decodeValue(ext(bad), false, binder), /malformed bigint/, JSON.stringify(bad));
    }
  });

  test("garbage input fails with StreamError", () => {
    assert.throws(() => decodeValue(new Uint8Array([0xc1]), false, binder), StreamError);
    assert.throws(() => decodeValue(new Uint8Array([0xc7, 1, 9, 1, 2]), false, binder), StreamError, "blob ref past the end");
    assert.throws(() => decodeValue(new Uint8Array([0, 0, 0, 9, 1]), true, binder), StreamError, "truncated blob body");
  });
});
