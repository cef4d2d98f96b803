/**
 * `mitogen serve`: a per-user master that keeps the contexts the CLI's commands start, behind a unix
 * listener (listen.ts), so that the next `run`, `call`, `eval`, `put` or `get` on the same targets
 * attaches (session.ts) and reuses them: a call per host instead of an ssh handshake and a boot.
 * Contexts are got by spec from the context service's table (contextservice.ts) and leased: one
 * unused for the context idle time is shut down, and the server ends once no command has been
 * attached for its own idle time. Its socket is `serve.sock` in `$XDG_RUNTIME_DIR/mitogen/` or
 * `/tmp/mitogen-<uid>/`, a 0700 directory of this user (checked before use, never followed through
 * a link). Master only; the CLI's, not the library's.
 *
 * @module
 */
import { closeSync, constants, existsSync, lstatSync, mkdirSync, openSync, readFileSync, unlinkSync } from "node:fs";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { CallError, MitogenError } from "./errors.ts";
import { isDeno } from "./runtime.ts";
import { formatRecord, levelFromEnv } from "./logs.ts";
import type { LogRecord } from "./logapi.ts";
import { Receiver, type Sender } from "./channels.ts";
import type { Context } from "./context.ts";
import { defineService, type ServiceCall } from "./router.ts";
import { Router } from "./master.ts";
import { contextOf, type ContextSpec } from "./contextservice.ts";
import { connect, type Session } from "./session.ts";

/** The service the CLI's commands call in the server. */
export const SERVE_SERVICE = "mitogen.Serve";
/** Default of `--context-idle`: an unused context is kept this long (ms). */
export const CONTEXT_IDLE_MS = 10 * 60_000;
/** Default of `--idle`: the server ends after this long with no command attached and no context in use (ms). */
export const SERVER_IDLE_MS = 30 * 60_000;
/** How long a command waits for the server's handshake before going on without it (ms). */
const ATTACH_TIMEOUT_MS = 3_000;

/** A server directory that cannot be used, or a context the server could not start (its error's message, as without the server). */
export class ServeError extends MitogenError {
  override name = "ServeError";
}

/** The server's directory: `$XDG_RUNTIME_DIR/mitogen`, or `/tmp/mitogen-<uid>` without it. */
export function serveDir(env: Record<string, string | undefined> = process.env): string {
  const xdg = env.XDG_RUNTIME_DIR;
  return xdg ? join(xdg, "mitogen") : `/tmp/mitogen-${process.getuid?.() ?? "user"}`;
}

/** The server's socket in `dir` (its key is beside it, `.key`). */
export const socketIn = (dir: string): string => join(dir, "serve.sock");

/**
 * Check `dir` is a directory (not a link) of this user that no one else may enter, creating it 0700
 * first when `create` (its parent must exist). A ServeError says what is wrong.
 */
export function checkServeDir(dir: string, create: boolean): void {
  let st: import("node:fs").Stats;
  try {
    st = lstatSync(dir);
  } catch (err) {
    if (!create || (err as NodeJS.ErrnoException).code !== "ENOENT") throw new ServeError(`cannot use ${dir}: ${(err as Error).message}`, { cause: err });
    try {
      mkdirSync(dir, { mode: 0o700 });
      st = lstatSync(dir);
    } catch (e) {
      throw new ServeError(`cannot create ${dir}: ${(e as Error).message}`, { cause: e });
    }
  }
  const uid = process.getuid?.();
  if (!st.isDirectory()) throw new ServeError(`${dir} is not a directory (a link, or a file): remove it`);
  if (uid !== undefined && st.uid !== uid) throw new ServeError(`${dir} belongs to uid ${st.uid}, not to this user (${uid})`);
  if (st.mode & 0o077) throw new ServeError(`${dir} has mode ${(st.mode & 0o777).toString(8)}: it must be 0700`);
}

