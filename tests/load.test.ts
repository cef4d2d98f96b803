/**
 * Load from a context that misbehaves: a child flooding the master with messages nobody listens
 * for, and a grandchild printing without end. No context may exhaust another's memory or starve
 * its siblings (backpressure on every link, per-link fairness, dead replies rate-limited).
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { type CallContext, type LogRecord, Router, takesRouter } from "../mod.ts";
import { checkLeaks } from "./helpers.ts";

checkLeaks();

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? Number.NaN;
/** Resident set size of `pid`, from /proc (VmRSS). */
const rssOf = (pid: number | "self"): number => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "latin1"))?.[1] ?? 0) * 1024;

/**
 * Shipped to a child: for `ms`, write frames to the master's handle 4242 (nobody listens there)
 * with reply_to set, 1000 frames of 40 bytes per write, as fast as the link takes them. Returns
 * how many frames it wrote.
 */
const flood = takesRouter(async (ms: number, call: CallContext) => {
  const put32 = (b: Uint8Array, at: number, v: number) => {
    b[at] = v >>> 24;
    b[at + 1] = v >>> 16;
    b[at + 2] = v >>> 8;
    b[at + 3] = v;
  };
  const me = call.router.myId;
  const size = 28 + 12;
  const batch = new Uint8Array(1000 * size);
  for (let i = 0; i < 1000; i++) {
    const at = i * size;
    batch.set([0x4d, 0x47, 1, 1], at); // magic, version, RAW
    put32(batch, at + 4, 0); // dst: the master
    put32(batch, at + 8, me);
    put32(batch, at + 12, me);
    put32(batch, at + 16, 4242); // handle: nobody listens
    put32(batch, at + 20, 4343); // reply_to: set, so each provokes a dead reply
    put32(batch, at + 24, 12);
  }
  const parent = call.router.parent as NonNullable<typeof call.router.parent>;
  const end = Date.now() + ms;
  let frames = 0;
  while (Date.now() < end) {
    for (let i = 0; i < 8; i++) parent.writeRaw(batch);
    frames += 8000;
    await parent.flush();
  }
  return frames;
});

test("a child flooding an unlistened handle with reply_to set: the master's memory stays bounded and a sibling stays answered", async () => {
  const records: LogRecord[] = [];
  await using router = new Router({ log: (r) => records.push(r) });
  const [noisy, quiet] = await Promise.all([router.local({ name: "noisy" }), router.local({ name: "quiet" })]);
  const ping = () => quiet.call(() => 0);
  // Baseline: calls to the quiet sibling with nothing else going on.
  const base: number[] = [];
  for (let i = 0; i < 40; i++) {
    const t0 = performance.now();
    await ping();
    base.push(performance.now() - t0);
  }
  const rss0 = rssOf("self");
  let peak = rss0;
  const sampler = setInterval(() => {
    peak = Math.max(peak, rssOf("self"));
  }, 50);
  const SECONDS = 6;
  const flooding = noisy.call(flood, SECONDS * 1000);
  const during: number[] = [];
  try {
    await sleep(300);
    const stop = Date.now() + (SECONDS - 1) * 1000;
    while (Date.now() < stop) {
      const t0 = performance.now();
      await ping();
      during.push(performance.now() - t0);
    }
    const frames = await flooding;
    assert.ok(frames > 100_000, `the flood wrote ${frames} frames only`);
  } finally {
    clearInterval(sampler);
  }
  peak = Math.max(peak, rssOf("self"));
  const grew = (peak - rss0) / MiB;
  const baseMs = median(base);
  const duringMs = median(during);
  const info = `RSS +${grew.toFixed(0)} MiB; calls to the sibling: ${during.length} during the flood, median ${duringMs.toFixed(1)} ms (before: ${baseMs.toFixed(1)} ms)`;
  console.log(info);
  assert.ok(grew < 100, `master RSS grew by more than 100 MiB: ${info}`);
  // Generous on a loaded box: answered many times, each no slower than 250 ms at the median.
  assert.ok(during.length >= 20, `too few calls answered during the flood: ${info}`);
  assert.ok(duringMs < Math.max(250, 20 * baseMs), `the sibling starved: ${info}`);
});

test("a context relaying a grandchild's flood of stdout stays within 200 MiB of its start", async () => {
  const MIB = Number(process.env.FLOW_MIB ?? 256);
  let bytes = 0;
  let lines = 0;
  await using router = new Router({
    log: (r) => {
      if (r.source === "stdout" && r.name === "printer") {
        bytes += r.message.length + 1;
        lines++;
      }
    },
  });
  const relay = await router.local({ name: "relay", runtime: "node" });
  const printer = await router.local({ name: "printer", runtime: "node", via: relay });
  const pid = await relay.call(() => process.pid);
  const rss0 = rssOf(pid);
  let peak = rss0;
  const sampler = setInterval(() => {
    try {
      peak = Math.max(peak, rssOf(pid));
    } catch {
      // gone
    }
  }, 25);
  const t0 = Date.now();
  try {
    // 16 KiB lines, 1 MiB per write, written as fast as the pipe takes them.
    const printed = await printer.call((mib: number) => {
      const chunk = `${"x".repeat(16383)}\n`.repeat(64);
      for (let i = 0; i < mib; i++) process.stdout.write(chunk);
      return mib * chunk.length;
    }, MIB);
    const until = Date.now() + 120_000;
    while (bytes < printed && Date.now() < until) await sleep(20);
    assert.equal(bytes, printed, "every byte printed reached the master's log");
  } finally {
    clearInterval(sampler);
  }
  const grew = (peak - rss0) / MiB;
  console.log(`relay RSS +${grew.toFixed(0)} MiB relaying ${MIB} MiB in ${lines} lines, ${Date.now() - t0} ms`);
  assert.ok(grew < 200, `the relay's RSS grew by ${grew.toFixed(0)} MiB`);
});
