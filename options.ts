/**
 * Types only: the options of every connection method (`router.local()`, `ssh()`, `sudo()`, ...) and
 * of listeners (listen.ts), so that the Router can name them without importing the code that uses
 * them. Part of the child payload's types; no code.
 *
 * @module
 */
import type { Secret } from "./codec.ts";
import type { Context } from "./context.ts";

/** Options of {@link Router.local}. */
export interface LocalOptions {
  /** "node", "deno", or a path to either (default: the runtime this context runs on). */
  runtime?: string;
  /** Context name, shown in logs and in the process title (`mitogen:<name>`). */
  name?: string;
  /** Start the context from this one instead. */
  via?: Context;
  /** Milliseconds allowed from spawn to connected (default 30 000). */
  connectTimeout?: number;
  /** Extra environment variables. */
  env?: Record<string, string>;
  /** Working directory. */
  cwd?: string;
}

/** Options of {@link Router.ssh}. */
export interface SshOptions {
  /** Host name or address (ssh_config aliases work: this runs the OpenSSH client). */
  hostname: string;
  username?: string;
  port?: number;
  /** A private key file (`ssh -i`); otherwise the agent and ~/.ssh as usual. */
  identityFile?: string;
  /** transport "ssh2" only: a private key held in memory (PEM or OpenSSH format). */
  privateKey?: string | Uint8Array | Secret;
  /** "openssh" (default): run the ssh client; "ssh2": connect in process (master only, no `via`). */
  transport?: "openssh" | "ssh2";
  /** Answered once if the server asks; a second prompt is "incorrect password". Never logged. */
  password?: string | Secret;
  /** "enforce": only known hosts; "accept": learn new ones, refuse changed ones; "ignore": anything. Default "enforce". */
  checkHostKeys?: "enforce" | "accept" | "ignore";
  /** known_hosts file to use instead of ~/.ssh/known_hosts. */
  knownHostsFile?: string;
  /** Extra arguments for ssh, before the host name (e.g. ["-F", "ssh_config"]). */
  sshArgs?: string[];
  /** The ssh client to run (default "ssh"). */
  sshPath?: string;
  /** Compress the link (`ssh -C`, default false: the payload is compressed already, and zlib on every small frame costs latency). */
  compression?: boolean;
  /** Milliseconds from starting ssh to the child's CONNECTED (default 30 000). */
  connectTimeout?: number;
  /** "auto" (default: the newest of node and nodejs on the target's PATH, else deno), "node", "deno", or a path on the target. */
  runtime?: string;
  /** Run ssh from this context instead. */
  via?: Context;
  name?: string;
}

/** Options of {@link Router.sudo}. */
export interface SudoOptions {
  /** Target user (default "root"). */
  username?: string;
  /** Answered once at sudo's prompt (forced to a unique string); never logged. */
  password?: string | Secret;
  /** The sudo program (default "sudo"). */
  sudoPath?: string;
  /** Extra arguments for sudo, before the command. */
  sudoArgs?: string[];
  /** Runtime to run as the target user (default: the executable of the context running sudo). */
  runtime?: string;
  /** Milliseconds from starting sudo to the child's CONNECTED (default 30 000). */
  connectTimeout?: number;
  /** Run sudo in this context (on its machine) instead. */
  via?: Context;
  name?: string;
}

/** What every way of starting a context in a container accepts. */
export interface StartOptions {
  name?: string;
  /** Start it from this context instead (on that context's machine). */
  via?: Context;
  /** Milliseconds until the child must be connected (default 30 000). */
  connectTimeout?: number;
  /** "auto" (default: the newest of node and nodejs on the target's PATH, else deno), "node", "deno", or a path inside the target. */
  runtime?: string;
  /** The tool's executable (default: its usual name, looked up on PATH). */
  path?: string;
  /** Extra arguments for the tool, before the target. */
  args?: string[];
}

