/**
 * fakessh: run a local program (rsync, scp, git) whose `ssh` is tunnelled
 * through a context of the tree, so it reaches hosts only the tree reaches
 * (behind a bastion, as root through sudo) with nothing installed there.
 *
 * `run()` puts a private directory (mode 0700) first on the program's PATH.
 * In it, `ssh` is `dist/mitogen.mjs` itself, started under that name (the
 * file's third role: see `sshMain`). The stand-in parses ssh's options,
 * connects back to `run()` over a unix socket in the same directory, proves
 * it knows the run's one-time key (tweetnacl secretbox over the socket's
 * challenge), and hands over the remote command. The command then runs in
 * the destination context as a subprocess (`mitogen:tunnel`), its stdin,
 * stdout and stderr tunnelled through the tree with flow control, and its
 * exit status becomes the stand-in's.
 *
 * The socket's frames, after the handshake (big-endian):
 *
 *     type u8 | length u32 | bytes          types: FAKESSH
 *
 * The handshake is handshake.ts's shared-key one (`acceptWithKey`,
 * `connectWithKey`: each side proves it holds the key). The stand-in's first
 * frame is REQUEST: `nonce (24) | secretbox(JSON request, nonce, key)`. A
 * failed handshake, or a first frame that is not a REQUEST that opens, ends
 * the connection. EXIT, after all output, starts the close handshake: the
 * stand-in closes its end, the run side reads on until it has (PROTOCOL.md).
 *
 * @module
 */
import { chmodSync, existsSync, lstatSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { constants, tmpdir } from "node:os";
import { basename, delimiter, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { spawn } from "node:child_process";
import nacl from "tweetnacl";
import { type Context, isDeno, MitogenError, nodeTransport, Receiver, type Router, type Sender, type Transport } from "./core.ts";
import { stdinSource, stdioFlushed, stdioSink } from "./stdio.ts";
import { acceptWithKey, connectWithKey } from "./handshake.ts";
import { Chunks } from "./chunks.ts";
import type { ExecResult, ExecSpec } from "./tunnel.ts";

/** Frame types on the stand-in's socket. */
export const FAKESSH = {
  /** stand-in -> run: bytes for the remote command's stdin. */
  STDIN: 1,
  /** stand-in -> run: the stand-in's stdin ended. */
  EOF: 2,
  /** run -> stand-in: bytes of the remote command's stdout. */
  STDOUT: 3,
  /** run -> stand-in: bytes of the remote command's stderr. */
  STDERR: 4,
  /** run -> stand-in: the exit status (u32), the run side's last frame; the stand-in then closes its end. */
  EXIT: 5,
  /** run -> stand-in: why the command could not run (UTF-8), before EXIT 255. */
  ERROR: 6,
  /** stand-in -> run, first frame: nonce (24) | secretbox(JSON request, nonce, key). */
  REQUEST: 7,
} as const;

/** The biggest frame either side accepts (stdin chunks are cut to fit). */
const MAX_FRAME = 1 << 20;
/** The biggest sealed request the listener reads before the key is proven. */
const MAX_REQUEST = 64 * 1024;
const NONCE = nacl.secretbox.nonceLength;
/** A stand-in that has not proven the key by then is dropped. */
const HANDSHAKE_MS = 10_000;
/** How long the run side waits, after EXIT, for the stand-in to close its end. */
const CLOSE_MS = 30_000;
/** The exit status of ssh itself failing (OpenSSH's). */
const SSH_FAILED = 255;

/** What the stand-in asks for: the command line and the destination ssh was given. */
export interface FakesshRequest {
  host: string;
  user: string | null;
  port: number | null;
  /** The remote command, as ssh sends it: its words joined by spaces. */
  command: string;
  /** Variables named by `-o SendEnv=` that were set (git's GIT_PROTOCOL). */
  env: Record<string, string>;
}

/** Where the remote command runs: one context, or one per host name the program asked for. */
export type FakesshDest = Context | ((host: string, request: FakesshRequest) => Context | Promise<Context>);

/** Options of {@link run}. */
export interface FakesshOptions {
  /** Ends the program and every remote command it started. */
  signal?: AbortSignal;
  /** Added to (or, with `undefined`, removed from) the program's environment. */
  env?: Record<string, string | undefined>;
  cwd?: string;
  /**
   * The program's stdin, stdout and stderr: inherited (the default), ignored, or file descriptors
   * (`["ignore", outFd, errFd]`). The remote command's stderr comes out of the stand-in's, which is the program's.
   */
  stdio?: "inherit" | "ignore" | readonly ("inherit" | "ignore" | number)[];
  /** The single file to start as `ssh` (default: `dist/mitogen.mjs` of this installation). */
  script?: string;
}

// ---------------------------------------------------------------------------
// frames

function frame(type: number, body: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(5 + body.byteLength);
  out[0] = type;
  new DataView(out.buffer).setUint32(1, body.byteLength);
  out.set(body, 5);
  return out;
}

/**
 * Splits a byte stream into frames (type u8 | length u32 | bytes), refusing any over `max`. Chunks
 * are kept as they came until a frame is whole (see {@link Chunks}), then taken once: a frame
 * spread over many chunks is not joined again with each one.
 */
class FrameReader {
  readonly #in = new Chunks();
  readonly max: number;
  constructor(max: number) {
    this.max = max;
  }

  /** Add `chunk`; returns the frames now complete. Throws on a frame over the limit. */
  push(chunk: Uint8Array): { type: number; body: Uint8Array }[] {
    this.#in.push(chunk);
    const frames: { type: number; body: Uint8Array }[] = [];
    while (this.#in.size >= 5) {
      const head = this.#in.peek(5);
      const length = new DataView(head.buffer, head.byteOffset, 5).getUint32(1);
      if (length > this.max) throw new MitogenError(`fakessh: a frame of ${length} bytes is over the ${this.max} limit`);
      if (this.#in.size < 5 + length) break;
      const bytes = this.#in.take(5 + length);
      frames.push({ type: bytes[0] as number, body: bytes.subarray(5) });
    }
    return frames;
  }
}

const text = new TextEncoder();
const untext = new TextDecoder();

function waitDrain(socket: Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      socket.off("drain", done);
      socket.off("close", done);
      resolve();
    };
    socket.on("drain", done);
    socket.on("close", done);
  });
}

