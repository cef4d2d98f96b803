/**
 * The `mitogen` command (dist/mitogen.mjs run as a process) on local
 * targets: JSON lines, exit codes, every command, --forks, usage errors,
 * help, and the live list under a pty. Over ssh: cli-hosts.test.ts.
 */
import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, test } from "node:test";
import { COMMANDS, parseTargets } from "../command.ts";
import { DIST, mitogen as run, NODE as node } from "./command-runner.ts";
import { checkLeaks, leakedProcesses, waitFor } from "./helpers.ts";
import { findProgram } from "../lab/hosts.ts";

checkLeaks();

const scratch = mkdtempSync(join(tmpdir(), "mitogen-cli-test-"));
after(() => rmSync(scratch, { recursive: true, force: true }));

const mitogen = (args: string[], options: { timeout?: number } = {}) => run(args, { timeout: options.timeout ?? 60_000 });

const lines = (stdout: string) =>
  stdout
    .trim()
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);

test("targets: commas, @file with comments, user@host:port, IPv6, local; the same one twice is numbered", () => {
  const file = join(scratch, "hosts.txt");
  writeFileSync(file, "# fleet\nweb1\n  deploy@web2:2222  # the second\n\n[::1]:22\n");
  assert.deepEqual(
    parseTargets(`local,@${file},db1,db1`).map((t) => [t.label, t.host, t.user ?? null, t.port ?? null, t.local]),
    [
      ["local", "local", null, null, true],
      ["web1", "web1", null, null, false],
      ["deploy@web2:2222", "web2", "deploy", 2222, false],
      ["[::1]:22", "::1", null, 22, false],
      ["db1", "db1", null, null, false],
      ["db1#2", "db1", null, null, false],
    ],
  );
  assert.throws(() => parseTargets("a@b@c:x"), /bad target/);
});

test("run: one JSON line per host with exit code, stdout and stderr; exit 1 when any host fails", async () => {
  const ok = await mitogen(["run", "local,local", "--", "echo out; echo err >&2"]);
  assert.equal(ok.code, 0, ok.stderr);
  // one line per host as each finishes: any order
  const got = lines(ok.stdout).sort((x, y) => String(x.host).localeCompare(String(y.host)));
  assert.deepEqual(
    got.map((l) => [l.host, l.ok, l.exitCode, l.stdout, l.stderr]),
    [
      ["local", true, 0, "out\n", "err\n"],
      ["local#2", true, 0, "out\n", "err\n"],
    ],
  );
  assert.ok(got.every((l) => typeof l.ms === "number"));
  const bad = await mitogen(["run", "local", "--json", "--", "exit 3"]);
  assert.equal(bad.code, 1);
  assert.deepEqual(
    lines(bad.stdout).map((l) => [l.ok, l.exitCode]),
    [[false, 3]],
  );
});

test("call, eval, put and get", async () => {
  const tasks = fileURLToPath(new URL("./fixtures/tasks.ts", import.meta.url));
  const call = await mitogen(["call", "local", `${tasks}#add`, "[2, 3]"]);
  assert.equal(call.code, 0, call.stderr);
  assert.equal(lines(call.stdout)[0]?.result, 5);
  const missing = await mitogen(["call", "local", `${tasks}#nothing`]);
  assert.equal(missing.code, 1);
  assert.match(String(lines(missing.stdout)[0]?.error), /no exported function nothing/);
  const ev = await mitogen(["eval", "local", "1 + 2 * 3"]);
  assert.equal(lines(ev.stdout)[0]?.result, 7);
  const src = join(scratch, "payload.bin");
  writeFileSync(src, "some bytes\n");
  const put = await mitogen(["put", "local", src, join(scratch, "put.bin")]);
  assert.equal(put.code, 0, put.stderr);
  assert.equal(readFileSync(join(scratch, "put.bin"), "utf8"), "some bytes\n");
  const get = await mitogen(["get", "local", src, join(scratch, "got")]);
  assert.equal(get.code, 0, get.stderr);
  assert.equal(readFileSync(join(scratch, "got", "local", "payload.bin"), "utf8"), "some bytes\n");
});

