/**
 * spawn.ts: a Deno.Command child's output is read to its end, also when its
 * reader was paused (flow control) past its exit. A tunnelled command's last
 * output was lost that way under load (fakessh-load.test.ts, 1 line in 1000).
 * launch.ts (Node): output that comes after the exit is read even when the loop is late.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { denoSpawn } from "../spawn.ts";
import { spawnLaunch } from "../launch.ts";
import { checkLeaks, underDeno, waitFor } from "./helpers.ts";

checkLeaks();

const skip = underDeno ? false : "denoSpawn starts through Deno.Command: this file's tests run under `deno test`";

/** Start `script`, pause its stdout at the first chunk until `pausedMs` after its exit, then read on; what came, in bytes. */
async function readPaused(script: string, leftoverMs: number | null, pausedMs: number): Promise<number> {
  let bytes = 0;
  let exited = false;
  const p = denoSpawn("/bin/sh", ["-c", script], process.env, undefined, () => (exited = true), leftoverMs);
  p.stdin.end();
  p.stderr.on("data", () => {});
  let first = true;
  p.stdout.on("data", (chunk) => {
    bytes += chunk.byteLength;
    if (!first) return;
    first = false;
    p.stdout.pause();
    void waitFor(() => exited, 10_000, "exit").then(() => setTimeout(() => p.stdout.resume(), pausedMs));
  });
  await p.gone;
  return bytes;
}

test("output still in the pipe when the process exits is read to its end, however long its reader was paused", { skip }, async () => {
  // The reader pauses at the first 1000 bytes; the rest (less than a pipe holds) waits in the pipe past the exit.
  for (const leftoverMs of [null, 200]) {
    const script = "head -c 1000 /dev/zero; sleep 0.2; head -c 60000 /dev/zero";
    assert.equal(await readPaused(script, leftoverMs, 600), 61_000, `leftoverMs ${leftoverMs}`);
  }
});

test("a process left holding the pipe: gone comes once it has been idle for leftoverMs after the exit", { skip }, async () => {
  const t0 = Date.now();
  // setsid: a session of its own, out of the group's reach (the group is killed at the exit); $! is the sleeper (setsid execs it).
  const p = denoSpawn("/bin/sh", ["-c", "setsid sleep 30 & echo $!"], process.env, undefined, () => {}, 200);
  p.stdin.end();
  let out = "";
  p.stdout.on("data", (chunk) => (out += new TextDecoder().decode(chunk)));
  p.stderr.on("data", () => {});
  await p.gone;
  const waited = Date.now() - t0;
  const sleeper = Number(out.trim());
  assert.ok(sleeper > 0, out);
  process.kill(sleeper, "SIGKILL");
  assert.ok(waited < 5000, `gone after ${waited} ms`);
});

const nodeOnly = underDeno ? "spawnLaunch under Deno goes through denoSpawn, tested above" : false;

test("spawnLaunch (Node): output that comes after the exit, while this process is busy, is read, not dropped", { skip: nodeOnly }, async () => {
  // A process outside the group (setsid) writes 100 ms after the exit, while this process is blocked for 400 ms: the
  // 200 ms leftover timer is then due before the pipe is read. (Lost that way, `mitogen run` printed nothing for 4 hosts in 200.)
  const child = await spawnLaunch({
    exe: "/bin/sh",
    args: ["-c", "setsid sh -c 'sleep 0.1; echo late' & exit 0"],
    env: process.env,
    streamOn: "stdio",
    stdoutIsOutput: false,
  });
  let out = "";
  child.reader.on("data", (chunk) => (out += new TextDecoder().decode(chunk)));
  child.stderr.on("data", () => {});
  child.writer.end();
  // Spin in the check phase until the exit has been seen (in the poll phase before it), then be busy: at the next turn
  // of the loop the timer is due, and timers run before the pipe is polled.
  const t0 = Date.now();
  await new Promise<void>((resolve, reject) => {
    const spin = () => {
      if (child.status() === null) return Date.now() - t0 < 10_000 ? setImmediate(spin) : reject(new Error("no exit in 10 s"));
      const until = Date.now() + 400;
      while (Date.now() < until);
      resolve();
    };
    setImmediate(spin);
  });
  await child.gone;
  assert.equal(out, "late\n");
});
