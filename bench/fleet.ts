/**
 * The fleet lines (`npm run bench -- --fleet`, issue 24): on lab/fleet.ts's
 * one sshd answering on many addresses, one command on 200 hosts and a
 * seven-step job (copy a file, five commands, read it back) on 50 hosts, 32
 * at a time, for `mitogen run` (cold, and with `mitogen serve`), one library
 * script doing the same, pdsh, pssh, and `xargs -P 32 ssh` (with scp for the
 * copies) as the raw reference. Each line prints its wall time, its ratio to
 * the raw reference and the peak RSS of its whole local process tree
 * (sampled from /proc: the tool and every process below it, ssh clients
 * included). Every host's output is checked in every line, and that no
 * process is left on the fleet (nor on bastion) after it.
 *
 * @module
 */
import { spawn, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmdirSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { childrenOf, type Fleet, fleetSettled, setupFleet } from "../lab/fleet.ts";
import { findProgram, teardownHosts } from "../lab/hosts.ts";
import { detail, quick, row } from "./harness.ts";
import { num, type Stats, spread, stats } from "./lib.ts";

/** Hosts at a time, every tool. */
const FORKS = 32;
/** The one-command line's hosts, and the job's. */
const WIDE = 200;
const JOB = 50;
const ROUNDS = quick ? 1 : 2;
/** Longest one tool invocation may take. */
const RUN_LIMIT_MS = 180_000;
/** How often the process tree's RSS is sampled. */
const SAMPLE_MS = 20;
const PAGE = 4096;
/** Each command prints this, then the ssh connection's variables: the address its sshd answered on proves which host ran it. */
const MARK = 'echo "fleet-ok $SSH_CONNECTION"';
const MARKED = /fleet-ok \S+ \d+ (\S+) \d+/g;

/** XDG_RUNTIME_DIR of the mitogen lines (private, 0700): the cold ones' holds no server, the serve line's its own. */
const runtimeDirs = { cold: "", serve: "" };
const dist = fileURLToPath(new URL("../dist/mitogen.mjs", import.meta.url));
const libScript = fileURLToPath(new URL("./fixtures/fleet-lib.mjs", import.meta.url));

/** Whether the built command has `mitogen serve`. */
const hasServe = (): boolean => spawnSync(process.execPath, [dist, "serve", "--help"], { stdio: "ignore", timeout: 30_000 }).status === 0;

/** What one invocation of a tool did. */
interface Ran {
  ms: number;
  /** Peak RSS of its process tree, bytes. */
  peak: number;
  stdout: string;
}

/**
 * CPU accounting (cgroup v1 cpuacct, where it can be made): the tool's tree in one group, the
 * fleet's and bastion's sshds (so every session and what it runs) in another. On this machine the
 * "hosts" share its cores, so a line's wall time pays for the hosts' CPU as well as its own.
 */
const CPUACCT = "/sys/fs/cgroup/cpuacct";
const GROUPS = { local: join(CPUACCT, "mitogen-bench-fleet-local"), remote: join(CPUACCT, "mitogen-bench-fleet-remote") };
let accounting = false;

function startAccounting(f: Fleet): void {
  try {
    for (const g of Object.values(GROUPS)) mkdirSync(g, { recursive: true });
    for (const pid of [f.sshdPid, sshdPid(f, "bastion")]) writeFileSync(join(GROUPS.remote, "cgroup.procs"), String(pid));
    accounting = true;
  } catch {
    accounting = false; // no cgroup v1 cpuacct here: no CPU figures
  }
}

/** Remove the groups (their processes have gone with the hosts). */
function endAccounting(): void {
  for (const g of Object.values(GROUPS)) {
    try {
      rmdirSync(g);
    } catch {
      // never made, or a process is still in it: left for the next run, which reuses it
    }
  }
}

/** CPU seconds used so far by the group, or 0 without accounting. */
function cpuOf(group: string): number {
  return accounting ? Number(readFileSync(join(group, "cpuacct.usage"), "latin1")) / 1e9 : 0;
}

/** The pid of lab host `name`'s sshd. */
function sshdPid(f: Fleet, name: string): number {
  return Number(readFileSync(join(f.dir, name, "sshd.pid"), "utf8").trim());
}

/** The RSS of `root` and every process below it, bytes (processes that went meanwhile are skipped). */
function treeRss(root: number): number {
  let total = 0;
  const stack = [root];
  for (let n = 0; stack.length && n < 10_000; n++) {
    const pid = stack.pop() as number;
    try {
      total += Number(readFileSync(`/proc/${pid}/statm`, "latin1").split(" ")[1]) * PAGE;
    } catch {
      continue; // gone meanwhile
    }
    stack.push(...childrenOf(pid));
  }
  return total;
}

/** Run `argv` to its exit 0 (else throw with its stderr's end), its tree's RSS sampled; stdout kept. */
function measured(argv: readonly string[], env: NodeJS.ProcessEnv = process.env, alsoSampled: readonly number[] = []): Promise<Ran> {
  // Into the local group first (the shell execs the tool: same pid, nothing added to the tree).
  const [exe, ...args] = accounting ? ["/bin/sh", "-c", `echo $$ > ${GROUPS.local}/cgroup.procs && exec "$@"`, "sh", ...argv] : (argv as [string, ...string[]]);
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const proc = spawn(exe as string, args, { stdio: ["ignore", "pipe", "pipe"], env });
    let peak = 0;
    const sample = () => {
      if (proc.pid)
        peak = Math.max(
          peak,
          [proc.pid, ...alsoSampled].reduce((sum, pid) => sum + treeRss(pid), 0),
        );
    };
    const sampler = setInterval(sample, SAMPLE_MS);
    let stdout = "";
    let stderr = "";
    proc.stdout.setEncoding("utf8").on("data", (s: string) => (stdout += s));
    proc.stderr.setEncoding("utf8").on("data", (s: string) => (stderr = (stderr + s).slice(-4000)));
    const timer = setTimeout(() => proc.kill("SIGKILL"), RUN_LIMIT_MS);
    proc.once("error", (err) => {
      clearInterval(sampler);
      clearTimeout(timer);
      reject(err);
    });
    proc.once("close", (code, signal) => {
      const ms = performance.now() - t0;
      clearInterval(sampler);
      clearTimeout(timer);
      if (code === 0) resolve({ ms, peak, stdout });
      else reject(new Error(`${argv.slice(0, 3).join(" ")}... exited (${signal ?? code}): ${stderr.trim().split("\n").slice(-3).join(" | ")}`));
    });
    sample();
  });
}

