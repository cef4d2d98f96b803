/**
 * Bytes in bulk: a 16 MiB and a 64 MiB value echoed through a call, and
 * 1 GiB streamed through a Sender (flow control), against the same bytes
 * through a child's stdio.
 *
 * @module
 */
import { Receiver, type Sender } from "../mod.ts";
import { bounded, num, type Stats, spread, stats, timeMs } from "./lib.ts";
import { detail, failed, kind, type Measure, newRouter, P, ratioCell, ratios, type Rounds, rounds, row, rt, runtime } from "./harness.ts";
import { RawPeer, streamFrom } from "./raw.ts";

// ---------------------------------------------------------------------------
// 16 MiB and 64 MiB echo throughput

/** The echo's two sizes. */
const ECHO_SIZES = [16 * 1024 * 1024, 64 * 1024 * 1024] as const;
const echo = (b: Uint8Array) => b;

/** A block of `size` bytes whose pages differ and whose last byte is 0xa5 (see {@link echoedIntact}). */
function echoBlock(size: number): Uint8Array {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < bytes.length; i += 4096) bytes[i] = i >>> 12;
  bytes[bytes.length - 1] = 0xa5;
  return bytes;
}

/** Whether `back` is an echo of {@link echoBlock}(size) (length, a page marker and the last byte). */
function echoedIntact(back: unknown, size: number): boolean {
  return back instanceof Uint8Array && back.byteLength === size && back[back.length - 1] === 0xa5 && back[4096] === 1;
}

async function benchThroughput(): Promise<void> {
  const name = (mib: number) => `${mib} MiB echo (MB/s)`;
  try {
    const r = await bounded(150_000, async (scope) => {
      const router = scope.add(newRouter());
      const ctx = await router.local({ runtime, name: "echo" });
      const peer = scope.add(RawPeer.echo(rt));
      const out: { mib: number; rounds: Rounds }[] = [];
      for (const size of ECHO_SIZES) {
        const bytes = echoBlock(size);
        const mbps = async (fn: () => Promise<void>) => {
          let ms = 0;
          for (let i = 0; i < P.echoPer; i++) ms += await timeMs(fn);
          return (P.echoPer * size) / 1e6 / (ms / 1000);
        };
        const viaMitogen = async () => {
          if (!echoedIntact(await ctx.call(echo, bytes), size)) throw new Error("echoed bytes differ from the bytes sent");
        };
        const viaPipe = () => peer.roundTrip(bytes);
        for (let i = 0; i < 2; i++) {
          await viaMitogen();
          await viaPipe();
        }
        out.push({
          mib: size / 1048576,
          rounds: await rounds(
            P.echoRounds,
            15_000 * P.budget,
            () => mbps(viaMitogen),
            () => mbps(viaPipe),
          ),
        });
      }
      return out;
    });
    for (const { mib, rounds: e } of r) {
      const q = ratios(e.mito, e.raw);
      const pct: Stats = { median: q.median * 100, min: q.min * 100, max: q.max * 100, n: q.n };
      row(name(mib), spread(stats(e.mito), 0), spread(stats(e.raw), 0), ratioCell(e, pct, 1, "%"), ">= 80%, every round", pct.min >= 80 ? "PASS" : "MISS");
    }
    const biggest = Math.max(...ECHO_SIZES);
    const touch = stats([0, 1, 2].map(() => firstTouchMs(biggest)));
    detail(
      `this machine: a fresh ${biggest / 1048576} MiB buffer costs ${num(touch.median, 1)} ms to first touch (each side of a mitogen echo reassembles a frame into one)`,
    );
  } catch (err) {
    failed(name(ECHO_SIZES[0] / 1048576), err);
  }
}

/** Milliseconds to allocate `bytes` and touch every page once (page-fault cost of a fresh buffer). */
function firstTouchMs(bytes: number): number {
  const t0 = performance.now();
  const b = new Uint8Array(bytes);
  for (let i = 0; i < b.length; i += 4096) b[i] = 1;
  return performance.now() - t0;
}

/** A block echoed by ctx.call, against a child echoing its stdin. */
export const echoThroughput: Measure = {
  key: "echo",
  run: benchThroughput,
  reference: () => [
    `one 16 MiB, and one 64 MiB, block written to a ${kind} child echoing stdin to stdout as it arrives, until all of it is back (MB = 10^6 bytes);`,
    "mitogen: ctx.call(echo, block) returning the block; the verdict is on the worst round",
  ],
};

// ---------------------------------------------------------------------------
// 1 GiB through a Sender (flow control)

