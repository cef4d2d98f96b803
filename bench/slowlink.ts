/**
 * Round trips and bulk over a slow link (`--slow-link [D]`): ssh from here to bastion runs through
 * lab/slowlink.mjs as its ProxyCommand, which holds each chunk D ms in each direction (bastion to
 * inner stays fast). Each line sets mitogen against a raw reference of the same shape on the same
 * link and prints the extra round trips, (mitogen - raw) / 2D paired per round, or for bulk the
 * throughput as a share of `cat` through the same ssh; and the frames each way on the master's
 * link (router.getStats()).
 *
 * @module
 */
import { type ChildProcess, spawn } from "node:child_process";
import { chmodSync, closeSync, createReadStream, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import type { TestHosts } from "../lab/hosts.ts";
import { bundle, bundleTarget } from "../bundler.ts";
import { shellQuote } from "../firststage.ts";
import type { Context, Router, SshOptions } from "../mod.ts";
import { bounded, num, type Stats, spread, stats, timeMs } from "./lib.ts";
import { detail, failed, newRouter, P, pidOf, ratioCell, ratios, type Rounds, rounds, roundsOf, row, slowDelay, waitGone, zero } from "./harness.ts";
import { bastionOptions, type HostMeasure, hostEval, hostRuntime, type OnHosts, SSH_CONNECT_MS, type SshTap, shown } from "./on-hosts.ts";
import { commandToExit } from "./raw.ts";

const SLOWLINK = fileURLToPath(new URL("../lab/slowlink.mjs", import.meta.url));
const D = slowDelay;

/** The ssh option that sends the connection through the slow link. */
const proxyOption = (): string => `ProxyCommand=${shellQuote(process.execPath)} ${shellQuote(SLOWLINK)} ${D} %h %p`;

/** ssh() to bastion through the slow link. */
const slowBastion = (hosts: TestHosts, extra: Partial<SshOptions> = {}): SshOptions =>
  bastionOptions(hosts, { sshArgs: ["-F", hosts.sshConfigFile, "-o", proxyOption()], ...extra });

/** ssh() to inner via `bastion` (the fast link). */
const innerOptions = (hosts: TestHosts, bastion: Context, extra: Partial<SshOptions> = {}): SshOptions => ({
  hostname: hosts.inner.address,
  via: bastion,
  name: "inner",
  connectTimeout: SSH_CONNECT_MS,
  runtime: hostRuntime,
  ...extra,
});

/** Frames over one link since some point: master to child, child to master. */
interface Frames {
  out: number;
  in: number;
}

/** The frame counters of the master's link to `ctx` (a direct child). */
function framesTo(router: Router, ctx: Context): Frames {
  const link = router.getStats().links.find((l) => l.id === ctx.contextId);
  return { out: link?.framesOut ?? Number.NaN, in: link?.framesIn ?? Number.NaN };
}

/** Frames over the link to `ctx` while `fn` runs. */
async function framesDuring<T>(router: Router, ctx: Context, fn: () => Promise<T>, into: Frames[]): Promise<T> {
  const a = framesTo(router, ctx);
  const out = await fn();
  const b = framesTo(router, ctx);
  into.push({ out: b.out - a.out, in: b.in - a.in });
  return out;
}

/** "out / in" medians of recorded frame counts. */
const framesText = (f: readonly Frames[]): string =>
  f.length ? `${num(stats(f.map((x) => x.out)).median, 0)} down / ${num(stats(f.map((x) => x.in)).median, 0)} up` : "n/a";

/** A row of extra round trips, (mitogen - raw) / 2D paired per round, PASS at a median <= `goal`. */
function roundTripRow(name: string, r: Rounds, goal: number): void {
  const extra = stats(r.mito.map((m, i) => (m - (r.raw[i] ?? Number.NaN)) / (2 * D)));
  row(
    name,
    spread(stats(r.mito), 0, " ms"),
    spread(stats(r.raw), 0, " ms"),
    ratioCell(r, extra, 2, " RT"),
    `<= ${goal} RT`,
    extra.median <= goal ? "PASS" : "MISS",
  );
}

/** A row of throughput against raw, PASS at a median share >= `goal` %. */
function shareRow(name: string, r: Rounds, goal: number): void {
  const q = ratios(r.mito, r.raw);
  const pct: Stats = { median: q.median * 100, min: q.min * 100, max: q.max * 100, n: q.n };
  row(
    name,
    spread(stats(r.mito), 1, " MB/s"),
    spread(stats(r.raw), 1, " MB/s"),
    ratioCell(r, pct, 1, "%"),
    `>= ${goal}% of raw`,
    pct.median >= goal ? "PASS" : "MISS",
  );
}

/** The raw references as run (for the footer), once recorded. */
const ran = { boot: "", via: "", bulk: "" };

// ---------------------------------------------------------------------------
// boot + first call

const BOOT_NAME = `slow ${D} ms: ssh boot + first call`;

/** The remote command of the stdin floor: it reads one byte and ends. */
const STDIN_FLOOR = "head -c1 >/dev/null";

/** Extra round trips of `a` over `b`, paired per round. */
const extraRT = (a: readonly number[], b: readonly number[]): string => spread(stats(a.map((x, i) => (x - (b[i] ?? Number.NaN)) / (2 * D))), 2, " RT");

/** The detail lines of a stdin floor: the raw command behind `printf x |` (`shape`), measured in the same rounds. */
function floorDetail(shape: string, r: { mito: number[]; raw: number[]; floor: number[] }): void {
  detail(`floor: \`printf x | ssh ... ${shape}\` costs ${extraRT(r.floor, r.raw)} over the raw reference; mitogen is ${extraRT(r.mito, r.floor)} over it`);
  detail("(sshd opens a session's window when its command starts, so stdin reaches the command a round trip after the exec request)");
}

async function benchBoot(hosts: TestHosts, tap: SshTap): Promise<void> {
  try {
    const r = await bounded(90_000, async (scope) => {
      const frames: Frames[] = [];
      /** ssh() + one call, timed; then shutdown to both exits (not timed). */
      const once = async (sshPath?: string) => {
        let pid = 0;
        let ms = 0;
        {
          await using router = scope.add(newRouter());
          const t0 = performance.now();
          const ctx = await router.ssh(slowBastion(hosts, sshPath ? { sshPath } : {}));
          pid = await ctx.call(pidOf);
          ms = performance.now() - t0;
          const f = framesTo(router, ctx);
          if (!sshPath) frames.push(f);
          await ctx.shutdown({ wait: true });
        }
        await waitGone(pid);
        return ms;
      };
      await once(tap.path("slow-boot"));
      const argv = [...tap.prefix("slow-boot"), hostEval];
      ran.boot = shown(argv, hosts.sshConfigFile);
      const raw = () => timeMs(() => commandToExit(argv, SSH_CONNECT_MS));
      // The floor of anything fed through stdin: a command that ends once one byte of it has come.
      const floor = () => timeMs(() => commandToExit([...argv.slice(0, -1), STDIN_FLOOR], SSH_CONNECT_MS, "x"));
      await raw();
      const [mito = [], rawMs = [], floorMs = []] = await roundsOf(P.sshRounds, 30_000 * P.budget, [once, raw, floor]);
      return { mito, raw: rawMs, floor: floorMs, planned: P.sshRounds, frames };
    });
    roundTripRow(BOOT_NAME, r, 0.5);
    detail(`frames on the master's link to the first call's answer: ${framesText(r.frames)} (the bootstrap's unframed bytes not counted)`);
    floorDetail(`'${STDIN_FLOOR}'`, r);
  } catch (err) {
    failed(BOOT_NAME, err);
  }
}

/** ssh() to bastion over the slow link + the first call, against `ssh bastion node -e ''` through it. */
export const slowBoot: HostMeasure = {
  key: "slow-boot",
  run: ({ hosts, tap }: OnHosts) => benchBoot(hosts, tap),
  skip: (why) => row(BOOT_NAME, `SKIP: ${why}`, "", "", "<= 0.5 RT", "SKIP"),
  reference: () => [
    `\`${ran.boot || `ssh <the options mitogen's ssh() passed, ProxyCommand slowlink.mjs ${D}> -- bastion ${hostEval}`}\` spawn to exit;`,
    "mitogen: new Router, ssh() to bastion through the same ProxyCommand, from the ssh() call to the first ctx.call(() => 0)'s answer;",
    `floor: the same ssh running '${STDIN_FLOOR}' with "x" on its stdin, spawn to exit`,
  ],
};

// ---------------------------------------------------------------------------
// first call of a newly imported module

const IMPORT_NAME = `slow ${D} ms: first import + call`;

async function benchImport(hosts: TestHosts): Promise<void> {
  const dir = mkdtempSync(join(os.tmpdir(), "mitogen-bench-slow-"));
  try {
    const r = await bounded(60_000, async (scope) => {
      const router = scope.add(newRouter());
      const ctx = await router.ssh(slowBastion(hosts));
      let round = 0;
      const bundling: number[] = [];
      const frames = { mito: [] as Frames[], raw: [] as Frames[] };
      /** A new module, bundled ahead (esbuild's time is the master's CPU, not the link's; it is printed apart). */
      const fresh = async () => {
        const n = round++;
        const url = pathToFileURL(join(dir, `fresh-${n}.ts`));
        writeFileSync(url, `/** Generated by bench/slowlink.ts. */\nexport function round(): number {\n  return ${n};\n}\n`);
        bundling.push(await timeMs(() => bundle(url, bundleTarget(ctx.runtime))));
        return { url, n };
      };
      const mito = async () => {
        const { url, n } = await fresh();
        return timeMs(() =>
          framesDuring(
            router,
            ctx,
            async () => {
              const mod = await ctx.import<{ round(): number }>(url);
              if ((await mod.round()) !== n) throw new Error("the imported module answered for another round");
            },
            frames.mito,
          ),
        );
      };
      const raw = () => timeMs(() => framesDuring(router, ctx, () => ctx.call(zero), frames.raw));
      await mito();
      await raw();
      return { ...(await rounds(P.rounds, 20_000 * P.budget, mito, raw)), bundling, frames };
    });
    roundTripRow(IMPORT_NAME, r, 0.5);
    detail(
      `frames on the master's link: import + call ${framesText(r.frames.mito)}, plain call ${framesText(r.frames.raw)}; ` +
        `esbuild ahead of each round (not timed): ${spread(stats(r.bundling), 1, " ms")}`,
    );
  } catch (err) {
    failed(IMPORT_NAME, err);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The first call of a newly imported module on bastion, against a plain call there. */
export const slowImport: HostMeasure = {
  key: "slow-import",
  run: ({ hosts }: OnHosts) => benchImport(hosts),
  skip: (why) => row(IMPORT_NAME, `SKIP: ${why}`, "", "", "<= 0.5 RT", "SKIP"),
  reference: () => [
    "ctx.call(() => 0) on a context on bastion over the slow link; mitogen: ctx.import of a new module (bundled ahead) + the first call of its export, on the same context",
  ],
};

// ---------------------------------------------------------------------------
// a context on inner via bastion + its first call

const VIA_NAME = `slow ${D} ms: inner via bastion + call`;

async function benchVia(hosts: TestHosts, tap: SshTap): Promise<void> {
  try {
    const r = await bounded(120_000, async (scope) => {
      const frames: Frames[] = [];
      const split = { bastion: [] as number[], inner: [] as number[], again: [] as number[] };
      /** ssh() to bastion, ssh() to inner via it, one call there: timed; then a second context via the same bastion (timed apart). */
      const once = async (record = true) => {
        await using router = scope.add(newRouter());
        const start = async (bastion: Context, name: string) => {
          const inner = await router.ssh(innerOptions(hosts, bastion, { name, sshPath: tap.path("slow-via-inner") }));
          await inner.call(zero);
        };
        const t0 = performance.now();
        const bastion = await router.ssh(slowBastion(hosts, { sshPath: tap.path("slow-via-bastion") }));
        const t1 = performance.now();
        await start(bastion, "inner");
        const t2 = performance.now();
        const f = framesTo(router, bastion);
        const again = await timeMs(() => start(bastion, "inner.2"));
        if (record) {
          frames.push(f);
          split.bastion.push(t1 - t0);
          split.inner.push(t2 - t1);
          split.again.push(again);
        }
        return t2 - t0;
      };
      await once(false);
      const outer = tap.prefix("slow-via-bastion");
      const inner = tap.prefix("slow-via-inner");
      ran.via = `${shown(outer, hosts.sshConfigFile)} "${shown(inner, hosts.sshConfigFile)} ${hostEval}"`;
      const nested = [...inner, hostEval].map(shellQuote).join(" ");
      const raw = () => timeMs(() => commandToExit([...outer, nested], SSH_CONNECT_MS));
      // The floor: bastion's shell starts the nested ssh once a byte of stdin has come (as a start request does).
      const floor = () => timeMs(() => commandToExit([...outer, `${STDIN_FLOOR}; ${nested}`], SSH_CONNECT_MS, "x"));
      await raw();
      const n = Math.min(P.rounds, 5);
      const [mito = [], rawMs = [], floorMs = []] = await roundsOf(n, 40_000 * P.budget, [once, raw, floor]);
      return { mito, raw: rawMs, floor: floorMs, planned: n, frames, split };
    });
    roundTripRow(VIA_NAME, r, 1.5);
    floorDetail(`"${STDIN_FLOOR}; ssh ... ${hostEval}"`, r);
    const part = (xs: number[]) => spread(stats(xs), 0, " ms");
    detail(
      `split: ssh() to bastion ${part(r.split.bastion)}, then inner via it + call ${part(r.split.inner)}; a second context via the same bastion ${part(r.split.again)}; ` +
        `frames on the master's link to bastion up to inner's answer: ${framesText(r.frames)}`,
    );
  } catch (err) {
    failed(VIA_NAME, err);
  }
}

/** A bastion behind the slow link, a context on inner via it, and its first call, against nested ssh. */
export const slowVia: HostMeasure = {
  key: "slow-via",
  run: ({ hosts, tap }: OnHosts) => benchVia(hosts, tap),
  skip: (why) => row(VIA_NAME, `SKIP: ${why}`, "", "", "<= 1.5 RT", "SKIP"),
  reference: () => [
    `\`${ran.via || `ssh <slow link> -- bastion "ssh <the options bastion's ssh() passed> -- <inner> ${hostEval}"`}\` spawn to exit (nested ssh, bastion's shell);`,
    "mitogen: ssh() to bastion over the slow link, ssh() to inner via it, one call on inner, from the first ssh() call to the answer; the detail splits it;",
    `floor: the same with '${STDIN_FLOOR}; ' before the nested ssh and "x" on its stdin`,
  ],
};

// ---------------------------------------------------------------------------
// bulk: putFile and a Sender stream to bastion, against cat through the same ssh

const BULK_BYTES = 64 * 1024 * 1024;
const BULK_BLOCK = 1024 * 1024;
const PUT_NAME = `slow ${D} ms: putFile 64 MiB`;
const STREAM_NAME = `slow ${D} ms: Sender 64 MiB`;

/** The marker the raw remote command prints once it runs, and once it is done. */
const READY = "mitogen-bench-ready";
const DONE = "mitogen-bench-done";

/**
 * `argv`, whose remote command prints {@link READY}, reads stdin and prints {@link DONE}: the file `src`
 * goes to its stdin once READY is in; milliseconds from READY to DONE.
 */
function catThrough(argv: readonly string[], src: string, limitMs = 60_000): Promise<number> {
  const [exe = "", ...args] = argv;
  return new Promise((resolve, reject) => {
    const proc: ChildProcess = spawn(exe, args, { stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    let err = "";
    let t0 = 0;
    let ms = 0;
    const timer = setTimeout(() => proc.kill("SIGKILL"), limitMs);
    proc.stderr?.setEncoding("utf8").on("data", (t: string) => (err = (err + t).slice(-2000)));
    proc.stdin?.on("error", () => {}); // an ssh that ends early: its exit says why
    proc.stdout?.setEncoding("utf8").on("data", (t: string) => {
      out += t;
      if (!t0 && out.includes(READY)) {
        t0 = performance.now();
        createReadStream(src).pipe(proc.stdin as NodeJS.WritableStream);
      }
      if (!ms && out.includes(DONE)) ms = performance.now() - t0;
    });
    proc.once("error", reject);
    proc.once("close", (code, signal) => {
      clearTimeout(timer);
      if (ms && code === 0) resolve(ms);
      else reject(new Error(`raw cat through ssh: ${signal ?? code}, ${out.includes(DONE) ? "done" : "not done"}: ${err.trim().split("\n").at(-1) ?? ""}`));
    });
  });
}

/** A file of `bytes` changing bytes at `file`. */
function writeSource(file: string, bytes: number): void {
  const block = new Uint8Array(BULK_BLOCK);
  const fd = openSync(file, "w");
  for (let i = 0; i < bytes / block.byteLength; i++) {
    block.fill(i & 0xff);
    writeSync(fd, block);
  }
  closeSync(fd);
  chmodSync(file, 0o644);
}

async function benchBulk(hosts: TestHosts, tap: SshTap): Promise<void> {
  const dir = mkdtempSync(join(os.tmpdir(), "mitogen-bench-slow-"));
  chmodSync(dir, 0o777); // the test user on bastion writes here (the hosts share this filesystem)
  const src = join(dir, "src.bin");
  try {
    writeSource(src, BULK_BYTES);
    const mbps = (ms: number) => BULK_BYTES / 1e6 / (ms / 1000);
    const r = await bounded(180_000, async (scope) => {
      const router = scope.add(newRouter());
      const ctx = await router.ssh(slowBastion(hosts, { sshPath: tap.path("slow-bulk") }));
      await ctx.connected(); // ssh has run the wrapper, which recorded its argv
      const prefix = tap.prefix("slow-bulk");
      const dst = join(dir, "raw.bin");
      const toFile = [...prefix, `echo ${READY}; cat > ${shellQuote(dst)} && sync ${shellQuote(dst)} && echo ${DONE}`];
      const toNull = [...prefix, `echo ${READY}; cat > /dev/null && echo ${DONE}`];
      ran.bulk = shown(prefix, hosts.sshConfigFile);
      const frames = { put: [] as Frames[], stream: [] as Frames[] };
      const put = async () => mbps(await timeMs(() => framesDuring(router, ctx, () => ctx.putFile(src, join(dir, "mito.bin")), frames.put)));
      const { sink, drain } = await ctx.import<typeof import("./fixtures/sink.ts")>(new URL("./fixtures/sink.ts", import.meta.url));
      const block = new Uint8Array(BULK_BLOCK).fill(90);
      const stream = async () => {
        const s = await sink();
        const ms = await timeMs(() =>
          framesDuring(
            router,
            ctx,
            async () => {
              const done = drain();
              for (let i = 0; i < BULK_BYTES / BULK_BLOCK; i++) await s.send(block);
              s.close();
              const got = await done;
              if (got !== BULK_BYTES) throw new Error(`bastion received ${got} of ${BULK_BYTES} bytes`);
            },
            frames.stream,
          ),
        );
        return mbps(ms);
      };
      await put();
      await catThrough(toFile, src);
      const putRounds = await rounds(P.bulkRounds, 40_000 * P.budget, put, async () => mbps(await catThrough(toFile, src)));
      const streamRounds = await rounds(P.bulkRounds, 40_000 * P.budget, stream, async () => mbps(await catThrough(toNull, src)));
      return { putRounds, streamRounds, frames };
    });
    shareRow(PUT_NAME, r.putRounds, 90);
    detail(`frames on the master's link per putFile: ${framesText(r.frames.put)}`);
    shareRow(STREAM_NAME, r.streamRounds, 90);
    detail(`frames on the master's link per stream (${BULK_BYTES / BULK_BLOCK} blocks of ${BULK_BLOCK / 1024} KiB): ${framesText(r.frames.stream)}`);
  } catch (err) {
    failed(`${PUT_NAME} / Sender`, err);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** putFile and a Sender stream to bastion over the slow link, against cat through the same ssh. */
export const slowBulk: HostMeasure = {
  key: "slow-bulk",
  run: ({ hosts, tap }: OnHosts) => benchBulk(hosts, tap),
  skip: (why) => {
    row(PUT_NAME, `SKIP: ${why}`, "", "", ">= 90% of raw", "SKIP");
    row(STREAM_NAME, `SKIP: ${why}`, "", "", ">= 90% of raw", "SKIP");
  },
  reference: () => [
    `\`${ran.bulk || "ssh <the options mitogen's ssh() passed, the slow link> -- bastion"} '<ready>; cat > dst && sync dst; <done>'\` (putFile), '... cat > /dev/null ...' (Sender),`,
    "the same 64 MiB file into its stdin, from the remote's ready line to its done line; mitogen: ctx.putFile of the file (sha256, fsync, rename),",
    `and 64 x 1 MiB through \`await s.send(block)\` to a Receiver on bastion until it has counted them, on a context connected before over the same link`,
  ],
};
