/**
 * The test network of lab/hosts.ts itself: bastion is reachable from the
 * runner with key and password, inner only through bastion, sudo on the hosts
 * wants the password, and nothing in the test range is reachable otherwise.
 * Skips (with the reason) where the hosts cannot be set up; fails under CI=true.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { connect } from "node:net";
import { test } from "node:test";
import { alive, checkLeaks } from "./helpers.ts";
import { findProgram, run, setupHosts, TEST_RANGE, type TestHosts, teardownHosts, useTestHosts } from "../lab/hosts.ts";

checkLeaks();

let hosts: TestHosts;
const { skip } = useTestHosts((ready) => {
  hosts = ready;
});

/** `ssh -F <config> [options] <host> <remote command>`, bounded in time. */
function ssh(host: string, command: string, opts: { options?: string[]; input?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}) {
  return run(["ssh", "-F", hosts.sshConfigFile, ...(opts.options ?? ["-o", "BatchMode=yes"]), host, command], {
    allowFail: true,
    timeoutMs: opts.timeoutMs ?? 15_000,
    ...(opts.input !== undefined && { input: opts.input }),
    ...(opts.env && { env: opts.env }),
  });
}

/** A TCP connect from the runner: how it ended and how long it took. */
function tryConnect(host: string, port: number): Promise<{ ok: boolean; code?: string; ms: number }> {
  const start = performance.now();
  return new Promise((resolve) => {
    const socket = connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ ok: false, code: "TIMEOUT", ms: performance.now() - start });
    }, 3000);
    socket.on("connect", () => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ ok: true, ms: performance.now() - start });
    });
    socket.on("error", (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ ok: false, code: err.code ?? err.message, ms: performance.now() - start });
    });
  });
}

test("setup again over a running network (as after a crashed run) rebuilds it", { skip, timeout: 60_000 }, async () => {
  const oldKey = hosts.bastion.hostKeyPub;
  const result = await setupHosts();
  assert.ok(!("skip" in result));
  hosts = result;
  assert.notEqual(hosts.bastion.hostKeyPub, oldKey, "fresh host keys");
  const r = await ssh("bastion", "true");
  assert.equal(r.code, 0, r.stderr);
});

test("bastion runs node over ssh, logged in with the key", { skip }, async () => {
  const r = await ssh("bastion", "node -e 'console.log(1+1)'");
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, "2\n");
});

test("what a test starts on the hosts carries the leak check's token", { skip }, async () => {
  const r = await ssh("bastion", 'echo "$MITOGEN_TEST_TOKEN"');
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), process.env.MITOGEN_TEST_TOKEN);
});

test("the runner reaches bastion, and nothing else in the test range: at once", { skip }, async () => {
  const bastion = await tryConnect(hosts.bastion.address, hosts.bastion.port);
  assert.ok(bastion.ok, `bastion: ${bastion.code}`);
  // inner, bastion's inner-side address, and an address nobody holds: the
  // blackhole route refuses them locally, without a packet sent.
  for (const address of [hosts.inner.address, "10.231.2.1", "10.231.200.7"]) {
    const r = await tryConnect(address, 22);
    assert.equal(r.ok, false, `${address} must be unreachable`);
    assert.notEqual(r.code, "TIMEOUT", `${address} must fail at once, not time out`);
    assert.ok(r.ms < 500, `${address} failed after ${r.ms.toFixed(0)} ms (${r.code})`);
  }
  const route = await run(["ip", "route", "show", "type", "blackhole"]);
  assert.match(route.stdout, new RegExp(`^blackhole ${TEST_RANGE.replaceAll(".", "\\.")}`, "m"));
});

test("inner has no route back to the runner", { skip }, async () => {
  const r = await run(["ip", "-n", "mitogen-inner", "route", "get", "10.231.1.1"], { allowFail: true });
  assert.notEqual(r.code, 0, r.stdout);
  assert.match(r.stderr, /unreachable/i);
});

test("inner is reached through bastion with ProxyJump", { skip }, async () => {
  const r = await ssh("inner", 'echo "$SSH_CONNECTION"');
  assert.equal(r.code, 0, r.stderr);
  // "client port server port": inner sees the connection come from bastion.
  const [client, , server] = r.stdout.trim().split(" ");
  assert.equal(client, "10.231.2.1");
  assert.equal(server, hosts.inner.address);
  const t = await ssh("inner", "true");
  assert.equal(t.code, 0, t.stderr);
});

test("password login to bastion: the right password works, a wrong one fails", { skip }, async (t) => {
  const sshpass = findProgram("sshpass");
  if (!sshpass) {
    if (process.env.CI === "true") assert.fail("sshpass is missing (Debian package sshpass)");
    return t.skip("sshpass is not installed");
  }
  const passwordOnly = ["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1"];
  const login = (password: string) =>
    run([sshpass, "-e", "ssh", "-F", hosts.sshConfigFile, ...passwordOnly, "bastion", "echo logged-in"], {
      allowFail: true,
      timeoutMs: 15_000,
      env: { ...process.env, SSHPASS: password },
    });
  const good = await login(hosts.password);
  assert.equal(good.code, 0, good.stderr);
  assert.equal(good.stdout.trim(), "logged-in");
  const bad = await login("not-the-password");
  // One prompt allowed: ssh itself gives up (255) before sshpass sees a second prompt (5).
  assert.ok(bad.code === 255 || bad.code === 5, `exit ${bad.code}: ${bad.stderr}`);
  if (bad.code === 255) assert.match(bad.stderr, /Permission denied/);
  assert.doesNotMatch(bad.stdout, /logged-in/);
});

test("sudo on bastion wants the user's password", { skip }, async () => {
  const prompt = "MITOGEN-SUDO-PROMPT:";
  const sudo = (password: string) => ssh("bastion", `sudo -S -p '${prompt}' -u root whoami`, { input: `${password}\n` });
  const good = await sudo(hosts.password);
  assert.equal(good.code, 0, good.stderr);
  assert.equal(good.stdout, "root\n");
  assert.ok(good.stderr.includes(prompt), `prompted: ${good.stderr}`);
  const bad = await sudo("not-the-password");
  assert.notEqual(bad.code, 0);
  assert.equal(bad.stdout, "");
  assert.match(bad.stderr, /incorrect password|Sorry, try again/);
  const none = await ssh("bastion", "sudo -n -u root whoami");
  assert.notEqual(none.code, 0, "no NOPASSWD");
});

test("teardown removes the daemons, namespaces and routes; again is harmless", { skip, timeout: 30_000 }, async () => {
  const pids = ["bastion", "inner"].map((name) => Number(readFileSync(`${hosts.dir}/${name}/sshd.pid`, "utf8")));
  assert.ok(pids.every(alive), "both sshds run before");
  await teardownHosts();
  await teardownHosts();
  assert.deepEqual(pids.filter(alive), [], "sshds stopped");
  const ns = await run(["ip", "netns", "list"]);
  assert.doesNotMatch(ns.stdout, /mitogen-/);
  const routes = await run(["ip", "route", "show"]);
  assert.doesNotMatch(routes.stdout, /10\.231\./);
  // (No connect attempt now: without the blackhole route it would leave the machine.)
});
