/**
 * What unauthenticated clients of a TCP listener cost: connections before the
 * handshake are capped (in all and per address, the newcomer from a source
 * holding fewer taking the place of the oldest of the source holding most),
 * a HELLO costs one scalar multiplication at most, and refusals are logged
 * once, then counted. The listening context runs with a lowered descriptor
 * limit (prlimit), so 2000 connections would exhaust it if they were kept.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmodSync, mkdtempSync, rmSync } from "node:fs";
import { connect as netConnect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { type CallContext, connect, type Context, generateKeyPair, type KeyPair, type ListenOptions, Router, takesRouter } from "../mod.ts";
import { captureLogs, checkLeaks, quietRouter, routerWithLogs, waitFor } from "./helpers.ts";

checkLeaks();

const scratch = mkdtempSync(join(tmpdir(), "mitogen-listen-load-"));
chmodSync(scratch, 0o700);
after(() => rmSync(scratch, { recursive: true, force: true }));

/** Start listening in the context it runs in; the listener kept in a global. */
const startListening = takesRouter(async (options: ListenOptions, call: CallContext) => {
  const l = await call.router.listen(options);
  (globalThis as unknown as { listener?: unknown }).listener = l;
  return l.port;
});
const stopListening = async () => {
  const g = globalThis as unknown as { listener?: { close(): Promise<void> } };
  await g.listener?.close();
  delete g.listener;
};

/**
 * The attacker (runs in a context of its own): `n` connections that never speak, from
 * 127.0.0.2.. (`sources` addresses), each opened again a second after the listener closes
 * it; and `floods` loops sending a HELLO with an authorized (public) key, closing at the answer.
 */
const attack = async (port: number, n: number, sources: number, floods: number, publicKey: string) => {
  const net = process.getBuiltinModule("node:net");
  const g = globalThis as unknown as { attack?: { stop: boolean; connected: number; welcomes: number; closes: number; sockets: Set<Socket> } };
  const state = { stop: false, connected: 0, welcomes: 0, closes: 0, sockets: new Set<Socket>() };
  g.attack = state;
  const open = (localAddress: string, hello: Uint8Array | null): Promise<void> =>
    new Promise((resolve) => {
      const s = net.connect({ port, host: "127.0.0.1", localAddress });
      state.sockets.add(s);
      s.on("error", () => {});
      s.once("connect", () => {
        state.connected++;
        if (hello) s.write(hello);
        resolve();
      });
      s.on("data", () => {
        state.welcomes++;
        s.destroy();
      });
      s.once("close", () => {
        state.closes++;
        state.sockets.delete(s);
        resolve();
        if (!state.stop) setTimeout(() => void open(localAddress, hello), hello ? 0 : 1000);
      });
    });
  const half = Array.from({ length: n }, (_, i) => open(`127.0.0.${2 + (i % sources)}`, null));
  const key = Buffer.from(publicKey, "base64");
  for (let i = 0; i < floods; i++) {
    const hello = new Uint8Array(65);
    hello[0] = 1;
    hello.set(process.getBuiltinModule("node:crypto").randomBytes(32), 1);
    hello.set(key, 33);
    void open(`127.0.0.${200 + i}`, hello);
  }
  // Every connection connected or closed (bounded: a listener that stopped accepting leaves SYNs unanswered).
  await Promise.race([Promise.all(half), new Promise((r) => setTimeout(r, 10_000))]);
  return { connected: state.connected, closes: state.closes };
};
const attackState = () => {
  const s = (globalThis as unknown as { attack: { connected: number; welcomes: number; closes: number; sockets: Set<{ destroy(): void }> } }).attack;
  return { connected: s.connected, welcomes: s.welcomes, closes: s.closes, open: s.sockets.size };
};
const stopAttack = () => {
  const s = (globalThis as unknown as { attack?: { stop: boolean; sockets: Set<{ destroy(): void }> } }).attack;
  if (!s) return;
  s.stop = true;
  for (const sock of s.sockets) sock.destroy();
};

/** What the listening context can still do: write and read a file, run a program, start a child. */
async function stillWorks(router: Router, a: Context, dir: string): Promise<void> {
  const file = join(dir, "still-works");
  const read = await a.call((f: string) => {
    const fs = process.getBuiltinModule("node:fs");
    fs.writeFileSync(f, "fs works");
    return fs.readFileSync(f, "utf8");
  }, file);
  assert.equal(read, "fs works");
  assert.equal(await a.call(() => process.getBuiltinModule("node:child_process").execFileSync("echo", ["spawn works"]).toString().trim()), "spawn works");
  const child = await router.local({ name: "c", via: a });
  assert.equal(await child.call(() => "child works"), "child works");
}

