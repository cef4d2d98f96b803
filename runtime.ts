/**
 * Every difference between Node and Deno lives here: how a child reaches its
 * message stream, how user output is kept off it, and which executable a
 * runtime name means.
 *
 * A Node child gets its stream on an extra fd (3) that the parent hands it;
 * fds 0/1/2 are /dev/null and two pipes the parent reads as log lines, so
 * nothing user code (or a subprocess) prints can reach the stream.
 *
 * A Deno child cannot read an inherited fd 3, so its stream stays on fds 0/1
 * and user output is redirected here at the JS level: `console.*`,
 * `process.stdout` and `Deno.stdout` all write to stderr, which the parent
 * reads as log lines.
 *
 * Children run on Node 12 and later and Deno 1.46 and later, so the APIs that
 * differ between those versions are reached through here too: builtins
 * ({@link builtin}: `process.getBuiltinModule` where it exists, else the
 * `require` the first stage hands over), `process` itself, AbortController,
 * `Object.hasOwn` and `Symbol.asyncDispose`.
 *
 * @module
 */

type GetBuiltin = NodeJS.Process["getBuiltinModule"];
/** Where `process.getBuiltinModule` is missing: Node's `require` (from the first stage), Deno 1.x's `createRequire`. */
let loader: ((id: string) => unknown) | null = null;
let loaded: Promise<void> = Promise.resolve();

/** Resolves once {@link builtin} works: at once, except in a Deno 1.x child, which imports `node:module` first. */
export function builtinsReady(): Promise<void> {
  return loaded;
}

/**
 * A runtime builtin module (`node:fs`, `zlib`), or undefined for any other id.
 * Every builtin that code in a child uses comes through here.
 */
export const builtin: GetBuiltin = ((id: string): unknown => {
  if (!loader) return process.getBuiltinModule(id);
  const bare = id.startsWith("node:") ? id.slice(5) : id;
  return (loader("module") as { builtinModules: string[] }).builtinModules.includes(bare) ? loader(bare) : undefined;
}) as GetBuiltin;

/** Node's `process`: the global, or (Deno 1.x, which has none) the builtin module. */
export function nodeProcess(): NodeJS.Process {
  return "process" in globalThis ? process : (builtin("node:process") as NodeJS.Process);
}

const own = Object.prototype.hasOwnProperty;
/** `Object.hasOwn` (Node 16.9); through `own`, so that no linter's fix turns it back into `Object.hasOwn`. */
export const hasOwn = (o: object, key: PropertyKey): boolean => own.call(o, key);

/** `Symbol.asyncDispose`, or the symbol Node gives it, where the runtime predates it. */
export const asyncDispose: typeof Symbol.asyncDispose =
  (Symbol as { asyncDispose?: typeof Symbol.asyncDispose }).asyncDispose ?? (Symbol.for("nodejs.asyncDispose") as typeof Symbol.asyncDispose);

