/**
 * Waiting on local queues: Latch, Select, and the blocking queue under them
 * and under Receiver (channels.ts). Part of the child payload.
 *
 * @module
 */
import { LatchError, SelectError, TimeoutError } from "./errors.ts";
import type { Message } from "./frames.ts";
import { asyncDispose } from "./runtime.ts";

/** Options of `get()`. */
export interface GetOptions {
  /** Milliseconds to wait before rejecting with TimeoutError. */
  timeout?: number;
}

type Waiter<T> = { resolve: (v: T) => void; reject: (e: Error) => void; timer: ReturnType<typeof setTimeout> | undefined };

/** A queue with blocking `get`, the shared core of Receiver, Latch and Select. */
/** @internal */
export class Queue<T> {
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

  /** Items queued; throws LatchError once closed and drained (Mitogen's Latch.size()), the close error its cause. */
  size(): number {
    const closed = this.items.length ? null : this.closed;
    if (closed) throw closed instanceof LatchError ? closed : new LatchError(closed.message, { cause: closed });
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
  /** Items buffered now; throws LatchError once closed with nothing left. */
  size(): number;
  /** `size() === 0` (a Select: no notification pending); throws LatchError once closed. */
  empty(): boolean;
  /** @internal Take an item now: the event, or undefined when empty. Throws when closed. */
  _poll(): SelectEvent | undefined;
}

/**
 * A local queue other code can `put` into; Select can wait on it. As
 * Mitogen's Latch: after `close()`, `get()`, `put()`, `size()` and `empty()`
 * throw LatchError (what was queued is dropped).
 *
 * @example
 * ```ts
 * import { Latch } from "mitogen";
 * const latch = new Latch<number>();
 * setTimeout(() => latch.put(1), 10);
 * console.log(await latch.get({ timeout: 1000 }));
 * ```
 */
export class Latch<T = unknown> implements Selectable {
  notify: ((source: Selectable) => void) | null = null;
  readonly #queue = new Queue<T>();

  /** Add an item, waking one waiter; throws LatchError once closed. */
  put(item: T): void {
    if (this.#queue.closed) throw new LatchError("latch closed");
    this.#queue.put(item);
    this.notify?.(this);
  }
  /** Next item; rejects with LatchError once closed, TimeoutError after `timeout` ms. */
  get(options: GetOptions = {}): Promise<T> {
    return this.#queue.get(options, "latch");
  }
  /** Items buffered now; throws LatchError once closed. */
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
  /** Close: queued items are dropped, waiters (and a Select holding it) get LatchError. */
  close(): void {
    if (this.#queue.closed) return;
    this.#queue.close(new LatchError("latch closed"));
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
 * throws its error (LatchError, ChannelError) from `get()` and from
 * iteration. Misuse throws SelectError (Mitogen's `mitogen.select.Error`).
 *
 * @example
 * ```ts
 * import { Router, Select } from "mitogen";
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
  static async all<T = unknown>(receivers: Iterable<Selectable>): Promise<T[]> {
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
   * one notification. Throws SelectError if it belongs to a Select already,
   * or if it is a Select this one is part of (a cycle); LatchError once this
   * Select is closed.
   */
  add(source: Selectable): void {
    if (source instanceof Select && (source === this || source.#contains(this))) {
      throw new SelectError("adding this Select would create a Select cycle");
    }
    if (source.notify) throw new SelectError("source already belongs to a Select");
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

  /**
   * Remove a source; SelectError if it is not one. A notification it gave
   * before is still returned by a later get() while other sources are left,
   * as in Mitogen; once none is left, get() throws SelectError.
   */
  remove(source: Selectable): void {
    if (!this.#sources.delete(source)) throw new SelectError("source is not in this Select");
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

  /**
   * True when no notification is pending, so get() would wait (Mitogen's
   * `Select.empty()`, which asks the Select's own latch). A pending
   * notification of a source removed since counts, as get() returns it; one
   * whose item was taken from the source directly does not. Throws
   * LatchError once closed.
   */
  empty(): boolean {
    if (this.#ready.closed) throw this.#ready.closed;
    for (const src of this.#ready.items) {
      try {
        if (!src.empty()) return false;
      } catch {
        return false; // closed: get() throws its error
      }
    }
    return true;
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

  /** The next event; undefined once no source is left (Mitogen's `while self._receivers`). */
  async #next(options: GetOptions): Promise<SelectEvent | undefined> {
    const deadline = options.timeout === undefined ? undefined : Date.now() + options.timeout;
    for (;;) {
      if (this.#sources.size === 0) return undefined;
      const left = deadline === undefined ? undefined : Math.max(0, deadline - Date.now());
      const src = await this.#ready.get(left === undefined ? {} : { timeout: left }, "Select");
      const ev = this.#take(src);
      if (ev) return ev;
    }
  }

  /**
   * Next event from any source. Rejects with TimeoutError after `timeout`
   * ms, with the source's error if it is closed or dead, with LatchError
   * when this Select is closed while get() waits, and with SelectError if no
   * source is left (also once closed), as Mitogen's `get_event()`.
   */
  async getEvent(options: GetOptions = {}): Promise<SelectEvent> {
    const ev = await this.#next(options);
    if (!ev) throw new SelectError(`Cannot get(), Select instance is empty${this.#ready.closed ? " (closed)" : ""}`);
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

  /** Detach from every source and wake a pending get() with LatchError; a closed Select cannot be used again. */
  close(): void {
    for (const s of [...this.#sources]) this.remove(s);
    if (this.#ready.closed) return;
    this.#ready.close(new LatchError("Select closed"));
    this.notify?.(this);
  }

  [asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}
