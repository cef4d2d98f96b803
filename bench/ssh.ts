/**
 * Calls over ssh on the lab's hosts: ssh boot + first call against ssh
 * running the runtime evaluating nothing, call round trips one and two ssh
 * hops away against ssh echo ping-pongs over the same path, and calls to
 * root on inner (master -> ssh bastion -> ssh inner -> sudo root).
 *
 * @module
 */
import type { TestHosts } from "../lab/hosts.ts";
import type { Context } from "../mod.ts";
import { shellQuote } from "../firststage.ts";
import { bounded, num, perOpMicros, type Scope, spread, stats, timeMs } from "./lib.ts";
import {
  detail,
  failed,
  newRouter,
  P,
  pairText,
  pidOf,
  ratioCell,
  ratioRow,
  ratios,
  type Rounds,
  rounds,
  row,
  rt,
  runtime,
  waitGone,
  zero,
} from "./harness.ts";
import { bastionOptions, type HostMeasure, hostEval, hostRuntime, type OnHosts, SSH_CONNECT_MS, type SshTap, shown } from "./on-hosts.ts";
import { commandToExit, RawPeer, remoteEcho } from "./raw.ts";

// ---------------------------------------------------------------------------
// ssh boot + first call

const SSH_NAME = "ssh boot + call, bastion";

/** The ssh boot's raw command line as run (for the footer), once it ran. */
let sshBootShown = "";

/** Where one mitogen ssh boot spent its time (ms). */
interface SshSplit {
  connect: number;
  call: number;
  shutdown: number;
}

/**
 * One `router.ssh()` to bastion + one call + `shutdown({ wait: true })` (which
 * resolves once the ssh client has exited), with a router of its own; then
 * wait until the remote child is gone (the hosts share this machine's pids).
 */
async function sshBootOnce(scope: Scope, hosts: TestHosts, extra: { compression?: boolean; sshPath?: string }, split?: SshSplit[]): Promise<void> {
  let pid: number;
  const t0 = performance.now();
  let t1 = t0;
  let t2 = t0;
  {
    await using router = scope.add(newRouter());
    const ctx = await router.ssh(bastionOptions(hosts, extra));
    t1 = performance.now();
    pid = await ctx.call(pidOf);
    t2 = performance.now();
    await ctx.shutdown({ wait: true });
  }
  await waitGone(pid);
  split?.push({ connect: t1 - t0, call: t2 - t1, shutdown: performance.now() - t2 });
}

async function benchSshBoot(hosts: TestHosts, tap: SshTap): Promise<void> {
  try {
    const r = await bounded(60_000, async (scope) => {
      // Warm up (the first connection pays for sshd's and node's caches on both sides), through the
      // wrappers: what ssh() runs by default, and with compression: true.
      await sshBootOnce(scope, hosts, { sshPath: tap.path("boot") });
      await sshBootOnce(scope, hosts, { compression: true, sshPath: tap.path("boot-c") });
      const argv = { def: [...tap.prefix("boot"), hostEval], c: [...tap.prefix("boot-c"), hostEval] };
      sshBootShown = shown(tap.prefix("boot"), hosts.sshConfigFile);
      const mito = (c: boolean, split?: SshSplit[]) => timeMs(() => sshBootOnce(scope, hosts, c ? { compression: true } : {}, split));
      const raw = (c: boolean) => timeMs(() => commandToExit(c ? argv.c : argv.def, SSH_CONNECT_MS));
      await raw(false);
      await raw(true);
      // Each side measures by default and with compression, the order flipping every round.
      const alt = { mito: [] as number[], raw: [] as number[] };
      const split: SshSplit[] = [];
      const both = async (side: (c: boolean) => Promise<number>, alts: number[], round: number) => {
        let main: number;
        if (round % 2) {
          alts.push(await side(true));
          main = await side(false);
        } else {
          main = await side(false);
          alts.push(await side(true));
        }
        return main;
      };
      let mr = 0;
      let rr = 0;
      const main = await rounds(
        P.sshRounds,
        20_000 * P.budget,
        () => both((c) => mito(c, c ? undefined : split), alt.mito, mr++),
        () => both(raw, alt.raw, rr++),
      );
      return { main, alt, split, compressedByDefault: argv.def.includes("-C") };
    });
    ratioRow(SSH_NAME, r.main, 0, " ms", 1.05, "<= 1.05x");
    detail(`with compression: true (ssh -C on both sides): ${pairText(r.alt, 0, " ms")}${r.compressedByDefault ? " (the default is -C already)" : ""}`);
    const part = (k: keyof SshSplit) => spread(stats(r.split.map((s) => s[k])), 1, " ms");
    detail(`mitogen (default) split: ssh() to connected ${part("connect")}, first call ${part("call")}, shutdown to both exits ${part("shutdown")}`);
  } catch (err) {
    failed(SSH_NAME, err);
  }
}