/** What `mitogen serve --status` shows. */
export interface ServeStatus {
  pid: number;
  socket: string;
  upMs: number;
  /** Since a command was last attached or a context last in use; 0 while one is. */
  idleMs: number;
  serverIdleMs: number;
  contextIdleMs: number;
  /** Commands attached now (the one asking not counted). */
  sessions: number;
  contexts: { id: number; name: string; method: string | null; runtime: string | null; parent: number | null; inUse: number; idleMs: number }[];
}

/** A running server (in this process). */
export interface Server {
  readonly path: string;
  /** Resolves once it has stopped (`stop()`, `--stop`, idle, a signal). */
  readonly stopped: Promise<void>;
  stop(): Promise<void>;
}

/** Options of {@link runServer}. */
export interface ServerOptions {
  dir: string;
  contextIdleMs: number;
  serverIdleMs: number;
  /** Where its own log lines go (default stderr). */
  write?: (line: string) => void;
}

/** What an attached command holds: per context it asked for, each time it did, the via chain leased and the names it hears by it. */
type Lease = { held: Map<number, { chain: number[]; names: string[] }[]> };

/** Run the server in this process until it stops. */
export async function runServer(options: ServerOptions): Promise<Server> {
  const { dir, contextIdleMs, serverIdleMs } = options;
  const write = options.write ?? ((line: string) => process.stderr.write(line));
  checkServeDir(dir, true);
  const path = socketIn(dir);
  const debug = levelFromEnv() === "debug";
  /** Per context: commands using it now, and when one last did. */
  const uses = new Map<number, { inUse: number; last: number }>();
  /** Per attached command: the via chains it leased (by the context it asked for). */
  const leases = new Map<number, Lease>();
  /**
   * Per context name: the commands that hear its log records (its output among them), each with how many
   * times it asked for a context of that name (or one through it) and has not given it back.
   */
  const logTo = new Map<string, Map<number, { to: Sender; held: number }>>();
  /** `session` asked for (1, with where its records go) or gave back (-1) a context heard by `names`. */
  const hear = (session: number, names: string[], by: 1 | -1, to?: Sender): void => {
    for (const name of names) {
      const holders = logTo.get(name) ?? new Map<number, { to: Sender; held: number }>();
      const h = holders.get(session) ?? (to ? { to, held: 0 } : undefined);
      if (!h) continue;
      h.held += by;
      if (h.held > 0) holders.set(session, h);
      else holders.delete(session);
      if (holders.size) logTo.set(name, holders);
      else logTo.delete(name);
    }
  };
  const t0 = Date.now();
  let lastActive = t0;

  const sink = (r: LogRecord): void => {
    // The records of a context (or one below it, or of its start) go to the commands that use it, which
    // sort them by host as without a server. Two at once both hear them: neither loses its own.
    const path = Array.isArray(r.path) ? r.path : [];
    for (let j = path.length - 1; j >= 0; j--) {
      const holders = logTo.get(path[j] as string);
      if (holders) {
        for (const h of holders.values()) h.to.send(r).catch(() => {});
        return;
      }
    }
    if (debug || r.level === "warn" || r.level === "error") write(`${formatRecord(r, { time: "iso" })}\n`);
  };
  const router = new Router({ log: sink });

  const chainOf = (ctx: Context): number[] => {
    const ids = [ctx.contextId];
    for (let id = router.parentOf(ctx.contextId); id !== undefined && id !== router.myId && ids.length < 64; id = router.parentOf(id)) ids.push(id);
    return ids;
  };
  const use = (id: number) => {
    let u = uses.get(id);
    if (!u) uses.set(id, (u = { inUse: 0, last: Date.now() }));
    return u;
  };
  const leaseOf = (caller: Context): Lease => {
    let l = leases.get(caller.contextId);
    if (!l) {
      const made: Lease = { held: new Map() };
      leases.set(caller.contextId, (l = made));
      // A command that goes (done, killed, Ctrl-C) gives back what it still held.
      void caller.disconnected().then(() => {
        for (const times of made.held.values()) for (const t of times) unuse(t.chain);
        made.held.clear();
        for (const [name, holders] of logTo) if (holders.delete(caller.contextId) && !holders.size) logTo.delete(name);
        leases.delete(caller.contextId);
        lastActive = Date.now();
      });
    }
    return l;
  };
  const unuse = (chain: number[]) => {
    const now = Date.now();
    for (const id of chain) {
      const u = use(id);
      u.inUse = Math.max(0, u.inUse - 1);
      u.last = now;
    }
  };

  const pool = await router.serve(
    defineService({
      name: SERVE_SERVICE,
      policy: "parents",
      methods: {
        acquire: {
          run: async ({ spec, logs }: { spec: ContextSpec; logs?: Sender }, call: ServiceCall): Promise<Context> => {
            const lease = leaseOf(call.caller);
            const session = call.caller.contextId;
            const names: string[] = [];
            for (let s: ContextSpec | undefined = spec, n = 0; s && n < 64; s = s.options?.via as ContextSpec | undefined, n++) {
              const name = s.options?.name;
              if (logs && typeof name === "string") names.push(name);
            }
            // Heard from now (its start's records too) until given back; on a failed start, until the command goes.
            hear(session, names, 1, logs);
            const ctx = await contextOf(router, spec);
            if (call.caller.isDisconnected || call.signal?.aborted) return ctx;
            const chain = chainOf(ctx);
            for (const id of chain) {
              const u = use(id);
              u.inUse++;
              u.last = Date.now();
            }
            const held = lease.held.get(ctx.contextId) ?? [];
            held.push({ chain, names });
            lease.held.set(ctx.contextId, held);
            return ctx;
          },
        },
        release: {
          run: ({ id }: { id: number }, call: ServiceCall): void => {
            const lease = leases.get(call.caller.contextId);
            const held = lease?.held.get(id);
            const last = held?.pop();
            if (!lease || !last) return;
            unuse(last.chain);
            hear(call.caller.contextId, last.names, -1);
            if (held?.length === 0) lease.held.delete(id);
          },
        },
        status: {
          run: async (_: unknown, call: ServiceCall): Promise<ServeStatus> => {
            const now = Date.now();
            const infos = await router.contexts();
            const contexts = infos
              .filter((c) => c.id !== router.myId && c.method !== "session")
              .map((c) => {
                const u = use(c.id);
                return { id: c.id, name: c.name, method: c.method, runtime: c.runtime, parent: c.parent, inUse: u.inUse, idleMs: u.inUse ? 0 : now - u.last };
              });
            const others = infos.filter((c) => c.method === "session" && c.id !== call.caller.contextId).length;
            return {
              pid: process.pid,
              socket: path,
              upMs: now - t0,
              idleMs: others || contexts.some((c) => c.inUse) ? 0 : now - lastActive,
              serverIdleMs,
              contextIdleMs,
              sessions: others,
              contexts,
            };
          },
        },
        stop: {
          run: (_: unknown): null => {
            setTimeout(() => void stop(), 0);
            return null;
          },
        },
      },
    }),
  );
  pool.size = 1024;
  let listener: Awaited<ReturnType<Router["listen"]>>;
  try {
    listener = await router.listen({ path });
  } catch (err) {
    await router.shutdown();
    throw err;
  }

  let stopping: Promise<void> | null = null;
  let done = (): void => {};
  const stopped = new Promise<void>((resolve) => {
    done = resolve;
  });
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      clearInterval(sweeper);
      await router.shutdown();
      done();
    })();
    return stopping;
  };
  // Expire what has been idle long enough, and the server once nothing has used it for its idle time.
  const sweep = async () => {
    const now = Date.now();
    const infos = (await router.contexts()).filter((c) => c.id !== router.myId && c.method !== "session");
    const live = new Set(infos.map((c) => c.id));
    for (const id of uses.keys()) if (!live.has(id)) uses.delete(id);
    let busy = listener.sessions > 0;
    for (const c of infos) {
      const u = use(c.id);
      if (u.inUse) busy = true;
      else if (now - u.last >= contextIdleMs) {
        uses.delete(c.id);
        if (debug) write(`mitogen serve: ${c.name} idle for ${Math.round((now - u.last) / 1000)} s: shutting it down\n`);
        void router
          .contextById(c.id)
          .shutdown()
          .catch(() => {});
      }
    }
    if (busy) lastActive = now;
    else if (now - lastActive >= serverIdleMs) {
      if (debug) write(`mitogen serve: idle for ${Math.round((now - lastActive) / 1000)} s: stopping\n`);
      void stop();
    }
  };
  let sweeping = false;
  const sweeper = setInterval(
    () => {
      if (sweeping) return;
      sweeping = true;
      sweep()
        .catch((err: unknown) => write(`mitogen serve: ${err instanceof Error ? err.message : String(err)}\n`))
        .finally(() => {
          sweeping = false;
        });
    },
    Math.min(10_000, Math.max(50, Math.min(contextIdleMs, serverIdleMs) / 4)),
  );
  return { path, stopped, stop };
}

