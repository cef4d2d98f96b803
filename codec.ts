/**
 * The value codec: MessagePack (`@msgpack/msgpack`) with extension types.
 * This is the one module that decides what a value looks like on the wire.
 *
 * Extension types (msgpack ext, type byte -> payload):
 *
 * | type | value           | payload                                          |
 * | ---- | --------------- | ------------------------------------------------ |
 * |  -1  | Date            | msgpack timestamp (built in)                     |
 * |   0  | undefined       | empty                                            |
 * |   1  | bigint          | hexadecimal text, ASCII (`-` first if negative)  |
 * |   2  | Map             | msgpack array `[k0, v0, k1, v1, ...]`            |
 * |   3  | Set             | msgpack array of members                         |
 * |   4  | Error           | msgpack map `{name, message, stack, cause?, code?}` |
 * |   5  | Context         | msgpack array `[contextId, name]`                |
 * |   6  | Sender          | msgpack array `[contextId, handle]`              |
 * |   7  | Secret          | the wrapped value                                |
 * |   8  | CallError       | msgpack array `[remoteName, message, remoteStack, cause?]` |
 * |   9  | out-of-band blob| u32 byte length (bytes follow the value, see below) |
 *
 * Large `Uint8Array`s (>= {@link BLOB_MIN} bytes) are not copied into the
 * MessagePack body: the body becomes `u32 bodyLength, body, blob0, blob1, ...`
 * and the frame header carries the BLOBS flag. Blobs decode as views of the
 * received frame, without a copy.
 *
 * Anything else: functions, symbols, class instances, typed arrays other
 * than Uint8Array: fails on the sending side with a {@link MitogenError}
 * naming the path of the bad value (`args[1].opts.cb`). Decoding never sets a
 * prototype from data: maps decode to plain objects (`__proto__` keys are
 * refused by the library), and errors are rebuilt from a fixed list of
 * constructors.
 *
 * @module
 */
import { Decoder, Encoder, ExtData, ExtensionCodec, encodeTimestampExtension } from "@msgpack/msgpack";
import { AbortError, CallError, ChannelError, LatchError, MitogenError, SelectError, StreamError, TimeoutError } from "./errors.ts";
import { hasOwn } from "./runtime.ts";
import { allocBytes, view } from "./bytes.ts";

/** Extension type numbers. */
export const EXT = {
  UNDEFINED: 0,
  BIGINT: 1,
  MAP: 2,
  SET: 3,
  ERROR: 4,
  CONTEXT: 5,
  SENDER: 6,
  SECRET: 7,
  CALL_ERROR: 8,
  BLOB: 9,
} as const;

/** Uint8Arrays at least this large travel out of band, without a copy into the body. */
export const BLOB_MIN = 64 * 1024;
/** Deepest nesting accepted in either direction. */
export const MAX_DEPTH = 512;

/** Objects that travel as references (Context, Sender) implement this. */
export const WIRE_REF: unique symbol = Symbol.for("mitogen.wireRef");
/** What a reference-like object hands the encoder: its ext type and fields. */
export interface WireRef {
  [WIRE_REF](): readonly [type: number, fields: readonly unknown[]];
}

/** Turns decoded references into live objects bound to the receiving router. */
export interface Binder {
  contextRef(contextId: number, name: string | null): unknown;
  senderRef(contextId: number, handle: number): unknown;
}

const INSPECT = Symbol.for("nodejs.util.inspect.custom");
const DENO_INSPECT = Symbol.for("Deno.customInspect");

/**
 * A value that must not be printed: logs, `inspect`, `String()` and JSON all
 * show `[secret]`. It crosses the wire intact; read it with {@link Secret.reveal}.
 *
 * @example
 * ```ts
 * import { Secret } from "mitogen";
 * const pw = new Secret("hunter2");
 * console.log(`${pw}`, pw.reveal()); // [secret] hunter2
 * ```
 */
export class Secret<T = string> {
  readonly #value: T;
  constructor(value: T) {
    this.#value = value;
  }
  /** The wrapped value. */
  reveal(): T {
    return this.#value;
  }
  toString(): string {
    return "[secret]";
  }
  toJSON(): string {
    return "[secret]";
  }
  [INSPECT](): string {
    return "[secret]";
  }
  [DENO_INSPECT](): string {
    return "[secret]";
  }
}

