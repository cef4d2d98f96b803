/**
 * Deaths, on Node and Deno children: connectTimeout and stop against wrapper
 * scripts that do not exec, the watchdog that ends a child whose parent died
 * while user code blocks its event loop, and what pending calls, later calls
 * and `disconnected()` say about a context that is gone.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, mkdtempSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { runtimeCommand } from "../runtime.ts";
import { type CallContext, ChannelError, type Context, type Sender, takesRouter } from "../mod.ts";
import {
  alive,
  checkLeaks,
  failedViaStart,
  leakedProcesses,
  linkFrames,
  quietRouter,
  routerWithLogs,
  RUNTIMES,
  underDeno,
  waitFor,
  whenConnected,
} from "./helpers.ts";

checkLeaks();

let dir = "";
before(() => {
  dir = mkdtempSync(join(tmpdir(), "mitogen-deaths-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

/** A `#!/bin/sh` wrapper named after `runtime` (so a Deno one is taken for Deno); `$RT` in `body` is the runtime's executable. */
function wrapper(runtime: "node" | "deno", name: string, body: string): string {
  const path = join(dir, `${runtime}-${name}`);
  writeFileSync(path, `#!/bin/sh\n${body.replaceAll("$RT", runtimeCommand(runtime).exe)}\n`, { mode: 0o755 });
  return path;
}

/** `call` rejects with a ChannelError saying exactly `text`. */
async function failsWith(call: Promise<unknown>, text: string): Promise<void> {
  const err = await call.then(
    () => null,
    (e: unknown) => e,
  );
  assert.ok(err instanceof ChannelError, `expected ChannelError, got ${err}`);
  assert.equal(err.message, text);
}

/** util-linux's setpriv can set a parent-death signal here: local node children run under it. */
const SETPRIV = process.platform === "linux" && spawnSync("setpriv", ["--pdeathsig", "KILL", "true"]).status === 0;
/** Root, with setpriv and setcap: a child can be made to run as nobody, and a node copy to carry a file capability. */
const CAN_CHANGE_USER = SETPRIV && process.getuid?.() === 0 && spawnSync("setcap", ["-v", "cap_net_bind_service+ep", "/dev/null"]).error === undefined;

const pidOf = (ctx: Context) => ctx.call(() => process.pid) as Promise<number>;
const forever = () => new Promise(() => {});

