/**
 * Load from a context that misbehaves: a child (or an attached session) flooding its parent with
 * messages nobody listens for, and a grandchild printing without end. No context may exhaust another's memory or starve
 * its siblings (backpressure on every link, per-link fairness, dead replies rate-limited).
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { type CallContext, type Context, connect, type LogRecord, type Message, Router, takesRouter } from "../mod.ts";
import { checkLeaks } from "./helpers.ts";

checkLeaks();

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? Number.NaN;
/** Resident set size of `pid`, from /proc (VmRSS). */
const rssOf = (pid: number | "self"): number => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "latin1"))?.[1] ?? 0) * 1024;

/**
 * Shipped to a child (or run in an attached session): for `ms`, write frames to handle 4242 of its
 * parent `dst` (the master by default; nobody listens there) with reply_to 4343, 1000 frames of 40
 * bytes per write, as fast as the link takes them. Returns how many frames it wrote and how many
 * dead replies came back to 4343.
 */
const flood = takesRouter(async (ms: number, dst: number, call: CallContext) => {
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
    put32(batch, at + 4, dst); // its parent
    put32(batch, at + 8, me);
    put32(batch, at + 12, me);
    put32(batch, at + 16, 4242); // handle: nobody listens
    put32(batch, at + 20, 4343); // reply_to: set, so each asks for a dead reply
    put32(batch, at + 24, 12);
  }
  let dead = 0;
  call.router.addHandler(() => dead++, { handle: 4343 });
  const parent = call.router.parent as NonNullable<typeof call.router.parent>;
  const end = Date.now() + ms;
  let frames = 0;
  while (Date.now() < end) {
    for (let i = 0; i < 8; i++) parent.writeRaw(batch);
    frames += 8000;
    await parent.flush();
  }
  // Dead replies still on their way come before the answer to this call.
  await new Promise((r) => setTimeout(r, 100));
  call.router.delHandler(4343);
  return [frames, dead] as [number, number];
});

/** Calls to `ctx` one after another (`gap` ms apart) for `ms`: their times (ms). */
async function pings(ctx: Context, ms: number, gap = 0): Promise<number[]> {
  const times: number[] = [];
  const stop = Date.now() + ms;
  while (Date.now() < stop) {
    const t0 = performance.now();
    await ctx.call(() => 0);
    times.push(performance.now() - t0);
    if (gap) await sleep(gap);
  }
  return times;
}

/**
 * Flood for {@link FLOOD_SECONDS} (`start` starts it) while calling `answering`: the RSS of `watched`
 * must grow less than 100 MiB, and `answering` must keep answering (generous on a loaded box: a
 * fiftieth of the calls it answered before the flood, each no slower than 250 ms at the median).
 */
async function underFlood(watched: number | "self", answering: Context, who: string, start: () => Promise<[number, number]>): Promise<void> {
  await pings(answering, 200); // warm
  const base = await pings(answering, 1000);
  const rss0 = rssOf(watched);
  let peak = rss0;
  const sampler = setInterval(() => {
    peak = Math.max(peak, rssOf(watched));
  }, 50);
  const flooding = start();
  let during: number[] = [];
  try {
    await sleep(300);
    during = await pings(answering, (FLOOD_SECONDS - 1) * 1000);
    const [frames] = await flooding;
    assert.ok(frames > 100_000, `the flood wrote ${frames} frames only`);
  } finally {
    clearInterval(sampler);
  }
  peak = Math.max(peak, rssOf(watched));
  const grew = (peak - rss0) / MiB;
  const info =
    `RSS +${grew.toFixed(0)} MiB; calls to ${who}: ${base.length}/s before the flood (median ${median(base).toFixed(2)} ms), ` +
    `${(during.length / (FLOOD_SECONDS - 1)).toFixed(0)}/s during it (median ${median(during).toFixed(2)} ms)`;
  console.log(info);
  assert.ok(grew < 100, `RSS grew by more than 100 MiB: ${info}`);
  assert.ok(during.length / (FLOOD_SECONDS - 1) >= base.length / 50, `${who} starved: ${info}`);
  assert.ok(median(during) < 250, `${who} starved: ${info}`);
}

const FLOOD_SECONDS = 4;

