/**
 * bench/profile.ts end to end: a real master and a real child, each leaving a
 * .cpuprofile, and the child's functions named (the readable payload of
 * MITOGEN_READABLE_PAYLOAD=1, which keeps identifiers).
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { runtimeCommand } from "../runtime.ts";
import { checkLeaks } from "./helpers.ts";

checkLeaks();

const run = promisify(execFile);
const root = join(dirname(fileURLToPath(import.meta.url)), "..");

test("bench/profile.ts profiles the master and a child with a readable payload", async () => {
  const out = mkdtempSync(join(tmpdir(), "mitogen-profile-test-"));
  try {
    const node = runtimeCommand("node").exe;
    // Sampled every 10 us, so the functions every call passes through are caught even on a busy machine.
    const { stdout } = await run(node, ["--import", "tsx", "bench/profile.ts", "--calls", "5000", "--top", "40", "--interval", "10", "--out", out], {
      cwd: root,
      timeout: 90_000,
    });
    assert.match(stdout, /^5000 calls: [\d.]+ us per call/m);
    assert.ok(existsSync(join(out, "master.cpuprofile")), "the master's profile is kept");
    // the child's main thread (thread 0; a worker thread of its own may leave another)
    const child = readdirSync(join(out, "child")).filter((f) => /\.0\.\d+\.cpuprofile$/.test(f));
    assert.equal(child.length, 1, "one profile of the child's main thread");
    assert.match(stdout, new RegExp(`^child: .*${child[0]}`, "m"), "the summary is of that profile");
    const profile = JSON.parse(readFileSync(join(out, "child", child[0] as string), "utf8")) as { nodes: { callFrame: { functionName: string } }[] };
    const names = new Set(profile.nodes.map((n) => n.callFrame.functionName));
    // Functions of the core keep their names in the child (minified, they would be one or two letters).
    // Functions on every call's path; still, a short one gets a few samples in thousands (writeHeader 1-6 in
    // 4000), and a loaded CI machine's missed one now and then: three of the four are asked for.
    const onPath = ["route", "unpickle", "writeHeader", "headerAt"];
    const named = onPath.filter((name) => names.has(name));
    assert.ok(named.length >= 3, `the child's profile names three of ${onPath.join(", ")}; it names ${named.join(", ") || "none"}`);
    const childPart = stdout.slice(stdout.indexOf("\nchild:"));
    assert.match(childPart, /^child: .*busy [\d.]+ us per call$/m);
    assert.match(childPart, /\(\(payload\):\d+:\d+\)/, "the summary lists payload functions");
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