/** The signal of {@link Abort}, where the runtime has no AbortController with `reason` (Node < 16.14). */
class Signal {
  aborted = false;
  reason: unknown = undefined;
  onabort: ((ev: { type: string }) => void) | null = null;
  #listeners: ((ev: { type: string }) => void)[] = [];
  addEventListener(_type: string, fn: (ev: { type: string }) => void): void {
    this.#listeners.push(fn);
  }
  removeEventListener(_type: string, fn: (ev: { type: string }) => void): void {
    this.#listeners = this.#listeners.filter((f) => f !== fn);
  }
  throwIfAborted(): void {
    if (this.aborted) throw this.reason;
  }
  /** @internal */
  _abort(reason: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    const ev = { type: "abort" };
    for (const fn of [this.onabort, ...this.#listeners]) fn?.call(this, ev);
    this.#listeners = [];
  }
}

const abortReason = (): Error => Object.assign(new Error("This operation was aborted"), { name: "AbortError" });

/**
 * `AbortController`: the runtime's own where its signals have `reason` (Node 16.14, Deno); before that, the
 * runtime's own with `reason` added (Node 15 and 16), or a small one of the same shape (Node 12 and 14).
 */
export const Abort: typeof AbortController =
  // build.ts defines this true in the core for ES2022 runtimes (Node 16.11 and later, Deno), which all have
  // AbortController: that core goes without the stand-in.
  !(globalThis as { MITOGEN_MODERN_CORE?: boolean }).MITOGEN_MODERN_CORE && typeof AbortController !== "function"
    ? (class {
        readonly signal = new Signal();
        abort(reason: unknown = abortReason()): void {
          this.signal._abort(reason);
        }
      } as unknown as typeof AbortController)
    : "reason" in AbortSignal.prototype
      ? AbortController
      : class extends AbortController {
          override abort(reason: unknown = abortReason()): void {
            if (!this.signal.aborted) Object.defineProperty(this.signal, "reason", { value: reason, configurable: true });
            super.abort();
          }
        };

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

/** Run `fn` in a later turn of the event loop, after pending I/O (setImmediate; Deno 1.x has none). */
export const nextTurn: (fn: () => void) => void = typeof setImmediate === "function" ? (fn) => setImmediate(fn) : (fn) => setTimeout(fn, 0);

interface DenoReader {
  read(p: Uint8Array): Promise<number | null>;
}
interface DenoWriter {
  write(p: Uint8Array): Promise<number>;
  writeSync(p: Uint8Array): number;
}
interface DenoGlobal {
  stdin: DenoReader & { close(): void };
  stdout: DenoWriter;
  stderr: DenoWriter;
  execPath(): string;
  ppid: number;
  pid: number;
  kill(pid: number, signal: string | number): void;
  build: { os: string };
  dlopen(path: string, symbols: Record<string, { parameters: string[]; result: string }>): { symbols: Record<string, (...args: number[]) => number> };
}

/** The Deno namespace, or undefined under Node. */
export const deno: DenoGlobal | undefined = (globalThis as { Deno?: DenoGlobal }).Deno;
/** True when running under Deno. */
export const isDeno: boolean = deno !== undefined;
/** `node:fs` reads and writes at a position without a shared offset, so several may run at once (Deno 1.x seeks first). */
export const positionalIo: boolean = !(deno as { version?: { deno: string } } | undefined)?.version?.deno.startsWith("1.");

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
function denoTransport(read: (p: Uint8Array) => Promise<number | null>, writeSync: (p: Uint8Array) => number, initial: Uint8Array | null): Transport {
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
    while (p.byteLength) p = p.subarray(writeSync(p));
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
            const n = await read(buf);
            if (n === null) break;
            // A copy: the buffer is read into again. A small one is a slab view (see allocBytes).
            if (n <= SLAB_MAX) {
              const chunk = allocBytes(n);
              chunk.set(buf.subarray(0, n));
              onData(chunk);
            } else onData(buf.slice(0, n));
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

/** `parts` written back to back into one array of `size` bytes (`capacity`, when larger, leaves room after them; `out`, when given, is that array). */
export function joinParts(parts: readonly Uint8Array[], size: number, capacity: number = size, out: Uint8Array = new Uint8Array(capacity)): Uint8Array {
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.byteLength;
  }
  return out;
}

/** `a.subarray(start, end)`, made the cheaper way (a third of the time in V8), always a plain Uint8Array. */
export function view(a: Uint8Array, start: number, end: number = a.byteLength): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset + start, end - start);
}

/**
 * A fresh array of `n` bytes that the caller fills completely before anyone reads it (a large frame
 * gathered as it arrives). On Node it is not zeroed first (`Buffer.allocUnsafeSlow`): zeroing 16 MiB
 * costs more than receiving it, where malloc hands back memory it had.
 */
export function allocFilled(n: number): Uint8Array {
  if (deno) return new Uint8Array(n);
  const b = (builtin("node:buffer") as { Buffer: { allocUnsafeSlow(n: number): Uint8Array } }).Buffer.allocUnsafeSlow(n);
  return new Uint8Array(b.buffer, b.byteOffset, n);
}

