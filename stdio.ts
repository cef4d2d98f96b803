/**
 * This process's own stdin, stdout and stderr as byte streams, on Node and
 * Deno: what fakessh's stand-in reads and writes. Apart from runtime.ts (the
 * other runtime differences) because no child needs it, so the child payload
 * does not carry it.
 *
 * @module
 */
import { deno, nodeProcess } from "./runtime.ts";

/**
 * Deno makes its stdio non-blocking, and then a write to a full pipe or socket fails with EAGAIN
 * after writing part of the chunk, without saying how much. Where FFI is allowed, make `fd`
 * blocking again (Deno reads and writes stdio on threads of its own, so nothing else waits).
 */
function denoBlocking(fd: number): void {
  try {
    if (deno?.build.os !== "linux") return;
    const { fcntl } = deno.dlopen("libc.so.6", { fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" } }).symbols;
    const flags = fcntl?.(fd, 3, 0) ?? -1; // F_GETFL
    if (flags >= 0) fcntl?.(fd, 4, flags & ~0o4000); // F_SETFL without O_NONBLOCK
  } catch {
    // no FFI: writes that would block are retried (below), which may repeat part of a chunk
  }
}

/**
 * Writes to this process's stdout or stderr, resolving when the chunk is out (Node: after "drain"
 * when the pipe is full). Under Deno see {@link denoBlocking}; a write that would block anyway is
 * retried after a short wait.
 */
export function stdioSink(which: "stdout" | "stderr"): (chunk: Uint8Array) => Promise<void> {
  if (deno) {
    const out = deno[which];
    denoBlocking(which === "stdout" ? 1 : 2);
    return async (chunk) => {
      for (let at = 0, waits = 0; at < chunk.byteLength; ) {
        try {
          at += await out.write(chunk.subarray(at));
          waits = 0;
        } catch (err) {
          if ((err as Error).name !== "WouldBlock" && (err as { code?: string }).code !== "EAGAIN") throw err;
          await new Promise((resolve) => setTimeout(resolve, Math.min(50, ++waits)));
        }
      }
    };
  }
  const out = nodeProcess()[which];
  return (chunk) => (out.write(chunk) ? Promise.resolve() : new Promise<void>((resolve) => out.once("drain", () => resolve())));
}

/**
 * Resolves once what was written to this process's stdout and stderr has gone to the pipe (Node
 * queues what a full pipe did not take, and `process.exit` drops it); under Deno the writes above
 * are out when they resolve. A closed pipe counts as gone.
 */
export function stdioFlushed(): Promise<void> {
  if (deno) return Promise.resolve();
  const { stdout, stderr } = nodeProcess();
  const flushed = (out: NodeJS.WriteStream) => new Promise<void>((resolve) => (out.destroyed || !out.writable ? resolve() : out.write("", () => resolve())));
  return Promise.all([flushed(stdout), flushed(stderr)]).then(() => {});
}

/**
 * Reads this process's stdin: `onData` for each chunk (reading waits for the promise it returns),
 * then `onEnd` once, at EOF or on an error. Under Deno, as {@link stdioSink}: fd 0 made blocking, or
 * a read that would block retried.
 */
export function stdinSource(onData: (chunk: Uint8Array) => Promise<void>, onEnd: () => void): { stop(): void } {
  let stopped = false;
  if (deno) {
    const input = deno.stdin;
    denoBlocking(0);
    void (async () => {
      try {
        for (let waits = 0; !stopped; ) {
          const buf = new Uint8Array(256 * 1024);
          let n: number | null;
          try {
            n = await input.read(buf);
            waits = 0;
          } catch (err) {
            if ((err as Error).name !== "WouldBlock" && (err as { code?: string }).code !== "EAGAIN") throw err;
            await new Promise((resolve) => setTimeout(resolve, Math.min(50, ++waits)));
            continue;
          }
          if (n === null) break;
          await onData(buf.subarray(0, n));
        }
      } catch {
        // a read error ends input as EOF does
      }
      if (!stopped) onEnd();
    })();
    return {
      stop: () => {
        stopped = true;
        try {
          input.close();
        } catch {
          // closed already
        }
      },
    };
  }
  const input = nodeProcess().stdin;
  let ended = false;
  const end = () => {
    if (ended || stopped) return;
    ended = true;
    onEnd();
  };
  input.on("data", (chunk: Uint8Array) => {
    input.pause();
    void onData(chunk).finally(() => input.resume());
  });
  input.on("end", end);
  input.on("error", end);
  return {
    stop: () => {
      stopped = true;
      input.destroy();
    },
  };
}
