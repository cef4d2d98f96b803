/**
 * Files under attack and on odd files (files.ts): a user who may write the target directory swaps
 * the temporary file for a symbolic link mid-transfer; setuid bits; FIFOs, sockets, devices and
 * directories as sources; /proc files of stat size 0; names of 255 bytes; the temporary file a
 * SIGKILLed master leaves. Node and Deno children; the oldest runtimes at the end.
 */
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  symlinkSync,
  utimesSync,
  writeFileSync,
} from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, describe, test } from "node:test";
import { type Context, FileTransferError } from "../mod.ts";
import { alive, checkLeaks, makeFile, quietRouter, RUNTIMES, sha256Of, sparseFile, tempFilesIn, underDeno, waitFor } from "./helpers.ts";
import { INSTALL_HINT, matrix } from "../lab/matrix.ts";

checkLeaks();

const MiB = 1024 * 1024;
const run = promisify(execFile);
const isRoot = process.getuid?.() === 0;
/** A master of its own (tests/fixtures/files-stop-master.ts), under this test's runtime. */
const stopMaster = (...args: string[]) => {
  const script = fileURLToPath(new URL("./fixtures/files-stop-master.ts", import.meta.url));
  return [...(underDeno ? ["run", "-A", script] : ["--import", "tsx", script]), ...args];
};

