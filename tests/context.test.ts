/**
 * Local contexts end to end: calls, errors, via chains, deaths, output,
 * streaming and shutdown, on Node and Deno children.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { CallError, ChannelError, type ContextInfo, Latch, MitogenError, Receiver, type Router, Select, type Sender } from "../mod.ts";
import { notOnPath } from "../local.ts";
import { deno, runtimeCommand } from "../runtime.ts";
import { alive, checkLeaks, quietRouter, routerWithLogs, RUNTIMES, underDeno, waitFor, whenConnected } from "./helpers.ts";

checkLeaks();

// Stand-ins for ssh and sudo that run the command they were given here (as tests/containers.test.ts's).
const standins = mkdtempSync(join(tmpdir(), "mitogen-names-"));
after(() => rmSync(standins, { recursive: true, force: true }));
const SSH = join(standins, "ssh");
writeFileSync(SSH, '#!/bin/sh\nfor a; do last=$a; done\nexec /bin/sh -c "$last"\n', { mode: 0o755 });
const SUDO = join(standins, "sudo");
writeFileSync(SUDO, '#!/bin/sh\nwhile [ "$1" != -- ]; do shift; done\nshift\nexec "$@"\n', { mode: 0o755 });

/** `router.contexts()` polled until `cond` holds. */
async function contextsWhen(router: Router, cond: (list: ContextInfo[]) => boolean): Promise<ContextInfo[]> {
  for (let i = 0; ; i++) {
    const list = await router.contexts();
    if (cond(list) || i > 100) return list;
    await new Promise((r) => setTimeout(r, 50));
  }
}

