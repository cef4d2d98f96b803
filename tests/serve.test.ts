/**
 * `mitogen serve` (serve.ts) with local targets: commands attach and reuse its contexts, their records
 * the same as without it; --status, --stop, idle ends, the directory's checks, a stale or hung server,
 * Ctrl-C in an attached run. Over ssh: serve-hosts.test.ts.
 */
import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, test } from "node:test";
import { DIST, NODE } from "./command-runner.ts";
import { alive, checkLeaks, waitFor, records } from "./helpers.ts";
import { serveDir } from "../serve.ts";

checkLeaks();

const scratch = mkdtempSync(join(tmpdir(), "mitogen-serve-test-"));
after(() => rmSync(scratch, { recursive: true, force: true }));
let n = 0;

/** A fresh XDG_RUNTIME_DIR: each test has its own server directory. */
const runtimeDir = (): string => mkdtempSync(join(scratch, `xdg${n++}-`));

/** Run `mitogen ...args` with `xdg` as XDG_RUNTIME_DIR, in `cwd`. */
function mitogen(xdg: string, args: string[], options: { cwd?: string; timeout?: number } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      NODE,
      [DIST, ...args],
      { timeout: options.timeout ?? 60_000, cwd: options.cwd ?? scratch, env: { ...process.env, NO_COLOR: "1", XDG_RUNTIME_DIR: xdg } },
      (err, stdout, stderr) => {
        const code = err ? ((err as { code?: number }).code ?? 1) : 0;
        resolve({ code: typeof code === "number" ? code : 1, stdout, stderr });
      },
    );
  });
}

type Status = { pid: number; contexts: { id: number; name: string; inUse: number; idleMs: number }[] };

async function status(xdg: string): Promise<Status> {
  const r = await mitogen(xdg, ["serve", "--status", "--json"]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as Status;
}

/** Start a server in the background; returns its pid. */
async function serve(xdg: string, ...args: string[]): Promise<number> {
  const r = await mitogen(xdg, ["serve", ...args]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /listening on .*serve\.sock/);
  return (await status(xdg)).pid;
}

/** Stop the server of `xdg` if one runs, and wait for its process to go. */
async function stop(xdg: string, pid?: number): Promise<void> {
  await mitogen(xdg, ["serve", "--stop"]);
  if (pid !== undefined) await waitFor(() => !alive(pid), 10_000, `server ${pid} to exit`);
}

const pidOf = async (xdg: string, target: string, ...extra: string[]): Promise<number> => {
  const r = await mitogen(xdg, ["eval", target, "--json", ...extra, "process.pid"]);
  assert.equal(r.code, 0, r.stderr);
  return records(r.stdout)[0]?.result as number;
};

test("serve: commands reuse its contexts, and print what they print without it; --status; --stop ends it and them", async () => {
  const xdg = runtimeDir();
  const server = await serve(xdg, "--idle", "60s");
  try {
    const dir = join(xdg, "mitogen");
    assert.equal(statSync(dir).mode & 0o777, 0o700);
    assert.equal(statSync(join(dir, "serve.sock")).mode & 0o777, 0o600);
    assert.equal(statSync(join(dir, "serve.sock.key")).mode & 0o777, 0o600);
    const again = await mitogen(xdg, ["serve"]);
    assert.equal(again.code, 0);
    assert.match(again.stdout, /already running/);

    const first = await pidOf(xdg, "local");
    assert.equal(await pidOf(xdg, "local"), first, "the second command used the same context");
    assert.notEqual(await pidOf(xdg, "local", "--no-serve"), first, "--no-serve starts its own");
    assert.ok(alive(first), "the server keeps the context between commands");

    const tasks = fileURLToPath(new URL("./fixtures/tasks.ts", import.meta.url));
    writeFileSync(join(scratch, "src.txt"), "some content\n");
    const commands = [
      ["run", "local,local", "--json", "--", "echo out; echo err >&2; exit 3"],
      ["run", "local", "--json", "--", "echo fine"],
      ["eval", "local,local", "--json", `(console.log("said"), console.error("warned"), 1 + 2)`],
      ["eval", "local", "--json", "(() => { throw new RangeError('no') })()"],
      ["eval", "local", "--json", "(() => { for (let i = 0; i < 5000; i++) console.log('line ' + i); return 1 })()"],
      ["call", "local", "--json", `${tasks}#add`, "[2, 3]"],
      ["eval", "local", "--runtime", "/nonexistent/node", "--json", "1"], // a context that cannot start: the library's error text
      ["call", "local", "--json", `${tasks}#nothing`],
      ["put", "local", "--json", "src.txt", "dst.txt"], // relative: the command's directory
      ["get", "local", "--json", "dst.txt", "got"],
    ];
    for (const args of commands) {
      const served = await mitogen(xdg, args);
      const own = await mitogen(xdg, [args[0] as string, "--no-serve", ...args.slice(1)]);
      assert.deepEqual([served.code, records(served.stdout)], [own.code, records(own.stdout)], args.join(" "));
      assert.equal(served.stderr, own.stderr, args.join(" "));
    }
    assert.equal(readFileSync(join(scratch, "got", "local", "dst.txt"), "utf8"), "some content\n");
    const s = await status(xdg);
    assert.equal(s.pid, server);
    assert.deepEqual(s.contexts.map((c) => c.name).sort(), ["local", "local#2"]);
    assert.ok(s.contexts.every((c) => c.inUse === 0 && c.idleMs >= 0));
    const text = await mitogen(xdg, ["serve", "--status"]);
    assert.match(text.stdout, new RegExp(`pid ${server} .*\\n2 contexts .*\\n.*NAME.*\\n.*local `));

    const stopped = await mitogen(xdg, ["serve", "--stop"]);
    assert.equal(stopped.code, 0, stopped.stderr);
    assert.match(stopped.stdout, new RegExp(`stopped \\(pid ${server}, 2 contexts\\)`));
    await waitFor(() => !alive(server) && !alive(first), 10_000, "the server and its contexts to end");
    assert.deepEqual(readdirSync(dir).sort(), ["serve.log"], "its socket and key are gone");
    const none = await mitogen(xdg, ["serve", "--status"]);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /no server at/);
  } finally {
    await stop(xdg, server);
  }
});