/** An encoded value: `parts` are written back to back; `blobs` says whether the BLOBS flag is due. */
export interface Encoded {
  parts: Uint8Array[];
  length: number;
  blobs: boolean;
  /** With `headroom`, and no blobs: the body with that many free bytes in front (`parts[0]` is a view of its end). */
  framed?: Uint8Array;
}

interface EncodeState {
  blobs: Uint8Array[];
  depth: number;
}

interface DecodeState {
  binder: Binder | null;
  data: Uint8Array;
  blobOffset: number;
  /** Level of the value the current decoder reads (the message's value is level 1, its elements 2, ...). */
  level: number;
  /** Level of the extension value whose payload is about to be decoded. */
  extLevel: number;
  /** Elements that arrays and maps may still claim in this message: one per byte of the body. */
  budget: number;
  /** Byte length of the body, for errors. */
  bodyLength: number;
}

/** The parts of the library's Encoder that we extend; they are private in its typings. */
interface EncoderInternals {
  doEncode(value: unknown, depth: number): void;
  encodeObject(value: unknown, depth: number): void;
  encodeExtension(ext: ExtData): void;
  encodeNumberAsFloat(value: number): void;
  encodeBinary(value: Uint8Array): void;
  encodeArray(value: unknown[], depth: number): void;
  encodeMap(value: object, depth: number): void;
  encode(value: unknown): Uint8Array;
  encodeSharedRef(value: unknown): Uint8Array;
}

/** Thrown inside the encoder at the first value that cannot travel; carries the value for the path search. */
class BadValue extends Error {
  readonly value: unknown;
  readonly why: string;
  constructor(value: unknown, why: string) {
    super(why);
    this.value = value;
    this.why = why;
  }
}

const EMPTY = new Uint8Array(0);
const UNDEFINED_EXT = new ExtData(EXT.UNDEFINED, EMPTY);
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

function describe(value: unknown): string {
  if (typeof value === "function") return `a function (${value.name || "anonymous"})`;
  if (typeof value === "symbol") return `a symbol (${String(value.description)})`;
  if (ArrayBuffer.isView(value)) return `a ${value.constructor.name} (only Uint8Array travels)`;
  const ctor = (value as { constructor?: { name?: unknown } }).constructor;
  const name = typeof ctor?.name === "string" && ctor.name ? ctor.name : "unknown class";
  return `an instance of ${name} (only plain objects, arrays, Map, Set, Date, Error, Uint8Array travel)`;
}

