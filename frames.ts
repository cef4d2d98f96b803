/**
 * Frames: the reserved handles, the 28-byte header and Message (Stream, which
 * carries frames over a byte Transport, is stream.ts). Part of the child payload.
 *
 * @module
 */
import { CallError, ChannelError, MitogenError } from "./errors.ts";
import { type Binder, decodeValue, encodeValue } from "./codec.ts";
import { joinParts, put32 } from "./bytes.ts";

// ---------------------------------------------------------------------------
// Constants

/** Reserved handles, as in Mitogen; dynamic handles start at {@link FIRST_DYNAMIC_HANDLE}. */
export const HANDLE = {
  GET_MODULE: 100,
  CALL_FUNCTION: 101,
  FORWARD_LOG: 102,
  ADD_ROUTE: 103,
  DEL_ROUTE: 104,
  ALLOCATE_ID: 105,
  SHUTDOWN: 106,
  LOAD_MODULE: 107,
  FORWARD_MODULE: 108,
  DETACHING: 109,
  CALL_SERVICE: 110,
  STUB_CALL_SERVICE: 111,
  /** First frame from a parent to a new child: its configuration. */
  CONFIGURE: 112,
  /** Cancel a running call: data is the call's reply_to handle; only its caller can. */
  CANCEL_CALL: 113,
  /** `reply_to` of a dead message. */
  IS_DEAD: 999,
} as const;

/** The reserved handles by number (`HANDLE_NAME[101]` is "CALL_FUNCTION"), for what messages and logs print. */
export const HANDLE_NAME: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(HANDLE).map(([name, h]) => [h, name]));

/** A handle as messages and logs print it: `101 CALL_FUNCTION`, or the number alone for a dynamic one. */
export const handleName = (h: number): string => (HANDLE_NAME[h] ? `${h} ${HANDLE_NAME[h]}` : String(h));

/** First handle handed out to receivers. */
export const FIRST_DYNAMIC_HANDLE = 1000;

/** Frame header constants; the layout is documented beside {@link writeHeader}. */
export const FRAME = {
  MAGIC: 0x4d47,
  VERSION: 1,
  HEADER_SIZE: 28,
  /** Data is raw bytes, not an encoded value. */
  FLAG_RAW: 1,
  /** Data is `u32 bodyLength, body, blobs...` (see codec.ts). */
  FLAG_BLOBS: 2,
  /** Counted against its channel's window: the receiver grants the bytes back once consumed (flow.ts). */
  FLAG_FLOW: 4,
} as const;

/** Lines the bootstrap writes on the stream before any frame. */
export const MARKER = {
  /** First stage is up and waits for the payload; the rest of its line says `<runtime> <version>` (`node 12.22.12`). */
  READY: "MITO000 ",
  /** Core is running; frames follow. */
  CONNECTED: "MITO001\n",
} as const;

/**
 * Module names of the core payloads: `MODERN` (ES2022) for Node 16.11 and later and every Deno, `LOWERED`
 * (syntax lowered for Node 12) for Node 12 to 16.10. Every context holds the one it runs; the master both.
 */
export const CORE = {
  MODERN: "mitogen:core",
  LOWERED: "mitogen:core-node12",
} as const;

/** Default cap on one message's data, checked from the frame header. */
export const DEFAULT_MAX_MESSAGE_SIZE: number = 128 * 1024 * 1024;

const EMPTY = new Uint8Array(0);
const NO_PARTS: readonly Uint8Array[] = [];

// ---------------------------------------------------------------------------
// Messages

/**
 * What a Message needs of the router that received it (the Router is one): binding the Context and
 * Sender references in its data, routing a reply, and the master's rewriting of a failed call's error.
 */
export interface MessageHost extends Binder {
  route(msg: Message): void;
  rewriteCallError(err: CallError): CallError;
}

/** What received a message, as {@link Message.receiver} tells (a Receiver). */
export interface MessageRecipient {
  readonly handle: number;
}

/** Header fields of a message. */
export interface MessageFields {
  dst?: number;
  src?: number;
  auth?: number;
  handle?: number;
  replyTo?: number;
  flags?: number;
}

/**
 * One frame: routing fields plus data. `unpickle()` decodes the data;
 * a dead message (`replyTo === HANDLE.IS_DEAD`) carries a reason and
 * unpickles to a thrown {@link ChannelError}.
 */
export class Message {
  dst = 0;
  src = 0;
  auth = 0;
  handle = 0;
  replyTo = 0;
  flags = 0;
  /** Router that received the message, which binds Context/Sender references. */
  router: MessageHost | null = null;
  /** Receiver that got it, when one did (Select uses this). */
  receiver: MessageRecipient | null = null;
  /** @internal The whole frame as a relaying Stream read it (header included), to pass on without a copy. */
  _wire: Uint8Array | null = null;
  /** @internal The data with room for the header in front (from {@link Message.encoded}): the first send writes the header there. */
  _framed: Uint8Array | null = null;
  /** @internal A dead message's error, where this router knows a better one than its reason (a failed start): thrown by unpickle, never sent. */
  declare _error?: Error;
  #parts: readonly Uint8Array[];
  #length: number;

  constructor(fields?: MessageFields, parts: readonly Uint8Array[] = NO_PARTS, length: number = sumLength(parts)) {
    this.#parts = parts;
    this.#length = length;
    if (fields) this.set(fields);
  }

