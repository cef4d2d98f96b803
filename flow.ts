/**
 * Flow control: one credit window per channel. A channel is a receiver
 * handle in some context, as seen by one sending context; part of the child
 * payload.
 *
 * A Sender's messages carry `FRAME.FLAG_FLOW`. The sending router counts
 * their bytes against the channel's window: while fewer than
 * {@link FLOW.WINDOW} bytes are outstanding, a message goes out at once;
 * after that, messages are held back here, in order, until credit returns.
 * Each window has a reply handle of its own in the sending context (its
 * messages' `reply_to`), whose respondent is the receiving context. The
 * Receiver counts what it hands to its consumer (`get()`, iteration,
 * Select), not what arrives, and grants those bytes back by replying to that
 * handle with the byte count once it has {@link FLOW.GRANT} bytes to grant,
 * or with {@link FLOW.CLOSED} when it closes. A dead reply (no route, no
 * handler, the receiving context gone) closes the window with its reason.
 * Hops in between forward frames unchanged: the window bounds what is in
 * flight end to end, so it also bounds what any hop holds for the channel.
 *
 * At most `WINDOW - 1 + maxMessageSize` bytes of one channel are ever
 * unconsumed; a Receiver that finds more from one context (a peer that
 * ignores its window) closes with a ChannelError naming it.
 *
 * @module
 */
import { ChannelError, MitogenError } from "./errors.ts";
import { FRAME, Message } from "./frames.ts";

/** What flow control needs of a router (the Router is one). */
export interface FlowHost {
  readonly maxMessageSize: number;
  route(msg: Message): void;
  addHandler(fn: (msg: Message) => void, options: { handle?: number; persist?: boolean; respondent?: { readonly contextId: number } | null }): number;
  delHandler(handle: number): void;
  contextById(id: number): { readonly contextId: number; readonly name: string };
}

/** Window sizes, in bytes. */
export const FLOW = {
  /** What a sender may have outstanding (sent, not yet consumed) on one channel before it holds back. */
  WINDOW: 16 * 1024 * 1024,
  /** A receiver grants consumed bytes back once it has this many to grant. */
  GRANT: 4 * 1024 * 1024,
  /** Credit of this value means: the receiver closed; stop sending. */
  CLOSED: -1,
} as const;

const READY: Promise<void> = Promise.resolve();
/** Closed channels remembered per sending context, for the ChannelError of their next send. */
const CLOSED_KEPT = 1000;

/** One channel's state in the sending router. */
interface Window {
  /** Handle that takes the receiver's credit (every message's `reply_to`). */
  handle: number;
  /** Bytes sent and not yet granted back. */
  used: number;
  /** Messages waiting for room, in order (a Sender's close too, uncounted). */
  held: Message[];
  /** `send()`/`ready()` promises waiting for room. */
  wake: (() => void)[];
}

/** The sending half: windows of the channels this router sends on. */
export class FlowControl {
  readonly #router: FlowHost;
  readonly #windows = new Map<string, Window>();
  /** Why recently closed channels closed, so their next send says so (the newest {@link CLOSED_KEPT}). */
  readonly #closed = new Map<string, ChannelError>();

  constructor(router: FlowHost) {
    this.#router = router;
  }

  /**
   * Send a Sender's message to `(dst, msg.handle)` within the channel's
   * window. Resolves once the window has room again (at once, mostly); never
   * rejects. Throws ChannelError when the channel is closed.
   */
  send(dst: number, msg: Message): Promise<void> {
    const key = `${dst}:${msg.handle}`;
    const closed = this.#closed.get(key);
    if (closed) throw closed;
    let w = this.#windows.get(key);
    const max = this.#router.maxMessageSize;
    if (msg.length > max) throw new MitogenError(`message of ${msg.length} bytes exceeds maxMessageSize ${max} (${msg})`);
    if (!w) w = this.#open(key, dst);
    msg.dst = dst;
    msg.flags |= FRAME.FLAG_FLOW;
    msg.replyTo = w.handle;
    if (w.held.length || w.used >= FLOW.WINDOW) w.held.push(msg);
    else this.#out(w, msg);
    return this.#room(w);
  }

  /** Resolves once `(dst, handle)` has room; rejects with ChannelError once it is closed. */
  async ready(dst: number, handle: number): Promise<void> {
    const key = `${dst}:${handle}`;
    const w = this.#windows.get(key);
    if (w) await this.#room(w);
    const closed = this.#closed.get(key);
    if (closed) throw closed;
  }

  /** Send a Sender's close after whatever it still holds back; the window is then forgotten. */
  close(dst: number, msg: Message): void {
    msg.dst = dst;
    const w = this.#windows.get(`${dst}:${msg.handle}`);
    if (w?.held.length) {
      w.held.push(msg);
      return;
    }
    if (w) this.#drop(w, `${dst}:${msg.handle}`);
    this.#router.route(msg);
  }

  /** The window of every channel, in bytes ({@link FLOW.WINDOW}). */
  readonly window: number = FLOW.WINDOW;