for (const runtime of RUNTIMES) {
  describe(`${runtime} child`, () => {
    test("call, callAsync, callNoReply", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "calls" });
      assert.equal(await ctx.call((x: number) => x * 2, 21), 42);
      assert.equal(await ctx.call(async (a: string, b: string) => a + b, "x", "y"), "xy");
      const recv = ctx.callAsync(() => process.pid);
      const pid = (await recv.get()).unpickle();
      assert.equal(typeof pid, "number");
      assert.notEqual(pid, process.pid);
      ctx.callNoReply(() => console.log("no reply wanted"));
      await waitFor(() => logs.lines("calls").includes("no reply wanted"), 5000, "callNoReply output");
      assert.deepEqual(await ctx.call((v: unknown) => v, { a: [1, 2n, new Map([[1, new Set([2])]])] }), { a: [1, 2n, new Map([[1, new Set([2])]])] });
    });

    test("roles and process title in the child", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "roles" });
      const seen = await ctx.call(() => process.title);
      if (runtime === "node") assert.equal(seen, "mitogen:roles");
      else assert.equal(typeof seen, "string");
      const via = await router.local({ runtime, name: "roles2", via: ctx });
      assert.equal(via.contextId, 2);
    });

    test("a remote throw rejects with CallError carrying the remote stack", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "thrower" });
      const err = await ctx
        .call(function deepFail() {
          throw new TypeError("remote boom");
        })
        .catch((e: unknown) => e);
      assert.ok(err instanceof CallError, String(err));
      assert.equal(err.remoteName, "TypeError");
      assert.match(err.message, /TypeError: remote boom/);
      assert.match(err.remoteStack, /deepFail/);
      assert.match(err.remoteStack, /\[master -> thrower\]/);
      // the context survives a failed call
      assert.equal(await ctx.call(() => "still here"), "still here");
    });

    test("via chain of three, both runtimes mixed", async () => {
      await using router = quietRouter();
      const other = runtime === "node" ? "deno" : "node";
      const a = await router.local({ runtime, name: "chain-a" });
      const b = await router.local({ runtime: other, name: "chain-b", via: a });
      const c = await router.local({ runtime, name: "chain-c", via: b });
      assert.equal(await c.call((x: number) => x + 1, 41), 42);
      const pids = await Promise.all([a, b, c].map((ctx) => ctx.call(() => process.pid)));
      assert.equal(new Set(pids).size, 3);
      await b.shutdown({ wait: true });
      await c.disconnected();
      for (const pid of pids.slice(1)) await waitFor(() => !alive(pid), 5000, `pid ${pid} to exit`);
      assert.equal(await a.call(() => "a lives"), "a lives");
    });

    test("SIGKILL of a child mid-call rejects the call at once", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "victim" });
      const pid = (await ctx.call(() => process.pid)) as number;
      const pending = ctx.call(() => new Promise(() => {}));
      const t0 = Date.now();
      process.kill(pid, "SIGKILL");
      await assert.rejects(pending, ChannelError);
      assert.ok(Date.now() - t0 < 2000, "rejected promptly");
      await assert.rejects(
        ctx.call(() => 1),
        ChannelError,
      );
    });

    test("killing the middle of a 3-deep chain rejects calls to the bottom and leaves no process", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "mid-a" });
      const b = await router.local({ runtime, name: "mid-b", via: a });
      const c = await router.local({ runtime, name: "mid-c", via: b });
      const [bPid, cPid] = (await Promise.all([b.call(() => process.pid), c.call(() => process.pid)])) as number[];
      const pending = c.call(() => new Promise(() => {}));
      process.kill(bPid as number, "SIGKILL");
      await assert.rejects(pending, ChannelError);
      await assert.rejects(
        c.call(() => 1),
        ChannelError,
      );
      await waitFor(() => !alive(cPid as number), 5000, "bottom context to exit");
      assert.equal(await a.call(() => "top lives"), "top lives");
    });

    test("user code printing 1 MiB to stdout does not break the stream", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "printer" });
      const total = await ctx.call(() => {
        const line = "x".repeat(1023);
        for (let i = 0; i < 512; i++) console.log(line);
        for (let i = 0; i < 512; i++) process.stdout.write(`${line}\n`);
        console.error("to stderr");
        console.log("y".repeat(200_000));
        return 1024 * 1024;
      });
      assert.equal(total, 1024 * 1024);
      assert.equal(await ctx.call(() => "stream intact"), "stream intact");
      await waitFor(() => logs.lines("printer").filter((l) => l.length === 1023).length === 1024, 5000, "all printed lines");
      // A local node child's stderr is a pipe of its own, read apart from its stdout.
      await waitFor(() => logs.lines("printer").includes("to stderr"), 5000, "the stderr line");
      await waitFor(
        () =>
          logs
            .lines("printer")
            .filter((l) => l.startsWith("y"))
            .join("").length === 200_000,
        5000,
        "the long line",
      );
      assert.ok(
        logs.lines("printer").every((l) => l.length <= 64 * 1024),
        "long lines are cut at 64 KiB",
      );
    });

    test("lines printed to stdout and stderr in turn reach the log whole and in order", async () => {
      // Behind a shell (a Deno parent, ssh) a node child's stdout and stderr are one pipe: writes
      // that queue while it is full must not cut each other's lines.
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "mixed" });
      await ctx.call(() => {
        for (let i = 0; i < 2000; i++) {
          process.stdout.write(`out ${i} ${"o".repeat(700)}\n`);
          process.stderr.write(`err ${i} ${"e".repeat(300)}\n`);
        }
      });
      await waitFor(() => logs.lines("mixed").length >= 4000, 30_000, "4000 lines");
      const lines = logs.lines("mixed");
      assert.deepEqual(
        lines.filter((l) => !/^(out \d+ o{700}|err \d+ e{300})$/.test(l)).map((l) => l.slice(0, 80)),
        [],
        "cut lines",
      );
      for (const kind of ["out", "err"]) {
        const seen = lines.filter((l) => l.startsWith(kind)).map((l) => Number(l.split(" ")[1]));
        assert.deepEqual(
          seen,
          Array.from({ length: 2000 }, (_, i) => i),
          `${kind} lines in order`,
        );
      }
    });

    test("every way user code prints is forwarded, and stdin reads as empty", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "outputs" });
      const stdinBytes = await ctx.call(async () => {
        const enc = new TextEncoder();
        const D = (globalThis as { Deno?: any }).Deno;
        if (D) {
          D.stdout.writeSync(enc.encode("via Deno.stdout.writeSync\n"));
          await D.stdout.write(enc.encode("via Deno.stdout.write\n"));
          const w = D.stdout.writable.getWriter();
          await w.write(enc.encode("via Deno.stdout.writable\n"));
          w.releaseLock();
          console.info("via console.info");
          const got = await D.stdin.read(new Uint8Array(16));
          return got ?? 0;
        }
        const fs = process.getBuiltinModule("node:fs");
        fs.writeSync(1, "via fd 1\n");
        fs.writeSync(2, "via fd 2\n");
        process.getBuiltinModule("node:child_process").execSync("echo via a subprocess", { stdio: "inherit" });
        console.info("via console.info");
        return fs.readFileSync(0).length;
      });
      assert.equal(stdinBytes, 0);
      const expected =
        runtime === "deno"
          ? ["via Deno.stdout.writeSync", "via Deno.stdout.write", "via Deno.stdout.writable", "via console.info"]
          : ["via fd 1", "via fd 2", "via a subprocess", "via console.info"];
      await waitFor(() => expected.every((l) => logs.lines("outputs").includes(l)), 5000, `lines ${expected}`);
      assert.equal(await ctx.call(() => "stream intact"), "stream intact");
    });

    test("an uncaught exception in user code is logged and the child lives on", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "careless" });
      await ctx.call(() => {
        setTimeout(() => {
          throw new Error("thrown from a timer");
        }, 0);
        Promise.reject(new Error("rejected and forgotten"));
      });
      await waitFor(() => logs.records.some((r) => /uncaught exception: Error: thrown from a timer/.test(r.message)), 5000, "uncaught log");
      await waitFor(() => logs.records.some((r) => /unhandled rejection: Error: rejected and forgotten/.test(r.message)), 5000, "rejection log");
      assert.equal(await ctx.call(() => "alive"), "alive");
    });

    test("a Sender streams 10 000 values back in order", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "streamer" });
      await using recv = new Receiver(router);
      const done = ctx.call(
        (s: Sender, n: number) => {
          for (let i = 0; i < n; i++) s.send(i);
          s.close();
          return n;
        },
        recv.toSender(),
        10_000,
      );
      const got: number[] = [];
      for await (const msg of recv) got.push(msg.unpickle() as number);
      assert.equal(await done, 10_000);
      assert.equal(got.length, 10_000);
      assert.ok(
        got.every((v, i) => v === i),
        "in order",
      );
    });

    test("shutdown twice, and during a pending call", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "stopper" });
      const pid = (await ctx.call(() => process.pid)) as number;
      const pending = assert.rejects(
        ctx.call(() => new Promise(() => {})),
        ChannelError,
      );
      await Promise.all([ctx.shutdown({ wait: true }), ctx.shutdown({ wait: true })]);
      await pending;
      await ctx.shutdown({ wait: true });
      await waitFor(() => !alive(pid), 5000, "child exit");
      await assert.rejects(
        ctx.call(() => 1),
        ChannelError,
      );
    });

    test("oversized call and oversized reply reject the caller", async () => {
      await using router = quietRouter({ maxMessageSize: 64 * 1024 });
      const ctx = await router.local({ runtime, name: "sizes" });
      await assert.rejects(
        ctx.call((b: Uint8Array) => b.length, new Uint8Array(100 * 1024)),
        /exceeds maxMessageSize/,
      );
      await assert.rejects(
        ctx.call(() => new Uint8Array(100 * 1024)),
        (err: unknown) => err instanceof CallError && /exceeds maxMessageSize/.test(err.message),
      );
      const recv = new Receiver(router);
      await assert.rejects(
        ctx.call((s: Sender) => s.send(new Uint8Array(100 * 1024)), recv.toSender()),
        (err: unknown) => err instanceof CallError && /exceeds maxMessageSize/.test(err.message),
      );
      recv.close();
      assert.equal(await ctx.call(() => "fine"), "fine");
    });

    test("bad values fail on the sending side, naming the path", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "badvalues" });
      assert.throws(
        () => ctx.callAsync((_a: unknown, _b: unknown) => 0, 1, { opts: { cb: () => 0 } }),
        (err: unknown) => {
          return err instanceof MitogenError && /args\[1\]\.opts\.cb/.test(err.message);
        },
      );
      await assert.rejects(
        ctx.call(() => ({ f: () => 1 })),
        (err: unknown) => err instanceof CallError && /reply\.f/.test(err.message),
      );
    });

    test("log lines carry the context name; env and cwd are applied", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "envy", env: { MITO_X: "42" }, cwd: "/tmp" });
      assert.deepEqual(await ctx.call(() => [process.env.MITO_X, process.cwd()]), ["42", "/tmp"]);
      await ctx.call(() => console.log("hello from envy"));
      await waitFor(() => logs.records.some((r) => r.name === "envy" && r.message === "hello from envy"), 5000, "log line");
    });

    test("default names say what and where, as Mitogen's: local.<pid>, ssh.<host>[:<port>], sudo.<user>; a record's path is the via chain", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const a = await router.local({ runtime });
      const pid = (await a.call(() => process.pid)) as number;
      assert.match(a.name, /^local\.\d+$/);
      // Behind Deno a node child is started through /bin/sh: the pid is the shell's.
      if (!(underDeno && runtime === "node")) assert.equal(a.name, `local.${pid}`);
      const web = await router.ssh({ hostname: "web1", port: 2222, sshPath: SSH, runtime, via: a });
      assert.equal(web.name, "ssh.web1:2222");
      assert.equal((await router.ssh({ hostname: "web2", port: 22, sshPath: SSH, runtime })).name, "ssh.web2");
      const root = await router.sudo({ sudoPath: SUDO, runtime, via: web });
      assert.equal(root.name, "sudo.root");
      assert.equal((await router.sudo({ username: "www", sudoPath: SUDO, runtime })).name, "sudo.www");
      await root.call(() => console.error("from the bottom"));
      await waitFor(() => logs.records.some((r) => r.message === "from the bottom"), 5000, "the record");
      const rec = logs.records.find((r) => r.message === "from the bottom");
      assert.deepEqual(rec?.path, ["master", a.name, "ssh.web1:2222", "sudo.root"]);
    });

    test("contexts() lists what the router reaches: ids, names, methods, parents, runtimes; contextByName finds one", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "list-a" });
      const b = await whenConnected(router.local({ runtime, via: a }));
      const c1 = await whenConnected(router.sudo({ sudoPath: SUDO, runtime, via: a }));
      const c2 = await whenConnected(router.sudo({ sudoPath: SUDO, runtime, via: b }));
      const list = await router.contexts();
      assert.deepEqual(
        list.map(({ runtime: _, ...rest }) => rest),
        [
          { id: a.contextId, name: "list-a", method: "local", parent: 0 },
          { id: b.contextId, name: b.name, method: "local", parent: a.contextId },
          { id: c1.contextId, name: "sudo.root", method: "sudo", parent: a.contextId },
          { id: c2.contextId, name: "sudo.root", method: "sudo", parent: b.contextId },
        ],
      );
      for (const info of list) assert.match(String(info.runtime), new RegExp(`^${runtime} \\d+\\.`));
      assert.equal(await router.contextByName("list-a"), a);
      assert.equal(await router.contextByName(b.name), b);
      await assert.rejects(router.contextByName("sudo.root"), new RegExp(`2 contexts are named sudo\\.root \\(ids ${c1.contextId}, ${c2.contextId}\\)`));
      await assert.rejects(router.contextByName("nowhere"), /no context named nowhere/);
      await c2.shutdown({ wait: true });
      const after = await contextsWhen(router, (l) => l.length === 3);
      assert.deepEqual(
        after.map((c) => c.id),
        [a.contextId, b.contextId, c1.contextId],
      );
      assert.equal(await router.contextByName("sudo.root"), c1);
    });

    test("Select over parallel calls and a latch", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "sel-a" });
      const b = await router.local({ runtime, name: "sel-b", via: a });
      const latch = new Latch<string>();
      await using sel = new Select([a.callAsync(() => 1), b.callAsync(() => 2), latch]);
      latch.put("local");
      const got: unknown[] = [];
      for await (const ev of sel) got.push(ev.source === latch ? ev.data : (ev.data as { unpickle(): unknown }).unpickle());
      assert.deepEqual(got.sort(), [1, 2, "local"].sort());
    });
  });
}

