/**
 * Channels and waiting: Receiver, Sender, Channel, Latch and Select. Part of
 * the child payload.
 *
 * @module
 */
import { ChannelError, MitogenError, TimeoutError } from "./errors.ts";
import { WIRE_REF, type WireRef } from "./codec.ts";
import { FRAME, Message } from "./frames.ts";
import { Credits } from "./flow.ts";
import { asyncDispose } from "./runtime.ts";
import type { Context, Router } from "./core.ts";

// ---------------------------------------------------------------------------
// Receiver, Sender, Channel, Latch, Select

/** Options of `get()`. */
export interface GetOptions {
  /** Milliseconds to wait before rejecting with TimeoutError. */
  timeout?: number;
}

/** Options of the Receiver constructor. */
export interface ReceiverOptions {
  handle?: number;
  persist?: boolean;
  respondent?: Context | null;
}

type Waiter<T> = { resolve: (v: T) => void; reject: (e: Error) => void; timer: ReturnType<typeof setTimeout> | undefined };

/** A queue with blocking `get`, the shared core of Receiver, Latch and Select. */
class Queue<T> {
  items: T[] = [];
  waiters: Waiter<T>[] = [];
  /** Set by end() and close(): get() rejects with it once `items` is empty. */
  closed: Error | null = null;

  put(item: T): void {
    const w = this.waiters.shift();
    if (w) {
      if (w.timer) clearTimeout(w.timer);
      w.resolve(item);
    } else this.items.push(item);
  }

  get(options: GetOptions, what: string): Promise<T> {
    if (this.items.length) return Promise.resolve(this.items.shift() as T);
    if (this.closed) return Promise.reject(this.closed);
    return new Promise((resolve, reject) => {
      const w: Waiter<T> = { resolve, reject, timer: undefined };
      if (options.timeout !== undefined) {
        w.timer = setTimeout(() => {
          this.waiters.splice(this.waiters.indexOf(w), 1);
          reject(new TimeoutError(`${what}: nothing arrived within ${options.timeout} ms`));
        }, options.timeout);
      }
      this.waiters.push(w);
    });
  }

  /** Items queued; throws the close error once closed and drained (Mitogen's Latch.size()). */
  size(): number {
    if (this.closed && this.items.length === 0) throw this.closed;
    return this.items.length;
  }

  /** Queue `last` behind the items already queued; once it is taken, get() rejects with `error`. */
  end(last: T, error: Error): void {
    if (this.closed) return;
    this.put(last);
    this.#reject(error);
  }

  /** Drop the items queued: get() rejects with `error` from now on. */
  close(error: Error): void {
    this.items.length = 0;
    if (!this.closed) this.#reject(error);
  }

  #reject(error: Error): void {
    this.closed = error;
    for (const w of this.waiters.splice(0)) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(error);
    }
  }
}

/**
 * Something Select can wait on: a Receiver, Latch or Select. It calls
 * `notify(this)` once per item it takes in (and when it closes).
 */
export interface Selectable {
  notify: ((source: Selectable) => void) | null;
  /** Items buffered now; throws once closed with nothing left. */
  size(): number;
  /** @internal Take an item now: the event, or undefined when empty. Throws when closed. */
  _poll(): SelectEvent | undefined;
}

/**
 * Receives messages sent to a handle in this context. Async-iterable: the
 * loop yields each Message and ends when the sender closes the channel.
 * Messages sent before a dead message (`Sender.close()`, the respondent
 * lost) are still delivered in order; `close()` drops what is queued, and
 * `get()` rejects with ChannelError from then on (Mitogen's semantics).
 *
 * @example
 * ```ts
 * import { Receiver, Router } from "./mod.ts";
 * await using router = new Router();
 * const ctx = await router.local();
 * await using recv = new Receiver(router);
 * await ctx.call((s) => { for (let i = 0; i < 3; i++) s.send(i); s.close(); }, recv.toSender());
 * for await (const msg of recv) console.log(msg.unpickle());
 * ```
 */
export class Receiver implements AsyncIterable<Message>, AsyncDisposable, Selectable {
  readonly router: Router;
  readonly handle: number;
  readonly respondent: Context | null;
  /** Called as `notify(receiver)` on every delivered message, and once when it closes (Select uses it). */
  notify: ((source: Selectable) => void) | null = null;
  readonly #queue = new Queue<Message>();
  /** Flow-control accounting, made when the first flow-controlled message arrives. */
  #credits: Credits | null = null;

