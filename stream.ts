/**
 * Stream: frames over a byte Transport, with the bootstrap markers in front
 * (writing in batches, reading frames out of the chunks they arrive in,
 * backpressure between links). Part of the child payload.
 *
 * @module
 */
import { StreamError } from "./errors.ts";
import { allocBytes, allocFilled, get32, joinParts, view } from "./bytes.ts";
import { Chunks } from "./chunks.ts";
import { nextTurn } from "./runtime.ts";
import type { Transport } from "./transport.ts";
import { DEFAULT_MAX_MESSAGE_SIZE, FRAME, Message, writeHeader } from "./frames.ts";

const NO_PARTS: readonly Uint8Array[] = [];
// Microtasks through a resolved promise: Node wraps each queueMicrotask() callback in an AsyncResource.
const resolved = Promise.resolve();
/** Longest rest of a marker line (see {@link Stream.expectMarker}). */
const MARKER_LINE_MAX = 100;
const ascii = new TextEncoder();

// ---------------------------------------------------------------------------
// Reading headers (the layout is documented beside writeHeader in frames.ts)

/** The data length of the header at `h[at]`, once magic, version and length are checked. Throws StreamError. */
function checkHeader(h: Uint8Array, at: number, maxMessageSize: number): number {
  const magic = ((h[at] as number) << 8) | (h[at + 1] as number);
  if (magic !== FRAME.MAGIC) throw new StreamError(`bad frame magic 0x${magic.toString(16)} (stream out of sync or not mitogen)`);
  const version = h[at + 2] as number;
  if (version !== FRAME.VERSION) throw new StreamError(`unsupported frame version ${version}`);
  const length = get32(h, at + 24);
  if (length > maxMessageSize) throw new StreamError(`frame of ${length} bytes exceeds maxMessageSize ${maxMessageSize}`);
  return length;
}

/** A Message with the fields of the header at `h[at]` and no data yet. */
function headerAt(h: Uint8Array, at: number): Message {
  const m = new Message();
  m.flags = h[at + 3] as number;
  m.dst = get32(h, at + 4);
  m.src = get32(h, at + 8);
  m.auth = get32(h, at + 12);
  m.handle = get32(h, at + 16);
  m.replyTo = get32(h, at + 20);
  return m;
}

/** Does `wire` (a frame as read) still hold `msg`'s header? A relayed frame is passed on as it came. */
function sameHeader(msg: Message, wire: Uint8Array): boolean {
  return (
    wire.byteLength === FRAME.HEADER_SIZE + msg.length &&
    wire[3] === msg.flags &&
    get32(wire, 4) === msg.dst &&
    get32(wire, 8) === msg.src &&
    get32(wire, 12) === msg.auth &&
    get32(wire, 16) === msg.handle &&
    get32(wire, 20) === msg.replyTo
  );
}

// ---------------------------------------------------------------------------
// Stream: frames over a Transport

/** What crossed one link, as {@link Stream.counts} and `router.stats.links` report it. */
export interface LinkCounts {
  bytesIn: number;
  bytesOut: number;
  /** Frames (messages) each way. */
  framesIn: number;
  framesOut: number;
}

/** A bootstrap marker a Stream waits for (see {@link Stream.expectMarker}). */
type Marker = { marker: Uint8Array; line: boolean; resolve: (rest: string) => void; reject: (e: Error) => void; skip?: ((text: string) => void) | undefined };

/** Frames up to this size are copied into the write batch; larger ones are written from their parts. */
const SMALL_FRAME = 64 * 1024;
/** Bytes queued for writing beyond which a link is congested (see {@link Stream.congested}). */
const HIGH_WATER = 4 * 1024 * 1024;
/** What a link hands on per turn of the event loop before the other links get theirs: each frame costs 512 plus a sixteenth of its length. */
const TURN = 1024 * 1024;