test("serve: two commands at once on one context each get what it printed while they held it; neither loses its own", async () => {
  const xdg = runtimeDir();
  const server = await serve(xdg, "--idle", "60s");
  try {
    await pidOf(xdg, "local"); // started, so both commands below share it
    // The slow one prints after the quick one has come and gone.
    const slow = mitogen(xdg, ["eval", "local", "--json", "new Promise((r) => setTimeout(() => { console.log('slow'); r(1) }, 1500))"]);
    for (let tries = 0; !(await status(xdg)).contexts.some((c) => c.inUse === 1); tries++) assert.ok(tries < 100, "the slow command holds the context");
    const quick = await mitogen(xdg, ["eval", "local", "--json", "(console.log('quick'), 2)"]);
    assert.deepEqual(records(quick.stdout), [{ host: "local", ok: true, result: 2, output: "quick\n" }], quick.stderr);
    const done = await slow;
    assert.deepEqual(records(done.stdout), [{ host: "local", ok: true, result: 1, output: "quick\nslow\n" }], done.stderr);
    assert.equal(done.stderr, "");
  } finally {
    await stop(xdg, server);
  }
});

test("serve: an unused context ends after --context-idle, the server after --idle", async () => {
  const xdg = runtimeDir();
  const server = await serve(xdg, "--context-idle", "400ms", "--idle", "2s");
  try {
    const pid = await pidOf(xdg, "local");
    await waitFor(() => !alive(pid), 10_000, "the idle context to end");
    assert.deepEqual((await status(xdg)).contexts, []);
    await waitFor(() => !alive(server), 15_000, "the idle server to end");
    assert.ok(!existsSync(join(xdg, "mitogen", "serve.sock")));
  } finally {
    await stop(xdg, server);
  }
});

