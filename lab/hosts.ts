/**
 * The multi-host test network: two "machines" on this one, each a network
 * namespace running its own real OpenSSH sshd, for the ssh/sudo tests and the
 * bench's ssh measures (lab/ holds what tests/ and bench/ share).
 *
 *   runner (this namespace)            mitogen-bastion                 mitogen-inner
 *   10.231.1.1 mitogen-bas ── veth ── to-runner 10.231.1.2
 *                                     to-inner  10.231.2.1 ── veth ── to-bastion 10.231.2.2
 *
 * - The whole test range 10.231.0.0/16 is blackholed in the runner's own
 *   namespace; only the more specific route of the runner–bastion link gets
 *   through. So inner, and any address nobody holds, fails at once locally and
 *   no test packet can leave the machine.
 * - inner has no route to the runner (nor anywhere but its own link), and
 *   bastion does not forward: inner is reachable only from bastion.
 * - Both sshds allow password and key login for one test user, who may sudo
 *   to anything with its password (never NOPASSWD). The user also holds the
 *   key and known_hosts in ~/.ssh, so it can ssh from bastion on to inner.
 * - The sshds run without the leak check's MITOGEN_TEST_TOKEN, but the
 *   ssh_config sends it, the sshds accept it and sudo keeps it: what a test
 *   leaves running on the hosts is found by tests/helpers.ts like a local leak.
 *
 * The namespaces share the filesystem, users and processes with this machine,
 * so `node` (and anything else installed) is there too. Needs root; without
 * it, or without `ip`/`sshd`/`sudo`, setup says why it skips — except under
 * CI=true, where it throws, as CI must never skip these.
 *
 * One test process uses the network at a time (a lock file, see acquireLock):
 * another one's setup waits for it, up to 300 s. Setup tears down whatever an
 * earlier (or crashed) run left. The test user, its password, its
 * authorized key and its sudoers drop-in stay on the machine after teardown
 * (no sshd of the harness listens then); setup rewrites them every time.
 *
 * Uses node: builtins only, so it runs the same under Node and Deno.
 */
import { spawn } from "node:child_process";
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before } from "node:test";
import type { Context, Router } from "../mod.ts";
import { which } from "../which.ts";

/** One test host, as the runner sees it. */
export interface TestHost {
  /** The Host alias in `sshConfigFile`. */
  name: "bastion" | "inner";
  /** Address its sshd listens on. */
  address: string;
  port: number;
  /** Its ed25519 host key, as in a known_hosts line: "ssh-ed25519 AAAA…". */
  hostKeyPub: string;
}

export interface TestHosts {
  /** Reachable from the test runner. */
  bastion: TestHost;
  /** Reachable only from bastion (e.g. with ProxyJump bastion). */
  inner: TestHost;
  /** A test user, with a home, /bin/bash, a password and sudo (with password) to anything. */
  user: string;
  password: string;
  /** Private key (no passphrase) in the user's authorized_keys. Also copied to the user's ~/.ssh/id_ed25519. */
  identityFile: string;
  /** known_hosts with both host keys (under their aliases and addresses). Also the user's ~/.ssh/known_hosts. */
  knownHostsFile: string;
  /** ssh_config with Host bastion and Host inner (ProxyJump bastion): `ssh -F sshConfigFile inner true` works. */
  sshConfigFile: string;
  /** The harness directory: keys, configs, and each sshd's log (`<dir>/<name>/sshd.log`). */
  dir: string;
}

// ---------------------------------------------------------------------------
// The plan. Everything the harness creates is named here, so teardown can
// find leftovers of a crashed run without any state of its own.

/** The private test range; blackholed in the runner's namespace. */
export const TEST_RANGE = "10.231.0.0/16";
const USER = "mitogen-test";
const PASSWORD = "mitogen-test-password";
const DIR = join(tmpdir(), "mitogen-test-hosts");
const SUDOERS = "/etc/sudoers.d/mitogen-test";
/** Holds the pid of the one process using the network; see acquireLock. */
const LOCK = join(tmpdir(), "mitogen-test-hosts.lock");
const LOCK_WAIT_MS = 300_000;
const SSHD_PORT = 22;

