/**
 * The benchmark suite (`npm run bench`). Every line sets mitogen against a
 * raw reference of the same shape measured in the same run, in alternating
 * order round by round, and reports the median of the rounds with the
 * spread (min..max) and its goal.
 *
 *   node --import tsx bench/run.ts [--runtime node|deno] [--quick] [--only 1,3,11]
 *
 * Line 12 runs once per runtime of the matrix (tests/matrix.ts) that is
 * installed (`bash .ci/install-runtimes`). Lines 9, 10, 13 (two hops), 14, 19
 * and 20 run on the netns hosts of tests/hosts.ts (root and sshd), or say why
 * they skip. The footer explains each line's raw reference. For CPU profiles
 * of the call path, see bench/profile.ts.
 *
 * @module
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, realpathSync, rmSync, writeFileSync, writeSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { bundle } from "../bundler.ts";
import {
  type CallContext,
  type Context,
  connect,
  fakessh,
  generateKeyPair,
  type LogRecord,
  Receiver,
  Router,
  type Sender,
  type SshOptions,
  takesRouter,
} from "../mod.ts";
import { DENO_EVAL, firstStage, shellQuote } from "../parent.ts";
import { payloads } from "../payload.ts";
import { bounded, cell, num, perOpMicros, pool, type Scope, type Stats, spread, stats, timeMs } from "./lib.ts";
import { setupHosts, type TestHosts, teardownHosts } from "../lab/hosts.ts";
import { matrix } from "../lab/matrix.ts";
import { commandToExit, ForkPeer, killAll, RawPeer, type Runtime, remoteEcho, spawnToExit, streamFrom } from "./raw.ts";

const { values } = parseArgs({
  options: {
    runtime: { type: "string", default: "node" },
    quick: { type: "boolean", default: false },
    only: { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
});
if (values.help) {
  console.log("usage: node --import tsx bench/run.ts [--runtime node|deno] [--quick] [--only 1,3,11,19]");
  console.log("lines: 1-8, 11, 12, 15-18 local; 9, 10, 13 (two hops), 14, 19, 20 on the test hosts (root); profiles: bench/profile.ts");
  process.exit(0);
}
const kind = values.runtime;
if (kind !== "node" && kind !== "deno") {
  console.error(`bench: --runtime must be node or deno, not ${JSON.stringify(kind)}`);
  process.exit(2);
}
const quick = values.quick;
/** Line numbers to run (`--only 1,3`); all when not given. */
const only = values.only ? new Set(values.only.split(",").map(Number)) : null;
const wanted = (line: number) => !only || only.has(line);

// The deno binary: the project's own, else whatever PATH has.
const localDeno = fileURLToPath(new URL("../node_modules/.bin/deno", import.meta.url));
const denoExe = existsSync(localDeno) ? localDeno : "deno";
const rt: Runtime = kind === "node" ? { kind, exe: process.execPath } : { kind, exe: denoExe };
/** What `router.local({ runtime })` gets: "node" means this very node binary, a deno path is taken as is. */
const runtime = kind === "node" ? "node" : denoExe;

/**
 * Rounds and per-round budgets. Everything is bounded by count and by time.
 * burst*: line 18's bursts per round; bulkRounds: lines 11 and 13 (1 GiB and 256 MiB transfers).
 */
const P = quick
  ? {
      rounds: 3,
      rttOps: 1000,
      rttMs: 250,
      bootPer: 2,
      echoPer: 1,
      echoRounds: 3,
      hopOps: 600,
      hopMs: 150,
      fleetRounds: 1,
      sshRounds: 4,
      burstOps: 10,
      burstMs: 250,
      bulkRounds: 2,
      budget: 0.5,
    }
  : {
      rounds: 7,
      rttOps: 3000,
      rttMs: 400,
      bootPer: 3,
      echoPer: 1,
      echoRounds: 5,
      hopOps: 2000,
      hopMs: 300,
      fleetRounds: 3,
      sshRounds: 8,
      burstOps: 30,
      burstMs: 400,
      bulkRounds: 3,
      budget: 1,
    };
const FLEET = 100;
const FLEET_CONCURRENCY = 8;
/** Line 3's two sizes. */
const ECHO_SIZES = [16 * 1024 * 1024, 64 * 1024 * 1024] as const;
const BIG_MODULE_BYTES = 200 * 1024;
const BIG_CHILDREN = 10;

// Whole-run guard: whatever hangs, the run ends (raw children killed; mitogen children see their parent go and exit;
// the test hosts of lines 9 and 10, if up, torn down within 5 s).
const HARD_LIMIT_MS = quick ? 240_000 : 600_000;
let hostsUp = false;
setTimeout(() => {
  console.error(`bench: gave up after ${HARD_LIMIT_MS / 1000} s`);
  killAll();
  const down = hostsUp ? teardownHosts().catch(() => {}) : Promise.resolve();
  void Promise.race([down, new Promise((r) => setTimeout(r, 5000))]).finally(() => process.exit(1));
}, HARD_LIMIT_MS).unref();

// Library log records (child output, warnings) are kept and shown at the end, not mixed into the table.
const logged: LogRecord[] = [];
const log = (rec: LogRecord) => {
  if (rec.source !== "log" || rec.level === "warn" || rec.level === "error") logged.push(rec);
};
const newRouter = () => new Router({ log });

const zero = () => 0;
// Shipped as source to every runtime of line 12: no `process` on Deno 1.x, no `?.` on Node 12.
const pidOf = () => {
  const deno = (globalThis as { Deno?: { pid: number } }).Deno;
  return deno ? deno.pid : process.pid;
};
const echo = (b: Uint8Array) => b;

// ---------------------------------------------------------------------------
// Output

type Verdict = "PASS" | "MISS" | "FAIL" | "ERROR" | "SKIP";
const W = { name: 38, side: 28, ratio: 26, goal: 24 };
const lines: Verdict[] = [];

function row(name: string, mito: string, raw: string, ratio: string, goal: string, verdict: Verdict | ""): void {
  if (verdict) lines.push(verdict);
  console.log(`${cell(name, W.name)}${cell(mito, W.side)}${cell(raw, W.side)}${cell(ratio, W.ratio)}${cell(goal, W.goal)}${verdict}`);
}
function detail(text: string): void {
  console.log(`${" ".repeat(4)}${text}`);
}
function failed(name: string, err: unknown): void {
  row(name, `ERROR: ${err instanceof Error ? err.message : String(err)}`, "", "", "", "ERROR");
}

/** Paired per-round ratios a[i] / b[i] (rounds where b is not positive are skipped). */
function ratios(a: readonly number[], b: readonly number[]): Stats {
  return stats(a.map((x, i) => x / (b[i] ?? Number.NaN)).filter((r, i) => (b[i] ?? 0) > 0 && Number.isFinite(r)));
}

/** What rounds() measured: one value per round and side. */
interface Rounds {
  mito: number[];
  raw: number[];
  /** Rounds planned (fewer ran if the budget ran out). */
  planned: number;
}

/**
 * Run `mito` and `raw` once each per round, alternating which goes first.
 * After at least 2 rounds, no new round starts once `budgetMs` has passed
 * (a busy machine then gets fewer rounds rather than a run twice as long).
 */