function isPlainObject(value: object): boolean {
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

function newEncoder(state: EncodeState): EncoderInternals {
  const enc = new Encoder<EncodeState>({
    context: state,
    maxDepth: MAX_DEPTH - state.depth,
    initialBufferSize: 256,
  }) as unknown as EncoderInternals;
  const baseDoEncode = enc.doEncode.bind(enc);
  enc.doEncode = (value, depth) => {
    if (value === undefined) enc.encodeExtension(UNDEFINED_EXT);
    else if (Object.is(value, -0)) enc.encodeNumberAsFloat(-0);
    else if (typeof value === "function" || typeof value === "symbol") throw new BadValue(value, describe(value));
    else baseDoEncode(value, depth);
  };
  enc.encodeObject = (value, depth) => {
    // Hexadecimal: parsing it is linear in its length, where decimal is not (a frame of digits could stall a context).
    if (typeof value === "bigint")
      return enc.encodeExtension(new ExtData(EXT.BIGINT, utf8.encode(value < 0n ? `-${(-value).toString(16)}` : value.toString(16))));
    if (typeof value !== "object" || value === null) throw new BadValue(value, describe(value));
    if (Array.isArray(value)) return enc.encodeArray(value, depth);
    if (value instanceof Uint8Array) {
      if (value.byteLength < BLOB_MIN) return enc.encodeBinary(value);
      state.blobs.push(value);
      const len = new Uint8Array(4);
      new DataView(len.buffer).setUint32(0, value.byteLength);
      return enc.encodeExtension(new ExtData(EXT.BLOB, len));
    }
    const nested = (type: number, inner: unknown) => {
      const sub = newEncoder({ blobs: state.blobs, depth: state.depth + depth });
      enc.encodeExtension(new ExtData(type, sub.encode(inner)));
    };
    if (WIRE_REF in value) {
      const [type, fields] = (value as WireRef)[WIRE_REF]();
      return nested(type, fields);
    }
    if (isPlainObject(value)) return enc.encodeMap(value, depth);
    if (value instanceof Date) {
      if (Number.isNaN(value.getTime())) throw new BadValue(value, "an invalid Date");
      return enc.encodeExtension(new ExtData(-1, encodeTimestampExtension(value) ?? EMPTY));
    }
    if (value instanceof Map) return nested(EXT.MAP, [...value].flat(1));
    if (value instanceof Set) return nested(EXT.SET, [...value]);
    if (value instanceof Secret) return nested(EXT.SECRET, value.reveal());
    if (value instanceof CallError) {
      const fields = [value.remoteName, value.remoteMessage, value.remoteStack];
      return nested(EXT.CALL_ERROR, "cause" in value ? [...fields, value.cause] : fields);
    }
    if (value instanceof Error) return nested(EXT.ERROR, errorFields(value));
    throw new BadValue(value, describe(value));
  };
  return enc;
}

const topState: EncodeState = { blobs: [], depth: 0 };
const topEncoder = newEncoder(topState);
let topBusy = false;

function errorFields(err: Error): Record<string, unknown> {
  const out: Record<string, unknown> = { name: err.name, message: err.message, stack: err.stack ?? "" };
  if ("cause" in err) out.cause = err.cause;
  const code = (err as { code?: unknown }).code;
  if (typeof code === "string" || typeof code === "number") out.code = code;
  return out;
}

/**
 * Encode `value`. On a value that cannot travel, throws a MitogenError naming
 * its path below `root` (e.g. `args[1].opts.cb: a function (cb)`).
 */
export function encodeValue(value: unknown, root = "value", pathFrom: unknown = value, headroom = 0): Encoded {
  // The commonest replies are one byte (see decodeValue): written without the encoder.
  const tiny = tinyByte(value);
  if (tiny >= 0) {
    const framed = allocBytes(headroom + 1);
    framed[headroom] = tiny;
    return headroom ? { parts: [view(framed, headroom)], length: 1, blobs: false, framed } : { parts: [framed], length: 1, blobs: false };
  }
  // One encoder serves every top-level call (its buffer is reused); nested or
  // re-entrant calls get their own.
  const reuse = !topBusy;
  const state: EncodeState = reuse ? topState : { blobs: [], depth: 0 };
  state.blobs = [];
  let body: Uint8Array;
  let framed: Uint8Array | undefined;
  try {
    topBusy = true;
    if (reuse) {
      // The shared encoder's buffer is reused: copy out exactly what it wrote (a slab view when small),
      // after `headroom` bytes left for a frame header.
      const ref = topEncoder.encodeSharedRef(value);
      framed = allocBytes(headroom + ref.byteLength);
      framed.set(ref, headroom);
      body = headroom ? view(framed, headroom) : framed;
    } else body = newEncoder(state).encode(value);
  } catch (err) {
    if (err instanceof BadValue) {
      throw new MitogenError(`cannot send ${findPath(pathFrom, err.value, root) ?? root}: ${err.why}`);
    }
    if (err instanceof RangeError || (err instanceof Error && err.message.startsWith("Too deep"))) {
      throw new MitogenError(`cannot send ${root}: nested deeper than ${MAX_DEPTH} levels (or cyclic)`, { cause: err });
    }
    throw new MitogenError(`cannot send ${root}: ${(err as Error).message}`, { cause: err });
  } finally {
    if (reuse) topBusy = false;
  }
  if (state.blobs.length === 0)
    return framed && headroom ? { parts: [body], length: body.byteLength, blobs: false, framed } : { parts: [body], length: body.byteLength, blobs: false };
  const prefix = new Uint8Array(4);
  new DataView(prefix.buffer).setUint32(0, body.byteLength);
  let length = 4 + body.byteLength;
  for (const b of state.blobs) length += b.byteLength;
  return { parts: [prefix, body, ...state.blobs], length, blobs: true };
}

/** The one-byte msgpack of `value` (an integer from -32 to 127, null or a boolean), else -1. */
function tinyByte(value: unknown): number {
  if (typeof value === "number") return Number.isInteger(value) && value >= -32 && value < 128 && !Object.is(value, -0) ? value & 0xff : -1;
  if (value === null) return 0xc0;
  if (value === false) return 0xc2;
  if (value === true) return 0xc3;
  return -1;
}

/** Where below `root` the value `bad` sits, as `args[1].opts.cb`; null if not found. */
function findPath(root: unknown, bad: unknown, name: string): string | null {
  const seen = new Set<unknown>();
  const walk = (v: unknown, path: string, depth: number): string | null => {
    if (v === bad) return path;
    if (typeof v !== "object" || v === null || seen.has(v) || depth > MAX_DEPTH) return null;
    seen.add(v);
    const entries: [string, unknown][] = [];
    if (Array.isArray(v)) {
      for (let i = 0; i < v.length; i++) entries.push([`${path}[${i}]`, v[i]]);
    } else if (v instanceof Map) {
      for (const [k, item] of v) entries.push([`${path}.get(${JSON.stringify(k) ?? String(k)})`, item], [`${path}.keys()`, k]);
    } else if (v instanceof Set) for (const item of v) entries.push([`${path}.values()`, item]);
    else if (v instanceof Secret) entries.push([`${path}.reveal()`, v.reveal()]);
    else if (v instanceof Error) entries.push([`${path}.cause`, v.cause]);
    else if (isPlainObject(v)) {
      for (const k of Object.keys(v)) {
        entries.push([/^[A-Za-z_$][\w$]*$/.test(k) ? `${path}.${k}` : `${path}[${JSON.stringify(k)}]`, (v as Record<string, unknown>)[k]]);
      }
    }
    for (const [p, item] of entries) {
      const found = walk(item, p, depth + 1);
      if (found) return found;
    }
    return null;
  };
  return walk(root, name, 0);
}

const ERROR_CLASSES: Record<string, new (message: string) => Error> = {
  Error,
  TypeError,
  RangeError,
  SyntaxError,
  ReferenceError,
  EvalError,
  URIError,
  MitogenError,
  ChannelError,
  LatchError,
  SelectError,
  StreamError,
  TimeoutError,
  AbortError,
};

function rebuildError(fields: unknown): Error {
  const f = (typeof fields === "object" && fields !== null ? fields : {}) as Record<string, unknown>;
  const name = typeof f.name === "string" ? f.name : "Error";
  const message = typeof f.message === "string" ? f.message : "";
  const Ctor = hasOwn(ERROR_CLASSES, name) ? ERROR_CLASSES[name] : undefined;
  const err = Ctor ? new Ctor(message) : new Error(message);
  if (err.name !== name) Object.defineProperty(err, "name", { value: name, writable: true, configurable: true });
  if (typeof f.stack === "string") Object.defineProperty(err, "stack", { value: f.stack, writable: true, configurable: true });
  if (hasOwn(f, "cause")) Object.defineProperty(err, "cause", { value: f.cause, writable: true, configurable: true });
  if (hasOwn(f, "code")) Object.defineProperty(err, "code", { value: f.code, writable: true, configurable: true, enumerable: true });
  return err;
}

const codec = new ExtensionCodec<DecodeState>();

/** The parts of the library's Decoder that we extend; they are private in its typings. */
interface DecoderInternals {
  readonly context: DecodeState;
  pos: number;
  view: DataView;
  bytes: Uint8Array;
  readonly stack: { readonly length: number };
  pushArrayState(size: number): void;
  pushMapState(size: number): void;
  decodeUtf8String(byteLength: number, headerOffset: number): string;
  decodeBinary(byteLength: number, headOffset: number): Uint8Array;
  decodeExtension(size: number, headOffset: number): unknown;
  decode(buffer: Uint8Array): unknown;
}

const EMPTY_VIEW = new DataView(new ArrayBuffer(0));
const LibDecoder = Decoder as unknown as new (options: { extensionCodec: ExtensionCodec<DecodeState>; context: DecodeState }) => DecoderInternals;

/**
 * The library's Decoder, bounded by what arrived. (The library checks
 * str/bin/ext lengths against the bytes left before it copies, but allocates
 * `new Array(count)` for any array header.) Here, before anything is
 * allocated: no length or count may claim more than the bytes left (an
 * element takes a byte at least, a map entry two); all arrays and maps of a
 * message together may claim no more elements than it has bytes; and no value
 * may sit below level {@link MAX_DEPTH} (the message's value is level 1;
 * each array or map element, and each nested extension payload, is one level
 * down), as the encoder counts.
 */
class BoundedDecoder extends LibDecoder {
  constructor(state: DecodeState) {
    super({ extensionCodec: codec, context: state });
  }

  #claim(map: boolean, count: number): void {
    const s = this.context;
    if (s.level + this.stack.length >= MAX_DEPTH) throw new StreamError(`value nested deeper than ${MAX_DEPTH} levels`);
    const bytes = map ? count * 2 : count;
    const left = this.view.byteLength - this.pos;
    if (bytes > left) {
      const what = map ? `map of ${count} entries` : `array of ${count} elements`;
      throw new StreamError(`${what} exceeds the ${left} bytes left to decode (${map ? "an entry takes two bytes" : "an element takes a byte"} at least)`);
    }
    s.budget -= bytes;
    if (s.budget < 0) throw new StreamError(`arrays and maps claim more elements than the ${s.bodyLength} bytes of the message`);
  }

  override pushArrayState(size: number): void {
    this.#claim(false, size);
    super.pushArrayState(size);
  }

  override pushMapState(size: number): void {
    this.#claim(true, size);
    super.pushMapState(size);
  }

  #fits(what: string, length: number, headerBytes: number): void {
    const left = this.view.byteLength - this.pos - headerBytes;
    if (length > left) throw new StreamError(`${what} of ${length} bytes exceeds the ${Math.max(left, 0)} bytes left to decode`);
  }

  override decodeUtf8String(byteLength: number, headerOffset: number): string {
    this.#fits("string", byteLength, headerOffset);
    return super.decodeUtf8String(byteLength, headerOffset);
  }

  override decodeBinary(byteLength: number, headOffset: number): Uint8Array {
    this.#fits("binary", byteLength, headOffset);
    return super.decodeBinary(byteLength, headOffset);
  }

  override decodeExtension(size: number, headOffset: number): unknown {
    this.#fits("extension", size, headOffset + 1);
    this.context.extLevel = this.context.level + this.stack.length;
    return super.decodeExtension(size, headOffset);
  }
}