/** What a job does on each host, and where a tool finds each host's file read back. */
interface Job {
  name: string;
  hosts: string[];
  /** One address a line. */
  list: string;
  put?: { src: string; dst: string };
  commands: string[];
  get?: { src: string; out: string };
}

/** A tool: the invocations doing `job`, in order. */
interface Tool {
  name: string;
  /** Why it cannot run here, or undefined. */
  unavailable: () => string | undefined;
  steps: (f: Fleet, job: Job) => { argv: string[]; env?: NodeJS.ProcessEnv }[];
  /** Run with a `mitogen serve` of its own: started, the job run once to warm it, then the job measured (the server's tree included), the server stopped. */
  serve?: true;
  /** Where the file read back from `host` may land (the first that exists). */
  fetched: (job: Job, host: string) => string[];
}

const sshOpts = (f: Fleet) => ["-F", f.sshConfigFile];

const TOOLS: Tool[] = [
  {
    name: "xargs -P 32 ssh (raw)",
    unavailable: () => (findProgram("xargs") ? undefined : "no xargs"),
    steps: (f, job) => {
      const x = ["xargs", "-a", job.list, "-P", String(FORKS), "-I{}"];
      return [
        ...(job.put ? [{ argv: [...x, "scp", "-q", ...sshOpts(f), job.put.src, `{}:${job.put.dst}`] }] : []),
        ...job.commands.map((c) => ({ argv: [...x, "ssh", ...sshOpts(f), "{}", c] })),
        ...(job.get ? [{ argv: [...x, "scp", "-q", ...sshOpts(f), `{}:${job.get.src}`, join(job.get.out, "raw", "{}")] }] : []),
      ];
    },
    fetched: (job, host) => [join(job.get?.out ?? "", "raw", host)],
  },
  {
    name: "pdsh -R ssh -f 32",
    unavailable: () => (findProgram("pdsh") && findProgram("pdcp") && findProgram("rpdcp") ? undefined : "no pdsh (Debian: pdsh)"),
    steps: (f, job) => {
      const env = { ...process.env, PDSH_SSH_ARGS: `-F ${f.sshConfigFile} -x %h` };
      const w = ["-R", "ssh", "-f", String(FORKS), "-w", `^${job.list}`];
      return [
        ...(job.put ? [{ argv: ["pdcp", ...w, job.put.src, job.put.dst], env }] : []),
        ...job.commands.map((c) => ({ argv: ["pdsh", ...w, c], env })),
        ...(job.get ? [{ argv: ["rpdcp", ...w, job.get.src, join(job.get.out, "pdsh")], env }] : []),
      ];
    },
    fetched: (job, host) => [join(job.get?.out ?? "", "pdsh", `${basename(job.get?.src ?? "")}.${host}`)],
  },
  {
    name: "pssh -p 32",
    unavailable: () => (findProgram("parallel-ssh") ? undefined : "no parallel-ssh (Debian: pssh)"),
    steps: (f, job) => {
      const h = ["-h", job.list, "-p", String(FORKS), "-t", "0", "-x", `-F ${f.sshConfigFile}`];
      return [
        ...(job.put ? [{ argv: ["parallel-scp", ...h, job.put.src, job.put.dst] }] : []),
        ...job.commands.map((c) => ({ argv: ["parallel-ssh", ...h, "-P", c] })),
        ...(job.get ? [{ argv: ["parallel-slurp", ...h, "-L", join(job.get.out, "pssh"), job.get.src, "file"] }] : []),
      ];
    },
    // pssh 2.3.4 names the directory "<host>:None" where no port is given
    fetched: (job, host) => [host, `${host}:None`].map((d) => join(job.get?.out ?? "", "pssh", d, "file")),
  },
  ...(
    [
      ["mitogen run (cold)", []],
      ["mitogen run --via bastion", ["--via", "bastion"]],
      ["mitogen run (serve)", []],
    ] as const
  ).map(
    ([name, via]): Tool => ({
      name,
      ...(name === "mitogen run (serve)" ? { serve: true } : {}),
      unavailable: () => (name !== "mitogen run (serve)" || hasServe() ? undefined : "no `mitogen serve` in dist/mitogen.mjs (issue 24 item 6)"),
      steps: (f, job) => {
        // A runtime directory of the bench's own: the cold lines find no server there, the serve line its own.
        const env = { ...process.env, XDG_RUNTIME_DIR: name === "mitogen run (serve)" ? runtimeDirs.serve : runtimeDirs.cold };
        const m = (cmd: string) => [process.execPath, dist, cmd, `@${job.list}`, "--forks", String(FORKS), "--json", "-F", f.sshConfigFile, ...via];
        return [
          ...(job.put ? [{ argv: [...m("put"), job.put.src, job.put.dst], env }] : []),
          ...job.commands.map((c) => ({ argv: [...m("run"), "--", c], env })),
          ...(job.get ? [{ argv: [...m("get"), job.get.src, join(job.get.out, "mitogen")], env }] : []),
        ];
      },
      fetched: (job, host) => [join(job.get?.out ?? "", "mitogen", host, basename(job.get?.src ?? ""))],
    }),
  ),
  {
    name: "library (one script)",
    unavailable: () => undefined,
    steps: (f, job) => {
      const spec = {
        ...(job.put ? { put: [job.put.src, job.put.dst] } : {}),
        commands: job.commands,
        ...(job.get ? { get: [job.get.src, join(job.get.out, "lib")] } : {}),
      };
      return [{ argv: [process.execPath, libScript, job.list, f.sshConfigFile, String(FORKS), JSON.stringify(spec)] }];
    },
    fetched: (job, host) => [join(job.get?.out ?? "", "lib", host)],
  },
];

