/**
 * Bench plumbing: statistics, bounded timing loops, a scope that ends what a
 * section started (also when the section times out), and table formatting.
 *
 * @module
 */

/** Median and spread of one measured series. */
export interface Stats {
  median: number;
  min: number;
  max: number;
  n: number;
}

/** Median, min and max of `xs` (NaN for an empty series). */
export function stats(xs: readonly number[]): Stats {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return { median: Number.NaN, min: Number.NaN, max: Number.NaN, n: 0 };
  const mid = s.length >> 1;
  const median = s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
  return { median, min: s[0] as number, max: s[s.length - 1] as number, n: s.length };
}

/**
 * Run `op` back to back until `maxOps` ran or `maxMs` passed (at least once);
 * returns microseconds per op.
 */
export async function perOpMicros(op: () => Promise<unknown>, maxOps: number, maxMs: number): Promise<number> {
  const t0 = performance.now();
  const end = t0 + maxMs;
  let n = 0;
  do {
    await op();
    n++;
  } while (n < maxOps && performance.now() < end);
  return ((performance.now() - t0) * 1000) / n;
}

/** Milliseconds `fn` takes. */
export async function timeMs(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

/** Run `job(i)` for i < count, at most `concurrency` at a time; throws once `deadline` (performance.now()) has passed. */
export async function pool(count: number, concurrency: number, deadline: number, job: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < count) {
      if (performance.now() > deadline) throw new Error(`pool: deadline passed after ${next} of ${count} jobs`);
      const i = next++;
      await job(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
}

/** How long a {@link Scope} waits for one item to end. */
const DISPOSE_LIMIT_MS = 10_000;

/**
 * Collects what a section starts and ends it in reverse order on dispose.
 * After disposal, anything added is ended at once and the add throws, so a
 * section that timed out and keeps running in the background cannot leak.
 */
export class Scope implements AsyncDisposable {
  readonly #items: AsyncDisposable[] = [];
  #disposed = false;

  /** End `item` when the scope ends. */
  add<T extends AsyncDisposable>(item: T): T {
    if (this.#disposed) {
      void Promise.resolve(item[Symbol.asyncDispose]()).catch(() => {});
      throw new Error("scope already ended");
    }
    this.#items.push(item);
    return item;
  }

  /** Ends each item in reverse order, giving each at most {@link DISPOSE_LIMIT_MS} (an ending that hangs must not hold up the rest). */
  async [Symbol.asyncDispose](): Promise<void> {
    this.#disposed = true;
    for (const item of this.#items.splice(0).reverse()) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      try {
        await Promise.race([item[Symbol.asyncDispose](), new Promise((resolve) => (timer = setTimeout(resolve, DISPOSE_LIMIT_MS)))]);
      } catch {
        // keep ending the rest
      } finally {
        clearTimeout(timer);
      }
    }
  }
}

/**
 * Run `fn` with a fresh Scope; reject after `limitMs`. The scope is ended
 * either way, which stops the children and unblocks whatever `fn` awaits.
 */
export async function bounded<T>(limitMs: number, fn: (scope: Scope) => Promise<T>): Promise<T> {
  await using scope = new Scope();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${(limitMs / 1000).toFixed(1)} s`)), limitMs);
  });
  try {
    return await Promise.race([fn(scope), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** `x` with `digits` decimals, or "n/a". */
export function num(x: number, digits: number): string {
  return Number.isFinite(x) ? x.toFixed(digits) : "n/a";
}

/** "median [min..max]" of a series. */
export function spread(s: Stats, digits: number, unit = ""): string {
  if (s.n === 0) return "n/a";
  return `${num(s.median, digits)}${unit} [${num(s.min, digits)}..${num(s.max, digits)}]`;
}

/** Pad `text` to `width`; a longer text keeps one space after it, so columns never run together. */
export function cell(text: string, width: number): string {
  return text.length >= width ? `${text} ` : text + " ".repeat(width - text.length);
}
