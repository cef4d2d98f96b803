/**
 * The `mitogen` command (dist/mitogen.mjs run as a process) on local
 * targets: JSON lines, exit codes, every command, --forks, usage errors,
 * help, and the live list under a pty. Over ssh: cli-hosts.test.ts.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, test } from "node:test";
import { COMMANDS, parseTargets } from "../command.ts";
import { DIST, mitogen as run, NODE as node } from "./command-runner.ts";
import { checkLeaks } from "./helpers.ts";
import { findProgram } from "./hosts.ts";

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

test("a missing runtime is that host's error, in the library's words; the others go on", async () => {
  const r = await mitogen(["run", "local,local", "--runtime", "/no/such/node", "--", "true"]);
  assert.equal(r.code, 1);
  const got = lines(r.stdout);
  assert.equal(got.length, 2);
  for (const l of got) assert.match(String(l.error), /no\/such\/node/);
});
