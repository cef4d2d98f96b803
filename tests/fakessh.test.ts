/**
 * fakessh against local contexts: real rsync, scp and git whose ssh is the
 * stand-in (dist/mitogen.mjs started as `ssh`), exit codes and stderr of
 * the remote side, the stand-in's key check, cancellation, and the private
 * directory. The same programs through the netns hosts are in
 * fakessh-hosts.test.ts.
 */
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { type Context, fakessh, Receiver, Router } from "../mod.ts";
import { parseSshArgs } from "../fakessh-standin.ts";
import { alive, checkLeaks, leakedProcesses, quietRouter, routerWithLogs, RUNTIMES, standInPid, underDeno, waitFor } from "./helpers.ts";
import { DIST } from "./command-runner.ts";
import { findProgram } from "../lab/hosts.ts";

checkLeaks();

const scratch = mkdtempSync(join(tmpdir(), "mitogen-fakessh-test-"));
after(() => rmSync(scratch, { recursive: true, force: true }));

const missing = ["rsync", "scp", "git"].filter((p) => !findProgram(p));
const skip = missing.length ? `needs ${missing.join(", ")} (Debian packages rsync, openssh-client, git)` : false;
if (skip && process.env.CI === "true") throw new Error(`CI must have these: ${skip}`);

/** Run `argv` through fakessh to a fresh local context; its stdout and stderr as text. */
async function runCaptured(argv: string[], options: { runtime?: string; signal?: AbortSignal } = {}) {
  await using fixture = routerWithLogs();
  const { router, logs } = fixture;
  const ctx = await router.local({ name: "dest", ...(options.runtime ? { runtime: options.runtime } : {}) });
  const out = join(scratch, `out.${process.hrtime.bigint()}`);
  const err = `${out}.err`;
  const fds = [openSync(out, "w"), openSync(err, "w")] as const;
  try {
    const code = await fakessh.run(ctx, router, argv, { stdio: ["ignore", fds[0], fds[1]], ...(options.signal ? { signal: options.signal } : {}) });
    return { code, stdout: readFileSync(out, "utf8"), stderr: readFileSync(err, "utf8"), logs };
  } finally {
    closeSync(fds[0]);
    closeSync(fds[1]);
  }
}

const sha = (path: string) => createHash("sha256").update(readFileSync(path)).digest("hex");

test("ssh's command line: options with and without values, user@host, ssh:// URLs, SendEnv", () => {
  const r = parseSshArgs(["-x", "-oPermitLocalCommand=no", "-l", "bob", "-p2222", "-o", "SendEnv=GIT_*", "--", "web1", "git-upload-pack", "'/srv/x'"], {
    GIT_PROTOCOL: "version=2",
    HOME: "/root",
  });
  assert.deepEqual(r, { host: "web1", user: "bob", port: 2222, command: "git-upload-pack '/srv/x'", env: { GIT_PROTOCOL: "version=2" }, noStdin: false });
  assert.deepEqual(parseSshArgs(["-n", "ssh://amy@db:2200", "true"]), { host: "db", user: "amy", port: 2200, command: "true", env: {}, noStdin: true });
  assert.equal(parseSshArgs(["alice@web2", "rsync", "--server", "."]).user, "alice");
  assert.match(parseSshArgs(["-s", "web1", "sftp"]).command, /sftp-server/);
  assert.throws(() => parseSshArgs(["-L", "80:x:80", "web1", "true"]), /-L is not supported/);
  assert.throws(() => parseSshArgs(["web1"]), /without a remote command/);
  assert.throws(() => parseSshArgs(["-p"]), /-p needs a value/);
});

test("the remote command's exit code, stdout and stderr come back through the stand-in", async () => {
  for (const runtime of ["node", "deno"]) {
    const r = await runCaptured(["ssh", "anyhost", "echo out; echo err >&2; exit 7"], { runtime });
    assert.deepEqual([r.code, r.stdout, r.stderr], [7, "out\n", "err\n"], runtime);
  }
});

