/**
 * The tree across hosts and users: master -> bastion (ssh) -> inner (ssh via
 * bastion) -> root on inner (sudo via inner), on the netns hosts of lab/hosts.ts.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import type { Router } from "../mod.ts";
import { checkLeaks, failedViaStart, quietRouter, routerWithLogs, waitFor, whenConnected } from "./helpers.ts";
import { hostTree, type TestHosts, useTestHosts } from "../lab/hosts.ts";

checkLeaks();

let hosts: TestHosts;
const { skip } = useTestHosts((ready) => {
  hosts = ready;
});

type Tasks = typeof import("./fixtures/tasks.ts");
const TASKS = new URL("./fixtures/tasks.ts", import.meta.url);

const tree = (router: Router) => hostTree(router, hosts);

test("the four-level tree: calls and modules at every level", { skip }, async () => {
  await using router = quietRouter({ maxMessageSize: 8 * 1024 * 1024 });
  const { bastion, inner, root } = await tree(router);
  const who = await Promise.all([bastion, inner, root].map(async (ctx) => (await ctx.import<Tasks>(TASKS)).whoami()));
  assert.deepEqual(
    who.map((w) => w.user),
    [hosts.user, hosts.user, "root"],
  );
  assert.equal(who[2]?.uid, 0);
  assert.ok(who[0]?.addresses.includes(hosts.bastion.address));
  assert.ok(who[1]?.addresses.includes(hosts.inner.address));
  assert.ok(who[2]?.addresses.includes(hosts.inner.address));
  // maxMessageSize reached the bottom: a reply over it fails there, clearly
  await assert.rejects(
    root.call(() => new Uint8Array(9 * 1024 * 1024)),
    /exceeds maxMessageSize 8388608/,
  );
  assert.equal(await root.call(() => "root still answers"), "root still answers");
});

test("siblings talk across hosts, unless the router is unidirectional", { skip }, async () => {
  for (const unidirectional of [false, true]) {
    await using fixture = routerWithLogs({ unidirectional });
    const { router, logs } = fixture;
    const { bastion, root } = await tree(router);
    const local = await router.local({ name: "local-sibling" });
    const onBastion = await bastion.import<Tasks>(TASKS);
    const onLocal = await local.import<Tasks>(TASKS);
    const onRoot = await root.import<Tasks>(TASKS);
    const inbox = await onBastion.openInbox();
    await onLocal.post(inbox, "from a sibling");
    await onRoot.post(inbox, "from below");
    if (!unidirectional) {
      const got = [await onBastion.readInbox(inbox.dstHandle, 5000), await onBastion.readInbox(inbox.dstHandle, 5000)];
      assert.deepEqual(got.sort(), ["from a sibling", "from below"]);
    } else {
      assert.equal(await onBastion.readInbox(inbox.dstHandle, 5000), "from below", "a descendant may still talk to its ancestor");
      await assert.rejects(onBastion.readInbox(inbox.dstHandle, 300), /nothing arrived/);
      await waitFor(() => logs.records.some((r) => /unidirectional mode forbids/.test(r.message)), 5000, "refusal logged");
    }
  }
});

test("a via start to a host that refuses: the call sent meanwhile rejects with the start's error, nothing is left running", { skip }, async () => {
  await using router = quietRouter();
  const bastion = await router.ssh({ hostname: "bastion", sshArgs: ["-F", hosts.sshConfigFile], name: "bastion" });
  const bad = await router.ssh({ hostname: hosts.inner.address, port: 1, via: bastion, name: "refused" });
  await failedViaStart(bad, /Connection refused/);
  const ssh = await bastion.call(() => process.getBuiltinModule("node:child_process").execSync("pgrep -u $(id -u) -x ssh || true").toString().trim());
  assert.equal(ssh, "", "no ssh left on bastion");
  assert.equal(await bastion.call(() => "bastion unharmed"), "bastion unharmed");
});

test("sudo: a wrong password and a missing one fail at once, with distinct errors", { skip }, async () => {
  await using router = quietRouter();
  const bastion = await router.ssh({ hostname: "bastion", sshArgs: ["-F", hosts.sshConfigFile], name: "bastion" });
  const t0 = Date.now();
  await assert.rejects(whenConnected(router.sudo({ via: bastion, password: "wrong" })), /sudo to root: incorrect password/);
  await assert.rejects(whenConnected(router.sudo({ via: bastion })), /sudo to root: password required/);
  await assert.rejects(whenConnected(router.sudo({ via: bastion, username: "no-such-user", password: hosts.password })), /sudo to no-such-user/);
  assert.ok(Date.now() - t0 < 20_000, "no timeouts");
  assert.equal(await bastion.call(() => "bastion unharmed"), "bastion unharmed");
});

test("su and doas run in a pty: the right password works, a wrong or missing one fails at once", { skip }, async (t) => {
  await using router = quietRouter();
  const bastion = await router.ssh({ hostname: "bastion", sshArgs: ["-F", hosts.sshConfigFile], name: "bastion" });
  const me = () => process.getBuiltinModule("node:os").userInfo().username;
  const viaSu = await router.su({ via: bastion, username: hosts.user, password: hosts.password, name: "su-self" });
  assert.equal(await viaSu.call(me), hosts.user);
  assert.deepEqual(
    await viaSu.call(
      (b: Uint8Array) => b,
      new Uint8Array(256).map((_, i) => i),
    ),
    new Uint8Array(256).map((_, i) => i),
    "8-bit clean through the pty",
  );
  const t0 = Date.now();
  await assert.rejects(whenConnected(router.su({ via: bastion, username: hosts.user, password: "wrong" })), /su to mitogen-test: incorrect password/);
  await assert.rejects(whenConnected(router.su({ via: bastion, username: hosts.user })), /su to mitogen-test: password required/);
  assert.ok(Date.now() - t0 < 20_000, "no timeouts");
  if (!(await bastion.call(() => process.getBuiltinModule("node:fs").existsSync("/usr/bin/doas")))) {
    if (process.env.CI === "true") assert.fail("doas is not installed: .ci/run installs it");
    t.skip("doas is not installed here (apt-get install doas)");
    return;
  }
  const root = await router.doas({ via: bastion, password: hosts.password, name: "doas-root" });
  assert.equal(await root.call(me), "root");
  await assert.rejects(whenConnected(router.doas({ via: bastion, password: "wrong" })), /doas to root: incorrect password/);
  await assert.rejects(whenConnected(router.doas({ via: bastion })), /doas to root: password required/);
  // doas.conf lets the test user become root only
  await assert.rejects(whenConnected(router.doas({ via: bastion, username: "nobody", password: hosts.password })), /doas to nobody: not allowed/);
});