test("put of a FIFO: a clear error for the host, exit 1, at once (no timeout, no hang)", async () => {
  const fifo = join(scratch, "fifo");
  await promisify(execFile)("mkfifo", [fifo]);
  const t0 = Date.now();
  // --timeout 20000: what a hang would print first; the run itself is bounded at 60 s.
  const r = await mitogen(["put", "local", fifo, join(scratch, "from-fifo"), "--timeout", "20000"]);
  assert.equal(r.code, 1, `exit 1, not killed: ${r.stdout}${r.stderr}`);
  const [line] = lines(r.stdout);
  assert.deepEqual([line?.host, line?.ok], ["local", false]);
  assert.equal(line?.error, `cannot read ${fifo} in master: not a regular file but a FIFO (named pipe); only regular files can be sent`);
  assert.doesNotMatch(r.stdout, /timed out/);
  assert.ok(Date.now() - t0 < 20_000, `done in ${Date.now() - t0} ms, before --timeout`);
  assert.equal(existsSync(join(scratch, "from-fifo")), false);
});

test("--forks 1 runs the hosts one after another, --forks 10 at once", async () => {
  const cmd = ["--", "echo start $(date +%s%N); sleep 1; echo end $(date +%s%N)"];
  const spans = (stdout: string) =>
    lines(stdout)
      .map((l) => {
        const m = /start (\d+)\nend (\d+)/.exec(String(l.stdout));
        assert.ok(m, String(l.stdout));
        return [Number(m[1]) / 1e6, Number(m[2]) / 1e6] as const;
      })
      .sort((x, y) => x[0] - y[0]);
  const one = spans((await mitogen(["run", "local,local,local", "--forks", "1", ...cmd])).stdout);
  assert.equal(one.length, 3);
  for (let i = 1; i < one.length; i++) assert.ok((one[i]?.[0] as number) >= (one[i - 1]?.[1] as number), "no overlap with --forks 1");
  const many = spans((await mitogen(["run", "local,local,local", "--forks", "10", ...cmd])).stdout);
  assert.ok(Math.max(...many.map((s) => s[0])) < Math.min(...many.map((s) => s[1])), "all three run at once with --forks 10");
});

test("usage errors exit 2 with the command's usage; --help on every command; help and --version", async () => {
  for (const args of [
    ["run", "local", "--bogus", "--", "true"],
    ["run", "local"],
    ["run"],
    ["call", "local"],
    ["put", "local", "a"],
    ["run", "local", "--forks", "0", "--", "x"],
    ["frobnicate"],
  ]) {
    const r = await mitogen(args);
    assert.equal(r.code, 2, args.join(" "));
    assert.match(r.stderr, /usage: mitogen/, args.join(" "));
    assert.equal(r.stdout, "", "nothing on stdout");
  }
  for (const c of [...Object.keys(COMMANDS), "demo"]) {
    const r = await mitogen([c, "--help"]);
    assert.equal(r.code, 0, c);
    assert.match(r.stdout, new RegExp(`^usage: mitogen ${c}`), c);
    const h = await mitogen(["help", c]);
    assert.equal(h.stdout, c === "demo" ? h.stdout : r.stdout);
  }
  const v = await mitogen(["--version"]);
  const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version: string };
  assert.equal(v.stdout, `mitogen ${pkg.version}\n`);
  // The single file copied alone, with no package.json anywhere near it, still knows its version.
  const alone = mkdtempSync(join(tmpdir(), "mitogen-alone-"));
  try {
    writeFileSync(join(alone, "mitogen.mjs"), readFileSync(DIST));
    const copied = await promisify(execFile)(node, [join(alone, "mitogen.mjs"), "--version"]);
    assert.equal(copied.stdout, `mitogen ${pkg.version}\n`);
  } finally {
    rmSync(alone, { recursive: true, force: true });
  }
  const help = await mitogen(["help"]);
  assert.equal(help.code, 0);
  for (const c of Object.keys(COMMANDS)) assert.match(help.stdout, new RegExp(`\\n  ${c} `));
});

