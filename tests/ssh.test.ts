/**
 * router.ssh against real OpenSSH servers on the netns hosts (lab/hosts.ts):
 * bastion is reachable from here, inner only from bastion.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { CORE } from "../frames.ts";
import { ChannelError, type Context, Secret, type SshOptions, StreamError } from "../mod.ts";
import { checkLeaks, coresKept, quietRouter, routerWithLogs } from "./helpers.ts";
import { findProgram, run, type TestHosts, useTestHosts } from "../lab/hosts.ts";

checkLeaks();

let hosts: TestHosts;
let scratch = "";
const { skip } = useTestHosts((ready) => {
  hosts = ready;
  scratch = mkdtempSync(join(tmpdir(), "mitogen-ssh-test-"));
});

after(() => {
  if (skip) return;
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

/** Options for bastion through the harness's ssh_config (which also forwards the leak-check token). */
function bastion(extra: Partial<SshOptions> = {}): SshOptions {
  return { hostname: "bastion", sshArgs: ["-F", hosts.sshConfigFile], name: "bastion", ...extra };
}

/** The deno binary by absolute path: it is not on the test user's PATH on the hosts. */
function denoPath(): string {
  const found = (globalThis as { Deno?: { execPath(): string } }).Deno?.execPath() ?? findProgram("deno");
  if (!found) throw new Error("deno not found");
  return realpathSync(found);
}

/** A start, waited for until connected (router.ssh() resolves before, see Context.connected). */
const connected = (start: Promise<Context>): Promise<Context> => start.then((ctx) => ctx.connected());

const inNamespace = () => Object.values(process.getBuiltinModule("node:os").networkInterfaces()).flatMap((list) => (list ?? []).map((i) => i.address));

test("ssh to bastion with a key: node by default, deno on request, calls work", { skip }, async () => {
  await using router = quietRouter();
  const a = await router.ssh(bastion());
  assert.ok(((await a.call(inNamespace)) as string[]).includes(hosts.bastion.address), "runs inside bastion's namespace");
  assert.equal(await a.call(() => process.getBuiltinModule("node:os").userInfo().username), hosts.user);
  const d = await router.ssh(bastion({ runtime: denoPath(), name: "bastion-deno" }));
  assert.equal(await d.call(() => typeof (globalThis as { Deno?: unknown }).Deno), "object");
  assert.equal(await d.call((x: number) => x * 2, 21), 42);
});

test("with compression the core goes plain (ssh compresses it), without it deflated; node children die with sshd's session process", { skip }, async () => {
  await using fixture = routerWithLogs({ debug: true });
  const { router, logs } = fixture;
  for (const [runtime, compression] of [
    ["node", true],
    ["node", false],
    [denoPath(), true],
    [denoPath(), false],
  ] as const) {
    const name = `bastion-${runtime === "node" ? "node" : "deno"}-${compression ? "c" : "plain-link"}`;
    const ctx = await router.ssh(bastion({ runtime, compression, name }));
    assert.equal(await ctx.call((x: number) => x * 2, 21), 42);
    // Plain: nothing kept; deflated: the core it booted from, to start children with.
    assert.deepEqual(await ctx.call(coresKept), compression ? [] : [CORE.MODERN], name);
    assert.ok(logs.lines(name).includes("watchdog: kernel"), `${name}: ${logs.lines(name).filter((l) => l.startsWith("watchdog"))}`);
    const below = await router.local({ via: ctx, name: `${name}.below` });
    assert.equal(await below.call(() => "below"), "below");
    assert.deepEqual(await ctx.call(coresKept), [CORE.MODERN], `${name} has the core for its child`);
  }
});

test("inner through bastion: a context on bastion starts one on inner", { skip }, async () => {
  await using router = quietRouter();
  const a = await router.ssh(bastion());
  const b = await router.ssh({ hostname: hosts.inner.address, via: a, name: "inner", sshArgs: ["-o", "SendEnv=MITOGEN_TEST_TOKEN"] });
  assert.ok(((await b.call(inNamespace)) as string[]).includes(hosts.inner.address));
  const c = await router.local({ via: b, name: "inner-local" });
  assert.equal(await c.call(() => "three hops down"), "three hops down");
  // import() in shipped code, over ssh and on a local child of an ssh context (whose core the code-cache loader compiles).
  for (const ctx of [a, b, c]) assert.equal(await ctx.call(async () => (await import("node:os")).platform()), "linux", `import() on ${ctx.name}`);
  await b.shutdown({ wait: true });
  await assert.rejects(
    c.call(() => 1),
    ChannelError,
  );
});