test("under 2000 half-open connections and a HELLO flood, a session attaches within 1 s and the listening context's fs, spawn and children work", async () => {
  await using fixture = routerWithLogs();
  const { router, logs } = fixture;
  const a = await router.local({ name: "a" });
  const pid = (await a.call(() => process.pid)) as number;
  execFileSync("prlimit", [`--pid=${pid}`, "--nofile=256:256"]);
  assert.equal(
    await a.call(
      () =>
        process
          .getBuiltinModule("node:fs")
          .readFileSync("/proc/self/limits", "utf8")
          .match(/Max open files\s+(\d+)/)?.[1],
    ),
    "256",
  );
  const server = generateKeyPair();
  const client: KeyPair = generateKeyPair();
  // A long handshake deadline: the attacker's connections stay pending as long as the listener lets them.
  const port = (await a.call(startListening, {
    host: "127.0.0.1",
    port: 0,
    keyPair: server,
    authorizedKeys: [client.publicKey],
    handshakeTimeout: 60_000,
  })) as number;
  const x = await router.local({ name: "attacker" });
  execFileSync("prlimit", [`--pid=${(await x.call(() => process.pid)) as number}`, "--nofile=8192:8192"]);
  try {
    const wave = (await x.call(attack, port, 2000, 20, 8, client.publicKey)) as { connected: number; closes: number };
    assert.ok(wave.connected >= 1000, `the attacker's connections were made: ${JSON.stringify(wave)}`);
    const times: number[] = [];
    for (let i = 0; i < 3; i++) {
      const t0 = Date.now();
      await using session = await connect({ host: "127.0.0.1", port, keyPair: client, serverKey: server.publicKey, timeout: 5000, log: () => {} });
      times.push(Date.now() - t0);
      assert.equal(await session.context.call(() => "attached"), "attached");
    }
    const during = (await x.call(attackState)) as { welcomes: number; closes: number };
    assert.ok(during.welcomes > 0, `the HELLO flood was answered meanwhile: ${JSON.stringify(during)}`);
    assert.ok(Math.min(...times) < 1000, `a session attached within 1 s (took ${times.join(", ")} ms)`);
    await stillWorks(router, a, scratch);
    // The attacker's connections cost the listener a bounded number of descriptors.
    const fds = (await a.call(() => process.getBuiltinModule("node:fs").readdirSync("/proc/self/fd").length)) as number;
    assert.ok(fds < 150, `the listening context holds ${fds} descriptors`);
    const refusals = logs.lines("a").filter((l) => /listener .*refused/.test(l));
    assert.ok(refusals.length <= 10, `refusals are logged once, then counted: ${refusals.length} lines`);
  } finally {
    await x.call(stopAttack);
    await a.call(stopListening);
  }
  const counted = logs.lines("a").filter((l) => /refused \d+ connections in the last 10 s/.test(l));
  assert.ok(counted.length > 0, "the count of refusals is logged");
});

/** A connection from `localAddress` that says nothing; `closed` is set when the listener closes it. */
async function silent(port: number, localAddress: string): Promise<{ socket: Socket; closed: () => boolean }> {
  const socket = netConnect({ port, host: "127.0.0.1", localAddress });
  let closed = false;
  socket.on("error", () => {});
  socket.once("close", () => {
    closed = true;
  });
  socket.resume();
  await new Promise<void>((resolve) => {
    socket.once("connect", () => resolve());
    socket.once("close", () => resolve());
  });
  return { socket, closed: () => closed };
}

test("connections in their handshake are capped in all and per address; a newcomer from an address holding fewer takes the place of the oldest of the one holding most", async () => {
  await using router = quietRouter();
  const server = generateKeyPair();
  const client = generateKeyPair();
  await using listener = await router.listen({
    host: "127.0.0.1",
    port: 0,
    keyPair: server,
    authorizedKeys: [client.publicKey],
    maxPending: 4,
    maxPendingPerSource: 2,
    handshakeTimeout: 60_000,
  });
  const port = listener.port as number;
  const held: { socket: Socket; closed: () => boolean }[] = [];
  try {
    const settle = () => new Promise((r) => setTimeout(r, 200));
    // 127.0.0.2 may hold two; its third is closed at once.
    held.push(await silent(port, "127.0.0.2"), await silent(port, "127.0.0.2"));
    const third = await silent(port, "127.0.0.2");
    held.push(third);
    await waitFor(third.closed, 5000, "the third from 127.0.0.2 closed");
    await settle();
    assert.deepEqual(
      held.slice(0, 2).map((h) => h.closed()),
      [false, false],
      "the first two stay",
    );
    // 127.0.0.3 takes the last two places; then 127.0.0.4 (holding none) takes the place of the oldest of 127.0.0.2.
    held.push(await silent(port, "127.0.0.3"), await silent(port, "127.0.0.3"));
    await settle();
    assert.ok(!held[3]?.closed() && !held[4]?.closed(), "127.0.0.3's two stay: 4 in all");
    const fourth = await silent(port, "127.0.0.4");
    held.push(fourth);
    await waitFor(() => held[0]?.closed() === true, 5000, "the oldest of 127.0.0.2 dropped");
    assert.equal(fourth.closed(), false, "the newcomer stays");
    // A legitimate client (127.0.0.1, holding none) attaches though every place is taken.
    await using session = await connect({ host: "127.0.0.1", port, keyPair: client, serverKey: server.publicKey, timeout: 5000, log: () => {} });
    assert.equal(await session.context.call(() => 42), 42);
  } finally {
    for (const h of held) h.socket.destroy();
  }
});

