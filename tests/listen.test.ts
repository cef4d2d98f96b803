/**
 * Listeners (router.listen) and attached sessions (connect): a unix socket
 * with a key file, and TCP with tweetnacl key pairs; the listener in a Node
 * or Deno child of the tree, the session in this process or another.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
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
  Message,
  Receiver,
  type Router,
  type Sender,
  takesRouter,
} from "../mod.ts";
import { checkLeaks, quietRouter, routerWithLogs, RUNTIMES, underDeno, waitFor, whenConnected } from "./helpers.ts";

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
  const b = await whenConnected(router.local({ name: "b", via: a }));
  const c = await whenConnected(router.local({ name: "c", via: b, runtime: "deno" }));
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
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
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

    test('a session lists what its route admits and looks contexts up by name: the listening context and those below, no session; route "listener": the listening context only', async () => {
      await using router = quietRouter();
      const { a, b, c } = await tree(router, runtime);
      const path = sockPath();
      const narrow = sockPath();
      await a.call(startListening, { path });
      await b.call(startListening, { path: narrow, route: "listener" });
      try {
        await using session = await connect({ path, log: () => {} });
        await using other = await connect({ path, log: () => {} });
        await using below = await connect({ path: narrow, log: () => {} });
        const list = await session.router.contexts();
        assert.deepEqual(
          list.map(({ runtime: _, ...rest }) => rest),
          [
            { id: a.contextId, name: "a", method: null, parent: 0 },
            { id: b.contextId, name: "b", method: "local", parent: a.contextId },
            { id: c.contextId, name: "c", method: "local", parent: b.contextId },
          ],
        );
        assert.match(String(list[0]?.runtime), new RegExp(`^${runtime} \\d`));
        assert.match(String(list[2]?.runtime), /^deno \d/);
        const sc = await session.router.contextByName("c");
        assert.equal(sc.contextId, c.contextId);
        assert.equal(await sc.call(() => typeof (globalThis as { Deno?: unknown }).Deno), "object");
        await assert.rejects(session.router.contextByName(`session.${other.router.myId}`), /no context named/);
        assert.deepEqual(
          (await below.router.contexts()).map((i) => [i.id, i.name]),
          [[b.contextId, "b"]],
        );
        // The master lists the sessions too.
        const all = await router.contexts();
        assert.deepEqual(
          all.filter((i) => i.method === "session").map((i) => [i.id, i.runtime]),
          [session, other, below].map((s) => [s.router.myId, "session"]),
        );
      } finally {
        await a.call(stopListening);
        await b.call(stopListening);
      }
    });

    test('allow: "listener" admits calls into the listening context only', async () => {
      await using router = quietRouter();
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

    test('route: "listener" addresses the listening context only (allow: "listener" its deprecated name); not a sandbox: a takesRouter call there reaches below', async () => {
      await using router = quietRouter();
      const { a, b } = await tree(router, runtime);
      for (const options of [{ route: "listener" }, { allow: "listener" }] as const) {
        const path = sockPath();
        await a.call(startListening, { path, ...options });
        try {
          await using session = await connect({ path, log: () => {} });
          await assert.rejects(
            session.router.contextById(b.contextId).call(() => 1),
            /admits messages to a only/,
            JSON.stringify(options),
          );
          // What the docs say: a call runs as the listening context, which reaches b.
          const viaListener = takesRouter((id: number, call: CallContext) => call.router.contextById(id).call(() => "reached b"));
          assert.equal(await session.context.call(viaListener, b.contextId), "reached b");
        } finally {
          await a.call(stopListening);
        }
      }
      await assert.rejects(
        a.call(startListening, { path: sockPath(), route: "everywhere" as "below" }),
        /route must be "below" or "listener", not "everywhere"/,
      );
      await assert.rejects(a.call(startListening, { path: sockPath(), route: "below", allow: "listener" }), /contradicts route/);
    });

    test("a session cannot reach a session of another listener further down; the refusal comes back at once as a dead reply", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const { a, b } = await tree(router, runtime);
      const pathA = sockPath();
      const pathB = sockPath();
      await a.call(startListening, { path: pathA });
      await b.call(startListening, { path: pathB });
      try {
        await using s1 = await connect({ path: pathA, log: () => {} });
        await using s2 = await connect({ path: pathB, log: () => {} });
        const s2id = s2.router.myId;
        // a learns of s2 by b's ADD_ROUTE, which may arrive after s2 is attached: wait for it.
        const knows = takesRouter((id: number, call: CallContext) => call.router.routeTo(id) !== undefined);
        for (let i = 0; i < 100 && !(await a.call(knows, s2id)); i++) await new Promise((r) => setTimeout(r, 20));
        assert.ok(await a.call(knows, s2id), "a routes to s2");
        // A call and a message to a dynamic handle of s2 (a Receiver's): each refused by a, its dead reply at once.
        const t0 = Date.now();
        await assert.rejects(
          s1.router
            .contextById(s2id)
            .with({ timeout: 4000 })
            .call(() => 1),
          /context \d+ is an attached session: sessions cannot reach each other/,
        );
        await using recv = new Receiver(s2.router);
        const handle = recv.handle;
        assert.ok(handle >= 1000, "a dynamic handle");
        let timer: ReturnType<typeof setTimeout> | undefined;
        const sent = s1.router.contextById(s2id).sendAwait(Message.encoded("from s1", { handle }));
        const late = new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error("no dead reply within 4 s")), 4000);
        });
        try {
          await assert.rejects(Promise.race([sent, late]), /is an attached session/);
        } finally {
          clearTimeout(timer);
        }
        assert.ok(Date.now() - t0 < 4000, "refused at once, not timed out");
        assert.equal(recv.size(), 0, "nothing from s1 reached s2's Receiver");
        // s2 still works, and so do calls from s1 below a that are not to a session
        assert.equal(await s2.context.call(() => "s2 fine"), "s2 fine");
        assert.equal(await s1.router.contextById(b.contextId).call(() => "b fine"), "b fine");
        assert.ok(
          logs.lines("a").some((l) => /is an attached session/.test(l)),
          logs.lines().join("\n"),
        );
      } finally {
        await b.call(stopListening);
        await a.call(stopListening);
      }
    });

    test("a wrong key and no key are refused before anything is routed; a directory others can write is refused", async () => {
      await using router = quietRouter();
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
      await using router = quietRouter();
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
      await using router = quietRouter();
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
  await using router = quietRouter();
  const path = sockPath();
  await using listener = await router.listen({ path });
  await using session = await connect({ path: listener.path as string, log: () => {} });
  assert.equal(await session.context.call(() => process.pid), process.pid);
  assert.equal(listener.sessions, 1);
});

test("a router's shutdown closes its listeners and removes their sockets", async () => {
  const path = sockPath();
  {
    await using router = quietRouter();
    await router.listen({ path });
    assert.ok(existsSync(path));
  }
  assert.ok(!existsSync(path) && !existsSync(`${path}.key`));
});

test("listen() refuses at once, naming the bad value: a malformed authorizedKeys entry, a garbage or mismatched key pair, a handshakeTimeout that is not a positive finite number", async () => {
  await using router = quietRouter();
  const server = generateKeyPair();
  const client = generateKeyPair();
  const tcp = { host: "127.0.0.1", port: 0 };
  const bad: [string, ListenOptions, RegExp][] = [
    ["a malformed entry", { ...tcp, keyPair: server, authorizedKeys: [client.publicKey, "bm90IGEga2V5"] }, /authorizedKeys\[1\].*"bm90IGEga2V5"/],
    ["an entry of 31 bytes", { ...tcp, keyPair: server, authorizedKeys: [Buffer.alloc(31, 1).toString("base64")] }, /authorizedKeys\[0\]/],
    ["a garbage public key", { ...tcp, keyPair: { publicKey: "garbage", secretKey: server.secretKey }, authorizedKeys: [] }, /keyPair\.publicKey/],
    ["a garbage secret key", { ...tcp, keyPair: { publicKey: server.publicKey, secretKey: "x".repeat(44) }, authorizedKeys: [] }, /keyPair\.secretKey/],
    [
      "a mismatched pair",
      { ...tcp, keyPair: { publicKey: client.publicKey, secretKey: server.secretKey }, authorizedKeys: [] },
      /keyPair\.publicKey is not the public key of keyPair\.secretKey/,
    ],
  ];
  for (const t of [Number.NaN, 0, -5, Number.POSITIVE_INFINITY, "5000" as unknown as number]) {
    bad.push([
      `handshakeTimeout ${String(t)}`,
      { path: sockPath(), handshakeTimeout: t },
      new RegExp(`handshakeTimeout must be a positive finite number.*not ${String(t)}$`),
    ]);
    bad.push([`TCP handshakeTimeout ${String(t)}`, { ...tcp, keyPair: server, authorizedKeys: [], handshakeTimeout: t }, /handshakeTimeout must be/]);
  }
  for (const [what, options, message] of bad) {
    await assert.rejects(router.listen(options), (err: Error) => {
      assert.match(err.message, /^listen: /, what);
      assert.match(err.message, message, what);
      assert.ok(!err.message.includes(server.secretKey), `${what}: no secret in the message`);
      return true;
    });
  }
  // a good pair still listens
  await using ok = await router.listen({ ...tcp, keyPair: server, authorizedKeys: [client.publicKey], handshakeTimeout: 1500 });
  assert.ok((ok.port ?? 0) > 0);
});

test("the key file is created O_EXCL|O_NOFOLLOW: a symlink at <path>.key is refused and its target untouched; a stale key file is replaced", async () => {
  await using router = quietRouter();
  const path = sockPath();
  const target = join(scratch, `precious-${n}`);
  writeFileSync(target, "precious\n", { mode: 0o644 });
  symlinkSync(target, `${path}.key`);
  const outcome = await router.listen({ path }).then(
    async (l) => {
      await l.close();
      return "listened";
    },
    (err: Error) => err.message,
  );
  assert.equal(readFileSync(target, "utf8"), "precious\n", "the link's target is not written");
  assert.equal(statSync(target).mode & 0o777, 0o644, "nor chmodded");
  assert.match(outcome, /\.key exists and is not a key file/);
  assert.ok(lstatSync(`${path}.key`).isSymbolicLink(), "the link is left for its owner to see");
  rmSync(`${path}.key`);
  // A key file left by a listener that died is replaced, 0600 and fresh.
  writeFileSync(`${path}.key`, "stale", { mode: 0o644 });
  {
    await using listener = await router.listen({ path });
    assert.equal(statSync(`${path}.key`).mode & 0o777, 0o600);
    assert.notEqual(readFileSync(`${path}.key`, "utf8"), "stale");
    await using session = await connect({ path: listener.path as string, log: () => {} });
    assert.equal(await session.context.call(() => 1), 1);
  }
  rmSync(target);
});

test("the socket directory's parents are checked: a 0700 directory inside a 0777 non-sticky one is refused; inside a sticky one it is not", async () => {
  await using router = quietRouter();
  const open = mkdtempSync(join(scratch, "open-"));
  chmodSync(open, 0o777);
  mkdirSync(join(open, "inner"), { mode: 0o700 });
  await assert.rejects(router.listen({ path: join(open, "inner", "x.sock") }), (err: Error) => {
    assert.match(err.message, /inside .*open-\w+ \(mode 777, owner uid \d+\), which others can change/);
    return true;
  });
  assert.ok(!existsSync(join(open, "inner", "x.sock")) && !existsSync(join(open, "inner", "x.sock.key")), "nothing created");
  const sticky = mkdtempSync(join(scratch, "sticky-"));
  chmodSync(sticky, 0o1777);
  mkdirSync(join(sticky, "inner"), { mode: 0o700 });
  await using listener = await router.listen({ path: join(sticky, "inner", "x.sock") });
  assert.ok(existsSync(listener.path as string));
});