/** Decode an extension's payload: a complete value one level below the extension. */
function nestedDecode(data: Uint8Array, state: DecodeState): unknown {
  const level = state.extLevel + 1;
  if (level > MAX_DEPTH) throw new StreamError(`value nested deeper than ${MAX_DEPTH} levels`);
  const outer = state.level;
  state.level = level;
  try {
    return new BoundedDecoder(state).decode(data);
  } finally {
    state.level = outer;
  }
}

function asArray(v: unknown, what: string): unknown[] {
  if (!Array.isArray(v)) throw new StreamError(`malformed ${what} on the wire`);
  return v;
}

const decoders: [number, (data: Uint8Array, state: DecodeState) => unknown][] = [
  [EXT.UNDEFINED, () => undefined],
  [
    EXT.BIGINT,
    (d) => {
      const text = fromUtf8.decode(d);
      if (!/^-?[0-9a-f]+$/.test(text)) throw new StreamError("malformed bigint on the wire");
      return text.startsWith("-") ? -BigInt(`0x${text.slice(1)}`) : BigInt(`0x${text}`);
    },
  ],
  [
    EXT.MAP,
    (d, s) => {
      const flat = asArray(nestedDecode(d, s), "Map");
      const map = new Map<unknown, unknown>();
      for (let i = 0; i + 1 < flat.length; i += 2) map.set(flat[i], flat[i + 1]);
      return map;
    },
  ],
  [EXT.SET, (d, s) => new Set(asArray(nestedDecode(d, s), "Set"))],
  [EXT.ERROR, (d, s) => rebuildError(nestedDecode(d, s))],
  [EXT.SECRET, (d, s) => new Secret(nestedDecode(d, s))],
  [
    EXT.CALL_ERROR,
    (d, s) => {
      const fields = asArray(nestedDecode(d, s), "CallError");
      const [name, message, stack] = fields.slice(0, 3).map(String);
      return new CallError(name ?? "Error", message ?? "", stack ?? "", fields.length > 3 ? { cause: fields[3] } : undefined);
    },
  ],
  [
    EXT.CONTEXT,
    (d, s) => {
      const [id, name] = asArray(nestedDecode(d, s), "Context");
      if (typeof id !== "number" || !s.binder) throw new StreamError("malformed Context on the wire");
      return s.binder.contextRef(id, typeof name === "string" ? name : null);
    },
  ],
  [
    EXT.SENDER,
    (d, s) => {
      const [id, handle] = asArray(nestedDecode(d, s), "Sender");
      if (typeof id !== "number" || typeof handle !== "number" || !s.binder) throw new StreamError("malformed Sender on the wire");
      return s.binder.senderRef(id, handle);
    },
  ],
  [
    EXT.BLOB,
    (d, s) => {
      if (d.byteLength !== 4) throw new StreamError("malformed blob reference on the wire");
      const len = new DataView(d.buffer, d.byteOffset, 4).getUint32(0);
      const start = s.blobOffset;
      if (start + len > s.data.byteLength) throw new StreamError("blob reference past the end of the message");
      s.blobOffset += len;
      return s.data.subarray(start, start + len);
    },
  ],
];
for (const [type, decode] of decoders) codec.register({ type, encode: () => null, decode: (d, _t, s) => decode(d, s) });