test("a failing connect names the problem and leaves nothing behind", async () => {
  await using router = quietRouter();
  await assert.rejects(router.local({ runtime: "/nonexistent/node" }), /cannot start \/nonexistent\/node|ENOENT/);
  await assert.rejects(router.local({ runtime: "/bin/false" }), /\/bin\/false is not node or deno .*children need node 12 or later, or deno 1\.46 or later/);
});

test("runtime node or deno with none on PATH says so (a Deno master would otherwise run Deno's node shim)", async () => {
  await using router = quietRouter();
  const empty = mkdtempSync(join(tmpdir(), "mitogen-nopath-"));
  try {
    const started = router.local({ runtime: "node", env: { PATH: empty } });
    // A Node master runs its own executable, found without PATH.
    if (underDeno) await assert.rejects(started, new RegExp(`runtime "node": no node on PATH \\(${empty}\\); install Node, or give runtime: "deno"`));
    else assert.equal(await (await started).call(() => typeof require), "function");
    // The other runtime is looked up on PATH, and named where it is missing (not "spawn deno ENOENT").
    const other = underDeno ? "node" : "deno";
    await assert.rejects(
      router.local({ runtime: other, env: { PATH: empty } }),
      new RegExp(
        `^StreamError: local: runtime "${other}": no ${other} on PATH \\(${empty}\\); install ${underDeno ? "Node" : "Deno"}, or give runtime: "${underDeno ? "deno" : "node"}" or the path of a ${other}$`,
      ),
    );
  } finally {
    rmSync(empty, { recursive: true, force: true });
  }
});