/** ssh() to bastion, one call, shutdown, to both exits. */
export const sshBoot: HostMeasure = {
  key: "ssh-boot",
  run: ({ hosts, tap }: OnHosts) => benchSshBoot(hosts, tap),
  skip: (why) => row(SSH_NAME, `SKIP: ${why}`, "", "", "<= 1.05x", "SKIP"),
  reference: () => [
    `\`${sshBootShown || "ssh <the options mitogen's ssh() passed> -- bastion"} ${JSON.stringify(hostEval)}\` spawn to exit;`,
    "the options are those mitogen's ssh() ran (recorded by an sshPath wrapper), by default on the main line and with compression: true in the detail;",
    "mitogen: new Router, ssh() with -F <config>, one call, shutdown, ssh and remote child exited",
  ],
};

// ---------------------------------------------------------------------------
// call round trip one and two ssh hops away, against ssh echo ping-pongs over the same path

const SSH_RTT_NAME = "call RTT, 1 ssh hop";
const SSH_RTT2_NAME = "call RTT, 2 ssh hops";

/** The one- and two-hop raw command lines as run (for the footer). */
const sshRttShown = { one: "", two: "" };

async function benchSshRtt(hosts: TestHosts, tap: SshTap): Promise<void> {
  try {
    const r = await bounded(90_000, async (scope) => {
      const router = scope.add(newRouter());
      // Through the wrappers, which exec ssh: the same processes and pipes as without them.
      const bastion = await router.ssh(bastionOptions(hosts, { sshPath: tap.path("rtt-bastion") }));
      await bastion.connected(); // ssh has run the wrapper, which recorded its argv
      const outer = tap.prefix("rtt-bastion");
      const echoCommand = remoteEcho(rt.kind, hostRuntime);
      sshRttShown.one = shown(outer, hosts.sshConfigFile);
      /** One hop: bastion, and `ssh bastion <echo>`. */
      const one = async (): Promise<[Context, string[]]> => [bastion, [...outer, echoCommand]];
      /** Two hops: inner via bastion, and bastion's shell running the inner ssh (as bastion's context does), its words quoted once more. */
      const two = async (): Promise<[Context, string[]]> => {
        const inner = await router.ssh({
          hostname: hosts.inner.address,
          via: bastion,
          name: "inner",
          connectTimeout: SSH_CONNECT_MS,
          runtime: hostRuntime,
          sshPath: tap.path("rtt-inner"),
        });
        await inner.connected();
        const prefix = tap.prefix("rtt-inner");
        sshRttShown.two = `${shown(outer, hosts.sshConfigFile)} "${shown(prefix, hosts.sshConfigFile)} <echo>"`;
        return [inner, [...outer, [...prefix, echoCommand].map(shellQuote).join(" ")]];
      };
      const ping = new Uint8Array([1]);
      const out: Partial<Record<"one" | "two", Rounds>> = {};
      for (const [hop, setup] of [
        ["one", one],
        ["two", two],
      ] as const) {
        const [ctx, argv] = await setup();
        const peer = scope.add(RawPeer.command(argv));
        const call = () => ctx.call(zero);
        const echo = () => peer.roundTrip(ping);
        // warm up; the first echo also waits for ssh to connect and the remote runtime to start
        await perOpMicros(call, 1000, 800);
        await perOpMicros(echo, 1000, 800 + SSH_CONNECT_MS);
        out[hop] = await rounds(
          P.rounds,
          15_000 * P.budget,
          () => perOpMicros(call, P.hopOps, P.hopMs),
          () => perOpMicros(echo, P.hopOps, P.hopMs),
        );
      }
      return out;
    });
    for (const [name, hop, goal] of [
      [SSH_RTT_NAME, r.one, 1.2],
      [SSH_RTT2_NAME, r.two, 1.3],
    ] as const) {
      if (!hop) continue;
      ratioRow(name, hop, 0, " us", goal, `<= ${goal}x`);
    }
    if (r.one && r.two) {
      const { one, two } = r;
      const added = (side: "mito" | "raw") => num(stats(two[side]).median - stats(one[side]).median, 0);
      detail(`the hop through bastion adds: mitogen ${added("mito")} us (its context relays), raw ${added("raw")} us (bastion's ssh client)`);
    }
  } catch (err) {
    failed(`${SSH_RTT_NAME} / ${SSH_RTT2_NAME}`, err);
  }
}

