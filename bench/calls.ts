/**
 * Calls: the round trip of one call, what each via hop adds to it, a call on
 * an imported module against a plain one, and a thousand calls at once.
 *
 * @module
 */
import type { Context } from "../mod.ts";
import { bounded, num, perOpMicros, type Stats, spread, stats } from "./lib.ts";
import { detail, failed, kind, type Measure, newRouter, P, ratioCell, ratioRow, ratios, rounds, roundsOf, row, rt, runtime, zero } from "./harness.ts";
import { ForkPeer, RawPeer } from "./raw.ts";

// ---------------------------------------------------------------------------
// call round-trip: ctx.call(() => 0) against a one-byte ping-pong on stdio and node's fork IPC

async function benchRoundTrip(): Promise<void> {
  const name = "call round-trip";
  try {
    const r = await bounded(60_000, async (scope) => {
      const router = scope.add(newRouter());
      const ctx = await router.local({ runtime, name: "rtt" });
      const peer = scope.add(RawPeer.echo(rt));
      const ipc = scope.add(new ForkPeer());
      const one = new Uint8Array([1]);
      const call = () => ctx.call(zero);
      const ping = () => peer.roundTrip(one);
      const send = () => ipc.roundTrip(0);
      // warm up all three (JIT, socket buffers)
      for (const op of [call, ping, send]) await perOpMicros(op, 3000, 1500);
      const [mito = [], raw = [], fork = []] = await roundsOf(P.rounds, 20_000 * P.budget, [
        () => perOpMicros(call, P.rttOps, P.rttMs),
        () => perOpMicros(ping, P.rttOps, P.rttMs),
        () => perOpMicros(send, P.rttOps, P.rttMs),
      ]);
      return { mito, raw, fork, planned: P.rounds };
    });
    const q = ratios(r.mito, r.raw);
    const qf = ratios(r.mito, r.fork);
    const pass = q.median <= 1.3 && qf.median < 1;
    row(name, spread(stats(r.mito), 1, " us"), spread(stats(r.raw), 1, " us"), ratioCell(r, q, 2, "x"), "<= 1.3x, < fork IPC", pass ? "PASS" : "MISS");
    row("  vs node fork IPC", "", spread(stats(r.fork), 1, " us"), ratioCell({ ...r, raw: r.fork }, qf, 2, "x"), "< 1.0x", "");
  } catch (err) {
    failed(name, err);
  }
}

/** The round trip of one call. */
export const callRoundTrip: Measure = {
  key: "call-rtt",
  run: benchRoundTrip,
  reference: () => [
    `one byte ping-pong over stdin/stdout with a ${kind} child echoing each byte; mitogen: ctx.call(() => 0) on a ${kind} child;`,
    "fork IPC: `process.send(0)` to a node `child_process.fork` child sending every message back" +
      (kind === "node" ? "" : " (a node child under --runtime deno too)"),
  ],
};

// ---------------------------------------------------------------------------
// added latency per via hop

async function benchHops(): Promise<void> {
  const name = "added per via hop";
  try {
    const r = await bounded(90_000, async (scope) => {
      const router = scope.add(newRouter());
      const a = await router.local({ runtime, name: "hop1" });
      const b = await router.local({ runtime, name: "hop2", via: a });
      const c = await router.local({ runtime, name: "hop3", via: b });
      const chain = scope.add(RawPeer.relay(rt, 3));
      const ctxs: Context[] = [a, b, c];
      const pings = [0, 1, 2].map((v) => new Uint8Array([v]));
      const mitoAt = (d: number) => perOpMicros(() => (ctxs[d] as Context).call(zero), P.hopOps, P.hopMs);
      const rawAt = (d: number) => perOpMicros(() => chain.roundTrip(pings[d] as Uint8Array), P.hopOps, P.hopMs);
      for (let d = 0; d < 3; d++) {
        await perOpMicros(() => (ctxs[d] as Context).call(zero), 2000, 800);
        await perOpMicros(() => chain.roundTrip(pings[d] as Uint8Array), 2000, 800);
      }
      const depth = { mito: [[], [], []] as number[][], raw: [[], [], []] as number[][] };
      const perHop = await rounds(
        P.rounds,
        25_000 * P.budget,
        async () => {
          const l = [await mitoAt(0), await mitoAt(1), await mitoAt(2)];
          for (const [d, x] of l.entries()) depth.mito[d]?.push(x);
          return ((l[2] as number) - (l[0] as number)) / 2;
        },
        async () => {
          const l = [await rawAt(0), await rawAt(1), await rawAt(2)];
          for (const [d, x] of l.entries()) depth.raw[d]?.push(x);
          return ((l[2] as number) - (l[0] as number)) / 2;
        },
      );
      return { ...perHop, depth };
    });
    const m = stats(r.mito);
    const q = ratios(r.mito, r.raw);
    row(name, spread(m, 1, " us"), spread(stats(r.raw), 1, " us"), ratioCell(r, q, 2, "x"), "<= 1.0x", q.median <= 1 ? "PASS" : "MISS");
    const med = (xs: number[][]) => xs.map((x) => num(stats(x).median, 1)).join(" / ");
    detail(`round trip 1 / 2 / 3 hops deep: mitogen ${med(r.depth.mito)} us; raw relay chain ${med(r.depth.raw)} us`);
  } catch (err) {
    failed(name, err);
  }
}

/** What one via hop adds to a call's round trip. */
export const viaHop: Measure = {
  key: "hops",
  run: benchHops,
  reference: () => [`(3 hops - 1 hop) / 2; raw: one byte through a chain of ${kind} processes relaying on stdio; mitogen: local() via local() via local()`],
};

