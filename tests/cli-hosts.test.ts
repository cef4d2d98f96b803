/**
 * The `mitogen` command against the netns hosts of lab/hosts.ts: ssh by
 * config name, --via bastion to inner, --sudo with a password file, an
 * unreachable host and a wrong password, each on its own line.
 */
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, test } from "node:test";
import { DIST, NODE, mitogen as run } from "./command-runner.ts";
import { checkLeaks, records, waitFor } from "./helpers.ts";
import { findProgram, type TestHosts, useTestHosts } from "../lab/hosts.ts";

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

/**
 * Processes whose command line starts with `prefix`, any user's: the hosts share this machine's
 * processes, and a hop's ssh (bastion to inner) does not send the leak check's token.
 */
function running(prefix: string): { pid: number; cmd: string }[] {
  const out: { pid: number; cmd: string }[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmd = readFileSync(`/proc/${entry}/cmdline`, "latin1").replaceAll("\0", " ");
      if (cmd.startsWith(prefix) && !/\) Z /.test(readFileSync(`/proc/${entry}/stat`, "latin1"))) out.push({ pid: Number(entry), cmd });
    } catch {
      // gone
    }
  }
  return out;
}

/** A `sleep` no other test runs (GNU sleep takes a fraction), so that finding it finds ours. */
const uniqueSleep = () => `sleep 600.${process.pid}${Math.floor(Math.random() * 1e6)}`;

/** Sleeps running `marker` (`sleep N`) and their shells, on any host. */
const sleeping = (marker: string) => [...running(marker), ...running(`/bin/sh -c echo started; ${marker}`)];

/** Run `mitogen ...args` until `count` sleeps of `marker` run, then send `signal`; its exit code and records by host. */
async function interrupt(
  args: string[],
  marker: string,
  count: number,
  signal: NodeJS.Signals,
): Promise<{ code: number | null; got: Record<string, Record<string, unknown>> }> {
  const child = spawn(NODE, [DIST, ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "1" } });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
  const exit = new Promise<number | null>((resolve) => child.on("close", resolve));
  const limit = setTimeout(() => child.kill("SIGKILL"), 90_000);
  try {
    await waitFor(() => running(marker).length === count, 60_000, `${count} × ${marker} to run`).catch((err: Error) => {
      throw new Error(`${err.message}; mitogen wrote ${JSON.stringify(stdout + stderr)}`);
    });
    process.kill(child.pid as number, signal); // not child.kill(): Deno then reports that signal, not the exit code
    const code = await exit;
    assert.ok(stdout, stderr);
    return { code, got: byHost(stdout) };
  } finally {
    clearTimeout(limit);
    child.kill("SIGKILL");
  }
}

test("a signal to mitogen run stops the command on ssh, sudo and via targets: every record says interrupted, nothing is left on any host", {
  skip,
}, async () => {
  const one = uniqueSleep();
  const direct = await interrupt(["run", "bastion,local", "-F", hosts.sshConfigFile, "--json", "--", `echo started; ${one}`], one, 2, "SIGINT");
  assert.equal(direct.code, 130);
  for (const h of ["bastion", "local"])
    assert.deepEqual([direct.got[h]?.interrupted, direct.got[h]?.error, direct.got[h]?.stdout], [true, "interrupted (SIGINT)", "started\n"], h);
  assert.deepEqual(sleeping(one), [], "nothing left on bastion or here");
  const two = uniqueSleep();
  const deep = await interrupt(
    [
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
      `echo started; ${two}`,
    ],
    two,
    1,
    "SIGTERM",
  );
  assert.equal(deep.code, 143);
  const inner = deep.got[hosts.inner.address];
  assert.deepEqual([inner?.interrupted, inner?.error, inner?.stdout], [true, "interrupted (SIGTERM)", "started\n"]);
  assert.deepEqual(sleeping(two), [], "nothing left on inner (run as root through sudo, via bastion)");
});

test("--timeout stops the command on an ssh target: nothing is left there", { skip }, async () => {
  const three = uniqueSleep();
  const r = await mitogen(["run", "bastion", "-F", hosts.sshConfigFile, "--timeout", "8000", "--json", "--", `echo started; ${three}`]);
  assert.equal(r.code, 1);
  assert.deepEqual([byHost(r.stdout).bastion?.error, byHost(r.stdout).bastion?.stdout], ["timed out after 8000 ms", "started\n"]);
  assert.deepEqual(sleeping(three), [], "nothing left on bastion");
});

