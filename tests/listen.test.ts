/**
 * Listeners (router.listen) and attached sessions (connect): a unix socket
 * with a key file, and TCP with tweetnacl key pairs; the listener in a Node
 * or Deno child of the tree, the session in this process or another.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { connect as netConnect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, describe, test } from "node:test";
import {
  type CallContext,
  ChannelError,
  connect,
  type Context,
  generateKeyPair,
  type ListenOptions,
  Receiver,
  Router,
  type Sender,
  takesRouter,
} from "../mod.ts";
import { captureLogs, checkLeaks, RUNTIMES, underDeno, waitFor } from "./helpers.ts";

checkLeaks();

const scratch = mkdtempSync(join(tmpdir(), "mitogen-listen-test-"));
chmodSync(scratch, 0o700);
after(() => rmSync(scratch, { recursive: true, force: true }));
let n = 0;
const sockPath = () => join(scratch, `l${++n}.sock`);

type Tasks = typeof import("./fixtures/tasks.ts");
const TASKS = new URL("./fixtures/tasks.ts", import.meta.url);

/** Start listening in `ctx` (kept there in a global); returns what the listener reports. */
const startListening = takesRouter(async (options: ListenOptions, call: CallContext) => {
  const l = await call.router.listen(options);
  const g = globalThis as unknown as { listeners?: unknown[] };
  (g.listeners ??= []).push(l);
  return { path: l.path, keyFile: l.keyFile, port: l.port };
});
/** Close every listener of the context it runs in; how many sessions each had. */
const stopListening = async () => {
  const g = globalThis as unknown as { listeners?: { sessions: number; close(): Promise<void> }[] };
  const counts = (g.listeners ?? []).map((l) => l.sessions);
  for (const l of g.listeners ?? []) await l.close();
  g.listeners = [];
  return counts;
};
const sessionsNow = () => ((globalThis as unknown as { listeners?: { sessions: number }[] }).listeners ?? []).map((l) => l.sessions);

/** master -> a (the listener, on `runtime`) -> b -> c. */
async function tree(router: Router, runtime: string): Promise<{ a: Context; b: Context; c: Context }> {
  const a = await router.local({ runtime, name: "a" });
  const b = await router.local({ name: "b", via: a });
  const c = await router.local({ name: "c", via: b, runtime: "deno" });
  return { a, b, c };
}

/** Run the attach fixture as a process of its own (this test's runtime). */
function attachProcess(options: object): { proc: ChildProcess; attached: Promise<number> } {
  const script = fileURLToPath(new URL("./fixtures/attach.ts", import.meta.url));
  const args = underDeno ? ["run", "-A", script, JSON.stringify(options)] : ["--import", "tsx", script, JSON.stringify(options)];
  const proc = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "inherit"] });
  const attached = new Promise<number>((resolve, reject) => {
    let out = "";
    proc.stdout?.on("data", (d: Buffer) => {
      out += d.toString();
      const m = /attached (\d+)/.exec(out);
      if (m) resolve(Number(m[1]));
    });
    proc.once("exit", (code) => reject(new Error(`attach fixture exited with ${code}: ${out}`)));
  });
  return { proc, attached };
}