function basename(p: string): string {
  return p.slice(p.lastIndexOf("/") + 1);
}

/** Throw unless every host of `job` printed its mark in `stdout` (once per command). */
function checkMarks(job: Job, stdout: string, what: string): void {
  const seen = new Map<string, number>();
  for (const m of stdout.matchAll(MARKED)) seen.set(m[1] as string, (seen.get(m[1] as string) ?? 0) + 1);
  const missing = job.hosts.filter((h) => !seen.get(h));
  if (missing.length) throw new Error(`${what}: no output from ${missing.length} of ${job.hosts.length} hosts (${missing.slice(0, 3).join(", ")}...)`);
  const extra = [...seen.keys()].filter((h) => !job.hosts.includes(h));
  if (extra.length) throw new Error(`${what}: output from hosts not in the list: ${extra.slice(0, 3).join(", ")}`);
}

/**
 * Run `tool`'s steps for `job`: total wall time, the highest peak RSS of any step; every host's output
 * checked, then that nothing is left on the hosts. A serve tool's server is started and the job run once
 * before (untimed), and the server stopped after.
 */
async function runTool(f: Fleet, tool: Tool, job: Job, sha: string): Promise<Sample> {
  const cpu0 = { local: cpuOf(GROUPS.local), remote: cpuOf(GROUPS.remote) };
  if (job.get) {
    rmSync(job.get.out, { recursive: true, force: true });
    for (const d of ["raw", "pdsh", "pssh", "mitogen", "lib"]) mkdirSync(join(job.get.out, d), { recursive: true });
  }
  if (job.put) rmSync(job.put.dst, { force: true });
  let ms = 0;
  let peak = 0;
  let commandOut = "";
  const steps = tool.steps(f, job);
  let server: number[] = [];
  let cpu1: typeof cpu0;
  try {
    if (tool.serve) {
      const env = { ...process.env, XDG_RUNTIME_DIR: runtimeDirs.serve };
      const started = await measured([process.execPath, dist, "serve"], env);
      server = [Number(/pid (\d+)/.exec(started.stdout)?.[1])].filter((pid) => pid > 0);
      for (const step of steps) await measured(step.argv, step.env); // the contexts started, and kept
      if (job.get) {
        rmSync(join(job.get.out, "mitogen"), { recursive: true, force: true });
        mkdirSync(join(job.get.out, "mitogen"));
      }
      cpu0.local = cpuOf(GROUPS.local);
      cpu0.remote = cpuOf(GROUPS.remote);
    }
    for (const [i, step] of steps.entries()) {
      const r = await measured(step.argv, step.env, server);
      ms += r.ms;
      peak = Math.max(peak, r.peak);
      const isCommand = !(i === 0 && job.put) && !(i === steps.length - 1 && job.get);
      if (steps.length > 1 && isCommand) checkMarks(job, r.stdout, `${tool.name}, step ${i + 1}`);
      commandOut += r.stdout;
    }
    if (steps.length === 1) {
      // One invocation for the whole job: every command's mark from every host.
      const counts = new Map<string, number>();
      for (const m of commandOut.matchAll(MARKED)) counts.set(m[1] as string, (counts.get(m[1] as string) ?? 0) + 1);
      const short = job.hosts.filter((h) => (counts.get(h) ?? 0) < job.commands.length);
      if (short.length)
        throw new Error(`${tool.name}: ${short.length} hosts did not print all ${job.commands.length} marks (${short.slice(0, 3).join(", ")}...)`);
    }
    if (job.get) {
      for (const h of job.hosts) {
        const file = tool.fetched(job, h).find(existsSync);
        if (!file) throw new Error(`${tool.name}: ${h}'s file was not read back to ${tool.fetched(job, h).join(" or ")}`);
        if (createHash("sha256").update(readFileSync(file)).digest("hex") !== sha) throw new Error(`${tool.name}: ${h}'s file read back differs`);
      }
    }
    cpu1 = { local: cpuOf(GROUPS.local), remote: cpuOf(GROUPS.remote) };
  } finally {
    if (tool.serve) await measured([process.execPath, dist, "serve", "--stop"], { ...process.env, XDG_RUNTIME_DIR: runtimeDirs.serve }).catch(() => {});
  }
  await fleetSettled(f).catch((err: unknown) => {
    throw new Error(`${tool.name}: ${err instanceof Error ? err.message : String(err)}`);
  });
  return { ms, peak, local: cpu1.local - cpu0.local, remote: cpu1.remote - cpu0.remote };
}

