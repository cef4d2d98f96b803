/**
 * Shared test helpers: the leak check every test runs in teardown, a
 * capturing logger and the Router fixtures built on it, and the runtimes to
 * test children on.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { closeSync, openSync, readdirSync, readFileSync, truncateSync, writeFileSync, writeSync } from "node:fs";
import { afterEach, beforeEach } from "node:test";
import type { Transport } from "../transport.ts";
import { FIRST_DYNAMIC_HANDLE, HANDLE_NAME, type Message } from "../frames.ts";
import { type CallContext, CallError, ChannelError, type Context, type LogRecord, Router, type RouterOptions, takesRouter } from "../mod.ts";

/** Every process this test file starts inherits this variable, so leaks are found even when orphaned. */
export const TOKEN = `MITOGEN_TEST_TOKEN=${process.pid}-${Date.now()}`;
process.env.MITOGEN_TEST_TOKEN = TOKEN.slice("MITOGEN_TEST_TOKEN=".length);

/** Child runtimes to test. */
export const RUNTIMES = ["node", "deno"] as const;

/** True under Deno. */
export const underDeno = typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";

/** Pids of live processes (other than this one) carrying this file's token. */
export function leakedProcesses(): { pid: number; cmd: string }[] {
  const out: { pid: number; cmd: string }[] = [];
  for (const entry of readdirSync("/proc")) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    try {
      const environ = readFileSync(`/proc/${pid}/environ`, "latin1");
      if (!environ.split("\0").includes(TOKEN)) continue;
      const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
      if (/\) Z /.test(stat)) continue; // a zombie is already gone, waiting to be reaped
      const cmd = readFileSync(`/proc/${pid}/cmdline`, "latin1").replaceAll("\0", " ").slice(0, 120);
      out.push({ pid, cmd });
    } catch {
      // exited while we looked, or not ours to read
    }
  }
  return out;
}

