/** The context service (Mitogen's ContextService): one context per spec, shared by every caller, attached sessions included. */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { type CallContext, connect, type Context, contextService, getContext, takesRouter } from "../mod.ts";
import { checkLeaks, quietRouter, RUNTIMES } from "./helpers.ts";

checkLeaks();

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("two attached sessions get one context per spec: started once, via chains included", async () => {
      await using router = quietRouter();
      const dir = mkdtempSync(join(tmpdir(), "mitogen-ctxsvc-"));
      try {
        await using listener = await router.listen({ path: join(dir, "s.sock") });
        await using one = await connect({ path: listener.path as string, log: () => {} });
        await using two = await connect({ path: listener.path as string, log: () => {} });
        const web = { method: "local", options: { name: "ctxsvc-web", runtime } } as const;
        const inner = { method: "local", options: { name: "ctxsvc-inner", runtime, via: web } } as const;
        // Both at once: the second waits for the start the first began.
        const [a, b] = await Promise.all([getContext(one.context, web), getContext(two.context, web)]);
        const [c, d] = await Promise.all([getContext(one.context, inner), getContext(two.context, inner)]);
        assert.equal(a?.contextId, b?.contextId);
        assert.equal(c?.contextId, d?.contextId);
        // Key order does not matter; the master's own callers share them too.
        const again = await getContext(router.myself(), { method: "local", options: { runtime, name: "ctxsvc-web" } });
        assert.equal(again.contextId, a.contextId);
        const pids = new Set(await Promise.all([a, b, again].map((ctx: Context) => ctx.call(() => process.pid))));
        assert.equal(pids.size, 1, "one process for the three callers");
        assert.equal(await d.call(takesRouter((call: CallContext) => call.router.parentIds[0])), a.contextId, "inner was started via web");
        const started = (await router.contexts()).filter((ctx) => ctx.method === "local");
        assert.deepEqual(started.map((ctx) => ctx.name).sort(), ["ctxsvc-inner", "ctxsvc-web"]);
        // Another spec is another context; a context that went away is started again.
        const other = await getContext(one.context, { method: "local", options: { name: "ctxsvc-other", runtime } });
        assert.notEqual(other.contextId, a.contextId);
        await router.disconnect(router.contextById(other.contextId));
        const restarted = await getContext(two.context, { method: "local", options: { name: "ctxsvc-other", runtime } });
        assert.notEqual(restarted.contextId, other.contextId);
        assert.equal(await restarted.call(() => 6 * 7), 42);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}

test("the context service refuses an unknown method, reports a failed start, and refuses a child (policy parents)", async () => {
  await using router = quietRouter();
  await assert.rejects(router.myself().callService(contextService.name, "get", { method: "telnet" }), /"telnet" is not a connection method/);
  await assert.rejects(getContext(router.myself(), { method: "local", options: { name: "ctxsvc-bad", runtime: "/nonexistent/runtime" } }), /nonexistent/);
  const child = await router.local({ name: "ctxsvc-child" });
  // A child calling its master's context service: refused (policy parents, as Mitogen's).
  await assert.rejects(
    child.call(takesRouter((call: CallContext) => call.router.contextById(0).callService("mitogen.ContextService", "get", { method: "local" }))),
    /refused by policy allowParents/,
  );
});