/** A command attached to the server: where it gets its contexts and gives them back. */
export interface Attached extends AsyncDisposable {
  readonly path: string;
  /** The command's router (the session's): Receivers are made on it. */
  readonly router: Router;
  /** The server's context of `spec`, started there on first use; held until released. */
  acquire(spec: ContextSpec, signal: AbortSignal): Promise<Context>;
  /** Give `ctx` back. */
  release(ctx: Context): Promise<void>;
  close(): Promise<void>;
}

/**
 * Attach to this user's server, if one runs: null when there is none, its socket is stale (then
 * removed), its directory is not private, or it does not answer within {@link ATTACH_TIMEOUT_MS}.
 * `log` gets the log records of the contexts the command uses, as the command's own Router would.
 */
export async function attach(log: (r: LogRecord) => void, dir: string = serveDir()): Promise<Attached | null> {
  const path = socketIn(dir);
  const debug = levelFromEnv() === "debug";
  const note = (text: string) => {
    if (debug) process.stderr.write(`mitogen: ${text}\n`);
  };
  if (!existsSync(path)) return null;
  try {
    checkServeDir(dir, false);
  } catch (err) {
    process.stderr.write(`mitogen: not using the server at ${path}: ${(err as Error).message}\n`);
    return null;
  }
  let session: Session;
  try {
    session = await connect({ path, timeout: ATTACH_TIMEOUT_MS, log });
  } catch (err) {
    const refused = (e: unknown) => ((e as Error).cause as NodeJS.ErrnoException | undefined)?.code === "ECONNREFUSED";
    // Refused twice, a moment apart: no server (one starting has the socket bound a moment before it listens).
    const stale =
      refused(err) &&
      (await new Promise((r) => setTimeout(r, 200)).then(() =>
        connect({ path, timeout: ATTACH_TIMEOUT_MS }).then(
          (s) => s.close().then(() => false),
          (e: unknown) => refused(e),
        ),
      ));
    if (stale) {
      // Nobody listens: a server that died. The directory is ours only (checked above).
      removeStale(path);
      note(`removed the stale server socket ${path}`);
    } else note(`not using the server at ${path}: ${(err as Error).message}`);
    return null;
  }
  const logs = new Receiver(session.router);
  void (async () => {
    for await (const msg of logs) log(msg.unpickle() as LogRecord);
  })().catch(() => {});
  note(`attached to the server at ${path}`);
  const service = session.context;
  const close = async () => {
    logs.close();
    await session.close();
  };
  return {
    path,
    router: session.router,
    acquire: (spec, signal) =>
      (service.with({ signal }).callService(SERVE_SERVICE, "acquire", { spec, logs: logs.toSender() }) as Promise<Context>).catch((err: unknown) => {
        throw err instanceof CallError ? new ServeError(err.remoteMessage, { cause: err }) : err;
      }),
    release: async (ctx) => {
      await service.callService(SERVE_SERVICE, "release", { id: ctx.contextId });
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}

function removeStale(path: string): void {
  for (const f of [path, `${path}.key`]) {
    try {
      const st = lstatSync(f);
      if (st.isSocket() || (st.isFile() && f.endsWith(".key"))) unlinkSync(f);
    } catch {
      // gone already
    }
  }
}

/** A duration: `90` or `90s` (seconds), `500ms`, `10m`, `1h`; in ms. */
export function parseDuration(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text.trim());
  if (!m) throw new ServeError(`${what} must be a duration (90, 90s, 500ms, 10m, 1h), not ${JSON.stringify(text)}`);
  const ms = Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? "s") as "s"];
  if (!(ms > 0) || !Number.isFinite(ms)) throw new ServeError(`${what} must be more than 0`);
  return ms;
}

