/**
 * CPU profiles of both ends of N call round trips: the master (this process,
 * through node:inspector, for the calls only) and a local node child (started
 * through a wrapper named `node` that runs `node --cpu-prof`, since
 * `--cpu-prof` is not allowed in NODE_OPTIONS). The child payload is built
 * readable (MITOGEN_READABLE_PAYLOAD=1, see build.ts), so its functions keep
 * their names. Prints the top self-time functions of each side within the
 * window of the calls and keeps both `.cpuprofile` files (Chrome DevTools,
 * speedscope) in the output directory.
 *
 *   node --import tsx bench/profile.ts [--calls 20000] [--concurrency 1] [--via] [--top 15] [--interval 100] [--out DIR]
 *
 * `--concurrency k` keeps k calls in flight (as the bench's "concurrent"); with `--via` the
 * calls go to a child below one local hop, and the hop is the child profiled
 * (what a relay costs, as the bench's "hops").
 *
 * @module
 */
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { Session } from "node:inspector/promises";
import os from "node:os";
import { basename, join } from "node:path";
import { parseArgs } from "node:util";

// Before the library builds its payloads (on first use, from source): a readable child.
process.env.MITOGEN_READABLE_PAYLOAD ??= "1";
const { Router } = await import("../mod.ts");

const { values } = parseArgs({
  options: {
    calls: { type: "string", default: "20000" },
    concurrency: { type: "string", default: "1" },
    via: { type: "boolean", default: false },
    top: { type: "string", default: "15" },
    interval: { type: "string", default: "100" },
    out: { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
});
if (values.help) {
  console.log("usage: node --import tsx bench/profile.ts [--calls 20000] [--concurrency 1] [--via] [--top 15] [--interval 100] [--out DIR]");
  process.exit(0);
}
const count = (name: string, text: string, max: number): number => {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1 || n > max) {
    console.error(`profile: --${name} must be an integer from 1 to ${max}, not ${JSON.stringify(text)}`);
    process.exit(2);
  }
  return n;
};
const CALLS = count("calls", values.calls, 1_000_000);
const CONCURRENCY = count("concurrency", values.concurrency, 10_000);
const TOP = count("top", values.top, 200);
/** Sampling interval, microseconds, on both sides. */
const INTERVAL = count("interval", values.interval, 100_000);
/** The calls stop after this long, however many ran. */
const CALLS_LIMIT_MS = 120_000;

/** The subset of V8's .cpuprofile format read here. */
interface CpuProfile {
  nodes: { id: number; callFrame: { functionName: string; url: string; lineNumber: number; columnNumber: number } }[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

/** Microseconds on the clock V8's profiles use (monotonic, shared by the processes of one machine). */
const nowMicros = (): number => Number(process.hrtime.bigint() / 1000n);

interface Summary {
  /** Milliseconds sampled within the window, idle included. */
  totalMs: number;
  idleMs: number;
  /** Whether the window was applied (otherwise the whole profile is summarised). */
  windowed: boolean;
  top: { name: string; where: string; ms: number }[];
}

/** Self time per function within [from, to] (µs on the profile's clock), top first. */
function summarise(p: CpuProfile, from: number, to: number, payloadLabel: string): Summary {
  const byId = new Map(p.nodes.map((n) => [n.id, n.callFrame]));
  // Only window if it overlaps the profile (a different clock would leave nothing).
  const windowed = from < p.endTime && to > p.startTime;
  const self = new Map<string, { name: string; where: string; ms: number }>();
  let t = p.startTime;
  let total = 0;
  let idle = 0;
  for (let i = 0; i < p.samples.length; i++) {
    const dt = p.timeDeltas[i] ?? 0;
    t += dt;
    if (windowed && (t < from || t > to)) continue;
    const frame = byId.get(p.samples[i] as number);
    if (!frame) continue;
    const ms = dt / 1000;
    total += ms;
    if (frame.functionName === "(idle)") {
      idle += ms;
      continue;
    }
    // The core runs from eval (no url) or, compiled with a code cache, from vm.Script ("evalmachine.<anonymous>").
    const file = frame.url && !frame.url.startsWith("evalmachine.") ? basename(frame.url.replace(/^file:\/\//, "")) : payloadLabel;
    const where = frame.url || frame.lineNumber >= 0 ? `${file}:${frame.lineNumber + 1}:${frame.columnNumber + 1}` : "";
    const name = frame.functionName || "(anonymous)";
    const key = `${name}\0${where}`;
    const entry = self.get(key) ?? { name, where, ms: 0 };
    entry.ms += ms;
    self.set(key, entry);
  }
  const top = [...self.values()].sort((a, b) => b.ms - a.ms).slice(0, TOP);
  return { totalMs: total, idleMs: idle, windowed, top };
}

function print(side: string, file: string, s: Summary, callsDone: number): void {
  const busy = s.totalMs - s.idleMs;
  console.log("");
  console.log(
    `${side}: ${file}${s.windowed ? "" : " (whole profile: its clock did not match the calls' window)"}; ` +
      `${s.totalMs.toFixed(0)} ms sampled, idle ${((s.idleMs / s.totalMs) * 100).toFixed(0)}%, busy ${((busy * 1000) / callsDone).toFixed(1)} us per call`,
  );
  console.log(`  ${"self ms".padStart(8)} ${"% busy".padStart(7)}  function (file:line:col)`);
  for (const f of s.top) {
    console.log(`  ${f.ms.toFixed(1).padStart(8)} ${((f.ms / busy) * 100).toFixed(1).padStart(6)}%  ${f.name}${f.where ? ` (${f.where})` : ""}`);
  }
}

async function main(): Promise<void> {
  const out = values.out ?? mkdtempSync(join(os.tmpdir(), "mitogen-profile-"));
  const childDir = join(out, "child");
  mkdirSync(childDir, { recursive: true });
  const before = new Set(readdirSync(childDir));
  // A `node` that profiles itself: mitogen runs whatever `runtime` names (the name says it is node).
  const bin = mkdtempSync(join(os.tmpdir(), "mitogen-profile-bin-"));
  const wrapper = join(bin, "node");
  writeFileSync(
    wrapper,
    `#!/bin/sh\nexec ${JSON.stringify(process.execPath)} --cpu-prof --cpu-prof-interval=${INTERVAL} --cpu-prof-dir=${JSON.stringify(childDir)} "$@"\n`,
    { mode: 0o755 },
  );

  const zero = () => 0;
  const session = new Session();
  session.connect();
  let done = 0;
  const window = { from: 0, to: 0 };
  let masterProfile: CpuProfile;
  {
    await using router = new Router();
    const profiled = await router.local({ runtime: wrapper, name: values.via ? "hop" : "profiled" });
    const ctx = values.via ? await router.local({ runtime: process.execPath, name: "below", via: profiled }) : profiled;
    // warm up (JIT on both sides), outside the window
    for (let i = 0; i < 2000; i++) await ctx.call(zero);
    await session.post("Profiler.enable");
    await session.post("Profiler.setSamplingInterval", { interval: INTERVAL });
    await session.post("Profiler.start");
    const end = performance.now() + CALLS_LIMIT_MS;
    window.from = nowMicros();
    const worker = async () => {
      while (done < CALLS && performance.now() < end) {
        done++;
        await ctx.call(zero);
      }
    };
    await Promise.all(Array.from({ length: Math.min(CONCURRENCY, CALLS) }, worker));
    window.to = nowMicros();
    masterProfile = (await session.post("Profiler.stop")).profile as unknown as CpuProfile;
    await session.post("Profiler.disable");
    console.log(
      `${done} calls${CONCURRENCY > 1 ? `, ${CONCURRENCY} in flight` : ""}${values.via ? ", to a child via one local hop" : ""}: ` +
        `${((window.to - window.from) / done).toFixed(1)} us per call (wall clock, while profiling)`,
    );
    // The child writes its profile when it exits (with --via, the hop ends its child first).
    await profiled.shutdown({ wait: true });
  }
  session.disconnect();
  const masterFile = join(out, "master.cpuprofile");
  writeFileSync(masterFile, JSON.stringify(masterProfile));
  print("master", masterFile, summarise(masterProfile, window.from, window.to, "(eval)"), done);

  // The child's profiles appear once it has exited; wait a little for them. Node names them
  // CPU.<date>.<time>.<pid>.<thread>.<seq>.cpuprofile: thread 0 is the main thread (others: its watchdog's worker).
  const limit = performance.now() + 10_000;
  let childFile: string | undefined;
  while (!childFile && performance.now() < limit) {
    childFile = readdirSync(childDir).find((f) => /^CPU\.\d+\.\d+\.\d+\.0\.\d+\.cpuprofile$/.test(f) && !before.has(f));
    if (!childFile) await new Promise((r) => setTimeout(r, 50));
  }
  if (!childFile) {
    console.error(`profile: no child profile appeared in ${childDir} (did the child exit normally?)`);
    process.exitCode = 1;
  } else {
    const path = join(childDir, childFile);
    const child = JSON.parse(readFileSync(path, "utf8")) as CpuProfile;
    print(values.via ? "child (the hop)" : "child", path, summarise(child, window.from, window.to, "(payload)"), done);
  }
  rmSync(bin, { recursive: true, force: true });
  console.log("");
  console.log(
    "note: samples are taken on the wall clock, so a write that wakes the other side can be charged the time the writer waits " +
      "to run again (writeBuffer), on a machine with few cores especially",
  );
  console.log(`profiles kept in ${out} (open them in Chrome DevTools' Performance panel or https://www.speedscope.app)`);
}

await main();
