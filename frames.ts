/**
 * Frames: the reserved handles, the 28-byte header, Message, and Stream (frames
 * over a byte Transport, with the bootstrap markers in front). Part of the
 * child payload.
 *
 * @module
 */
import { CallError, ChannelError, MitogenError, StreamError } from "./errors.ts";
import { decodeValue, encodeValue } from "./codec.ts";
import { joinParts, type Transport } from "./runtime.ts";
import type { Receiver } from "./select.ts";
import type { Router } from "./core.ts";

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

/** First handle handed out to receivers. */
export const FIRST_DYNAMIC_HANDLE = 1000;

/** Frame header constants; the layout is documented beside {@link readHeader}. */
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
/** Longest rest of a marker line (see {@link Stream.expectMarker}). */
const MARKER_LINE_MAX = 100;
const ascii = new TextEncoder();

// ---------------------------------------------------------------------------
// Messages

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
  router: Router | null = null;
  /** Receiver that got it, when one did (Select uses this). */
  receiver: Receiver | null = null;
  #parts: readonly Uint8Array[];
  #length: number;

  constructor(fields: MessageFields = {}, parts: readonly Uint8Array[] = [], length: number = sumLength(parts)) {
    // Explicit fields: this runs for every frame.
    if (fields.dst !== undefined) this.dst = fields.dst;
    if (fields.src !== undefined) this.src = fields.src;
    if (fields.auth !== undefined) this.auth = fields.auth;
    if (fields.handle !== undefined) this.handle = fields.handle;
    if (fields.replyTo !== undefined) this.replyTo = fields.replyTo;
    if (fields.flags !== undefined) this.flags = fields.flags;
    this.#parts = parts;
    this.#length = length;
  }

  /** A message whose data is `value`, encoded; `root` names the value in errors. */
  static encoded(value: unknown, fields: MessageFields = {}, root = "value", pathFrom: unknown = value): Message {
    const enc = encodeValue(value, root, pathFrom);
    return new Message({ ...fields, flags: (fields.flags ?? 0) | (enc.blobs ? FRAME.FLAG_BLOBS : 0) }, enc.parts, enc.length);
  }

  /** A message carrying raw bytes, skipping the value codec. */
  static raw(bytes: Uint8Array, fields: MessageFields = {}): Message {
    return new Message({ ...fields, flags: FRAME.FLAG_RAW }, [bytes], bytes.byteLength);
  }

  /** A dead message: the channel it answers is over, for `reason`. */
  static dead(reason: string, fields: MessageFields = {}): Message {
    return Message.encoded(reason, { ...fields, replyTo: HANDLE.IS_DEAD });
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
  unpickle(options: { throwDead?: boolean } = {}): unknown {
    if (this.flags & FRAME.FLAG_RAW) return this.data;
    const value = decodeValue(this.data, (this.flags & FRAME.FLAG_BLOBS) !== 0, this.router);
    if (this.isDead && options.throwDead !== false) throw new ChannelError(typeof value === "string" ? value : "channel closed");
    if (value instanceof CallError) throw this.router ? this.router.rewriteCallError(value) : value;
    return value;
  }

  /** Send `value` to this message's `replyTo` handle in its sender. */
  reply(value: unknown, fields: MessageFields = {}): void {
    if (!this.router) throw new MitogenError("cannot reply: message has no router");
    this.router.route(Message.encoded(value, { dst: this.src, handle: this.replyTo, ...fields }, "reply"));
  }

  toString(): string {
    return `Message(dst=${this.dst} src=${this.src} auth=${this.auth} handle=${this.handle} replyTo=${this.replyTo} ${this.#length} bytes)`;
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

/** Write the header for `msg` (into `h`, when given, at its start). */
export function writeHeader(msg: Message, h: Uint8Array = new Uint8Array(FRAME.HEADER_SIZE)): Uint8Array {
  const v = new DataView(h.buffer, h.byteOffset, FRAME.HEADER_SIZE);
  v.setUint16(0, FRAME.MAGIC);
  v.setUint8(2, FRAME.VERSION);
  v.setUint8(3, msg.flags);
  v.setUint32(4, msg.dst);
  v.setUint32(8, msg.src);
  v.setUint32(12, msg.auth);
  v.setUint32(16, msg.handle);
  v.setUint32(20, msg.replyTo);
  v.setUint32(24, msg.length);
  return h;
}

/** Parse a header (layout above). Throws StreamError on a bad one. */
export function readHeader(h: Uint8Array, maxMessageSize: number): { fields: MessageFields; length: number } {
  const v = new DataView(h.buffer, h.byteOffset, FRAME.HEADER_SIZE);
  const magic = v.getUint16(0);
  if (magic !== FRAME.MAGIC) throw new StreamError(`bad frame magic 0x${magic.toString(16)} (stream out of sync or not mitogen)`);
  const version = v.getUint8(2);
  if (version !== FRAME.VERSION) throw new StreamError(`unsupported frame version ${version}`);
  const length = v.getUint32(24);
  if (length > maxMessageSize) throw new StreamError(`frame of ${length} bytes exceeds maxMessageSize ${maxMessageSize}`);
  return {
    fields: {
      flags: v.getUint8(3),
      dst: v.getUint32(4),
      src: v.getUint32(8),
      auth: v.getUint32(12),
      handle: v.getUint32(16),
      replyTo: v.getUint32(20),
    },
    length,
  };
}

// ---------------------------------------------------------------------------
// Stream: frames over a Transport

/** What crossed one link, as {@link Stream.counts} and `router.stats.links` report it. */
export interface LinkCounts {
  bytesIn: number;
  bytesOut: number;
}

/** Frames up to this size are written as one joined buffer. */
const SMALL_FRAME = 64 * 1024;

/** Frames over a byte Transport, with the bootstrap markers in front. */
export class Stream {
  /** Human name, for logs. */
  readonly name: string;
  /** Id of the context at the other end (null until known). */
  remoteId: number | null = null;
  /** Ids that messages arriving here were sent to (Mitogen's egress_ids): told of by DEL_ROUTE when lost. */
  readonly talkedTo: Set<number> = new Set();
  maxMessageSize: number;
  onMessage: (msg: Message) => void = () => {};
  onClose: (error?: Error) => void = () => {};
  /** True for a frame this end only passes on (the router sets it): a large one then keeps its chunks. */
  relays: (dst: number) => boolean = () => false;
  /** Bytes of frames written to and read from this link (headers included). */
  readonly counts: LinkCounts = { bytesIn: 0, bytesOut: 0 };
  readonly #transport: Transport;
  #chunks: Uint8Array[] = [];
  #buffered = 0;
  #header: { fields: MessageFields; length: number } | null = null;
  /** A large frame's data, filled in place as its chunks arrive. */
  #frame: Uint8Array | null = null;
  #filled = 0;
  #markers: { marker: Uint8Array; line: boolean; resolve: (rest: string) => void; reject: (e: Error) => void; skip?: ((text: string) => void) | undefined }[] =
    [];
  #closed = false;
  #closeReason: Error | undefined;

  constructor(name: string, transport: Transport, maxMessageSize = DEFAULT_MAX_MESSAGE_SIZE) {
    this.name = name;
    this.#transport = transport;
    this.maxMessageSize = maxMessageSize;
  }

  /** Start reading. */
  start(): void {
    this.#transport.start(
      (chunk) => this.#receive(chunk),
      (err) => this.#end(err),
    );
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Resolve once exactly `marker` arrives next on the stream. A marker that
   * ends in a space starts a line: the promise resolves with the rest of it
   * (printable ASCII, at most 100 bytes, without the newline). With `skip`,
   * bytes before the marker are handed to it instead of being an error (a
   * terminal's prompts and echoes, ahead of the first stage).
   */
  expectMarker(marker: string, skip?: (text: string) => void): Promise<string> {
    return new Promise((resolve, reject) => {
      if (this.#closed) return reject(this.#closeReason ?? new StreamError(`${this.name}: stream closed`));
      this.#markers.push({ marker: ascii.encode(marker), line: marker.endsWith(" "), resolve, reject, skip });
      this.#parse();
    });
  }

  /** Hand `skip` whatever precedes `marker` in the buffer; true once the marker is next. */
  #skipTo(marker: Uint8Array, skip: (text: string) => void): boolean {
    const head = this.#take(this.#buffered);
    let at = -1;
    for (let i = 0; i + marker.byteLength <= head.byteLength && at < 0; i++) {
      if (marker.every((b, k) => head[i + k] === b)) at = i;
    }
    // Without the marker, keep only a tail that is the marker's beginning.
    let cut = at;
    if (at < 0) {
      cut = head.byteLength;
      for (let k = Math.min(marker.byteLength - 1, head.byteLength); k > 0 && cut === head.byteLength; k--) {
        if (marker.subarray(0, k).every((b, i) => head[head.byteLength - k + i] === b)) cut = head.byteLength - k;
      }
    }
    if (cut) skip(new TextDecoder().decode(head.subarray(0, cut)));
    const rest = head.subarray(cut);
    if (rest.byteLength) {
      this.#chunks.unshift(rest);
      this.#buffered += rest.byteLength;
    }
    return at >= 0;
  }

  /** Write raw bytes (bootstrap only). */
  writeRaw(bytes: Uint8Array): void {
    this.#transport.write([bytes]);
  }

  /** Write one message. */
  send(msg: Message): void {
    if (this.#closed) return;
    this.counts.bytesOut += FRAME.HEADER_SIZE + msg.length;
    if (msg.length > SMALL_FRAME) {
      this.#transport.write([writeHeader(msg), ...msg.parts]);
      return;
    }
    // One buffer, one write: a vectored write costs more than the copy for small frames.
    const frame = new Uint8Array(FRAME.HEADER_SIZE + msg.length);
    writeHeader(msg, frame);
    let off = FRAME.HEADER_SIZE;
    for (const p of msg.parts) {
      frame.set(p, off);
      off += p.byteLength;
    }
    this.#transport.write([frame]);
  }

  /** Wait until queued writes reach the OS. */
  flush(): Promise<void> {
    return this.#transport.flush();
  }

  /** Close the stream; `onClose` fires once. */
  close(error?: Error): void {
    if (this.#closed) return;
    this.#transport.close();
    this.#end(error);
  }

  #end(error?: Error): void {
    if (this.#closed) return;
    if (!error && (this.#buffered > 0 || this.#header)) {
      const want = this.#header ? this.#header.length : FRAME.HEADER_SIZE;
      error = new StreamError(`${this.name}: truncated frame (EOF with ${this.#frame ? this.#filled : this.#buffered} of ${want} bytes)`);
    }
    this.#closed = true;
    this.#closeReason = error;
    this.#chunks = [];
    this.#frame = null;
    const reason = error ?? new StreamError(`${this.name}: stream closed`);
    for (const m of this.#markers.splice(0)) m.reject(reason);
    this.onClose(error);
  }

  #receive(chunk: Uint8Array): void {
    if (this.#closed || chunk.byteLength === 0) return;
    this.counts.bytesIn += chunk.byteLength;
    const frame = this.#frame;
    if (frame) {
      const k = Math.min(frame.byteLength - this.#filled, chunk.byteLength);
      frame.set(k === chunk.byteLength ? chunk : chunk.subarray(0, k), this.#filled);
      this.#filled += k;
      if (k < chunk.byteLength) {
        this.#chunks.push(chunk.subarray(k));
        this.#buffered += chunk.byteLength - k;
      }
      if (this.#filled < frame.byteLength) return;
    } else {
      this.#chunks.push(chunk);
      this.#buffered += chunk.byteLength;
    }
    this.#parse();
  }

  /** Remove and return the first `n` buffered bytes (a view when they lie in one chunk). */
  #take(n: number): Uint8Array {
    const first = this.#chunks[0];
    if (first && first.byteLength >= n) {
      if (first.byteLength === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
      this.#buffered -= n;
      return first.subarray(0, n);
    }
    const out = new Uint8Array(n);
    let off = 0;
    while (off < n) {
      const c = this.#chunks[0] as Uint8Array;
      const k = Math.min(c.byteLength, n - off);
      out.set(c.subarray(0, k), off);
      off += k;
      if (k === c.byteLength) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(k);
    }
    this.#buffered -= n;
    return out;
  }

  /** Remove the first `n` buffered bytes, as views of the chunks they arrived in. */
  #takeParts(n: number): Uint8Array[] {
    const parts: Uint8Array[] = [];
    while (n > 0) {
      const c = this.#chunks[0] as Uint8Array;
      const k = Math.min(c.byteLength, n);
      parts.push(k === c.byteLength ? c : c.subarray(0, k));
      if (k === c.byteLength) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(k);
      this.#buffered -= k;
      n -= k;
    }
    return parts;
  }

  #parse(): void {
    try {
      while (!this.#closed) {
        const m = this.#markers[0];
        if (m) {
          if (m.skip && this.#buffered && !this.#skipTo(m.marker, m.skip)) return;
          const size = m.marker.byteLength;
          if (this.#buffered < size) return;
          const got = this.#take(Math.min(this.#buffered, m.line ? size + MARKER_LINE_MAX + 1 : size));
          const bad = (why = "") => {
            const text = new TextDecoder().decode(got.subarray(0, size + MARKER_LINE_MAX)).replace(/[^\x20-\x7e]/g, "?");
            return new StreamError(`${this.name}: expected bootstrap marker${why}, got ${JSON.stringify(text)}`);
          };
          if (!m.marker.every((b, i) => b === got[i])) throw bad();
          // A line's rest: printable ASCII up to the newline.
          let end = size;
          if (m.line) {
            end = got.indexOf(10, size);
            for (let i = size; i < (end < 0 ? got.byteLength : end); i++) if ((got[i] as number) < 0x20 || (got[i] as number) > 0x7e) throw bad(" line");
            if (end < 0) {
              if (got.byteLength > size + MARKER_LINE_MAX) throw bad(" line");
              this.#chunks.unshift(got);
              this.#buffered += got.byteLength;
              return;
            }
          }
          const rest = got.subarray(m.line ? end + 1 : size);
          if (rest.byteLength) {
            this.#chunks.unshift(rest);
            this.#buffered += rest.byteLength;
          }
          this.#markers.shift();
          m.resolve(new TextDecoder().decode(got.subarray(size, end)));
          continue;
        }
        if (!this.#header) {
          if (this.#buffered < FRAME.HEADER_SIZE) return;
          this.#header = readHeader(this.#take(FRAME.HEADER_SIZE), this.maxMessageSize);
        }
        const { fields, length } = this.#header;
        let parts: Uint8Array[];
        if (this.#frame) {
          if (this.#filled < length) return;
          parts = [this.#frame];
          this.#frame = null;
        } else if (length > SMALL_FRAME && this.relays(fields.dst ?? 0)) {
          // A large frame this end only passes on keeps the chunks it arrived in: never joined here.
          if (this.#buffered < length) return;
          parts = this.#takeParts(length);
        } else if (this.#buffered < length) {
          // A large frame for this context is gathered in place as it arrives: its chunks are let go
          // at once, and it is never joined again. The length was checked against maxMessageSize;
          // the buffer's pages are committed only as bytes arrive.
          if (length > SMALL_FRAME) {
            this.#filled = this.#buffered;
            this.#frame = this.#buffered ? joinParts(this.#chunks, this.#buffered, length) : new Uint8Array(length);
            this.#chunks = [];
            this.#buffered = 0;
          }
          return;
        } else parts = [length ? this.#take(length) : EMPTY];
        this.#header = null;
        this.onMessage(new Message(fields, parts, length));
      }
    } catch (err) {
      const e = err instanceof StreamError ? err : new StreamError(`${this.name}: ${(err as Error).message}`, { cause: err });
      this.close(e);
    }
  }
}