function newDecodeState(): DecodeState {
  return { binder: null, data: EMPTY, blobOffset: 0, level: 1, extLevel: 1, budget: 0, bodyLength: 0 };
}

const topDecodeState = newDecodeState();
const topDecoder = new BoundedDecoder(topDecodeState);
let decodeBusy = false;

/**
 * Decode a message body. `blobs` is the header's BLOBS flag. Throws
 * StreamError on malformed input, and on input that claims more than it
 * holds (see {@link BoundedDecoder}); never sets a prototype from data.
 *
 * This is the one decoder for every message, whichever way it travels: what
 * a parent sends a child and what a child sends its parent.
 */
export function decodeValue(bytes: Uint8Array, blobs: boolean, binder: Binder | null): unknown {
  // The commonest replies, a small integer, null or a boolean, are one byte; `undefined` is three.
  if (!blobs && bytes.byteLength <= 3) {
    const b = bytes[0] as number;
    if (bytes.byteLength === 1) {
      if (b < 0x80) return b;
      if (b >= 0xe0) return b - 0x100;
      if (b === 0xc0) return null;
      if (b === 0xc2) return false;
      if (b === 0xc3) return true;
    } else if (bytes.byteLength === 3 && b === 0xc7 && bytes[1] === 0 && bytes[2] === EXT.UNDEFINED) return undefined;
  }
  // A plain Uint8Array view (Node hands us Buffers): decoded bytes then look the same on every runtime.
  const data = bytes.constructor === Uint8Array ? bytes : new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  // One decoder serves every top-level call; a re-entrant call (from a binder) gets its own.
  const reuse = !decodeBusy;
  const state = reuse ? topDecodeState : newDecodeState();
  const decoder = reuse ? topDecoder : new BoundedDecoder(state);
  state.binder = binder;
  state.data = data;
  state.blobOffset = 0;
  state.level = 1;
  try {
    decodeBusy = true;
    let body = data;
    if (blobs) {
      if (data.byteLength < 4) throw new StreamError("truncated message body");
      const len = new DataView(data.buffer, data.byteOffset, 4).getUint32(0);
      if (4 + len > data.byteLength) throw new StreamError("truncated message body");
      body = data.subarray(4, 4 + len);
      state.blobOffset = 4 + len;
    }
    state.budget = state.bodyLength = body.byteLength;
    return decoder.decode(body);
  } catch (err) {
    if (err instanceof StreamError) throw err;
    throw new StreamError(`cannot decode message: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  } finally {
    if (reuse) {
      decodeBusy = false;
      // Do not keep the last message alive.
      state.data = EMPTY;
      state.binder = null;
      decoder.bytes = EMPTY;
      decoder.view = EMPTY_VIEW;
    }
  }
}