/** Arrays up to this size are cut from a shared slab by {@link allocBytes}. */
const SLAB_MAX = 4096;
const SLAB_SIZE = 64 * 1024;
let slab = new ArrayBuffer(0);
let slabUsed = 0;

/**
 * A fresh array of `n` bytes (not zeroed). Small ones are views of a shared 64 KiB slab, as Node's
 * Buffer pool does: V8 allocates every typed array over 64 bytes outside its heap, which costs a
 * microsecond or more, while a view costs a tenth of that. Callers write all `n` bytes.
 */
export function allocBytes(n: number): Uint8Array {
  if (n > SLAB_MAX) return new Uint8Array(n);
  if (slabUsed + n > slab.byteLength) {
    slab = new ArrayBuffer(SLAB_SIZE);
    slabUsed = 0;
  }
  const out = new Uint8Array(slab, slabUsed, n);
  slabUsed = (slabUsed + n + 7) & ~7;
  return out;
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
  /** Deno: bytes read past the payload (none: the Deno first stage reads exactly). */
  rest?: Uint8Array;
  /** Node: the first stage's `require`, for builtins where `process.getBuiltinModule` is missing (Node < 20.16). */
  require?: (id: string) => unknown;
  /** Node: the core's `vm.Script`, when the parent's loader compiled it (with or without a code cache). */
  script?: { createCachedData(): Uint8Array; cachedDataRejected?: boolean };
}

/** `new Function(...args)` and indirect `eval`, as made by one script: what shipped code is compiled with. */
export interface Compilers {
  fn: (...args: string[]) => (...a: unknown[]) => unknown;
  eval: (code: string) => unknown;
}

const COMPILERS = "module.exports={fn:(...a)=>new Function(...a),eval:c=>(0,eval)(c)}";
let compilers: Compilers | undefined;

/**
 * The compilers for shipped code (calls and modules), made on first use. On Node, `import()` in code made by
 * `new Function` or `eval` loads through the script whose code called them. The core's own script has no
 * loader when `vm.Script` compiled it (the code-cache loader: "A dynamic import callback was not specified"),
 * and on Node 12-16 the `node -e` script's loader is freed with that script, after which `import()` crashes the
 * process. So on Node they come from a CommonJS module compiled as Node compiles files (`Module#_compile`, whose
 * loader lives as long as the module), named as if in the working directory, as `node -e` is; Deno's loader
 * works from any script.
 */
export function compilersForShipped(): Compilers {
  if (compilers) return compilers;
  if (deno) {
    // biome-ignore lint/security/noGlobalEval: running shipped code is the point; indirect, so in global scope.
    const evaluate: (code: string) => unknown = globalThis.eval;
    return (compilers = { fn: (...args) => new Function(...args) as (...a: unknown[]) => unknown, eval: (code) => evaluate(code) });
  }
  type CjsModule = { exports: Compilers; _compile(code: string, filename: string): void };
  const Module = builtin("node:module") as unknown as new (id: string) => CjsModule;
  const module = new Module("[mitogen shipped code]");
  module._compile(COMPILERS, `${nodeProcess().cwd()}/[mitogen shipped code]`);
  return (compilers = module.exports);
}

/**
 * The child's stream to its parent. Under Deno this also moves user output
 * off fd 1 (see the module doc); it must run before any user code.
 */