/** Options of {@link Router.docker}, {@link Router.podman}, {@link Router.buildah}, {@link Router.lxc}, {@link Router.lxd} and {@link Router.incus}. */
export interface ContainerOptions extends StartOptions {
  container: string;
  /** User inside the container (docker, podman, buildah). */
  username?: string;
}

/** Options of {@link Router.kubectl}. */
export interface KubectlOptions extends StartOptions {
  pod: string;
  namespace?: string;
  container?: string;
}

/** Options of {@link Router.setns}. */
export interface SetnsOptions extends StartOptions {
  /** A process whose namespaces to enter (a container's init, say). */
  pid: number;
}

/** Options of {@link Router.jail}. */
export interface JailOptions extends StartOptions {
  jail: string;
  username?: string;
}

/** Options of {@link Router.su} and {@link Router.doas}. */
export interface SuOptions extends StartOptions {
  /** Target user (default "root"). */
  username?: string;
  /** Typed at the prompt once; never logged. */
  password?: string | Secret;
}

// ---------------------------------------------------------------------------
// Listeners (listen.ts)

/**
 * Where a session's messages may be addressed: the listening context and the contexts below it
 * (`"below"`, the default) or the listening context only (`"listener"`). Not a sandbox either way:
 * a session's calls run as the listening context, and code run there (a `takesRouter` function)
 * reaches every context below it.
 */
export type ListenRoute = "below" | "listener";

/** @deprecated The old name of {@link ListenRoute}'s values: `"call"` is `"below"`, `"listener"` is `"listener"`. */
export type ListenAllow = "call" | "listener";

/** Options of `router.listen()`: `path` for a unix socket, or `host` and `port` for TCP. */
export interface ListenOptions {
  /** A unix socket here, mode 0600, in a directory only this user can write. */
  path?: string;
  /** The unix listener's key (32 bytes, or base64). Default: a fresh one, written 0600 to `<path>.key`. */
  key?: Uint8Array | string;
  /** TCP: the address to listen on (127.0.0.1, ::1, ...). */
  host?: string;
  /** TCP: the port; 0 picks a free one (see `listener.port`). */
  port?: number;
  /** TCP: this listener's key pair (see `generateKeyPair`). */
  keyPair?: { publicKey: string; secretKey: string };
  /** TCP: the public keys of the clients that may attach. */
  authorizedKeys?: readonly string[];
  /** Where sessions' messages may be addressed (default "below"); see {@link ListenRoute}: not a sandbox. */
  route?: ListenRoute;
  /** @deprecated Use `route` (`allow: "call"` is `route: "below"`); not a sandbox either. */
  allow?: ListenAllow;
  /** Milliseconds a connecting process has to complete the handshake (default 5 000). */
  handshakeTimeout?: number;
  /** Connections in their handshake at once; more are closed at once (default 64). */
  maxPending?: number;
  /** TCP: connections in their handshake at once from one address (default 8). */
  maxPendingPerSource?: number;
}

/** A context a router can reach, as `router.contexts()` lists it. */
export interface ContextInfo {
  id: number;
  name: string;
  /** How it was started: `local`, `ssh`, `sudo`, `docker`..., `session` (attached); null when not known (a listening context's own). */
  method: string | null;
  /** The context that started it (the master is 0); null for the master. */
  parent: number | null;
  /** Its runtime (`node 22.12.0`, `deno 2.1.4`), `session` for an attached one; null when not known. */
  runtime: string | null;
}

/** A listening socket; `await using` closes it. */
export interface Listener extends AsyncDisposable {
  /** The unix socket's path, or null for TCP. */
  readonly path: string | null;
  /** The key file written beside the socket, or null. */
  readonly keyFile: string | null;
  /** The TCP port (the one picked for `port: 0`), or null. */
  readonly port: number | null;
  /** Sessions attached now. */
  readonly sessions: number;
  /** Refuse new sessions, end the live ones, remove the socket (and the key file it wrote). */
  close(): Promise<void>;
}
