/**
 * The ssh method: a child on another machine through the OpenSSH client, with its host-key policy,
 * a password answered through SSH_ASKPASS, and its failures told apart from ssh's stderr. (ssh2.ts
 * is the in-process transport, master only.) Part of `mitogen:parent`.
 *
 * @module
 */
import { builtin, nodeProcess } from "./runtime.ts";
import { Secret } from "./codec.ts";
import { StreamError } from "./errors.ts";
import { missingRuntime, remoteCommand } from "./firststage.ts";
import type { Launch, Starting } from "./launch.ts";

/** What the ssh method needs (see SshOptions); plain data, so it can be sent to a `via` context. */
export interface SshSpec {
  hostname: string;
  username?: string;
  port?: number;
  identityFile?: string;
  password?: Secret | string;
  checkHostKeys: "enforce" | "accept" | "ignore";
  knownHostsFile?: string;
  sshArgs: string[];
  sshPath: string;
  compression: boolean;
  /** "auto" (the newest of node and nodejs, else deno), "node", "deno", or a path on the target. */
  runtime: string;
}

let askpass: { dir: string; path: string } | null = null;

/** A tiny SSH_ASKPASS program: it reports each prompt on stderr and answers with $MITOGEN_SSH_PASSWORD. */
function askpassProgram(): string {
  if (askpass) return askpass.path;
  const fs = builtin("node:fs");
  const os = builtin("node:os");
  const dir = fs.mkdtempSync(`${os.tmpdir()}/mitogen-askpass-`);
  const path = `${dir}/askpass`;
  fs.writeFileSync(path, `#!/bin/sh\nprintf '${ASKPASS_MARK} %s\\n' "$1" >&2\nprintf '%s\\n' "$MITOGEN_SSH_PASSWORD"\n`, { mode: 0o700 });
  askpass = { dir, path };
  nodeProcess().once("exit", () => {
    try {
      fs.unlinkSync(path);
      fs.rmdirSync(dir);
    } catch {
      // gone already
    }
  });
  return path;
}

const ASKPASS_MARK = "MITOGEN_ASKPASS";

/**
 * The ssh method's launch builder (options: SshOptions): the OpenSSH client, running `remote` on
 * the target (by default the first stage of a child).
 */
export function sshLaunch(spec: Starting, m: SshSpec, remote: string = remoteCommand(m.runtime, spec.name, false, true, m.compression)): Launch {
  const host = m.username ? `${m.username}@${m.hostname}` : m.hostname;
  const args = ["-T", "-o", `ConnectTimeout=${Math.max(1, Math.ceil(spec.connectTimeout / 1000))}`, "-o", "ServerAliveInterval=15"];
  if (m.username) args.push("-l", m.username);
  if (m.port !== undefined) args.push("-p", String(m.port));
  if (m.identityFile) args.push("-i", m.identityFile, "-o", "IdentitiesOnly=yes");
  args.push("-o", `StrictHostKeyChecking=${{ enforce: "yes", accept: "accept-new", ignore: "no" }[m.checkHostKeys]}`);
  if (m.checkHostKeys === "ignore") args.push("-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR");
  else if (m.knownHostsFile) args.push("-o", `UserKnownHostsFile=${m.knownHostsFile}`);
  const password = m.password instanceof Secret ? m.password.reveal() : m.password;
  const env: Record<string, string | undefined> = { ...nodeProcess().env };
  if (password === undefined) args.push("-o", "BatchMode=yes");
  else {
    args.push("-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=2");
    Object.assign(env, { SSH_ASKPASS: askpassProgram(), SSH_ASKPASS_REQUIRE: "force", DISPLAY: env.DISPLAY ?? ":0", MITOGEN_SSH_PASSWORD: password });
  }
  if (m.compression) args.push("-C");
  // With -C ssh compresses the core (in C, on both ends): the child is spared inflating it.
  args.push(...m.sshArgs, "--", m.hostname, remote);
  let prompts = 0;
  let changed = false;
  const fail = (what: string) => new StreamError(`ssh to ${host}: ${what}`);
  return {
    exe: m.sshPath,
    args,
    env,
    streamOn: "stdio",
    stdoutIsOutput: false,
    plain: m.compression,
    pipeline: true,
    watch(line) {
      if (line.startsWith(ASKPASS_MARK)) {
        prompts++;
        if (password === undefined) return fail("password required");
        return prompts > 1 ? fail("incorrect password (refused by the server)") : true;
      }
      if (/REMOTE HOST IDENTIFICATION HAS CHANGED/.test(line)) changed = true;
      if (/Host key verification failed/.test(line)) {
        return fail(changed ? `the host key has CHANGED (checkHostKeys: ${m.checkHostKeys})` : `unknown host key (checkHostKeys: ${m.checkHostKeys})`);
      }
      const denied = /Permission denied \((.*)\)/.exec(line);
      if (denied) {
        const methods = denied[1] ?? "";
        if (password === undefined && /password|keyboard-interactive/.test(methods)) return fail(`password required (the server offers ${methods})`);
        return fail(password === undefined ? `authentication failed (the server offers ${methods})` : "incorrect password (refused by the server)");
      }
      const missing = missingRuntime(line);
      if (missing) return fail(missing);
      if (/Could not resolve hostname|Connection refused|Connection timed out|No route to host|Network is unreachable|Invalid argument/.test(line)) {
        return fail(line.replace(/^ssh: /, ""));
      }
      return undefined;
    },
  };
}
