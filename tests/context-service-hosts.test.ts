/**
 * The context service across processes and hosts (issue 23's acceptance): two separate processes
 * attached to one master's listener ask it for the same ssh contexts (bastion, and inner via
 * bastion, on the netns hosts of lab/hosts.ts) at the same time; both get the same contexts, and
 * the master's tree runs one ssh client per host, counted as processes.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import type { ContextSpec } from "../mod.ts";
import { checkLeaks, quietRouter, TOKEN, underDeno } from "./helpers.ts";
import { findProgram, type TestHosts, useTestHosts } from "../lab/hosts.ts";

checkLeaks();

let hosts: TestHosts;
const { skip } = useTestHosts((ready) => {
  hosts = ready;
});

/** The deno binary by absolute path: it is not on the test user's PATH on the hosts. */
function denoPath(): string {
  const found = (globalThis as { Deno?: { execPath(): string } }).Deno?.execPath() ?? findProgram("deno");
  if (!found) throw new Error("deno not found");
  return realpathSync(found);
}

/** What the fixture got for one spec. */
interface Got {
  contextId: number;
  pid: number;
  parent: number;
}

/** Run tests/fixtures/context-service.ts as a process of its own (this test's runtime); `got` is what it printed. */
function attached(path: string, specs: ContextSpec[]): { got: Promise<Got[]>; end: () => Promise<number | null> } {
  const script = fileURLToPath(new URL("./fixtures/context-service.ts", import.meta.url));
  const arg = JSON.stringify({ path, specs });
  const proc = spawn(process.execPath, underDeno ? ["run", "-A", script, arg] : ["--import", "tsx", script, arg], { stdio: ["pipe", "pipe", "inherit"] });
  const exited = new Promise<number | null>((resolve) => proc.once("exit", (code) => resolve(code)));
  const got = new Promise<Got[]>((resolve, reject) => {
    let out = "";
    proc.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes("\n")) resolve(JSON.parse(out) as Got[]);
    });
    void exited.then((code) => reject(new Error(`context service fixture exited with ${code}: ${out}`)));
  });
  return {
    got,
    end: () => {
      proc.stdin.end();
      return exited;
    },
  };
}

/** Every process: pid, parent pid, command name, and whether it carries this file's leak-check token. */
function processes(): { pid: number; ppid: number; comm: string; ours: boolean }[] {
  const out: { pid: number; ppid: number; comm: string; ours: boolean }[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "latin1");
      const close = stat.lastIndexOf(")");
      const [state, ppid] = stat.slice(close + 2).split(" ");
      if (state === "Z") continue;
      const ours = readFileSync(`/proc/${entry}/environ`, "latin1").split("\0").includes(TOKEN);
      out.push({ pid: Number(entry), ppid: Number(ppid), comm: stat.slice(stat.indexOf("(") + 1, close), ours });
    } catch {
      // exited while we looked
    }
  }
  return out;
}

/** The ssh clients below this process (its descendants), and those anywhere carrying its token (on the hosts too). */
function sshClients(): { below: number; ours: number } {
  const all = processes();
  const below = new Set([process.pid]);
  for (let grew = true; grew; ) {
    grew = false;
    for (const p of all)
      if (below.has(p.ppid) && !below.has(p.pid)) {
        below.add(p.pid);
        grew = true;
      }
  }
  const ssh = all.filter((p) => p.comm === "ssh");
  return { below: ssh.filter((p) => below.has(p.pid)).length, ours: ssh.filter((p) => p.ours).length };
}

for (const runtime of ["node", "deno"] as const) {
  test(`two attached processes share one ssh connection per host (${runtime} children): bastion, and inner via bastion`, { skip }, async () => {
    const dir = mkdtempSync(join(tmpdir(), "mitogen-ctxsvc-hosts-"));
    try {
      // The master's ssh client, wrapped to count its starts (a line each).
      const starts = join(dir, "starts");
      const sshPath = join(dir, "ssh-counted");
      writeFileSync(sshPath, `#!/bin/sh\necho $$ >> '${starts}'\nexec ssh "$@"\n`, { mode: 0o755 });
      const onHost = runtime === "node" ? "node" : denoPath();
      const bastion: ContextSpec = {
        method: "ssh",
        options: { hostname: "bastion", sshArgs: ["-F", hosts.sshConfigFile], sshPath, name: "bastion", runtime: onHost },
      };
      const inner: ContextSpec = {
        method: "ssh",
        options: { hostname: hosts.inner.address, via: bastion, sshArgs: ["-o", "SendEnv=MITOGEN_TEST_TOKEN"], name: "inner", runtime: onHost },
      };
      await using router = quietRouter();
      await using listener = await router.listen({ path: join(dir, "s.sock") });
      // Both processes at once: whichever asks second waits for the start the first began.
      const one = attached(listener.path as string, [bastion, inner]);
      const two = attached(listener.path as string, [bastion, inner]);
      let codes: (number | null)[] = [];
      try {
        const [a, b] = await Promise.all([one.got, two.got]);
        assert.deepEqual(a, b, "the same contexts, the same processes");
        const [onBastion, onInner] = a as [Got, Got];
        assert.equal(onInner.parent, onBastion.contextId, "inner was started via bastion");
        assert.notEqual(onBastion.pid, onInner.pid);
        // One ssh client per host: bastion's below this process, inner's on bastion.
        assert.deepEqual(sshClients(), { below: 1, ours: 2 }, "ssh clients running");
        assert.equal(readFileSync(starts, "utf8").trim().split("\n").length, 1, "the master started ssh once");
        assert.deepEqual(
          (await router.contexts())
            .filter((c) => c.method === "ssh")
            .map((c) => c.name)
            .sort(),
          ["bastion", "inner"],
        );
      } finally {
        codes = await Promise.all([one.end(), two.end()]);
      }
      assert.deepEqual(codes, [0, 0], "the fixtures ended cleanly");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}