// ---------------------------------------------------------------------------
// a call on an imported module vs a plain ctx.call

type ZeroModule = typeof import("./fixtures/zero.ts");

async function benchModuleCall(): Promise<void> {
  const name = "imported fn vs ctx.call";
  try {
    const r = await bounded(60_000, async (scope) => {
      const router = scope.add(newRouter());
      const ctx = await router.local({ runtime, name: "modcall" });
      const mod = await ctx.import<ZeroModule>(new URL("./fixtures/zero.ts", import.meta.url));
      const viaModule = () => mod.zero();
      const viaCall = () => ctx.call(zero);
      await perOpMicros(viaModule, 3000, 1500);
      await perOpMicros(viaCall, 3000, 1500);
      return rounds(
        P.rounds,
        15_000 * P.budget,
        () => perOpMicros(viaModule, P.rttOps, P.rttMs),
        () => perOpMicros(viaCall, P.rttOps, P.rttMs),
      );
    });
    ratioRow(name, r, 1, " us", 1.1, "<= 1.10x");
  } catch (err) {
    failed(name, err);
  }
}

/** A call on an imported module against a plain ctx.call. */
export const moduleCall: Measure = {
  key: "module-call",
  run: benchModuleCall,
  reference: () => ["not raw: a plain ctx.call(() => 0) on the same child, interleaved with `await mod.zero()` of an imported module"],
};

// ---------------------------------------------------------------------------
// a service call vs a plain ctx.call of the same work

type ZeroServiceModule = typeof import("./fixtures/zero-service.ts");

async function benchServiceCall(): Promise<void> {
  const name = "callService vs ctx.call";
  try {
    const r = await bounded(60_000, async (scope) => {
      const router = scope.add(newRouter());
      const ctx = await router.local({ runtime, name: "svccall" });
      const mod = await ctx.import<ZeroServiceModule>(new URL("./fixtures/zero-service.ts", import.meta.url));
      await mod.serveZero();
      const viaService = () => ctx.callService("bench.zero", "zero");
      const viaCall = () => ctx.call(zero);
      await perOpMicros(viaService, 3000, 1500);
      await perOpMicros(viaCall, 3000, 1500);
      return rounds(
        P.rounds,
        15_000 * P.budget,
        () => perOpMicros(viaService, P.rttOps, P.rttMs),
        () => perOpMicros(viaCall, P.rttOps, P.rttMs),
      );
    });
    ratioRow(name, r, 1, " us", 1.1, "<= 1.10x");
  } catch (err) {
    failed(name, err);
  }
}

/** A service call against a plain ctx.call of the same work. */
export const serviceCall: Measure = {
  key: "service-call",
  run: benchServiceCall,
  reference: () => ['not raw: a plain ctx.call(() => 0) on the same child, interleaved with `ctx.callService("bench.zero", "zero")` of a service served there'],
};

// ---------------------------------------------------------------------------
// 1000 concurrent calls to one child

const CONCURRENT = 1000;
/** The size of each raw message of the concurrent calls' reference: about a small call frame's header. */
const CONCURRENT_MSG = 32;

async function benchConcurrent(): Promise<void> {
  const name = `${CONCURRENT} concurrent calls (/s)`;
  try {
    const r = await bounded(60_000, async (scope) => {
      const router = scope.add(newRouter());
      const ctx = await router.local({ runtime, name: "concurrent" });
      const peer = scope.add(RawPeer.echo(rt));
      const msgs = Array.from({ length: CONCURRENT }, (_, i) => new Uint8Array(CONCURRENT_MSG).fill(i & 0xff));
      const calls = async () => {
        const got = await Promise.all(Array.from({ length: CONCURRENT }, () => ctx.call(zero)));
        if (got.length !== CONCURRENT || got.some((x) => x !== 0)) throw new Error("a concurrent call returned something other than 0");
      };
      const burst = () => peer.roundTripMany(msgs);
      // per second, from the microseconds one burst of CONCURRENT takes
      const rate = async (op: () => Promise<void>) => (CONCURRENT * 1e6) / (await perOpMicros(op, P.burstOps, P.burstMs));
      await perOpMicros(calls, 5, 1500);
      await perOpMicros(burst, 5, 1500);
      return rounds(
        P.rounds,
        15_000 * P.budget,
        () => rate(calls),
        () => rate(burst),
      );
    });
    const q = ratios(r.mito, r.raw);
    const pct: Stats = { median: q.median * 100, min: q.min * 100, max: q.max * 100, n: q.n };
    const k = (s: Stats): Stats => ({ median: s.median / 1000, min: s.min / 1000, max: s.max / 1000, n: s.n });
    row(
      name,
      spread(k(stats(r.mito)), 1, "k"),
      spread(k(stats(r.raw)), 1, "k"),
      ratioCell(r, pct, 1, "%"),
      ">= 50% of raw",
      pct.median >= 50 ? "PASS" : "MISS",
    );
  } catch (err) {
    failed(name, err);
  }
}

/** A thousand calls at once to one child, per second. */
export const concurrentCalls: Measure = {
  key: "concurrent",
  run: benchConcurrent,
  reference: () => [
    `${CONCURRENT} messages of ${CONCURRENT_MSG} bytes, each its own write, to a ${kind} child echoing stdin to stdout, until all are back, per second;`,
    `mitogen: Promise.all of ${CONCURRENT} ctx.call(() => 0) started at once on one ${kind} child, per second`,
  ],
};
