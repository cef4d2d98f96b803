/**
 * The fleet: one sshd in a network namespace of its own answering on a range
 * of addresses, so the bench can run one command on hundreds of "hosts"
 * (issue 24). Built on top of lab/hosts.ts (same lock, user, key, ssh_config
 * and blackholed test range), reachable from the runner and from bastion:
 *
 *   runner 10.231.4.1 mitogen-flt ── veth ── to-runner 10.231.4.2   mitogen-fleet
 *   bastion 10.231.3.1 to-fleet   ── veth ── to-bastion 10.231.3.2  (10.231.64.0/24 local on lo)
 *
 * Every address of FLEET_RANGE is local in the fleet's namespace (a `local`
 * route on lo), and the sshd listens on 0.0.0.0 there, so `ssh 10.231.64.N`
 * reaches the same daemon for any N. The known_hosts of the harness and of
 * the test user (so bastion can ssh on) hold the fleet's host key under every
 * address used. Torn down with the hosts (teardownHosts()).
 *
 * @module
 */
import { appendFileSync, mkdirSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before } from "node:test";
import { FLEET_NS, FLEET_VETH, hostsSkip, NS, run, setupHosts, startSshd, type TestHosts, teardownHosts } from "./hosts.ts";

/** The fleet's addresses: 10.231.64.1 up to .254. */
export const FLEET_RANGE = "10.231.64.0/24";
/** The most hosts a fleet has. */
export const FLEET_MAX = 254;
const LINK = { runner: "10.231.4.1", fleetRunner: "10.231.4.2", bastion: "10.231.3.1", fleetBastion: "10.231.3.2" } as const;

/** The lab's hosts plus the fleet. */
export interface Fleet extends TestHosts {
  /** One address per fleet host, reachable from the runner and from bastion as the test user with the hosts' key. */
  addresses: string[];
  /** The fleet's sshd namespace: its processes (the daemon aside) are what the fleet's sessions left running. */
  namespace: string;
  /** The pid of the fleet's listening sshd. */
  sshdPid: number;
  /** The address bastion's connections to the fleet come from. */
  fromBastion: string;
}

/**
 * Set up the lab's hosts (lab/hosts.ts: its lock, its teardown) and the fleet of `count` hosts
 * on top; { skip } where the hosts cannot be set up. Tear down with teardownHosts().
 */
export async function setupFleet(count: number): Promise<Fleet | { skip: string }> {
  if (!Number.isInteger(count) || count < 1 || count > FLEET_MAX) throw new RangeError(`a fleet has 1 to ${FLEET_MAX} hosts, not ${count}`);
  const hosts = await setupHosts();
  if ("skip" in hosts) return hosts;
  try {
    return await build(hosts, count);
  } catch (err) {
    await teardownHosts();
    throw err;
  }
}