async function rounds(n: number, budgetMs: number, mito: () => Promise<number>, raw: () => Promise<number>): Promise<Rounds> {
  const [m = [], r = []] = await roundsOf(n, budgetMs, [mito, raw]);
  return { mito: m, raw: r, planned: n };
}

/**
 * As {@link rounds}, for any number of sides: each round runs every side
 * once, the order rotating round by round (round 0 starts with the second
 * side, so two sides alternate as rounds() always did). One series per side.
 */
async function roundsOf(n: number, budgetMs: number, sides: readonly (() => Promise<number>)[]): Promise<number[][]> {
  const out = sides.map((): number[] => []);
  const end = performance.now() + budgetMs;
  for (let r = 0; r < n && (r < 2 || performance.now() < end); r++) {
    for (let k = 0; k < sides.length; k++) {
      const i = (r + 1 + k) % sides.length;
      out[i]?.push(await (sides[i] as () => Promise<number>)());
    }
  }
  return out;
}

/** A row of mitogen against raw (values with `digits` and `unit`), ratios paired per round, PASS at a median ratio <= `goal`. */
function ratioRow(name: string, r: Rounds, digits: number, unit: string, goal: number, label: string): void {
  const q = ratios(r.mito, r.raw);
  row(name, spread(stats(r.mito), digits, unit), spread(stats(r.raw), digits, unit), ratioCell(r, q, 2, "x"), label, q.median <= goal ? "PASS" : "MISS");
}

/** A detail line's figures: `mitogen <spread>, raw <spread>, ratio <paired ratios>`. */
function pairText(r: Pick<Rounds, "mito" | "raw">, digits: number, unit: string): string {
  return `mitogen ${spread(stats(r.mito), digits, unit)}, raw ${spread(stats(r.raw), digits, unit)}, ratio ${spread(ratios(r.mito, r.raw), 2, "x")}`;
}

/** The ratio column: paired ratios, and the round count when fewer ran than planned. */
function ratioCell(r: Rounds, q: Stats, digits: number, unit: string): string {
  return spread(q, digits, unit) + (r.mito.length < r.planned ? ` n=${r.mito.length}` : "");
}

// ---------------------------------------------------------------------------
// 1. call round-trip

