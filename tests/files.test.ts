/**
 * Files: putFile, getFile and fan-out between the master and local contexts (Node and Deno): 1 GiB
 * with its memory bound, cancellation, each error case, mode and mtime, progress, and the bytes per
 * link of a fan-out. The same through ssh hops and sudo is in tests/files-hosts.test.ts.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, describe, test } from "node:test";
import { AbortError, type CallContext, type FileProgress, FileTransferError, takesRouter } from "../mod.ts";
import { checkLeaks, makeFile, quietRouter, RUNTIMES, sha256Of, sparseFile, tempFilesIn, underDeno, waitFor } from "./helpers.ts";
import { INSTALL_HINT, matrix } from "../lab/matrix.ts";

checkLeaks();

const MiB = 1024 * 1024;
const run = promisify(execFile);
const isRoot = process.getuid?.() === 0;

let dir = "";
before(() => {
  dir = mkdtempSync(join(tmpdir(), "mitogen-files-"));
  chmodSync(dir, 0o755);
});
after(() => rmSync(dir, { recursive: true, force: true }));

/** A fresh directory under the test directory. */
let n = 0;
function sub(name: string): string {
  const d = join(dir, `${name}-${n++}`);
  mkdirSync(d);
  return d;
}

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("1 GiB put and got back, sha256 checked; master and child each stay under 200 MiB RSS", async () => {
      // In a master of its own, as a user's script runs it: not in the test runner, whose own
      // bookkeeping would be measured too.
      const where = sub("big");
      const script = fileURLToPath(new URL("./fixtures/files-master.ts", import.meta.url));
      const args = underDeno ? ["run", "-A", script, runtime, where] : ["--import", "tsx", script, runtime, where];
      try {
        const { stdout } = await run(process.execPath, args, { timeout: 300_000 });
        const got = JSON.parse(stdout.trim().split("\n").at(-1) ?? "{}") as { intact: boolean; bytes: number[]; master: number; child: number };
        assert.equal(got.intact, true, `both copies intact: ${stdout.trim()}`);
        assert.deepEqual(got.bytes, [1024 * MiB, 1024 * MiB]);
        assert.ok(got.master < 200, `master peak RSS ${got.master.toFixed(0)} MiB (bound 200): ${stdout.trim()}`);
        assert.ok(got.child < 200, `child peak RSS ${got.child.toFixed(0)} MiB (bound 200): ${stdout.trim()}`);
        assert.deepEqual(tempFilesIn(where), []);
      } finally {
        rmSync(where, { recursive: true, force: true });
      }
    });

    test("mode and preserveTimes, both ways; the default mode is the source's", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      const d = sub("mode");
      const src = makeFile(join(d, "src"), 3 * MiB + 17);
      chmodSync(src, 0o751);
      utimesSync(src, 1_000_000_000, 1_234_567_890);
      const plain = await ctx.putFile(src, join(d, "plain"));
      assert.equal(plain.bytes, 3 * MiB + 17);
      assert.equal(plain.sha256, sha256Of(src));
      assert.equal(plain.context, ctx);
      assert.equal(statSync(join(d, "plain")).mode & 0o7777, 0o751, "the source's mode");
      assert.notEqual(statSync(join(d, "plain")).mtimeMs, 1_234_567_890_000, "mtime not kept unless asked");
      await ctx.putFile(src, join(d, "kept"), { mode: 0o600, preserveTimes: true });
      assert.equal(statSync(join(d, "kept")).mode & 0o7777, 0o600);
      assert.equal(statSync(join(d, "kept")).mtimeMs, 1_234_567_890_000);
      assert.equal(sha256Of(join(d, "kept")), sha256Of(src));
      const got = await ctx.getFile(src, join(d, "got"), { preserveTimes: true });
      assert.equal(got.sha256, sha256Of(src));
      assert.equal(statSync(join(d, "got")).mode & 0o7777, 0o751);
      assert.equal(statSync(join(d, "got")).mtimeMs, 1_234_567_890_000);
      await ctx.getFile(src, join(d, "got2"), { mode: 0o640 });
      assert.equal(statSync(join(d, "got2")).mode & 0o7777, 0o640);
      // To this very context, and to no context at all
      assert.equal((await router.myself().putFile(src, join(d, "mine"))).sha256, sha256Of(src));
      assert.equal(sha256Of(join(d, "mine")), sha256Of(src));
      assert.deepEqual(await router.putFile([], src, join(d, "none")), []);
      assert.equal(existsSync(join(d, "none")), false);
      // An empty file, and overwriting an existing one
      writeFileSync(join(d, "empty"), "");
      assert.equal((await ctx.putFile(join(d, "empty"), join(d, "plain"))).bytes, 0);
      assert.equal(statSync(join(d, "plain")).size, 0);
      assert.deepEqual(tempFilesIn(d), []);
    });

    test("onProgress: during a transfer, and once at the end with every byte", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      const d = sub("progress");
      const src = sparseFile(join(d, "src"), 64 * MiB);
      const seen: FileProgress[] = [];
      const put = ctx.putFile(src, join(d, "dst"), { onProgress: (p) => seen.push(p) });
      // Once it is under way, the child is busy for a second: at most a window arrives meanwhile, and
      // the reports go on.
      await waitFor(() => tempFilesIn(d).length > 0, 20_000, "the transfer under way");
      ctx.callNoReply(() => {
        const end = Date.now() + 1000;
        while (Date.now() < end);
      });
      await put;
      const last = seen.at(-1);
      assert.ok(last, "called");
      assert.equal(last.bytes, 64 * MiB);
      assert.equal(last.total, 64 * MiB);
      assert.equal(last.context, ctx);
      assert.ok(seen.length >= 2, `called during the transfer too (${seen.length} calls)`);
      for (let i = 1; i < seen.length; i++) assert.ok((seen[i] as FileProgress).bytes >= (seen[i - 1] as FileProgress).bytes, "never backwards");
      // getFile reports as well
      const back: FileProgress[] = [];
      await ctx.getFile(src, join(d, "back"), { onProgress: (p) => back.push(p) });
      assert.deepEqual(back.at(-1) && { bytes: back.at(-1)?.bytes, total: back.at(-1)?.total }, { bytes: 64 * MiB, total: 64 * MiB });
    });

    test("cancelled mid-way: the old destination is intact and no temporary file is left", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      const d = sub("cancel");
      const src = sparseFile(join(d, "src"), 2048 * MiB);
      writeFileSync(join(d, "dst"), "the old file");
      for (const way of ["put", "get"] as const) {
        const controller = new AbortController();
        const transfer =
          way === "put" ? ctx.putFile(src, join(d, "dst"), { signal: controller.signal }) : ctx.getFile(src, join(d, "dst"), { signal: controller.signal });
        const rejected = assert.rejects(transfer, AbortError);
        // Abort once the temporary file has data: mid-way.
        await waitFor(() => tempFilesIn(d).some((t) => statSync(join(d, t)).size > 0), 20_000, "a temporary file with data");
        controller.abort(new Error("changed my mind"));
        await rejected;
        await waitFor(() => tempFilesIn(d).length === 0, 10_000, "the temporary file removed");
        assert.equal(readFileSync(join(d, "dst"), "utf8"), "the old file", `${way}: old destination intact`);
      }
      // The context goes on working
      assert.equal((await ctx.putFile(join(d, "dst"), join(d, "again"))).bytes, 12);
    });

    test("errors: missing directory, vanished or shrinking source, missing remote file", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "errs" });
      const d = sub("errors");
      const src = makeFile(join(d, "src"), MiB);
      await assert.rejects(ctx.putFile(src, join(d, "nope", "dst")), (e: Error) => {
        assert.ok(e instanceof FileTransferError);
        assert.equal(e.message, `cannot write ${join(d, "nope", "dst")} in errs: its directory ${join(d, "nope")} does not exist`);
        return true;
      });
      await assert.rejects(
        ctx.putFile(join(d, "vanished"), join(d, "dst")),
        new RegExp(`^FileTransferError: cannot read ${join(d, "vanished")} in master: no such file or directory \\(ENOENT\\)$`),
      );
      await assert.rejects(ctx.getFile(join(d, "vanished"), join(d, "dst")), (e: Error) => {
        assert.ok(e instanceof FileTransferError);
        assert.equal(e.message, `cannot read ${join(d, "vanished")} in errs: no such file or directory (ENOENT)`);
        return true;
      });
      await assert.rejects(ctx.getFile(src, join(d, "nope", "dst")), /cannot write .*nope\/dst in master: its directory .*nope does not exist/);
      await assert.rejects(ctx.putFile(d, join(d, "dst")), /cannot read .* in master: not a regular file/);
      // A source that shrinks while it is sent
      const big = sparseFile(join(d, "big"), 2048 * MiB);
      const put = ctx.putFile(big, join(d, "dst"));
      const rejected = assert.rejects(put, /source .*big in master shrank while being sent: it had 2147483648 bytes, \d+ could be read/);
      await waitFor(() => tempFilesIn(d).length > 0, 20_000, "the transfer under way");
      truncateSync(big, MiB);
      await rejected;
      await waitFor(() => tempFilesIn(d).length === 0, 10_000, "the temporary file removed");
      assert.equal(existsSync(join(d, "dst")), false);
    });

    test("no permission: a context that may not write the directory", async () => {
      await using router = quietRouter();
      const d = sub("perm");
      const src = makeFile(join(d, "src"), 100_000);
      chmodSync(src, 0o644);
      const locked = join(d, "locked");
      mkdirSync(locked, { mode: 0o755 });
      let ctx = await router.local({ runtime, name: "me" });
      if (isRoot) {
        // root may write anywhere: a context running as nobody may not write root's 0755 directory
        ctx = await router.sudo({ username: "nobody", name: "me", runtime: process.execPath, sudoArgs: ["--preserve-env=MITOGEN_TEST_TOKEN"] });
      } else chmodSync(locked, 0o555);
      await assert.rejects(ctx.putFile(src, join(locked, "dst")), (e: Error) => {
        assert.ok(e instanceof FileTransferError);
        assert.equal(e.message, `cannot write ${join(locked, "dst")} in me: cannot create a file in ${locked}: permission denied (EACCES)`);
        return true;
      });
      assert.deepEqual(readdirSync(locked), []);
    });

    test("disk full: its own error; the old file stays and no temporary file is left", {
      skip: isRoot ? false : "needs root to mount a small tmpfs",
    }, async () => {
      const small = sub("full");
      await run("mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", small]);
      try {
        await using router = quietRouter();
        const ctx = await router.local({ runtime, name: "full" });
        writeFileSync(join(small, "dst"), "the old file");
        const src = makeFile(join(dir, `full-src-${runtime}`), 3 * MiB);
        await assert.rejects(ctx.putFile(src, join(small, "dst")), /^FileTransferError: cannot write .*\/dst in full: no space left on device \(ENOSPC\)$/);
        assert.equal(readFileSync(join(small, "dst"), "utf8"), "the old file");
        await waitFor(() => tempFilesIn(small).length === 0, 10_000, "the temporary file removed");
        // getFile into it fails the same way
        await assert.rejects(ctx.getFile(src, join(small, "got")), /cannot write .*\/got in master: no space left on device \(ENOSPC\)/);
        await waitFor(() => tempFilesIn(small).length === 0, 10_000, "the temporary file removed");
      } finally {
        await run("umount", [small]);
      }
    });

    test("fan-out to 10 contexts behind one parent: the master's link carries the file once; a failing target does not stop the others", async () => {
      await using router = quietRouter();
      const hop = await router.local({ runtime, name: "hop" });
      const d = sub("fanout");
      // Each target resolves the relative destination in its own working directory; one lacks "out".
      const kids = await Promise.all(
        Array.from({ length: 10 }, (_, i) => {
          const cwd = join(d, `kid${i}`);
          mkdirSync(i === 7 ? cwd : join(cwd, "out"), { recursive: true });
          return router.local({ runtime, via: hop, name: `kid${i}`, cwd });
        }),
      );
      const size = 8 * MiB + 5;
      const src = makeFile(join(d, "src"), size);
      const link = router.stats.links.get(hop.contextId);
      assert.ok(link, "the link to hop is counted");
      const before = link.bytesOut;
      const err = await router.putFile(kids, src, "out/file").then(
        () => assert.fail("kid7 cannot have it"),
        (e: unknown) => e,
      );
      assert.ok(err instanceof FileTransferError);
      assert.match(err.message, /failed in 1 of 10 contexts: kid7: cannot write out\/file in kid7: its directory out does not exist/);
      assert.deepEqual(
        err.results.map((r) => r.context.name),
        kids.filter((_, i) => i !== 7).map((k) => k.name),
      );
      assert.deepEqual(
        err.failures.map((f) => f.context),
        [kids[7]],
      );
      const sent = link.bytesOut - before;
      assert.ok(sent >= size && sent < size * 1.05 + 65536, `the master sent ${sent} bytes to hop for a file of ${size}`);
      for (let i = 0; i < 10; i++) {
        if (i === 7) assert.equal(existsSync(join(d, "kid7", "out")), false);
        else assert.equal(sha256Of(join(d, `kid${i}`, "out", "file")), sha256Of(src), `kid${i}`);
        if (i !== 7) assert.deepEqual(tempFilesIn(join(d, `kid${i}`, "out")), []);
      }
      // All ten good: resolves with one result each, in order
      mkdirSync(join(d, "kid7", "out"));
      const ok = await router.putFile(kids, src, "out/file");
      assert.deepEqual(
        ok.map((r) => [r.context, r.bytes, r.sha256]),
        kids.map((k) => [k, size, sha256Of(src)]),
      );
    });

    test("any context can send: a child puts its own file to its child and gets one back", async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime, name: "a" });
      const b = await router.local({ runtime, name: "b", via: a });
      const c = await router.local({ runtime, name: "c", via: b });
      const d = sub("any");
      const src = makeFile(join(d, "src"), 2 * MiB + 1);
      // via chain from the master: every hop relays
      const links = () => router.stats.links.get(a.contextId)?.bytesOut ?? 0;
      const before = links();
      assert.equal((await c.putFile(src, join(d, "from-master"))).sha256, sha256Of(src));
      assert.ok(links() - before < (2 * MiB + 1) * 1.05 + 65536);
      const got = await a.call(
        takesRouter(async (from: string, to: string, back: string, id: number, call: CallContext) => {
          const child = call.router.contextById(id);
          const put = await child.putFile(from, to);
          const get = await child.getFile(to, back);
          return [put.bytes, put.sha256, get.sha256, put.context.name];
        }),
        src,
        join(d, "from-a"),
        join(d, "back-to-a"),
        c.contextId,
      );
      assert.deepEqual(got, [2 * MiB + 1, sha256Of(src), sha256Of(src), "c"]);
      assert.equal(sha256Of(join(d, "from-a")), sha256Of(src));
      assert.equal(sha256Of(join(d, "back-to-a")), sha256Of(src));
    });
  });
}

