/**
 * Measures over ssh run on the lab's hosts (lab/hosts.ts: network namespaces
 * with real sshds on this machine; root only), set up once for all of them,
 * with what they share: ssh() options to bastion, the hosts' runtime, and ssh
 * wrappers that record what mitogen's ssh() runs, so each raw reference runs
 * the same command line.
 *
 * @module
 */
import { chmodSync, existsSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { setupHosts, type TestHosts, teardownHosts } from "../lab/hosts.ts";
import type { SshOptions } from "../mod.ts";
import { shellQuote } from "../firststage.ts";
import { denoExe, detail, hostsWaitMs, kind } from "./harness.ts";

/** connectTimeout of every ssh() of the bench. */
export const SSH_CONNECT_MS = 20_000;

/** ssh() to bastion as every ssh measure starts it: the harness's ssh_config, the hosts' runtime; `extra` on top. */
export const bastionOptions = (hosts: TestHosts, extra: Partial<SshOptions> = {}): SshOptions => ({
  hostname: "bastion",
  sshArgs: ["-F", hosts.sshConfigFile],
  name: "bastion",
  connectTimeout: SSH_CONNECT_MS,
  runtime: hostRuntime,
  ...extra,
});

/**
 * The runtime on the hosts. They share this machine's filesystem but not the
 * runner's PATH: node is on the test user's PATH, deno is taken by absolute path.
 */
export const hostRuntime: string = kind === "node" ? "node" : realpathSync(denoExe);
/** The remote command of the raw reference: the runtime evaluating nothing, as mitogen's first stage starts it. */
export const hostEval: string = kind === "node" ? "node -e ''" : `DENO_NO_UPDATE_CHECK=1 exec ${shellQuote(hostRuntime)} eval ''`;

/**
 * ssh wrappers that record their argv and exec ssh. Given as `sshPath`, they
 * show the bench exactly what mitogen's ssh() runs, so each raw reference uses
 * the same options and config, whatever the library passes today. The hosts
 * share this filesystem, so a wrapper works for an ssh() `via` a host as well.
 */
export class SshTap implements AsyncDisposable {
  readonly dir: string;

  constructor() {
    this.dir = mkdtempSync(join(os.tmpdir(), "mitogen-bench-ssh-"));
    chmodSync(this.dir, 0o777); // the test user's ssh (via bastion) writes its argv here
  }

  /** The wrapper recording under `name`. */
  path(name: string): string {
    const file = join(this.dir, `${name}.sh`);
    const out = shellQuote(join(this.dir, `${name}.argv`));
    if (!existsSync(file)) writeFileSync(file, `#!/bin/sh\nprintf '%s\\0' "$@" > ${out}\nexec ssh "$@"\n`, { mode: 0o755 });
    return file;
  }

  /**
   * The ssh command line the wrapper `name` last ran, without its remote
   * command: `["ssh", ...options, "--", host]`.
   */
  prefix(name: string): string[] {
    const argv = readFileSync(join(this.dir, `${name}.argv`), "utf8")
      .split("\0")
      .slice(0, -1);
    if (argv.at(-3) !== "--") throw new Error(`ssh() ran an argv not ending in "-- <host> <command>": ${JSON.stringify(argv)}`);
    return ["ssh", ...argv.slice(0, -1)];
  }

  async [Symbol.asyncDispose](): Promise<void> {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A command line for the footer: words quoted, the config file as <config>. */
export function shown(argv: readonly string[], config: string): string {
  return argv.map((w) => (w === config ? "<config>" : shellQuote(w))).join(" ");
}

/** What a measure on the hosts is given. */
export interface OnHosts {
  hosts: TestHosts;
  tap: SshTap;
}

/** A measure that runs on the hosts. */
export interface HostMeasure {
  /** Its name for `--only` and in the footer. */
  key: string;
  /** Measure, and print the row(s). */
  run: (on: OnHosts) => Promise<void>;
  /** Print the row(s) as skipped, saying `why`. */
  skip: (why: string) => void;
  /** The raw reference, for the footer (read after the run, as some quote what it recorded). */
  reference: () => string[];
}

let up = false;
/** Whether the hosts are up (for the run's guard, which tears them down if it gives up). */
export const hostsUp = (): boolean => up;

/** Set up the hosts (bounded), run `measures` on them, tear them down. Where they cannot be set up, each measure's rows say why. */
export async function runOnHosts(measures: readonly HostMeasure[]): Promise<void> {
  const skipAll = (why: string) => {
    for (const m of measures) m.skip(why);
  };
  const setup = setupHosts();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<"late">((resolve) => (timer = setTimeout(() => resolve("late"), hostsWaitMs)));
  let hosts: TestHosts;
  try {
    const got = await Promise.race([setup, late]);
    if (got === "late") {
      // Whatever the setup still builds is torn down when it is done (waited for a little, below).
      const cleanup = setup.then((h) => ("skip" in h ? undefined : teardownHosts())).catch(() => {});
      skipAll(`test hosts not set up within ${hostsWaitMs / 1000} s (another process holding them? --hosts-wait)`);
      await Promise.race([cleanup, new Promise((r) => setTimeout(r, 5000))]);
      return;
    }
    if ("skip" in got) return skipAll(got.skip);
    hosts = got;
  } catch (err) {
    return skipAll(`test hosts: setup failed: ${err instanceof Error ? err.message.split("\n")[0] : String(err)}`);
  } finally {
    clearTimeout(timer);
  }
  up = true;
  try {
    await using tap = new SshTap();
    for (const m of measures) await m.run({ hosts, tap });
  } finally {
    try {
      await teardownHosts();
    } catch (err) {
      detail(`test hosts: teardown failed: ${err instanceof Error ? err.message : String(err)}`);
    }
    up = false;
  }
}
