/**
 * Master-only: the in-process ssh transport (`router.ssh({ transport: "ssh2" })`),
 * on the `ssh2` package, for masters without an OpenSSH client and for keys
 * held in memory. Host keys follow the same policy as with OpenSSH, against
 * the same known_hosts file (hashed entries included).
 *
 * @module
 */
import { createHmac } from "node:crypto";
import { appendFileSync, existsSync, readFileSync } from "node:fs";
import { homedir, userInfo } from "node:os";
import { StreamError } from "./errors.ts";
import { Secret } from "./codec.ts";
import type { Context } from "./context.ts";
import type { SshOptions } from "./options.ts";
import type { Router } from "./router.ts";
import { bootstrap } from "./bootstrap.ts";
import { missingRuntime, remoteCommand } from "./firststage.ts";
import { endedAs, type Spawned } from "./launch.ts";
import type { ConnectSpec } from "./start.ts";

type Known = { type: string; key: string }[];

/** The entries of `file` for `host` (port 22: "host"; else "[host]:port"), plain or hashed. */
export function knownKeys(file: string, host: string): Known {
  if (!existsSync(file)) return [];
  const out: Known = [];
  for (const raw of readFileSync(file, "utf8").split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#") || line.startsWith("@")) continue;
    const [hosts, type, key] = line.split(/\s+/);
    if (!hosts || !type || !key) continue;
    const matches = hosts.startsWith("|1|")
      ? (() => {
          const [, , salt, hash] = hosts.split("|");
          return salt !== undefined && createHmac("sha1", Buffer.from(salt, "base64")).update(host).digest("base64") === hash;
        })()
      : hosts.split(",").includes(host);
    if (matches) out.push({ type, key });
  }
  return out;
}

/** The key type named at the start of an SSH wire-format public key. */
function keyType(key: Uint8Array): string {
  const view = new DataView(key.buffer, key.byteOffset, key.byteLength);
  const len = key.byteLength >= 4 ? view.getUint32(0) : 0;
  return new TextDecoder().decode(key.subarray(4, 4 + len));
}

/** Start a context over an in-process ssh connection (master only). */
export async function connectSsh2(router: Router, options: SshOptions, id: number, name: string): Promise<Context> {
  const { Client } = await import("ssh2").catch((err: unknown) => {
    throw new StreamError("transport ssh2 needs the ssh2 package on the master (npm install ssh2)", { cause: err });
  });
  const port = options.port ?? 22;
  const host = options.hostname;
  const who = `${options.username ?? userInfo().username}@${host}`;
  const policy = options.checkHostKeys ?? "enforce";
  const knownHostsFile = options.knownHostsFile ?? `${homedir()}/.ssh/known_hosts`;
  const pattern = port === 22 ? host : `[${host}]:${port}`;
  const password = options.password instanceof Secret ? options.password.reveal() : options.password;
  const privateKey =
    options.privateKey instanceof Secret
      ? options.privateKey.reveal()
      : (options.privateKey ?? (options.identityFile ? readFileSync(options.identityFile) : undefined));
  const spec: ConnectSpec = { id, name, connectTimeout: options.connectTimeout ?? 30_000, method: { kind: "local" }, label: "ssh" };
  let refusal: string | null = null;
  const client = new Client();

  const channel = await new Promise<import("ssh2").ClientChannel>((resolve, reject) => {
    const fail = (what: string, cause?: unknown) => {
      client.destroy();
      reject(new StreamError(`ssh to ${who}: ${what}`, cause === undefined ? undefined : { cause }));
    };
    client.on("error", (err: Error & { level?: string }) => {
      if (refusal) return fail(refusal, err);
      if (err.level === "client-authentication") {
        return fail(
          password === undefined ? "authentication failed (no password given; password required?)" : "incorrect password (refused by the server)",
          err,
        );
      }
      if (err.level === "client-timeout") return fail(`not connected within ${spec.connectTimeout} ms`, err);
      fail(err.message, err);
    });
    client.on("keyboard-interactive", (_name, _instructions, _lang, prompts, finish) => {
      if (password === undefined) return finish([]);
      finish(prompts.map(() => password));
    });
    client.on("ready", () => {
      client.exec(remoteCommand(options.runtime ?? "auto", name), (err, ch) => (err ? fail(err.message, err) : resolve(ch)));
    });
    client.connect({
      host,
      port,
      username: options.username ?? userInfo().username,
      readyTimeout: spec.connectTimeout,
      tryKeyboard: password !== undefined,
      ...(password === undefined ? {} : { password }),
      ...(privateKey === undefined ? {} : { privateKey: typeof privateKey === "string" ? privateKey : Buffer.from(privateKey) }),
      ...(process.env.SSH_AUTH_SOCK && privateKey === undefined ? { agent: process.env.SSH_AUTH_SOCK } : {}),
      hostVerifier: (key: Buffer) => {
        if (policy === "ignore") return true;
        const b64 = key.toString("base64");
        const all = knownKeys(knownHostsFile, pattern);
        if (all.some((k) => k.key === b64)) return true;
        // Only a different key of the same type is a changed key; another type is just unknown.
        const known = all.filter((k) => k.type === keyType(key));
        if (known.length) {
          refusal = `the host key has CHANGED (checkHostKeys: ${policy})`;
          return false;
        }
        if (policy === "accept") {
          appendFileSync(knownHostsFile, `${pattern} ${keyType(key)} ${b64}\n`, { mode: 0o600 });
          return true;
        }
        refusal = `unknown host key (checkHostKeys: ${policy})`;
        return false;
      },
    });
  });

  let status: string | null = null;
  channel.on("exit", (code: number | null, signal?: string) => {
    status = endedAs(code, signal ?? null);
  });
  const gone = new Promise<void>((resolve) => {
    channel.on("close", () => {
      status ??= "closed its channel";
      client.end();
      resolve();
    });
  });
  const child: Spawned = {
    what: "ssh2",
    reader: channel,
    writer: channel,
    stderr: channel.stderr,
    gone,
    status: () => status,
    kill: () => {
      status ??= "was disconnected";
      channel.close();
      client.destroy();
    },
    onError: (cb) => client.on("error", (err: Error) => cb(new StreamError(`ssh to ${who}: ${err.message}`, { cause: err }))),
  };
  return bootstrap(router, spec, child, {
    pipeline: true,
    watch: (line) => {
      const missing = missingRuntime(line);
      return missing ? new StreamError(`ssh to ${who}: ${missing}`) : undefined;
    },
  });
}
