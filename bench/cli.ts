/**
 * The command line: `mitogen run` of `true` on 20 local targets, against 20
 * spawns of the runtime, 10 at a time.
 *
 * @module
 */
import { fileURLToPath } from "node:url";
import { bounded, pool, timeMs } from "./lib.ts";
import { bareEval, denoExe, failed, kind, type Measure, P, ratioRow, rounds, rt } from "./harness.ts";
import { commandToExit, spawnToExit } from "./raw.ts";

const CLI_NAME = "mitogen run, 20 local";
const CLI_TARGETS = 20;
const CLI_FORKS = 10;

async function benchCli(): Promise<void> {
  try {
    const dist = fileURLToPath(new URL("../dist/mitogen.mjs", import.meta.url));
    const targets = Array.from({ length: CLI_TARGETS }, () => "local").join(",");
    const runtimeFlag = kind === "deno" ? ["--runtime", denoExe] : ["--runtime", "node"];
    const r = await bounded(240_000, async () => {
      const mito = () =>
        timeMs(() => commandToExit([process.execPath, dist, "run", targets, "--forks", String(CLI_FORKS), "--json", ...runtimeFlag, "--", "true"], 60_000));
      const raw = () => timeMs(() => pool(CLI_TARGETS, CLI_FORKS, performance.now() + 60_000, () => spawnToExit(rt)));
      await mito();
      await raw();
      return rounds(P.fleetRounds, 60_000 * P.budget, mito, raw);
    });
    ratioRow(CLI_NAME, r, 0, " ms", 1.3, "<= 1.3x");
  } catch (err) {
    failed(CLI_NAME, err);
  }
}

/** `mitogen run` on 20 local targets, to its exit. */
export const cli: Measure = {
  key: "cli",
  run: benchCli,
  reference: () => [
    `${CLI_TARGETS} x \`${bareEval}\` spawn-to-exit, ${CLI_FORKS} at a time; mitogen: \`mitogen run <${CLI_TARGETS} x local> --forks ${CLI_FORKS} --json -- true\` to its exit (the command's own start included)`,
  ],
};