  /** Bytes outstanding and messages held back, over every open channel, and how many are open (for tests and stats). */
  get pending(): { bytes: number; held: number; channels: number } {
    let bytes = 0;
    let held = 0;
    for (const w of this.#windows.values()) {
      bytes += w.used;
      held += w.held.length;
    }
    return { bytes, held, channels: this.#windows.size };
  }

  #open(key: string, dst: number): Window {
    const w: Window = { handle: 0, used: 0, held: [], wake: [] };
    w.handle = this.#router.addHandler((m) => this.#onCredit(key, dst, w, m), { respondent: this.#router.contextById(dst) });
    this.#windows.set(key, w);
    return w;
  }

  /** A reply to a window's handle: credit, the receiver's close, or a dead message. */
  #onCredit(key: string, dst: number, w: Window, msg: Message): void {
    // Credit counts only from the receiving context; a dead reply also from a hop that lost the route.
    if (!msg.isDead && msg.src !== dst) return;
    const bytes = msg.unpickle({ throwDead: false });
    if (msg.isDead || bytes === FLOW.CLOSED) {
      this.#close(key, w, msg.isDead ? bytes : "the receiver closed");
      return;
    }
    if (typeof bytes !== "number") return;
    w.used = Math.max(0, w.used - bytes);
    while (w.used < FLOW.WINDOW && w.held.length) {
      const next = w.held.shift() as Message;
      if (next.flags & FRAME.FLAG_FLOW) this.#out(w, next);
      else {
        // A held close: the channel is over.
        this.#drop(w, key);
        this.#router.route(next);
        return;
      }
    }
    if (w.used < FLOW.WINDOW && !w.held.length) {
      this.#wake(w);
      if (w.used === 0) this.#drop(w, key);
    }
  }

  #close(key: string, w: Window, reason: unknown): void {
    const [dst, handle] = key.split(":");
    const why = typeof reason === "string" ? reason : "channel closed";
    w.held = [];
    this.#closed.set(key, new ChannelError(`channel to handle ${handle} in ${this.#router.contextById(Number(dst)).name}: ${why}`));
    if (this.#closed.size > CLOSED_KEPT) this.#closed.delete(this.#closed.keys().next().value as string);
    this.#drop(w, key);
  }

  /** Forget a window (an open channel is one in the map): its handle goes, its waiters wake. */
  #drop(w: Window, key: string): void {
    if (this.#windows.get(key) === w) this.#windows.delete(key);
    this.#router.delHandler(w.handle);
    this.#wake(w);
  }

  #out(w: Window, msg: Message): void {
    w.used += msg.length;
    try {
      this.#router.route(msg);
    } catch (err) {
      w.used -= msg.length;
      throw err;
    }
  }

  #room(w: Window): Promise<void> {
    if (!w.held.length && w.used < FLOW.WINDOW) return READY;
    return new Promise((resolve) => w.wake.push(resolve));
  }

  #wake(w: Window): void {
    for (const resolve of w.wake.splice(0)) resolve();
  }
}

/** The receiving half, one per Receiver that got flow-controlled messages. */
export class Credits {
  readonly #router: FlowHost;
  readonly #handle: number;
  /** Per sending context: bytes delivered and not yet consumed (bounds a peer that ignores its window). */
  readonly #unread = new Map<number, number>();
  /** Per window (`<src>:<reply_to>`): bytes delivered and not consumed, and consumed and not granted back. */
  readonly #windows = new Map<string, { unread: number; due: number }>();

  constructor(router: FlowHost, handle: number) {
    this.#router = router;
    this.#handle = handle;
  }

  /** A flow message arrived; an Error if its sender is past any window it could have had. */
  arrived(msg: Message): ChannelError | null {
    const n = (this.#unread.get(msg.src) ?? 0) + msg.length;
    this.#unread.set(msg.src, n);
    const key = `${msg.src}:${msg.replyTo}`;
    const w = this.#windows.get(key);
    if (w) w.unread += msg.length;
    else this.#windows.set(key, { unread: msg.length, due: 0 });
    if (n < FLOW.WINDOW + this.#router.maxMessageSize) return null;
    const who = this.#router.contextById(msg.src).name;
    return new ChannelError(`receiver ${this.#handle}: ${who} sent ${n} unconsumed bytes, more than its flow-control window allows`);
  }

  /** The consumer took `msg`: grant its bytes back once enough have gathered. */
  taken(msg: Message): void {
    const left = (this.#unread.get(msg.src) ?? 0) - msg.length;
    if (left > 0) this.#unread.set(msg.src, left);
    else this.#unread.delete(msg.src);
    const key = `${msg.src}:${msg.replyTo}`;
    const w = this.#windows.get(key);
    if (!w) return;
    w.unread -= msg.length;
    w.due += msg.length;
    if (w.due < FLOW.GRANT) return;
    this.#grant(key, w.due);
    w.due = 0;
    // All granted: the sender forgets this window, and so do we.
    if (w.unread <= 0) this.#windows.delete(key);
  }

  /** The receiver closed: tell every window that sent to it. */
  closed(): void {
    for (const key of this.#windows.keys()) this.#grant(key, FLOW.CLOSED);
    this.#unread.clear();
    this.#windows.clear();
  }

  #grant(key: string, bytes: number): void {
    const [src, handle] = key.split(":").map(Number) as [number, number];
    if (!handle) return;
    try {
      this.#router.route(Message.encoded(bytes, { dst: src, handle }));
    } catch {
      // nowhere to send it: the sender is gone, and its window with it
    }
  }
}