test("passwords: the right one works, a wrong one and a missing one fail at once", { skip }, async () => {
  await using router = quietRouter();
  const noKey = ["-o", "PubkeyAuthentication=no"];
  const ok = await router.ssh(bastion({ sshArgs: ["-F", hosts.sshConfigFile, ...noKey], password: hosts.password }));
  assert.equal(await ok.call(() => "in"), "in");
  const t0 = Date.now();
  await assert.rejects(connected(router.ssh(bastion({ sshArgs: ["-F", hosts.sshConfigFile, ...noKey], password: "wrong" }))), /incorrect password/);
  assert.ok(Date.now() - t0 < 15_000, "no timeout wait");
  await assert.rejects(connected(router.ssh(bastion({ sshArgs: ["-F", hosts.sshConfigFile, ...noKey] }))), /password required/);
});

test("host keys: unknown under each policy, changed under enforce", { skip }, async () => {
  await using router = quietRouter();
  const empty = join(scratch, "known_hosts.empty");
  writeFileSync(empty, "");
  const direct = (extra: Partial<SshOptions>): SshOptions => ({
    hostname: hosts.bastion.address,
    identityFile: hosts.identityFile,
    username: hosts.user,
    ...extra,
  });
  await assert.rejects(connected(router.ssh(direct({ knownHostsFile: empty, checkHostKeys: "enforce" }))), /unknown host key \(checkHostKeys: enforce\)/);
  const learned = join(scratch, "known_hosts.learned");
  writeFileSync(learned, "");
  const accepted = await router.ssh(direct({ knownHostsFile: learned, checkHostKeys: "accept" }));
  assert.equal(await accepted.call(() => 1), 1);
  const key = hosts.bastion.hostKeyPub.split(" ")[1] as string;
  assert.ok(readFileSync(learned, "utf8").includes(key), "the host key was learned");
  const ignored = await router.ssh(direct({ knownHostsFile: empty, checkHostKeys: "ignore" }));
  assert.equal(await ignored.call(() => 2), 2);
  const wrong = join(scratch, "known_hosts.wrong");
  writeFileSync(wrong, `${hosts.bastion.address} ${hosts.inner.hostKeyPub}\n`);
  await assert.rejects(connected(router.ssh(direct({ knownHostsFile: wrong, checkHostKeys: "enforce" }))), /host key has CHANGED/);
  await assert.rejects(connected(router.ssh(direct({ knownHostsFile: wrong, checkHostKeys: "accept" }))), /CHANGED|host key/);
});

test("connectTimeout against a server that never speaks", { skip }, async () => {
  await using router = quietRouter();
  const held: import("node:net").Socket[] = [];
  const server = createServer((socket) => held.push(socket)); // accepts, never answers
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as { port: number }).port;
  try {
    const t0 = Date.now();
    await assert.rejects(
      connected(router.ssh({ hostname: "127.0.0.1", port, connectTimeout: 1500, checkHostKeys: "ignore" })),
      /not connected within 1500 ms|timed out/,
    );
    assert.ok(Date.now() - t0 < 6000);
  } finally {
    for (const s of held) s.destroy();
    await new Promise((r) => server.close(r));
  }
});