/** One run of a tool: wall ms, peak RSS bytes, CPU seconds of its tree and of the hosts. */
interface Sample {
  ms: number;
  peak: number;
  local: number;
  remote: number;
}

const MIB = 1024 * 1024;

/** The rows of one job: each tool's wall time against raw, its peak RSS; the goals on `mitogen run (cold)`. */
function report(job: Job, results: Map<Tool, Sample[] | string>): void {
  const raw = results.get(TOOLS[0] as Tool);
  const pdsh = results.get(TOOLS[1] as Tool);
  const paired = (a: number[], b: number[] | undefined): Stats => stats(a.map((x, i) => x / (b?.[i] ?? Number.NaN)).filter(Number.isFinite));
  for (const tool of TOOLS) {
    const r = results.get(tool);
    const name = `${job.name}: ${tool.name}`;
    if (r === undefined) continue;
    if (typeof r === "string") {
      row(name, r, "", "", "", r.startsWith("ERROR") ? "ERROR" : "SKIP");
      continue;
    }
    const ms = r.map((x) => x.ms);
    const peak = r.map((x) => x.peak);
    const rawMs = typeof raw === "object" ? raw.map((x) => x.ms) : undefined;
    const ratio = rawMs ? spread(paired(ms, rawMs), 2, "x") : "";
    const rawCell = rawMs ? spread(stats(rawMs.map((x) => x / 1000)), 2, " s") : "";
    const cold = tool.name === "mitogen run (cold)" && typeof pdsh === "object";
    const againstPdsh = (k: "ms" | "peak") =>
      typeof pdsh === "object"
        ? paired(
            r.map((x) => x[k]),
            pdsh.map((x) => x[k]),
          )
        : undefined;
    const vsPdsh = againstPdsh("ms");
    const rssVsPdsh = againstPdsh("peak");
    const pass = cold && vsPdsh && rssVsPdsh ? (vsPdsh.median <= 1.1 && rssVsPdsh.median <= 2 ? "PASS" : "MISS") : "";
    row(name, spread(stats(ms.map((x) => x / 1000)), 2, " s"), rawCell, ratio, cold ? "<= 1.1x pdsh, RSS <= 2x" : "", pass);
    const perHost = (k: "local" | "remote") => spread(stats(r.map((x) => (x[k] * 1000) / job.hosts.length)), 0, " ms");
    detail(
      `peak RSS of the tree ${spread(stats(peak.map((x) => x / MIB)), 0, " MiB")}` +
        (vsPdsh && rssVsPdsh ? `; against pdsh: time ${spread(vsPdsh, 2, "x")}, RSS ${spread(rssVsPdsh, 2, "x")}` : "") +
        (accounting ? `; CPU per host: here ${perHost("local")}, on the hosts ${perHost("remote")}` : ""),
    );
  }
}

