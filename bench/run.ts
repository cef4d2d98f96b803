/**
 * The benchmark suite (`npm run bench`). Every row sets mitogen against a
 * raw reference of the same shape measured in the same run, in alternating
 * order round by round, and reports the median of the rounds with the
 * spread (min..max) and its goal.
 *
 *   node --import tsx bench/run.ts [--runtime node|deno] [--quick] [--only call-rtt,boot,ssh-rtt] [--slow-link [D]]
 *
 * Each measure lives in a file named for what it measures (calls, boot,
 * bulk, sizes, imports, files, sessions, cli, ssh); bench/harness.ts holds
 * the options, the table and the rounds they share. "runtimes" runs once per
 * runtime of the matrix (lab/matrix.ts) that is installed (`bash
 * .ci/install-runtimes`). The measures of bench/ssh.ts, "put-hops" and
 * "rsync" run on the lab's netns hosts (lab/hosts.ts: root and sshd), or say
 * why they skip; so do those of bench/slowlink.ts (keys slow-*), which run only with `--slow-link
 * [D]` or when `--only` names them. The footer explains each measure's raw reference. For CPU
 * profiles of the call path, see bench/profile.ts.
 *
 * @module
 */
import { spawnSync } from "node:child_process";
import os from "node:os";
import { teardownHosts } from "../lab/hosts.ts";
import { boot, fleet, runtimes } from "./boot.ts";
import { echoThroughput, senderStream } from "./bulk.ts";
import { callRoundTrip, concurrentCalls, moduleCall, serviceCall, viaHop } from "./calls.ts";
import { cli } from "./cli.ts";
import { putHops, putLocal, rsync } from "./files.ts";
import {
  denoExe,
  detail,
  kind,
  logged,
  SLOW_LINK_DEFAULT_MS,
  SLOW_PREFIX,
  slowDelay,
  type Measure,
  options,
  P,
  quick,
  row,
  type Verdict,
  verdicts,
  wanted,
} from "./harness.ts";
import { runFleet } from "./fleet.ts";
import { firstImport } from "./imports.ts";
import { num } from "./lib.ts";
import { type HostMeasure, hostsUp, runOnHosts } from "./on-hosts.ts";
import { killAll } from "./raw.ts";
import { sessions } from "./sessions.ts";
import { sizes } from "./sizes.ts";
import { slowBoot, slowBulk, slowImport, slowVia } from "./slowlink.ts";
import { rootOnInner, sshBoot, sshRoundTrip } from "./ssh.ts";

/** The measures run here, in order. */
const LOCAL: readonly Measure[] = [
  callRoundTrip,
  boot,
  echoThroughput,
  viaHop,
  fleet,
  sizes,
  firstImport,
  moduleCall,
  serviceCall,
  concurrentCalls,
  senderStream,
  runtimes,
  putLocal,
  sessions,
  cli,
];
/** The measures run on the lab's hosts, set up once for all of them, in order. */
const ON_HOSTS: readonly HostMeasure[] = [sshBoot, sshRoundTrip, rootOnInner, putHops, rsync, slowBoot, slowImport, slowVia, slowBulk];

if (options.help) {
  console.log(
    "usage: node --import tsx bench/run.ts [--runtime node|deno] [--quick] [--only call-rtt,boot,ssh-rtt] [--slow-link [D]] [--hosts-wait s] | --fleet [--quick]",
  );
  console.log(
    `measures: ${LOCAL.map((m) => m.key).join(", ")} here; ${ON_HOSTS.map((m) => m.key).join(", ")} on the lab's hosts (root), those named slow-* only with --slow-link [D] (one-way delay, default ${SLOW_LINK_DEFAULT_MS} ms) or --only; profiles: bench/profile.ts`,
  );
  process.exit(0);
}
const known = new Set([...LOCAL, ...ON_HOSTS].map((m) => m.key));
for (const key of options.only?.split(",") ?? []) {
  if (!known.has(key.trim())) {
    console.error(`bench: no measure ${JSON.stringify(key)}; the measures are ${[...known].join(", ")}`);
    process.exit(2);
  }
}