test("stdin reaches the remote command, large and in order, and its output comes back whole", async () => {
  const input = join(scratch, "input");
  writeFileSync(input, Buffer.alloc(8 * 1024 * 1024, "abcdefgh"));
  const want = sha(input);
  // The second: a reader that starts late, so the stand-in's last write (after the pipe was filled) is still queued
  // in it when the command's exit status comes; exiting then would drop it.
  const r = await runCaptured([
    "sh",
    "-c",
    `ssh h sha256sum < ${input}; ssh h 'head -c 5000000 /dev/zero' | wc -c; ssh h 'head -c 65536 /dev/zero; sleep 0.3; head -c 1000 /dev/zero' | (sleep 1; wc -c)`,
  ]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, `${want}  -\n5000000\n66536\n`);
});

test("rsync, scp (sftp and -O) and git to a local context", { skip }, async () => {
  const src = join(scratch, "src");
  const dst = join(scratch, "dst");
  mkdirSync(join(src, "a", "b"), { recursive: true });
  writeFileSync(join(src, "a", "b", "f"), "hello");
  writeFileSync(join(src, "x.sh"), "#!/bin/sh\n", { mode: 0o751 });
  writeFileSync(join(src, "big"), randomBytes(24 * 1024 * 1024));
  const rsync = await runCaptured(["rsync", "-a", `${src}/`, `host:${dst}/`]);
  assert.equal(rsync.code, 0, rsync.stderr);
  assert.equal(readFileSync(join(dst, "a", "b", "f"), "utf8"), "hello");
  assert.equal(statSync(join(dst, "x.sh")).mode & 0o777, 0o751);
  assert.equal(sha(join(dst, "big")), sha(join(src, "big")));
  // and back: the stand-in's stdout carries the bulk (rsync hands its ssh a socketpair)
  const pulled = await runCaptured(["rsync", "-a", `host:${dst}/big`, join(scratch, "big-back")]);
  assert.equal(pulled.code, 0, pulled.stderr);
  assert.equal(sha(join(scratch, "big-back")), sha(join(src, "big")));

  for (const legacy of [[], ["-O"]]) {
    const back = join(scratch, `back${legacy.length}`);
    const scp = await runCaptured(["scp", ...legacy, "-q", `host:${dst}/a/b/f`, back]);
    assert.equal(scp.code, 0, scp.stderr);
    assert.equal(readFileSync(back, "utf8"), "hello");
  }

  const bare = join(scratch, "repo.git");
  const work = join(scratch, "work");
  execFileSync("git", ["init", "-q", "--bare", bare]);
  execFileSync("git", ["init", "-q", work]);
  execFileSync("git", ["-C", work, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "first"]);
  const push = await runCaptured(["git", "-C", work, "push", "-q", `host:${bare}`, "HEAD:refs/heads/main"]);
  assert.equal(push.code, 0, push.stderr);
  const clone = await runCaptured(["git", "clone", "-q", "-b", "main", `host:${bare}`, join(scratch, "clone")]);
  assert.equal(clone.code, 0, clone.stderr);
  assert.match(execFileSync("git", ["-C", join(scratch, "clone"), "log", "--format=%s"]).toString(), /^first$/m);
});