/** Calls one ssh hop away (bastion), and two (inner via bastion). */
export const sshRoundTrip: HostMeasure = {
  key: "ssh-rtt",
  run: ({ hosts, tap }: OnHosts) => benchSshRtt(hosts, tap),
  skip: (why) => {
    row(SSH_RTT_NAME, `SKIP: ${why}`, "", "", "<= 1.2x", "SKIP");
    row(SSH_RTT2_NAME, `SKIP: ${why}`, "", "", "<= 1.3x", "SKIP");
  },
  reference: () => [
    `1 hop: one byte ping-pong with \`${sshRttShown.one || "ssh <the options mitogen's ssh() passed> -- bastion"} <echo>\` (the options recorded as for ssh-boot),`,
    `<echo> being \`${remoteEcho(rt.kind, hostRuntime)}\`; mitogen: ctx.call(() => 0) on a context started by ssh() to bastion`,
    `2 hops: one byte ping-pong with \`${sshRttShown.two || 'ssh ... -- bastion "ssh <the options bastion\'s ssh() passed> -- <inner> <echo>"'}\`: nested ssh, bastion's shell`,
    "runs the inner ssh client with the options the inner ssh() ran there; mitogen: ctx.call(() => 0) on ssh() to inner via bastion's context",
  ],
};

// ---------------------------------------------------------------------------
// calls to root on inner, through ssh, ssh and sudo

const TREE_NAME = "call to root on inner";

const uidOf = () => process.getuid?.() ?? -1;

async function benchTree(hosts: TestHosts): Promise<void> {
  try {
    const r = await bounded(60_000, async (scope) => {
      const router = scope.add(newRouter());
      const t0 = performance.now();
      const bastion = await router.ssh(bastionOptions(hosts));
      const t1 = performance.now();
      const inner = await router.ssh({ hostname: hosts.inner.address, via: bastion, name: "inner", connectTimeout: SSH_CONNECT_MS, runtime: hostRuntime });
      const t2 = performance.now();
      const root = await router.sudo({ username: "root", password: hosts.password, via: inner, name: "inner-root", connectTimeout: SSH_CONNECT_MS });
      const t3 = performance.now();
      const local = await router.local({ runtime, name: "tree-local" });
      const uids = await Promise.all([inner, root].map((c) => c.call(uidOf)));
      if (uids[0] === 0 || uids[1] !== 0) throw new Error(`expected inner as the test user and root below it, got uids ${uids.join(", ")}`);
      const levels: Context[] = [bastion, inner, root];
      const at = (ctx: Context) => perOpMicros(() => ctx.call(zero), P.hopOps, P.hopMs);
      for (const ctx of [...levels, local]) await perOpMicros(() => ctx.call(zero), 1000, 500);
      const depth: number[][] = [[], [], []];
      const measured = await rounds(
        P.rounds,
        15_000 * P.budget,
        async () => {
          const l = [await at(bastion), await at(inner), await at(root)];
          for (const [d, x] of l.entries()) depth[d]?.push(x);
          return l[2] as number;
        },
        () => at(local),
      );
      return { ...measured, depth, connect: [t1 - t0, t2 - t1, t3 - t2] };
    });
    const q = ratios(r.mito, r.raw);
    row(TREE_NAME, spread(stats(r.mito), 0, " us"), spread(stats(r.raw), 1, " us"), ratioCell(r, q, 1, "x"), "(info: no goal)", "");
    detail(`round trip to bastion / inner / root on inner: ${r.depth.map((x) => num(stats(x).median, 0)).join(" / ")} us (medians)`);
    detail(
      `connecting the tree: ssh bastion ${num(r.connect[0] ?? Number.NaN, 0)} ms, ssh inner via bastion ${num(r.connect[1] ?? Number.NaN, 0)} ms, sudo via inner ${num(r.connect[2] ?? Number.NaN, 0)} ms`,
    );
  } catch (err) {
    failed(TREE_NAME, err);
  }
}

/** Calls three levels deep, against the same call to a local child. */
export const rootOnInner: HostMeasure = {
  key: "tree",
  run: ({ hosts }: OnHosts) => benchTree(hosts),
  skip: (why) => row(TREE_NAME, `SKIP: ${why}`, "", "", "(info: no goal)", "SKIP"),
  reference: () => [
    "not raw: ctx.call(() => 0) round trip to a local child of the same master; mitogen: the same call to root on inner, master -> ssh bastion -> ssh inner -> sudo root",
  ],
};