test("a failed start fails its first call, later calls and connected() with the one error, and leaves nothing running", { skip }, async () => {
  await using router = quietRouter();
  const empty = join(scratch, "known_hosts.early");
  writeFileSync(empty, "");
  const direct = { hostname: hosts.bastion.address, identityFile: hosts.identityFile, username: hosts.user };
  for (const [what, options, pattern] of [
    ["unknown host key", { ...direct, knownHostsFile: empty, checkHostKeys: "enforce" }, /^ssh to .*: unknown host key \(checkHostKeys: enforce\)$/],
    [
      "wrong key",
      bastion({ identityFile: join(scratch, "no-such-key"), sshArgs: ["-F", hosts.sshConfigFile, "-o", "PubkeyAuthentication=no"] }),
      /password required/,
    ],
    // Named as such (not the shell's "exec: ...: not found"), and at once.
    ["no runtime", bastion({ runtime: "/nonexistent/node" }), /^ssh to .*: no \/nonexistent\/node found on [\w.-]+$/],
    ["no deno", bastion({ runtime: "deno" }), /^ssh to .*: no deno found on [\w.-]+$/],
    ["refused", { hostname: "127.0.0.1", port: 1, checkHostKeys: "ignore" }, /^ssh to 127\.0\.0\.1: connect to host 127\.0\.0\.1 port 1: Connection refused$/],
  ] as const) {
    const ctx = await router.ssh({ ...options, name: what });
    // Sent before the start failed (queued behind CONFIGURE), and after it: the same error, not a ChannelError.
    const first = await ctx.call(() => 1).catch((e: unknown) => e);
    assert.ok(first instanceof StreamError, `${what}: ${first}`);
    assert.match(first.message, pattern);
    assert.equal(await ctx.connected().catch((e: unknown) => e), first, `${what}: connected() rejects with it`);
    assert.equal(await ctx.call(() => 2).catch((e: unknown) => e), first, `${what}: a later call too`);
    assert.equal(await ctx.disconnected(), first.message);
  }
  // Nobody asks: no unhandled rejection (the test run would fail on one), the context just ends.
  const unasked = await router.ssh(bastion({ runtime: "/nonexistent/node", name: "unasked" }));
  assert.match(await unasked.disconnected(), /no \/nonexistent\/node found on/);
});

/** Pids of our own ssh clients talking to `address`. */
function sshClientsTo(address: string): number[] {
  return readdirSync("/proc")
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      try {
        const cmd = readFileSync(`/proc/${p}/cmdline`, "latin1").split("\0");
        return cmd[0]?.endsWith("ssh") && cmd.includes("bastion") && readFileSync(`/proc/${p}/stat`, "latin1").split(" ")[3] === String(process.pid);
      } catch {
        return false;
      }
    })
    .map(Number)
    .filter(() => address.length > 0);
}

test("killing the ssh connection to bastion rejects every pending call below it at once", { skip }, async () => {
  await using router = quietRouter();
  // Both connected first: this is about a connection that breaks, not a start that fails.
  const a = await (await router.ssh(bastion())).connected();
  const b = await (await router.ssh({ hostname: hosts.inner.address, via: a, name: "inner", sshArgs: ["-o", "SendEnv=MITOGEN_TEST_TOKEN"] })).connected();
  const forever = () => new Promise(() => {});
  const pending = [a.call(forever), b.call(forever)].map((p) => assert.rejects(p, ChannelError));
  const clients = sshClientsTo(hosts.bastion.address);
  assert.equal(clients.length, 1, "one ssh client to bastion");
  const t0 = Date.now();
  process.kill(clients[0] as number, "SIGKILL");
  await Promise.all(pending);
  assert.ok(Date.now() - t0 < 3000, "rejected at once");
});

test("killing the master leaves no mitogen process on any host", { skip }, async () => {
  const script = join(scratch, "master.mts");
  // Contexts named for this run: ps in a netns lists every process on the machine, other runs' included.
  const tag = `orphan-${process.pid}-${Date.now()}`;
  const mod = new URL("../mod.ts", import.meta.url).href;
  writeFileSync(
    script,
    `import { Router } from ${JSON.stringify(mod)};
const router = new Router({ log: () => {} });
const a = await router.ssh({ hostname: "bastion", name: "${tag}-a", sshArgs: ["-F", ${JSON.stringify(hosts.sshConfigFile)}] });
const b = await router.ssh({ hostname: ${JSON.stringify(hosts.inner.address)}, name: "${tag}-b", via: a });
await b.call(() => 1);
console.log("ready");
setInterval(() => {}, 1000);
`,
  );
  const deno = (globalThis as { Deno?: { execPath(): string } }).Deno;
  const config = new URL("../deno.json", import.meta.url).pathname;
  const [exe, args] = deno ? [deno.execPath(), ["run", "-A", "--config", config, script]] : [process.execPath, ["--import", "tsx", script]];
  const master = spawn(exe, args as string[], { stdio: ["ignore", "pipe", "inherit"], cwd: new URL("..", import.meta.url).pathname });
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("master never got ready")), 60_000);
      master.stdout.on("data", (d: Buffer) => {
        if (d.toString().includes("ready")) {
          clearTimeout(timer);
          resolve();
        }
      });
      master.once("exit", (code) => reject(new Error(`master exited ${code}`)));
    });
    const mitogenOn = async (ns: string) => {
      const { stdout } = await run(["ip", "netns", "exec", ns, "ps", "-eo", "pid=,args="], { timeoutMs: 10_000 });
      return stdout.split("\n").filter((l) => l.includes(tag));
    };
    assert.ok((await mitogenOn("mitogen-bastion")).length > 0, "something ran on bastion");
    master.kill("SIGKILL");
    let left: string[] = [];
    for (let i = 0; i < 50; i++) {
      left = [...(await mitogenOn("mitogen-bastion")), ...(await mitogenOn("mitogen-inner"))];
      if (left.length === 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.deepEqual(left, [], "no mitogen process left on the hosts");
  } finally {
    master.kill("SIGKILL");
    await new Promise((r) => (master.exitCode !== null || master.signalCode !== null ? r(null) : master.once("close", r)));
  }
});