test("run on a plain ssh target goes over ssh alone (no runtime there); its records are those of a context's (--runtime node)", { skip }, async () => {
  const cases = [
    "echo out; echo err >&2; exit 3",
    "exit 255", // the command's own 255, not a failed connection
    "echo before; kill -s TERM $$", // killed by a signal: 128 + its number
    "cat; echo read nothing", // stdin is /dev/null
    "printf 'no newline'",
  ];
  for (const line of cases) {
    const plain = await mitogen(["run", "bastion", "-F", hosts.sshConfigFile, "--json", "--", line]);
    const ctx = await mitogen(["run", "bastion", "-F", hosts.sshConfigFile, "--runtime", "node", "--json", "--", line]);
    assert.deepEqual(records(plain.stdout), records(ctx.stdout), line);
    assert.equal(plain.code, ctx.code, line);
  }
  const first = await mitogen(["run", "bastion", "-F", hosts.sshConfigFile, "--json", "--", cases[0] as string]);
  assert.deepEqual(records(first.stdout)[0], { host: "bastion", ok: false, exitCode: 3, stdout: "out\n", stderr: "err\n" });
  const signalled = await mitogen(["run", "bastion", "-F", hosts.sshConfigFile, "--json", "--", cases[2] as string]);
  assert.equal(byHost(signalled.stdout).bastion?.exitCode, 143);
  // No runtime is started: the command's shell is the login shell's child, not a runtime's (as with --runtime).
  const parent = "cat /proc/$PPID/comm";
  const bare = await mitogen(["run", "bastion", "-F", hosts.sshConfigFile, "--json", "--", parent]);
  assert.equal(byHost(bare.stdout).bastion?.stdout, "bash\n", "the test user's login shell");
  const ctx = await mitogen(["run", "bastion", "-F", hosts.sshConfigFile, "--runtime", "node", "--json", "--", parent]);
  assert.equal(byHost(ctx.stdout).bastion?.stdout, "mitogen:bastion\n", "the context (its process title)");
});

test("run over ssh alone: a failed connection is the host's error, as with a context, and said once", { skip }, async () => {
  const refused = `${hosts.bastion.address}:1`; // nothing listens there
  // The lab's ssh_config, knowing no host key.
  const known = join(scratch, "empty_known_hosts");
  writeFileSync(known, "");
  const config = join(scratch, "ssh_config.unknown");
  writeFileSync(config, readFileSync(hosts.sshConfigFile, "utf8").replace(/UserKnownHostsFile .*/, `UserKnownHostsFile ${known}`));
  for (const args of [
    ["run", refused, "--json"],
    ["run", "bastion", "-F", config, "--check-host-keys", "--json"],
  ]) {
    const plain = await mitogen([...args, "--", "true"]);
    const ctx = await mitogen([...args, "--runtime", "node", "--", "true"]);
    assert.equal(plain.code, 1, plain.stdout + plain.stderr);
    const [a, b] = [records(plain.stdout)[0], records(ctx.stdout)[0]];
    assert.equal(a?.ok, false);
    assert.equal(a?.error, b?.error, args.join(" "));
    // What the error says is not said again as output (with ssh's \r), nor as a warning of the EPIPE it left.
    const said = String(b?.error).replace(/^ssh to [^:]+: /, "");
    const output = String(b?.output ?? "");
    assert.ok(!output.includes(said) && !output.includes("\r"), `${args.join(" ")}: ${JSON.stringify(output)}`);
    assert.equal(ctx.stderr, "", args.join(" "));
  }
});

test("run over ssh alone: what the command leaves running goes when it ends", { skip }, async () => {
  const left = uniqueSleep();
  const r = await mitogen(["run", "bastion", "-F", hosts.sshConfigFile, "--json", "--", `${left} >/dev/null 2>&1 & echo started`]);
  assert.equal(byHost(r.stdout).bastion?.stdout, "started\n", r.stdout + r.stderr);
  await waitFor(() => running(left).length === 0, 10_000, `${left} to be gone from bastion`);
});