const human = (ms: number): string => {
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${s % 60 ? `${s % 60}s` : ""}`;
  return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60) ? `${Math.floor((s % 3600) / 60)}m` : ""}`;
};

/** `mitogen help serve`. */
export const SERVE_HELP = `usage: mitogen serve [--foreground] [--context-idle TIME] [--idle TIME]
       mitogen serve --status [--json]
       mitogen serve --stop

keep the contexts that run, call, eval, put and get start, so that the next command on the same
targets (same host, user, port, --via chain, --sudo, --runtime) reuses them: a call per host instead
of an ssh connection and a runtime boot. Commands attach to it by themselves while it runs
(--no-serve: not). One server per user; its socket is serve.sock in $XDG_RUNTIME_DIR/mitogen/, or
/tmp/mitogen-<uid>/ without XDG_RUNTIME_DIR, a directory only its user may enter (0700).

options:
  --foreground          run in this process (Ctrl-C stops it); default: start it in the background
  --context-idle TIME   shut a context down once unused this long (default 10m)
  --idle TIME           stop once no command was attached and no context used this long (default 30m)
  --status              what runs: the server, its contexts, what is in use, idle times
  --json                --status as one JSON object
  --stop                stop the server and every context it holds
  -h, --help            this text

TIME: 90 or 90s, 500ms, 10m, 1h.
`;

