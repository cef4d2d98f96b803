/**
 * Channels: Receiver (a handle's messages, queued), Sender (sending to a
 * remote handle, flow-controlled) and Channel (both). Part of the child payload.
 *
 * @module
 */
import { ChannelError } from "./errors.ts";
import { WIRE_REF, type WireRef } from "./codec.ts";
import { FRAME, Message } from "./frames.ts";
import { Credits, type FlowControl, type FlowHost } from "./flow.ts";
import { asyncDispose } from "./runtime.ts";
import type { LogLevel } from "./logapi.ts";
import { type GetOptions, Queue, type SelectEvent, type Selectable } from "./select.ts";

/** What a Receiver and a Sender need of a router (the Router is one). */
export interface ChannelHost extends FlowHost {
  readonly flow: FlowControl;
  log(level: LogLevel, message: string): void;
  myself(): ChannelContext;
}

/** What a Sender needs of the context it sends to (a Context is one). */
export interface ChannelContext {
  readonly contextId: number;
  readonly name: string;
  readonly isDisconnected: boolean;
  readonly router: ChannelHost;
}

/** Options of the Receiver constructor. */
export interface ReceiverOptions {
  handle?: number;
  persist?: boolean;
  respondent?: ChannelContext | null;
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
 * import { Receiver, Router, type Sender } from "mitogen";
 * await using router = new Router();
 * const ctx = await router.local();
 * await using recv = new Receiver(router);
 * await ctx.call((s: Sender) => { for (let i = 0; i < 3; i++) s.send(i); s.close(); }, recv.toSender());
 * for await (const msg of recv) console.log(msg.unpickle());
 * ```
 */
export class Receiver implements AsyncIterable<Message>, AsyncDisposable, Selectable {
  readonly router: ChannelHost;
  readonly handle: number;
  readonly respondent: ChannelContext | null;
  /** Called as `notify(receiver)` on every delivered message, and once when it closes (Select uses it). */
  notify: ((source: Selectable) => void) | null = null;
  readonly #queue = new Queue<Message>();
  /** Flow-control accounting, made when the first flow-controlled message arrives. */
  #credits: Credits | null = null;

  constructor(router: ChannelHost, options: ReceiverOptions = {}) {
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
   * LatchError once closed with nothing left to take (by `close()`, as
   * Mitogen's, or once its dead message was taken), the reason its cause.
   */
  size(): number {
    return this.#queue.size();
  }

  /** `size() === 0`; throws LatchError as size(). */
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

function deadError(msg: Message): Error {
  try {
    msg.unpickle();
  } catch (err) {
    if (err instanceof ChannelError || err === msg._error) return err as Error;
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
 * import { Receiver, Router, type Sender } from "mitogen";
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
  readonly context: ChannelContext;
  readonly dstHandle: number;

  constructor(context: ChannelContext, dstHandle: number) {
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
 * import { Channel, Router } from "mitogen";
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
  constructor(router: ChannelHost, context: ChannelContext, dstHandle: number, handle?: number) {
    super(router, handle === undefined ? {} : { handle });
    this.#sender = new Sender(context, dstHandle);
  }
  /** The Sender that send() uses (a new one after re-pointing). */
  get sender(): Sender {
    return this.#sender;
  }
  /** The context sent to. */
  get context(): ChannelContext {
    return this.#sender.context;
  }
  set context(context: ChannelContext) {
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