export function childTransport(boot: Boot): Transport {
  // Builtins: process.getBuiltinModule where the runtime has it, else the first stage's require.
  if (boot.require && !("process" in globalThis && process.getBuiltinModule)) loader = boot.require;
  if (boot.socket) {
    blockingOutput();
    return nodeTransport(boot.socket, boot.out ?? boot.socket);
  }
  if (!deno) throw new Error("mitogen: no stream handed to the core");
  const out = deno.stdout;
  const writeSync = out.writeSync.bind(out);
  const read = deno.stdin.read.bind(deno.stdin);
  const err = deno.stderr;
  out.write = (p) => err.write(p);
  out.writeSync = (p) => err.writeSync(p);
  Object.defineProperty(out, "writable", { get: () => (err as unknown as { writable: unknown }).writable });
  // User code sees an empty stdin, as /dev/null would give it.
  deno.stdin.read = () => Promise.resolve(null);
  // `process` is Deno's Node layer, loaded on first use (~40 ms): patch it then, not now.
  const desc = Object.getOwnPropertyDescriptor(globalThis, "process");
  const patch = (p: { stdout: { write: unknown }; stderr: { write: (...a: unknown[]) => boolean } }) => {
    p.stdout.write = p.stderr.write.bind(p.stderr);
  };
  if (desc?.get && desc.configurable) {
    const get = desc.get;
    let patched = false;
    Object.defineProperty(globalThis, "process", {
      ...desc,
      get() {
        const p = get.call(globalThis);
        if (!patched) {
          patched = true;
          patch(p);
        }
        return p;
      },
    });
  } else if ("process" in globalThis) patch(process as unknown as Parameters<typeof patch>[0]);
  else {
    // Deno 1.x: no `process` global and no getBuiltinModule. Builtins come from createRequire, once imported.
    const id = "node:module"; // a variable, so no bundler resolves it
    loaded = import(id).then((m: { createRequire(base: string): (id: string) => unknown }) => {
      loader = m.createRequire("/");
      patch(loader("process") as Parameters<typeof patch>[0]);
    });
  }
  const con = console as unknown as Record<string, unknown>;
  for (const m of ["log", "info", "debug", "dir", "dirxml", "table"]) con[m] = console.error.bind(console);
  return denoTransport(read, writeSync, boot.rest ?? null);
}

/**
 * Node: `process.stdout` and `process.stderr` write synchronously (blocking), as Deno's console does.
 * Behind a shell (a Deno parent, ssh) they are one pipe (`1>&2`), and Node's writes queued on each
 * while it is full would go out in turns and cut each other's lines. Set on first use (creating the
 * streams costs ~2 ms at boot); console.* reads them through the same getters.
 */
function blockingOutput(): void {
  for (const name of ["stdout", "stderr"]) {
    const desc = Object.getOwnPropertyDescriptor(process, name);
    const get = desc?.get;
    if (!get || !desc.configurable) continue;
    // Once set, the runtime's own getter goes back.
    const once = (): unknown => {
      Object.defineProperty(process, name, desc);
      const s = get.call(process) as { _handle?: { setBlocking?(on: boolean): unknown } };
      s._handle?.setBlocking?.(true);
      return s;
    };
    Object.defineProperty(process, name, { ...desc, get: once });
  }
}

/** Set the process title (Node; Deno cannot, and touching `process` there costs ~40 ms). */
export function setTitle(title: string): void {
  if (deno) return;
  try {
    process.title = title;
  } catch {
    // not settable here
  }
}

/** Exit now. */
export function exitProcess(code: number): never {
  if (deno) (deno as unknown as { exit(code: number): never }).exit(code);
  return process.exit(code);
}

/** Report errors nobody caught instead of dying of them. */
export function onUncaught(report: (what: string, err: unknown) => void): void {
  if (deno) {
    type Ev = { preventDefault(): void; error?: unknown; reason?: unknown };
    const g = globalThis as unknown as { addEventListener(type: string, cb: (e: Ev) => void): void };
    g.addEventListener("error", (e) => {
      e.preventDefault();
      report("uncaught exception", e.error);
    });
    g.addEventListener("unhandledrejection", (e) => {
      e.preventDefault();
      report("unhandled rejection", e.reason);
    });
    return;
  }
  process.on("uncaughtException", (err) => report("uncaught exception", err));
  process.on("unhandledRejection", (err) => report("unhandled rejection", err));
}

/** Which kind of runtime an executable is, and how to run it. */
export interface RuntimeCommand {
  kind: "node" | "deno";
  exe: string;
}

/** Resolve a runtime option ("node", "deno", or a path) to an executable. */
export function runtimeCommand(runtime: string): RuntimeCommand {
  const self = isDeno ? "deno" : "node";
  if (runtime === "node" || runtime === "deno") {
    return { kind: runtime, exe: runtime === self ? (deno ? deno.execPath() : process.execPath) : runtime };
  }
  const base = runtime.slice(runtime.lastIndexOf("/") + 1);
  return { kind: base.includes("deno") ? "deno" : "node", exe: runtime };
}

