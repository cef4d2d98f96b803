/**
 * The su and doas methods: a child as another user on this machine, through a program that reads
 * its password from a terminal only (run in a pty made by `script`). Part of `mitogen:parent`.
 *
 * @module
 */
import { nodeProcess } from "./runtime.ts";
import type { Secret } from "./codec.ts";
import { StreamError } from "./errors.ts";
import { missingRuntime, ownRuntime, remoteCommand, shellQuote } from "./firststage.ts";
import type { Launch, Starting } from "./launch.ts";

/** What su and doas need (see SuOptions). */
export interface TerminalSpec {
  username: string;
  password?: Secret;
  path?: string;
  args: string[];
  runtime?: string;
}

/**
 * su and doas read passwords from a terminal only: run them in a pty made by
 * `script`, answer the prompt there, then switch the pty to raw mode
 * (`stty raw -echo`) before the first stage, so the stream passes 8-bit clean.
 * The child's own output goes to /dev/null: on a pty it would share the stream.
 * The su and doas methods' launch builder (options: SuOptions).
 */
export function terminalLaunch(spec: Starting, m: TerminalSpec & { kind: "su" | "doas" }): Launch {
  const inner = `stty raw -echo; ${remoteCommand(m.runtime ?? ownRuntime(), spec.name, true)}`;
  const argv =
    m.kind === "su"
      ? [m.path ?? "su", ...m.args, m.username, "-s", "/bin/sh", "-c", inner]
      : [m.path ?? "doas", ...m.args, "-u", m.username, "/bin/sh", "-c", inner];
  let seen = "";
  let prompts = 0;
  const fail = (what: string) => new StreamError(`${m.kind} to ${m.username}: ${what}`);
  return {
    exe: "script",
    args: ["-q", "-e", "-c", argv.map(shellQuote).join(" "), "/dev/null"],
    env: { ...nodeProcess().env },
    streamOn: "stdio",
    stdoutIsOutput: false,
    terminal(text, answer) {
      seen += text;
      const missing = missingRuntime(seen);
      if (missing) return fail(missing);
      if (/Authentication fail|incorrect password|Permission denied/i.test(seen)) return fail("incorrect password");
      if (/Operation not permitted|not allowed|does not exist|[Uu]nknown user|No passwd entry/.test(seen))
        return fail(`not allowed (${seen.trim().split("\n").pop()})`);
      if (/[Pp]assword[^\n]*:\s*$/.test(seen)) {
        prompts++;
        if (!m.password) return fail("password required");
        if (prompts > 1) return fail("incorrect password");
        answer(`${m.password.reveal()}\n`);
        seen = "";
      }
      return undefined;
    },
  };
}