/** Set up the fleet, run every tool on both jobs, print the rows, tear the fleet down. */
export async function runFleet(): Promise<void> {
  const skipAll = (why: string) => row("fleet lines", `SKIP: ${why}`, "", "", "", "SKIP");
  if (!existsSync(dist)) return skipAll(`no ${dist} (npm run build)`);
  let f: Fleet;
  try {
    const got = await setupFleet(WIDE);
    if ("skip" in got) return skipAll(got.skip);
    f = got;
  } catch (err) {
    return skipAll(`fleet setup failed: ${err instanceof Error ? err.message.split("\n")[0] : String(err)}`);
  }
  const dir = mkdtempSync(join(os.tmpdir(), "mitogen-bench-fleet-"));
  runtimeDirs.cold = mkdtempSync(join(os.tmpdir(), "mitogen-bench-fleet-xdg-"));
  runtimeDirs.serve = mkdtempSync(join(os.tmpdir(), "mitogen-bench-fleet-xdg-"));
  startAccounting(f);
  try {
    const src = join(dir, "payload.bin");
    const content = randomBytes(1024 * 1024);
    writeFileSync(src, content);
    const sha = createHash("sha256").update(content).digest("hex");
    // The hosts share this filesystem: every host copies to the same path, which the test user can write.
    const remote = mkdtempSync(join(os.tmpdir(), "mitogen-bench-fleet-remote-"));
    const uid = Number(
      readFileSync("/etc/passwd", "utf8")
        .split("\n")
        .find((l) => l.startsWith(`${f.user}:`))
        ?.split(":")[2],
    );
    chownSync(remote, uid, uid);
    const dst = join(remote, "payload.bin");
    const listOf = (hosts: string[], name: string) => {
      const file = join(dir, name);
      writeFileSync(file, `${hosts.join("\n")}\n`);
      return file;
    };
    const wide: Job = { name: `1 command, ${WIDE} hosts`, hosts: f.addresses, list: listOf(f.addresses, "wide"), commands: [`uname -n >/dev/null && ${MARK}`] };
    const jobHosts = f.addresses.slice(0, JOB);
    const seven: Job = {
      name: `7 steps, ${JOB} hosts`,
      hosts: jobHosts,
      list: listOf(jobHosts, "job"),
      put: { src, dst },
      commands: [`sha256sum ${dst}`, `wc -c ${dst}`, "uname -n", "id -un", `ls -l ${dst}`].map((c) => `${c} && ${MARK}`),
      get: { src: dst, out: join(dir, "out") },
    };
    for (const job of [wide, seven]) {
      const results = new Map<Tool, Sample[] | string>();
      for (const t of TOOLS) {
        const why = t.unavailable();
        results.set(t, why ? `SKIP: ${why}` : []);
      }
      for (let round = 0; round < ROUNDS; round++) {
        for (let k = 0; k < TOOLS.length; k++) {
          const tool = TOOLS[(round + k) % TOOLS.length] as Tool;
          const acc = results.get(tool);
          if (typeof acc !== "object") continue;
          try {
            acc.push(await runTool(f, tool, job, sha));
          } catch (err) {
            results.set(tool, `ERROR: ${err instanceof Error ? err.message : String(err)}`);
          }
        }
      }
      report(job, results);
    }
    detail(
      `${FORKS} at a time; ${ROUNDS} round(s), tools in rotating order; one sshd (lab/fleet.ts) answers for every host, on this machine: ` +
        `its logins cost this machine's CPU too. Wall time of all the job's invocations; RSS: the tool's process tree, sampled every ${SAMPLE_MS} ms, ` +
        `summed per process (shared pages counted in each). raw: xargs -P ${FORKS} of ssh (scp for the copies); pdsh: pdsh/pdcp/rpdcp; pssh: parallel-ssh/-scp/-slurp.`,
    );
    detail(`${num(content.length / MIB, 0)} MiB file copied; commands print "fleet-ok $SSH_CONNECTION", checked for every host.`);
    rmSync(remote, { recursive: true, force: true });
  } finally {
    for (const d of [dir, runtimeDirs.cold, runtimeDirs.serve]) rmSync(d, { recursive: true, force: true });
    await teardownHosts();
    endAccounting();
  }
}