for (const runtime of RUNTIMES) {
  describe(`listener on ${runtime}`, () => {
    test("unix: attach, call the listener and two levels below, stream, import; policy refuses the rest", async () => {
      const logs = captureLogs();
      await using router = new Router({ log: logs.log });
      const { a, b, c } = await tree(router, runtime);
      const path = sockPath();
      const info = (await a.call(startListening, { path })) as { path: string; keyFile: string };
      assert.equal(statSync(path).mode & 0o777, 0o600, "socket 0600");
      assert.equal(statSync(info.keyFile).mode & 0o777, 0o600, "key file 0600");
      try {
        await using session = await connect({ path, log: () => {} });
        assert.equal(session.context.contextId, a.contextId);
        assert.ok(session.router.myId > c.contextId, "an id from the tree");
        assert.deepEqual(session.router.parentIds, [a.contextId, 0]);
        const nameOf = takesRouter((call: CallContext) => call.router.name);
        assert.equal(await session.context.call(nameOf), "a");
        const sb = session.router.contextById(b.contextId);
        const sc = session.router.contextById(c.contextId);
        assert.equal(await sb.call((x: number) => x + 1, 41), 42);
        assert.equal(await sc.call(() => typeof (globalThis as { Deno?: unknown }).Deno), "object");
        // a Sender from c to a Receiver in the session
        await using recv = new Receiver(session.router);
        const sent = await sc.call(async (s: Sender) => {
          for (let i = 0; i < 50; i++) await s.send(new Uint8Array(64 * 1024).fill(i));
          s.close();
          return 50;
        }, recv.toSender());
        let blocks = 0;
        for await (const msg of recv) assert.equal((msg.unpickle() as Uint8Array)[0], blocks++);
        assert.equal(blocks, sent);
        // a module bundled by the session, fetched by c through b from the listener
        const tasks = await sc.import<Tasks>(TASKS);
        assert.equal(await tasks.add(2, 3), 5);
        assert.equal((await tasks.inventory({ deep: true })).runtime, "deno");
        // above the listener: refused, and logged by the listener
        await assert.rejects(
          session.router.contextById(0).call(() => 1),
          /not below a|refused/,
        );
        await waitFor(() => logs.lines("a").some((l) => /refused .* session/.test(l)), 5000, "the listener's log");
        // a session cannot start contexts itself
        await assert.rejects(session.router.local(), /cannot start contexts/);
        assert.deepEqual(await a.call(sessionsNow), [1]);
      } finally {
        await a.call(stopListening);
      }
      assert.ok(!existsSync(path) && !existsSync(info.keyFile), "socket and key file removed");
      assert.equal(await c.call(() => "tree still works"), "tree still works");
    });

    test('allow: "listener" admits calls into the listening context only', async () => {
      await using router = new Router({ log: captureLogs().log });
      const { a, b } = await tree(router, runtime);
      const path = sockPath();
      await a.call(startListening, { path, allow: "listener" });
      try {
        await using session = await connect({ path, log: () => {} });
        assert.equal(await session.context.call(() => 7), 7);
        await assert.rejects(
          session.router.contextById(b.contextId).call(() => 1),
          /admits messages to a only/,
        );
      } finally {
        await a.call(stopListening);
      }
    });

    test("a wrong key and no key are refused before anything is routed; a directory others can write is refused", async () => {
      const logs = captureLogs();
      await using router = new Router({ log: logs.log });
      const { a } = await tree(router, runtime);
      const path = sockPath();
      await a.call(startListening, { path });
      try {
        await assert.rejects(connect({ path, key: new Uint8Array(32).fill(7), timeout: 3000, log: () => {} }));
        await assert.rejects(connect({ path: `${path}.nokey`, timeout: 3000 }), /cannot read .*\.key/);
        // garbage instead of a handshake
        for (const junk of [Buffer.from("GET / HTTP/1.0\r\n\r\n"), Buffer.alloc(70_000, 0xff)]) {
          const s = netConnect(path);
          s.on("error", () => {});
          s.resume(); // read what comes back, to see the listener hang up
          s.end(junk);
          await new Promise((r) => s.once("close", r));
        }
        assert.deepEqual(await a.call(sessionsNow), [0], "no session was made");
        assert.equal(router.contextById(a.contextId).isDisconnected, false);
      } finally {
        await a.call(stopListening);
      }
      const open = mkdtempSync(join(scratch, "open-"));
      chmodSync(open, 0o777);
      await assert.rejects(a.call(startListening, { path: join(open, "x.sock") }), /only this user can write/);
    });

    test("killing the attached process leaves the tree working; killing the listener ends the session's calls at once", async () => {
      await using router = new Router({ log: captureLogs().log });
      const { a, b } = await tree(router, runtime);
      const path = sockPath();
      await a.call(startListening, { path });
      const other = attachProcess({ path });
      const id = await other.attached;
      assert.ok(id > 0);
      assert.deepEqual(await a.call(sessionsNow), [1]);
      other.proc.kill("SIGKILL");
      await new Promise((r) => other.proc.once("exit", r));
      for (let i = 0; i < 100 && (await a.call(sessionsNow))[0] !== 0; i++) await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(await a.call(sessionsNow), [0]);
      assert.equal(await b.call(() => "fine"), "fine");

      // now this process attaches, waits on a call in b, and the listener dies
      const session = await connect({ path, log: () => {} });
      try {
        const pending = session.router.contextById(b.contextId).call(() => new Promise(() => {}));
        const t0 = Date.now();
        const pid = (await a.call(() => process.pid)) as number;
        process.kill(pid, "SIGKILL");
        await assert.rejects(pending, ChannelError);
        assert.ok(Date.now() - t0 < 5000, "at once");
      } finally {
        await session.close();
      }
    });

    test("TCP: key pairs both ways, sealed frames; an unknown client, a wrong pinned key and a flipped byte are refused", async () => {
      const logs = captureLogs();
      await using router = new Router({ log: logs.log });
      const { a, b } = await tree(router, runtime);
      const server = generateKeyPair();
      const client = generateKeyPair();
      const stranger = generateKeyPair();
      const { port } = (await a.call(startListening, { host: "127.0.0.1", port: 0, keyPair: server, authorizedKeys: [client.publicKey] })) as { port: number };
      assert.ok(port > 0);
      try {
        {
          await using session = await connect({ host: "127.0.0.1", port, keyPair: client, serverKey: server.publicKey, log: () => {} });
          assert.equal(await session.router.contextById(b.contextId).call((s: string) => s.toUpperCase(), "sealed"), "SEALED");
          const big = new Uint8Array(3 * 1024 * 1024).map((_, i) => i & 0xff);
          const back = (await session.context.call((x: Uint8Array) => x, big)) as Uint8Array;
          assert.deepEqual(back.subarray(0, 1000), big.subarray(0, 1000));
          assert.equal(back.byteLength, big.byteLength);
        }
        await assert.rejects(connect({ host: "127.0.0.1", port, keyPair: stranger, serverKey: server.publicKey, timeout: 3000, log: () => {} }));
        await assert.rejects(
          connect({ host: "127.0.0.1", port, keyPair: client, serverKey: stranger.publicKey, timeout: 3000, log: () => {} }),
          /server key|pinned/,
        );
        // a proxy that flips one byte of the client's stream once the session runs
        let flip = false;
        const proxy: Server = createServer((down: Socket) => {
          const up = netConnect(port, "127.0.0.1");
          up.on("error", () => down.destroy());
          down.on("error", () => up.destroy());
          up.pipe(down);
          down.on("data", (d: Buffer) => {
            if (flip && d.length > 10) {
              d[d.length - 3] = (d[d.length - 3] as number) ^ 1;
              flip = false;
            }
            up.write(d);
          });
          down.on("close", () => up.destroy());
          up.on("close", () => down.destroy());
        });
        await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
        try {
          const proxied = (proxy.address() as { port: number }).port;
          const session = await connect({ host: "127.0.0.1", port: proxied, keyPair: client, serverKey: server.publicKey, log: () => {} });
          try {
            assert.equal(await session.context.call(() => 1), 1);
            flip = true;
            await assert.rejects(
              session.context.call((s: string) => s, "x".repeat(100)),
              ChannelError,
            );
          } finally {
            await session.close();
          }
        } finally {
          await new Promise((r) => proxy.close(r));
        }
        for (let i = 0; i < 100 && (await a.call(sessionsNow))[0] !== 0; i++) await new Promise((r) => setTimeout(r, 20));
        assert.deepEqual(await a.call(sessionsNow), [0]);
      } finally {
        await a.call(stopListening);
      }
    });
  });
}

test("the master listens too, and a session's calls reach it", async () => {
  await using router = new Router({ log: captureLogs().log });
  const path = sockPath();
  await using listener = await router.listen({ path });
  await using session = await connect({ path: listener.path as string, log: () => {} });
  assert.equal(await session.context.call(() => process.pid), process.pid);
  assert.equal(listener.sessions, 1);
});

test("a router's shutdown closes its listeners and removes their sockets", async () => {
  const path = sockPath();
  {
    await using router = new Router({ log: captureLogs().log });
    await router.listen({ path });
    assert.ok(existsSync(path));
  }
  assert.ok(!existsSync(path) && !existsSync(`${path}.key`));
});
