/**
 * Starting children: one bootstrap and first call on this run's runtime,
 * then on every runtime of the matrix, and a fleet of short-lived children.
 *
 * @module
 */
import { matrix } from "../lab/matrix.ts";
import { bounded, pool, timeMs } from "./lib.ts";
import {
  bareEval,
  bootOnce,
  detail,
  failed,
  type Measure,
  newRouter,
  P,
  pairText,
  pidOf,
  quick,
  ratioRow,
  rounds,
  row,
  rt,
  runtime,
  waitGone,
} from "./harness.ts";
import { type Runtime, spawnToExit } from "./raw.ts";

// ---------------------------------------------------------------------------
// bootstrap + first call, against a spawn of the runtime evaluating nothing

/** An environment variable that Node acts on at every start (see benchBoot). */
const CA_CERTS = "NODE_EXTRA_CA_CERTS";

async function benchBoot(): Promise<void> {
  const name = "bootstrap + first call";
  try {
    const r = await bounded(90_000, async (scope) => {
      const boot = () => bootOnce(scope);
      const avg = async (fn: () => Promise<void>) => {
        let total = 0;
        for (let i = 0; i < P.bootPer; i++) total += await timeMs(fn);
        return total / P.bootPer;
      };
      await avg(boot);
      await avg(() => spawnToExit(rt));
      const main = await rounds(
        P.rounds,
        20_000 * P.budget,
        () => avg(boot),
        () => avg(() => spawnToExit(rt)),
      );
      // Node reads the file that NODE_EXTRA_CA_CERTS names at every start (30 to 80 ms here, by version), which
      // both sides pay: without it the ratio is what a machine without the variable sees.
      const certs = process.env[CA_CERTS];
      if (certs === undefined) return { main, clean: null };
      delete process.env[CA_CERTS];
      try {
        const clean = await rounds(
          P.rounds,
          20_000 * P.budget,
          () => avg(boot),
          () => avg(() => spawnToExit(rt, 20_000, [CA_CERTS])),
        );
        return { main, clean };
      } finally {
        process.env[CA_CERTS] = certs;
      }
    });
    ratioRow(name, r.main, 1, " ms", 1.1, "<= 1.1x");
    if (r.clean) detail(`${CA_CERTS} is set here; without it on both sides: ${pairText(r.clean, 1, " ms")}`);
  } catch (err) {
    failed(name, err);
  }
}

/** A new Router, local(), one call, shutdown, to the child's exit. */
export const boot: Measure = {
  key: "boot",
  run: benchBoot,
  reference: () => [`spawn of \`${bareEval}\` to its exit (mitogen: new Router, local(), one call, shutdown, child exited)`],
};

// ---------------------------------------------------------------------------
// a fleet of 100 short-lived contexts

const FLEET = 100;
const FLEET_CONCURRENCY = 8;

async function benchFleet(): Promise<void> {
  const name = `${FLEET} starts, ${FLEET_CONCURRENCY} at a time`;
  try {
    const r = await bounded(200_000, async (scope) => {
      const router = scope.add(newRouter());
      const deadline = () => performance.now() + 60_000;
      const mito = async (count: number) =>
        (await timeMs(() =>
          pool(count, FLEET_CONCURRENCY, deadline(), async (i) => {
            const ctx = await router.local({ runtime, name: `fleet.${i}`, connectTimeout: 30_000 });
            const pid = await ctx.call(pidOf);
            await ctx.shutdown({ wait: true });
            await waitGone(pid);
          }),
        )) / 1000;
      const raw = async (count: number) => (await timeMs(() => pool(count, FLEET_CONCURRENCY, deadline(), () => spawnToExit(rt)))) / 1000;
      await mito(FLEET_CONCURRENCY);
      await raw(FLEET_CONCURRENCY);
      return rounds(
        P.fleetRounds,
        40_000 * P.budget,
        () => mito(FLEET),
        () => raw(FLEET),
      );
    });
    ratioRow(name, r, 2, " s", 1.1, "<= 1.1x");
  } catch (err) {
    failed(name, err);
  }
}

/** A hundred children started, called once and shut down, 8 at a time. */
export const fleet: Measure = {
  key: "fleet",
  run: benchFleet,
  reference: () => [`${FLEET} x \`${bareEval}\` spawn-to-exit; mitogen: local() + one call + shutdown + child exited, each`],
};

// ---------------------------------------------------------------------------
// bootstrap + first call on every runtime of the matrix

async function benchMatrix(): Promise<void> {
  for (const m of matrix()) {
    const name = `boot + call, ${m.runtime ?? m.name}`;
    if (!m.runtime) {
      row(name, "not installed", "", "", "<= 1.3x", "SKIP");
      continue;
    }
    try {
      const own: Runtime = { kind: m.kind, exe: m.exe };
      const per = quick ? 1 : 2;
      const avg = async (fn: () => Promise<void>) => {
        let total = 0;
        for (let i = 0; i < per; i++) total += await timeMs(fn);
        return total / per;
      };
      const r = await bounded(60_000, async (scope) => {
        const boot = () => bootOnce(scope, m.exe);
        await avg(boot);
        await avg(() => spawnToExit(own));
        return rounds(
          quick ? 3 : 5,
          8_000 * P.budget,
          () => avg(boot),
          () => avg(() => spawnToExit(own)),
        );
      });
      ratioRow(name, r, 1, " ms", 1.3, "<= 1.3x");
    } catch (err) {
      failed(name, err);
    }
  }
}

/** As {@link boot}, on every runtime of the matrix that is installed. */
export const runtimes: Measure = {
  key: "runtimes",
  run: benchMatrix,
  reference: () => ["spawn to exit of the same binary evaluating nothing, per runtime (mitogen: as boot, on that runtime)"],
};
