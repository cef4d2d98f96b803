/**
 * `mitogen run` on a fleet (lab/fleet.ts: one sshd answering on many
 * addresses): every host answers, each context goes once its host has
 * answered (never more ssh clients than --forks), with --via bastion the
 * bastion opens every connection, and nothing is left on the hosts.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { childrenOf, type Fleet, fleetSettled, useFleet } from "../lab/fleet.ts";
import { DIST, NODE } from "./command-runner.ts";
import { checkLeaks } from "./helpers.ts";

checkLeaks();

const HOSTS = 24;
const FORKS = 12;
let fleet: Fleet;
let list = "";
const { skip } = useFleet(HOSTS, (ready) => {
  fleet = ready;
  const dir = mkdtempSync(join(tmpdir(), "mitogen-fleet-test-"));
  list = join(dir, "hosts");
  writeFileSync(list, `${fleet.addresses.join("\n")}\n`);
});
after(() => {
  if (list) rmSync(join(list, ".."), { recursive: true, force: true });
});

/** Run the CLI, counting its ssh clients every 10 ms; its exit code, stdout and the most ssh clients it had at once. */
function runCounting(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string; most: number }> {
  return new Promise((resolve, reject) => {
    const proc = spawn(NODE, [DIST, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    let most = 0;
    const count = () => {
      if (!proc.pid) return;
      const ssh = childrenOf(proc.pid).filter((c) => {
        try {
          return readFileSync(`/proc/${c}/comm`, "latin1").trim() === "ssh";
        } catch {
          return false;
        }
      });
      most = Math.max(most, ssh.length);
    };
    const sampler = setInterval(count, 10);
    const limit = setTimeout(() => proc.kill("SIGKILL"), 120_000);
    proc.stdout.setEncoding("utf8").on("data", (s: string) => (stdout += s));
    proc.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s));
    proc.once("error", reject);
    proc.once("close", (code) => {
      clearInterval(sampler);
      clearTimeout(limit);
      resolve({ code, stdout, stderr, most });
    });
  });
}

/** Each host's record, by host. */
const byHost = (stdout: string) =>
  new Map(
    stdout
      .trim()
      .split("\n")
      .map((l) => [(JSON.parse(l) as { host: string }).host, JSON.parse(l) as Record<string, unknown>]),
  );

// Each command outlives a few samples, so --forks hosts overlap.
const COMMAND = 'echo "$SSH_CONNECTION"; sleep 0.3';

test(`run on ${HOSTS} hosts, ${FORKS} at a time: every host answers, never more than ${FORKS} ssh clients, nothing left`, { skip }, async () => {
  const r = await runCounting(["run", `@${list}`, "--forks", String(FORKS), "--json", "-F", fleet.sshConfigFile, "--", COMMAND]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.equal(r.stderr, "", "nothing on stderr (no warning)");
  const got = byHost(r.stdout);
  for (const address of fleet.addresses) {
    // SSH_CONNECTION: client address and port, server address and port: the host's own address
    assert.equal(String(got.get(address)?.stdout).split(" ")[2], address, `${address} answered itself`);
  }
  assert.ok(r.most >= 2, `hosts ran at the same time (${r.most} ssh clients at most)`);
  assert.ok(r.most <= FORKS, `a host's context (its ssh client) goes once it has answered: ${r.most} at once, --forks ${FORKS}`);
  await fleetSettled(fleet);
});

test(`run --via bastion on ${HOSTS} hosts: the bastion opens every connection, one ssh client here`, { skip }, async () => {
  const r = await runCounting(["run", `@${list}`, "--via", "bastion", "--forks", String(FORKS), "--json", "-F", fleet.sshConfigFile, "--", COMMAND]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const got = byHost(r.stdout);
  for (const address of fleet.addresses) {
    const [client, , server] = String(got.get(address)?.stdout).split(" ");
    assert.equal(server, address, `${address} answered itself`);
    assert.equal(client, fleet.fromBastion, `${address} was reached from bastion's link to the fleet`);
  }
  assert.equal(r.most, 1, "the master runs one ssh client: bastion's");
  await fleetSettled(fleet);
});