const OLDEST = matrix().filter((m) => m.name === "node12" || m.name === "deno1.46");
test("the oldest child runtimes (Node 12, Deno 1.46) send, relay, receive and fail alike", async (t) => {
  for (const m of OLDEST) {
    await t.test(m.name, { skip: m.runtime ? false : `${m.exe} is not installed: ${INSTALL_HINT}` }, async () => {
      await using router = quietRouter();
      const a = await router.local({ runtime: m.exe, name: "a" });
      const b = await router.local({ runtime: m.exe, name: "b", via: a });
      const d = sub(m.name);
      const src = makeFile(join(d, "src"), 3 * MiB + 5);
      utimesSync(src, 1_000_000_000, 1_111_111_111);
      const both = await router.putFile([a, b], src, join(d, "dst"), { mode: 0o600, preserveTimes: true });
      assert.deepEqual(
        both.map((r) => r.sha256),
        [sha256Of(src), sha256Of(src)],
      );
      assert.equal(statSync(join(d, "dst")).mode & 0o7777, 0o600);
      assert.equal(statSync(join(d, "dst")).mtimeMs, 1_111_111_111_000);
      assert.equal(sha256Of(join(d, "dst")), sha256Of(src), "the file on disk (chunks differ: order matters)");
      assert.equal((await b.getFile(join(d, "dst"), join(d, "back"))).sha256, sha256Of(src));
      assert.equal(sha256Of(join(d, "back")), sha256Of(src));
      // a sends a file of its own to its child
      const own = await a.call(
        takesRouter(async (from: string, to: string, id: number, call: CallContext) => (await call.router.contextById(id).putFile(from, to)).bytes),
        join(d, "back"),
        join(d, "from-a"),
        b.contextId,
      );
      assert.equal(own, 3 * MiB + 5);
      await assert.rejects(b.putFile(src, join(d, "nope", "x")), /cannot write .*nope\/x in b: its directory .*nope does not exist/);
      // a name of 255 bytes, a setuid source, a FIFO and a file of stat size 0 with content
      const long = join(d, "n".repeat(255));
      chmodSync(src, 0o4755);
      assert.equal((await b.putFile(src, long)).sha256, sha256Of(src));
      assert.equal(statSync(long).mode & 0o7777, 0o755);
      await run("mkfifo", [join(d, "fifo")]);
      await assert.rejects(b.getFile(join(d, "fifo"), join(d, "x")), /in b: not a regular file but a FIFO \(named pipe\); only regular files can be sent$/);
      const status = await b.getFile("/proc/self/status", join(d, "status"));
      assert.ok(status.bytes > 100 && readFileSync(join(d, "status"), "utf8").endsWith("\n"), `${status.bytes} bytes of /proc/self/status`);
      assert.deepEqual(tempFilesIn(d), []);
    });
  }
});