/** The live handles and timers the leak check counts (those of the runner's own stdio and file reads left out). */
export function resources(): string[] {
  const info = (process as { getActiveResourcesInfo?: () => string[] }).getActiveResourcesInfo?.() ?? [];
  // Stdio handles of the test runner itself come and go; count what tests create.
  return info.filter((r) => r !== "TTYWrap" && r !== "FSReqCallback").sort();
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Assert nothing is left behind: no process carrying the token, no handle or
 * timer beyond `baseline`. Waits up to 3 s for exits already under way.
 */
export async function assertNoLeaks(baseline: string[]): Promise<void> {
  /** What is live now and was not in `baseline` (as a multiset: one of the baseline's may be gone while a new one is closing). */
  const extraNow = () => {
    const extra = resources();
    for (const r of baseline) {
      const i = extra.indexOf(r);
      if (i >= 0) extra.splice(i, 1);
    }
    return extra;
  };
  let procs = leakedProcesses();
  let extra = extraNow();
  for (let i = 0; i < 60 && (procs.length || extra.length); i++) {
    await sleep(50);
    procs = leakedProcesses();
    extra = extraNow();
  }
  for (const p of procs) {
    try {
      process.kill(p.pid, "SIGKILL");
    } catch {
      // gone
    }
  }
  assert.deepEqual(procs, [], "child processes left behind");
  assert.deepEqual(extra, [], `handles or timers left behind; the live handles: ${describeHandles()}`);
}

/** What the live handles are (Node only), so a leak the check finds names its owner. */
function describeHandles(): string {
  const get = (process as { _getActiveHandles?: () => object[] })._getActiveHandles;
  if (!get) return "(not known under this runtime)";
  const name = (h: object): string => {
    // By fd, not by process.stdin & co.: reading those getters would create the streams.
    const { spawnfile, spawnargs, _handle, readable, writable } = h as {
      spawnfile?: string;
      spawnargs?: string[];
      _handle?: { fd?: number; constructor: { name: string } } | null;
      readable?: boolean;
      writable?: boolean;
    };
    if (spawnfile) return `child ${spawnargs?.join(" ").slice(0, 120)}`;
    const how = _handle ? `${_handle.constructor.name} fd ${_handle.fd}` : "no handle (closing)";
    return `${h.constructor.name} (${how}${readable ? ", readable" : ""}${writable ? ", writable" : ""})`;
  };
  return get.call(process).map(name).join("; ");
}

/** Install the leak check around every test of the calling file. */
export function checkLeaks(): void {
  let baseline: string[] = [];
  beforeEach(() => {
    baseline = resources();
  });
  afterEach(async () => {
    await assertNoLeaks(baseline);
  });
}

/** A logger that keeps records, for assertions and to keep test output quiet. */
export function captureLogs(): { records: LogRecord[]; log: (r: LogRecord) => void; lines: (name?: string) => string[] } {
  const records: LogRecord[] = [];
  return {
    records,
    log: (r) => records.push(r),
    lines: (name) => records.filter((r) => name === undefined || r.name === name).map((r) => r.message),
  };
}

/** What {@link captureLogs} returns: the records kept, the logger to give a Router, and the messages (of one logger name). */
export type CapturedLogs = ReturnType<typeof captureLogs>;

/**
 * The Router a test starts with: its log records are captured (kept out of
 * the test output) and not read. `options` are the test's own, beside the log.
 *
 *     await using router = quietRouter({ debug: true });
 */
export function quietRouter(options: Omit<RouterOptions, "log"> = {}): Router {
  return new Router({ log: captureLogs().log, ...options });
}

/**
 * A Router and the logs it captures, for a test that reads what was logged.
 * Ending the fixture ends the Router, as `await using router` would:
 *
 *     await using fixture = routerWithLogs({ debug: true });
 *     const { router, logs } = fixture;
 */
export function routerWithLogs(options: Omit<RouterOptions, "log"> = {}): { router: Router; logs: CapturedLogs } & AsyncDisposable {
  const logs = captureLogs();
  const router = new Router({ log: logs.log, ...options });
  return { router, logs, [Symbol.asyncDispose]: () => router[Symbol.asyncDispose]() };
}

/**
 * The frames on `router`'s link to its child `ctx` from now on, as the handles they went to: `up`
 * (arriving from it) and `down` (sent to it). Reserved handles by name, dynamic ones as "reply".
 */
export function linkFrames(router: Router, ctx: Context): { up: string[]; down: string[] } {
  const link = router.children.find((l) => l.stream.remoteId === ctx.contextId);
  if (!link) throw new Error(`${ctx.name} is no child of ${router.name}`);
  const seen = { up: [] as string[], down: [] as string[] };
  const name = (m: Message) => (m.handle >= FIRST_DYNAMIC_HANDLE ? "reply" : (HANDLE_NAME[m.handle] ?? String(m.handle)));
  const s = link.stream;
  const on = s.onMessage;
  s.onMessage = (m) => {
    seen.up.push(name(m));
    on(m);
  };
  const send = s.send.bind(s);
  s.send = (m) => {
    seen.down.push(name(m));
    return send(m);
  };
  return seen;
}

/** The context `start` resolves with, once connected: a start `via` another context resolves before (see Context.connected). */
export async function whenConnected(start: Promise<Context>): Promise<Context> {
  const ctx = await start;
  await ctx.connected();
  return ctx;
}

/**
 * A context whose start (through a parent) fails: a call sent while it starts rejects with the start's
 * error, as `connected()` does (a CallError matching `start`). Returns the call's ChannelError.
 */
export async function failedViaStart(ctx: Context, start: RegExp): Promise<ChannelError> {
  const settled = (p: Promise<unknown>) =>
    p.then(
      () => null,
      (e: unknown) => e,
    );
  const queued = settled(ctx.call(() => 1));
  const err = await settled(ctx.connected());
  assert.ok(err instanceof CallError && start.test(err.message), `${err}`);
  const first = await queued;
  assert.ok(first instanceof ChannelError && err.message.endsWith(first.message), `${first} (the start said ${err.message})`);
  return first;
}

/** Wait until `cond()` holds, polling; fails after `ms`. */
export async function waitFor(cond: () => boolean, ms = 5000, what = "condition"): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** Is `pid` alive (and not a zombie)? */
export function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
    return !/\) Z /.test(stat);
  } catch {
    return false;
  }
}

