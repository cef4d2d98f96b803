/**
 * The `mitogen` command against the netns hosts of tests/hosts.ts: ssh by
 * config name, --via bastion to inner, --sudo with a password file, an
 * unreachable host and a wrong password, each on its own line.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, test } from "node:test";
import { DIST, NODE, mitogen as run } from "./command-runner.ts";
import { checkLeaks } from "./helpers.ts";
import { findProgram, type TestHosts, useTestHosts } from "./hosts.ts";

checkLeaks();

let hosts: TestHosts;
let scratch = "";
const { skip } = useTestHosts((ready) => {
  hosts = ready;
  scratch = mkdtempSync(join(tmpdir(), "mitogen-cli-hosts-"));
  writeFileSync(join(scratch, "good"), `${hosts.password}\n`, { mode: 0o600 });
  writeFileSync(join(scratch, "bad"), "not-the-password\n", { mode: 0o600 });
});
after(() => {
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

const mitogen = (args: string[]) => run(args, { timeout: 120_000 });

const byHost = (stdout: string) =>
  Object.fromEntries(
    stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .map((l) => [l.host, l]),
  );

test("run with --sudo on bastion (by its ssh_config name) next to an unreachable host; inner --via bastion", { skip }, async () => {
  const unreachable = "10.231.250.250"; // in the test range, blackholed: refused at once
  const a = await mitogen([
    "run",
    `bastion,${unreachable}`,
    "-F",
    hosts.sshConfigFile,
    "--sudo",
    "--password-file",
    join(scratch, "good"),
    "--json",
    "--",
    "id -u; whoami >&2",
  ]);
  assert.equal(a.code, 1, "one host failed");
  const got = byHost(a.stdout);
  assert.deepEqual([got.bastion?.ok, got.bastion?.exitCode, got.bastion?.stdout, got.bastion?.stderr], [true, 0, "0\n", "root\n"]);
  assert.equal(got[unreachable]?.ok, false);
  assert.match(String(got[unreachable]?.error), /unreachable|No route|connect|timed out/i);
  const b = await mitogen([
    "run",
    hosts.inner.address,
    "--via",
    "bastion",
    "-F",
    hosts.sshConfigFile,
    "--sudo",
    "--password-file",
    join(scratch, "good"),
    "--json",
    "--",
    "id -u",
  ]);
  assert.equal(b.code, 0, b.stdout + b.stderr);
  assert.equal(byHost(b.stdout)[hosts.inner.address]?.stdout, "0\n");
});

test("--password asks once on the terminal", { skip: skip || (findProgram("script") ? false : "needs script (util-linux)") }, async () => {
  const cmd = `${NODE} ${DIST} run bastion -F ${hosts.sshConfigFile} --sudo --password --json -- id -u`;
  const out = await new Promise<string>((resolve) => {
    const child = execFile("script", ["-qfec", cmd, "/dev/null"], { timeout: 120_000 }, (_err, stdout) => resolve(stdout));
    // the password, typed once the prompt is up
    let typed = false;
    child.stdout?.on("data", (d: Buffer) => {
      if (!typed && d.toString().includes("password:")) {
        typed = true;
        child.stdin?.write(`${hosts.password}\r`);
      }
    });
  });
  assert.ok(!out.includes(hosts.password), "the password is not echoed");
  assert.match(out, /"host":"bastion","ok":true,"exitCode":0,"stdout":"0\\n"/);
});

test("a wrong sudo password is that host's error; call a module on inner through bastion", { skip }, async () => {
  const bad = await mitogen(["run", "bastion", "-F", hosts.sshConfigFile, "--sudo", "--password-file", join(scratch, "bad"), "--json", "--", "true"]);
  assert.equal(bad.code, 1);
  assert.match(String(byHost(bad.stdout).bastion?.error), /incorrect password/);
  const tasks = fileURLToPath(new URL("./fixtures/tasks.ts", import.meta.url));
  const call = await mitogen(["call", hosts.inner.address, "--via", "bastion", "-F", hosts.sshConfigFile, "--json", `${tasks}#add`, "[20, 22]"]);
  assert.equal(call.code, 0, call.stdout + call.stderr);
  assert.equal(byHost(call.stdout)[hosts.inner.address]?.result, 42);
});
