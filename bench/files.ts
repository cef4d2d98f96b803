/**
 * Files: putFile of 256 MiB to a local context and two ssh hops away,
 * against a pipe into a runtime writing it (and ssh carrying it), and rsync
 * of a 1000-file tree through fakessh against rsync over plain ssh.
 *
 * @module
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import type { TestHosts } from "../lab/hosts.ts";
import { fakessh } from "../mod.ts";
import { shellQuote } from "../firststage.ts";
import { bounded, type Stats, spread, stats, timeMs } from "./lib.ts";
import { failed, kind, type Measure, newRouter, P, ratioCell, ratioRow, ratios, rounds, row, rt, runtime } from "./harness.ts";
import { bastionOptions, type HostMeasure, hostRuntime, type OnHosts, SSH_CONNECT_MS } from "./on-hosts.ts";
import { commandToExit } from "./raw.ts";

// ---------------------------------------------------------------------------
// putFile of 256 MiB, to a local context (here) and two ssh hops away (on the hosts)

const PUT_BYTES = 256 * 1024 * 1024;
const PUT_LOCAL = "putFile 256 MiB (MB/s)";
const PUT_HOPS = "putFile 256 MiB, 2 ssh hops";

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

/** putFile to a local context. */
export const putLocal: Measure = {
  key: "put",
  run: benchPutLocal,
  reference: () => [
    `\`cat <256 MiB file> | ${kind === "node" ? "node -e" : "deno eval"} '<stdin to a file, then fsync>'\` to its exit; two hops: \`cat <file> | ssh bastion ssh <inner> 'cat > dst && sync dst'\`;`,
    "mitogen: ctx.putFile of the same file (temporary file, sha256 on both ends, fsync, rename) to a local context, and to inner via bastion",
  ],
};

/** putFile to inner through bastion (its raw reference is in {@link putLocal}'s). */
export const putHops: HostMeasure = {
  key: "put-hops",
  run: ({ hosts }: OnHosts) => benchPutHops(hosts),
  skip: (why) => row(PUT_HOPS, `SKIP: ${why}`, "", "", ">= 80% of raw", "SKIP"),
  reference: () => [],
};

// ---------------------------------------------------------------------------
// rsync of a 1000-file tree through fakessh, against rsync over plain ssh to the same host

const RSYNC_NAME = "rsync 1000 files, fakessh";
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

/** rsync through fakessh to bastion's context. */
export const rsync: HostMeasure = {
  key: "rsync",
  run: ({ hosts }: OnHosts) => benchRsync(hosts),
  skip: (why) => row(RSYNC_NAME, `SKIP: ${why}`, "", "", "<= 1.2x", "SKIP"),
  reference: () => [
    `\`rsync -a -e 'ssh -T -o BatchMode=yes -F <config>' tree/ bastion:dst/\` of ${RSYNC_FILES} files (2 to 5 KiB, 20 dirs) into an empty dst, spawn to exit;`,
    "mitogen: the same rsync through fakessh.run to a context on bastion connected once before the rounds",
  ],
};
