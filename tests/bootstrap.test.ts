/**
 * The first stage on its own, driven by hand: the READY line, EOF before the
 * payload, a payload (and its length) one byte at a time, garbage, and shell
 * safety; and the code cache local node children compile the core with.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { describe, test } from "node:test";
import { inflateRawSync } from "node:zlib";
import { CORE, HANDLE, MARKER, Message, writeHeader } from "../frames.ts";
import { runtimeCommand } from "../runtime.ts";
import { Stream } from "../stream.ts";
import { DENO_EVAL, firstStage } from "../firststage.ts";
import { childRuntime } from "../versions.ts";
import { payloads } from "../payload.ts";
import { checkLeaks, routerWithLogs, RUNTIMES, transportPair } from "./helpers.ts";

checkLeaks();

type Io = { write(b: Uint8Array): void; end(): void; read: () => Promise<string>; exited: Promise<{ code: number | null; stderr: string }> };

/** Start the first stage under `kind` (the local one, or the one that inflates), optionally through /bin/sh with the stage in single quotes. */
function start(kind: "node" | "deno", viaShell = false, plain = true): { proc: ChildProcess; io: Io } {
  const { exe } = runtimeCommand(kind);
  const stage = firstStage(kind, "socket", plain);
  const words = kind === "node" ? [exe, "-e", stage, "boot-test"] : [exe, ...DENO_EVAL, stage, "boot-test"];
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
    /** Resolve with the next marker line, its newline included. */
    read: async () => {
      const deadline = Date.now() + 10_000;
      while (!buffered.includes("\n")) {
        if (Date.now() > deadline) throw new Error(`no marker; stderr: ${stderr}`);
        await Promise.race([new Promise<void>((r) => (wake = r)), exited.then(() => {}), new Promise((r) => setTimeout(r, 100))]);
        if (proc.exitCode !== null && !buffered.includes("\n")) throw new Error(`exited ${proc.exitCode}; stderr: ${stderr}`);
      }
      const m = buffered.slice(0, buffered.indexOf("\n") + 1);
      buffered = buffered.slice(m.length);
      return m;
    },
  };
  return { proc, io };
}

/** The u32 big-endian length the parent sends before the payload. */
function lengthOf(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
}

/** The READY line this very runtime writes: the master runs the same runtime as the child here. */
const ready = (kind: "node" | "deno") => {
  const self = (globalThis as { Deno?: { version: { deno: string } } }).Deno;
  const version =
    kind === "deno" && self ? self.version.deno : kind === "node" && !self ? process.version : `${kind === "node" ? "v" : ""}\\d+\\.\\d+\\.\\d+\\S*`;
  return new RegExp(`^${MARKER.READY}${kind} ${version}\n$`);
};

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
      for (const plain of [true, false]) {
        const stage = firstStage(kind, "socket", plain);
        assert.ok(!stage.includes("'"), "no single quote");
        const argv = (kind === "node" ? [kind, "-e", stage, "name"] : [kind, ...DENO_EVAL, stage, "name"]).join(" ");
        assert.ok(argv.length <= 600, `argv is ${argv.length} characters`);
      }
    });

    test("EOF before the payload exits at once with a clear message", async () => {
      const { io } = start(kind);
      assert.match(await io.read(), ready(kind));
      io.write(lengthOf(1000));
      io.write(new Uint8Array(10));
      io.end();
      const { code, stderr } = await io.exited;
      assert.equal(code, 1);
      assert.match(stderr, /mitogen\(boot-test\): EOF before payload/);
    });

    for (const plain of [true, false]) {
      const form = plain ? "plain" : "deflated";
      test(`garbage instead of the payload exits with a clear message (${form})`, async () => {
        const garbage = new Uint8Array(500).map((_, i) => (i * 7919) % 256);
        const { io } = start(kind, false, plain);
        assert.match(await io.read(), ready(kind));
        io.write(lengthOf(garbage.length));
        io.write(garbage);
        const { code, stderr } = await io.exited;
        assert.equal(code, 1);
        assert.match(stderr, /mitogen\(boot-test\): bad payload/);
      });

      test(`a ${form} payload delivered one byte at a time boots, through sh -c with single quotes`, async () => {
        const { core } = await payloads();
        const payload = plain ? new Uint8Array(inflateRawSync(core)) : core;
        const { io } = start(kind, true, plain);
        assert.match(await io.read(), ready(kind));
        const bytes = new Uint8Array([...lengthOf(payload.byteLength), ...payload]);
        for (let i = 0; i < bytes.byteLength; i++) {
          io.write(bytes.subarray(i, i + 1));
          if (i % 64 === 0) await new Promise((r) => setImmediate(r));
        }
        for (const part of configFrame()) io.write(part);
        assert.equal(await io.read(), MARKER.CONNECTED);
        io.end(); // parent gone: the child exits by itself
        const { code } = await io.exited;
        assert.equal(code, 0);
      });
    }
  });
}