/**
 * Frames over a byte Transport, with the bootstrap markers in front.
 *
 * Writing: the first small frame of a tick is written at once; the small
 * frames sent after it in the same tick are copied back to back into one
 * batch, written at the end of the tick (a microtask), so a burst of calls
 * costs two writes. A large frame, a raw write, `flush()` and `close()` write
 * the batch first: bytes leave in the order they were sent.
 *
 * Reading: complete frames are cut from the chunk they arrived in, their data
 * a view of it. A large frame for this context is gathered in place as it
 * arrives; one this end only relays keeps the chunks it arrived in.
 *
 * Backpressure and fairness: reading stops while a link this one's frames
 * went to is {@link Stream.congested} ({@link Stream.waitFor}), and for a turn
 * of the event loop once it has used up its {@link TURN}, so that one busy
 * link cannot starve the others.
 */
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
  readonly counts: LinkCounts = { bytesIn: 0, bytesOut: 0, framesIn: 0, framesOut: 0 };
  readonly #transport: Transport;
  /** Unread input. */
  readonly #in = new Chunks();
  /** The message whose header was read, waiting for its data. */
  #header: Message | null = null;
  #length = 0;
  /** A large frame's data, filled in place as its chunks arrive. */
  #frame: Uint8Array | null = null;
  #filled = 0;
  #markers: Marker[] = [];
  /** Small frames sent after the first one this tick, written together at its end. */
  #batch: Uint8Array[] = [];
  #batchBytes = 0;
  /** True from the first small frame of a tick to the microtask at its end. */
  #tickOpen = false;
  readonly #endTick = (): void => {
    this.#tickOpen = false;
    this.#writeBatch();
  };
  #closed = false;
  #closeReason: Error | undefined;
  /** What stops reading: each link waited for, and a turn used up. */
  #holds = 0;
  /** Bytes of frames still to hand on in this turn. */
  #budget = TURN;
  /** Waiting for this link to drain (see {@link Stream.onDrain}); null when nobody is. */
  #drainWaiters: (() => void)[] | null = null;
  readonly #release = (): void => {
    if (--this.#holds === 0) nextTurn(this.#readOn);
  };
  readonly #readOn = (): void => {
    if (this.#holds || this.#closed) return;
    this.#budget = TURN;
    this.#transport.resume?.();
    this.#parse();
  };

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
    const head = this.#in.take(this.#in.size);
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
    this.#in.unshift(head.subarray(cut));
    return at >= 0;
  }

  /** Write raw bytes (bootstrap only). */
  writeRaw(bytes: Uint8Array): void {
    this.#writeBatch();
    this.#transport.write([bytes]);
  }

  /** Write one message. */
  send(msg: Message): void {
    if (this.#closed) return;
    const size = FRAME.HEADER_SIZE + msg.length;
    this.counts.bytesOut += size;
    this.counts.framesOut++;
    if (msg.length > SMALL_FRAME) {
      this.#writeBatch();
      this.#transport.write([writeHeader(msg), ...msg.parts]);
      return;
    }
    let frame = msg._wire;
    const framed = msg._framed;
    if (frame && sameHeader(msg, frame)) {
      // relayed as it arrived
    } else if (framed && framed.byteLength === size) {
      // Once only: a second send of the same message (other fields, maybe) must not rewrite a header still queued.
      msg._framed = null;
      frame = writeHeader(msg, framed);
    } else {
      frame = allocBytes(size);
      writeHeader(msg, frame);
      let off = FRAME.HEADER_SIZE;
      for (const p of msg.parts) {
        frame.set(p, off);
        off += p.byteLength;
      }
    }
    if (!this.#tickOpen) {
      // The first frame of a tick goes at once (the peer starts on it while this end finishes its tick);
      // the ones after it wait for the end of the tick and go together.
      this.#tickOpen = true;
      void resolved.then(this.#endTick);
      this.#transport.write([frame]);
      return;
    }
    this.#batch.push(frame);
    this.#batchBytes += size;
    if (this.#batchBytes > SMALL_FRAME) this.#writeBatch();
  }

  /** True while more than {@link HIGH_WATER} bytes wait to be written on this link. */
  get congested(): boolean {
    return !this.#closed && (this.#transport.queued?.() ?? 0) > HIGH_WATER;
  }

  /** Call `fn` once this link is not {@link Stream.congested} (at once if it is not), or has closed. */
  onDrain(fn: () => void): void {
    if (!this.congested) fn();
    else if (this.#drainWaiters) this.#drainWaiters.push(fn);
    else {
      this.#drainWaiters = [fn];
      this.#transport.onDrain?.(this.#drained);
    }
  }

  readonly #drained = (): void => {
    const waiting = this.#drainWaiters ?? [];
    this.#drainWaiters = null;
    for (const fn of waiting) this.onDrain(fn);
  };

  /** Stop reading this link until `out`, which its frames went to, is not congested: the sender's writes wait instead. */
  waitFor(out: Stream): void {
    this.#hold();
    out.onDrain(this.#release);
  }

  #hold(): void {
    if (this.#holds++ === 0) this.#transport.pause?.();
  }

  /** Write the frames batched so far. */
  #writeBatch(): void {
    const batch = this.#batch;
    if (batch.length === 0) return;
    this.#batch = [];
    const size = this.#batchBytes;
    this.#batchBytes = 0;
    this.#transport.write(batch.length === 1 ? batch : [joinParts(batch, size, size, allocBytes(size))]);
  }

  /** Wait until queued writes reach the OS. */
  flush(): Promise<void> {
    this.#writeBatch();
    return this.#transport.flush();
  }

  /** Close the stream; `onClose` fires once. */
  close(error?: Error): void {
    if (this.#closed) return;
    this.#writeBatch();
    this.#transport.close();
    this.#end(error);
  }

  #end(error?: Error): void {
    if (this.#closed) return;
    if (!error && (this.#in.size > 0 || this.#header)) {
      const want = this.#header ? this.#length : FRAME.HEADER_SIZE;
      error = new StreamError(`${this.name}: truncated frame (EOF with ${this.#frame ? this.#filled : this.#in.size} of ${want} bytes)`);
    }
    this.#closed = true;
    this.#closeReason = error;
    this.#in.takeAll();
    this.#frame = null;
    this.#batch = [];
    this.#drained();
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
        this.#in.push(chunk.subarray(k));
      }
      if (this.#filled < frame.byteLength) return;
    } else {
      this.#in.push(chunk);
    }
    this.#parse();
  }

  /** Handle the bootstrap marker `m` if it is complete; false when more bytes are needed. */
  #parseMarker(m: Marker): boolean {
    if (m.skip && this.#in.size && !this.#skipTo(m.marker, m.skip)) return false;
    const size = m.marker.byteLength;
    if (this.#in.size < size) return false;
    const got = this.#in.take(Math.min(this.#in.size, m.line ? size + MARKER_LINE_MAX + 1 : size));
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
        this.#in.unshift(got);
        return false;
      }
    }
    this.#in.unshift(got.subarray(m.line ? end + 1 : size));
    this.#markers.shift();
    m.resolve(new TextDecoder().decode(got.subarray(size, end)));
    return true;
  }

  #parse(): void {
    try {
      while (!this.#closed) {
        const m = this.#markers[0];
        if (m) {
          if (!this.#parseMarker(m)) return;
          continue;
        }
        if (this.#holds) return;
        if (this.#budget <= 0) {
          // This link's turn is over: the others read, then it goes on.
          this.#hold();
          nextTurn(this.#release);
          return;
        }
        let msg = this.#header;
        if (!msg) {
          if (this.#in.size < FRAME.HEADER_SIZE) return;
          // Fast path: a whole frame in the first chunk is cut from it in place.
          const c = this.#in.first as Uint8Array;
          const at = this.#in.head;
          let length: number;
          if (c.byteLength - at >= FRAME.HEADER_SIZE) {
            length = checkHeader(c, at, this.maxMessageSize);
            msg = headerAt(c, at);
            const end = at + FRAME.HEADER_SIZE + length;
            if (end <= c.byteLength && (length <= SMALL_FRAME || !this.relays(msg.dst))) {
              msg._setData(length ? [view(c, at + FRAME.HEADER_SIZE, end)] : NO_PARTS, length);
              if (this.relays(msg.dst)) msg._wire = view(c, at, end);
              this.#in.skip(end - at);
              this.#budget -= 512 + (length >> 4);
              this.counts.framesIn++;
              this.onMessage(msg);
              continue;
            }
            this.#in.skip(FRAME.HEADER_SIZE);
          } else {
            const h = this.#in.take(FRAME.HEADER_SIZE);
            length = checkHeader(h, 0, this.maxMessageSize);
            msg = headerAt(h, 0);
          }
          this.#header = msg;
          this.#length = length;
        }
        const length = this.#length;
        let parts: readonly Uint8Array[];
        if (this.#frame) {
          if (this.#filled < length) return;
          parts = [this.#frame];
          this.#frame = null;
        } else if (length > SMALL_FRAME && this.relays(msg.dst)) {
          // A large frame this end only passes on keeps the chunks it arrived in: never joined here.
          if (this.#in.size < length) return;
          parts = this.#in.takeParts(length);
        } else if (this.#in.size < length) {
          // A large frame for this context is gathered in place as it arrives: its chunks are let go
          // at once, and it is never joined again. The length was checked against maxMessageSize;
          // the buffer's pages are committed only as bytes arrive.
          if (length > SMALL_FRAME) {
            this.#filled = this.#in.size;
            // Not zeroed first: it is filled to its last byte before it is read (see allocFilled).
            this.#frame = joinParts(this.#in.takeAll(), this.#filled, length, allocFilled(length));
          }
          return;
        } else parts = length ? [this.#in.take(length)] : NO_PARTS;
        this.#header = null;
        msg._setData(parts, length);
        this.#budget -= 512 + (length >> 4);
        this.counts.framesIn++;
        this.onMessage(msg);
      }
    } catch (err) {
      const e = err instanceof StreamError ? err : new StreamError(`${this.name}: ${(err as Error).message}`, { cause: err });
      this.close(e);
    }
  }
}