test("refused connections are logged once, then counted: one line per reason per 10 s", async () => {
  const logs = captureLogs();
  const server = generateKeyPair();
  const N = 300;
  {
    await using router = new Router({ log: logs.log });
    await using listener = await router.listen({ host: "127.0.0.1", port: 0, keyPair: server, authorizedKeys: [generateKeyPair().publicKey] });
    const port = listener.port as number;
    // Each sends a HELLO of an unauthorized key: refused after reading it. Four at a time (under maxPendingPerSource).
    const hello = new Uint8Array(65).fill(7);
    hello[0] = 1;
    for (let done = 0; done < N; done += 4) {
      await Promise.all(
        Array.from(
          { length: 4 },
          () =>
            new Promise<void>((resolve) => {
              const s = netConnect(port, "127.0.0.1");
              s.on("error", () => {});
              s.once("connect", () => s.write(hello));
              s.resume();
              s.once("close", () => resolve());
            }),
        ),
      );
    }
    const lines = logs.lines().filter((l) => /refused/.test(l));
    assert.ok(lines.length <= 2, `${N} refusals, ${lines.length} lines: ${lines.slice(0, 3).join(" | ")}`);
    assert.match(lines[0] ?? "", /refused a connection: .*client key not authorized/);
  }
  // Closing the listener logs what was counted.
  const counted = logs.lines().filter((l) => /refused \d+ connections in the last 10 s/.test(l));
  assert.equal(counted.length, 1, counted.join(" | "));
  assert.match(counted[0] as string, new RegExp(`refused ${N - 1} connections in the last 10 s: handshake failed: client key not authorized`));
});

/** Send `n` HELLOs carrying `key`, `parallel` at a time (under maxPendingPerSource); each connection closes at the answer or refusal. */
async function hellos(port: number, key: Uint8Array, n: number, parallel: number): Promise<void> {
  let left = n;
  const hello = new Uint8Array(65);
  hello[0] = 1;
  hello.set(key, 33);
  const one = (): Promise<void> =>
    new Promise((resolve) => {
      const s = netConnect(port, "127.0.0.1");
      s.on("error", () => {});
      s.once("connect", () => s.write(hello));
      s.on("data", () => s.destroy());
      s.once("close", () => resolve());
    });
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (left-- > 0) await one();
    }),
  );
}

test("a HELLO costs the listener no key derivation if its key is not authorized, one scalar multiplication if it is (key material derived once per listen)", async () => {
  await using router = quietRouter();
  const a = await router.local({ name: "a", runtime: "node" });
  const server = generateKeyPair();
  const client = generateKeyPair();
  const authorizedKeys = [client.publicKey, ...Array.from({ length: 20 }, () => generateKeyPair().publicKey)];
  const port = (await a.call(startListening, { host: "127.0.0.1", port: 0, keyPair: server, authorizedKeys })) as number;
  try {
    const cost = await a.import<typeof import("./fixtures/nacl-cost.ts")>(new URL("./fixtures/nacl-cost.ts", import.meta.url));
    const cpu = () => a.call(() => process.cpuUsage().user + process.cpuUsage().system) as Promise<number>;
    /** Microseconds of the listener's CPU per HELLO with `key`. */
    const perHello = async (key: Uint8Array, n: number): Promise<number> => {
      await hellos(port, key, 20, 4); // warm up
      const c0 = await cpu();
      await hellos(port, key, n, 4);
      return ((await cpu()) - c0) / n;
    };
    const scalarMult = await cost.keyPairMicros(200);
    const garbage = await perHello(new Uint8Array(32).fill(9), 300);
    const authorized = await perHello(new Uint8Array(Buffer.from(client.publicKey, "base64")), 300);
    const ratios = `a scalar multiplication ${scalarMult.toFixed(0)} us; a HELLO: unauthorized ${garbage.toFixed(0)} us, authorized ${authorized.toFixed(0)} us`;
    // Loose bounds (CPU time of the listening process, not wall time): before, 1.1 and 3.6 scalar multiplications.
    assert.ok(garbage < 0.6 * scalarMult, `an unauthorized HELLO costs less than a scalar multiplication: ${ratios}`);
    assert.ok(authorized < 2.3 * scalarMult, `an authorized HELLO costs about one scalar multiplication: ${ratios}`);
  } finally {
    await a.call(stopListening);
  }
});
