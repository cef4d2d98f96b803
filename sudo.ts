/**
 * The sudo method: a child as another user on this machine, through `sudo -S` with a prompt of its
 * own, answered once. Part of `mitogen:parent`.
 *
 * @module
 */
import { nodeProcess } from "./runtime.ts";
import type { Secret } from "./codec.ts";
import { StreamError } from "./errors.ts";
import { missingRuntime, ownRuntime, remoteCommand } from "./firststage.ts";
import type { Launch, Starting } from "./launch.ts";

/** What the sudo method needs (see SudoOptions). */
export interface SudoSpec {
  username: string;
  password?: Secret;
  sudoPath: string;
  sudoArgs: string[];
  /** The runtime to run as the target user; default: this context's own executable. */
  runtime?: string;
}

/** The sudo method's launch builder (options: SudoOptions). */
export function sudoLaunch(spec: Starting, m: SudoSpec): Launch {
  // A prompt nobody else prints: answered once; a second one means the password was wrong.
  const prompt = `mitogen-sudo-${spec.id}-password:`;
  const runtime = m.runtime ?? ownRuntime();
  const args = ["-S", "-p", prompt, "-H", "-u", m.username, ...m.sudoArgs, "--", "/bin/sh", "-c", remoteCommand(runtime, spec.name, false, false)];
  let prompts = 0;
  const fail = (what: string) => new StreamError(`sudo to ${m.username}: ${what}`);
  return {
    exe: m.sudoPath,
    args,
    env: { ...nodeProcess().env },
    streamOn: "stdio",
    stdoutIsOutput: false,
    prompt: new RegExp(`${prompt}\\s*$`),
    watch(line, answer) {
      if (line.includes(prompt)) {
        prompts++;
        if (!m.password) return fail("password required");
        if (prompts > 1) return fail("incorrect password");
        answer(`${m.password.reveal()}\n`);
        return true;
      }
      if (/Sorry, try again/.test(line)) return fail("incorrect password");
      if (/unknown user/.test(line)) return fail(`unknown user (${line.trim()})`);
      if (/is not in the sudoers file|is not allowed to (run|execute)|may not run sudo/.test(line)) return fail(`not allowed (${line.trim()})`);
      if (/incorrect password attempt|a password is required/.test(line)) return fail(m.password ? "incorrect password" : "password required");
      const missing = missingRuntime(line);
      return missing ? fail(missing) : undefined;
    },
  };
}
