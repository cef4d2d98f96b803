/**
 * fakessh through the netns hosts of lab/hosts.ts: real rsync, scp and git
 * on the master, their remote halves in a context on `inner`, which only
 * `bastion` reaches, and in a root context (sudo) there.
 */
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import {
  closeSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  symlinkSync,
  unlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { type Context, fakessh, type Router } from "../mod.ts";
import { checkLeaks, leakedProcesses, quietRouter, standInPid, underDeno, waitFor } from "./helpers.ts";
import { DIST } from "./command-runner.ts";
import { hostTree, type TestHosts, useTestHosts } from "../lab/hosts.ts";

checkLeaks();

let hosts: TestHosts;
let scratch = "";
const { skip } = useTestHosts((ready) => {
  hosts = ready;
  scratch = mkdtempSync(join(tmpdir(), "mitogen-fakessh-hosts-"));
});
after(() => {
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

/** The host tree, and the test user's home on inner. */
async function tree(router: Router): Promise<{ inner: Context; root: Context; home: string }> {
  const { inner, root } = await hostTree(router, hosts);
  const home = (await inner.call(() => process.getBuiltinModule("node:os").homedir())) as string;
  return { inner, root, home };
}

/** Run `argv` through fakessh to `ctx`; its exit code and stdout. */
async function run(router: Router, ctx: Context, argv: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = join(scratch, `out.${process.hrtime.bigint()}`);
  const fds = [openSync(out, "w"), openSync(`${out}.err`, "w")] as const;
  try {
    const code = await fakessh.run(ctx, router, argv, { stdio: ["ignore", fds[0], fds[1]] });
    return { code, stdout: readFileSync(out, "utf8"), stderr: readFileSync(`${out}.err`, "utf8") };
  } finally {
    closeSync(fds[0]);
    closeSync(fds[1]);
  }
}

/** Every entry below `dir`: type, mode, and content hash or link target. */
function listing(dir: string, at = ""): string[] {
  const out: string[] = [];
  for (const name of readdirSync(join(dir, at)).sort()) {
    const rel = join(at, name);
    const st = lstatSync(join(dir, rel));
    const mode = (st.mode & 0o7777).toString(8);
    if (st.isSymbolicLink()) out.push(`${rel} -> ${readlinkSync(join(dir, rel))}`);
    else if (st.isDirectory()) out.push(`${rel}/ ${mode}`, ...listing(dir, rel));
    else
      out.push(
        `${rel} ${mode} ${createHash("sha256")
          .update(readFileSync(join(dir, rel)))
          .digest("hex")}`,
      );
  }
  return out;
}

function makeTree(src: string): void {
  mkdirSync(join(src, "a", "b", "c"), { recursive: true });
  writeFileSync(join(src, "a", "b", "c", "deep.txt"), "deep\n");
  writeFileSync(join(src, "a", "run.sh"), "#!/bin/sh\necho hi\n", { mode: 0o750 });
  writeFileSync(join(src, "private"), "secret\n", { mode: 0o600 });
  writeFileSync(join(src, "gone-soon"), "delete me\n");
  symlinkSync("a/b/c/deep.txt", join(src, "link"));
  // 100 MiB that does not compress
  const fd = openSync(join(src, "big.bin"), "w");
  for (let i = 0; i < 100; i++) writeFileSync(fd, randomBytes(1 << 20));
  closeSync(fd);
}

test("rsync a tree to inner (only bastion reaches it) and back; -c again sends nothing; --delete deletes", { skip }, async () => {
  await using router = quietRouter();
  const { inner, home } = await tree(router);
  const src = join(scratch, "src");
  makeTree(src);
  const remote = `fakessh-${process.pid}`;
  const dst = join(home, remote);
  try {
    const first = await run(router, inner, ["rsync", "-a", `${src}/`, `inner:${remote}/`]);
    assert.equal(first.code, 0, first.stderr);
    assert.deepEqual(listing(dst), listing(src));
    assert.equal(lstatSync(join(dst, "private")).uid, (await inner.call(() => process.getuid?.())) as number, "written by the test user");

    const again = await run(router, inner, ["rsync", "-a", "-c", "--stats", `${src}/`, `inner:${remote}/`]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /Number of regular files transferred: 0\b/);

    unlinkSync(join(src, "gone-soon"));
    const del = await run(router, inner, ["rsync", "-a", "--delete", `${src}/`, `inner:${remote}/`]);
    assert.equal(del.code, 0, del.stderr);
    assert.deepEqual(listing(dst), listing(src));

    const back = join(scratch, "back");
    const pulled = await run(router, inner, ["rsync", "-a", `inner:${remote}/`, `${back}/`]);
    assert.equal(pulled.code, 0, pulled.stderr);
    assert.deepEqual(listing(back), listing(src));
  } finally {
    rmSync(dst, { recursive: true, force: true });
  }
});

test("through sudo on inner, files arrive owned by root; through the test user, by the test user", { skip }, async () => {
  await using router = quietRouter();
  const { inner, root } = await tree(router);
  const src = join(scratch, "small");
  mkdirSync(join(src, "d"), { recursive: true });
  writeFileSync(join(src, "d", "f"), "x");
  const base = join(tmpdir(), `mitogen-fakessh-owner-${process.pid}`);
  try {
    for (const [ctx, uid] of [
      [root, 0],
      [inner, (await inner.call(() => process.getuid?.())) as number],
    ] as const) {
      const dst = `${base}-${uid}`;
      const r = await run(router, ctx, ["rsync", "-rlt", `${src}/`, `${ctx.name}:${dst}/`]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(lstatSync(join(dst, "d", "f")).uid, uid, `${ctx.name} owns what it wrote`);
    }
  } finally {
    for (const uid of ["0", String(await inner.call(() => process.getuid?.()))]) rmSync(`${base}-${uid}`, { recursive: true, force: true });
  }
});

test("scp both ways (sftp and -O), git clone and git push of a repository on inner", { skip }, async () => {
  await using router = quietRouter();
  const { inner, home } = await tree(router);
  const file = join(scratch, "scp-me");
  writeFileSync(file, "over two hops\n");
  const remote = `fakessh-scp-${process.pid}`;
  try {
    for (const legacy of [[], ["-O"]]) {
      const put = await run(router, inner, ["scp", ...legacy, "-q", file, `inner:${remote}`]);
      assert.equal(put.code, 0, put.stderr);
      assert.equal(readFileSync(join(home, remote), "utf8"), "over two hops\n");
      const back = join(scratch, `scp-back${legacy.length}`);
      const get = await run(router, inner, ["scp", ...legacy, "-q", `inner:${remote}`, back]);
      assert.equal(get.code, 0, get.stderr);
      assert.equal(readFileSync(back, "utf8"), "over two hops\n");
      rmSync(join(home, remote), { force: true });
    }

    // a repository held on inner, by the test user
    const repo = `fakessh-repo-${process.pid}.git`;
    await inner.call((r: string) => process.getBuiltinModule("node:child_process").execFileSync("git", ["init", "-q", "--bare", r]), repo);
    const work = join(scratch, "work");
    execFileSync("git", ["init", "-q", work]);
    const git = (...args: string[]) => execFileSync("git", ["-C", work, "-c", "user.email=t@example.com", "-c", "user.name=t", ...args]);
    writeFileSync(join(work, "README"), "one\n");
    git("add", "README");
    git("commit", "-q", "-m", "first");
    const push = await run(router, inner, ["git", "-C", work, "push", "-q", `inner:${repo}`, "HEAD:refs/heads/main"]);
    assert.equal(push.code, 0, push.stderr);
    const clone = join(scratch, "clone");
    const cloned = await run(router, inner, ["git", "clone", "-q", "-b", "main", `inner:${repo}`, clone]);
    assert.equal(cloned.code, 0, cloned.stderr);
    assert.equal(readFileSync(join(clone, "README"), "utf8"), "one\n");
    writeFileSync(join(work, "README"), "two\n");
    git("commit", "-q", "-am", "second");
    const again = await run(router, inner, ["git", "-C", work, "push", "-q", `inner:${repo}`, "HEAD:refs/heads/main"]);
    assert.equal(again.code, 0, again.stderr);
    const pull = await run(router, inner, ["git", "-C", clone, "pull", "-q", "--ff-only"]);
    assert.equal(pull.code, 0, pull.stderr);
    assert.equal(readFileSync(join(clone, "README"), "utf8"), "two\n");
    rmSync(join(home, repo), { recursive: true, force: true });
  } finally {
    rmSync(join(home, remote), { force: true });
  }
});

/** rsync's temp files of `name` in `dir` (`.name.XXXXXX`): a transfer under way, or one cut off. */
const partial = (dir: string, name: string) => (existsSync(dir) ? readdirSync(dir).filter((f) => f.startsWith(`.${name}.`)) : []);
const sleeping = () => leakedProcesses().some((p) => p.cmd.startsWith("sleep 60"));
test("a stand-in killed mid-rsync to inner, a master SIGKILLed mid-command on bastion: the remote side gets SIGTERM", { skip }, async () => {
  await using router = quietRouter();
  const { inner, home } = await tree(router);
  const src = join(scratch, "slow.bin");
  writeFileSync(src, randomBytes(8 * 1024 * 1024));
  const remote = `fakessh-killed-${process.pid}`;
  const dst = join(home, remote);
  try {
    const running = run(router, inner, ["rsync", "--bwlimit=128", src, `inner:${remote}/`]);
    await waitFor(() => partial(dst, "slow.bin").some((f) => lstatSync(join(dst, f)).size > 0), 60_000, "the partial file on inner");
    const standIn = standInPid("rsync --server");
    assert.ok(standIn, "the stand-in runs");
    process.kill(standIn, "SIGKILL");
    assert.notEqual((await running).code, 0);
    // SIGKILL would leave the partial file; SIGTERM lets rsync remove it.
    await waitFor(() => partial(dst, "slow.bin").length === 0, 10_000, "inner's rsync to remove its partial file");
  } finally {
    rmSync(dst, { recursive: true, force: true });
  }

  // The same with a command that ignores its input's end: only the signal stops it, and it notes SIGTERM.
  const marker = join(tmpdir(), `mitogen-fakessh-marker-${process.pid}`);
  rmSync(marker, { force: true });
  const command = `exec >/dev/null 2>&1 </dev/null; trap 'echo TERM >> ${marker}; exit 1' TERM; sleep 60 & while :; do sleep 1; done`;
  try {
    const running = run(router, inner, ["ssh", "h", command]);
    await waitFor(sleeping, 30_000, "the command on inner to start");
    const standIn = standInPid("trap");
    assert.ok(standIn, "the stand-in runs");
    process.kill(standIn, "SIGKILL");
    assert.notEqual((await running).code, 0);
    await waitFor(() => existsSync(marker), 10_000, "the command's TERM trap on inner");
    await waitFor(() => !sleeping(), 5000, "the command on inner to end");
  } finally {
    rmSync(marker, { force: true });
  }

  // A master SIGKILLed: ssh ends, the context on bastion loses its parent, and its command's group gets SIGTERM.
  const script = `const { Router, fakessh } = await import(${JSON.stringify(DIST)});
    const router = new Router({ log: () => {} });
    const bastion = await router.ssh({ hostname: "bastion", sshArgs: ["-F", ${JSON.stringify(hosts.sshConfigFile)}] });
    await fakessh.run(bastion, router, ["ssh", "h", ${JSON.stringify(command)}], { stdio: "ignore" });`;
  const master = underDeno
    ? spawn(process.execPath, ["eval", "--quiet", script], { stdio: "ignore" })
    : spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: "ignore" });
  const exited = new Promise((resolve) => master.once("exit", resolve));
  try {
    await waitFor(sleeping, 60_000, "the command on bastion to start");
  } finally {
    master.kill("SIGKILL");
  }
  await exited;
  try {
    await waitFor(() => existsSync(marker), 10_000, "the command's TERM trap");
    await waitFor(() => !sleeping(), 5000, "the command on bastion to end");
  } finally {
    rmSync(marker, { force: true });
  }
});