test("on a terminal: a live per-host list, then each host's output and a summary", {
  skip: findProgram("script") ? false : "needs script (util-linux)",
}, async () => {
  const out = await new Promise<string>((resolve, reject) => {
    const cmd = `${node} ${DIST} run local,local -- 'echo hi'`;
    execFile("script", ["-qfec", cmd, "/dev/null"], { timeout: 60_000, env: { ...process.env, NO_COLOR: "1" } }, (err, stdout) =>
      err && !stdout ? reject(err) : resolve(stdout),
    );
  });
  const escapes = new RegExp(`${String.fromCharCode(27)}\\[[0-9;?]*[A-Za-z]`, "g");
  const plain = out.replace(escapes, "").replace(/\r/g, "");
  assert.match(plain, /connecting|running/, "the list showed hosts under way");
  assert.match(plain, /✔ local\s+ok/);
  assert.match(plain, /✔ local#2\s+ok/);
  assert.match(plain, /^local: hi$/m);
  assert.match(plain, /2 ok, 0 failed; slowest local(#2)? \(\d+\.\d s\)/);
});

/** `mitogen ...args` with `input` on its stdin (then closed), and `env` added. */
function mitogenFed(args: string[], input: string, env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((done) => {
    const child = spawn(node, [DIST, ...args], { env: { ...process.env, NO_COLOR: "1", ...env }, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d));
    child.stderr.on("data", (d: Buffer) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
    child.on("close", (code) => {
      clearTimeout(timer);
      done({ code: code ?? 1, stdout, stderr });
    });
    child.stdin.end(input);
  });
}

test("-I sends stdin to every host's command; without it input on stdin is refused, not dropped", async () => {
  const fed = await mitogenFed(["run", "local,local", "-I", "--json", "--", "cat; echo end"], "line one\nline two\n");
  assert.equal(fed.code, 0, fed.stderr);
  assert.deepEqual(
    lines(fed.stdout).map((l) => l.stdout),
    ["line one\nline two\nend\n", "line one\nline two\nend\n"],
  );
  // A shell's pipe, as `echo x | mitogen run ...` makes.
  const piped = (args: string) =>
    new Promise<{ code: number; stderr: string }>((done) =>
      execFile("/bin/sh", ["-c", `printf 'lost?\\n' | "$0" "$1" ${args}`, node, DIST], { timeout: 60_000 }, (err, _out, stderr) =>
        done({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stderr }),
      ),
    );
  const dropped = await piped("run local --json -- cat");
  assert.equal(dropped.code, 2);
  assert.match(dropped.stderr, /^mitogen run: stdin holds input, which would be dropped: give -I \(--stdin\)/);
  const evalPiped = await piped("eval local 1");
  assert.equal(evalPiped.code, 2);
  assert.match(evalPiped.stderr, /eval reads no input: redirect stdin from \/dev\/null/);
  const notRun = await mitogenFed(["eval", "local", "1", "-I"], "x");
  assert.equal(notRun.code, 2);
  assert.match(notRun.stderr, /--stdin is for run/);
  // An empty pipe left open (as this test's other commands have) is no input.
  const r = await mitogen(["run", "local", "--json", "--", "cat </dev/null; echo ok"]);
  assert.equal(r.code, 0, r.stderr);
});

test("-b gathers identical output under its hosts; -o writes each host's output to files", async () => {
  const g = await mitogen(["run", "local,local,local", "-b", "--", "echo same"]);
  assert.equal(g.code, 0, g.stderr);
  assert.match(g.stdout, /^-+\nlocal,local#2,local#3 \(3\)\n-+\nsame\n\n3 ok, 0 failed; slowest /);
  // Each its own pid: two groups of one.
  const split = await mitogen(["run", "local,local", "-b", "--", "echo $$"]);
  assert.equal(split.stdout.match(/^local(#2)? \(1\)$/gm)?.length, 2, split.stdout);
  const fails = await mitogen(["run", "local,local", "--gather", "--", "echo x; exit 4"]);
  assert.equal(fails.code, 1);
  assert.match(fails.stdout, /local,local#2 \(2\)\n-+\nx\n\(exit 4\)\n/);
  assert.equal((await mitogen(["run", "local", "-b", "--json", "--", "true"])).code, 2);
  const dir = join(scratch, "out");
  const o = await mitogen(["run", "local,local", "-o", dir, "--json", "--", "echo out; echo err >&2"]);
  assert.equal(o.code, 0, o.stderr);
  for (const host of ["local", "local#2"]) {
    assert.equal(readFileSync(join(dir, `${host}.stdout`), "utf8"), "out\n");
    assert.equal(readFileSync(join(dir, `${host}.stderr`), "utf8"), "err\n");
  }
  const e = await mitogen(["eval", "local", "-o", dir, "6 * 7"]);
  assert.equal(e.code, 0, e.stderr);
  assert.equal(readFileSync(join(dir, "local.result"), "utf8"), "42\n");
});

test("call's help says how JSON_ARGS become arguments; an ssh error's trailing \\r is not in the record", async () => {
  const help = await mitogen(["call", "--help"]);
  assert.match(help.stdout, /JSON_ARGS is one JSON value: an array is spread as the arguments/);
  assert.match(help.stdout, /mitogen call web1 \.\/tasks\.ts#add '\[1, 2\]' +add\(1, 2\)/);
  // An ssh that fails as one on a terminal does: its lines end with \r\n.
  const bin = join(scratch, "crlf-bin");
  mkdirSync(bin, { recursive: true });
  writeFileSync(join(bin, "ssh"), "#!/bin/sh\nprintf 'ssh: connect to host web1 port 22: Connection refused\\r\\n' >&2\nexit 255\n", { mode: 0o755 });
  const r = await mitogenFed(["run", "web1", "--json", "--", "true"], "", { PATH: `${bin}:${process.env.PATH}` });
  assert.equal(r.code, 1);
  const [line] = lines(r.stdout);
  assert.match(String(line?.error), /Connection refused/);
  assert.doesNotMatch(String(line?.error), /\r/);
});

test("a missing runtime is that host's error, in the library's words; the others go on", async () => {
  const r = await mitogen(["run", "local,local", "--runtime", "/no/such/node", "--", "true"]);
  assert.equal(r.code, 1);
  const got = lines(r.stdout);
  assert.equal(got.length, 2);
  for (const l of got) assert.match(String(l.error), /no\/such\/node/);
});

test("targets files: a cycle is named, a huge or non-regular file refused, a bad line named by number and not shown, a missing file is a usage error", async () => {
  const a = join(scratch, "cycle-a.txt");
  const b = join(scratch, "cycle-b.txt");
  writeFileSync(a, `web1\n@${b}\n`);
  writeFileSync(b, `web2\n@${a}\n`);
  assert.throws(() => parseTargets(`@${a}`), { name: "UsageError", message: `targets file ${a} includes itself: ${a} -> ${b} -> ${a}` });
  const self = join(scratch, "self.txt");
  writeFileSync(self, `@${self}\n`);
  assert.throws(() => parseTargets(`@${self}`), { name: "UsageError", message: `targets file ${self} includes itself: ${self} -> ${self}` });
  // the same file twice side by side is no cycle
  assert.deepEqual(
    parseTargets(`@${b.replace("cycle-b", "plain")},@${b.replace("cycle-b", "plain")}`, () => "h1\n").map((t) => t.label),
    ["h1", "h1#2"],
  );
  assert.throws(() => parseTargets("@/dev/zero"), { name: "UsageError", message: "targets file /dev/zero is not a regular file" });
  const huge = join(scratch, "huge.txt");
  writeFileSync(huge, "h\n".repeat(600 * 1024));
  assert.throws(() => parseTargets(`@${huge}`), { name: "UsageError", message: /^targets file .*huge\.txt is over 1048576 bytes/ });
  const secret = join(scratch, "not-hosts.txt");
  writeFileSync(secret, "web1\nroot:$6$s3cr3t-hash$:19000:0:99999:7:::\n");
  assert.throws(
    () => parseTargets(`@${secret}`),
    (err: Error) =>
      err.name === "UsageError" && err.message.startsWith(`line 2 of targets file ${secret} is not a target list`) && !err.message.includes("s3cr3t"),
  );
  const missing = await mitogen(["run", `@${join(scratch, "no-such-hosts.txt")}`, "--", "true"]);
  assert.equal(missing.code, 2, missing.stderr);
  assert.match(missing.stderr, /cannot read targets file .*no-such-hosts\.txt: ENOENT/);
  const shadow = await mitogen(["run", `@${secret}`, "--", "true"]);
  assert.equal(shadow.code, 2);
  assert.ok(!shadow.stderr.includes("s3cr3t"), shadow.stderr);
});

test("a --password-file open to group or others is refused, as ssh refuses such a key", async () => {
  const pw = join(scratch, "password");
  writeFileSync(pw, "hunter2\n", { mode: 0o644 });
  const r = await mitogen(["run", "local", "--password-file", pw, "--json", "--", "true"]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--password-file .*password is open to group or others \(mode 0644\).*chmod 600/);
  assert.equal(r.stdout, "");
  chmodSync(pw, 0o600);
  const ok = await mitogen(["run", "local", "--password-file", pw, "--json", "--", "true"]);
  assert.equal(ok.code, 0, ok.stderr);
});

/** Start `mitogen ...args`, sampling its RSS (from /proc) every 20 ms; its exit code, stdout and highest RSS in bytes. */
function sampled(args: string[]): Promise<{ code: number | null; stdout: string; maxRss: number }> {
  return new Promise((resolve, reject) => {
    const child = spawn(node, [DIST, ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "1" } });
    let stdout = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.resume();
    let maxRss = 0;
    const poll = setInterval(() => {
      try {
        const kb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, "latin1"))?.[1] ?? 0);
        maxRss = Math.max(maxRss, kb * 1024);
      } catch {
        // exited
      }
    }, 20);
    const limit = setTimeout(() => child.kill("SIGKILL"), 120_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearInterval(poll);
      clearTimeout(limit);
      resolve({ code, stdout, maxRss });
    });
  });
}

test("what a target prints through eval and call is in its record, cut to a bound with a note; the CLI's memory stays bounded while it prints 200 MiB", async () => {
  const base = await sampled(["eval", "local", "--json", "1"]);
  assert.equal(base.code, 0);
  const flood = `(() => { const b = ("y".repeat(1023) + "\\n").repeat(1024); for (let i = 0; i < 200; i++) process.stdout.write(b); console.error("the end"); return 7 })()`;
  const big = await sampled(["eval", "local", "--json", flood]);
  assert.equal(big.code, 0);
  const [rec] = lines(big.stdout);
  assert.equal(rec?.result, 7);
  const output = String(rec?.output);
  assert.ok(output.startsWith("y".repeat(1023)), "the first lines are shown");
  assert.match(output, /\[mitogen: \d+ more bytes cut; 1048576 kept\]\n$/);
  assert.ok(output.length < 1.1 * 1024 * 1024, `output of ${output.length} bytes`);
  const grew = (big.maxRss - base.maxRss) / 2 ** 20;
  assert.ok(grew < 150, `the CLI grew by ${grew.toFixed(0)} MiB (from ${(base.maxRss / 2 ** 20).toFixed(0)} MiB)`);
  const small = await mitogen(["eval", "local,local", "--json", `(console.log("said"), console.error("warned"), 1)`]);
  assert.deepEqual(
    lines(small.stdout).map((l) => l.output),
    ["said\nwarned\n", "said\nwarned\n"],
  );
  const tasks = fileURLToPath(new URL("./fixtures/tasks.ts", import.meta.url));
  const call = await mitogen(["call", "local", `${tasks}#add`, "[2, 3]"]);
  assert.equal(lines(call.stdout)[0]?.result, 5);
});

/** Start `mitogen ...args`; resolves once `ready()` holds (polled), with the child and its exit. */
async function started(args: string[], ready: () => boolean): Promise<{ child: ChildProcess; exit: Promise<{ code: number | null; stdout: string }> }> {
  const child = spawn(node, [DIST, ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "1" } });
  let stdout = "";
  child.stdout?.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr?.resume();
  const exit = new Promise<{ code: number | null; stdout: string }>((resolve) => child.on("close", (code) => resolve({ code, stdout })));
  try {
    await waitFor(ready, 30_000, `mitogen ${args.join(" ")} to get going`);
  } catch (err) {
    child.kill("SIGKILL");
    await exit;
    throw err;
  }
  return { child, exit };
}

/** The processes of commands running `marker` (a `sleep N`): the sleeps themselves and their shells. */
const sleeping = (marker: string) => leakedProcesses().filter((p) => p.cmd.startsWith(marker) || p.cmd.startsWith(`/bin/sh -c echo started; ${marker}`));
/** How many `marker` sleeps run. */
const asleep = (marker: string) => leakedProcesses().filter((p) => p.cmd.startsWith(marker)).length;

for (const [signal, code] of [
  ["SIGTERM", 143],
  ["SIGHUP", 129],
  ["SIGINT", 130],
] as const) {
  test(`${signal} stops the command on every host (its process group is killed), writes a record for each, interrupted, and exits ${code}`, async () => {
    const marker = `sleep 6${code}`;
    const { child, exit } = await started(
      ["run", "local,local,local", "--forks", "2", "--json", "--", `echo started; ${marker}; echo never`],
      () => asleep(marker) === 2,
    );
    process.kill(child.pid as number, signal); // not child.kill(): Deno then reports that signal, not the exit code
    const r = await exit;
    assert.equal(r.code, code);
    const got = lines(r.stdout).sort((x, y) => String(x.host).localeCompare(String(y.host)));
    assert.deepEqual(
      got.map((l) => [l.host, l.ok, l.interrupted, l.error]),
      [
        ["local", false, true, `interrupted (${signal})`],
        ["local#2", false, true, `interrupted (${signal})`],
        ["local#3", false, true, `interrupted (${signal}) before it started`],
      ],
    );
    assert.deepEqual(
      got.slice(0, 2).map((l) => l.stdout),
      ["started\n", "started\n"],
    );
    assert.deepEqual(sleeping(marker), [], "no command left running");
  });
}

test("--timeout stops a command that runs too long: its process group is killed, its output so far kept", async () => {
  const r = await mitogen(["run", "local", "--timeout", "3000", "--json", "--", "echo started; sleep 677; echo never"]);
  assert.equal(r.code, 1);
  assert.deepEqual(
    lines(r.stdout).map((l) => [l.ok, l.error, l.stdout, l.interrupted]),
    [[false, "timed out after 3000 ms", "started\n", undefined]],
  );
  assert.deepEqual(sleeping("sleep 677"), [], "no command left running");
});

test("Ctrl-C on a terminal stops every host's command: the live list and summary say interrupted, exit 130", {
  skip: findProgram("script") ? false : "needs script (util-linux)",
}, async () => {
  const marker = "sleep 699";
  const cmd = `${node} ${DIST} run local,local -- 'echo started; ${marker}'`;
  const { out, code } = await new Promise<{ out: string; code: number | null }>((resolve) => {
    const child = spawn("script", ["-qfec", cmd, "/dev/null"], { env: { ...process.env, NO_COLOR: "1" }, stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.resume();
    const limit = setTimeout(() => child.kill("SIGKILL"), 60_000);
    child.on("close", (c) => {
      clearTimeout(limit);
      resolve({ out, code: c });
    });
    void waitFor(() => asleep(marker) === 2, 30_000, "both commands to run").then(
      () => child.stdin.write("\x03"),
      () => child.kill("SIGKILL"),
    );
  });
  const escapes = new RegExp(`${String.fromCharCode(27)}\\[[0-9;?]*[A-Za-z]`, "g");
  const plain = out.replace(escapes, "").replace(/\r/g, "");
  assert.equal(code, 130, plain);
  assert.match(plain, /✖ local\s+interrupted/);
  assert.match(plain, /✖ local#2\s+interrupted/);
  assert.match(plain, /^local: started$/m);
  assert.match(plain, /^local: interrupted \(SIGINT\)$/m);
  assert.match(plain, /0 ok, 0 failed, 2 interrupted/);
  assert.deepEqual(sleeping(marker), [], "no command left running");
});