/** `mitogen serve ...`; resolves with the exit status. */
export async function serveCommand(argv: string[]): Promise<number> {
  let values: Record<string, string | boolean | undefined>;
  let contextIdleMs = CONTEXT_IDLE_MS;
  let serverIdleMs = SERVER_IDLE_MS;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        foreground: { type: "boolean" },
        "context-idle": { type: "string" },
        idle: { type: "string" },
        status: { type: "boolean" },
        json: { type: "boolean" },
        stop: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
      allowPositionals: false,
    }));
    if (typeof values["context-idle"] === "string") contextIdleMs = parseDuration(values["context-idle"], "--context-idle");
    if (typeof values.idle === "string") serverIdleMs = parseDuration(values.idle, "--idle");
    if (values.stop && values.status) throw new ServeError("--stop and --status: one at a time");
  } catch (err) {
    process.stderr.write(`mitogen serve: ${(err as Error).message}\n\n${SERVE_HELP}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(SERVE_HELP);
    return 0;
  }
  const dir = serveDir();
  const path = socketIn(dir);
  if (values.status || values.stop) {
    const server = await attach(() => {}, dir);
    if (!server) {
      process.stderr.write(`mitogen serve: no server at ${path}\n`);
      return 1;
    }
    try {
      const status = (await server.router.contextById(server.router.parentIds[0] as number).callService(SERVE_SERVICE, "status")) as ServeStatus;
      if (values.stop) {
        await server.router.contextById(server.router.parentIds[0] as number).callService(SERVE_SERVICE, "stop");
        await server.close();
        // Gone once its socket is (bounded: a server that hangs is left to its own end).
        for (let i = 0; i < 200 && existsSync(path); i++) await new Promise((r) => setTimeout(r, 50));
        process.stdout.write(`mitogen serve: stopped (pid ${status.pid}, ${status.contexts.length} contexts)\n`);
        return 0;
      }
      process.stdout.write(values.json ? `${JSON.stringify(status)}\n` : statusText(status));
      return 0;
    } finally {
      await server.close();
    }
  }
  if (values.foreground) {
    let server: Server;
    try {
      server = await runServer({ dir, contextIdleMs, serverIdleMs });
    } catch (err) {
      process.stderr.write(`mitogen serve: ${(err as Error).message}\n`);
      return 1;
    }
    const onSignal = () => void server.stop();
    const signals = ["SIGINT", "SIGTERM", "SIGHUP"] as const;
    for (const s of signals) process.on(s, onSignal);
    process.stdout.write(
      `mitogen serve: pid ${process.pid} listening on ${server.path}; contexts end after ${human(contextIdleMs)} unused, the server after ${human(serverIdleMs)} idle\n`,
    );
    await server.stopped;
    for (const s of signals) process.off(s, onSignal);
    return 0;
  }
  return background(dir, argv);
}

/** Start `serve --foreground` detached (its own session, output to serve.log), and wait until it answers. */
async function background(dir: string, argv: string[]): Promise<number> {
  const path = socketIn(dir);
  try {
    checkServeDir(dir, true);
  } catch (err) {
    process.stderr.write(`mitogen serve: ${(err as Error).message}\n`);
    return 1;
  }
  const running = await attach(() => {}, dir);
  if (running) {
    await running.close();
    process.stdout.write(`mitogen serve: already running at ${path}\n`);
    return 0;
  }
  const logFile = join(dir, "serve.log");
  const fd = openSync(logFile, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | (constants.O_NOFOLLOW ?? 0), 0o600);
  const script = process.argv[1] as string;
  const args = isDeno ? ["run", "-A", script] : [...process.execArgv, script];
  const child = spawn(process.execPath, [...args, "serve", "--foreground", ...argv], { detached: true, stdio: ["ignore", fd, fd] });
  closeSync(fd);
  let exited: number | null = null;
  child.on("exit", (code) => {
    exited = code ?? 1;
  });
  child.on("error", () => {
    exited = 1;
  });
  // Ready once it answers; bounded (a runtime boots in well under a second).
  const listening = () => {
    try {
      return readFileSync(logFile, "utf8").includes(" listening on ");
    } catch {
      return false;
    }
  };
  for (let i = 0; i < 400 && exited === null; i++) {
    await new Promise((r) => setTimeout(r, 50));
    if (!listening()) continue;
    const up = await attach(() => {}, dir);
    if (up) {
      await up.close();
      child.unref();
      process.stdout.write(`mitogen serve: pid ${child.pid} listening on ${path} (log: ${logFile})\n`);
      return 0;
    }
  }
  let tail = "";
  try {
    tail = readFileSync(logFile, "utf8").trim().split("\n").slice(-5).join("\n");
  } catch {
    // no log
  }
  if (exited === null) child.kill("SIGTERM");
  child.unref();
  process.stderr.write(`mitogen serve: the server did not start${tail ? `:\n${tail}` : ""}\n`);
  return 1;
}

function statusText(s: ServeStatus): string {
  const head = `mitogen serve: pid ${s.pid} on ${s.socket}, up ${human(s.upMs)}, ${s.sessions} other command${s.sessions === 1 ? "" : "s"} attached, ${
    s.idleMs ? `idle ${human(s.idleMs)} (stops at ${human(s.serverIdleMs)})` : "in use"
  }\n`;
  if (!s.contexts.length) return `${head}no contexts (an unused one ends after ${human(s.contextIdleMs)})\n`;
  const rows = s.contexts.map((c) => [String(c.id), c.name, c.method ?? "", c.runtime ?? "", c.inUse ? `in use (${c.inUse})` : `idle ${human(c.idleMs)}`]);
  const all = [["ID", "NAME", "METHOD", "RUNTIME", "STATE"], ...rows];
  const widths = all[0]?.map((_, i) => Math.max(...all.map((r) => (r[i] as string).length))) ?? [];
  const lines = all.map((r) => `  ${r.map((v, i) => (i === r.length - 1 ? v : v.padEnd(widths[i] as number))).join("  ")}`);
  return `${head}${s.contexts.length} context${s.contexts.length === 1 ? "" : "s"} (an unused one ends after ${human(s.contextIdleMs)}):\n${lines.join("\n")}\n`;
}