// ---------------------------------------------------------------------------
// run: the master's half

/** Where the single file is: this file itself when bundled, else dist/ beside the sources. */
function selfScript(): string {
  const here = fileURLToPath(import.meta.url);
  const script = basename(here) === "mitogen.mjs" ? here : join(dirname(here), "dist", "mitogen.mjs");
  if (!existsSync(script)) throw new MitogenError(`fakessh needs ${script} as its ssh stand-in: run npm run build first`);
  return script;
}

/**
 * Run the local program `argv` with its `ssh` tunnelled to `dest`; resolves
 * with its exit code (128 + the signal number if a signal ended it).
 *
 * rsync (`RSYNC_RSH`), git (`GIT_SSH_COMMAND`) and anything else that runs
 * `ssh` from PATH find the stand-in; for scp, which runs `/usr/bin/ssh`, it
 * is passed with `-S`.
 *
 * @example
 * ```ts
 * import { fakessh, Router } from "./mod.ts";
 * await using router = new Router();
 * const ctx = await router.local();
 * const code = await fakessh.run(ctx, router, ["rsync", "-a", "./site/", "any:/tmp/site/"]);
 * console.log(code); // 0
 * ```
 */
export async function run(dest: FakesshDest, router: Router, argv: string[], options: FakesshOptions = {}): Promise<number> {
  const [program, ...args] = argv;
  if (!program) throw new MitogenError("fakessh.run needs a program to run");
  options.signal?.throwIfAborted();
  const script = options.script ?? selfScript();
  removeStale(router);
  const dir = mkdtempSync(join(tmpdir(), `${DIR_PREFIX}${process.pid}-`));
  const sessions = new Set<Session>();
  let server: Server | null = null;
  try {
    chmodSync(dir, 0o700);
    const key = nacl.randomBytes(nacl.secretbox.keyLength);
    const socketPath = join(dir, "s");
    server = createServer((socket) => {
      const session = new Session(socket, key, dir, dest, router);
      sessions.add(session);
      void session.done.finally(() => sessions.delete(session));
    });
    await listen(server, socketPath);
    const ssh = join(dir, "ssh");
    const env: Record<string, string | undefined> = { ...process.env, ...options.env };
    for (const [k, v] of Object.entries(env)) if (v === undefined) delete env[k];
    standIn(ssh, script);
    Object.assign(env, {
      PATH: env.PATH ? `${dir}${delimiter}${env.PATH}` : dir,
      MITOGEN_FAKESSH: socketPath,
      MITOGEN_FAKESSH_KEY: Buffer.from(key).toString("base64"),
      GIT_SSH_COMMAND: q(ssh),
    });
    env.RSYNC_RSH ??= q(ssh);
    delete env.GIT_SSH;
    delete env.GIT_SSH_VARIANT;
    const finalArgs = basename(program) === "scp" && !args.some((a) => a.startsWith("-S")) ? ["-S", ssh, ...args] : args;
    return await new Promise<number>((resolve, reject) => {
      const child = spawn(program, finalArgs, {
        env,
        stdio: (options.stdio ?? "inherit") as "inherit" | "ignore" | ("inherit" | "ignore" | number)[],
        ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
      });
      const onAbort = () => {
        child.kill("SIGTERM");
        for (const s of sessions) s.abort();
      };
      options.signal?.addEventListener("abort", onAbort);
      child.once("error", (err) => {
        options.signal?.removeEventListener("abort", onAbort);
        reject(new MitogenError(`fakessh: cannot run ${program}: ${err.message}`, { cause: err }));
      });
      child.once("close", (code, signal) => {
        options.signal?.removeEventListener("abort", onAbort);
        if (options.signal?.aborted) reject(options.signal.reason);
        else resolve(code ?? 128 + (signal ? signalNumber(signal) : 0));
      });
    });
  } finally {
    for (const s of sessions) s.abort();
    await Promise.all([...sessions].map((s) => s.done));
    if (server) await new Promise<void>((resolve) => server?.close(() => resolve()));
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A run's private directory: `<tmpdir>/mitogen-fakessh-<pid of the run's process>-XXXXXX`. */
const DIR_PREFIX = "mitogen-fakessh-";
const DIR_NAME = /^mitogen-fakessh-(\d+)-[A-Za-z0-9]{6}$/;

/**
 * Remove the private directories that runs of processes now gone left behind
 * (a SIGKILLed master cannot clean up): only of that naming, real directories
 * (lstat: a symlink is not followed), owned by this user, whose process is
 * gone. Their contents are the stand-in script and the socket.
 */
function removeStale(router: Router): void {
  const uid = process.getuid?.();
  let names: string[];
  try {
    names = readdirSync(tmpdir());
  } catch {
    return;
  }
  for (const name of names) {
    const pid = Number(DIR_NAME.exec(name)?.[1]);
    if (!pid || pid === process.pid || processAlive(pid)) continue;
    const path = join(tmpdir(), name);
    try {
      const st = lstatSync(path);
      if (!st.isDirectory() || (uid !== undefined && st.uid !== uid)) continue;
      rmSync(path, { recursive: true, force: true });
      router.log("debug", `fakessh: removed ${path}, left by process ${pid}, which is gone`);
    } catch {
      // gone meanwhile, or not ours to remove
    }
  }
}

/** Is process `pid` there (ESRCH: it is not; EPERM: it is, someone else's)? */
function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    const e = err as { code?: string; name?: string };
    return !/ESRCH|NotFound/.test(`${e.code} ${e.name}`);
  }
}

/** The public face of this module: `fakessh.run` (the stand-in's half is for `cli.ts`). */
export const fakessh: { readonly run: typeof run } = Object.freeze({ run });

function listen(server: Server, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(path, () => {
      server.off("error", reject);
      resolve();
    });
  });
}

/** A word for sh, quoted. */
const q = (s: string) => `'${s.replaceAll("'", `'\\''`)}'`;

/**
 * Write the `ssh` the program will find: the single file, started as `ssh`, told its role, by the
 * runtime running this (not whatever `node` the program's PATH has first).
 */
function standIn(ssh: string, script: string): void {
  const runtime = isDeno ? `${q(process.execPath)} run -A --no-config --quiet` : q(process.execPath);
  writeFileSync(ssh, `#!/bin/sh\nMITOGEN_ROLE=ssh exec ${runtime} ${q(script)} "$@"\n`, { mode: 0o700 });
}

function signalNumber(name: string): number {
  return (constants.signals as Record<string, number>)[name] ?? 0;
}

/** One stand-in's connection: handshake, then the remote command with its stdio. */
class Session {
  readonly done: Promise<void>;
  readonly #socket: Socket;
  readonly #abort = new AbortController();
  #frames: FrameSource | null = null;
  /** EXIT was sent: nothing more is written. */
  #exited = false;
  /** The remote command, once the request opened. */
  #command: string | null = null;

  constructor(socket: Socket, key: Uint8Array, dir: string, dest: FakesshDest, router: Router) {
    this.#socket = socket;
    const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    const served = this.#serve(key, dir, dest, router).catch((err: unknown) => {
      this.#send(FAKESSH.ERROR, text.encode(err instanceof Error ? err.message : String(err)));
      this.#exit(SSH_FAILED);
    });
    // Done once the stand-in closed its end after EXIT (the close handshake), or at most CLOSE_MS later.
    this.done = served.then(() => {
      const late = setTimeout(() => {
        if (!socket.destroyed) router.log("warn", `fakessh: a stand-in did not close its connection within ${CLOSE_MS / 1000} s of its exit status; dropped`);
        socket.destroy();
      }, CLOSE_MS);
      return closed.finally(() => clearTimeout(late));
    });
    socket.on("close", () => {
      if (!this.#exited && !this.#abort.signal.aborted && this.#command !== null)
        router.log("info", `fakessh: the stand-in running ${JSON.stringify(this.#command.slice(0, 200))} went away first; stopping that command`);
      this.abort();
    });
    socket.on("error", (err) => {
      if (!this.#exited) router.log("warn", `fakessh: the connection to a stand-in failed: ${err.message}`);
    });
  }

  abort(): void {
    this.#abort.abort(new MitogenError("fakessh: the program ended"));
    this.#socket.destroy();
  }

  #send(type: number, body?: Uint8Array): boolean {
    return this.#socket.destroyed || this.#exited ? true : this.#socket.write(frame(type, body));
  }

  /**
   * The last frame: EXIT, after all output. Then the close handshake: this side ends its half and
   * reads on (dropping what comes) until the stand-in, which closes its end on EXIT, has closed it.
   * Closing here first could reset the connection before the stand-in read EXIT.
   */
  #exit(code: number): void {
    if (this.#exited) return;
    const body = new Uint8Array(4);
    new DataView(body.buffer).setUint32(0, code);
    this.#send(FAKESSH.EXIT, body);
    this.#exited = true;
    this.#frames?.discard();
    if (!this.#socket.destroyed) {
      this.#socket.resume();
      this.#socket.end();
    }
  }

  async #serve(key: Uint8Array, dir: string, dest: FakesshDest, router: Router): Promise<void> {
    const socket = this.#socket;
    const opened = await handshake(socket, key, dir);
    if (opened === null) {
      router.log("warn", "fakessh: a connection to the stand-in's socket did not prove the run's key; dropped");
      socket.destroy();
      return;
    }
    const { request, frames } = opened;
    this.#frames = frames;
    this.#command = request.command;
    const ctx = typeof dest === "function" ? await dest(request.host, request) : dest;
    const stdout = new Receiver(router, { respondent: ctx });
    const stderr = new Receiver(router, { respondent: ctx });
    const ctl = new Receiver(router, { respondent: ctx });
    try {
      const spec: Omit<ExecSpec, "ctl" | "stdout" | "stderr"> & Record<string, unknown> = {
        command: request.command,
        env: request.env,
        ctl: ctl.toSender(),
        stdout: stdout.toSender(),
        stderr: stderr.toSender(),
      };
      const call = ctx.with({ signal: this.#abort.signal }).callModule("mitogen:tunnel", "exec", spec) as Promise<ExecResult>;
      call.catch(() => {});
      const ready = (await Promise.race([ctl.getData(), call])) as { ready?: Sender } | ExecResult;
      if (!("ready" in ready) || !ready.ready) throw new MitogenError(`fakessh: ${ctx.name} did not start ${request.command}`);
      const stdin = ready.ready;
      const output = Promise.all([this.#relay(stdout, FAKESSH.STDOUT), this.#relay(stderr, FAKESSH.STDERR)]);
      void this.#input(stdin, frames);
      const [result] = await Promise.all([call, output]);
      this.#exit(result.code ?? SSH_FAILED);
    } finally {
      stdout.close();
      stderr.close();
      ctl.close();
    }
  }

  /** Frames from the stand-in, after the request: stdin for the remote command. */
  async #input(stdin: Sender, frames: FrameSource): Promise<void> {
    try {
      for (let f = await frames.next(); f && f.type !== FAKESSH.EOF; f = await frames.next()) {
        if (f.type === FAKESSH.STDIN) await stdin.send(f.body);
      }
    } catch {
      // the remote command is gone: its end is reported by the call
    }
    stdin.close();
  }

  /** The remote command's output, to the stand-in, as fast as it takes it. */
  async #relay(from: Receiver, type: number): Promise<void> {
    for await (const msg of from) {
      const data = msg.unpickle();
      if (!(data instanceof Uint8Array)) continue;
      if (!this.#send(type, data)) await waitDrain(this.#socket);
    }
  }
}

/** Frames off a transport, read no faster than they are taken (the socket pauses behind). */
class FrameSource {
  readonly #reader = new FrameReader(MAX_FRAME);
  readonly #frames: { type: number; body: Uint8Array }[] = [];
  readonly #socket: Socket;
  #ended = false;
  #discarding = false;
  #wake: (() => void) | null = null;

  constructor(transport: Transport, socket: Socket) {
    this.#socket = socket;
    transport.start(
      (chunk) => {
        if (this.#discarding) return;
        try {
          this.#frames.push(...this.#reader.push(chunk));
        } catch {
          socket.destroy();
        }
        if (this.#frames.length > 8) socket.pause();
        this.#wake?.();
      },
      () => {
        this.#ended = true;
        this.#wake?.();
      },
    );
  }

  /** From now on, read to the end and drop what comes: next() returns null. */
  discard(): void {
    this.#discarding = true;
    this.#ended = true;
    this.#frames.length = 0;
    this.#socket.resume();
    this.#wake?.();
  }

  /** The next frame; null at the end, or after `timeoutMs` without one. */
  async next(timeoutMs?: number): Promise<{ type: number; body: Uint8Array } | null> {
    const deadline = timeoutMs === undefined ? Infinity : Date.now() + timeoutMs;
    for (;;) {
      const f = this.#frames.shift();
      if (f) {
        this.#socket.resume();
        return f;
      }
      if (this.#ended || Date.now() >= deadline) return null;
      await new Promise<void>((resolve) => {
        const timer = deadline === Infinity ? undefined : setTimeout(resolve, deadline - Date.now());
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#wake = null;
    }
  }
}

/** The listener's side of the handshake: the request and the frames after it, or null if the key was not proven. */
async function handshake(socket: Socket, key: Uint8Array, dir: string): Promise<{ request: FakesshRequest; frames: FrameSource } | null> {
  const started = Date.now();
  let transport: Transport;
  try {
    transport = await acceptWithKey(nodeTransport(socket, socket), key, { timeoutMs: HANDSHAKE_MS });
  } catch {
    return null;
  }
  const frames = new FrameSource(transport, socket);
  const first = await frames.next(Math.max(0, HANDSHAKE_MS - (Date.now() - started)));
  if (!first || first.type !== FAKESSH.REQUEST || first.body.byteLength > MAX_REQUEST || first.body.byteLength < NONCE) return null;
  const opened = nacl.secretbox.open(first.body.subarray(NONCE), first.body.subarray(0, NONCE), key);
  if (!opened) return null;
  try {
    const r = JSON.parse(untext.decode(opened)) as FakesshRequest;
    if (typeof r.host !== "string" || typeof r.command !== "string") return null;
    const env: Record<string, string> = {};
    // The run's key and where its socket is stay here, under any name.
    const key64 = Buffer.from(key).toString("base64");
    for (const [k, v] of Object.entries(r.env ?? {})) if (typeof v === "string" && !isPrivate(k) && !v.includes(key64) && !v.includes(dir)) env[k] = v;
    return {
      request: { host: r.host, user: typeof r.user === "string" ? r.user : null, port: typeof r.port === "number" ? r.port : null, command: r.command, env },
      frames,
    };
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------
// the stand-in: dist/mitogen.mjs started as `ssh`

/** True when this process is the `ssh` stand-in of a fakessh run. */
export function isStandIn(argv1: string | undefined = process.argv[1]): boolean {
  return process.env.MITOGEN_ROLE === "ssh" || (argv1 !== undefined && basename(argv1) === "ssh");
}

/** ssh's options that take an argument (OpenSSH's getopt string). */
const WITH_ARG = new Set("bBcDeEFiIJlLmoOpPQRSwW");
/** Options whose job a tunnel cannot do: forwarding, multiplexing, background. */
const REFUSED = new Set("DLRWfMNOw");

/** The sftp subsystem (scp's default protocol, sftp): the host's own sftp-server, wherever its system keeps it. */
const SFTP_SERVER =
  'for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/lib/ssh/sftp-server /usr/libexec/sftp-server /usr/lib/sftp-server; do [ -x "$p" ] && exec "$p"; done; echo "fakessh: no sftp-server on this host" >&2; exit 127';

/** Variables of the run itself (its key, its socket, the stand-in's role): never sent to a remote command. */
const isPrivate = (name: string): boolean => name.startsWith("MITOGEN_FAKESSH") || name === "MITOGEN_ROLE";

/** ssh's command line, as far as a stand-in needs it; `-o SendEnv=` and `-o SetEnv=` never pass on the run's own variables. */
export function parseSshArgs(argv: readonly string[], env: Record<string, string | undefined> = {}): FakesshRequest & { noStdin: boolean } {
  let user: string | null = null;
  let port: number | null = null;
  let noStdin = false;
  let subsystem = false;
  const sendEnv: string[] = [];
  const setEnv: Record<string, string> = {};
  const option = (raw: string) => {
    const m = /^\s*(\w+)\s*(?:=|\s)\s*(.*)$/.exec(raw);
    if (!m) return;
    const name = (m[1] as string).toLowerCase();
    const value = (m[2] as string).trim();
    if (name === "user") user = value;
    else if (name === "port") port = Number(value);
    else if (name === "sendenv") sendEnv.push(...value.split(/\s+/));
    else if (name === "setenv")
      for (const pair of value.split(/\s+/)) {
        const eq = pair.indexOf("=");
        if (eq > 0) setEnv[pair.slice(0, eq)] = pair.slice(eq + 1);
      }
  };
  let i = 0;
  for (; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === "--") {
      i++;
      break;
    }
    if (!a.startsWith("-") || a === "-") break;
    for (let j = 1; j < a.length; j++) {
      const c = a[j] as string;
      if (REFUSED.has(c)) throw new MitogenError(`fakessh: ssh option -${c} is not supported (only remote commands are tunnelled)`);
      if (!WITH_ARG.has(c)) {
        if (c === "n") noStdin = true;
        else if (c === "s") subsystem = true;
        continue;
      }
      const value = j + 1 < a.length ? a.slice(j + 1) : argv[++i];
      if (value === undefined) throw new MitogenError(`fakessh: ssh option -${c} needs a value`);
      if (c === "l") user = value;
      else if (c === "p") port = Number(value);
      else if (c === "o") option(value);
      break;
    }
  }
  let host = argv[i];
  if (host === undefined) throw new MitogenError("fakessh: ssh was started without a destination");
  const url = /^ssh:\/\/(?:([^@/]+)@)?(\[[^\]]+\]|[^:/]+)(?::(\d+))?\/?$/.exec(host);
  if (url) {
    if (url[1]) user = url[1];
    host = url[2] as string;
    if (url[3]) port = Number(url[3]);
  } else {
    const at = host.lastIndexOf("@");
    if (at >= 0) {
      user = host.slice(0, at);
      host = host.slice(at + 1);
    }
  }
  const words = argv.slice(i + 1);
  if (!words.length) throw new MitogenError("fakessh: ssh was started without a remote command (no shell sessions through the tunnel)");
  const forwarded: Record<string, string> = {};
  for (const pattern of sendEnv) {
    const re = new RegExp(
      `^${pattern
        .replace(/[.+^${}()|[\]\\]/g, "\\$&")
        .replaceAll("*", ".*")
        .replaceAll("?", ".")}$`,
    );
    for (const [k, v] of Object.entries(env)) if (v !== undefined && re.test(k)) forwarded[k] = v;
  }
  Object.assign(forwarded, setEnv);
  for (const k of Object.keys(forwarded)) if (isPrivate(k)) delete forwarded[k];
  let command = words.join(" ");
  if (subsystem) {
    if (command !== "sftp") throw new MitogenError(`fakessh: ssh subsystem ${JSON.stringify(command)} is not supported (only sftp)`);
    command = SFTP_SERVER;
  }
  return { host, user, port, command, env: forwarded, noStdin };
}

/** The stand-in's main: parse ssh's argv, connect back to `run()`, relay stdio; resolves with the exit status. */
export async function sshMain(argv: string[]): Promise<number> {
  const fail = (message: string): number => {
    process.stderr.write(`${message}\n`);
    return SSH_FAILED;
  };
  const socketPath = process.env.MITOGEN_FAKESSH;
  const key64 = process.env.MITOGEN_FAKESSH_KEY;
  delete process.env.MITOGEN_ROLE;
  if (!socketPath || !key64) return fail("mitogen: started as ssh outside fakessh.run (MITOGEN_FAKESSH is not set)");
  let request: ReturnType<typeof parseSshArgs>;
  try {
    request = parseSshArgs(argv, process.env);
  } catch (err) {
    return fail((err as Error).message);
  }
  const key = new Uint8Array(Buffer.from(key64, "base64"));
  const socket = createConnection(socketPath);
  return new Promise<number>((resolve) => {
    let code = SSH_FAILED;
    let reported = false;
    /** EXIT came: this side has closed its end (the close handshake); nothing more is written. */
    let exited = false;
    const reader = new FrameReader(MAX_FRAME + 5);
    let input: { stop(): void } | null = null;
    const send = (type: number, body?: Uint8Array): boolean => (exited || socket.destroyed ? true : socket.write(frame(type, body)));
    const sendInput = () => {
      if (request.noStdin) {
        send(FAKESSH.EOF);
        return;
      }
      input = stdinSource(
        async (chunk) => {
          for (let at = 0; at < chunk.byteLength && !exited; at += MAX_FRAME) {
            if (!send(FAKESSH.STDIN, chunk.subarray(at, at + MAX_FRAME))) await waitDrain(socket);
          }
        },
        () => send(FAKESSH.EOF),
      );
    };
    // Output goes out in order; the socket is read no faster than stdout takes it.
    const stdout = stdioSink("stdout");
    const stderr = stdioSink("stderr");
    let writing: Promise<void> = Promise.resolve();
    let backlog = 0;
    const output = (sink: (chunk: Uint8Array) => Promise<void>, chunk: Uint8Array) => {
      if (++backlog > 4) socket.pause();
      writing = writing
        .then(() => sink(chunk))
        .catch(() => {}) // the program closed its end: what it did not read is dropped
        .finally(() => {
          if (--backlog <= 4) socket.resume();
        });
    };
    const onFrame = (type: number, body: Uint8Array) => {
      if (type === FAKESSH.STDOUT) output(stdout, body);
      else if (type === FAKESSH.STDERR) output(stderr, body);
      else if (type === FAKESSH.ERROR) output(stderr, text.encode(`ssh: ${untext.decode(body)}\n`));
      else if (type === FAKESSH.EXIT && body.byteLength === 4 && !exited) {
        code = new DataView(body.buffer, body.byteOffset, 4).getUint32(0);
        // The run side reads on until this end closes: stop the input and close it.
        exited = true;
        input?.stop();
        socket.end();
      }
    };
    const onData = (chunk: Uint8Array) => {
      try {
        for (const f of reader.push(chunk)) onFrame(f.type, f.body);
      } catch (err) {
        process.stderr.write(`ssh: ${(err as Error).message}\n`);
        socket.destroy();
      }
    };
    connectWithKey(nodeTransport(socket, socket), key, { timeoutMs: HANDSHAKE_MS }).then(
      (transport) => {
        const { noStdin: _, ...wire } = request;
        const nonce = nacl.randomBytes(NONCE);
        const sealed = nacl.secretbox(text.encode(JSON.stringify(wire)), nonce, key);
        const body = new Uint8Array(NONCE + sealed.byteLength);
        body.set(nonce);
        body.set(sealed, NONCE);
        send(FAKESSH.REQUEST, body);
        sendInput();
        transport.start(onData, () => {
          if (!exited && !reported) {
            reported = true;
            process.stderr.write("ssh: fakessh.run closed the connection before the remote command's exit status\n");
          }
        });
      },
      (err: Error) => {
        if (!reported) process.stderr.write(`ssh: fakessh.run at ${socketPath} did not accept this stand-in: ${err.message}\n`);
        reported = true;
      },
    );
    socket.on("error", (err) => {
      if (exited || reported) return; // the exit status is in: nothing was lost
      reported = true;
      process.stderr.write(`ssh: cannot reach fakessh.run at ${socketPath}: ${err.message}\n`);
    });
    // The program may close its end first (an sftp client that is done): that is no failure of ours.
    if (!isDeno) process.stdout.on("error", () => {});
    socket.on("close", () => {
      input?.stop();
      // The exit waits for the last output to leave this process: exiting with it queued would drop it.
      void writing.then(stdioFlushed).then(() => resolve(code));
    });
  });
}
