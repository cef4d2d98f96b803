/**
 * lab/slowlink.mjs, the slow link of the bench's round-trip lines: as ssh's ProxyCommand to
 * bastion, it adds at least twice its delay to every round trip, and passes bytes intact and in
 * order. Skips (with the reason) where the hosts cannot be set up.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { checkLeaks, underDeno } from "./helpers.ts";
import { findProgram, type TestHosts, useTestHosts } from "../lab/hosts.ts";

checkLeaks();

let hosts: TestHosts;
const { skip } = useTestHosts((ready) => {
  hosts = ready;
});

const SLOWLINK = fileURLToPath(new URL("../lab/slowlink.mjs", import.meta.url));
/** One-way delay of the proxy under test (ms). */
const DELAY = 50;
/** Round trips timed per link. */
const ROUND_TRIPS = 8;

/** `ssh bastion cat` as a long-lived child, through the slow link when `delay` is given; bytes read are handed to `onData`. */
class SshCat {
  readonly proc: ChildProcess;
  readonly closed: Promise<void>;
  #got: Buffer[] = [];
  #have = 0;
  #want = 0;
  #wake: (() => void) | null = null;

  constructor(delay?: number) {
    const node = underDeno ? (findProgram("node") ?? "node") : process.execPath;
    const proxy = delay === undefined ? [] : ["-o", `ProxyCommand=${node} ${SLOWLINK} ${delay} %h %p`];
    this.proc = spawn("ssh", ["-F", hosts.sshConfigFile, "-o", "BatchMode=yes", ...proxy, "bastion", "cat"], { stdio: ["pipe", "pipe", "inherit"] });
    this.closed = new Promise((resolve) => this.proc.once("close", () => resolve()));
    this.proc.stdout?.on("data", (d: Buffer) => {
      this.#got.push(d);
      this.#have += d.byteLength;
      if (this.#have >= this.#want) this.#wake?.();
    });
  }

  /** Write `bytes`; resolve with all bytes read since the last exchange once as many have come back (bounded by `limitMs`). */
  async exchange(bytes: Uint8Array, limitMs = 30_000): Promise<Buffer> {
    this.#want = this.#have + bytes.byteLength;
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        timer = setTimeout(() => reject(new Error(`ssh cat: ${this.#have} of ${this.#want} bytes after ${limitMs} ms`)), limitMs);
        this.#wake = resolve;
        this.proc.stdin?.write(bytes);
        if (this.#have >= this.#want) resolve();
      });
    } finally {
      clearTimeout(timer);
      this.#wake = null;
    }
    const out = Buffer.concat(this.#got);
    this.#got = [];
    this.#have = 0;
    this.#want = 0;
    return out;
  }

  /** Milliseconds of each of `n` one-byte round trips. */
  async roundTrips(n: number): Promise<number[]> {
    const times: number[] = [];
    for (let i = 0; i < n; i++) {
      const t0 = performance.now();
      await this.exchange(Uint8Array.of(i));
      times.push(performance.now() - t0);
    }
    return times;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.proc.stdin?.end();
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 5000);
    await this.closed;
    clearTimeout(timer);
  }
}

test(`the slow link adds at least 2 x ${DELAY} ms to each round trip over ssh, and passes 1 MiB intact`, { skip, timeout: 120_000 }, async () => {
  await using fast = new SshCat();
  await using slow = new SshCat(DELAY);
  // The first exchange also waits for ssh to connect.
  await fast.exchange(Uint8Array.of(0), 30_000);
  await slow.exchange(Uint8Array.of(0), 30_000);
  const direct = Math.min(...(await fast.roundTrips(ROUND_TRIPS)));
  const delayed = await slow.roundTrips(ROUND_TRIPS);
  // Each direction holds every chunk for DELAY ms (a timer may fire up to 1 ms early on its own clock).
  const least = Math.min(...delayed);
  assert.ok(
    least - direct >= 2 * DELAY - 2,
    `round trips through the slow link ${delayed.map((t) => t.toFixed(1)).join(", ")} ms, direct ${direct.toFixed(1)} ms`,
  );

  const bytes = randomBytes(1024 * 1024);
  const back = await slow.exchange(bytes, 60_000);
  assert.equal(back.byteLength, bytes.byteLength);
  assert.equal(createHash("sha256").update(back).digest("hex"), createHash("sha256").update(bytes).digest("hex"), "the bytes came back in order");
});