let dir = "";
before(() => {
  dir = mkdtempSync(join(tmpdir(), "mitogen-files-hostile-"));
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

/** The pid of a context's process. */
const pidOf = (ctx: Context) =>
  ctx.call(() => {
    const deno = (globalThis as { Deno?: { pid: number } }).Deno; // no ?. : Node 12 runs this too
    return deno ? deno.pid : process.pid;
  });

/** `promise`, or a rejection naming `what` if it is still pending after `ms` (a hang, made a failure). */
async function settles<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A real attacker: a process running as nobody, in a directory it may write (0777, not sticky),
 * swaps the temporary file of a transfer for a symbolic link to a root-only file while a root
 * context writes it (the child is stopped meanwhile, so the swap lands mid-transfer every time).
 * Both ways: putFile (the child writes) and getFile (the master writes).
 */
async function swapTempForSymlink(runtime: string, name: string): Promise<void> {
  await using router = quietRouter();
  const ctx = await router.local({ runtime, name });
  const childPid = await pidOf(ctx);
  const d = sub("race");
  chmodSync(d, 0o777);
  const secret = join(dir, `secret-${n++}`);
  writeFileSync(secret, "root only\n", { mode: 0o600 });
  chmodSync(secret, 0o600);
  const src = sparseFile(join(dir, `race-src-${n++}`), 256 * MiB);
  chmodSync(src, 0o644);
  const dst = join(d, "dst");
  writeFileSync(dst, "the old file");
  for (const way of ["put", "get"] as const) {
    const transfer = way === "put" ? ctx.putFile(src, dst) : ctx.getFile(src, dst);
    const rejected = assert.rejects(transfer, (e: Error) => {
      assert.ok(e instanceof FileTransferError, String(e));
      const where = way === "put" ? name : "master";
      assert.match(
        e.message,
        new RegExp(
          `^cannot write ${dst} in ${where}: its temporary file ${d}/\\.mitogen-tmp\\.[0-9.a-f]+ was replaced while it was written \\(a race with another user who can write ${d}\\?\\); ${dst} was left as it was$`,
        ),
      );
      return true;
    });
    await waitFor(() => tempFilesIn(d).length > 0, 20_000, "the temporary file");
    await run("kill", ["-STOP", String(childPid)]);
    try {
      const [tmp] = tempFilesIn(d);
      assert.ok(tmp && tempFilesIn(d).length === 1, `one temporary file, mid-transfer: ${tempFilesIn(d)}`);
      assert.equal(readFileSync(dst, "utf8"), "the old file", "not committed yet");
      await run("setpriv", [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sh",
        "-c",
        'mv -- "$1" "$2" && ln -s -- "$3" "$1"',
        "sh",
        join(d, tmp),
        join(d, `stolen-${way}`),
        secret,
      ]);
      assert.ok(lstatSync(join(d, tmp)).isSymbolicLink(), "the attacker swapped it");
    } finally {
      await run("kill", ["-CONT", String(childPid)]);
    }
    await rejected;
    assert.equal(statSync(secret).mode & 0o7777, 0o600, `${way}: the root-only file's mode is unchanged`);
    assert.equal(readFileSync(secret, "utf8"), "root only\n", `${way}: the root-only file is unchanged`);
    assert.equal(lstatSync(dst).isSymbolicLink(), false, `${way}: the destination is not the attacker's link`);
    assert.equal(readFileSync(dst, "utf8"), "the old file", `${way}: the destination is as it was`);
    for (const t of tempFilesIn(d)) rmSync(join(d, t));
  }
  // The context goes on working
  assert.equal((await ctx.putFile(dst, join(d, "again"))).bytes, 12);
}

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("a user who can write the directory cannot turn a root transfer into a chmod of a root-only file, nor put a link in its place", {
      skip: isRoot ? false : "needs root: the writing context runs as root and the attacker as nobody",
    }, async () => {
      await swapTempForSymlink(runtime, "root");
    });

    test("setuid, setgid and sticky bits are not copied unless keepSetuid; a mode given is set as given", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      const d = sub("suid");
      const src = makeFile(join(d, "src"), 1000);
      chmodSync(src, 0o6755);
      await ctx.putFile(src, join(d, "put"));
      assert.equal(statSync(join(d, "put")).mode & 0o7777, 0o755, "putFile");
      await ctx.getFile(src, join(d, "got"));
      assert.equal(statSync(join(d, "got")).mode & 0o7777, 0o755, "getFile");
      await ctx.putFile(src, join(d, "kept"), { keepSetuid: true });
      assert.equal(statSync(join(d, "kept")).mode & 0o7777, 0o6755, "putFile, keepSetuid");
      await ctx.getFile(src, join(d, "got-kept"), { keepSetuid: true });
      assert.equal(statSync(join(d, "got-kept")).mode & 0o7777, 0o6755, "getFile, keepSetuid");
      await ctx.putFile(src, join(d, "given"), { mode: 0o4711 });
      assert.equal(statSync(join(d, "given")).mode & 0o7777, 0o4711, "mode given");
    });

    test("a FIFO, a socket, a device or a directory is refused at once, both ways; four FIFOs leave the context's fs working", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "odd" });
      const d = sub("odd");
      const fifos = [0, 1, 2, 3].map((i) => join(d, `fifo${i}`));
      for (const f of fifos) await run("mkfifo", [f]);
      const refused = (file: string, where: string, kind: string) =>
        new RegExp(`^cannot read ${file} in ${where}: not a regular file but ${kind}; only regular files can be sent$`);
      const got = await settles(Promise.allSettled(fifos.map((f, i) => ctx.getFile(f, join(d, `got${i}`)))), 20_000, "getFile of four FIFOs");
      for (const [i, r] of got.entries()) {
        assert.equal(r.status, "rejected");
        assert.ok(r.status === "rejected" && r.reason instanceof FileTransferError);
        assert.match((r.reason as Error).message, refused(fifos[i] as string, "odd", "a FIFO \\(named pipe\\)"));
      }
      // The context's fs still works: its thread pool is not blocked in four opens (getFile reads there).
      const src = makeFile(join(d, "src"), 100_000);
      assert.equal((await settles(ctx.getFile(src, join(d, "back")), 20_000, "getFile after the FIFOs")).sha256, sha256Of(src));
      // A socket, a character device and a directory, from the context and from the master
      const sock = join(d, "sock");
      const server = createServer();
      await new Promise<void>((resolve) => server.listen(sock, resolve));
      try {
        for (const [file, kind] of [
          [sock, "a socket"],
          ["/dev/null", "a character device"],
          [d, "a directory"],
          [fifos[0] as string, "a FIFO \\(named pipe\\)"],
        ] as const) {
          await assert.rejects(settles(ctx.getFile(file, join(d, "x")), 20_000, `getFile of ${file}`), (e: Error) => {
            assert.ok(e instanceof FileTransferError);
            assert.match(e.message, refused(file, "odd", kind));
            return true;
          });
          await assert.rejects(settles(ctx.putFile(file, join(d, "x")), 20_000, `putFile of ${file}`), (e: Error) => {
            assert.ok(e instanceof FileTransferError);
            assert.match(e.message, refused(file, "master", kind));
            return true;
          });
        }
      } finally {
        await new Promise((resolve) => server.close(resolve));
      }
      assert.equal(existsSync(join(d, "x")), false);
      assert.deepEqual(tempFilesIn(d), []);
    });

    test("a master whose putFile source is a FIFO fails it and exits by itself", async () => {
      const d = sub("fifo-master");
      const fifo = join(d, "fifo");
      await run("mkfifo", [fifo]);
      const { stdout } = await run(process.execPath, stopMaster("fifo", runtime, fifo, join(d, "dst")), { timeout: 60_000 }).catch(
        (err: { stdout?: string; signal?: string }) => {
          throw new Error(`the master did not exit by itself (${err.signal ?? err}): ${err.stdout}`);
        },
      );
      const got = JSON.parse(stdout.trim().split("\n").at(-1) ?? "{}") as { error?: string };
      assert.match(
        got.error ?? "",
        new RegExp(`^cannot read ${fifo} in master: not a regular file but a FIFO \\(named pipe\\); only regular files can be sent$`),
      );
    });

    test("/proc/self/status (stat size 0, with content) is read to its end, both ways", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime, name: "proc" });
      const d = sub("proc");
      const childPid = await pidOf(ctx);
      const got = await ctx.getFile("/proc/self/status", join(d, "got"));
      const text = readFileSync(join(d, "got"), "utf8");
      assert.ok(got.bytes > 100, `${got.bytes} bytes`);
      assert.equal(got.bytes, Buffer.byteLength(text));
      assert.equal(got.sha256, sha256Of(join(d, "got")));
      assert.match(text, new RegExp(`^Name:[^]*\\nPid:\\t${childPid}\\n`), "the child's own status, whole");
      assert.match(text, /\nnonvoluntary_ctxt_switches:\t\d+\n$/, "to its last line");
      const put = await ctx.putFile("/proc/self/status", join(d, "put"));
      assert.ok(put.bytes > 100, `${put.bytes} bytes`);
      assert.match(
        readFileSync(join(d, "put"), "utf8"),
        new RegExp(`\\nPid:\\t${process.pid}\\n[^]*\\nnonvoluntary_ctxt_switches:\\t\\d+\\n$`),
        "the master's own, whole",
      );
    });

    test("names of 255 bytes are written both ways, not refused with ENAMETOOLONG", async () => {
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      const d = sub("long");
      const src = makeFile(join(d, "src"), 2 * MiB + 3);
      const long = "n".repeat(255);
      assert.equal((await ctx.putFile(src, join(d, long))).sha256, sha256Of(src));
      assert.equal(sha256Of(join(d, long)), sha256Of(src));
      const back = `${"b".repeat(241)}-back-${"é".repeat(4)}`; // 255 bytes, multi-byte at the end
      assert.equal(Buffer.byteLength(back), 255);
      assert.equal((await ctx.getFile(join(d, long), join(d, back))).sha256, sha256Of(src));
      assert.equal(sha256Of(join(d, back)), sha256Of(src));
      assert.deepEqual(tempFilesIn(d), []);
    });

    test("a master and child SIGKILLed mid-putFile leave a temporary file; the next transfer to that directory removes it, and nothing else", async () => {
      const d = sub("stale");
      const src = sparseFile(join(dir, `stale-src-${n++}`), 2048 * MiB);
      const master = spawn(process.execPath, stopMaster("kill", runtime, src, join(d, "dst")), { stdio: ["ignore", "pipe", "inherit"] });
      let out = "";
      master.stdout.on("data", (c: Buffer) => {
        out += c.toString();
      });
      const exited = new Promise((resolve) => master.on("exit", resolve));
      let childPid = 0;
      try {
        await waitFor(() => /"child":\d+/.test(out), 60_000, "the master's child started");
        childPid = Number(/"child":(\d+)/.exec(out)?.[1]);
        await waitFor(() => tempFilesIn(d).some((t) => statSync(join(d, t)).size > 0), 20_000, "a temporary file with data");
      } finally {
        // The child first, as its parent-death signal kills it when the master dies: no cleanup runs.
        if (childPid) process.kill(childPid, "SIGKILL");
        master.kill("SIGKILL");
        await exited;
      }
      await waitFor(() => !alive(childPid), 10_000, "the child gone");
      const [stale] = tempFilesIn(d);
      assert.ok(stale && tempFilesIn(d).length === 1, `the killed transfer's temporary file is left: ${tempFilesIn(d)}`);
      // Look-alikes the sweep must leave: a live process's, another user's, a link (and what it points to).
      const ns = /\d+/.exec(readlinkSync("/proc/self/ns/pid"))?.[0];
      const live = `.mitogen-tmp.${ns}.${process.pid}.aaaaaaaaaaaa`;
      const others = `.mitogen-tmp.${ns}.${childPid}.bbbbbbbbbbbb`;
      const link = `.mitogen-tmp.${ns}.${childPid}.cccccccccccc`;
      const pointed = join(dir, `pointed-${n++}`);
      writeFileSync(pointed, "kept");
      const past = Date.now() / 1000 - 3600;
      for (const f of [live, others]) {
        writeFileSync(join(d, f), "x");
        utimesSync(join(d, f), past, past);
      }
      if (isRoot) chownSync(join(d, others), 65534, 65534);
      symlinkSync(pointed, join(d, link));
      await using router = quietRouter();
      const ctx = await router.local({ runtime });
      await ctx.putFile(makeFile(join(dir, `small-${n++}`), 1000), join(d, "next"));
      assert.deepEqual(tempFilesIn(d).sort(), (isRoot ? [live, others, link] : [live, link]).sort(), `only the dead writer's ${stale} removed`);
      assert.equal(readFileSync(pointed, "utf8"), "kept");
      assert.equal(existsSync(join(d, "dst")), false);
    });
  });
}

const OLDEST = matrix().filter((m) => m.name === "node12" || m.name === "deno1.46");
test("the oldest child runtimes (Node 12, Deno 1.46) cannot be made to chmod a root-only file either", {
  skip: isRoot ? false : "needs root: the writing context runs as root and the attacker as nobody",
}, async (t) => {
  for (const m of OLDEST) {
    await t.test(m.name, { skip: m.runtime ? false : `${m.exe} is not installed: ${INSTALL_HINT}` }, () => swapTempForSymlink(m.exe, m.name));
  }
});
