/**
 * What every measure of the bench shares: the options of this run (argv),
 * the runtime children run on, the round budgets, the Router every measure
 * starts (its library log kept for the end), the table and its verdicts, and
 * the rounds that set mitogen against its raw reference.
 *
 * @module
 */
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { type LogRecord, Router } from "../mod.ts";
import { cell, type Scope, type Stats, spread, stats } from "./lib.ts";
import type { Runtime } from "./raw.ts";

// ---------------------------------------------------------------------------
// Options

/** The one-way delay of the slow link when `--slow-link` names none (ms). */
export const SLOW_LINK_DEFAULT_MS = 40;
/** Keys of the slow-link measures start with this; they run only when `--slow-link` or `--only` asks. */
export const SLOW_PREFIX = "slow-";

// `--slow-link [D]`: the value is optional, which parseArgs cannot say; a number after the flag is its value.
const argv = process.argv.slice(2);
let slowLinkArg: string | undefined;
for (let i = 0; i < argv.length; i++) {
  const a = argv[i] as string;
  if (a === "--slow-link") {
    const next = argv[i + 1];
    const given = next !== undefined && /^\d+(\.\d+)?$/.test(next);
    slowLinkArg = given ? next : String(SLOW_LINK_DEFAULT_MS);
    argv.splice(i, given ? 2 : 1);
    i--;
  } else if (a.startsWith("--slow-link=")) {
    slowLinkArg = a.slice("--slow-link=".length);
    argv.splice(i, 1);
    i--;
  }
}