test("a stand-in without the run's key is refused and logged; the private directory is 0700 and removed afterwards", async () => {
  const seen = join(scratch, "seen");
  const r = await runCaptured([
    "sh",
    "-c",
    `stat -c %a "$(dirname "$MITOGEN_FAKESSH")" > ${seen}; dirname "$MITOGEN_FAKESSH" >> ${seen}; MITOGEN_FAKESSH_KEY=$(head -c 32 /dev/urandom | base64) ssh h echo hi; echo "code=$?"`,
  ]);
  assert.equal(r.code, 0);
  assert.equal(r.stdout, "code=255\n");
  assert.ok(r.logs.lines().some((l) => /did not prove the run's key/.test(l)));
  const [mode, dir] = readFileSync(seen, "utf8").trim().split("\n");
  assert.equal(mode, "700");
  assert.ok(dir && !existsSync(dir), `${dir} removed`);
});

test("an unknown command fails on the remote side with its shell's status; a dead destination gives 255", async () => {
  const r = await runCaptured(["ssh", "h", "no-such-command-here"]);
  assert.equal(r.code, 127);
  assert.match(r.stderr, /not found/);
  await using router = quietRouter();
  const ctx = await router.local({ name: "doomed" });
  await ctx.shutdown({ wait: true });
  const code = await fakessh.run(ctx, router, ["sh", "-c", "ssh h true 2>/dev/null; exit $?"], { stdio: "ignore" });
  assert.equal(code, 255);
});

test("dest may be a function of the host name: scp -3 copies between two contexts", { skip }, async () => {
  await using router = quietRouter();
  const web1 = await router.local({ name: "web1" });
  const web2 = await router.local({ name: "web2", runtime: "deno" });
  const asked: string[] = [];
  const from = join(scratch, "from-web1");
  const to = join(scratch, "to-web2");
  writeFileSync(from, "across");
  const code = await fakessh.run(
    (host) => {
      asked.push(host);
      return host === "web1" ? web1 : web2;
    },
    router,
    ["scp", "-3", "-q", `web1:${from}`, `web2:${to}`],
    { stdio: "ignore" },
  );
  assert.equal(code, 0);
  assert.deepEqual([...new Set(asked)].sort(), ["web1", "web2"]);
  assert.equal(readFileSync(to, "utf8"), "across");
});

/** Is a `sleep 60` running on this machine under this test file's token? */
const sleeping = () => leakedProcesses().some((p) => p.cmd.startsWith("sleep 60"));

test("cancelling ends the program and the remote command at once", async () => {
  await using router = quietRouter();
  const ctx = await router.local({ name: "dest" });
  const abort = new AbortController();
  const t0 = Date.now();
  const running = fakessh.run(ctx, router, ["ssh", "h", "sleep 60"], { signal: abort.signal, stdio: "ignore" });
  await waitFor(sleeping, 10_000, "the remote sleep to start");
  abort.abort(new Error("stop now"));
  await assert.rejects(running, /stop now/);
  assert.ok(Date.now() - t0 < 20_000);
  await waitFor(() => !sleeping(), 5000, "the remote sleep to end");
});

test("a Deno master's stand-in runs on deno: no node needed on PATH", {
  skip: underDeno ? false : "under a Node master the stand-in runs on that node",
}, async () => {
  const bin = mkdtempSync(join(scratch, "bin-"));
  symlinkSync("/bin/sh", join(bin, "sh"));
  await using router = quietRouter();
  const ctx = await router.local({ name: "dest" });
  const out = join(scratch, "deno-standin.out");
  const fd = openSync(out, "w");
  try {
    const code = await fakessh.run(ctx, router, ["sh", "-c", "ssh h 'echo out; exit 7'"], { env: { PATH: bin }, stdio: ["ignore", fd, "inherit"] });
    assert.equal(code, 7);
  } finally {
    closeSync(fd);
  }
  assert.equal(readFileSync(out, "utf8"), "out\n");
});

test("-o SendEnv=* and SetEnv hand neither the run's key nor its socket path to the remote command", async () => {
  const r = await runCaptured([
    "sh",
    "-c",
    `SEEN=yes ssh -o 'SendEnv=*' -o "SetEnv=LEAK=$MITOGEN_FAKESSH_KEY MITOGEN_FAKESSH_KEY=x MITOGEN_FAKESSH=y OK=1" h env; echo "key=$MITOGEN_FAKESSH_KEY"; echo "socket=$MITOGEN_FAKESSH"`,
  ]);
  assert.equal(r.code, 0, r.stderr);
  const lines = r.stdout.trim().split("\n");
  const key = lines.find((l) => l.startsWith("key="))?.slice(4);
  const socket = lines.find((l) => l.startsWith("socket="))?.slice(7);
  assert.ok(key && socket, r.stdout);
  const remote = lines.filter((l) => !l.startsWith("key=") && !l.startsWith("socket="));
  const leaks = remote.filter((l) => l.startsWith("MITOGEN_FAKESSH") || l.includes(key) || l.includes(socket) || l.includes(join(socket, "..")));
  assert.deepEqual(leaks, []);
  assert.ok(remote.includes("SEEN=yes"), "SendEnv forwards the program's other variables");
  assert.ok(remote.includes("OK=1"), "SetEnv sets variables");
});

/**
 * A command that notes SIGTERM in `marker` and runs until stopped, with a `sleep 60` in its group.
 * Its output goes nowhere: once its context is gone, sh's "Terminated" to the dead pipe is a SIGPIPE.
 */
const stubborn = (marker: string) => `exec >/dev/null 2>&1; trap 'echo TERM >> ${marker}; exit 1' TERM; sleep 60 & while :; do sleep 1; done`;

/** The remote half of the rsync temp file of `name` in `dir`, if it is there (`.name.XXXXXX`). */
const partial = (dir: string, name: string) => readdirSync(dir).filter((f) => f.startsWith(`.${name}.`));

/** A file rsync takes a minute to send with --bwlimit=128 (KiB/s). */
function slowFile(): string {
  const src = join(scratch, "slow.bin");
  if (!existsSync(src)) writeFileSync(src, randomBytes(8 * 1024 * 1024));
  return src;
}

test("a stand-in killed mid-transfer: the remote command gets SIGTERM, so rsync removes its partial file", { skip }, async () => {
  const src = slowFile();
  const dst = mkdtempSync(join(scratch, "killed-standin-"));
  const running = runCaptured(["rsync", "--bwlimit=128", src, `h:${dst}/`]);
  await waitFor(() => partial(dst, "slow.bin").some((f) => statSync(join(dst, f)).size > 0), 30_000, "the partial file on the remote side");
  const standIn = standInPid("rsync --server");
  assert.ok(standIn, "the stand-in runs");
  process.kill(standIn, "SIGKILL");
  const r = await running;
  assert.notEqual(r.code, 0);
  // SIGKILL would leave the partial file; SIGTERM lets rsync remove it.
  await waitFor(() => partial(dst, "slow.bin").length === 0, 10_000, "the remote rsync to remove its partial file");
  assert.deepEqual(readdirSync(dst), []);

  // The same with a command that ignores its input's end: only the signal stops it, and it notes SIGTERM.
  const marker = join(scratch, "standin-killed");
  const again = runCaptured(["ssh", "h", `exec </dev/null; ${stubborn(marker)}`]);
  await waitFor(sleeping, 10_000, "the remote command to start");
  const second = standInPid("trap");
  assert.ok(second, "the stand-in runs");
  process.kill(second, "SIGKILL");
  assert.notEqual((await again).code, 0);
  await waitFor(() => existsSync(marker), 5000, "the remote command's TERM trap");
  await waitFor(() => !sleeping(), 5000, "the remote command to end");
});

test("a SIGKILLed master: its remote command gets SIGTERM, and the next run removes the master's private directory", async () => {
  const marker = join(scratch, "master-killed");
  const script = `const { Router, fakessh } = await import(${JSON.stringify(DIST)});
    const router = new Router({ log: () => {} });
    const ctx = await router.local({ name: "dest" });
    await fakessh.run(ctx, router, ["ssh", "h", ${JSON.stringify(stubborn(marker))}], { stdio: "ignore" });`;
  const master = underDeno
    ? spawn(process.execPath, ["eval", "--quiet", script], { stdio: "ignore" })
    : spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: "ignore" });
  const exited = new Promise((resolve) => master.once("exit", resolve));
  try {
    await waitFor(sleeping, 30_000, "the remote command to start");
  } finally {
    master.kill("SIGKILL");
  }
  await exited;
  await waitFor(() => existsSync(marker), 5000, "the remote command's TERM trap");
  await waitFor(() => !sleeping(), 5000, "the remote command to end");
  const mine = () => readdirSync(tmpdir()).filter((d) => d.startsWith(`mitogen-fakessh-${master.pid}-`));
  assert.equal(mine().length, 1, "the killed master left its directory");

  // Only directories of that naming whose process is gone are removed: not a live one's, not through a symlink.
  const live = mkdtempSync(join(tmpdir(), `mitogen-fakessh-${process.pid}-`));
  const target = mkdtempSync(join(scratch, "target-"));
  writeFileSync(join(target, "keep"), "x");
  const link = join(tmpdir(), "mitogen-fakessh-4194305-linked");
  rmSync(link, { force: true });
  symlinkSync(target, link);
  try {
    const r = await runCaptured(["true"]);
    assert.equal(r.code, 0);
    assert.deepEqual(mine(), []);
    assert.ok(existsSync(live), "a live process's directory is kept");
    assert.equal(readFileSync(join(target, "keep"), "utf8"), "x");
  } finally {
    rmSync(live, { recursive: true, force: true });
    rmSync(link, { force: true });
  }
});