  /** Set the header fields given in `fields` (the others keep their values); returns this message. */
  set(fields: MessageFields): this {
    if (fields.dst !== undefined) this.dst = fields.dst;
    if (fields.src !== undefined) this.src = fields.src;
    if (fields.auth !== undefined) this.auth = fields.auth;
    if (fields.handle !== undefined) this.handle = fields.handle;
    if (fields.replyTo !== undefined) this.replyTo = fields.replyTo;
    if (fields.flags !== undefined) this.flags = fields.flags;
    return this;
  }

  /** A message whose data is `value`, encoded; `root` names the value in errors. */
  static encoded(value: unknown, fields?: MessageFields, root = "value", pathFrom: unknown = value): Message {
    const enc = encodeValue(value, root, pathFrom, FRAME.HEADER_SIZE);
    const msg = new Message(fields, enc.parts, enc.length);
    if (enc.blobs) msg.flags |= FRAME.FLAG_BLOBS;
    if (enc.framed) msg._framed = enc.framed;
    return msg;
  }

  /** A message carrying raw bytes, skipping the value codec. */
  static raw(bytes: Uint8Array, fields?: MessageFields): Message {
    const msg = new Message(fields, [bytes], bytes.byteLength);
    msg.flags = FRAME.FLAG_RAW;
    return msg;
  }

  /** A dead message: the channel it answers is over, for `reason`. */
  static dead(reason: string, fields?: MessageFields, error?: Error): Message {
    const msg = Message.encoded(reason, fields);
    msg.replyTo = HANDLE.IS_DEAD;
    if (error) msg._error = error;
    return msg;
  }

  /** @internal Attach the data: `parts`, `length` bytes in all (a Stream does, to a message it read). */
  _setData(parts: readonly Uint8Array[], length: number): void {
    this.#parts = parts;
    this.#length = length;
  }

  /** Byte length of the data. */
  get length(): number {
    return this.#length;
  }
  /** Data as written on the wire, in parts. */
  get parts(): readonly Uint8Array[] {
    return this.#parts;
  }
  /** Data as one array (joined on first use). */
  get data(): Uint8Array {
    if (this.#parts.length !== 1) this.#parts = [joinParts(this.#parts, this.#length)];
    return this.#parts[0] ?? EMPTY;
  }
  /** True for a dead message. */
  get isDead(): boolean {
    return this.replyTo === HANDLE.IS_DEAD;
  }

  /**
   * Decode the data. Throws ChannelError for a dead message, and throws the
   * CallError when the data is one (a failed call's reply).
   */
  unpickle(options?: { throwDead?: boolean }): unknown {
    if (this.flags & FRAME.FLAG_RAW) return this.data;
    const value = decodeValue(this.data, (this.flags & FRAME.FLAG_BLOBS) !== 0, this.router);
    if (this.isDead && options?.throwDead !== false) throw this._error ?? new ChannelError(typeof value === "string" ? value : "channel closed");
    if (value instanceof CallError) throw this.router ? this.router.rewriteCallError(value) : value;
    return value;
  }

  /** Send `value` to this message's `replyTo` handle in its sender. */
  reply(value: unknown, fields?: MessageFields): void {
    if (!this.router) throw new MitogenError("cannot reply: message has no router");
    const msg = Message.encoded(value, undefined, "reply");
    msg.dst = this.src;
    msg.handle = this.replyTo;
    if (fields) msg.set(fields);
    this.router.route(msg);
  }

  toString(): string {
    return `Message(dst=${this.dst} src=${this.src} auth=${this.auth} handle=${handleName(this.handle)} replyTo=${handleName(this.replyTo)} ${this.#length} bytes)`;
  }
}

function sumLength(parts: readonly Uint8Array[]): number {
  let n = 0;
  for (const p of parts) n += p.byteLength;
  return n;
}

// ---------------------------------------------------------------------------
// Frames
//
// Every frame is a 28-byte header, big-endian, then `length` bytes of data:
//
//   offset size field
//        0    2 magic     0x4d47 ("MG")
//        2    1 version   1
//        3    1 flags     bit 0 RAW (data is bytes), bit 1 BLOBS (see codec.ts), bit 2 FLOW (flow.ts)
//        4    4 dst_id    context the message is for
//        8    4 src_id    context that wrote it
//       12    4 auth_id   context it is sent on behalf of (== src_id today)
//       16    4 handle    handle at dst that receives it
//       20    4 reply_to  handle at src for the answer; 999 = IS_DEAD
//       24    4 length    data bytes that follow
//
// The reader checks magic, version and `length <= maxMessageSize` from the
// header alone, before buffering any data.

/** Write the header for `msg` (into `h`, when given, at `at`, 0 by default). */
export function writeHeader(msg: Message, h: Uint8Array = new Uint8Array(FRAME.HEADER_SIZE), at = 0): Uint8Array {
  h[at] = FRAME.MAGIC >>> 8;
  h[at + 1] = FRAME.MAGIC;
  h[at + 2] = FRAME.VERSION;
  h[at + 3] = msg.flags;
  put32(h, at + 4, msg.dst);
  put32(h, at + 8, msg.src);
  put32(h, at + 12, msg.auth);
  put32(h, at + 16, msg.handle);
  put32(h, at + 20, msg.replyTo);
  put32(h, at + 24, msg.length);
  return h;
}