test("connectTimeout bounds a runtime's --version probe too, and the probe's whole process group is killed", async () => {
  await using router = quietRouter();
  // Named neither node nor deno, so it is asked --version first; it answers late, after a child of its own.
  const slow = join(dir, "slow-runtime");
  writeFileSync(slow, "#!/bin/sh\nsleep 30\necho v20.0.0\n", { mode: 0o755 });
  const t0 = Date.now();
  await assert.rejects(router.local({ runtime: slow, connectTimeout: 1000 }), {
    name: "TimeoutError",
    message: `local: not connected within 1000 ms (${slow} --version did not answer)`,
  });
  assert.ok(Date.now() - t0 < 4000, `rejected after ${Date.now() - t0} ms`);
  // Killed before the rejection; the kernel may take a moment to finish them on a busy machine.
  await waitFor(() => leakedProcesses().length === 0, 2000, "the probe and its sleep to be gone");
});

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("connectTimeout bounds a start through a wrapper that does not exec, and kills what the wrapper started", async () => {
      await using router = quietRouter();
      // The runtime the wrapper starts holds the pipes and never connects.
      const w = wrapper(runtime, "never", runtime === "node" ? `$RT -e 'setTimeout(() => {}, 30000)'` : `$RT eval 'setTimeout(() => {}, 30000)'`);
      const t0 = Date.now();
      await assert.rejects(router.local({ runtime: w, connectTimeout: 1000 }), /not connected within 1000 ms/);
      assert.ok(Date.now() - t0 < 5000, `rejected after ${Date.now() - t0} ms`);
      assert.deepEqual(leakedProcesses(), [], "the wrapper and its runtime are gone");
    });

    test("stopping a context started through a wrapper that does not exec ends the wrapper's other processes", async () => {
      await using router = quietRouter();
      const w = wrapper(runtime, "background", `sleep 60 &\n$RT "$@"`);
      const ctx = await router.local({ runtime: w, name: "wrapped" });
      assert.equal(await ctx.call(() => 1 + 1), 2);
      await ctx.shutdown({ wait: true });
      assert.equal(await ctx.disconnected(), "context wrapped was shut down");
      await waitFor(() => leakedProcesses().length === 0, 3000, "the wrapper's sleep to end");
    });

    // Directly below a local parent the kernel ends the child (setpriv --pdeathsig, Deno's prctl); behind a
    // wrapper that does not exec, a worker thread watches the parent process and the parent context's pid.
    for (const wrapped of [false, true]) {
      const watchdog = wrapped || !(runtime === "deno" || SETPRIV) ? "worker" : "kernel";
      test(`a child whose parent is killed while user code blocks its event loop is gone within a second, and so is the tree below it (${watchdog}${wrapped ? ", behind a wrapper that does not exec" : ""})`, async () => {
        await using fixture = routerWithLogs({ debug: true });
        const { router, logs } = fixture;
        const a = await router.local({ runtime, name: "parent" });
        const b = await router.local({ runtime: wrapped ? wrapper(runtime, "fork", `$RT "$@"`) : runtime, name: "busy", via: a });
        const c = await router.local({ runtime, name: "below", via: b });
        const [aPid, bPid, cPid] = await Promise.all([pidOf(a), pidOf(b), pidOf(c)]);
        assert.deepEqual(
          logs.lines("busy").filter((l) => l.startsWith("watchdog:")),
          [`watchdog: ${watchdog}`],
        );
        if (runtime === "node") assert.equal(await b.call(() => process.env.MITOGEN_PDEATHSIG ?? "unset"), "unset", "user code does not see it");
        b.callNoReply(() => {
          console.error("looping");
          const end = Date.now() + 30_000;
          while (Date.now() < end);
        });
        // Printed from inside the call, just before the loop: once it is here, b is blocked.
        await waitFor(() => logs.lines("busy").includes("looping"), 10_000, "the loop to start");
        process.kill(aPid, "SIGKILL");
        // Without a watchdog b would run for 30 s; c goes when b does.
        await waitFor(() => !alive(bPid) && !alive(cPid), 5000, "the busy child and its child to be gone");
      });
    }

    // The kernel's signal is cleared by a change of user after setpriv, and by an exec with AT_SECURE (file
    // capabilities, setuid): the child sees either and starts the worker instead.
    test("a node child whose user changed after setpriv, or that runs with file capabilities, is watched by the worker", {
      skip: runtime !== "node" ? "node children only" : CAN_CHANGE_USER ? false : "needs root, setpriv and setcap",
    }, async () => {
      await using fixture = routerWithLogs({ debug: true });
      const { router, logs } = fixture;
      // The binary itself: under Deno "node" is a name on PATH.
      const node = realpathSync(
        spawnSync("sh", ["-c", `command -v ${runtimeCommand("node").exe}`])
          .stdout.toString()
          .trim(),
      );
      const shared = mkdtempSync(join(tmpdir(), "mitogen-deaths-caps-"));
      try {
        chmodSync(shared, 0o755);
        const capped = join(shared, "node-capped");
        copyFileSync(node, capped);
        assert.equal(spawnSync("setcap", ["cap_net_bind_service+ep", capped]).status, 0);
        const asNobody = wrapper("node", "as-nobody", `exec setpriv --reuid=nobody --regid=nogroup --clear-groups $RT "$@"`);
        const a = await router.local({ runtime: asNobody, name: "nobody" });
        const b = await router.local({ runtime: capped, name: "capped", via: a });
        for (const ctx of [a, b]) {
          assert.notEqual(await ctx.call(() => process.geteuid?.()), 0, `${ctx.name} runs as nobody`);
          assert.deepEqual(
            logs.lines(ctx.name).filter((l) => l.startsWith("watchdog:")),
            ["watchdog: worker"],
            ctx.name,
          );
        }
      } finally {
        rmSync(shared, { recursive: true, force: true });
      }
    });

    test("killing the middle of a chain ends the context below it and says who died", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "top" });
      const b = await router.local({ runtime, name: "middle", via: a });
      const c = await router.local({ runtime, name: "bottom", via: b });
      const [bPid, cPid] = await Promise.all([pidOf(b), pidOf(c)]);
      const pending = c.call(forever);
      process.kill(bPid, "SIGKILL");
      await failsWith(pending, "context middle was killed by SIGKILL");
      assert.equal(await c.disconnected(), "context middle was killed by SIGKILL");
      await waitFor(() => !alive(cPid), 2000, "the bottom context to be gone");
      assert.equal(await a.call(() => "top lives"), "top lives");
    });

    test("a context that exits says so with its exit code, directly and through a via hop", async () => {
      await using router = quietRouter();
      const hop = await router.local({ runtime, name: "hop" });
      for (const [name, via] of [
        ["three", undefined],
        ["three-via", hop],
      ] as const) {
        const ctx = await router.local({ runtime, name, ...(via ? { via } : {}) });
        const pending = ctx.call(forever);
        ctx.callNoReply(() => process.exit(3));
        await failsWith(pending, `context ${name} exited with code 3`);
        assert.equal(await ctx.disconnected(), `context ${name} exited with code 3`);
        await failsWith(
          ctx.call(() => 1),
          `context ${name} exited with code 3`,
        );
      }
    });

    test("a context killed by a signal says which, directly and through a via hop", async () => {
      await using router = quietRouter();
      const hop = await router.local({ runtime, name: "hop" });
      for (const [name, via] of [
        ["killed", undefined],
        ["killed-via", hop],
      ] as const) {
        const ctx = await router.local({ runtime, name, ...(via ? { via } : {}) });
        const pending = ctx.call(forever);
        process.kill(await pidOf(ctx), "SIGKILL");
        await failsWith(pending, `context ${name} was killed by SIGKILL`);
        assert.equal(await ctx.disconnected(), `context ${name} was killed by SIGKILL`);
      }
    });

    test("a via start returns once its request is sent, with no round trip first; a failed one rejects the calls sent meanwhile with its error", async () => {
      await using router = quietRouter();
      const hop = await router.local({ runtime, name: "starter" });
      const frames = linkFrames(router, hop);
      const kid = await router.local({ runtime, name: "kid", via: hop });
      assert.equal(await kid.call(() => 7), 7);
      assert.deepEqual(frames.down, ["LOAD_MODULE", "CALL_FUNCTION", "CALL_FUNCTION"], "the id and modules, the start, the call");
      assert.deepEqual(
        frames.up.filter((h) => h === "ALLOCATE_ID" || h === "GET_MODULE"),
        [],
        "nothing asked of the master",
      );
      await kid.connected();
      assert.ok(kid.runtime?.startsWith(runtime), `${kid.runtime}`);
      // A chain started at once: each start waits in the hop above it, and nothing comes up to ask.
      const c1 = await router.local({ runtime, name: "c1", via: hop });
      const c2 = await router.local({ runtime, name: "c2", via: c1 });
      assert.deepEqual(await c2.call(takesRouter(({ router }: CallContext) => router.path)), ["master", "starter", "c1", "c2"]);
      assert.deepEqual(
        frames.up.filter((h) => h === "ALLOCATE_ID" || h === "GET_MODULE"),
        [],
        "nothing asked of the master for the chain",
      );
      const bad = await router.local({ runtime: join(dir, "no-such-runtime"), name: "bad", via: hop });
      const first = await failedViaStart(bad, /cannot start .*no-such-runtime/);
      await failsWith(
        bad.call(() => 1),
        first.message,
      );
      assert.equal(await bad.disconnected(), first.message);
      assert.equal(await hop.call(() => "unharmed"), "unharmed");
    });

    test("a hop killed while it relays a large frame rejects the call at once, and the router stays usable", async () => {
      await using router = quietRouter();
      const hop = await router.local({ runtime, name: "relay" });
      const leaf = await whenConnected(router.local({ runtime, name: "leaf", via: hop }));
      const hopPid = await pidOf(hop);
      // 120 MiB takes the hop a few hundred ms to pass on: it dies with part of the frame through it.
      const big = new Uint8Array(120 * 1024 * 1024);
      const t0 = Date.now();
      const pending = leaf.call((b: Uint8Array) => b.byteLength, big);
      await new Promise((r) => setTimeout(r, 30));
      process.kill(hopPid, "SIGKILL");
      const err = await pending.then(
        (n) => new Error(`the call returned ${n}`),
        (e: unknown) => e,
      );
      assert.ok(err instanceof ChannelError, `expected ChannelError, got ${err}`);
      assert.match(err.message, /relay was killed by SIGKILL/);
      assert.ok(Date.now() - t0 < 10_000, `rejected after ${Date.now() - t0} ms`);
      assert.equal(await leaf.disconnected(), err.message);
      const next = await router.local({ runtime, name: "after" });
      assert.equal(await next.call(() => 1 + 1), 2);
    });

    test("a sender blocked on a sibling's or a cousin's window is released when that context dies (DEL_ROUTE goes down to who talked to it)", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "sender" });
      const deep = await router.local({ runtime, name: "deep-sender", via: a });
      const b = await router.local({ runtime, name: "sibling" });
      const fixtures = await b.import<typeof import("./fixtures/flow.ts")>(new URL("./fixtures/flow.ts", import.meta.url));
      const stream = async (s: Sender) => {
        const block = new Uint8Array(1024 * 1024);
        try {
          for (let i = 0; i < 1000; i++) await s.send(block);
          return "never blocked";
        } catch (err) {
          return `${(err as Error).name}: ${(err as Error).message}`;
        }
      };
      const full = takesRouter((call: CallContext) => call.router.flow.pending.bytes >= call.router.flow.window);
      const pending = [a, deep].map(async (ctx) => ctx.with({ timeout: 20_000 }).call(stream, await fixtures.unreadReceiver()));
      // Both fill the window of an unread Receiver in the sibling, and wait.
      for (const ctx of [a, deep]) {
        for (let i = 0; i < 200 && !(await ctx.call(full)); i++) await new Promise((r) => setTimeout(r, 25));
        assert.equal(await ctx.call(full), true, `${ctx.name} waits on a full window`);
      }
      process.kill(await pidOf(b), "SIGKILL");
      for (const got of await Promise.all(pending)) assert.match(got, /^ChannelError: .*context sibling was killed by SIGKILL$/);
    });

    test("a call to a context that was shut down names it, directly, through a via hop and from a sibling", async () => {
      await using router = quietRouter();
      const hop = await router.local({ runtime, name: "hop" });
      const gone: Context[] = [];
      for (const [name, via] of [
        ["done", undefined],
        ["done-via", hop],
      ] as const) {
        const ctx = await router.local({ runtime, name, ...(via ? { via } : {}) });
        await ctx.shutdown({ wait: true });
        assert.equal(await ctx.disconnected(), `context ${name} was shut down`);
        await failsWith(
          ctx.call(() => 1),
          `context ${name} was shut down`,
        );
        gone.push(ctx);
      }
      // A sibling's call goes up to the master, whose dead message names the context too.
      const seen = await hop.call(async (target: Context) => {
        try {
          await target.call(() => 1);
          return "answered";
        } catch (err) {
          return `${(err as Error).name}: ${(err as Error).message}`;
        }
      }, gone[0] as Context);
      assert.equal(seen, "ChannelError: context done was shut down");
    });

    test("a stream dropped for bad input gives its reason to pending calls, directly and through a via hop", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const hop = await router.local({ runtime, name: "hop" });
      for (const [name, via] of [
        ["garbled", undefined],
        ["garbled-via", hop],
      ] as const) {
        // The child's own end of its stream: fd 1 for deno; for node, fd 3 (a socket both ways) when a
        // node parent starts it, fd 4 behind the shell a deno parent starts it through.
        const denoParent = via ? runtime === "deno" : underDeno;
        const fd = runtime === "node" ? (denoParent ? 4 : 3) : 1;
        const ctx = await router.local({ runtime, name, ...(via ? { via } : {}) });
        const pending = ctx.with({ timeout: 20_000 }).call(forever);
        ctx.callNoReply((n: number) => process.getBuiltinModule("node:fs").writeSync(n, new Uint8Array(28).fill(0xde)), fd);
        const err = await pending.then(
          () => null,
          (e: unknown) => e,
        );
        assert.ok(err instanceof ChannelError, String(err));
        assert.match(err.message, new RegExp(`^context ${name} disconnected: bad frame magic 0xdede`));
        assert.equal(await ctx.disconnected(), err.message);
      }
      assert.ok(logs.records.some((r) => /stream to garbled failed: bad frame magic/.test(r.message)));
    });
  });
}