async function build(hosts: TestHosts, count: number): Promise<Fleet> {
  const ip = (...args: string[]) => run(["ip", ...args]);
  const inNs = (ns: string, ...args: string[]) => run(["ip", "-n", ns, ...args]);
  await ip("netns", "add", FLEET_NS);
  await inNs(FLEET_NS, "link", "set", "lo", "up");
  await inNs(FLEET_NS, "route", "add", "local", FLEET_RANGE, "dev", "lo");
  await ip("link", "add", FLEET_VETH, "type", "veth", "peer", "name", "to-runner", "netns", FLEET_NS);
  await ip("addr", "add", `${LINK.runner}/30`, "dev", FLEET_VETH);
  await ip("link", "set", FLEET_VETH, "up");
  await inNs(FLEET_NS, "addr", "add", `${LINK.fleetRunner}/30`, "dev", "to-runner");
  await inNs(FLEET_NS, "link", "set", "to-runner", "up");
  await ip("route", "add", FLEET_RANGE, "via", LINK.fleetRunner);
  await inNs(NS.bastion, "link", "add", "to-fleet", "type", "veth", "peer", "name", "to-bastion", "netns", FLEET_NS);
  await inNs(NS.bastion, "addr", "add", `${LINK.bastion}/30`, "dev", "to-fleet");
  await inNs(NS.bastion, "link", "set", "to-fleet", "up");
  await inNs(FLEET_NS, "addr", "add", `${LINK.fleetBastion}/30`, "dev", "to-bastion");
  await inNs(FLEET_NS, "link", "set", "to-bastion", "up");
  await inNs(NS.bastion, "route", "add", FLEET_RANGE, "via", LINK.fleetBastion);

  const dir = join(hosts.dir, "fleet");
  mkdirSync(dir, { mode: 0o755 });
  const key = join(dir, "ssh_host_ed25519_key");
  await run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet", "-f", key]);
  const addresses = Array.from({ length: count }, (_, i) => `10.231.64.${i + 1}`);
  const keyPub = readFileSync(`${key}.pub`, "utf8").trim().split(" ").slice(0, 2).join(" ");
  const line = `${addresses.join(",")} ${keyPub}\n`;
  appendFileSync(hosts.knownHostsFile, line);
  appendFileSync(join(userHome(hosts.user), ".ssh", "known_hosts"), line);
  // 32 and more logins at once, each with its sessions.
  await startSshd({ name: "fleet", address: "0.0.0.0", port: 22 }, FLEET_NS, ["MaxStartups 512", "MaxSessions 512"]);
  const sshdPid = Number(readFileSync(join(dir, "sshd.pid"), "utf8").trim());
  return { ...hosts, addresses, namespace: FLEET_NS, sshdPid, fromBastion: LINK.bastion };
}

/** The home directory of `user`, from /etc/passwd. */
function userHome(user: string): string {
  const entry = readFileSync("/etc/passwd", "utf8")
    .split("\n")
    .map((l) => l.split(":"))
    .find((f) => f[0] === user);
  if (!entry?.[5]) throw new Error(`no user ${user}`);
  return entry[5];
}

/** The pids in namespace `ns` other than `sshdPid`: what its sessions left running. */
async function leftIn(ns: string, sshdPid: number): Promise<number[]> {
  const r = await run(["ip", "netns", "pids", ns], { allowFail: true });
  return r.stdout
    .split(/\s+/)
    .map(Number)
    .filter((pid) => pid > 0 && pid !== sshdPid);
}

/**
 * Resolve once nothing but their sshds runs on the fleet and on bastion (what the last sessions
 * ran takes a moment to go); throw naming what is left after `ms`.
 */
export async function fleetSettled(fleet: Fleet, ms = 5000): Promise<void> {
  const bastionSshd = Number(readFileSync(join(fleet.dir, "bastion", "sshd.pid"), "utf8").trim());
  const end = Date.now() + ms;
  for (;;) {
    const left = { fleet: await leftIn(fleet.namespace, fleet.sshdPid), bastion: await leftIn(NS.bastion, bastionSshd) };
    if (!left.fleet.length && !left.bastion.length) return;
    if (Date.now() > end) throw new Error(`processes left on the hosts after ${ms} ms: fleet ${left.fleet.join(" ")}; bastion ${left.bastion.join(" ")}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The pids of the processes right below `pid` (none once it has gone). */
export function childrenOf(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`))
      for (const c of readFileSync(`/proc/${pid}/task/${tid}/children`, "latin1").split(" ")) if (c.trim()) out.push(Number(c));
  } catch {
    // gone
  }
  return out;
}

/** As lab/hosts.ts's useTestHosts, with a fleet of `count` hosts: set up before the file's tests, torn down after them. */
export function useFleet(count: number, ready: (fleet: Fleet) => void): { skip: string | false } {
  const skip = hostsSkip() ?? false;
  before(
    async () => {
      if (skip) return;
      const result = await setupFleet(count);
      if ("skip" in result) throw new Error(`hostsSkip() said yes, setupFleet() said: ${result.skip}`);
      ready(result);
    },
    { timeout: 330_000 },
  );
  after(async () => {
    if (!skip) await teardownHosts();
  });
  return { skip };
}
