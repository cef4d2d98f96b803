/**
 * Sizes: the first stage's command line and the child payload, against their
 * limits (not raw references).
 *
 * @module
 */
import { DENO_EVAL, firstStage } from "../firststage.ts";
import { payloads } from "../payload.ts";
import { num } from "./lib.ts";
import { failed, type Measure, row, type Verdict } from "./harness.ts";

async function benchSizes(): Promise<void> {
  try {
    const built = await payloads();
    // What the parent runs: `<node> -e <first stage> <name>`, `<deno> eval --no-config <flags> <first stage> <name>`.
    for (const k of ["node", "deno"] as const) {
      const argv = k === "node" ? [k, "-e", firstStage(k), "local.1"] : [k, ...DENO_EVAL, firstStage(k), "local.1"];
      const chars = argv.join(" ").length;
      row(`first-stage argv (${k})`, `${chars} chars`, "", "", "<= 600 chars", chars <= 600 ? "PASS" : "MISS");
    }
    for (const [which, bytes, raw] of [
      ["", built.core, built.coreRaw],
      [" (node 12)", built.coreLowered, built.coreLoweredRaw],
    ] as const) {
      const kib = bytes.byteLength / 1024;
      const verdict: Verdict = kib > 40 ? "FAIL" : kib <= 24 ? "PASS" : "MISS";
      row(`child payload${which}, compressed`, `${num(kib, 1)} KiB`, `(${num(raw / 1024, 1)} KiB raw)`, "", "<= 24 KiB (max 40)", verdict);
    }
  } catch (err) {
    failed("sizes", err);
  }
}

/** The first stage's argv and the child payload's size. */
export const sizes: Measure = {
  key: "sizes",
  run: benchSizes,
  reference: () => [],
};
