/**
 * The demo's remote module: `ctx.import()` bundles this file (and what it
 * imports) on the master and ships it to the contexts that use it.
 */
import { cpus, hostname, platform } from "node:os";
import { type CallContext, log, type Sender, takesRouter } from "mitogen";

/** What a deployment script might ask a host first. */
export function inventory(options: { deep: boolean }): { host: string; platform: string; cpus: number; runtime: string; models?: string[] } {
  const runtime = "Deno" in globalThis ? "deno" : `node ${process.version}`;
  const info = { host: hostname(), platform: platform(), cpus: cpus().length, runtime };
  log.info("inventory taken", { deep: options.deep });
  return options.deep ? { ...info, models: [...new Set(cpus().map((c) => c.model))] } : info;
}

/** Streams the first `n` squares back through `sender`. */
export function squares(sender: Sender, n: number): number {
  for (let i = 1; i <= n; i++) sender.send(i * i);
  sender.close();
  return n;
}

/** Starts a context of its own, below this one, and asks it something. */
export const delegate = takesRouter(async (runtime: string, call: CallContext) => {
  const helper = await call.router.local({ runtime, name: `${call.router.name}.helper` });
  try {
    return await helper.call(() => `helper of ${process.title} says hello`);
  } finally {
    await helper.shutdown({ wait: true });
  }
});
