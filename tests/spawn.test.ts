/**
 * spawn.ts: a Deno.Command child's output is read to its end, also when its
 * reader was paused (flow control) past its exit. A tunnelled command's last
 * output was lost that way under load (fakessh-load.test.ts, 1 line in 1000).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { denoSpawn } from "../spawn.ts";
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
