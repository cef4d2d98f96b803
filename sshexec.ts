/**
 * One shell command on one host over the OpenSSH client, with no runtime started there: what
 * `mitogen run` does for a plain ssh target, at the cost of an ssh exec, as pdsh. A context
 * (`router.ssh()` and mitogen:tunnel's exec) is used where more is needed: a hop, sudo, input,
 * a password, a server.
 *
 * The target's shell runs {@link execWrapper}. The command runs as the tunnel's exec runs it:
 * `/bin/sh -c` in the home directory, stdin at /dev/null. A watcher beside it waits for the end of
 * the channel's stdin, which this side never writes to: it ends when the command is stopped here
 * (its stdin closed), when ssh goes, and when the session is over. Then, as a hang-up would, it
 * stops the session's process group: SIGTERM and, 2 s later, SIGKILL while the command runs; at
 * once when it has ended (what it left behind). So a stopped or interrupted command does not run
 * on, and nothing is left running after it.
 *
 * @module
 */
import { shellQuote } from "./firststage.ts";
import { spawnLaunch } from "./launch.ts";
import type { SshOptions } from "./options.ts";
import { sshSpec, sshWhere } from "./parent.ts";
import { sshLaunch } from "./ssh.ts";
import { StreamError } from "./errors.ts";

/** How long a stopped command has to end, its output read to the end, before ssh is killed. */
const STOP_GRACE_MS = 5000;
/** ssh's own complaints are looked for in this much of its stderr. */
const KEPT = 64 * 1024;

/** The remote command: `command` beside a watcher that stops the session's process group when the channel's stdin ends. */
export function execWrapper(command: string): string {
  // $$ in the watcher is this shell, which waits for the command: alive means stopped early.
  const watcher = `(trap '' HUP INT TERM;while read -r _;do :;done <&3;if kill -0 $$ 2>/dev/null;then kill -s TERM 0;sleep 2;fi;kill -s KILL 0)>/dev/null 2>&1`;
  // Not exec'd: a command killed by a signal exits 128 + its number, as a shell says it (ssh would say 255).
  // This shell's own stderr is /dev/null (bash would add "Terminated"); the command's is the channel's (fd 4).
  return `exec 3<&0 4>&2 </dev/null 2>/dev/null;${watcher}& /bin/sh -c ${shellQuote(command)} 2>&4 3<&- 4>&-;exit $?`;
}

/** Where {@link sshExec}'s output goes, and what stops it. */
export interface ExecOptions {
  /** Milliseconds ssh has to connect (its ConnectTimeout). */
  connectTimeout: number;
  /** Stops the command (see the module): it rejects with the signal's reason once ssh has gone. */
  signal: AbortSignal;
  stdout(chunk: Uint8Array): void;
  stderr(chunk: Uint8Array): void;
}

/**
 * Run the shell command `command` on `options.hostname` through ssh; resolves with its exit code
 * (null if ssh was killed). Rejects with a StreamError naming what ssh said when it could not
 * connect or log in (told apart from a command's own exit 255 by ssh's stderr, where with
 * LogLevel=ERROR nothing else of ssh's comes), and with `signal`'s reason once stopped.
 */
export async function sshExec(options: SshOptions, command: string, o: ExecOptions): Promise<number | null> {
  if (o.signal.aborted) throw o.signal.reason;
  const m = sshSpec({ ...options, sshArgs: ["-o", "LogLevel=ERROR", ...(options.sshArgs ?? [])] });
  const name = options.name ?? `ssh.${sshWhere(options)}`;
  const launch = sshLaunch({ id: 0, name, connectTimeout: o.connectTimeout, method: { kind: "ssh" } }, m, execWrapper(command));
  const child = await spawnLaunch(launch);
  let said = "";
  let sawOutput = false;
  child.reader.on("data", (chunk) => {
    sawOutput = true;
    o.stdout(chunk);
  });
  const decoder = new TextDecoder();
  child.stderr.on("data", (chunk) => {
    if (said.length < KEPT) said += decoder.decode(chunk, { stream: true });
    o.stderr(chunk);
  });
  child.writer.on("error", () => {}); // ssh may be gone before its stdin is closed
  let stopped = false;
  const stop = () => {
    stopped = true;
    child.writer.end(); // the watcher's cue
    const timer = setTimeout(() => child.kill(), STOP_GRACE_MS);
    void child.gone.then(() => clearTimeout(timer));
  };
  o.signal.addEventListener("abort", stop, { once: true });
  if (o.signal.aborted) stop(); // stopped while ssh was starting
  try {
    await child.gone;
  } finally {
    o.signal.removeEventListener("abort", stop);
  }
  if (stopped) throw o.signal.reason;
  const code = child.exitCode?.() ?? null;
  if (code !== 255) return code;
  // 255: ssh's own failure, or the command's exit status.
  const lines = said.split(/\r?\n/).filter((l) => l.trim());
  for (const line of lines) {
    const verdict = launch.watch?.(line, () => {});
    if (verdict instanceof Error) throw verdict;
  }
  const last = lines.at(-1) ?? "";
  if (!sawOutput && /^(ssh: |kex_exchange_identification|Connection (closed|reset) by|banner exchange|Bad owner|Can't open user config)/.test(last)) {
    throw new StreamError(`ssh to ${options.hostname}: ${last.replace(/^ssh: /, "")}`);
  }
  return code;
}