async function benchRoundTrip(): Promise<void> {
  const name = "1 call round-trip";
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

// ---------------------------------------------------------------------------
// 2. bootstrap + first call

/**
 * Resolve once process `pid` is gone (reaped). `Context.shutdown({ wait: true })`
 * and router disposal resolve when the stream closes, which can be before the
 * child has exited; the raw reference waits for exit, so this side does too.
 */
async function waitGone(pid: number, limitMs = 5000): Promise<void> {
  const end = performance.now() + limitMs;
  for (;;) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    if (performance.now() > end) throw new Error(`child ${pid} still exists ${limitMs} ms after shutdown`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** One `router.local()` + one call + shutdown (to the child's exit), with a router of its own. */
async function bootOnce(scope: Scope, exe: string = runtime): Promise<void> {
  let pid: number;
  {
    await using router = scope.add(newRouter());
    const ctx = await router.local({ runtime: exe, name: "boot", connectTimeout: 20_000 });
    pid = await ctx.call(pidOf);
  }
  await waitGone(pid);
}

/** An environment variable that Node acts on at every start (see benchBoot). */
const CA_CERTS = "NODE_EXTRA_CA_CERTS";

async function benchBoot(): Promise<void> {
  const name = "2 bootstrap + first call";
  try {
    const r = await bounded(90_000, async (scope) => {
      const boot = () => bootOnce(scope);
      const avg = async (fn: () => Promise<void>) => {
        let total = 0;
        for (let i = 0; i < P.bootPer; i++) total += await timeMs(fn);
        return total / P.bootPer;
      };
      await avg(boot);
      await avg(() => spawnToExit(rt));
      const main = await rounds(
        P.rounds,
        20_000 * P.budget,
        () => avg(boot),
        () => avg(() => spawnToExit(rt)),
      );
      // Node reads the file that NODE_EXTRA_CA_CERTS names at every start (30 to 80 ms here, by version), which
      // both sides pay: without it the ratio is what a machine without the variable sees.
      const certs = process.env[CA_CERTS];
      if (certs === undefined) return { main, clean: null };
      delete process.env[CA_CERTS];
      try {
        const clean = await rounds(
          P.rounds,
          20_000 * P.budget,
          () => avg(boot),
          () => avg(() => spawnToExit(rt, 20_000, [CA_CERTS])),
        );
        return { main, clean };
      } finally {
        process.env[CA_CERTS] = certs;
      }
    });
    ratioRow(name, r.main, 1, " ms", 1.1, "<= 1.1x");
    if (r.clean) detail(`${CA_CERTS} is set here; without it on both sides: ${pairText(r.clean, 1, " ms")}`);
  } catch (err) {
    failed(name, err);
  }
}

// ---------------------------------------------------------------------------
// 12. bootstrap + first call on every runtime of the matrix

async function benchMatrix(): Promise<void> {
  for (const m of matrix()) {
    const name = `12 boot + call, ${m.runtime ?? m.name}`;
    if (!m.runtime) {
      row(name, "not installed", "", "", "<= 1.3x", "SKIP");
      continue;
    }
    try {
      const own: Runtime = { kind: m.kind, exe: m.exe };
      const per = quick ? 1 : 2;
      const avg = async (fn: () => Promise<void>) => {
        let total = 0;
        for (let i = 0; i < per; i++) total += await timeMs(fn);
        return total / per;
      };
      const r = await bounded(60_000, async (scope) => {
        const boot = () => bootOnce(scope, m.exe);
        await avg(boot);
        await avg(() => spawnToExit(own));
        return rounds(
          quick ? 3 : 5,
          8_000 * P.budget,
          () => avg(boot),
          () => avg(() => spawnToExit(own)),
        );
      });
      ratioRow(name, r, 1, " ms", 1.3, "<= 1.3x");
    } catch (err) {
      failed(name, err);
    }
  }
}

// ---------------------------------------------------------------------------
// 3. 16 MiB and 64 MiB echo throughput

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
  const name = (mib: number) => `3 ${mib} MiB echo (MB/s)`;
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

// ---------------------------------------------------------------------------
// 11. 1 GiB through a Sender (flow control)

const STREAM_BLOCKS = 64;
const STREAM_BLOCK = 16 * 1024 * 1024;

/** RSS of this process in MiB. */
const rssMiB = () => process.memoryUsage().rss / 1048576;

async function benchStream(): Promise<void> {
  const name = "11 1 GiB Sender stream (MB/s)";
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

// ---------------------------------------------------------------------------
// 15 and 16. sessions attached to a listener in a local child

const ATTACH_NAME = "15 attach + first call";
const SESSION_RTT_NAME = "16 call RTT, TCP session";

async function benchSessions(): Promise<void> {
  const dir = mkdtempSync(join(os.tmpdir(), "mitogen-bench-listen-"));
  try {
    const r = await bounded(120_000, async (scope) => {
      const router = scope.add(newRouter());
      const a = await router.local({ runtime, name: "listener" });
      const path = join(dir, "l.sock");
      const server = generateKeyPair();
      const client = generateKeyPair();
      const listen = takesRouter(async (o: { path: string; tcp: Parameters<Router["listen"]>[0] }, call: CallContext) => {
        const g = globalThis as unknown as { kept?: unknown[] };
        const u = await call.router.listen({ path: o.path });
        const t = await call.router.listen(o.tcp);
        (g.kept ??= []).push(u, t);
        return t.port;
      });
      const port = (await a.call(listen, { path, tcp: { host: "127.0.0.1", port: 0, keyPair: server, authorizedKeys: [client.publicKey] } })) as number;
      const attachOnce = () =>
        timeMs(async () => {
          const s = await connect({ path, log });
          await s.context.call(zero);
          await s.close();
        });
      const bootOnce = () =>
        timeMs(async () => {
          const ctx = await router.local({ runtime, name: "fresh" });
          await ctx.call(zero);
          await ctx.shutdown({ wait: true });
        });
      await attachOnce();
      await bootOnce();
      const attach = await rounds(P.rounds, 20_000 * P.budget, attachOnce, bootOnce);
      const session = await connect({ host: "127.0.0.1", port, keyPair: client, serverKey: server.publicKey, log });
      scope.add({ [Symbol.asyncDispose]: () => session.close() });
      const viaSession = () => session.context.call(zero);
      const direct = () => a.call(zero);
      await perOpMicros(viaSession, 3000, 1500);
      await perOpMicros(direct, 3000, 1500);
      const rtt = await rounds(
        P.rounds,
        15_000 * P.budget,
        () => perOpMicros(viaSession, P.rttOps, P.rttMs),
        () => perOpMicros(direct, P.rttOps, P.rttMs),
      );
      return { attach, rtt };
    });
    ratioRow(ATTACH_NAME, r.attach, 1, " ms", 0.2, "<= 0.2x");
    ratioRow(SESSION_RTT_NAME, r.rtt, 1, " us", 1.3, "<= 1.3x");
  } catch (err) {
    failed(`${ATTACH_NAME} / ${SESSION_RTT_NAME}`, err);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------
// 17. the command line: `mitogen run` of `true` on 20 local targets

const CLI_NAME = "17 mitogen run, 20 local";
const CLI_TARGETS = 20;
const CLI_FORKS = 10;

async function benchCli(): Promise<void> {
  try {
    const dist = fileURLToPath(new URL("../dist/mitogen.mjs", import.meta.url));
    const targets = Array.from({ length: CLI_TARGETS }, () => "local").join(",");
    const runtimeFlag = kind === "deno" ? ["--runtime", denoExe] : ["--runtime", "node"];
    const r = await bounded(240_000, async () => {
      const mito = () =>
        timeMs(() => commandToExit([process.execPath, dist, "run", targets, "--forks", String(CLI_FORKS), "--json", ...runtimeFlag, "--", "true"], 60_000));
      const raw = () => timeMs(() => pool(CLI_TARGETS, CLI_FORKS, performance.now() + 60_000, () => spawnToExit(rt)));
      await mito();
      await raw();
      return rounds(P.fleetRounds, 60_000 * P.budget, mito, raw);
    });
    ratioRow(CLI_NAME, r, 0, " ms", 1.3, "<= 1.3x");
  } catch (err) {
    failed(CLI_NAME, err);
  }
}

// ---------------------------------------------------------------------------
// 18. 1000 concurrent calls to one child

const CONCURRENT = 1000;
/** The size of each raw message of line 18: about a small call frame's header. */
const CONCURRENT_MSG = 32;

async function benchConcurrent(): Promise<void> {
  const name = `18 ${CONCURRENT} concurrent calls (/s)`;
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

// ---------------------------------------------------------------------------
// 4. added latency per via hop

async function benchHops(): Promise<void> {
  const name = "4 added per via hop";
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

// ---------------------------------------------------------------------------
// 5. a fleet of 100 short-lived contexts

async function benchFleet(): Promise<void> {
  const name = `5 ${FLEET} starts, ${FLEET_CONCURRENCY} at a time`;
  try {
    const r = await bounded(200_000, async (scope) => {
      const router = scope.add(newRouter());
      const deadline = () => performance.now() + 60_000;
      const mito = async (count: number) =>
        (await timeMs(() =>
          pool(count, FLEET_CONCURRENCY, deadline(), async (i) => {
            const ctx = await router.local({ runtime, name: `fleet.${i}`, connectTimeout: 30_000 });
            const pid = await ctx.call(pidOf);
            await ctx.shutdown({ wait: true });
            await waitGone(pid);
          }),
        )) / 1000;
      const raw = async (count: number) => (await timeMs(() => pool(count, FLEET_CONCURRENCY, deadline(), () => spawnToExit(rt)))) / 1000;
      await mito(FLEET_CONCURRENCY);
      await raw(FLEET_CONCURRENCY);
      return rounds(
        P.fleetRounds,
        40_000 * P.budget,
        () => mito(FLEET),
        () => raw(FLEET),
      );
    });
    ratioRow(name, r, 2, " s", 1.1, "<= 1.1x");
  } catch (err) {
    failed(name, err);
  }
}

// ---------------------------------------------------------------------------
// 6. sizes

async function benchSizes(): Promise<void> {
  try {
    const built = await payloads();
    // What the parent runs: `<node> -e <first stage> <name>`, `<deno> eval --no-config <flags> <first stage> <name>`.
    for (const k of ["node", "deno"] as const) {
      const argv = k === "node" ? [k, "-e", firstStage(k), "local.1"] : [k, ...DENO_EVAL, firstStage(k), "local.1"];
      const chars = argv.join(" ").length;
      row(`6 first-stage argv (${k})`, `${chars} chars`, "", "", "<= 600 chars", chars <= 600 ? "PASS" : "MISS");
    }
    for (const [which, bytes, raw] of [
      ["", built.core, built.coreRaw],
      [" (node 12)", built.coreLowered, built.coreLoweredRaw],
    ] as const) {
      const kib = bytes.byteLength / 1024;
      const verdict: Verdict = kib > 40 ? "FAIL" : kib <= 24 ? "PASS" : "MISS";
      row(`6 child payload${which}, compressed`, `${num(kib, 1)} KiB`, `(${num(raw / 1024, 1)} KiB raw)`, "", "<= 24 KiB (max 40)", verdict);
    }
  } catch (err) {
    failed("6 sizes", err);
  }
}

// ---------------------------------------------------------------------------
// 7. first import of a 200 KiB module into 10 children below one parent

/** What a generated module exports (see {@link generatedModule}). */
interface Generated {
  summary(): [round: number, rows: number, checksum: number];
}

/**
 * The TypeScript source of a module of about `bytes` for round `round`: a
 * table of pseudo-random rows (so it compresses like real data, not like a
 * run of one byte; different in every round, so every round is a new module)
 * and one exported function, with the answer it must give.
 */
function generatedModule(round: number, bytes: number): { source: string; expect: [number, number, number] } {
  let seed = Math.imul(round + 1, 0x9e3779b1) >>> 0;
  const next = () => (seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0);
  const words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"];
  const parts = [
    `/** Generated by bench/run.ts (line 7), round ${round}. */\n`,
    `export const ROUND = ${round};\n\n`,
    "const TABLE: readonly (readonly [id: number, key: string, weight: number])[] = [\n",
  ];
  const tail =
    "];\n\n" +
    "/** [round, rows, checksum over the table]. */\n" +
    "export function summary(): [round: number, rows: number, checksum: number] {\n" +
    "  let sum = 0;\n" +
    "  for (const [id, key, weight] of TABLE) sum = (sum + id * 31 + key.length + weight) % 1000000007;\n" +
    "  return [ROUND, TABLE.length, sum];\n" +
    "}\n";
  let size = parts.join("").length + tail.length;
  let rows = 0;
  let sum = 0;
  while (size < bytes) {
    const key = `${words[next() % words.length]}-${next().toString(36)}`;
    const weight = next() % 100_000;
    const line = `  [${rows}, "${key}", ${weight}],\n`;
    parts.push(line);
    size += line.length;
    sum = (sum + rows * 31 + key.length + weight) % 1000000007;
    rows++;
  }
  parts.push(tail);
  return { source: parts.join(""), expect: [round, rows, sum] };
}

const sourceLength = (src: string) => src.length;

async function benchFirstImport(): Promise<void> {
  const name = `7 first import, ${BIG_CHILDREN} children`;
  try {
    const r = await bounded(120_000, async (scope) => {
      const dir = mkdtempSync(join(os.tmpdir(), "mitogen-bench-"));
      scope.add({ [Symbol.asyncDispose]: async () => rmSync(dir, { recursive: true, force: true }) });
      const router = scope.add(newRouter());
      const parent = await router.local({ runtime, name: "import-parent", connectTimeout: 30_000 });
      const children: Context[] = [];
      for (let i = 0; i < BIG_CHILDREN; i++) children.push(await router.local({ runtime, name: `import-child.${i}`, via: parent, connectTimeout: 30_000 }));
      let round = 0;
      /** A fresh module file (a new path and a new content hash). */
      const fresh = () => {
        const g = generatedModule(round, BIG_MODULE_BYTES);
        const file = join(dir, `generated-${round++}.ts`);
        writeFileSync(file, g.source);
        return { ...g, url: pathToFileURL(file) };
      };
      const sent = { modules: [] as number[], bytes: [] as number[], bundled: [] as number[], source: [] as number[] };
      /** Import a fresh module in every child and call its export once in each. */
      const importAll = async (m: ReturnType<typeof fresh>) => {
        const mods = await Promise.all(children.map((c) => c.import<Generated>(m.url)));
        const got = await Promise.all(mods.map((mod) => mod.summary()));
        if (got.some((g) => g.join() !== m.expect.join())) throw new Error(`a child's summary() differs from ${m.expect.join()}`);
      };
      const mito = async (record: boolean) => {
        const m = fresh();
        const before = { ...router.stats };
        const ms = await timeMs(() => importAll(m));
        if (record) {
          sent.modules.push(router.stats.modulesSent - before.modulesSent);
          sent.bytes.push(router.stats.moduleBytesSent - before.moduleBytesSent);
          sent.bundled.push((await bundle(m.url)).rawSize);
          sent.source.push(m.source.length);
        }
        return ms;
      };
      const raw = async () => {
        const { source } = generatedModule(round++, BIG_MODULE_BYTES);
        return timeMs(async () => {
          const got = await Promise.all(children.map((c) => c.call(sourceLength, source)));
          if (got.some((n) => n !== source.length)) throw new Error("a child got a source of another length");
        });
      };
      // warm up: the first import in this process also loads esbuild
      const first = await mito(false);
      await raw();
      const measured = await rounds(
        P.rounds,
        20_000 * P.budget,
        () => mito(true),
        () => raw(),
      );
      // Where the time goes, on fresh modules of the same size: esbuild alone, then the import of the bundled module.
      const split = { bundling: [] as number[], shipping: [] as number[] };
      for (let i = 0; i < 2; i++) {
        const m = fresh();
        split.bundling.push(await timeMs(() => bundle(m.url)));
        split.shipping.push(await timeMs(() => importAll(m)));
      }
      return { ...measured, sent, first, split };
    });
    const q = ratios(r.mito, r.raw);
    const modules = stats(r.sent.modules);
    const once = r.sent.modules.length > 0 && r.sent.modules.every((n) => n === 1);
    row(name, spread(stats(r.mito), 1, " ms"), spread(stats(r.raw), 1, " ms"), ratioCell(r, q, 2, "x"), "1 module on link", once ? "PASS" : "MISS");
    const kib = (xs: number[]) => num(stats(xs).median / 1024, 1);
    detail(
      `master sent ${spread(modules, 0)} module(s) per round down its link: ${kib(r.sent.bytes)} KiB compressed ` +
        `(bundled JS ${kib(r.sent.bundled)} KiB, TypeScript ${kib(r.sent.source)} KiB); raw reference sends ${BIG_CHILDREN} x ${kib(r.sent.source)} KiB`,
    );
    detail(
      `split on 2 more fresh modules: esbuild alone ${spread(stats(r.split.bundling), 1, " ms")}, then import + call of the bundled module ` +
        `${spread(stats(r.split.shipping), 1, " ms")}; first import in this process (loads esbuild): ${num(r.first, 1)} ms`,
    );
  } catch (err) {
    failed(name, err);
  }
}

// ---------------------------------------------------------------------------
// 8. call on an imported module vs a plain ctx.call

type ZeroModule = typeof import("./fixtures/zero.ts");

async function benchModuleCall(): Promise<void> {
  const name = "8 imported fn vs ctx.call";
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

// ---------------------------------------------------------------------------
// ---------------------------------------------------------------------------
// 13: putFile of 256 MiB, to a local context (here) and two ssh hops away (with lines 9 and 10)

const PUT_BYTES = 256 * 1024 * 1024;
const PUT_LOCAL = "13 putFile 256 MiB (MB/s)";
const PUT_HOPS = "13 same, 2 ssh hops";

/** A 256 MiB file of changing bytes in a fresh directory (world-writable, for the test user on the hosts). */
function putSource(): { dir: string; src: string } {
  const dir = mkdtempSync(join(os.tmpdir(), "mitogen-bench-put-"));
  chmodSync(dir, 0o777);
  const src = join(dir, "src.bin");
  const block = new Uint8Array(1024 * 1024);
  const fd = openSync(src, "w");
  for (let i = 0; i < PUT_BYTES / block.byteLength; i++) {
    block.fill(i & 0xff);
    writeSync(fd, block);
  }
  closeSync(fd);
  chmodSync(src, 0o644);
  return { dir, src };
}

/** The raw reference: `sh -c <command>` to its exit, in ms. */
function shellMs(command: string, limitMs = 120_000): Promise<number> {
  return timeMs(() => commandToExit(["sh", "-c", command], limitMs));
}

/** stdin to `dst` and fsync it, as mitogen's writer does: for `<runtime> -e` and `deno eval`. */
const stdinToFile = (dst: string) =>
  `const fs=process.getBuiltinModule("node:fs"),w=fs.createWriteStream(${JSON.stringify(dst)});process.stdin.pipe(w);` +
  `w.on("finish",()=>{const fd=fs.openSync(${JSON.stringify(dst)},"r+");fs.fsyncSync(fd);fs.closeSync(fd)})`;

async function benchPutLocal(): Promise<void> {
  const { dir, src } = putSource();
  try {
    const r = await bounded(240_000, async (scope) => {
      const router = scope.add(newRouter());
      const ctx = await router.local({ runtime, name: "put" });
      const mito = async () => {
        const ms = await timeMs(() => ctx.putFile(src, join(dir, "mito.bin")));
        return PUT_BYTES / 1e6 / (ms / 1000);
      };
      const exe = shellQuote(rt.exe);
      const reader = kind === "node" ? `${exe} -e` : `${exe} eval --no-config`;
      const raw = async () => PUT_BYTES / 1e6 / ((await shellMs(`cat ${shellQuote(src)} | ${reader} ${shellQuote(stdinToFile(join(dir, "raw.bin")))}`)) / 1000);
      return rounds(P.bulkRounds, 60_000 * P.budget, mito, raw);
    });
    const q = ratios(r.mito, r.raw);
    const pct: Stats = { median: q.median * 100, min: q.min * 100, max: q.max * 100, n: q.n };
    row(PUT_LOCAL, spread(stats(r.mito), 0), spread(stats(r.raw), 0), ratioCell(r, pct, 1, "%"), ">= 80% of raw", pct.median >= 80 ? "PASS" : "MISS");
  } catch (err) {
    failed(PUT_LOCAL, err);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** putFile to inner through bastion, against `cat file | ssh bastion ssh inner 'cat > dst; sync dst'`. */
async function benchPutHops(hosts: TestHosts): Promise<void> {
  const { dir, src } = putSource();
  try {
    const r = await bounded(240_000, async (scope) => {
      const router = scope.add(newRouter());
      const bastion = await router.ssh(bastionOptions(hosts));
      const inner = await router.ssh({ hostname: hosts.inner.address, via: bastion, name: "inner", connectTimeout: SSH_CONNECT_MS, runtime: hostRuntime });
      const mito = async () => PUT_BYTES / 1e6 / ((await timeMs(() => inner.putFile(src, join(dir, "mito.bin")))) / 1000);
      const dst = shellQuote(join(dir, "raw.bin"));
      const remote = shellQuote(`ssh -T -o BatchMode=yes ${hosts.inner.address} ${shellQuote(`cat > ${dst} && sync ${dst}`)}`);
      const raw = async () =>
        PUT_BYTES / 1e6 / ((await shellMs(`cat ${shellQuote(src)} | ssh -T -F ${shellQuote(hosts.sshConfigFile)} bastion ${remote}`)) / 1000);
      return rounds(P.bulkRounds, 60_000 * P.budget, mito, raw);
    });
    const q = ratios(r.mito, r.raw);
    const pct: Stats = { median: q.median * 100, min: q.min * 100, max: q.max * 100, n: q.n };
    row(
      PUT_HOPS,
      spread(stats(r.mito), 0, " MB/s"),
      spread(stats(r.raw), 0, " MB/s"),
      ratioCell(r, pct, 1, "%"),
      ">= 80% of raw",
      pct.median >= 80 ? "PASS" : "MISS",
    );
  } catch (err) {
    failed(PUT_HOPS, err);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// 9, 10, 13 (two hops), 14, 19 and 20: over ssh, on the test hosts of tests/hosts.ts (network namespaces
// with real sshds on this machine; root only). Set up once for all of them.

const SSH_NAME = "9 ssh boot + call, bastion";
const TREE_NAME = "10 call to root on inner";
/** Setup is well under a second; longer means another process holds the hosts' lock (setup would wait up to 300 s). */
const HOSTS_SETUP_MS = 20_000;
const SSH_CONNECT_MS = 20_000;

/** ssh() to bastion as every ssh line starts it: the harness's ssh_config, the hosts' runtime; `extra` on top. */
const bastionOptions = (hosts: TestHosts, extra: Partial<SshOptions> = {}): SshOptions => ({
  hostname: "bastion",
  sshArgs: ["-F", hosts.sshConfigFile],
  name: "bastion",
  connectTimeout: SSH_CONNECT_MS,
  runtime: hostRuntime,
  ...extra,
});

/**
 * The runtime on the hosts. They share this machine's filesystem but not the
 * runner's PATH: node is on the test user's PATH, deno is taken by absolute path.
 */
const hostRuntime = kind === "node" ? "node" : realpathSync(denoExe);
/** The remote command of the raw reference: the runtime evaluating nothing, as mitogen's first stage starts it. */
const hostEval = kind === "node" ? "node -e ''" : `DENO_NO_UPDATE_CHECK=1 exec ${shellQuote(hostRuntime)} eval ''`;

/**
 * ssh wrappers that record their argv and exec ssh. Given as `sshPath`, they
 * show the bench exactly what mitogen's ssh() runs, so each raw reference uses
 * the same options and config, whatever the library passes today. The hosts
 * share this filesystem, so a wrapper works for an ssh() `via` a host as well.
 */
class SshTap implements AsyncDisposable {
  readonly dir: string;

  constructor() {
    this.dir = mkdtempSync(join(os.tmpdir(), "mitogen-bench-ssh-"));
    chmodSync(this.dir, 0o777); // the test user's ssh (via bastion) writes its argv here
  }

  /** The wrapper recording under `name`. */
  path(name: string): string {
    const file = join(this.dir, `${name}.sh`);
    const out = shellQuote(join(this.dir, `${name}.argv`));
    if (!existsSync(file)) writeFileSync(file, `#!/bin/sh\nprintf '%s\\0' "$@" > ${out}\nexec ssh "$@"\n`, { mode: 0o755 });
    return file;
  }

  /**
   * The ssh command line the wrapper `name` last ran, without its remote
   * command: `["ssh", ...options, "--", host]`.
   */
  prefix(name: string): string[] {
    const argv = readFileSync(join(this.dir, `${name}.argv`), "utf8")
      .split("\0")
      .slice(0, -1);
    if (argv.at(-3) !== "--") throw new Error(`ssh() ran an argv not ending in "-- <host> <command>": ${JSON.stringify(argv)}`);
    return ["ssh", ...argv.slice(0, -1)];
  }

  async [Symbol.asyncDispose](): Promise<void> {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A command line for the footer: words quoted, the config file as <config>. */
function shown(argv: readonly string[], config: string): string {
  return argv.map((w) => (w === config ? "<config>" : shellQuote(w))).join(" ");
}

/** Line 9's raw command line as run (for the footer), once it ran. */
let sshBootShown = "";

/** Where one mitogen ssh boot spent its time (ms). */
interface SshSplit {
  connect: number;
  call: number;
  shutdown: number;
}

/**
 * One `router.ssh()` to bastion + one call + `shutdown({ wait: true })` (which
 * resolves once the ssh client has exited), with a router of its own; then
 * wait until the remote child is gone (the hosts share this machine's pids).
 */
async function sshBootOnce(scope: Scope, hosts: TestHosts, extra: { compression?: boolean; sshPath?: string }, split?: SshSplit[]): Promise<void> {
  let pid: number;
  const t0 = performance.now();
  let t1 = t0;
  let t2 = t0;
  {
    await using router = scope.add(newRouter());
    const ctx = await router.ssh(bastionOptions(hosts, extra));
    t1 = performance.now();
    pid = await ctx.call(pidOf);
    t2 = performance.now();
    await ctx.shutdown({ wait: true });
  }
  await waitGone(pid);
  split?.push({ connect: t1 - t0, call: t2 - t1, shutdown: performance.now() - t2 });
}

async function benchSshBoot(hosts: TestHosts, tap: SshTap): Promise<void> {
  try {
    const r = await bounded(60_000, async (scope) => {
      // Warm up (the first connection pays for sshd's and node's caches on both sides), through the
      // wrappers: what ssh() runs by default, and with compression: true.
      await sshBootOnce(scope, hosts, { sshPath: tap.path("boot") });
      await sshBootOnce(scope, hosts, { compression: true, sshPath: tap.path("boot-c") });
      const argv = { def: [...tap.prefix("boot"), hostEval], c: [...tap.prefix("boot-c"), hostEval] };
      sshBootShown = shown(tap.prefix("boot"), hosts.sshConfigFile);
      const mito = (c: boolean, split?: SshSplit[]) => timeMs(() => sshBootOnce(scope, hosts, c ? { compression: true } : {}, split));
      const raw = (c: boolean) => timeMs(() => commandToExit(c ? argv.c : argv.def, SSH_CONNECT_MS));
      await raw(false);
      await raw(true);
      // Each side measures by default and with compression, the order flipping every round.
      const alt = { mito: [] as number[], raw: [] as number[] };
      const split: SshSplit[] = [];
      const both = async (side: (c: boolean) => Promise<number>, alts: number[], round: number) => {
        let main: number;
        if (round % 2) {
          alts.push(await side(true));
          main = await side(false);
        } else {
          main = await side(false);
          alts.push(await side(true));
        }
        return main;
      };
      let mr = 0;
      let rr = 0;
      const main = await rounds(
        P.sshRounds,
        20_000 * P.budget,
        () => both((c) => mito(c, c ? undefined : split), alt.mito, mr++),
        () => both(raw, alt.raw, rr++),
      );
      return { main, alt, split, compressedByDefault: argv.def.includes("-C") };
    });
    ratioRow(SSH_NAME, r.main, 0, " ms", 1.05, "<= 1.05x");
    detail(`with compression: true (ssh -C on both sides): ${pairText(r.alt, 0, " ms")}${r.compressedByDefault ? " (the default is -C already)" : ""}`);
    const part = (k: keyof SshSplit) => spread(stats(r.split.map((s) => s[k])), 1, " ms");
    detail(`mitogen (default) split: ssh() to connected ${part("connect")}, first call ${part("call")}, shutdown to both exits ${part("shutdown")}`);
  } catch (err) {
    failed(SSH_NAME, err);
  }
}

// ---------------------------------------------------------------------------
// 19 and 20: call round trip one and two ssh hops away, against ssh echo ping-pongs over the same path

const SSH_RTT_NAME = "19 call RTT, 1 ssh hop";
const SSH_RTT2_NAME = "20 call RTT, 2 ssh hops";

/** Lines 19 and 20's raw command lines as run (for the footer). */
const sshRttShown = { one: "", two: "" };

async function benchSshRtt(hosts: TestHosts, tap: SshTap): Promise<void> {
  try {
    const r = await bounded(90_000, async (scope) => {
      const router = scope.add(newRouter());
      // Through the wrappers, which exec ssh: the same processes and pipes as without them.
      const bastion = await router.ssh(bastionOptions(hosts, { sshPath: tap.path("rtt-bastion") }));
      const outer = tap.prefix("rtt-bastion");
      const echoCommand = remoteEcho(rt.kind, hostRuntime);
      sshRttShown.one = shown(outer, hosts.sshConfigFile);
      /** Line 19: bastion, and `ssh bastion <echo>`. */
      const one = async (): Promise<[Context, string[]]> => [bastion, [...outer, echoCommand]];
      /** Line 20: inner via bastion, and bastion's shell running the inner ssh (as bastion's context does), its words quoted once more. */
      const two = async (): Promise<[Context, string[]]> => {
        const inner = await router.ssh({
          hostname: hosts.inner.address,
          via: bastion,
          name: "inner",
          connectTimeout: SSH_CONNECT_MS,
          runtime: hostRuntime,
          sshPath: tap.path("rtt-inner"),
        });
        const prefix = tap.prefix("rtt-inner");
        sshRttShown.two = `${shown(outer, hosts.sshConfigFile)} "${shown(prefix, hosts.sshConfigFile)} <echo>"`;
        return [inner, [...outer, [...prefix, echoCommand].map(shellQuote).join(" ")]];
      };
      const ping = new Uint8Array([1]);
      const out: Partial<Record<"one" | "two", Rounds>> = {};
      for (const [hop, line, setup] of [
        ["one", 19, one],
        ["two", 20, two],
      ] as const) {
        if (!wanted(line)) continue;
        const [ctx, argv] = await setup();
        const peer = scope.add(RawPeer.command(argv));
        const call = () => ctx.call(zero);
        const echo = () => peer.roundTrip(ping);
        // warm up; the first echo also waits for ssh to connect and the remote runtime to start
        await perOpMicros(call, 1000, 800);
        await perOpMicros(echo, 1000, 800 + SSH_CONNECT_MS);
        out[hop] = await rounds(
          P.rounds,
          15_000 * P.budget,
          () => perOpMicros(call, P.hopOps, P.hopMs),
          () => perOpMicros(echo, P.hopOps, P.hopMs),
        );
      }
      return out;
    });
    for (const [name, hop, goal] of [
      [SSH_RTT_NAME, r.one, 1.2],
      [SSH_RTT2_NAME, r.two, 1.3],
    ] as const) {
      if (!hop) continue;
      ratioRow(name, hop, 0, " us", goal, `<= ${goal}x`);
    }
    if (r.one && r.two) {
      const { one, two } = r;
      const added = (side: "mito" | "raw") => num(stats(two[side]).median - stats(one[side]).median, 0);
      detail(`the hop through bastion adds: mitogen ${added("mito")} us (its context relays), raw ${added("raw")} us (bastion's ssh client)`);
    }
  } catch (err) {
    failed([SSH_RTT_NAME, SSH_RTT2_NAME].filter((_, i) => wanted(19 + i)).join(" / "), err);
  }
}

const uidOf = () => process.getuid?.() ?? -1;

async function benchTree(hosts: TestHosts): Promise<void> {
  try {
    const r = await bounded(60_000, async (scope) => {
      const router = scope.add(newRouter());
      const t0 = performance.now();
      const bastion = await router.ssh(bastionOptions(hosts));
      const t1 = performance.now();
      const inner = await router.ssh({ hostname: hosts.inner.address, via: bastion, name: "inner", connectTimeout: SSH_CONNECT_MS, runtime: hostRuntime });
      const t2 = performance.now();
      const root = await router.sudo({ username: "root", password: hosts.password, via: inner, name: "inner-root", connectTimeout: SSH_CONNECT_MS });
      const t3 = performance.now();
      const local = await router.local({ runtime, name: "tree-local" });
      const uids = await Promise.all([inner, root].map((c) => c.call(uidOf)));
      if (uids[0] === 0 || uids[1] !== 0) throw new Error(`expected inner as the test user and root below it, got uids ${uids.join(", ")}`);
      const levels: Context[] = [bastion, inner, root];
      const at = (ctx: Context) => perOpMicros(() => ctx.call(zero), P.hopOps, P.hopMs);
      for (const ctx of [...levels, local]) await perOpMicros(() => ctx.call(zero), 1000, 500);
      const depth: number[][] = [[], [], []];
      const measured = await rounds(
        P.rounds,
        15_000 * P.budget,
        async () => {
          const l = [await at(bastion), await at(inner), await at(root)];
          for (const [d, x] of l.entries()) depth[d]?.push(x);
          return l[2] as number;
        },
        () => at(local),
      );
      return { ...measured, depth, connect: [t1 - t0, t2 - t1, t3 - t2] };
    });
    const q = ratios(r.mito, r.raw);
    row(TREE_NAME, spread(stats(r.mito), 0, " us"), spread(stats(r.raw), 1, " us"), ratioCell(r, q, 1, "x"), "(info: no goal)", "");
    detail(`round trip to bastion / inner / root on inner: ${r.depth.map((x) => num(stats(x).median, 0)).join(" / ")} us (medians)`);
    detail(
      `connecting the tree: ssh bastion ${num(r.connect[0] ?? Number.NaN, 0)} ms, ssh inner via bastion ${num(r.connect[1] ?? Number.NaN, 0)} ms, sudo via inner ${num(r.connect[2] ?? Number.NaN, 0)} ms`,
    );
  } catch (err) {
    failed(TREE_NAME, err);
  }
}

// ---------------------------------------------------------------------------
// 14. rsync of a 1000-file tree through fakessh, against rsync over plain ssh to the same host

const RSYNC_NAME = "14 rsync 1000 files, fakessh";
const RSYNC_FILES = 1000;

async function benchRsync(hosts: TestHosts): Promise<void> {
  const src = mkdtempSync(join(os.tmpdir(), "mitogen-bench-rsync-"));
  // the test user's home on bastion (the hosts share this filesystem): one destination per side
  const home = (spawnSync("getent", ["passwd", hosts.user], { encoding: "utf8" }).stdout.split(":")[5] ?? "").trim();
  const dst = (side: string) => `mitogen-bench-rsync-${process.pid}-${side}`;
  const fresh = (side: string) => rmSync(join(home, dst(side)), { recursive: true, force: true });
  try {
    for (let i = 0; i < RSYNC_FILES; i++) {
      const dir = join(src, `d${i % 20}`);
      if (i < 20) mkdirSync(dir);
      writeFileSync(join(dir, `f${i}`), randomBytes(2048 + (i % 7) * 512));
    }
    const r = await bounded(120_000, async (scope) => {
      const router = scope.add(newRouter());
      const bastion = await router.ssh(bastionOptions(hosts));
      const mito = () =>
        timeMs(async () => {
          fresh("mito");
          const code = await fakessh.run(bastion, router, ["rsync", "-a", `${src}/`, `bastion:${dst("mito")}/`], { stdio: "ignore" });
          if (code !== 0) throw new Error(`rsync through fakessh exited with ${code}`);
        });
      const ssh = `ssh -T -o BatchMode=yes -o StrictHostKeyChecking=yes -F ${shellQuote(hosts.sshConfigFile)}`;
      const raw = () =>
        timeMs(async () => {
          fresh("raw");
          await commandToExit(["rsync", "-a", "-e", ssh, `${src}/`, `bastion:${dst("raw")}/`], 60_000);
        });
      await mito();
      await raw();
      return rounds(P.sshRounds, 30_000 * P.budget, mito, raw);
    });
    ratioRow(RSYNC_NAME, r, 0, " ms", 1.2, "<= 1.2x");
  } catch (err) {
    failed(RSYNC_NAME, err);
  } finally {
    rmSync(src, { recursive: true, force: true });
    fresh("mito");
    fresh("raw");
  }
}

/** Set up the test hosts (bounded), run lines 9, 10, 13, 14, 19 and 20 on them, tear them down. Where they cannot be set up, both lines say why. */
async function benchHosts(): Promise<void> {
  const skipBoth = (why: string) => {
    if (wanted(9)) row(SSH_NAME, `SKIP: ${why}`, "", "", "<= 1.05x", "SKIP");
    if (wanted(10)) row(TREE_NAME, `SKIP: ${why}`, "", "", "(info: no goal)", "SKIP");
    if (wanted(13)) row(PUT_HOPS, `SKIP: ${why}`, "", "", ">= 80% of raw", "SKIP");
    if (wanted(14)) row(RSYNC_NAME, `SKIP: ${why}`, "", "", "<= 1.2x", "SKIP");
    if (wanted(19)) row(SSH_RTT_NAME, `SKIP: ${why}`, "", "", "<= 1.2x", "SKIP");
    if (wanted(20)) row(SSH_RTT2_NAME, `SKIP: ${why}`, "", "", "<= 1.3x", "SKIP");
  };
  const setup = setupHosts();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<"late">((resolve) => (timer = setTimeout(() => resolve("late"), HOSTS_SETUP_MS)));
  let hosts: TestHosts;
  try {
    const got = await Promise.race([setup, late]);
    if (got === "late") {
      // Whatever the setup still builds is torn down when it is done (waited for a little, below).
      const cleanup = setup.then((h) => ("skip" in h ? undefined : teardownHosts())).catch(() => {});
      skipBoth(`test hosts not set up within ${HOSTS_SETUP_MS / 1000} s (another process holding them?)`);
      await Promise.race([cleanup, new Promise((r) => setTimeout(r, 5000))]);
      return;
    }
    if ("skip" in got) return skipBoth(got.skip);
    hosts = got;
  } catch (err) {
    return skipBoth(`test hosts: setup failed: ${err instanceof Error ? err.message.split("\n")[0] : String(err)}`);
  } finally {
    clearTimeout(timer);
  }
  hostsUp = true;
  try {
    await using tap = new SshTap();
    if (wanted(9)) await benchSshBoot(hosts, tap);
    if (wanted(19) || wanted(20)) await benchSshRtt(hosts, tap);
    if (wanted(10)) await benchTree(hosts);
    if (wanted(13)) await benchPutHops(hosts);
    if (wanted(14)) await benchRsync(hosts);
  } finally {
    try {
      await teardownHosts();
    } catch (err) {
      detail(`test hosts: teardown failed: ${err instanceof Error ? err.message : String(err)}`);
    }
    hostsUp = false;
  }
}

// ---------------------------------------------------------------------------

function machine(): string {
  const cpu = os.cpus()[0]?.model.trim() ?? "unknown cpu";
  let extra = "";
  if (kind === "deno") {
    const v = spawnSync(denoExe, ["--version"], { encoding: "utf8", timeout: 10_000 });
    extra = `, ${v.stdout?.split("\n")[0]?.trim() || "deno ?"}`;
  }
  const load = os
    .loadavg()
    .map((x) => x.toFixed(2))
    .join(" ");
  return `${cpu}, ${os.cpus().length} cores, ${os.platform()} ${os.arch()}, node ${process.version}${extra}; load average ${load}`;
}

async function main(): Promise<number> {
  const t0 = performance.now();
  console.log(`mitogen bench on ${machine()}`);
  console.log(
    `children: ${kind}; ${quick ? "quick; " : ""}median [min..max] of ${P.rounds} rounds (line 3: ${P.echoRounds}, line 5: ${P.fleetRounds}, line 9: ${P.sshRounds}, lines 11 and 13: ${P.bulkRounds}); ` +
      "ratio = mitogen / raw, paired per round; verdict on the median (line 3: on the worst round)",
  );
  console.log("");
  row("measure", "mitogen", "raw reference", "ratio", "goal", "");
  const suite: [number[], () => Promise<void>][] = [
    [[1], benchRoundTrip],
    [[2], benchBoot],
    [[3], benchThroughput],
    [[4], benchHops],
    [[5], benchFleet],
    [[6], benchSizes],
    [[7], benchFirstImport],
    [[8], benchModuleCall],
    [[18], benchConcurrent],
    [[11], benchStream],
    [[12], benchMatrix],
    [[13], benchPutLocal],
    [[15, 16], benchSessions],
    [[17], benchCli],
    [[9, 10, 13, 14, 19, 20], benchHosts],
  ];
  for (const [nums, run] of suite) if (nums.some(wanted)) await run();
  console.log("");
  console.log("raw references, measured in this run:");
  const bare = kind === "node" ? "node -e ''" : "deno eval --no-config ''";
  const legend: [number, string[]][] = [
    [
      1,
      [
        `one byte ping-pong over stdin/stdout with a ${kind} child echoing each byte; mitogen: ctx.call(() => 0) on a ${kind} child;`,
        "fork IPC: `process.send(0)` to a node `child_process.fork` child sending every message back" +
          (kind === "node" ? "" : " (a node child under --runtime deno too)"),
      ],
    ],
    [2, [`spawn of \`${bare}\` to its exit (mitogen: new Router, local(), one call, shutdown, child exited)`]],
    [
      3,
      [
        `one 16 MiB, and one 64 MiB, block written to a ${kind} child echoing stdin to stdout as it arrives, until all of it is back (MB = 10^6 bytes);`,
        "mitogen: ctx.call(echo, block) returning the block; the verdict is on the worst round",
      ],
    ],
    [4, [`(3 hops - 1 hop) / 2; raw: one byte through a chain of ${kind} processes relaying on stdio; mitogen: local() via local() via local()`]],
    [5, [`${FLEET} x \`${bare}\` spawn-to-exit; mitogen: local() + one call + shutdown + child exited, each`]],
    [
      7,
      [
        `the same ${BIG_CHILDREN} children (all via one parent) each get the module's TypeScript source as the argument of one ctx.call (the bytes shipped ${BIG_CHILDREN} times);`,
        `mitogen: ctx.import of a freshly generated ~${BIG_MODULE_BYTES / 1024} KiB module in all ${BIG_CHILDREN} (esbuild, fetch, evaluate) + one call of its export in each; ` +
          "verdict: router.stats.modulesSent delta == 1 in every round",
      ],
    ],
    [8, ["not raw: a plain ctx.call(() => 0) on the same child, interleaved with `await mod.zero()` of an imported module"]],
    [
      9,
      [
        `\`${sshBootShown || "ssh <the options mitogen's ssh() passed> -- bastion"} ${JSON.stringify(hostEval)}\` spawn to exit;`,
        "the options are those mitogen's ssh() ran (recorded by an sshPath wrapper), by default on the main line and with compression: true in the detail;",
        "mitogen: new Router, ssh() with -F <config>, one call, shutdown, ssh and remote child exited",
      ],
    ],
    [
      10,
      [
        "not raw: ctx.call(() => 0) round trip to a local child of the same master; mitogen: the same call to root on inner, master -> ssh bastion -> ssh inner -> sudo root",
      ],
    ],
    [
      11,
      [
        `a ${kind} child writes ${STREAM_BLOCKS} x 16 MiB to its stdout, read here until all of it is in; ` +
          "mitogen: the child sends the same blocks through a Sender (`await s.send(block)`) to a Receiver here that unpickles each",
      ],
    ],
    [12, ["spawn to exit of the same binary evaluating nothing, per runtime (mitogen: as line 2, on that runtime)"]],
    [
      13,
      [
        `\`cat <256 MiB file> | ${kind === "node" ? "node -e" : "deno eval"} '<stdin to a file, then fsync>'\` to its exit; two hops: \`cat <file> | ssh bastion ssh <inner> 'cat > dst && sync dst'\`;`,
        "mitogen: ctx.putFile of the same file (temporary file, sha256 on both ends, fsync, rename) to a local context, and to inner via bastion",
      ],
    ],
    [
      14,
      [
        `\`rsync -a -e 'ssh -T -o BatchMode=yes -F <config>' tree/ bastion:dst/\` of ${RSYNC_FILES} files (2 to 5 KiB, 20 dirs) into an empty dst, spawn to exit;`,
        "mitogen: the same rsync through fakessh.run to a context on bastion connected once before the rounds",
      ],
    ],
    [
      15,
      [
        `not raw: router.local() + one call + shutdown({ wait: true }) of a fresh ${kind} child; mitogen: connect() to a unix listener in a ${kind} child of this master + one call to it + close()`,
      ],
    ],
    [
      16,
      [
        "not raw: ctx.call(() => 0) from this master to the listening child over its pipe; mitogen: the same call from a session attached over TCP (sealed frames) to that child",
      ],
    ],
    [
      17,
      [
        `${CLI_TARGETS} x \`${bare}\` spawn-to-exit, ${CLI_FORKS} at a time; mitogen: \`mitogen run <${CLI_TARGETS} x local> --forks ${CLI_FORKS} --json -- true\` to its exit (the command's own start included)`,
      ],
    ],
    [
      18,
      [
        `${CONCURRENT} messages of ${CONCURRENT_MSG} bytes, each its own write, to a ${kind} child echoing stdin to stdout, until all are back, per second;`,
        `mitogen: Promise.all of ${CONCURRENT} ctx.call(() => 0) started at once on one ${kind} child, per second`,
      ],
    ],
    [
      19,
      [
        `one byte ping-pong with \`${sshRttShown.one || "ssh <the options mitogen's ssh() passed> -- bastion"} <echo>\` (the options recorded as for line 9),`,
        `<echo> being \`${remoteEcho(rt.kind, hostRuntime)}\`; mitogen: ctx.call(() => 0) on a context started by ssh() to bastion`,
      ],
    ],
    [
      20,
      [
        `one byte ping-pong with \`${sshRttShown.two || 'ssh ... -- bastion "ssh <the options bastion\'s ssh() passed> -- <inner> <echo>"'}\`: nested ssh, bastion's shell`,
        "runs the inner ssh client with the options the inner ssh() ran there; mitogen: ctx.call(() => 0) on ssh() to inner via bastion's context",
      ],
    ],
  ];
  for (const [line, text] of legend) {
    if (!wanted(line)) continue;
    for (const [i, t] of text.entries()) detail(`${i ? " ".repeat(String(line).length + 2) : `${line}: `}${t}`);
  }
  if (logged.length) {
    console.log("");
    console.log(`library log (${logged.length} records; first 10):`);
    for (const l of logged.slice(0, 10)) detail(`[${l.name}] ${l.source === "log" ? `${l.level}: ` : ""}${l.message}`);
  }
  const count = (v: Verdict) => lines.filter((x) => x === v).length;
  console.log("");
  console.log(
    `${count("PASS")} PASS, ${count("MISS")} MISS${count("FAIL") ? `, ${count("FAIL")} FAIL` : ""}${count("ERROR") ? `, ${count("ERROR")} ERROR` : ""}` +
      `${count("SKIP") ? `, ${count("SKIP")} SKIP` : ""}` +
      ` in ${num((performance.now() - t0) / 1000, 1)} s`,
  );
  return count("ERROR") || count("FAIL") ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    killAll();
    process.exit(1);
  },
);
