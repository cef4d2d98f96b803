/**
 * fakessh under load: 1000 short commands at once (xargs -P 64) through one
 * `fakessh.run`, each with its own output and exit status, all of which must
 * arrive (the close handshake of PROTOCOL.md's "fakessh's socket"). A file of
 * its own: a thousand stand-ins (a runtime start each) take most of a minute
 * on a small machine, more than the other fakessh tests together.
 */
import assert from "node:assert/strict";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { fakessh } from "../mod.ts";
import { checkLeaks, routerWithLogs } from "./helpers.ts";

checkLeaks();

const scratch = mkdtempSync(join(tmpdir(), "mitogen-fakessh-load-"));
after(() => rmSync(scratch, { recursive: true, force: true }));

/** Run `argv` through fakessh to a fresh local context; its stdout and stderr as text. */
async function runCaptured(argv: string[]) {
  await using fixture = routerWithLogs();
  const { router, logs } = fixture;
  const ctx = await router.local({ name: "dest" });
  const out = join(scratch, "out");
  const fds = [openSync(out, "w"), openSync(`${out}.err`, "w")] as const;
  try {
    const code = await fakessh.run(ctx, router, argv, { stdio: ["ignore", fds[0], fds[1]] });
    return { code, stdout: readFileSync(out, "utf8"), stderr: readFileSync(`${out}.err`, "utf8"), logs };
  } finally {
    closeSync(fds[0]);
    closeSync(fds[1]);
  }
}

test("1000 concurrent short commands through one run: every output line and exit status arrives", async () => {
  // 64 at a time, each shell running 4 in turn. Each line: N, what `ssh h` printed, and its exit status (N % 7, so most are not 0).
  const r = await runCaptured([
    "sh",
    "-c",
    `seq 1 1000 | xargs -P 64 -n 4 sh -c 'for n; do o=$(ssh h "echo out$n; exit \\$(($n % 7))"); echo "$n $o $?"; done' sh`,
  ]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, "");
  const warnings = r.logs.records.filter((x) => x.level === "warn" || x.level === "error").map((x) => x.message);
  assert.deepEqual(warnings, []);
  const got = r.stdout.trim().split("\n").sort();
  const want = Array.from({ length: 1000 }, (_, i) => `${i + 1} out${i + 1} ${(i + 1) % 7}`).sort();
  assert.deepEqual(got, want);
});
