/**
 * Byte streams: the {@link Transport} the router reads frames from and writes
 * them to, over a Node readable and writable (a socket, a child's pipes) or,
 * in a Deno child, over its stdin and stdout; and the child's own stream to
 * its parent ({@link childTransport}).
 *
 * @module
 */
import { copyBytes, joinParts } from "./bytes.ts";
import { childStdio, type DenoStdio, deno } from "./runtime.ts";

/** The least a byte stream must offer the router. */
export interface Transport {
  /** Begin delivering data; `onEnd` fires once, on EOF or error. */
  start(onData: (chunk: Uint8Array) => void, onEnd: (error?: Error) => void): void;
  /** Queue bytes for writing, in order. */
  write(parts: readonly Uint8Array[]): void;
  /** Wait until everything queued so far has been handed to the OS. */
  flush(): Promise<void>;
  /** Close both directions. */
  close(): void;
  /** Bytes written and not yet handed to the OS (none: 0). */
  queued?(): number;
  /** Call `fn` once, when the bytes queued now have gone out. */
  onDrain?(fn: () => void): void;
  /** Stop delivering data until {@link Transport.resume}: the other end's writes then wait. */
  pause?(): void;
  resume?(): void;
}

type NodeReadable = {
  on(event: "data", cb: (chunk: Uint8Array) => void): unknown;
  on(event: "end" | "close", cb: () => void): unknown;
  on(event: "error", cb: (err: Error) => void): unknown;
  destroy(): unknown;
  pause?(): unknown;
  resume?(): unknown;
};
type NodeWritable = {
  write(chunk: Uint8Array, cb?: (err?: Error | null) => void): boolean;
  on(event: "error", cb: (err: Error) => void): unknown;
  cork?(): void;
  uncork?(): void;
  end(cb?: () => void): unknown;
  destroy(): unknown;
  writableLength?: number;
  once(event: "drain", cb: () => void): unknown;
};

/** A Transport over a Node readable and writable (both may be one socket). */
export function nodeTransport(readable: NodeReadable, writable: NodeWritable): Transport {
  let ended = false;
  return {
    start(onData, onEnd) {
      const end = (err?: Error) => {
        if (ended) return;
        ended = true;
        onEnd(err);
      };
      readable.on("data", onData);
      readable.on("end", () => end());
      readable.on("close", () => end());
      readable.on("error", (err) => end(err));
      readable.resume?.();
      if ((writable as unknown) !== readable) writable.on("error", (err) => end(err));
    },
    write(parts) {
      if (ended) return;
      if (parts.length > 1) writable.cork?.();
      for (const p of parts) writable.write(p);
      if (parts.length > 1) writable.uncork?.();
    },
    flush() {
      return new Promise((resolve) => {
        if (ended) return resolve();
        writable.write(new Uint8Array(0), () => resolve());
      });
    },
    close() {
      readable.destroy();
      if ((writable as unknown) !== readable) writable.destroy();
    },
    queued: () => writable.writableLength ?? 0,
    onDrain: (fn) => writable.once("drain", fn),
    pause: () => readable.pause?.(),
    resume: () => readable.resume?.(),
  };
}

/**
 * A Transport over Deno's stdin/stdout (a Deno child's stream). Writes made in
 * one tick are joined and written with writeSync: an async write costs ~50 us
 * per call in Deno, a sync one ~4 us. Reads go through one reused buffer.
 */
function denoTransport(io: DenoStdio, initial: Uint8Array | null): Transport {
  let queue: Uint8Array[] = [];
  let scheduled = false;
  let closed = false;
  /** While paused: resolves on resume. */
  let paused: Promise<void> | null = null;
  let unpause = () => {};
  const resume = () => {
    paused = null;
    unpause();
  };
  const emit = (p: Uint8Array) => {
    while (p.byteLength) p = p.subarray(io.writeSync(p));
  };
  const drain = () => {
    scheduled = false;
    const batch = queue;
    queue = [];
    let small: Uint8Array[] = [];
    let size = 0;
    const joined = () => {
      if (size) emit(small.length === 1 ? (small[0] as Uint8Array) : joinParts(small, size));
      small = [];
      size = 0;
    };
    try {
      for (const p of batch) {
        if (p.byteLength >= 65536) {
          joined();
          emit(p);
        } else {
          small.push(p);
          size += p.byteLength;
        }
      }
      joined();
    } catch {
      closed = true; // the parent is gone; reading will see EOF
    }
  };
  return {
    start(onData, onEnd) {
      if (initial?.byteLength) onData(initial);
      (async () => {
        const buf = new Uint8Array(256 * 1024);
        try {
          for (;;) {
            while (paused) await paused;
            const n = await io.read(buf);
            if (n === null) break;
            // A copy: the buffer is read into again.
            onData(copyBytes(buf, n));
          }
          onEnd();
        } catch (err) {
          onEnd(err as Error);
        }
      })();
    },
    write(parts) {
      if (closed) return;
      queue.push(...parts);
      if (!scheduled) {
        scheduled = true;
        queueMicrotask(drain);
      }
    },
    flush() {
      if (scheduled) drain();
      return Promise.resolve();
    },
    close() {
      closed = true;
      resume();
      try {
        deno?.stdin.close();
      } catch {
        // already closed
      }
    },
    pause() {
      paused ??= new Promise((resolve) => (unpause = resolve));
    },
    resume,
  };
}

/** What the first stage hands the core. */
export interface Boot {
  /** Name given on the command line. */
  name: string;
  /** The compressed core payload, kept so this context can start children; none when the parent sent the script itself. */
  payload?: Uint8Array;
  /** Node: the socket the first stage read the payload from (fd 3). */
  socket?: NodeReadable & NodeWritable;
  /** Node: the socket to write to, when not `socket` (fd 4, through a shell). */
  out?: NodeWritable;
  /** Deno: the first stage's exact reader (a pipelined start's core picker reads the core with it). */
  read?: (n: number) => Promise<Uint8Array>;
  /** Deno: bytes read past the payload (none: the Deno first stage reads exactly). */
  rest?: Uint8Array;
  /** Node: the first stage's `require`, for builtins where `process.getBuiltinModule` is missing (Node < 20.16). */
  require?: (id: string) => unknown;
  /** Node: the core's `vm.Script`, when the parent's loader compiled it (with or without a code cache). */
  script?: { createCachedData(): Uint8Array; cachedDataRejected?: boolean };
}

/**
 * The child's stream to its parent. Under Deno this also moves user output
 * off fd 1 (childStdio in runtime.ts); it must run before any user code.
 */
export function childTransport(boot: Boot): Transport {
  const io = childStdio(boot);
  return boot.socket ? nodeTransport(boot.socket, boot.out ?? boot.socket) : denoTransport(io as DenoStdio, boot.rest ?? null);
}
