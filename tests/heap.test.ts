/** The heap stays flat over 100 000 calls, in the master and in the child (nothing kept per call). */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import v8 from "node:v8";
import vm from "node:vm";
import { checkLeaks, quietRouter, RUNTIMES } from "./helpers.ts";

checkLeaks();

v8.setFlagsFromString("--expose-gc");
const gc = vm.runInNewContext("gc") as () => void;

/** Heap in use after a full collection, in bytes (run in either context). */
const settledHeap = (): number => {
  const g = process.getBuiltinModule("node:vm").runInNewContext("gc") as () => void;
  g();
  g();
  return process.memoryUsage().heapUsed;
};

const CALLS = 100_000;
const CONCURRENCY = 50;
const MiB = 1024 * 1024;

for (const runtime of RUNTIMES) {
  describe(`${runtime} child`, () => {
    test(`${CALLS} calls leave the heap of both sides where it was`, async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      await ctx.call(() => process.getBuiltinModule("node:v8").setFlagsFromString("--expose-gc"));
      const run = async (n: number) => {
        let next = 0;
        const worker = async () => {
          while (next < n) {
            const i = next++;
            assert.equal(await ctx.call((x: number) => x + 1, i), i + 1);
          }
        };
        await Promise.all(Array.from({ length: CONCURRENCY }, worker));
      };
      await run(10_000); // warm: code compiled, caches and buffers at their working size
      gc();
      gc();
      const master = process.memoryUsage().heapUsed;
      const child = await ctx.call(settledHeap);
      await run(CALLS);
      gc();
      gc();
      const masterGrew = process.memoryUsage().heapUsed - master;
      const childGrew = (await ctx.call(settledHeap)) - child;
      // 2 MiB over 100 000 calls is 20 bytes a call: anything kept per call shows.
      assert.ok(masterGrew < 2 * MiB, `master heap grew by ${(masterGrew / MiB).toFixed(2)} MiB`);
      assert.ok(childGrew < 2 * MiB, `child heap grew by ${(childGrew / MiB).toFixed(2)} MiB`);
    });
  });
}