export const NS = { bastion: "mitogen-bastion", inner: "mitogen-inner" } as const;
/** The runner's end of the runner–bastion veth (the other ends live inside the namespaces). */
const RUNNER_VETH = "mitogen-bas";
/** lab/fleet.ts's namespace and the runner's end of its veth: named here so that teardown finds them too. */
export const FLEET_NS = "mitogen-fleet";
export const FLEET_VETH = "mitogen-flt";
const NET = {
  runner: "10.231.1.1", // runner side of link 1 (10.231.1.0/30)
  bastion: "10.231.1.2", // bastion side of link 1
  bastionInner: "10.231.2.1", // bastion side of link 2 (10.231.2.0/30)
  inner: "10.231.2.2", // inner side of link 2
} as const;

/** A fixed PATH for the daemons, which get an environment of their own. */
const DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** The programs setup needs; found on DAEMON_PATH plus the runner's PATH. */
const NEEDED = ["ip", "sshd", "ssh", "ssh-keygen", "sudo", "visudo", "useradd", "chpasswd"] as const;

// ---------------------------------------------------------------------------
// Small process helpers. Every command gets a time limit.

interface RunResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

interface RunOptions {
  /** Kill the command (SIGKILL) after this many ms; it then counts as failed. */
  timeoutMs?: number;
  /** Written to its stdin, which is then closed. */
  input?: string;
  /** Its whole environment (default: this process's). */
  env?: NodeJS.ProcessEnv;
  /** Resolve on failure too, instead of throwing. */
  allowFail?: boolean;
}

