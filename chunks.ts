/**
 * The one buffer of bytes received and not yet read: what the readers of a
 * byte stream (frames, handshakes, fakessh's socket) parse from.
 *
 * @module
 */
import { view } from "./bytes.ts";

/**
 * Unread input, kept as the chunks it arrived in: never joined as it comes,
 * only when a reader takes bytes that span chunks. What is taken from one
 * chunk is a view of it, so a reader that keeps bytes keeps their chunk.
 *
 * A parser's fast path reads the {@link Chunks.first} chunk in place, from
 * {@link Chunks.head} on, and {@link Chunks.skip}s what it used.
 */
export class Chunks {
  /** The chunks; the first {@link Chunks.head} bytes of the first one are read already. */
  #list: Uint8Array[] = [];
  #head = 0;
  #size = 0;

  /** Unread bytes. */
  get size(): number {
    return this.#size;
  }

  /** The first chunk (unread from {@link Chunks.head} on), or undefined when there is none. */
  get first(): Uint8Array | undefined {
    return this.#list[0];
  }

  /** Bytes of {@link Chunks.first} read already. */
  get head(): number {
    return this.#head;
  }

  /** Add `chunk` at the end (not copied; an empty one is dropped). */
  push(chunk: Uint8Array): void {
    if (!chunk.byteLength) return;
    this.#list.push(chunk);
    this.#size += chunk.byteLength;
  }

  /** Put `bytes` back in front of the unread input. */
  unshift(bytes: Uint8Array): void {
    if (!bytes.byteLength) return;
    this.#normalize();
    this.#list.unshift(bytes);
    this.#size += bytes.byteLength;
  }

  /** Drop the next `n` bytes, all of them in {@link Chunks.first}. */
  skip(n: number): void {
    this.#head += n;
    this.#size -= n;
    if (this.#head === (this.#list[0] as Uint8Array).byteLength) {
      this.#list.shift();
      this.#head = 0;
    }
  }

  /** Remove and return the next `n` bytes (`n` at most {@link Chunks.size}): a view when they lie in one chunk, else a copy. */
  take(n: number): Uint8Array {
    this.#normalize();
    const first = this.#list[0];
    this.#size -= n;
    if (first && first.byteLength >= n) {
      if (first.byteLength === n) this.#list.shift();
      else this.#head = n;
      return view(first, 0, n);
    }
    const out = new Uint8Array(n);
    let off = 0;
    while (off < n) {
      const c = this.#list[0] as Uint8Array;
      const k = Math.min(c.byteLength, n - off);
      out.set(k === c.byteLength ? c : view(c, 0, k), off);
      off += k;
      if (k === c.byteLength) this.#list.shift();
      else this.#list[0] = view(c, k);
    }
    return out;
  }

  /** Remove the next `n` bytes (at most {@link Chunks.size}), as views of the chunks they arrived in. */
  takeParts(n: number): Uint8Array[] {
    this.#normalize();
    const parts: Uint8Array[] = [];
    this.#size -= n;
    while (n > 0) {
      const c = this.#list[0] as Uint8Array;
      const k = Math.min(c.byteLength, n);
      if (k === c.byteLength) {
        parts.push(c);
        this.#list.shift();
      } else {
        parts.push(view(c, 0, k));
        this.#list[0] = view(c, k);
      }
      n -= k;
    }
    return parts;
  }

  /** Remove everything unread (to drop it, or hand it on), as the chunks it arrived in (the first one cut to its unread part). */
  takeAll(): Uint8Array[] {
    this.#normalize();
    const all = this.#list;
    this.#list = [];
    this.#size = 0;
    return all;
  }

  /** Drop the read part of the first chunk (the paths below work on whole chunks). */
  #normalize(): void {
    if (this.#head === 0) return;
    const first = this.#list[0] as Uint8Array;
    if (this.#head === first.byteLength) this.#list.shift();
    else this.#list[0] = view(first, this.#head);
    this.#head = 0;
  }
}
