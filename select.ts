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

/** A queue with blocking `get`, the shared core of Receiver and Latch. */
class Queue<T> {
  items: T[] = [];
  waiters: Waiter<T>[] = [];
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

  /** Close after the items already queued; `last` stays queued (in order) when nobody waits. */
  end(last: T, error: Error): void {
    if (this.closed) return;
    if (this.waiters.length === 0) this.items.push(last);
    this.close(error);
  }

  close(error: Error): void {
    if (this.closed) return;
    this.closed = error;
    for (const w of this.waiters.splice(0)) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(error);
    }
  }
}

/** Something Select can wait on. */
export interface Selectable {
  notify: ((source: Selectable) => void) | null;
  empty(): boolean;
  /** @internal Take an item now; undefined when empty. Throws when closed. */
  _poll(): { item: unknown } | undefined;
}

/**
 * Receives messages sent to a handle in this context. Async-iterable: the
 * loop yields each Message and ends when the sender closes the channel.
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
  /** Called as `notify(receiver)` on every delivered message (Select uses it). */
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

  /** @internal Stop receiving; waiters reject with `error`. */
  _fail(error: Error): void {
    this.router.delHandler(this.handle);
    this.#queue.close(error);
    this.#credits?.closed();
    this.#settled();
  }

  #deliver(msg: Message): void {
    this.#settled();
    msg.receiver = this;
    if (msg.flags & FRAME.FLAG_FLOW) {
      const overrun = (this.#credits ??= new Credits(this.router, this.handle)).arrived(msg);
      if (overrun) {
        this.router.log("warn", overrun.message);
        this._fail(overrun);
        this.notify?.(this);
        return;
      }
    }
    if (msg.isDead) {
      this.router.delHandler(this.handle);
      this.#queue.end(msg, deadError(msg));
    } else this.#queue.put(msg);
    this.notify?.(this);
  }

  /** True if `get()` would wait. */
  empty(): boolean {
    return this.#queue.items.length === 0 && !this.#queue.closed;
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

  _poll(): { item: unknown } | undefined {
    const msg = this.#queue.items.shift();
    if (msg === undefined) {
      if (this.#queue.closed) throw this.#queue.closed;
      return undefined;
    }
    if (msg.isDead) throw deadError(msg);
    this.#took(msg);
    return { item: msg };
  }

  /** The consumer has `msg`: its bytes go back to the sender's window. */
  #took(msg: Message): void {
    if (msg.flags & FRAME.FLAG_FLOW) this.#credits?.taken(msg);
  }

  /** A Sender that delivers to this receiver, for passing to other contexts. */
  toSender(): Sender {
    return new Sender(this.router.myself(), this.handle);
  }

  /** Stop receiving: waiters reject with ChannelError. */
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

  [Symbol.asyncDispose](): Promise<void> {
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
 * A Receiver that can also send: to `dstHandle` in `context`. Each end makes
 * its own Channel and learns the other's handle (as in Mitogen).
 */
export class Channel extends Receiver {
  readonly sender: Sender;
  constructor(router: Router, context: Context, dstHandle: number, handle?: number) {
    super(router, handle === undefined ? {} : { handle });
    this.sender = new Sender(context, dstHandle);
  }
  /** Send `data` to the other end. */
  send(data: unknown): void {
    this.sender.send(data);
  }
  /** Close both directions. */
  override close(): void {
    this.sender.close();
    super.close();
  }
}

/**
 * A local queue other code can `put` into; Select can wait on it.
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

  /** Add an item, waking one waiter. */
  put(item: T): void {
    if (this.#queue.closed) throw new ChannelError("latch closed");
    this.#queue.put(item);
    this.notify?.(this);
  }
  /** Next item; rejects with ChannelError once closed, TimeoutError after `timeout` ms. */
  get(options: GetOptions = {}): Promise<T> {
    return this.#queue.get(options, "latch");
  }
  empty(): boolean {
    return this.#queue.items.length === 0;
  }
  /** Items waiting. */
  get size(): number {
    return this.#queue.items.length;
  }
  _poll(): { item: unknown } | undefined {
    if (this.#queue.items.length) return { item: this.#queue.items.shift() };
    if (this.#queue.closed) throw this.#queue.closed;
    return undefined;
  }
  /** Close: waiters reject with ChannelError. */
  close(): void {
    this.#queue.close(new ChannelError("latch closed"));
    this.notify?.(this);
  }
}

/** What Select yields: the source that had something, and the item. */
export interface SelectEvent {
  source: Selectable;
  data: unknown;
}

/**
 * Waits on several receivers, latches or other Selects at once. With
 * `oneshot` (the default) each source is removed after it yields, so
 * iteration ends when all have answered: handy for parallel calls.
 *
 * @example
 * ```ts
 * import { Router, Select } from "./mod.ts";
 * await using router = new Router();
 * const a = await router.local(), b = await router.local();
 * await using sel = new Select([a.callAsync(() => 1), b.callAsync(() => 2)]);
 * for await (const ev of sel) console.log((ev.data as { unpickle(): unknown }).unpickle());
 * ```
 */
export class Select implements Selectable, AsyncIterable<SelectEvent>, AsyncDisposable {
  notify: ((source: Selectable) => void) | null = null;
  readonly oneshot: boolean;
  readonly #sources = new Set<Selectable>();
  readonly #ready = new Latch<Selectable>();

  constructor(sources: Iterable<Selectable> = [], options: { oneshot?: boolean } = {}) {
    this.oneshot = options.oneshot ?? true;
    for (const s of sources) this.add(s);
  }

  /** Add a source. */
  add(source: Selectable): void {
    if (source === this) throw new MitogenError("a Select cannot contain itself");
    if (source.notify) throw new MitogenError("source already belongs to a Select");
    this.#sources.add(source);
    source.notify = (s) => {
      this.#ready.put(s);
      this.notify?.(this);
    };
    if (!source.empty()) source.notify(source);
  }

  /** Remove a source (a notification it already gave may still be returned). */
  remove(source: Selectable): void {
    if (!this.#sources.delete(source)) throw new MitogenError("source is not in this Select");
    source.notify = null;
  }

  /** True if no source is registered. */
  get size(): number {
    return this.#sources.size;
  }

  empty(): boolean {
    return this.#ready.empty();
  }

  _poll(): { item: unknown } | undefined {
    while (!this.#ready.empty()) {
      const src = this.#ready._poll()?.item as Selectable;
      const ev = this.#take(src);
      if (ev) return { item: ev.data };
    }
    return undefined;
  }

  #take(src: Selectable): SelectEvent | undefined {
    if (!this.#sources.has(src)) return undefined;
    let got: { item: unknown } | undefined;
    try {
      got = src._poll();
    } catch (err) {
      if (this.oneshot) this.remove(src);
      throw err;
    }
    if (!got) return undefined;
    if (this.oneshot) this.remove(src);
    return { source: src, data: got.item };
  }

  /** Next event from any source; TimeoutError after `timeout` ms, ChannelError if no source is left. */
  async getEvent(options: GetOptions = {}): Promise<SelectEvent> {
    const deadline = options.timeout === undefined ? undefined : Date.now() + options.timeout;
    for (;;) {
      if (this.#sources.size === 0 && this.#ready.empty()) throw new ChannelError("Select has no sources left");
      const left = deadline === undefined ? undefined : Math.max(0, deadline - Date.now());
      const src = await this.#ready.get(left === undefined ? {} : { timeout: left });
      const ev = this.#take(src);
      if (ev) return ev;
    }
  }

  /** Next item from any source (a Message for receivers). */
  async get(options: GetOptions = {}): Promise<unknown> {
    return (await this.getEvent(options)).data;
  }

  async *[Symbol.asyncIterator](): AsyncIterator<SelectEvent> {
    while (this.#sources.size || !this.#ready.empty()) {
      try {
        yield await this.getEvent();
      } catch (err) {
        if (err instanceof ChannelError && this.#sources.size === 0) return;
        throw err;
      }
    }
  }

  /** Detach from every source. */
  close(): void {
    for (const s of [...this.#sources]) this.remove(s);
  }

  [Symbol.asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}
