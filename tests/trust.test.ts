/**
 * No context answers for another, and every call ends: forged replies and
 * dead messages, squatted ids (ADD_ROUTE), and remote throws of values that
 * cannot be read or sent. Real child contexts forge the frames.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { HANDLE, type Message } from "../frames.ts";
import { type CallContext, CallError, ChannelError, takesRouter } from "../mod.ts";
import { checkLeaks, quietRouter, routerWithLogs, RUNTIMES, waitFor } from "./helpers.ts";

checkLeaks();

type Released = { release?: (v: string) => void };

/** In a child: a call that ends when {@link release} runs there. */
const held = () =>
  new Promise((resolve) => {
    (globalThis as Released).release = resolve;
  });
const release = (value: string) => (globalThis as Released).release?.(value);

/** In a child: send the master a reply (or a dead message) to each of `handles`, but its own call's. */
const forge = takesRouter((handles: number[], dead: boolean, text: string, { router, msg }: CallContext) => {
  const M = msg.constructor as typeof Message;
  let sent = 0;
  for (const h of handles) {
    if (h === msg.replyTo) continue;
    router.route(dead ? M.dead(text, { dst: 0, handle: h }) : M.encoded(text, { dst: 0, handle: h }));
    sent++;
  }
  return sent;
});

/** In a child: announce routes to `ids` (ADD_ROUTE) to context `dst`, as if they were adopted here. */
const claim = takesRouter((ids: number[], dst: number, handle: number, { router, msg }: CallContext) => {
  const M = msg.constructor as typeof Message;
  for (const id of ids) router.route(M.encoded([id, "squatter", router.myId], { dst, handle }));
});