test("a program made with deno compile takes deno from PATH for deno children, and says so where there is none", () => {
  // `deno compile` needs its runtime from dl.deno.land, which this machine cannot reach: the decision is tested, not a compiled program.
  const own = underDeno ? "deno" : "node";
  const ownExe = deno ? deno.execPath() : process.execPath;
  assert.deepEqual(runtimeCommand(own, false), { kind: own, exe: ownExe });
  // Compiled, a Deno master's own name means deno on PATH; a Node master's is unchanged.
  assert.deepEqual(runtimeCommand(own, true), { kind: own, exe: underDeno ? "deno" : ownExe });
  assert.match(
    notOnPath("local.1", "deno", "/empty", true).message,
    /^local\.1: runtime "deno": this program was made with deno compile, whose executable runs only itself, and there is no deno on PATH \(\/empty\); install Deno, or give runtime: "node" or the path of a deno$/,
  );
});

test("a child that never becomes ready hits connectTimeout", async () => {
  await using router = quietRouter();
  const dir = mkdtempSync(join(tmpdir(), "mitogen-test-"));
  const sleeper = join(dir, "node-that-sleeps");
  writeFileSync(sleeper, "#!/bin/sh\nexec sleep 30\n", { mode: 0o755 });
  try {
    const t0 = Date.now();
    await assert.rejects(router.local({ runtime: sleeper, connectTimeout: 300 }), /not connected within 300 ms/);
    assert.ok(Date.now() - t0 < 3000);
  } finally {
    rmSync(dir, { recursive: true });
  }
});

test("shutting the router down while a context connects leaves nothing behind", async () => {
  const router = quietRouter();
  const starting = router.local({ name: "late" });
  await router.shutdown();
  await assert.rejects(starting, /shut down/);
  await assert.rejects(router.local(), /shut down/);
});

test("shutdown({ wait: true }) resolves once the processes have exited", async () => {
  await using router = quietRouter();
  const a = await router.local({ name: "exit-a" });
  const b = await router.local({ name: "exit-b", via: a });
  const [aPid, bPid] = (await Promise.all([a.call(() => process.pid), b.call(() => process.pid)])) as number[];
  await b.shutdown({ wait: true });
  assert.equal(alive(bPid as number), false, "b has exited");
  await a.shutdown({ wait: true });
  assert.equal(alive(aPid as number), false, "a has exited");
});