test("a 256 MiB value through two ssh hops arrives intact", { skip }, async () => {
  await using router = quietRouter({ maxMessageSize: 300 * 1024 * 1024 });
  const a = await router.ssh(bastion({ compression: false }));
  const b: Context = await router.ssh({
    hostname: hosts.inner.address,
    via: a,
    name: "inner",
    compression: false,
    sshArgs: ["-o", "SendEnv=MITOGEN_TEST_TOKEN"],
  });
  const big = randomBytes(256 * 1024 * 1024);
  const want = createHash("sha256").update(big).digest("hex");
  const got = await b.call(
    (bytes: Uint8Array) => process.getBuiltinModule("node:crypto").createHash("sha256").update(bytes).digest("hex"),
    new Uint8Array(big.buffer, big.byteOffset, big.byteLength),
  );
  assert.equal(got, want);
});

test("transport ssh2: keys on disk and in memory, passwords, host-key policies, in process", { skip }, async () => {
  await using router = quietRouter();
  const base = { transport: "ssh2" as const, hostname: hosts.bastion.address, username: hosts.user, knownHostsFile: hosts.knownHostsFile };
  const byFile = await router.ssh({ ...base, identityFile: hosts.identityFile, name: "ssh2-file" });
  assert.ok(((await byFile.call(inNamespace)) as string[]).includes(hosts.bastion.address));
  const inMemory = await router.ssh({ ...base, privateKey: new Secret(readFileSync(hosts.identityFile, "utf8")), name: "ssh2-memory" });
  assert.equal(await inMemory.call(() => "key from memory"), "key from memory");
  const byPassword = await router.ssh({ ...base, password: hosts.password, name: "ssh2-password" });
  assert.equal(await byPassword.call(() => "password"), "password");
  await assert.rejects(router.ssh({ ...base, password: "wrong" }), /incorrect password/);
  const empty = join(scratch, "known_hosts.ssh2-empty");
  writeFileSync(empty, "");
  await assert.rejects(router.ssh({ ...base, identityFile: hosts.identityFile, knownHostsFile: empty }), /unknown host key \(checkHostKeys: enforce\)/);
  const learned = join(scratch, "known_hosts.ssh2-learned");
  writeFileSync(learned, "");
  const accepted = await router.ssh({ ...base, identityFile: hosts.identityFile, knownHostsFile: learned, checkHostKeys: "accept" });
  assert.equal(await accepted.call(() => 1), 1);
  assert.ok(readFileSync(learned, "utf8").includes(hosts.bastion.hostKeyPub.split(" ")[1] as string));
  const wrong = join(scratch, "known_hosts.ssh2-wrong");
  writeFileSync(wrong, `${hosts.bastion.address} ${hosts.inner.hostKeyPub}\n`);
  await assert.rejects(router.ssh({ ...base, identityFile: hosts.identityFile, knownHostsFile: wrong }), /host key has CHANGED/);
  await assert.rejects(router.ssh({ ...base, identityFile: hosts.identityFile, via: byFile }), /master only/);
});
