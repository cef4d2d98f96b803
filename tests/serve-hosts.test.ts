/**
 * `mitogen serve` against the netns hosts of lab/hosts.ts: a second command on the same targets
 * (ssh, --via, --sudo with a password) opens no new ssh connection, and every record is what the
 * command prints without the server.
 */
import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { DIST, NODE } from "./command-runner.ts";
import { alive, checkLeaks, waitFor, records } from "./helpers.ts";
import { type TestHosts, useTestHosts } from "../lab/hosts.ts";

checkLeaks();

let hosts: TestHosts;
let scratch = "";
const { skip } = useTestHosts((ready) => {
  hosts = ready;
  scratch = mkdtempSync(join(tmpdir(), "mitogen-serve-hosts-"));
  writeFileSync(join(scratch, "good"), `${hosts.password}\n`, { mode: 0o600 });
});
after(() => {
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

function mitogen(xdg: string, args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(NODE, [DIST, ...args], { timeout: 120_000, env: { ...process.env, NO_COLOR: "1", XDG_RUNTIME_DIR: xdg, ...env } }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? 1) : 0;
      resolve({ code: typeof code === "number" ? code : 1, stdout, stderr });
    });
  });
}

/** The ssh clients `pid` started (its children running ssh). */
function sshChildren(pid: number): number[] {
  const out: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "latin1");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      const cmd = readFileSync(`/proc/${entry}/cmdline`, "latin1").split("\0")[0] ?? "";
      if (ppid === pid && /(^|\/)ssh$/.test(cmd) && !/\) Z /.test(stat)) out.push(Number(entry));
    } catch {
      // gone
    }
  }
  return out.sort();
}

test("serve over ssh: a second command on bastion, inner --via bastion and --sudo opens no ssh connection; the records are those without it", {
  skip,
}, async () => {
  const xdg = mkdtempSync(join(scratch, "xdg-"));
  const started = await mitogen(xdg, ["serve", "--idle", "5m"]);
  assert.equal(started.code, 0, started.stderr);
  const status = await mitogen(xdg, ["serve", "--status", "--json"]);
  const server = (JSON.parse(status.stdout) as { pid: number }).pid;
  try {
    const cfg = ["-F", hosts.sshConfigFile];
    const commands = [
      ["run", "bastion", ...cfg, "--json", "--", "id -un; hostname; echo err >&2; exit 4"],
      ["run", hosts.inner.address, "--via", "bastion", ...cfg, "--json", "--", "id -un; hostname"],
      ["run", "bastion", ...cfg, "--sudo", "--password-file", join(scratch, "good"), "--json", "--", "id -u"],
      ["eval", `bastion,${hosts.inner.address}`, ...cfg, "--json", "1 + 1"], // inner is not reachable from here: a failed start, its record too
      ["eval", hosts.inner.address, "--via", "bastion", ...cfg, "--json", "(console.log('said'), 1 + 1)"],
    ];
    const first: { code: number; stdout: string }[] = [];
    for (const args of commands) first.push(await mitogen(xdg, args));
    const ssh = sshChildren(server);
    // One to bastion (for bastion, and as the hop to inner), one to bastion with the password (--password-file: another spec).
    assert.equal(ssh.length, 2, "the first commands connected once per spec");
    for (const [i, args] of commands.entries()) {
      const again = await mitogen(xdg, args);
      const own = await mitogen(xdg, [args[0] as string, "--no-serve", ...args.slice(1)]);
      assert.deepEqual([again.code, records(again.stdout)], [own.code, records(own.stdout)], args.join(" "));
      assert.deepEqual([first[i]?.code, records(first[i]?.stdout ?? "")], [own.code, records(own.stdout)], args.join(" "));
    }
    assert.deepEqual(sshChildren(server), ssh, "the second commands opened no ssh connection");
    const stopped = await mitogen(xdg, ["serve", "--stop"]);
    assert.equal(stopped.code, 0, stopped.stderr);
    await waitFor(() => !alive(server) && ssh.every((p) => !alive(p)), 15_000, "the server and its ssh clients to end");
  } finally {
    await mitogen(xdg, ["serve", "--stop"]);
    await waitFor(() => !alive(server), 15_000, "the server to end");
  }
});

test("serve over ssh: what a call and an eval printed is in their records, however long after the reply the context's stderr comes", {
  skip,
}, async () => {
  const xdg = mkdtempSync(join(scratch, "xdg-"));
  const bin = mkdtempSync(join(scratch, "bin-"));
  const ssh = execFileSync("sh", ["-c", "command -v ssh"], { encoding: "utf8" }).trim();
  // ssh with its stderr, where the far side's output comes, held back 0.3 s a line: it comes well after the replies. (Not
  // for --no-serve: there ssh exits, and its pipes are read until 200 ms pass with nothing on them; see launch.ts.)
  writeFileSync(
    join(bin, "ssh"),
    `#!/bin/bash\nexec 3>&2\nexec ${ssh} "$@" 2> >(exec 1>&3 3>&-; while IFS= read -r l || [ -n "$l" ]; do sleep 0.3; printf '%s\\n' "$l"; done) 3>&-\n`,
    { mode: 0o755 },
  );
  writeFileSync(join(scratch, "says.mjs"), `export function hello(n) { console.log("hello", n); process.stderr.write("no newline"); return n + 1; }\n`);
  const env = { PATH: `${bin}:${process.env.PATH}` };
  const started = await mitogen(xdg, ["serve", "--idle", "5m"], env);
  assert.equal(started.code, 0, started.stderr);
  const status = await mitogen(xdg, ["serve", "--status", "--json"]);
  const server = (JSON.parse(status.stdout) as { pid: number }).pid;
  try {
    const cfg = ["-F", hosts.sshConfigFile];
    const commands: [string[], Record<string, unknown>][] = [
      [["eval", "bastion", ...cfg, "--json", "(console.log('said'), console.error('twice'), 1 + 1)"], { result: 2, output: "said\ntwice\n" }],
      [["call", "bastion", ...cfg, "--json", `${join(scratch, "says.mjs")}#hello`, "[41]"], { result: 42, output: "hello 41\nno newline\n" }],
    ];
    for (const [args, want] of commands) {
      for (let round = 0; round < 2; round++) {
        const got = await mitogen(xdg, args, env);
        assert.deepEqual(
          [got.code, records(got.stdout)],
          [0, [{ host: "bastion", ok: true, ...want }]],
          `${args.join(" ")} (${round ? "a context the server had" : "started by the server"})`,
        );
      }
    }
  } finally {
    await mitogen(xdg, ["serve", "--stop"]);
    await waitFor(() => !alive(server), 15_000, "the server to end");
  }
});
