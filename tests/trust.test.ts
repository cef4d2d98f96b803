/**
 * Every call ends: remote throws of values that cannot be read or sent.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import type { Message } from "../core.ts";
import { type CallContext, CallError, Router, takesRouter } from "../mod.ts";
import { captureLogs, checkLeaks, RUNTIMES } from "./helpers.ts";

checkLeaks();

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("every remote throw ends the call with a CallError, and the child stays usable", async () => {
      const logs = captureLogs();
      await using router = new Router({ log: logs.log, maxMessageSize: 1024 * 1024 });
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
      await using router = new Router({ log: captureLogs().log });
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
