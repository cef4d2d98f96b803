/**
 * The first stage on its own, driven by hand: EOF before the payload, a
 * payload one byte at a time, garbage, and shell safety.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { describe, test } from "node:test";
import { HANDLE, MARKER, Message, runtimeCommand, writeHeader } from "../core.ts";
import { firstStage } from "../parent.ts";
import { payloads } from "../payload.ts";
import { checkLeaks, RUNTIMES } from "./helpers.ts";

checkLeaks();

type Io = { write(b: Uint8Array): void; end(): void; read: () => Promise<string>; exited: Promise<{ code: number | null; stderr: string }> };

/** Start the first stage under `kind`, optionally through /bin/sh with the stage in single quotes. */
function start(kind: "node" | "deno", length: number, viaShell = false): { proc: ChildProcess; io: Io } {
  const { exe } = runtimeCommand(kind);
  const stage = firstStage(kind);
  const words = kind === "node" ? [exe, "-e", stage, "boot-test", String(length)] : [exe, "eval", stage, "boot-test", String(length)];
  const stdio: ("pipe" | "ignore")[] = kind === "node" ? ["ignore", "pipe", "pipe", "pipe"] : ["pipe", "pipe", "pipe"];
  const env = { ...process.env, DENO_NO_UPDATE_CHECK: "1" };
  const proc = viaShell
    ? spawn("/bin/sh", ["-c", words.map((w) => `'${w}'`).join(" ")], { stdio, env })
    : spawn(words[0] as string, words.slice(1), { stdio, env });
  const out = (kind === "node" ? proc.stdio[3] : proc.stdout) as NodeJS.ReadableStream;
  const inp = (kind === "node" ? proc.stdio[3] : proc.stdin) as NodeJS.WritableStream & { end(): void };
  let buffered = "";
  let wake: (() => void) | null = null;
  out.on("data", (d: Buffer) => {
    buffered += d.toString("latin1");
    wake?.();
  });
  let stderr = "";
  proc.stderr?.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  const exited = new Promise<{ code: number | null; stderr: string }>((resolve) => proc.on("close", (code) => resolve({ code, stderr })));
  const io: Io = {
    write: (b) => inp.write(b),
    end: () => inp.end(),
    exited,
    /** Resolve with the next 8-byte marker. */
    read: async () => {
      const deadline = Date.now() + 10_000;
      while (buffered.length < 8) {
        if (Date.now() > deadline) throw new Error(`no marker; stderr: ${stderr}`);
        await Promise.race([new Promise<void>((r) => (wake = r)), exited.then(() => {}), new Promise((r) => setTimeout(r, 100))]);
        if (proc.exitCode !== null && buffered.length < 8) throw new Error(`exited ${proc.exitCode}; stderr: ${stderr}`);
      }
      const m = buffered.slice(0, 8);
      buffered = buffered.slice(8);
      return m;
    },
  };
  return { proc, io };
}

function configFrame(): Uint8Array[] {
  const msg = Message.encoded(
    { contextId: 1, parentIds: [0], name: "boot-test", maxMessageSize: 1 << 20, unidirectional: false, debug: false },
    { dst: 1, handle: HANDLE.CONFIGURE },
  );
  return [writeHeader(msg), ...msg.parts];
}

for (const kind of RUNTIMES) {
  describe(`${kind} first stage`, () => {
    test("argv is short and shell-safe", () => {
      const stage = firstStage(kind);
      assert.ok(!stage.includes("'"), "no single quote");
      const argv = [kind, kind === "node" ? "-e" : "eval", stage, "name", "99999"].join(" ");
      assert.ok(argv.length <= 600, `argv is ${argv.length} characters`);
    });

    test("EOF before the payload exits at once with a clear message", async () => {
      const { io } = start(kind, 1000);
      assert.equal(await io.read(), MARKER.READY);
      io.write(new Uint8Array(10));
      io.end();
      const { code, stderr } = await io.exited;
      assert.equal(code, 1);
      assert.match(stderr, /mitogen\(boot-test\): EOF before payload/);
    });

    test("garbage instead of the payload exits with a clear message", async () => {
      const garbage = new Uint8Array(500).map((_, i) => (i * 7919) % 256);
      const { io } = start(kind, garbage.length);
      assert.equal(await io.read(), MARKER.READY);
      io.write(garbage);
      const { code, stderr } = await io.exited;
      assert.equal(code, 1);
      assert.match(stderr, /mitogen\(boot-test\): bad payload/);
    });

    test("a payload delivered one byte at a time boots, through sh -c with single quotes", async () => {
      const { core } = await payloads();
      const { io } = start(kind, core.byteLength, true);
      assert.equal(await io.read(), MARKER.READY);
      for (let i = 0; i < core.byteLength; i++) {
        io.write(core.subarray(i, i + 1));
        if (i % 64 === 0) await new Promise((r) => setImmediate(r));
      }
      for (const part of configFrame()) io.write(part);
      assert.equal(await io.read(), MARKER.CONNECTED);
      io.end(); // parent gone: the child exits by itself
      const { code } = await io.exited;
      assert.equal(code, 0);
    });
  });
}