describe("the READY line", () => {
  /** A Stream whose other end the test writes; resolves what expectMarker(READY) gives, or its error. */
  const readyFrom = async (...chunks: string[]): Promise<string | Error> => {
    const [far, near] = transportPair();
    const stream = new Stream("ready-test", near);
    stream.start();
    const got = stream.expectMarker(MARKER.READY).catch((e: Error) => e);
    for (const c of chunks) {
      far.inject(new TextEncoder().encode(c));
      await new Promise((r) => setTimeout(r, 1));
    }
    const connected = stream.expectMarker(MARKER.CONNECTED).catch((e: Error) => e);
    far.inject(new TextEncoder().encode(MARKER.CONNECTED));
    const result = await got;
    if (!(result instanceof Error)) assert.equal(await connected, "", "the bytes after the line are the next marker");
    stream.close();
    return result;
  };

  test("gives the rest of its line, however it is cut", async () => {
    assert.equal(await readyFrom("MITO000 node v12.22.12\n"), "node v12.22.12");
    assert.equal(await readyFrom("MITO0", "00 deno 1.4", "6.3", "\n"), "deno 1.46.3");
  });

  test("refuses anything else at once", async () => {
    assert.match(String(await readyFrom("MITO001\n")), /expected bootstrap marker, got "MITO001/);
    assert.match(String(await readyFrom("MITO000 node\u0000v1\n")), /expected bootstrap marker line/);
    assert.match(String(await readyFrom(`MITO000 ${"x".repeat(120)}`)), /expected bootstrap marker line/);
  });

  test("says which core a runtime gets, or that it is too old", () => {
    const core = (ready: string) => childRuntime(ready, "t").core;
    assert.equal(core("node v12.0.0"), CORE.LOWERED);
    assert.equal(core("node v16.10.0"), CORE.LOWERED);
    assert.equal(core("node v16.11.0"), CORE.MODERN);
    assert.equal(core("node v26.1.0"), CORE.MODERN);
    assert.equal(core("deno 1.46.0"), CORE.MODERN);
    assert.deepEqual(childRuntime("node v12.22.12", "t"), { kind: "node", version: "12.22.12", text: "node 12.22.12", core: CORE.LOWERED });
    const range = "children need node 12 or later, or deno 1.46 or later";
    assert.throws(() => childRuntime("node v10.24.1", "t"), new RegExp(`^StreamError: t: node 10\\.24\\.1 is too old: ${range}$`));
    assert.throws(() => childRuntime("deno 1.45.5", "t"), new RegExp(`t: deno 1\\.45\\.5 is too old: ${range}`));
    assert.throws(() => childRuntime("bun 1.2.3", "t"), /t: the first stage reported "bun 1\.2\.3", not a runtime and version/);
  });
});

describe("V8's code cache of the core", () => {
  test("the first local node child of a runtime makes it, the next ones compile the core with it", async () => {
    await using fixture = routerWithLogs({ debug: true });
    const { router, logs } = fixture;
    // NODE_OPTIONS is part of what a cache is kept under: this value gives the test a runtime of its own.
    const env = { NODE_OPTIONS: "--no-deprecation" };
    const names = ["cache-first", "cache-second", "cache-third"];
    for (const name of names) {
      const ctx = await router.local({ runtime: "node", name, env });
      assert.equal(await ctx.call((x: number) => x + 1, 41), 42);
    }
    // A call after the first child's CONFIGURE: its cache has reached the parent by then.
    const said = names.map((name) => logs.lines(name).filter((l) => l.startsWith("code cache")));
    assert.deepEqual(said, [[], ["code cache used"], ["code cache used"]]);
  });
});
