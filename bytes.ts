/**
 * Bytes: the allocator (small arrays cut from a shared slab, large ones not
 * zeroed where they are filled at once), views and joins. The child payload's
 * frames and codec are made of these.
 *
 * @module
 */
import { builtin, deno } from "./runtime.ts";

/** `parts` written back to back into one array of `size` bytes (`capacity`, when larger, leaves room after them; `out`, when given, is that array). */
export function joinParts(parts: readonly Uint8Array[], size: number, capacity: number = size, out: Uint8Array = new Uint8Array(capacity)): Uint8Array {
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.byteLength;
  }
  return out;
}

/** `a.subarray(start, end)`, made the cheaper way (a third of the time in V8), always a plain Uint8Array. */
export function view(a: Uint8Array, start: number, end: number = a.byteLength): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset + start, end - start);
}

/**
 * A fresh array of `n` bytes that the caller fills completely before anyone reads it (a large frame
 * gathered as it arrives). On Node it is not zeroed first (`Buffer.allocUnsafeSlow`): zeroing 16 MiB
 * costs more than receiving it, where malloc hands back memory it had.
 */
export function allocFilled(n: number): Uint8Array {
  if (deno) return new Uint8Array(n);
  const b = (builtin("node:buffer") as { Buffer: { allocUnsafeSlow(n: number): Uint8Array } }).Buffer.allocUnsafeSlow(n);
  return new Uint8Array(b.buffer, b.byteOffset, n);
}

/** Arrays up to this size are cut from a shared slab by {@link allocBytes}. */
const SLAB_MAX = 4096;
const SLAB_SIZE = 64 * 1024;
let slab = new ArrayBuffer(0);
let slabUsed = 0;

/**
 * A fresh array of `n` bytes (not zeroed). Small ones are views of a shared 64 KiB slab, as Node's
 * Buffer pool does: V8 allocates every typed array over 64 bytes outside its heap, which costs a
 * microsecond or more, while a view costs a tenth of that. Callers write all `n` bytes.
 */
export function allocBytes(n: number): Uint8Array {
  if (n > SLAB_MAX) return new Uint8Array(n);
  if (slabUsed + n > slab.byteLength) {
    slab = new ArrayBuffer(SLAB_SIZE);
    slabUsed = 0;
  }
  const out = new Uint8Array(slab, slabUsed, n);
  slabUsed = (slabUsed + n + 7) & ~7;
  return out;
}

/** The first `n` bytes of `buf` (which is read into again), copied: a small copy is a slab view (see {@link allocBytes}). */
export function copyBytes(buf: Uint8Array, n: number): Uint8Array {
  if (n > SLAB_MAX) return buf.slice(0, n);
  const chunk = allocBytes(n);
  chunk.set(buf.subarray(0, n));
  return chunk;
}

/** @internal Write `v` at `h[at]`, 4 bytes big-endian (frame headers, sealed frames in handshake.ts). */
export function put32(h: Uint8Array, at: number, v: number): void {
  h[at] = v >>> 24;
  h[at + 1] = v >>> 16;
  h[at + 2] = v >>> 8;
  h[at + 3] = v;
}

/** @internal The 4 bytes at `h[at]`, big-endian, as an unsigned integer. */
export function get32(h: Uint8Array, at: number): number {
  return (((h[at] as number) << 24) | ((h[at + 1] as number) << 16) | ((h[at + 2] as number) << 8) | (h[at + 3] as number)) >>> 0;
}