// Whole-run guard: whatever hangs, the run ends (raw children killed; mitogen children see their parent go and exit;
// the lab's hosts, if up, torn down within 5 s).
const HARD_LIMIT_MS = options.fleet ? 1_200_000 : quick ? 240_000 : 600_000;
setTimeout(() => {
  console.error(`bench: gave up after ${HARD_LIMIT_MS / 1000} s`);
  killAll();
  const down = hostsUp() || options.fleet ? teardownHosts().catch(() => {}) : Promise.resolve();
  void Promise.race([down, new Promise((r) => setTimeout(r, 5000))]).finally(() => process.exit(1));
}, HARD_LIMIT_MS).unref();

function machine(): string {
  const cpu = os.cpus()[0]?.model.trim() ?? "unknown cpu";
  let extra = "";
  if (kind === "deno") {
    const v = spawnSync(denoExe, ["--version"], { encoding: "utf8", timeout: 10_000 });
    extra = `, ${v.stdout?.split("\n")[0]?.trim() || "deno ?"}`;
  }
  const load = os
    .loadavg()
    .map((x) => x.toFixed(2))
    .join(" ");
  return `${cpu}, ${os.cpus().length} cores, ${os.platform()} ${os.arch()}, node ${process.version}${extra}; load average ${load}`;
}

async function main(): Promise<number> {
  const t0 = performance.now();
  console.log(`mitogen bench on ${machine()}`);
  if (options.fleet) {
    // The fleet lines alone (bench/fleet.ts): minutes of ssh logins, not part of the default run.
    row("fleet line", "wall time", "raw (xargs ssh)", "ratio to raw", "goal", "");
    await runFleet();
    return verdicts.includes("ERROR") ? 1 : 0;
  }
  console.log(
    `children: ${kind}; ${quick ? "quick; " : ""}median [min..max] of ${P.rounds} rounds (echo: ${P.echoRounds}, fleet: ${P.fleetRounds}, ssh boot: ${P.sshRounds}, stream and putFile: ${P.bulkRounds}); ` +
      "ratio = mitogen / raw, paired per round; verdict on the median (echo: on the worst round)",
  );
  const onHosts = ON_HOSTS.filter((m) => wanted(m.key));
  if (onHosts.some((m) => m.key.startsWith(SLOW_PREFIX))) {
    console.log(
      `slow link: ssh to bastion through lab/slowlink.mjs, ${slowDelay} ms each way (round trip ${2 * slowDelay} ms); bastion to inner direct; ` +
        `RT = (mitogen - raw) / ${2 * slowDelay} ms, paired per round`,
    );
  }
  console.log("");
  row("measure", "mitogen", "raw reference", "ratio", "goal", "");
  const local = LOCAL.filter((m) => wanted(m.key));
  for (const m of local) await m.run();
  if (onHosts.length) await runOnHosts(onHosts);
  console.log("");
  console.log("raw references, measured in this run:");
  for (const m of [...local, ...onHosts]) {
    for (const [i, t] of m.reference().entries()) detail(`${i ? " ".repeat(m.key.length + 2) : `${m.key}: `}${t}`);
  }
  if (logged.length) {
    console.log("");
    console.log(`library log (${logged.length} records; first 10):`);
    for (const l of logged.slice(0, 10)) detail(`[${l.name}] ${l.source === "log" ? `${l.level}: ` : ""}${l.message}`);
  }
  const count = (v: Verdict) => verdicts.filter((x) => x === v).length;
  console.log("");
  console.log(
    `${count("PASS")} PASS, ${count("MISS")} MISS${count("FAIL") ? `, ${count("FAIL")} FAIL` : ""}${count("ERROR") ? `, ${count("ERROR")} ERROR` : ""}` +
      `${count("SKIP") ? `, ${count("SKIP")} SKIP` : ""}` +
      ` in ${num((performance.now() - t0) / 1000, 1)} s`,
  );
  return count("ERROR") || count("FAIL") ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    killAll();
    process.exit(1);
  },
);