const STREAM_BLOCKS = 64;
const STREAM_BLOCK = 16 * 1024 * 1024;

/** RSS of this process in MiB. */
const rssMiB = () => process.memoryUsage().rss / 1048576;

async function benchStream(): Promise<void> {
  const name = "1 GiB Sender stream (MB/s)";
  try {
    const total = STREAM_BLOCKS * STREAM_BLOCK;
    const r = await bounded(240_000, async (scope) => {
      const router = scope.add(newRouter());
      const peaks = { master: 0, child: 0, rawMaster: 0, rawChild: 0 };
      const viaMitogen = async () => {
        const ctx = await router.local({ runtime, name: "stream" });
        const recv = scope.add(new Receiver(router));
        const start = rssMiB();
        let peak = start;
        const t0 = performance.now();
        const job = ctx.call(
          async (s: Sender, n: number, size: number) => {
            const status = () => process.getBuiltinModule("node:fs").readFileSync("/proc/self/status", "latin1");
            const start = Number(/VmRSS:\s+(\d+)/.exec(status())?.[1]) / 1024;
            const block = new Uint8Array(size).fill(90);
            for (let i = 0; i < n; i++) await s.send(block);
            s.close();
            return Number(/VmHWM:\s+(\d+)/.exec(status())?.[1]) / 1024 - start;
          },
          recv.toSender(),
          STREAM_BLOCKS,
          STREAM_BLOCK,
        );
        let got = 0;
        for await (const msg of recv) {
          got += (msg.unpickle() as Uint8Array).byteLength;
          peak = Math.max(peak, rssMiB());
        }
        const ms = performance.now() - t0;
        if (got !== total) throw new Error(`received ${got} of ${total} bytes`);
        peaks.child = Math.max(peaks.child, await job);
        peaks.master = Math.max(peaks.master, peak - start);
        await ctx.shutdown({ wait: true });
        return total / 1e6 / (ms / 1000);
      };
      const viaPipe = async () => {
        const start = rssMiB();
        let peak = start;
        const sampler = setInterval(() => (peak = Math.max(peak, rssMiB())), 10);
        try {
          const { ms, peakMiB } = await streamFrom(rt, STREAM_BLOCKS, STREAM_BLOCK);
          peaks.rawChild = Math.max(peaks.rawChild, peakMiB);
          return total / 1e6 / (ms / 1000);
        } finally {
          clearInterval(sampler);
          peaks.rawMaster = Math.max(peaks.rawMaster, peak - start);
        }
      };
      const out = await rounds(P.bulkRounds, 60_000 * P.budget, viaMitogen, viaPipe);
      // The same pipe, each block gathered into a fresh buffer as any receiver of whole values must.
      const copied: number[] = [];
      for (let i = 0; i < out.raw.length; i++) copied.push(total / 1e6 / ((await streamFrom(rt, STREAM_BLOCKS, STREAM_BLOCK, true)).ms / 1000));
      return { ...out, peaks, copied };
    });
    const q = ratios(r.mito, r.raw);
    const pct: Stats = { median: q.median * 100, min: q.min * 100, max: q.max * 100, n: q.n };
    row(name, spread(stats(r.mito), 0), spread(stats(r.raw), 0), ratioCell(r, pct, 1, "%"), ">= 80% of raw", pct.median >= 80 ? "PASS" : "MISS");
    const c = stats(r.copied);
    detail(`raw, each block copied into a fresh 16 MiB buffer: ${spread(c, 0)} MB/s; mitogen is ${num((stats(r.mito).median / c.median) * 100, 0)}% of that`);
    const p = r.peaks;
    const within = p.master < 160 && p.child < 160;
    detail(
      `peak RSS above start: mitogen master +${num(p.master, 0)} MiB, child +${num(p.child, 0)} MiB (bound 160 each); ` +
        `raw master +${num(p.rawMaster, 0)} MiB, raw child ${num(p.rawChild, 0)} MiB in all` +
        (within ? "" : " (over the 160 MiB bound)"),
    );
  } catch (err) {
    failed(name, err);
  }
}

/** 1 GiB from a child through a Sender, against a child writing it to stdout. */
export const senderStream: Measure = {
  key: "stream",
  run: benchStream,
  reference: () => [
    `a ${kind} child writes ${STREAM_BLOCKS} x 16 MiB to its stdout, read here until all of it is in; ` +
      "mitogen: the child sends the same blocks through a Sender (`await s.send(block)`) to a Receiver here that unpickles each",
  ],
};
