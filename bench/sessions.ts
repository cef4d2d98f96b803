/**
 * Sessions attached to a listener in a local child: attach + first call
 * against starting a child, and a call over a TCP session against the same
 * call over the child's pipe.
 *
 * @module
 */
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { type CallContext, connect, generateKeyPair, type Router, takesRouter } from "../mod.ts";
import { bounded, perOpMicros, timeMs } from "./lib.ts";
import { failed, kind, log, type Measure, newRouter, P, ratioRow, rounds, runtime, zero } from "./harness.ts";

const ATTACH_NAME = "attach + first call";
const SESSION_RTT_NAME = "call RTT, TCP session";

async function benchSessions(): Promise<void> {
  const dir = mkdtempSync(join(os.tmpdir(), "mitogen-bench-listen-"));
  try {
    const r = await bounded(120_000, async (scope) => {
      const router = scope.add(newRouter());
      const a = await router.local({ runtime, name: "listener" });
      const path = join(dir, "l.sock");
      const server = generateKeyPair();
      const client = generateKeyPair();
      const listen = takesRouter(async (o: { path: string; tcp: Parameters<Router["listen"]>[0] }, call: CallContext) => {
        const g = globalThis as unknown as { kept?: unknown[] };
        const u = await call.router.listen({ path: o.path });
        const t = await call.router.listen(o.tcp);
        (g.kept ??= []).push(u, t);
        return t.port;
      });
      const port = (await a.call(listen, { path, tcp: { host: "127.0.0.1", port: 0, keyPair: server, authorizedKeys: [client.publicKey] } })) as number;
      const attachOnce = () =>
        timeMs(async () => {
          const s = await connect({ path, log });
          await s.context.call(zero);
          await s.close();
        });
      const bootOnce = () =>
        timeMs(async () => {
          const ctx = await router.local({ runtime, name: "fresh" });
          await ctx.call(zero);
          await ctx.shutdown({ wait: true });
        });
      await attachOnce();
      await bootOnce();
      const attach = await rounds(P.rounds, 20_000 * P.budget, attachOnce, bootOnce);
      const session = await connect({ host: "127.0.0.1", port, keyPair: client, serverKey: server.publicKey, log });
      scope.add({ [Symbol.asyncDispose]: () => session.close() });
      const viaSession = () => session.context.call(zero);
      const direct = () => a.call(zero);
      await perOpMicros(viaSession, 3000, 1500);
      await perOpMicros(direct, 3000, 1500);
      const rtt = await rounds(
        P.rounds,
        15_000 * P.budget,
        () => perOpMicros(viaSession, P.rttOps, P.rttMs),
        () => perOpMicros(direct, P.rttOps, P.rttMs),
      );
      return { attach, rtt };
    });
    ratioRow(ATTACH_NAME, r.attach, 1, " ms", 0.2, "<= 0.2x");
    ratioRow(SESSION_RTT_NAME, r.rtt, 1, " us", 1.3, "<= 1.3x");
  } catch (err) {
    failed(`${ATTACH_NAME} / ${SESSION_RTT_NAME}`, err);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Attaching to a listener, and calls over the session. */
export const sessions: Measure = {
  key: "sessions",
  run: benchSessions,
  reference: () => [
    `attach: not raw: router.local() + one call + shutdown({ wait: true }) of a fresh ${kind} child; mitogen: connect() to a unix listener in a ${kind} child of this master + one call to it + close()`,
    "call RTT: not raw: ctx.call(() => 0) from this master to the listening child over its pipe; mitogen: the same call from a session attached over TCP (sealed frames) to that child",
  ],
};