/**
 * The environment variable a parent sets when it starts a Node child under `setpriv --pdeathsig KILL`
 * (see ARCHITECTURE.md, "The watchdog"): `<pid>:<euid>`, the process whose death kills the child and the
 * effective uid it was set under (a change of credentials clears the signal).
 */
export const PDEATHSIG_ENV = "MITOGEN_PDEATHSIG";

/** Did this process start with AT_SECURE (setuid, setgid, file capabilities), which clears the parent-death signal? Unknown: true. */
function secureExec(): boolean {
  try {
    // openSync and readSync: readFileSync costs a first caller twice as much (1 to 2 ms).
    const fs = builtin("node:fs") as typeof import("node:fs");
    const fd = fs.openSync("/proc/self/auxv", "r");
    const a = Buffer.alloc(4096);
    const n = fs.readSync(fd, a, 0, a.length, 0);
    fs.closeSync(fd);
    const w = /64/.test(process.arch) ? 8 : 4;
    const le = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
    const at = (i: number) => (le ? a.readUInt32LE(i) : a.readUInt32BE(i + w - 4));
    for (let i = 0; i + 2 * w <= n; i += 2 * w) if (at(i) === 23) return at(i + w) !== 0; // AT_SECURE
  } catch {
    // no /proc: nothing is known
  }
  return true;
}

/**
 * Kill this process (SIGKILL) once its parent is gone, even while user code
 * blocks the event loop, and say how: `kernel` when the parent started this
 * Node process under `setpriv --pdeathsig KILL` (it sets {@link PDEATHSIG_ENV}
 * to its own pid, which must be our parent's) or, on Linux, a Deno process
 * (`prctl(PR_SET_PDEATHSIG)` through FFI): the kernel does it when the parent
 * process dies; not if a wrapper in between forked (another parent) or
 * changed user (another euid), or if the runtime started with AT_SECURE.
 * Otherwise `worker`: a worker thread checks every 200 ms
 * whether the parent process changed (getppid). `pid` is the parent context,
 * when it runs on this machine but is not the parent process (sudo, su, doas,
 * a wrapper script between them): the worker also ends this process when
 * `pid` has gone.
 */
export function watchParent(pid = 0): "kernel" | "worker" {
  const ppid = deno ? deno.ppid : process.ppid;
  pid = pid === ppid ? 0 : pid | 0;
  const src = (d: string) =>
    `const k=${d}.kill,g=p=>{try{k(p,0)}catch(e){return/ESRCH|NotFound/.test(e.code+e.name)}};` +
    `setInterval(()=>{if(${d}.ppid!==${ppid}||${pid}&&g(${pid}))k(${d}.pid,"SIGKILL")},200)`;
  if (deno) {
    try {
      // PR_SET_PDEATHSIG (1), SIGKILL (9)
      if (deno.build.os === "linux" && deno.dlopen("libc.so.6", { prctl: { parameters: ["i32", "i32"], result: "i32" } }).symbols.prctl?.(1, 9) === 0 && !pid)
        return "kernel";
    } catch {
      // no FFI here: the worker watches the parent too
    }
    new (globalThis as unknown as { Worker: new (url: string, o: object) => unknown }).Worker(`data:text/javascript,${encodeURIComponent(src("Deno"))}`, {
      type: "module",
    });
    return "worker";
  }
  // Set for this process only: user code and the children it starts do not see it.
  const by = process.env[PDEATHSIG_ENV];
  delete process.env[PDEATHSIG_ENV];
  if (!pid && by === `${ppid}:${process.geteuid?.()}` && !secureExec()) return "kernel";
  // A failing watchdog must not take the process with it. Its own stdio (not piped to ours) and a shared
  // environment make it cheaper to start.
  const wt = builtin("node:worker_threads");
  new wt.Worker(src("process"), { eval: true, stdout: true, stderr: true, env: wt.SHARE_ENV }).on("error", () => {}).unref();
  return "worker";
}
