/**
 * Starting a process with pipes under Deno, through `Deno.Command`, shaped
 * like the Node streams the rest of `mitogen:parent` uses (launch.ts). Deno's `node:child_process`
 * pipes hand each read to a garbage collector that does not feel them: a
 * Deno process reading 512 MiB through one grew by 210 MiB, through
 * `Deno.Command` by none. Also `killGroup`, for any start in a session of its
 * own. Part of `mitogen:parent` and `mitogen:tunnel`, not of the child payload.
 *
 * @module
 */
import { nodeProcess } from "./runtime.ts";

type Listener = (...args: never[]) => void;

/** SIGKILL the process group `pid` leads (each start has a session of its own); nothing for no pid (0 would be our own group). */
export function killGroup(pid: number): void {
  if (!(pid > 0)) return;
  try {
    nodeProcess().kill(-pid, "SIGKILL");
  } catch {
    // the group is empty (or not ours to signal)
  }
}

/** The Node-readable subset launch.ts, bootstrap.ts and nodeTransport use. */
export interface PipeReader {
  on(event: "data", cb: (chunk: Uint8Array) => void): PipeReader;
  on(event: "end" | "close", cb: () => void): PipeReader;
  on(event: "error", cb: (err: Error) => void): PipeReader;
  destroy(): void;
  /** Stop emitting data until resume() (the pipe then fills and its writer waits). */
  pause(): void;
  resume(): void;
}

/** The Node-writable subset nodeTransport uses. */
export interface PipeWriter {
  write(chunk: Uint8Array, cb?: (err?: Error | null) => void): boolean;
  /** Bytes written and not yet taken by the pipe. */
  readonly writableLength: number;
  on(event: "error", cb: (err: Error) => void): PipeWriter;
  once(event: "drain", cb: () => void): PipeWriter;
  end(cb?: () => void): PipeWriter;
  destroy(): void;
}

interface DenoChild {
  readonly pid: number;
  readonly stdin: WritableStream<Uint8Array>;
  readonly stdout: ReadableStream<Uint8Array>;
  readonly stderr: ReadableStream<Uint8Array>;
  readonly status: Promise<{ success: boolean; code: number; signal: string | null }>;
  kill(signal?: string): void;
}

interface DenoCommand {
  new (
    exe: string,
    options: {
      args: string[];
      env: Record<string, string>;
      clearEnv: boolean;
      cwd?: string;
      stdin: "piped";
      stdout: "piped";
      stderr: "piped";
      detached: boolean;
    },
  ): { spawn(): DenoChild };
}

/** A started Deno.Command child, with Node-shaped pipes. */
export interface DenoProcess {
  pid: number;
  stdin: PipeWriter;
  stdout: PipeReader;
  stderr: PipeReader;
  /** Resolves once it has exited and its output is read to the end. */
  gone: Promise<void>;
  /** How it ended, or null while it runs. */
  status(): { code: number; signal: string | null } | null;
  kill(signal: string): void;
}

function reader(stream: ReadableStream<Uint8Array>): PipeReader & { drained(idleMs: number | null): Promise<void> } {
  const on: Record<string, Listener[]> = { data: [], end: [], close: [], error: [] };
  const emit = (event: string, ...args: unknown[]) => {
    for (const cb of on[event] ?? []) (cb as (...a: unknown[]) => void)(...args);
  };
  const r = stream.getReader();
  let stopped = false;
  let started = false;
  let finish: () => void = () => {};
  const done = new Promise<void>((resolve) => (finish = resolve));
  let paused: Promise<void> | null = null;
  let unpause: () => void = () => {};
  /** Once drained(ms) runs: restarts its idle clock (data came, or reading resumed), or stops it (paused). */
  let idle: (() => void) | null = null;
  const pump = async () => {
    try {
      for (;;) {
        if (paused) await paused;
        const { value, done: end } = await r.read();
        if (end || stopped) break;
        if (value.byteLength) {
          idle?.();
          emit("data", value);
        }
      }
      if (!stopped) emit("end");
    } catch (err) {
      if (!stopped) emit("error", err);
    } finally {
      emit("close");
      finish();
    }
  };
  const self = {
    /**
     * Resolves once read to the end (at once if nobody ever read it), or, given `idleMs`, once
     * nothing came for that long while reading (a process left behind holds the pipe). Time
     * spent paused does not count: what the pipe still holds is read, never dropped.
     */
    drained(idleMs: number | null): Promise<void> {
      if (!started) {
        self.destroy();
        return Promise.resolve();
      }
      if (idleMs === null) return done;
      let timer: ReturnType<typeof setTimeout> | undefined;
      idle = () => {
        clearTimeout(timer);
        if (!paused) timer = setTimeout(self.destroy, idleMs);
      };
      idle();
      return done.finally(() => {
        clearTimeout(timer);
        idle = null;
      });
    },
    on(event: string, cb: Listener) {
      on[event]?.push(cb);
      // Reading starts once someone listens for data (after the current tick, as a Node stream would).
      if (event === "data" && !started) {
        started = true;
        queueMicrotask(() => void pump());
      }
      return self;
    },
    destroy() {
      if (stopped) return;
      stopped = true;
      self.resume();
      void r.cancel().catch(() => {});
    },
    pause() {
      paused ??= new Promise<void>((resolve) => (unpause = resolve));
      idle?.();
    },
    resume() {
      paused = null;
      unpause();
      idle?.();
    },
  };
  return self as PipeReader & { drained(idleMs: number | null): Promise<void> };
}