/** The command line of `bench/run.ts` (see its usage). */
export const options: { runtime: string; quick: boolean; only?: string; fleet: boolean; "hosts-wait": string; help: boolean } = parseArgs({
  args: argv,
  options: {
    runtime: { type: "string", default: "node" },
    "hosts-wait": { type: "string", default: "20" },
    quick: { type: "boolean", default: false },
    fleet: { type: "boolean", default: false },
    only: { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
}).values;
if (options.runtime !== "node" && options.runtime !== "deno") {
  console.error(`bench: --runtime must be node or deno, not ${JSON.stringify(options.runtime)}`);
  process.exit(2);
}
/** The one-way delay of the slow link (`--slow-link [D]`, ms). */
export const slowDelay: number = Number(slowLinkArg ?? SLOW_LINK_DEFAULT_MS);
if (!(slowDelay > 0)) {
  console.error(`bench: --slow-link takes a one-way delay in ms above 0, not ${JSON.stringify(slowLinkArg)}`);
  process.exit(2);
}
/** How long the lab's hosts may take to be set up (`--hosts-wait <s>`): more than a second means another process holds them. */
export const hostsWaitMs: number = Number(options["hosts-wait"]) * 1000;
if (!(hostsWaitMs > 0)) {
  console.error(`bench: --hosts-wait takes seconds above 0, not ${JSON.stringify(options["hosts-wait"])}`);
  process.exit(2);
}
/** The runtime of the children: mitogen's and the raw references'. */
export const kind: "node" | "deno" = options.runtime;
/** Fewer rounds and shorter budgets (`--quick`). */
export const quick: boolean = options.quick;
/** Measures to run (`--only call-rtt,boot`), by key; all when not given. */
const only = options.only ? new Set(options.only.split(",").map((k) => k.trim())) : null;
/**
 * Whether the measure of `key` is to run: those `--only` names; without it, the slow-link measures
 * with `--slow-link` and the others without.
 */
export const wanted = (key: string): boolean =>
  only ? only.has(key) || (slowLinkArg !== undefined && key.startsWith(SLOW_PREFIX)) : (slowLinkArg !== undefined) === key.startsWith(SLOW_PREFIX);

// The deno binary: the project's own, else whatever PATH has.
const localDeno = fileURLToPath(new URL("../node_modules/.bin/deno", import.meta.url));
/** The deno executable the bench uses. */
export const denoExe: string = existsSync(localDeno) ? localDeno : "deno";
/** The raw references' runtime. */
export const rt: Runtime = kind === "node" ? { kind, exe: process.execPath } : { kind, exe: denoExe };
/** What `router.local({ runtime })` gets: "node" means this very node binary, a deno path is taken as is. */
export const runtime: string = kind === "node" ? "node" : denoExe;

/** The raw reference's command evaluating nothing, as the footer shows it. */
export const bareEval: string = kind === "node" ? "node -e ''" : "deno eval --no-config ''";

/**
 * Rounds and per-round budgets. Everything is bounded by count and by time.
 * burst*: the concurrent calls' bursts per round; bulkRounds: the 1 GiB stream and the 256 MiB putFile.
 */
export const P = quick
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

// ---------------------------------------------------------------------------
// The library's log, and what every measure calls

/** Library log records (child output, warnings), kept and shown at the end, not mixed into the table. */
export const logged: LogRecord[] = [];
/** The logger of every Router and session the bench starts. */
export const log = (rec: LogRecord): void => {
  if (rec.source !== "log" || rec.level === "warn" || rec.level === "error") logged.push(rec);
};
/** A Router logging to {@link log}. */
export const newRouter = (): Router => new Router({ log });

/** The call of every round trip: `ctx.call(zero)`. */
export const zero = (): number => 0;
/** The pid of the process it runs in; shipped as source to every runtime of the matrix: no `process` on Deno 1.x, no `?.` on Node 12. */
export const pidOf = (): number => {
  const deno = (globalThis as { Deno?: { pid: number } }).Deno;
  return deno ? deno.pid : process.pid;
};

/**
 * Resolve once process `pid` is gone (reaped). `Context.shutdown({ wait: true })`
 * and router disposal resolve when the stream closes, which can be before the
 * child has exited; the raw reference waits for exit, so this side does too.
 */
export async function waitGone(pid: number, limitMs = 5000): Promise<void> {
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
export async function bootOnce(scope: Scope, exe: string = runtime): Promise<void> {
  let pid: number;
  {
    await using router = scope.add(newRouter());
    const ctx = await router.local({ runtime: exe, name: "boot", connectTimeout: 20_000 });
    pid = await ctx.call(pidOf);
  }
  await waitGone(pid);
}

// ---------------------------------------------------------------------------
// The table

/** A row's verdict. */
export type Verdict = "PASS" | "MISS" | "FAIL" | "ERROR" | "SKIP";
const W = { name: 38, side: 28, ratio: 26, goal: 24 };
/** The verdicts printed so far, for the summary. */
export const verdicts: Verdict[] = [];

/** One row of the table. */
export function row(name: string, mito: string, raw: string, ratio: string, goal: string, verdict: Verdict | ""): void {
  if (verdict) verdicts.push(verdict);
  console.log(`${cell(name, W.name)}${cell(mito, W.side)}${cell(raw, W.side)}${cell(ratio, W.ratio)}${cell(goal, W.goal)}${verdict}`);
}
/** An indented line under a row. */
export function detail(text: string): void {
  console.log(`${" ".repeat(4)}${text}`);
}
/** The row of a measure that threw. */
export function failed(name: string, err: unknown): void {
  row(name, `ERROR: ${err instanceof Error ? err.message : String(err)}`, "", "", "", "ERROR");
}

// ---------------------------------------------------------------------------
// Rounds: mitogen and its raw reference, alternating

/** Paired per-round ratios a[i] / b[i] (rounds where b is not positive are skipped). */
export function ratios(a: readonly number[], b: readonly number[]): Stats {
  return stats(a.map((x, i) => x / (b[i] ?? Number.NaN)).filter((r, i) => (b[i] ?? 0) > 0 && Number.isFinite(r)));
}

/** What rounds() measured: one value per round and side. */
export interface Rounds {
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
export async function rounds(n: number, budgetMs: number, mito: () => Promise<number>, raw: () => Promise<number>): Promise<Rounds> {
  const [m = [], r = []] = await roundsOf(n, budgetMs, [mito, raw]);
  return { mito: m, raw: r, planned: n };
}

/**
 * As {@link rounds}, for any number of sides: each round runs every side
 * once, the order rotating round by round (round 0 starts with the second
 * side, so two sides alternate as rounds() always did). One series per side.
 */
export async function roundsOf(n: number, budgetMs: number, sides: readonly (() => Promise<number>)[]): Promise<number[][]> {
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
export function ratioRow(name: string, r: Rounds, digits: number, unit: string, goal: number, label: string): void {
  const q = ratios(r.mito, r.raw);
  row(name, spread(stats(r.mito), digits, unit), spread(stats(r.raw), digits, unit), ratioCell(r, q, 2, "x"), label, q.median <= goal ? "PASS" : "MISS");
}

/** A detail line's figures: `mitogen <spread>, raw <spread>, ratio <paired ratios>`. */
export function pairText(r: Pick<Rounds, "mito" | "raw">, digits: number, unit: string): string {
  return `mitogen ${spread(stats(r.mito), digits, unit)}, raw ${spread(stats(r.raw), digits, unit)}, ratio ${spread(ratios(r.mito, r.raw), 2, "x")}`;
}

/** The ratio column: paired ratios, and the round count when fewer ran than planned. */
export function ratioCell(r: Rounds, q: Stats, digits: number, unit: string): string {
  return spread(q, digits, unit) + (r.mito.length < r.planned ? ` n=${r.mito.length}` : "");
}

/** A measure: what `--only` selects it by, its run (which prints its rows), and the raw reference it is set against. */
export interface Measure {
  /** Its name for `--only` and in the footer. */
  key: string;
  /** Measure, and print the row(s). */
  run: () => Promise<void>;
  /** The raw reference, for the footer: one line per element (read after the run, as some quote what it recorded). */
  reference: () => string[];
}