const range = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("a sibling or grandchild cannot answer the master's pending call to another context", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "tr-a" });
      const p = await router.local({ runtime, name: "tr-p" });
      const t = await router.local({ runtime, name: "tr-t", via: p });
      const g = await router.local({ runtime, name: "tr-g", via: p });
      const callA = a.callAsync(held);
      const callT = t.callAsync(held);
      const settled: string[] = [];
      const settle = (who: string) => (m: Message) => {
        settled.push(who);
        return m.unpickle();
      };
      const gotA = callA.get().then(settle("a"));
      const gotT = callT.get().then(settle("t"));
      gotT.catch(() => {});
      const handles = range(1000, 200);
      assert.ok(handles.includes(callA.handle) && handles.includes(callT.handle));
      // g (a grandchild, sibling of t under p) and a (a child, sibling of p) forge both kinds; a skips its own call.
      for (const forger of [g, a]) {
        const targets = handles.filter((h) => forger !== a || h !== callA.handle);
        assert.ok((await forger.call(forge, targets, false, "forged reply")) > 0);
        assert.ok((await forger.call(forge, targets, true, "forged death")) > 0);
      }
      const dropped = (src: number, handle: number, replyTo: number) =>
        logs.records.some(
          (r) =>
            r.contextId === 0 &&
            r.level === "warn" &&
            r.message.includes(`src=${src} `) &&
            r.message.includes(`handle=${handle} replyTo=${replyTo} `) &&
            r.message.includes("reply from unexpected context"),
        );
      for (const [src, handle] of [
        [g.contextId, callA.handle],
        [g.contextId, callT.handle],
        [a.contextId, callT.handle],
      ] as const) {
        assert.ok(dropped(src, handle, 0), `forged reply from ${src} to ${handle} logged`);
        assert.ok(dropped(src, handle, HANDLE.IS_DEAD), `forged dead message from ${src} to ${handle} logged`);
      }
      assert.equal(await a.call(() => "a still answers"), "a still answers");
      assert.deepEqual(settled, [], "no forgery settled a pending call");
      await a.call(release, "real a");
      assert.equal(await gotA, "real a");
      // Control: p is on the route to t. Its reply is refused, but a dead message (a lost route) is not.
      await p.call(forge, [callT.handle], false, "parent's reply");
      assert.deepEqual(settled, ["a"]);
      await p.call(forge, [callT.handle], true, "route lost at the parent");
      await assert.rejects(gotT, (e: unknown) => e instanceof ChannelError && /route lost at the parent/.test(e.message));
      assert.ok(dropped(p.contextId, callT.handle, 0));
    });

    test("ADD_ROUTE for an id not allocated through that link is refused; the real context gets the id", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "sq-a" });
      const b = await router.local({ runtime, name: "sq-b" });
      const g = await router.local({ runtime, name: "sq-g", via: a });
      const next = range(g.contextId + 1, 10);
      // a claims the next ids at the master; g claims them at a.
      await a.call(claim, next, 0, HANDLE.ADD_ROUTE);
      await g.call(claim, next, a.contextId, HANDLE.ADD_ROUTE);
      const refused = (name: string, parent: number) =>
        logs.records.some((r) => r.name === name && r.message.startsWith(`refused ADD_ROUTE for ${next[0]} (parent ${parent})`));
      await waitFor(() => refused("master", a.contextId) && refused("sq-a", g.contextId), 10_000, "both refusals logged");
      const c = await router.local({ runtime, name: "sq-c", via: b });
      assert.ok(next.includes(c.contextId), `c got a claimed id (${c.contextId})`);
      const pids = await Promise.all([a, b, g].map((ctx) => ctx.call(() => process.pid)));
      const [pid, ppid, name] = await c.with({ timeout: 10_000 }).call(takesRouter(({ router }: CallContext) => [process.pid, process.ppid, router.name]));
      assert.equal(ppid, pids[1], "c's parent process is b");
      assert.ok(!pids.includes(pid as number));
      assert.equal(name, "sq-c");
      assert.equal(await g.call(() => "g still answers"), "g still answers");
    });

    test("LOAD_MODULE is taken only from the parent: a sibling's modules and ids are refused", async () => {
      await using fixture = routerWithLogs();
      const { router, logs } = fixture;
      const a = await router.local({ runtime, name: "lm-a" });
      const b = await router.local({ runtime, name: "lm-b" });
      await a.call(
        takesRouter((to: number, { router, msg }: CallContext) => {
          const M = msg.constructor as typeof Message;
          for (const dst of [to, 0]) router.route(M.encoded([to, [["forged@0000000000000000", new Uint8Array(8)]], [4242]], { dst, handle: 107 }));
        }),
        b.contextId,
      );
      const refusedAt = (name: string) => logs.records.some((r) => r.name === name && /refused .*LOAD_MODULE.*policy/.test(r.message));
      await waitFor(() => refusedAt("lm-b") && refusedAt("master"), 10_000, "both refusals logged");
      const kept = await b.call(takesRouter(({ router }: CallContext) => [router.moduleCode.has("forged@0000000000000000"), router.starting(4242)]));
      assert.deepEqual(kept, [false, false]);
      assert.equal(router.starting(4242), false);
    });

    test("every remote throw ends the call with a CallError, and the child stays usable", async () => {
      await using fixture = routerWithLogs({ maxMessageSize: 1024 * 1024 });
      const { router, logs } = fixture;
      const ctx = await router.local({ runtime, name: "odd" });
      const cases: [string, () => unknown, RegExp][] = [
        [
          "an Error with a Symbol name",
          () => {
            const e = new Error("symbolic");
            Object.defineProperty(e, "name", { value: Symbol("odd") });
            throw e;
          },
          /^Symbol\(odd\): symbolic$/,
        ],
        [
          "an Error whose stack getter throws",
          () => {
            const e = new RangeError("no stack");
            Object.defineProperty(e, "stack", {
              get() {
                throw new Error("stack getter");
              },
            });
            throw e;
          },
          /^RangeError: no stack$/,
        ],
        [
          "a revoked Proxy",
          () => {
            const { proxy, revoke } = Proxy.revocable(new Error("revoked"), {});
            revoke();
            throw proxy;
          },
          /^Error: non-Error thrown: \(an unreadable object: TypeError: .*revoked/,
        ],
        [
          "a Proxy whose traps throw",
          () => {
            const trap = () => {
              throw new Error("trap");
            };
            throw new Proxy(new Error("hidden"), { get: trap, has: trap, getPrototypeOf: trap, ownKeys: trap, getOwnPropertyDescriptor: trap });
          },
          /^Error: non-Error thrown: \(an unreadable object: Error: trap\)$/,
        ],
        [
          "a Proxy of an Error whose get trap throws",
          () => {
            throw new Proxy(new Error("hidden"), {
              get() {
                throw new Error("trap");
              },
            });
          },
          /^Error: \(message could not be read\)$/,
        ],
        [
          "an object whose toString throws",
          () => {
            throw {
              toString() {
                throw new Error("no string");
              },
            };
          },
          /^Error: non-Error thrown: \(\[object Object\] that cannot be printed\)$/,
        ],
        [
          "an Error whose cause cannot be encoded",
          () => {
            throw new Error("outer", { cause: { fn: () => 1 } });
          },
          /^Error: outer$/,
        ],
        [
          "an Error whose cause is a Proxy whose traps throw",
          () => {
            const trap = () => {
              throw new Error("trap");
            };
            throw new TypeError("outer", { cause: new Proxy({}, { get: trap, getPrototypeOf: trap, ownKeys: trap }) });
          },
          /^TypeError: outer$/,
        ],
        [
          "an Error whose message is over maxMessageSize",
          () => {
            throw new Error("x".repeat(2 * 1024 * 1024));
          },
          /^Error: x{1000}$/,
        ],
        [
          "a returned Proxy that cannot be encoded",
          () =>
            new Proxy(
              {},
              {
                getPrototypeOf() {
                  throw new Error("proto trap");
                },
              },
            ),
          /proto trap/,
        ],
      ];
      for (const [what, fn, expected] of cases) {
        const err = await ctx
          .with({ timeout: 15_000 })
          .call(fn)
          .catch((e: unknown) => e);
        assert.ok(err instanceof CallError, `${what}: ${String(err)}`);
        assert.match(err.message, expected, what);
        assert.equal(await ctx.call((s: string) => `${s} done`, what), `${what} done`);
      }
      assert.deepEqual(
        logs.records.filter((r) => /unhandled|uncaught/i.test(r.message)).map((r) => r.message),
        [],
      );
    });

    test("a GET_MODULE request that cannot be decoded is answered with a CallError", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "asker" });
      const answer = await ctx.call(
        takesRouter(async ({ router, msg }: CallContext) => {
          const M = msg.constructor as typeof Message;
          const recv = router.contextById(0).sendAsync(new M({ handle: 100 }, [new Uint8Array([0xc1])]));
          try {
            (await recv.get({ timeout: 10_000 })).unpickle();
            return "no error";
          } catch (e) {
            return `${(e as Error).name} ${(e as Error).message}`;
          }
        }),
      );
      assert.match(answer, /^CallError StreamError: cannot decode/);
    });
  });
}