test("serve: its directory is private and checked; a planted link or an open directory is not used", async () => {
  assert.equal(serveDir({}), `/tmp/mitogen-${process.getuid?.()}`, "without XDG_RUNTIME_DIR");
  assert.equal(serveDir({ XDG_RUNTIME_DIR: "/run/user/7" }), "/run/user/7/mitogen");
  const real = runtimeDir();
  const server = await serve(real);
  try {
    const contextPid = await pidOf(real, "local");
    // Another XDG_RUNTIME_DIR whose mitogen/ is a link to a live server's directory (as another user could plant).
    const linked = runtimeDir();
    symlinkSync(join(real, "mitogen"), join(linked, "mitogen"));
    const r = await mitogen(linked, ["eval", "local", "--json", "process.pid"]);
    assert.equal(r.code, 0);
    assert.notEqual(records(r.stdout)[0]?.result, contextPid, "not the linked server's context");
    assert.match(r.stderr, /not using the server at .*is not a directory/);
    const refused = await mitogen(linked, ["serve", "--foreground"]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /is not a directory/);
    const open = runtimeDir();
    mkdirSync(join(open, "mitogen"), { mode: 0o755 });
    const wide = await mitogen(open, ["serve"]);
    assert.equal(wide.code, 1);
    assert.match(wide.stderr, /has mode 755: it must be 0700/);
  } finally {
    await stop(real, server);
  }
});

/** `mitogen serve --foreground` as a child of this test; resolves once it listens. */
async function foreground(xdg: string): Promise<ChildProcess> {
  const child = spawn(NODE, [DIST, "serve", "--foreground"], { env: { ...process.env, XDG_RUNTIME_DIR: xdg }, stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  child.stdout?.on("data", (d: Buffer) => {
    out += d.toString();
  });
  await waitFor(() => out.includes("listening on"), 20_000, "the server to listen");
  return child;
}

test("serve: a dead server's socket is removed and the command runs without it; a hung one is left after a bounded wait", async () => {
  const xdg = runtimeDir();
  const sock = join(xdg, "mitogen", "serve.sock");
  const dead = await foreground(xdg);
  const context = await pidOf(xdg, "local");
  process.kill(dead.pid as number, "SIGKILL");
  await waitFor(() => !alive(dead.pid as number) && !alive(context), 10_000, "the killed server and its context to end");
  assert.ok(existsSync(sock), "a killed server leaves its socket");
  const r = await mitogen(xdg, ["eval", "local", "--json", "1 + 1"]);
  assert.deepEqual([r.code, records(r.stdout)[0]?.result, r.stderr], [0, 2, ""]);
  assert.ok(!existsSync(sock), "the stale socket was removed");

  const hung = await foreground(xdg);
  try {
    process.kill(hung.pid as number, "SIGSTOP");
    const t0 = performance.now();
    const h = await mitogen(xdg, ["eval", "local", "--json", "3"]);
    assert.deepEqual([h.code, records(h.stdout)[0]?.result], [0, 3]);
    assert.ok(performance.now() - t0 < 30_000);
    assert.ok(existsSync(sock), "a server that does not answer is not removed: it may only be slow");
  } finally {
    process.kill(hung.pid as number, "SIGCONT");
    process.kill(hung.pid as number, "SIGTERM"); // not child.kill(): Deno reports the signal, not the exit code
    await waitFor(() => !alive(hung.pid as number), 10_000, "the server to end");
  }
});

test("serve: Ctrl-C in an attached run stops its command, not the server", async () => {
  const xdg = runtimeDir();
  const server = await serve(xdg);
  try {
    const context = await pidOf(xdg, "local");
    const mark = join(scratch, `started${n++}`);
    const sleeper = `sleep 41.${process.pid}`;
    const cli = spawn(NODE, [DIST, "run", "local", "--json", "--", `touch ${mark}; ${sleeper}`], {
      env: { ...process.env, XDG_RUNTIME_DIR: xdg },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    cli.stdout?.on("data", (d: Buffer) => {
      out += d.toString();
    });
    const exited = new Promise<number | null>((resolve) => cli.on("close", (code) => resolve(code)));
    await waitFor(() => existsSync(mark), 20_000, "the command to start");
    process.kill(cli.pid as number, "SIGINT");
    assert.equal(await exited, 130);
    assert.deepEqual(
      records(out).map((r) => [r.ok, r.interrupted]),
      [[false, true]],
    );
    const sleeping = () =>
      readdirSync("/proc").some((p) => {
        try {
          return /^\d+$/.test(p) && readFileSync(`/proc/${p}/cmdline`, "latin1").replaceAll("\0", " ").includes(sleeper);
        } catch {
          return false;
        }
      });
    await waitFor(() => !sleeping(), 10_000, "the remote command to be stopped");
    assert.ok(alive(server), "the server runs on");
    assert.equal(await pidOf(xdg, "local"), context, "with its context");
  } finally {
    await stop(xdg, server);
  }
});