test("a child flooding an unlistened handle with reply_to set: the master's memory stays bounded and a sibling stays answered", async () => {
  await using router = new Router({ log: () => {} });
  const [noisy, quiet] = await Promise.all([router.local({ name: "noisy" }), router.local({ name: "quiet" })]);
  await underFlood("self", quiet, "the sibling", () => noisy.call(flood, FLOOD_SECONDS * 1000, 0));
});

test("an attached session flooding its listener with messages nobody listens for: the listener's memory stays bounded and it stays answered", async () => {
  await using router = new Router({ log: () => {} });
  const listening = await router.local({ name: "listening" });
  const dir = mkdtempSync(join(tmpdir(), "mitogen-load-"));
  try {
    const listen = takesRouter(async (dir: string, call: CallContext) => {
      const listener = await call.router.listen({ path: `${dir}/s` });
      return listener.path as string;
    });
    const path = await listening.call(listen, dir);
    await using session = await connect({ path, log: () => {} });
    const pid = (await listening.call(() => process.pid)) as number;
    // The session's own code, run in the session (this process): frames to a handle of the listening context.
    await underFlood(pid, listening, "the listening context", () =>
      flood(FLOOD_SECONDS * 1000, session.context.contextId, { router: session.router } as unknown as CallContext),
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("dead replies to a flood are rate-limited, and a log line a second counts them", async () => {
  const records: LogRecord[] = [];
  await using router = new Router({ log: (r) => records.push(r) });
  const noisy = await router.local({ name: "noisy" });
  const SECONDS = 2.5;
  const [frames, dead] = await noisy.call(flood, SECONDS * 1000, 0);
  const counted = () => records.filter((r) => r.name === "master" && /dead replies/.test(r.message));
  const total = () => counted().reduce((n, r) => n + ((r.data as { sent: number }).sent + (r.data as { dropped: number }).dropped), 0);
  // The last second's line comes at its end.
  const until = Date.now() + 3000;
  while (total() < frames && Date.now() < until) await sleep(50);
  const lines = counted();
  const info = `${frames} frames, ${dead} dead replies back; lines: ${lines.map((r) => r.message).join(" | ")}`;
  assert.equal(total(), frames, `every message to the unknown handle is counted: ${info}`);
  assert.ok(lines.length <= Math.ceil(SECONDS) + 2, `one line a second: ${info}`);
  assert.ok(
    lines.some((r) => r.level === "warn" && (r.data as { dropped: number }).dropped > 0),
    `a second with dropped replies is a warning: ${info}`,
  );
  assert.ok(dead > 0 && dead <= 1000 * (Math.ceil(SECONDS) + 1), `dead replies rate-limited to 1000/s: ${info}`);
  // Per-message records are gone: the flood is a handful of lines.
  assert.ok(records.length < 50, `${records.length} records for the flood`);
});

test("a child sending to a sibling that does not read: the master relays within a bound, and nothing is lost", async () => {
  await using router = new Router({ log: () => {} });
  const [sender, stuck, quiet] = await Promise.all([router.local({ name: "sender" }), router.local({ name: "stuck" }), router.local({ name: "quiet" })]);
  // The stuck context counts what reaches its handle 4242, once it reads again.
  await stuck.call(
    takesRouter((call: CallContext) => {
      const g = globalThis as { got?: number };
      g.got = 0;
      call.router.addHandler((m) => (g.got = (g.got as number) + m.length), { handle: 4242 });
    }),
  );
  const rss0 = rssOf("self");
  let peak = rss0;
  const sampler = setInterval(() => {
    peak = Math.max(peak, rssOf("self"));
  }, 25);
  const BUSY = 3000;
  // Blocks its event loop: it reads nothing for 3 s.
  const busy = stuck.call((ms: number) => {
    const end = Date.now() + ms;
    while (Date.now() < end);
  }, BUSY);
  let during: number[] = [];
  let sent = 0;
  try {
    await sleep(100);
    // 1 MiB messages to the stuck context for as long as it is busy, as fast as the link takes them.
    const sending = sender.call(
      takesRouter(async (dst: number, ms: number, call: CallContext) => {
        const M = call.msg.constructor as typeof Message;
        const parent = call.router.parent as NonNullable<typeof call.router.parent>;
        const block = new Uint8Array(1 << 20);
        const end = Date.now() + ms;
        let bytes = 0;
        while (Date.now() < end) {
          call.router.route(M.raw(block, { dst, handle: 4242 }));
          bytes += block.byteLength;
          await parent.flush();
        }
        return bytes;
      }),
      stuck.contextId,
      BUSY - 500,
    );
    during = await pings(quiet, BUSY - 700, 5);
    sent = await sending;
    await busy;
  } finally {
    clearInterval(sampler);
  }
  const grew = (peak - rss0) / MiB;
  const info = `sent ${(sent / MiB).toFixed(0)} MiB; master RSS +${grew.toFixed(0)} MiB; ${during.length} calls to a sibling meanwhile, median ${median(during).toFixed(2)} ms`;
  console.log(info);
  const until = Date.now() + 30_000;
  let got = 0;
  while ((got = await stuck.call(() => (globalThis as { got?: number }).got ?? 0)) < sent && Date.now() < until) await sleep(50);
  assert.equal(got, sent, `everything sent arrived: ${info}`);
  assert.ok(grew < 100, `master RSS grew by ${grew.toFixed(0)} MiB: ${info}`);
  // What the stuck context does not read waits in the sender (its writes wait), not in the master.
  assert.ok(sent < 64 * MiB, `the sender was not held back: ${info}`);
  assert.ok(during.length >= 20 && median(during) < 250, `the sibling starved: ${info}`);
});

/** Shipped to a child: for `ms`, write frames whose auth_id claims the master (its parent must refuse them); returns how many. */
const forge = takesRouter(async (ms: number, call: CallContext) => {
  const put32 = (b: Uint8Array, at: number, v: number) => {
    b[at] = v >>> 24;
    b[at + 1] = v >>> 16;
    b[at + 2] = v >>> 8;
    b[at + 3] = v;
  };
  const batch = new Uint8Array(1000 * 40);
  for (let i = 0; i < 1000; i++) {
    const at = i * 40;
    batch.set([0x4d, 0x47, 1, 1], at);
    put32(batch, at + 8, call.router.myId); // dst 0, auth 0: the master's id, not this one's
    put32(batch, at + 16, 4242);
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

test("a grandchild flooding its parent with frames it must refuse: the warnings are counted, not forwarded one by one", async () => {
  const records: LogRecord[] = [];
  await using router = new Router({ log: (r) => records.push(r) });
  const relay = await router.local({ name: "relay", runtime: "node" });
  const forger = await router.local({ name: "forger", via: relay });
  const pid = await relay.call(() => process.pid);
  const rss0 = rssOf(pid);
  let peak = rss0;
  const sampler = setInterval(() => {
    peak = Math.max(peak, rssOf(pid));
  }, 25);
  const SECONDS = 3;
  let frames = 0;
  let t0 = Date.now();
  const refusals = () => records.filter((r) => r.name === "relay" && /did not arrive on its own route/.test(r.message)).length;
  /** Refusals the relay told one by one, and those it counted. */
  const told = () =>
    refusals() + records.filter((r) => r.name === "relay" && /dropped in 1 s/.test(r.message)).reduce((n, r) => n + (r.data as { dropped: number }).dropped, 0);
  try {
    t0 = Date.now();
    frames = await forger.call(forge, SECONDS * 1000);
    // The relay may still be reading what the forger wrote, and each second's count comes at its end.
    const until = Date.now() + 15_000;
    while (told() < frames * 0.99 && Date.now() < until) await sleep(50);
  } finally {
    clearInterval(sampler);
  }
  const seconds = Math.ceil((Date.now() - t0) / 1000);
  const grew = (peak - rss0) / MiB;
  const refused = refusals();
  const counted = told() - refused;
  const info = `${frames} forged frames; the relay grew by ${grew.toFixed(0)} MiB, sent ${refused} warnings and counted ${counted} more`;
  console.log(info);
  assert.ok(frames > 100_000, `the forger wrote too little: ${info}`);
  assert.ok(refused <= 100 * (seconds + 1), `warnings are capped at 100 a second (${seconds} s): ${info}`);
  assert.ok(refused + counted >= frames * 0.99, `every refusal is told or counted: ${info}`);
  assert.ok(grew < 100, `the relay's RSS grew by ${grew.toFixed(0)} MiB: ${info}`);
});

test("a context relaying a grandchild's flood of stdout stays within 200 MiB of its start", async () => {
  const MIB = 1024;
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
