/**
 * fakessh against local contexts: real rsync, scp and git whose ssh is the
 * stand-in (dist/mitogen.mjs started as `ssh`), exit codes and stderr of
 * the remote side, the stand-in's key check, cancellation, and the private
 * directory. The same programs through the netns hosts are in
 * fakessh-hosts.test.ts.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { fakessh, Router } from "../mod.ts";
import { parseSshArgs } from "../fakessh.ts";
import { captureLogs, checkLeaks, leakedProcesses, underDeno, waitFor } from "./helpers.ts";
import { findProgram } from "./hosts.ts";

checkLeaks();

const scratch = mkdtempSync(join(tmpdir(), "mitogen-fakessh-test-"));
after(() => rmSync(scratch, { recursive: true, force: true }));

const missing = ["rsync", "scp", "git"].filter((p) => !findProgram(p));
const skip = missing.length ? `needs ${missing.join(", ")} (Debian packages rsync, openssh-client, git)` : false;
if (skip && process.env.CI === "true") throw new Error(`CI must have these: ${skip}`);

/** Run `argv` through fakessh to a fresh local context; its stdout and stderr as text. */
async function runCaptured(argv: string[], options: { runtime?: string; signal?: AbortSignal } = {}) {
  const logs = captureLogs();
  await using router = new Router({ log: logs.log });
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
  const r = await runCaptured(["sh", "-c", `ssh h sha256sum < ${input}; ssh h 'head -c 5000000 /dev/zero' | wc -c`]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, `${want}  -\n5000000\n`);
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
  const logs = captureLogs();
  await using router = new Router({ log: logs.log });
  const ctx = await router.local({ name: "doomed" });
  await ctx.shutdown({ wait: true });
  const code = await fakessh.run(ctx, router, ["sh", "-c", "ssh h true 2>/dev/null; exit $?"], { stdio: "ignore" });
  assert.equal(code, 255);
});

test("dest may be a function of the host name: scp -3 copies between two contexts", { skip }, async () => {
  const logs = captureLogs();
  await using router = new Router({ log: logs.log });
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
  const logs = captureLogs();
  await using router = new Router({ log: logs.log });
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
  const logs = captureLogs();
  await using router = new Router({ log: logs.log });
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