/** Run `argv` to completion and collect its output; throws with its stderr if it fails, unless `allowFail`. */
export function run(argv: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const { timeoutMs = 10_000, input, env = process.env, allowFail = false } = opts;
  return new Promise((resolve, reject) => {
    // ip, sshd, useradd... live in sbin, which a root shell's PATH may lack.
    const file = argv[0]!.includes("/") ? argv[0]! : (findProgram(argv[0]!) ?? argv[0]!);
    const child = spawn(file, argv.slice(1), { env, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.stdout.setEncoding("utf8").on("data", (s: string) => (stdout += s));
    child.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s));
    child.stdin.on("error", () => {}); // it may exit without reading its input
    child.stdin.end(input ?? "");
    child.on("error", (err) => {
      clearTimeout(timer);
      reject(new Error(`${argv.join(" ")}: ${err.message}`));
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      const result = { code, signal, stdout, stderr };
      if (allowFail || (code === 0 && !timedOut)) return resolve(result);
      const why = timedOut ? `timed out after ${timeoutMs} ms` : `exited with ${code ?? signal}`;
      reject(new Error(`${argv.join(" ")}: ${why}: ${stderr.trim()}`));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Full path of `program` on DAEMON_PATH or the runner's PATH, or undefined. */
export function findProgram(program: string): string | undefined {
  return which(program, `${DAEMON_PATH}:${process.env.PATH ?? ""}`) ?? undefined;
}

/** Is `pid` a live process (not a zombie)? */
function alive(pid: number): boolean {
  try {
    return !/\) Z /.test(readFileSync(`/proc/${pid}/stat`, "latin1"));
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------
// Skip or fail.

/**
 * Why the hosts cannot be set up here, or undefined if they can. Under
 * CI=true this is always undefined: the tests then run and setup throws.
 * For `test(name, { skip: hostsSkip() ?? false }, fn)`.
 */
export function hostsSkip(): string | undefined {
  return process.env.CI === "true" ? undefined : unmet();
}

/** The first missing precondition, whatever CI says. */
function unmet(): string | undefined {
  if (process.platform !== "linux") return "the test hosts need Linux network namespaces";
  if (process.getuid?.() !== 0) return "the test hosts need root (ip netns, sshd, useradd)";
  const missing = NEEDED.filter((p) => !findProgram(p));
  if (missing.length) return `the test hosts need ${missing.join(", ")} (Debian: openssh-server openssh-client sudo iproute2 passwd)`;
  return undefined;
}

// ---------------------------------------------------------------------------
// Setup and teardown.

/**
 * Build the network, the user and both sshds, tearing down whatever an earlier
 * run left first; so it is idempotent. Returns { skip } where it cannot run
 * (throws instead under CI=true). Takes well under a second here.
 */
export async function setupHosts(): Promise<TestHosts | { skip: string }> {
  const reason = unmet();
  if (reason) {
    if (process.env.CI === "true") throw new Error(`CI must run the host tests, but ${reason}`);
    return { skip: reason };
  }
  await acquireLock();
  try {
    await destroy();
    return await build();
  } catch (err) {
    // Leave nothing half-built behind; the sshd logs stay in DIR for a look.
    await teardownHosts();
    throw err;
  }
}

async function build(): Promise<TestHosts> {
  rmSync(DIR, { recursive: true, force: true });
  for (const d of [DIR, join(DIR, "bastion"), join(DIR, "inner")]) mkdirSync(d, { mode: 0o755 });
  mkdirSync("/run/sshd", { recursive: true, mode: 0o755 }); // sshd's privilege separation directory

  // Keys: the user's, and one host key per sshd.
  const identityFile = join(DIR, "id_ed25519");
  const hostKey = (name: string) => join(DIR, name, "ssh_host_ed25519_key");
  await Promise.all(
    [
      [identityFile, `${USER}@mitogen-test-hosts`],
      [hostKey("bastion"), "bastion"],
      [hostKey("inner"), "inner"],
    ].map(([file, comment]) => run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment!, "-f", file!])),
  );
  const pub = (file: string) => readFileSync(`${file}.pub`, "utf8").trim();
  const keyOnly = (file: string) => pub(file).split(" ").slice(0, 2).join(" ");

  const bastion: TestHost = { name: "bastion", address: NET.bastion, port: SSHD_PORT, hostKeyPub: keyOnly(hostKey("bastion")) };
  const inner: TestHost = { name: "inner", address: NET.inner, port: SSHD_PORT, hostKeyPub: keyOnly(hostKey("inner")) };

  // known_hosts (port 22, so no [address]:port form) and the runner's ssh_config.
  const knownHostsFile = join(DIR, "known_hosts");
  const knownHosts = [bastion, inner].map((h) => `${h.name},${h.address} ${h.hostKeyPub}\n`).join("");
  writeFileSync(knownHostsFile, knownHosts);
  const sshConfigFile = join(DIR, "ssh_config");
  writeFileSync(
    sshConfigFile,
    [
      "# Written by lab/hosts.ts. Use as: ssh -F <this file> bastion|inner ...",
      "Host bastion",
      `  HostName ${bastion.address}`,
      `  Port ${bastion.port}`,
      "Host inner",
      `  HostName ${inner.address}`,
      `  Port ${inner.port}`,
      "  ProxyJump bastion",
      "Host *",
      `  User ${USER}`,
      `  IdentityFile ${identityFile}`,
      "  IdentitiesOnly yes",
      `  UserKnownHostsFile ${knownHostsFile}`,
      "  GlobalKnownHostsFile /dev/null",
      "  StrictHostKeyChecking yes",
      "  ConnectTimeout 5",
      "  LogLevel ERROR",
      // The sshds accept it: what a test starts over ssh carries the leak check's token too.
      "  SendEnv MITOGEN_TEST_TOKEN",
      "",
    ].join("\n"),
  );

  await setupUser(pub(identityFile), identityFile, knownHosts);
  await setupNetwork();
  await Promise.all([startSshd(bastion, NS.bastion), startSshd(inner, NS.inner)]);

  return { bastion, inner, user: USER, password: PASSWORD, identityFile, knownHostsFile, sshConfigFile, dir: DIR };
}

/** The test user: created if absent; password, ~/.ssh and the sudoers drop-in written every time. */
async function setupUser(authorizedKey: string, identityFile: string, knownHosts: string): Promise<void> {
  if (!passwdEntry(USER)) await run(["useradd", "--create-home", "--shell", "/bin/bash", USER]);
  await run(["chpasswd"], { input: `${USER}:${PASSWORD}\n` });
  const entry = passwdEntry(USER);
  if (!entry) throw new Error(`user ${USER} was not created`);
  const { uid, gid, home } = entry;

  // StrictModes: home and ~/.ssh not writable by others, files the user's own.
  mkdirSync(home, { recursive: true, mode: 0o755 });
  chownSync(home, uid, gid);
  chmodSync(home, 0o755);
  const ssh = join(home, ".ssh");
  mkdirSync(ssh, { recursive: true, mode: 0o700 });
  const files: [string, string, number][] = [
    ["authorized_keys", `${authorizedKey}\n`, 0o600],
    // So a context on bastion, running as the user, can ssh on to inner.
    ["id_ed25519", readFileSync(identityFile, "utf8"), 0o600],
    ["id_ed25519.pub", `${authorizedKey}\n`, 0o644],
    ["known_hosts", knownHosts, 0o644],
  ];
  for (const [name, text, mode] of files) {
    writeFileSync(join(ssh, name), text, { mode });
    chmodSync(join(ssh, name), mode);
    chownSync(join(ssh, name), uid, gid);
  }
  chmodSync(ssh, 0o700);
  chownSync(ssh, uid, gid);

  // sudo to anything WITH the password. timestamp_timeout=0: every sudo asks
  // (no cached credentials between tests); lecture=never: no first-time lecture
  // text where a prompt is expected; the leak check's token survives sudo.
  const rule = [
    "# Written by lab/hosts.ts (mitogen test hosts).",
    `Defaults:${USER} timestamp_timeout=0, lecture=never, env_keep += "MITOGEN_TEST_TOKEN"`,
    `${USER} ALL=(ALL:ALL) ALL`,
    "",
  ].join("\n");
  const draft = join(DIR, "sudoers");
  writeFileSync(draft, rule, { mode: 0o440 });
  await run(["visudo", "-c", "-q", "-f", draft]);
  writeFileSync(SUDOERS, rule, { mode: 0o440 });
  chmodSync(SUDOERS, 0o440);
  // doas as root WITH the password, where doas is installed.
  if (findProgram("doas"))
    writeFileSync("/etc/doas.conf", `# Written by lab/hosts.ts (mitogen test hosts).\npermit keepenv ${USER} as root\n`, { mode: 0o600 });
}

/** uid, gid and home of `user` from /etc/passwd, or undefined. */
function passwdEntry(user: string): { uid: number; gid: number; home: string } | undefined {
  for (const line of readFileSync("/etc/passwd", "utf8").split("\n")) {
    const f = line.split(":");
    if (f[0] === user && f.length >= 7) return { uid: Number(f[2]), gid: Number(f[3]), home: f[5]! };
  }
  return undefined;
}

/** Namespaces, veths, addresses, routes; then the blackhole for the whole range in the runner's namespace. */
async function setupNetwork(): Promise<void> {
  const ip = (...args: string[]) => run(["ip", ...args]);
  const inNs = (ns: string, ...args: string[]) => run(["ip", "-n", ns, ...args]);
  for (const ns of Object.values(NS)) {
    await ip("netns", "add", ns);
    await inNs(ns, "link", "set", "lo", "up");
  }
  // Link 1: runner <-> bastion.
  await ip("link", "add", RUNNER_VETH, "type", "veth", "peer", "name", "to-runner", "netns", NS.bastion);
  await ip("addr", "add", `${NET.runner}/30`, "dev", RUNNER_VETH);
  await ip("link", "set", RUNNER_VETH, "up");
  await inNs(NS.bastion, "addr", "add", `${NET.bastion}/30`, "dev", "to-runner");
  await inNs(NS.bastion, "link", "set", "to-runner", "up");
  // Link 2: bastion <-> inner. Made inside bastion, so the runner never holds either end.
  await inNs(NS.bastion, "link", "add", "to-inner", "type", "veth", "peer", "name", "to-bastion", "netns", NS.inner);
  await inNs(NS.bastion, "addr", "add", `${NET.bastionInner}/30`, "dev", "to-inner");
  await inNs(NS.bastion, "link", "set", "to-inner", "up");
  await inNs(NS.inner, "addr", "add", `${NET.inner}/30`, "dev", "to-bastion");
  await inNs(NS.inner, "link", "set", "to-bastion", "up");
  // Each namespace knows only its own links: no default route anywhere, so
  // inner cannot reach the runner. A new namespace does not forward either.
  await ip("route", "add", "blackhole", TEST_RANGE);
}

/**
 * Start a real sshd in namespace `ns`, listening on the host's address only,
 * with an environment of its own: without MITOGEN_TEST_TOKEN, so the per-test
 * leak check does not count the daemon. sshd daemonises, so `run` returns once
 * it has; then wait (bounded) until it listens. Its files go in `<dir>/<host.name>`
 * (made by the caller); `extra` sshd_config lines override the defaults.
 */
export async function startSshd(host: Pick<TestHost, "address" | "port"> & { name: string }, ns: string, extra: readonly string[] = []): Promise<void> {
  const dir = join(DIR, host.name);
  const config = join(dir, "sshd_config");
  const pidFile = join(dir, "sshd.pid");
  const lines = [
    "# Written by lab/hosts.ts.",
    ...extra, // first: sshd takes a keyword's first value
    `ListenAddress ${host.address}:${host.port}`,
    `HostKey ${join(dir, "ssh_host_ed25519_key")}`,
    `PidFile ${pidFile}`,
    "PasswordAuthentication yes",
    "PubkeyAuthentication yes",
    "KbdInteractiveAuthentication no",
    "UsePAM yes", // password login through PAM, as on a stock Debian host
    "PermitRootLogin no",
    `AllowUsers ${USER}`,
    "AuthorizedKeysFile .ssh/authorized_keys",
    "StrictModes yes",
    "PrintMotd no",
    "PrintLastLog no",
    "UseDNS no",
    "LoginGraceTime 30",
    "MaxStartups 100", // many tests connect at once, some on purpose with a wrong password
    "MaxAuthTries 6",
    "MaxSessions 100",
    "AllowTcpForwarding yes", // ProxyJump through bastion
    "AcceptEnv MITOGEN_TEST_TOKEN", // the leak check then sees what tests leave running on the hosts
    "Subsystem sftp internal-sftp",
    "LogLevel VERBOSE",
    "",
  ];
  writeFileSync(config, lines.join("\n"));
  // OpenSSH 9.8+ penalises addresses whose logins fail; the tests fail logins on purpose.
  const probe = await run(["sshd", "-t", "-f", config, "-o", "PerSourcePenalties=no"], { allowFail: true });
  if (probe.code === 0) writeFileSync(config, lines.join("\n") + "PerSourcePenalties no\n");

  const env = { PATH: DAEMON_PATH, LANG: "C.UTF-8" }; // no MITOGEN_TEST_TOKEN
  await run(["ip", "netns", "exec", ns, findProgram("sshd")!, "-f", config, "-E", join(dir, "sshd.log")], { env });

  // Listening? Read the daemon's own view of TCP sockets: /proc/<pid>/net/tcp
  // shows its namespace's, LISTEN is state 0A. No process, no packet needed.
  const want = `${hexAddress(host.address)}:${host.port.toString(16).toUpperCase().padStart(4, "0")}`;
  const deadline = Date.now() + 10_000;
  for (;;) {
    const pid = readPid(pidFile);
    if (pid && alive(pid)) {
      const table = readFileSync(`/proc/${pid}/net/tcp`, "latin1");
      if (table.split("\n").some((l) => l.trim().split(/\s+/)[1] === want && l.trim().split(/\s+/)[3] === "0A")) return;
    }
    if (Date.now() > deadline) {
      const log = existsSync(join(dir, "sshd.log")) ? readFileSync(join(dir, "sshd.log"), "utf8") : "";
      throw new Error(`sshd for ${host.name} did not listen on ${host.address}:${host.port} within 10 s; log:\n${log}`);
    }
    await sleep(20);
  }
}

/** "10.231.1.2" as /proc/net/tcp writes it: the 32-bit value in host (little-endian) order, hex. */
function hexAddress(address: string): string {
  return address
    .split(".")
    .reverse()
    .map((o) => Number(o).toString(16).toUpperCase().padStart(2, "0"))
    .join("");
}

function readPid(file: string): number | undefined {
  try {
    const pid = Number(readFileSync(file, "utf8").trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Stop everything setup started, also what a crashed run left, and release
 * the lock. Leaves the network alone while another live process holds it.
 * Safe to call when nothing is there.
 */
export async function teardownHosts(): Promise<void> {
  if (process.platform !== "linux" || process.getuid?.() !== 0 || !findProgram("ip")) return;
  // Hold the lock while destroying, so no other process starts building meanwhile.
  if (!tryLock()) return; // another live test process is using the network
  try {
    await destroy();
  } finally {
    rmSync(LOCK, { force: true });
  }
}

/**
 * Kill every process inside the two namespaces (the sshds, their sessions,
 * anything the tests left running there) and the sshds by their pid files,
 * then delete the veths, the namespaces and the blackhole route.
 */
async function destroy(): Promise<void> {
  const pids = new Set<number>();
  for (const name of ["bastion", "inner"]) {
    const pid = readPid(join(DIR, name, "sshd.pid"));
    if (pid && alive(pid) && /sshd/.test(readFileSync(`/proc/${pid}/cmdline`, "latin1"))) pids.add(pid);
  }
  for (const ns of [...Object.values(NS), FLEET_NS]) {
    const r = await run(["ip", "netns", "pids", ns], { allowFail: true });
    if (r.code !== 0) continue; // no such namespace
    for (const word of r.stdout.split(/\s+/)) if (Number(word) > 0) pids.add(Number(word));
  }
  pids.delete(process.pid);
  await killAll([...pids]);

  // Deleting one end of a veth deletes both; deleting them before the
  // namespaces means the names are free at once for the next setup.
  for (const veth of [RUNNER_VETH, FLEET_VETH]) await run(["ip", "link", "del", veth], { allowFail: true });
  await run(["ip", "-n", NS.bastion, "link", "del", "to-inner"], { allowFail: true });
  for (const ns of [...Object.values(NS), FLEET_NS]) await run(["ip", "netns", "del", ns], { allowFail: true });
  await run(["ip", "route", "del", "blackhole", TEST_RANGE], { allowFail: true });
  for (const name of ["bastion", "inner"]) rmSync(join(DIR, name, "sshd.pid"), { force: true });
}

/**
 * The network has one user at a time: the process whose pid is in LOCK, from
 * setup to teardown. Another process's setup waits (bounded) for it to finish
 * or die, and its teardown leaves the network alone. A lock whose process is
 * gone (a crashed run) is stale and taken over.
 */
/** The live process holding LOCK, if any. */
function lockOwner(): number | undefined {
  const pid = readPid(LOCK);
  return pid !== undefined && alive(pid) ? pid : undefined;
}

/** Take LOCK if it is free, stale or already ours; false while another live process holds it. */
function tryLock(): boolean {
  for (;;) {
    try {
      writeFileSync(LOCK, `${process.pid}\n`, { flag: "wx" });
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    const owner = lockOwner();
    if (owner === process.pid) return true; // setup again in the same process
    if (owner !== undefined) return false;
    rmSync(LOCK, { force: true }); // stale: its process is gone
  }
}

/** Take LOCK, waiting (at most LOCK_WAIT_MS) while another live process holds it. */
async function acquireLock(): Promise<void> {
  const deadline = Date.now() + LOCK_WAIT_MS;
  while (!tryLock()) {
    if (Date.now() > deadline) {
      const owner = lockOwner();
      let cmd = "";
      try {
        cmd = readFileSync(`/proc/${owner}/cmdline`, "latin1").replaceAll("\0", " ").slice(0, 200);
      } catch {
        // exited just now
      }
      throw new Error(`the test hosts are still in use after ${LOCK_WAIT_MS / 1000} s by pid ${owner}: ${cmd}`);
    }
    await sleep(100);
  }
}

/** SIGTERM, then SIGKILL whatever still lives after 2 s; wait (bounded) until all are gone. */
async function killAll(pids: number[]): Promise<void> {
  const signal = (sig: NodeJS.Signals) => {
    for (const pid of pids) {
      try {
        process.kill(pid, sig);
      } catch {
        // already gone
      }
    }
  };
  signal("SIGTERM");
  for (let i = 0; i < 100 && pids.some(alive); i++) {
    if (i === 40) signal("SIGKILL");
    await sleep(50);
  }
  const left = pids.filter(alive);
  if (left.length) throw new Error(`test host processes would not die: ${left.join(" ")}`);
}

/**
 * Set the network up around the calling test file: before() sets it up (or
 * throws under CI=true), after() tears it down. All tests of a file skip
 * together on `skip`, since under Deno (2.9) a top-level after() does not run
 * when any test of the file was skipped by its options.
 */
export function useTestHosts(ready: (hosts: TestHosts) => void): { skip: string | false } {
  const skip = hostsSkip() ?? false;
  before(
    async () => {
      if (skip) return;
      const result = await setupHosts();
      if ("skip" in result) throw new Error(`hostsSkip() said yes, setupHosts() said: ${result.skip}`);
      ready(result);
    },
    { timeout: LOCK_WAIT_MS + 30_000 },
  );
  after(async () => {
    if (!skip) await teardownHosts();
  });
  return { skip };
}

/**
 * The host tests' tree: master -> bastion (ssh, by its ssh_config name) -> inner (ssh via bastion)
 * -> root on inner (sudo via inner), each forwarding the leak check's token.
 */
export async function hostTree(router: Router, hosts: TestHosts): Promise<{ bastion: Context; inner: Context; root: Context }> {
  const bastion = await router.ssh({ hostname: "bastion", sshArgs: ["-F", hosts.sshConfigFile], name: "bastion" });
  const inner = await router.ssh({ hostname: hosts.inner.address, via: bastion, name: "inner", sshArgs: ["-o", "SendEnv=MITOGEN_TEST_TOKEN"] });
  const root = await router.sudo({
    username: "root",
    password: hosts.password,
    via: inner,
    name: "inner-root",
    sudoArgs: ["--preserve-env=MITOGEN_TEST_TOKEN"],
  });
  return { bastion, inner, root };
}