/** Start `command` in `ctx` through mitogen:tunnel; resolves once it runs. */
async function tunnelExec(router: Router, ctx: Context, command: string, timeout?: number): Promise<{ call: Promise<unknown> }> {
  const ctl = new Receiver(router, { respondent: ctx });
  const out = new Receiver(router, { respondent: ctx });
  const err = new Receiver(router, { respondent: ctx });
  const spec = { command, ctl: ctl.toSender(), stdout: out.toSender(), stderr: err.toSender() };
  const call = (timeout === undefined ? ctx : ctx.with({ timeout })).callModule("mitogen:tunnel", "exec", spec);
  call.catch(() => {});
  await Promise.race([ctl.getData(), call]);
  const ended = call.finally(() => {
    ctl.close();
    out.close();
    err.close();
  });
  ended.catch(() => {}); // a caller may not wait for it
  return { call: ended };
}

for (const runtime of RUNTIMES) {
  test(`${runtime}: shutdown, a lost parent and a deadline each end a tunnelled command's process group (SIGTERM first)`, async () => {
    const dir = mkdtempSync(join(scratch, `stop-${runtime}-`));
    await using fixture = routerWithLogs();
    const { router, logs } = fixture;

    // router.shutdown() while the command runs
    const a = await router.local({ name: "a", runtime });
    await tunnelExec(router, a, stubborn(join(dir, "shutdown")));
    await waitFor(sleeping, 10_000, "the command to start");
    await router.shutdown();
    await waitFor(() => !sleeping(), 5000, "the command to end after shutdown");
    await waitFor(() => existsSync(join(dir, "shutdown")), 5000, "the command's TERM trap");
    assert.equal(readFileSync(join(dir, "shutdown"), "utf8"), "TERM\n");

    // the context's parent link gone: its parent SIGKILLed
    await using router2 = new Router({ log: logs.log });
    const parent = await router2.local({ name: "parent", runtime });
    const child = await router2.local({ name: "child", runtime, via: parent });
    await tunnelExec(router2, child, stubborn(join(dir, "parent")));
    await waitFor(sleeping, 10_000, "the command to start");
    const pid = (await parent.call(() => process.pid)) as number;
    process.kill(pid, "SIGKILL");
    await waitFor(() => !alive(pid), 5000, "the parent to die");
    await waitFor(() => !sleeping(), 5000, "the command to end after its context's parent died");
    await waitFor(() => existsSync(join(dir, "parent")), 5000, "the command's TERM trap");
    assert.equal(readFileSync(join(dir, "parent"), "utf8"), "TERM\n");

    // the call's deadline
    const b = await router2.local({ name: "b", runtime });
    const { call } = await tunnelExec(router2, b, stubborn(join(dir, "deadline")), 1500);
    await assert.rejects(call, /1500 ms/);
    await waitFor(() => !sleeping(), 5000, "the command to end at its deadline");
    await waitFor(() => existsSync(join(dir, "deadline")), 5000, "the command's TERM trap");
    assert.equal(readFileSync(join(dir, "deadline"), "utf8"), "TERM\n");
  });
}