function writer(stream: WritableStream<Uint8Array>): PipeWriter {
  const w = stream.getWriter();
  const errors: ((err: Error) => void)[] = [];
  let closed = false;
  /** Bytes written and not yet taken; "drain" once none are. */
  let queued = 0;
  const drains: (() => void)[] = [];
  const drained = () => {
    for (const cb of drains.splice(0)) cb();
  };
  const fail = (err: unknown) => {
    if (closed) return;
    closed = true;
    for (const cb of errors) cb(err instanceof Error ? err : new Error(String(err)));
    drained();
  };
  const self: PipeWriter = {
    write(chunk, cb) {
      if (closed) {
        cb?.(new Error("write after end"));
        return false;
      }
      queued += chunk.byteLength;
      w.write(chunk).then(
        () => {
          queued -= chunk.byteLength;
          if (!queued) drained();
          cb?.();
        },
        (err: unknown) => {
          cb?.(err as Error);
          fail(err);
        },
      );
      return (w.desiredSize ?? 0) > 0;
    },
    get writableLength() {
      return queued;
    },
    on(_event, cb) {
      errors.push(cb);
      return self;
    },
    once(_event, cb) {
      if (queued && !closed) drains.push(cb);
      else queueMicrotask(cb);
      return self;
    },
    end(cb) {
      closed = true;
      void w.close().then(
        () => cb?.(),
        () => cb?.(),
      );
      return self;
    },
    destroy() {
      closed = true;
      void w.abort().catch(() => {});
    },
  };
  return self;
}

/**
 * Start `exe` with piped stdin, stdout and stderr through Deno.Command, in a
 * session of its own (detached). `onExit` runs when it exits; `gone` waits for
 * its pipes to be read to their end too, or, after the exit, until one has
 * been read for `leftoverMs` with nothing coming (a process it left behind
 * may hold them); `null` waits for the end, as Node's "close" does.
 * Throws, as Deno.Command does, when it cannot be started.
 */
export function denoSpawn(
  exe: string,
  args: string[],
  env: Record<string, string | undefined>,
  cwd: string | undefined,
  onExit: () => void,
  leftoverMs: number | null = 200,
): DenoProcess {
  const Command = (globalThis as unknown as { Deno: { Command: DenoCommand } }).Deno.Command;
  const clean: Record<string, string> = {};
  for (const [k, v] of Object.entries(env)) if (v !== undefined) clean[k] = v;
  const child = new Command(exe, {
    args,
    env: clean,
    clearEnv: true,
    ...(cwd === undefined ? {} : { cwd }),
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
    detached: true,
  }).spawn();
  let ended: { code: number; signal: string | null } | null = null;
  const out = reader(child.stdout);
  const err = reader(child.stderr);
  const exited = child.status.then((s) => {
    ended = { code: s.code, signal: s.signal };
    onExit();
  });
  const drained = () => Promise.all([out.drained(leftoverMs), err.drained(leftoverMs)]);
  return {
    pid: child.pid,
    stdin: writer(child.stdin),
    stdout: out,
    stderr: err,
    gone: exited.then(drained).then(() => {}),
    status: () => ended,
    kill(signal) {
      try {
        child.kill(signal);
      } catch {
        // already gone
      }
    },
  };
}
