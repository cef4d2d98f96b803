/**
 * fakessh: run a local program (rsync, scp, git) whose `ssh` is tunnelled
 * through a context of the tree, so it reaches hosts only the tree reaches
 * (behind a bastion, as root through sudo) with nothing installed there.
 *
 * This file is the run side: `fakessh.run`, the socket server and the relay.
 * `run()` puts a private directory (mode 0700) first on the program's PATH.
 * In it, `ssh` is `dist/mitogen.mjs` itself, started under that name (the
 * file's third role: the stand-in, fakessh-standin.ts). The stand-in parses
 * ssh's options, connects back to `run()` over a unix socket in the same
 * directory, proves it knows the run's one-time key, and hands over the
 * remote command (the socket's frames: fakessh-wire.ts). The command then
 * runs in the destination context as a subprocess (`mitogen:tunnel`), its
 * stdin, stdout and stderr tunnelled through the tree with flow control, and
 * its exit status becomes the stand-in's.
 *
 * @module
 */
import { chmodSync, existsSync, lstatSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { constants, tmpdir } from "node:os";
import { basename, delimiter, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { spawn } from "node:child_process";
import nacl from "tweetnacl";
import { MitogenError } from "./errors.ts";
import { isDeno } from "./runtime.ts";
import { nodeTransport, type Transport } from "./transport.ts";
import { Receiver, type Sender } from "./channels.ts";
import type { Context } from "./context.ts";
import type { Router } from "./router.ts";
import { acceptWithKey } from "./handshake.ts";
import { callExec, type ExecResult, type ExecSpec } from "./tunnel.ts";
import {
  FAKESSH,
  type FakesshRequest,
  FrameReader,
  frame,
  HANDSHAKE_MS,
  isPrivate,
  MAX_FRAME,
  NONCE,
  SSH_FAILED,
  text,
  untext,
  waitDrain,
} from "./fakessh-wire.ts";

export type { FakesshRequest } from "./fakessh-wire.ts";

/** The biggest sealed request the listener reads before the key is proven. */
const MAX_REQUEST = 64 * 1024;
/** How long the run side waits, after EXIT, for the stand-in to close its end. */
const CLOSE_MS = 30_000;

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
 * import { fakessh, Router } from "mitogen";
 * await using router = new Router();
 * const ctx = await router.local();
 * const code = await fakessh.run(ctx, router, ["rsync", "-a", "./examples/", "any:/tmp/examples/"]);
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
      const spec: ExecSpec = {
        command: request.command,
        env: request.env,
        ctl: ctl.toSender(),
        stdout: stdout.toSender(),
        stderr: stderr.toSender(),
      };
      const call = callExec(ctx.with({ signal: this.#abort.signal }), spec);
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