  constructor(router: Router, options: ReceiverOptions = {}) {
    this.router = router;
    this.respondent = options.respondent ?? null;
    this.handle = router.addHandler((msg) => this.#deliver(msg), {
      ...(options.handle === undefined ? {} : { handle: options.handle }),
      persist: options.persist ?? true,
      respondent: this.respondent,
    });
  }

  #settle: (() => void) | null = null;

  /** @internal Run `fn` once, when the first message arrives or the receiver closes. */
  _onSettle(fn: () => void): void {
    this.#settle = fn;
  }

  #settled(): void {
    const fn = this.#settle;
    this.#settle = null;
    fn?.();
  }

  /** @internal Stop receiving: what is queued is dropped, `get()` rejects with `error`, a Select is woken. */
  _fail(error: Error): void {
    this.router.delHandler(this.handle);
    const wasClosed = this.#queue.closed;
    this.#queue.close(error);
    this.#credits?.closed();
    this.#settled();
    if (!wasClosed) this.notify?.(this);
  }

  #deliver(msg: Message): void {
    this.#settled();
    msg.receiver = this;
    if (msg.flags & FRAME.FLAG_FLOW) {
      const overrun = (this.#credits ??= new Credits(this.router, this.handle)).arrived(msg);
      if (overrun) {
        this.router.log("warn", overrun.message);
        this._fail(overrun);
        return;
      }
    }
    if (msg.isDead) {
      this.router.delHandler(this.handle);
      this.#queue.end(msg, deadError(msg));
    } else this.#queue.put(msg);
    this.notify?.(this);
  }

  /**
   * Messages buffered now (a dead message counts, as in Mitogen). Throws
   * ChannelError once closed with nothing left to take.
   */
  size(): number {
    return this.#queue.size();
  }

  /** `size() === 0`. */
  empty(): boolean {
    return this.size() === 0;
  }

  /** Next message; rejects with ChannelError once closed, TimeoutError after `timeout` ms. */
  async get(options: GetOptions = {}): Promise<Message> {
    const msg = await this.#queue.get(options, `receiver ${this.handle}`);
    if (msg.isDead) throw deadError(msg);
    this.#took(msg);
    return msg;
  }

  /** Like get(), but the decoded data. */
  async getData(options: GetOptions = {}): Promise<unknown> {
    return (await this.get(options)).unpickle();
  }

  _poll(): SelectEvent | undefined {
    const msg = this.#queue.items.shift();
    if (msg === undefined) {
      if (this.#queue.closed) throw this.#queue.closed;
      return undefined;
    }
    if (msg.isDead) throw deadError(msg);
    this.#took(msg);
    return { source: this, data: msg };
  }

  /** The consumer has `msg`: its bytes go back to the sender's window. */
  #took(msg: Message): void {
    if (msg.flags & FRAME.FLAG_FLOW) this.#credits?.taken(msg);
  }

  /** A Sender that delivers to this receiver, for passing to other contexts. */
  toSender(): Sender {
    return new Sender(this.router.myself(), this.handle);
  }

  /** Stop receiving: queued messages are dropped; `get()` rejects with ChannelError. */
  close(): void {
    this._fail(new ChannelError(`receiver ${this.handle} closed`));
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Message> {
    for (;;) {
      let msg: Message;
      try {
        msg = await this.#queue.get({}, `receiver ${this.handle}`);
      } catch (err) {
        if (err instanceof ChannelError) return;
        throw err;
      }
      if (msg.isDead) return;
      this.#took(msg);
      yield msg;
    }
  }

  [asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}

function deadError(msg: Message): ChannelError {
  try {
    msg.unpickle();
  } catch (err) {
    if (err instanceof ChannelError) return err;
  }
  return new ChannelError("channel closed");
}

/**
 * Sends values to a handle in some context (the other end of a Receiver).
 * Serialisable: pass it as an argument to a remote function to stream values back.
 *
 * Flow-controlled (see flow.ts): `send()` writes at once while the channel's
 * window has room, and holds the message back, in order, once it has not.
 * Either way it returns a promise that resolves when the window has room
 * again: `await sender.send(x)` in a loop keeps every process on the way
 * within the window, however slow the receiver.
 *
 * @example
 * ```ts
 * import { Receiver, Router, type Sender } from "./mod.ts";
 * await using router = new Router();
 * const ctx = await router.local();
 * await using recv = new Receiver(router);
 * const streaming = ctx.call(async (s: Sender) => {
 *   for (let i = 0; i < 100; i++) await s.send(new Uint8Array(1 << 20)); // 100 MiB, 16 MiB at a time
 *   s.close();
 * }, recv.toSender());
 * let bytes = 0;
 * for await (const msg of recv) bytes += (msg.unpickle() as Uint8Array).byteLength;
 * await streaming;
 * console.log(bytes); // 104857600
 * ```
 */
export class Sender implements WireRef {
  readonly context: Context;
  readonly dstHandle: number;

  constructor(context: Context, dstHandle: number) {
    this.context = context;
    this.dstHandle = dstHandle;
  }

  /**
   * Send `data` to the remote end. Resolves once the channel's window has
   * room for more (never rejects); throws ChannelError if the receiver closed.
   */
  send(data: unknown): Promise<void> {
    return this.context.router.flow.send(this.context.contextId, Message.encoded(data, { handle: this.dstHandle }, "data"));
  }

  /** Mitogen's name for send(). */
  put(data: unknown): Promise<void> {
    return this.send(data);
  }

  /** Resolves once the window has room; rejects with ChannelError once the receiver closed or its context is gone. */
  async ready(): Promise<void> {
    const ctx = this.context;
    if (ctx.isDisconnected) throw new ChannelError(`context ${ctx.name} is gone`);
    await ctx.router.flow.ready(ctx.contextId, this.dstHandle);
    if (ctx.isDisconnected) throw new ChannelError(`context ${ctx.name} is gone`);
  }

  /** Tell the remote end no more is coming (its loop ends, its get() rejects), after anything still held back. */
  close(): void {
    this.context.router.flow.close(this.context.contextId, Message.dead("sender closed", { handle: this.dstHandle }));
  }

  [WIRE_REF](): readonly [number, readonly unknown[]] {
    return [6, [this.context.contextId, this.dstHandle]];
  }

  toString(): string {
    return `Sender(${this.context.contextId}, ${this.dstHandle})`;
  }
}

/**
 * A Receiver that is also a Sender: it receives on its own `handle` and
 * sends to `dstHandle` in `context` (Mitogen's Channel). Handles are only
 * known once both ends exist, so one end is made first and the other
 * re-pointed at it by setting `dstHandle`. Passed to a remote function it
 * travels as a Sender to `dstHandle`, as in Mitogen.
 *
 * @example
 * ```ts
 * import { Channel, Router } from "./mod.ts";
 * await using router = new Router();
 * const me = router.myself();
 * const left = new Channel(router, me, 0); // the other end's handle is not known yet
 * const right = new Channel(router, me, left.handle);
 * left.dstHandle = right.handle; // re-point
 * left.put("ping");
 * console.log((await right.get()).unpickle()); // ping
 * left.close(); // both directions
 * right.close();
 * ```
 */
export class Channel extends Receiver implements WireRef {
  #sender: Sender;
  constructor(router: Router, context: Context, dstHandle: number, handle?: number) {
    super(router, handle === undefined ? {} : { handle });
    this.#sender = new Sender(context, dstHandle);
  }
  /** The Sender that send() uses (a new one after re-pointing). */
  get sender(): Sender {
    return this.#sender;
  }
  /** The context sent to. */
  get context(): Context {
    return this.#sender.context;
  }
  set context(context: Context) {
    this.#sender = new Sender(context, this.#sender.dstHandle);
  }
  /** The handle sent to; set it to re-point this end at the other end's handle. */
  get dstHandle(): number {
    return this.#sender.dstHandle;
  }
  set dstHandle(handle: number) {
    this.#sender = new Sender(this.#sender.context, handle);
  }
  /** Send `data` to the other end (flow-controlled, as {@link Sender.send}). */
  send(data: unknown): Promise<void> {
    return this.#sender.send(data);
  }
  /** Mitogen's name for send(). */
  put(data: unknown): Promise<void> {
    return this.send(data);
  }
  /** Close both directions: the other end's get() rejects, and so does this one's. */
  override close(): void {
    this.#sender.close();
    super.close();
  }
  [WIRE_REF](): readonly [number, readonly unknown[]] {
    return this.#sender[WIRE_REF]();
  }
}

/**
 * A local queue other code can `put` into; Select can wait on it. As
 * Mitogen's Latch: `close()` drops what is queued, and `get()` and `put()`
 * throw ChannelError from then on.
 *
 * @example
 * ```ts
 * import { Latch } from "./mod.ts";
 * const latch = new Latch<number>();
 * setTimeout(() => latch.put(1), 10);
 * console.log(await latch.get({ timeout: 1000 }));
 * ```
 */
export class Latch<T = unknown> implements Selectable {
  notify: ((source: Selectable) => void) | null = null;
  readonly #queue = new Queue<T>();

  /** Add an item, waking one waiter; throws ChannelError once closed. */
  put(item: T): void {
    if (this.#queue.closed) throw new ChannelError("latch closed");
    this.#queue.put(item);
    this.notify?.(this);
  }
  /** Next item; rejects with ChannelError once closed, TimeoutError after `timeout` ms. */
  get(options: GetOptions = {}): Promise<T> {
    return this.#queue.get(options, "latch");
  }
  /** Items buffered now; throws ChannelError once closed. */
  size(): number {
    return this.#queue.size();
  }
  /** `size() === 0`. */
  empty(): boolean {
    return this.size() === 0;
  }
  _poll(): SelectEvent | undefined {
    if (this.#queue.items.length) return { source: this, data: this.#queue.items.shift() };
    if (this.#queue.closed) throw this.#queue.closed;
    return undefined;
  }
  /** Close: queued items are dropped, waiters (and a Select holding it) get ChannelError. */
  close(): void {
    if (this.#queue.closed) return;
    this.#queue.close(new ChannelError("latch closed"));
    this.notify?.(this);
  }
}

/** What Select yields: the Receiver or Latch the item came from (also through nested Selects), and the item. */
export interface SelectEvent {
  source: Selectable;
  data: unknown;
}

/**
 * Waits on several receivers, latches or other Selects at once (Mitogen's
 * `mitogen.select.Select`). Iteration yields one event per item, until no
 * source is left. With `oneshot` (the default) each source is removed after
 * it yields, so iteration ends when all have answered: handy for parallel
 * calls. A source that is closed or dead (a call whose context is gone)
 * throws its ChannelError from `get()` and from iteration.
 *
 * @example
 * ```ts
 * import { Router, Select } from "./mod.ts";
 * await using router = new Router();
 * const a = await router.local(), b = await router.local();
 * await using sel = new Select([a.callAsync(() => 1), b.callAsync(() => 2)]);
 * for await (const ev of sel) console.log((ev.data as { unpickle(): unknown }).unpickle());
 * console.log(await Select.all([a.callAsync(() => 3), b.callAsync(() => 4)])); // in arrival order
 * ```
 */
export class Select implements Selectable, AsyncIterable<SelectEvent>, AsyncDisposable {
  notify: ((source: Selectable) => void) | null = null;
  readonly oneshot: boolean;
  readonly #sources = new Set<Selectable>();
  /** One entry per notification: the source that had something. */
  readonly #ready = new Queue<Selectable>();
  /** The notify function installed in each source. */
  readonly #put = (source: Selectable): void => {
    if (this.#ready.closed) return;
    this.#ready.put(source);
    this.notify?.(this);
  };

  constructor(sources: Iterable<Selectable> = [], options: { oneshot?: boolean } = {}) {
    this.oneshot = options.oneshot ?? true;
    try {
      for (const s of sources) this.add(s);
    } catch (err) {
      this.close();
      throw err;
    }
  }

  /**
   * Wait for every receiver and return their decoded data, in the order the
   * replies arrive (Mitogen's `Select.all`). A failed call rejects with its
   * CallError, a dead one with ChannelError.
   */
  static async all<T = unknown>(receivers: Iterable<Receiver>): Promise<T[]> {
    const sel = new Select(receivers);
    const out: T[] = [];
    try {
      for await (const ev of sel) out.push((ev.data as Message).unpickle() as T);
    } finally {
      sel.close();
    }
    return out;
  }

  /**
   * Add a Receiver, Latch or Select; each item it already holds counts as
   * one notification. Throws MitogenError if it belongs to a Select already,
   * or if it is a Select this one is part of (a cycle).
   */
  add(source: Selectable): void {
    if (source instanceof Select && (source === this || source.#contains(this))) {
      throw new MitogenError("adding this Select would create a Select cycle");
    }
    if (source.notify) throw new MitogenError("source already belongs to a Select");
    if (this.#ready.closed) throw this.#ready.closed;
    let n: number;
    try {
      n = source.size();
    } catch {
      n = 1; // closed: one notification, so get() throws its error
    }
    this.#sources.add(source);
    source.notify = this.#put;
    for (let i = 0; i < n; i++) this.#put(source);
  }

  #contains(target: Selectable): boolean {
    for (const s of this.#sources) if (s === target || (s instanceof Select && s.#contains(target))) return true;
    return false;
  }

  /** Remove a source. A notification it gave before is still returned by a later get(), as in Mitogen. */
  remove(source: Selectable): void {
    if (!this.#sources.delete(source)) throw new MitogenError("source is not in this Select");
    source.notify = null;
  }

  /** The sources registered, in the order added (Mitogen's `bool(select)` is `sources.length > 0`). */
  get sources(): Selectable[] {
    return [...this.#sources];
  }

  /** Items buffered in the sources now: the sum of their `size()` (Mitogen's `Select.size()`). */
  size(): number {
    let n = 0;
    for (const s of this.#sources) n += s.size();
    return n;
  }

  /** `size() === 0`. */
  empty(): boolean {
    return this.size() === 0;
  }

  _poll(): SelectEvent | undefined {
    while (this.#ready.items.length) {
      const ev = this.#take(this.#ready.items.shift() as Selectable);
      if (ev) return ev;
    }
    if (this.#ready.closed) throw this.#ready.closed;
    return undefined;
  }

  /** Take an item from `src`, which notified; with oneshot, a member that answered (or failed) is removed. */
  #take(src: Selectable): SelectEvent | undefined {
    const done = (): void => {
      if (!this.oneshot || !this.#sources.has(src)) return;
      this.remove(src);
      // its other notifications are for items it will not yield
      const q = this.#ready.items;
      for (let i = q.length - 1; i >= 0; i--) if (q[i] === src) q.splice(i, 1);
    };
    let ev: SelectEvent | undefined;
    try {
      ev = src._poll();
    } catch (err) {
      done();
      throw err;
    }
    if (ev) done();
    return ev;
  }

  /** The next event; undefined once no source is left and no notification is pending. */
  async #next(options: GetOptions): Promise<SelectEvent | undefined> {
    const deadline = options.timeout === undefined ? undefined : Date.now() + options.timeout;
    for (;;) {
      if (this.#sources.size === 0 && this.#ready.items.length === 0) return undefined;
      const left = deadline === undefined ? undefined : Math.max(0, deadline - Date.now());
      const src = await this.#ready.get(left === undefined ? {} : { timeout: left }, "Select");
      const ev = this.#take(src);
      if (ev) return ev;
    }
  }

  /**
   * Next event from any source. Rejects with TimeoutError after `timeout`
   * ms, with the source's error if it is closed or dead, with ChannelError
   * once this Select is closed (also a get() already waiting), and with
   * MitogenError if no source is left.
   */
  async getEvent(options: GetOptions = {}): Promise<SelectEvent> {
    if (this.#ready.closed) throw this.#ready.closed;
    const ev = await this.#next(options);
    if (!ev) throw new MitogenError("Select has no sources left");
    return ev;
  }

  /** Next item from any source (a Message for receivers); as getEvent(). */
  async get(options: GetOptions = {}): Promise<unknown> {
    return (await this.getEvent(options)).data;
  }

  /** Yield events until no source is left; a closed or dead source throws its error. */
  async *[Symbol.asyncIterator](): AsyncIterator<SelectEvent> {
    for (let ev = await this.#next({}); ev; ev = await this.#next({})) yield ev;
  }

  /** Detach from every source and wake a pending get() with ChannelError; a closed Select cannot be used again. */
  close(): void {
    for (const s of [...this.#sources]) this.remove(s);
    if (this.#ready.closed) return;
    this.#ready.close(new ChannelError("Select closed"));
    this.notify?.(this);
  }

  [asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}