/** Two in-memory Transports joined back to back, with a raw write for forging bytes. */
export function transportPair(): [Transport & { inject(bytes: Uint8Array): void; hangUp(): void }, Transport] {
  type Side = { onData: (c: Uint8Array) => void; onEnd: (e?: Error) => void; closed: boolean };
  const mk = (): Side => ({ onData: () => {}, onEnd: () => {}, closed: false });
  const a = mk();
  const b = mk();
  const side = (me: Side, peer: Side) => ({
    start(onData: (c: Uint8Array) => void, onEnd: (e?: Error) => void) {
      me.onData = onData;
      me.onEnd = onEnd;
    },
    write(parts: readonly Uint8Array[]) {
      if (me.closed || peer.closed) return;
      const copy = parts.map((p) => p.slice());
      queueMicrotask(() => {
        for (const p of copy) if (!peer.closed) peer.onData(p);
      });
    },
    flush: () => Promise.resolve(),
    close() {
      if (me.closed) return;
      me.closed = true;
      queueMicrotask(() => {
        if (!peer.closed) peer.onEnd();
      });
    },
  });
  const left = side(a, b);
  return [
    {
      ...left,
      inject: (bytes) => left.write([bytes]),
      hangUp: () => left.close(),
    },
    side(b, a),
  ];
}

/** Shipped to a context: the names of the core payloads it keeps, to start children with. */
export const coresKept: (call: CallContext) => string[] = takesRouter((call: CallContext) =>
  [...call.router.moduleCode.keys()].filter((k) => k.startsWith("mitogen:core")),
);

// ---------------------------------------------------------------------------
// Files and processes the file-transfer and fakessh tests share

/** The sha256 of a file, in hex. */
export const sha256Of = (file: string): string => createHash("sha256").update(readFileSync(file)).digest("hex");

/** Temporary files in `dir` (of any naming this project has used: `.mitogen-tmp.*`, and `.<name>.*.mitogen-tmp` before). */
export const tempFilesIn = (dir: string): string[] => readdirSync(dir).filter((f) => f.includes("mitogen-tmp"));

/** A file of `size` bytes that differ along it. */
export function makeFile(file: string, size: number): string {
  const MiB = 1024 * 1024;
  const fd = openSync(file, "w");
  const block = new Uint8Array(Math.min(size, MiB));
  for (let off = 0, i = 0; off < size; off += block.byteLength, i++) {
    for (let k = 0; k < block.byteLength; k += 4096) block[k] = (i + k) & 0xff;
    new DataView(block.buffer).setUint32(0, i);
    writeSync(fd, block, 0, Math.min(block.byteLength, size - off));
  }
  closeSync(fd);
  return file;
}

/** A sparse file of `size` bytes (fast to make, slow enough to send to catch mid-way). */
export function sparseFile(file: string, size: number): string {
  writeFileSync(file, "head");
  truncateSync(file, size);
  return file;
}

/** The pid of a running fakessh stand-in (a process carrying the leak check's token) whose command line has `word`. */
export function standInPid(word: string): number | undefined {
  for (const { pid } of leakedProcesses()) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, "latin1").replaceAll("\0", " ");
      if (cmd.includes("mitogen.mjs") && cmd.includes(word)) return pid;
    } catch {
      // gone
    }
  }
  return undefined;
}

/** The CLI's `--json` records, without their times, sorted by host: what two runs of one command can be compared by. */
export const records = (stdout: string): Record<string, unknown>[] =>
  stdout
    .trim()
    .split("\n")
    .filter(Boolean)
    .map((l) => {
      const { ms: _, ...rest } = JSON.parse(l) as Record<string, unknown>;
      return rest;
    })
    .sort((a, b) => String(a.host).localeCompare(String(b.host)));
