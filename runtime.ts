/**
 * Every difference between Node and Deno lives here, and every difference
 * between their versions: how a child's user output is kept off its message
 * stream, builtins, `process`, the process title, exit and uncaught-error
 * hooks, which executable a runtime name means, and how shipped code is
 * compiled.
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
 * `Object.hasOwn`, `Symbol.asyncDispose` and `setImmediate`.
 *
 * The byte streams over these (transport.ts), bytes (bytes.ts) and the
 * parent watchdog (watchdog.ts) are files of their own.
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
  build: { os: string; standalone?: boolean };
  dlopen(path: string, symbols: Record<string, { parameters: string[]; result: string }>): { symbols: Record<string, (...args: number[]) => number> };
}

/** The Deno namespace, or undefined under Node. */
export const deno: DenoGlobal | undefined = (globalThis as { Deno?: DenoGlobal }).Deno;
/** True when running under Deno. */
export const isDeno: boolean = deno !== undefined;
/** `node:fs` reads and writes at a position without a shared offset, so several may run at once (Deno 1.x seeks first). */
export const positionalIo: boolean = !(deno as { version?: { deno: string } } | undefined)?.version?.deno.startsWith("1.");

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

/** The ends of a Deno child's stream: fd 0's read and fd 1's own writeSync (see {@link childStdio}). */
export interface DenoStdio {
  read(p: Uint8Array): Promise<number | null>;
  writeSync(p: Uint8Array): number;
}

/**
 * Ready a child's runtime for its stream, before any user code runs (see the module doc): builtins
 * through the first stage's `require` where `process.getBuiltinModule` is missing, and user output
 * kept off the stream. Given a `socket` (Node: the first stage hands the stream over) output is made
 * blocking, and nothing returned; under Deno user output is moved to stderr, and the stream's own ends
 * returned.
 */
export function childStdio(boot: { require?: (id: string) => unknown; socket?: unknown }): DenoStdio | undefined {
  // Builtins: process.getBuiltinModule where the runtime has it, else the first stage's require.
  if (boot.require && !("process" in globalThis && process.getBuiltinModule)) loader = boot.require;
  if (boot.socket) {
    blockingOutput();
    return;
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
  return { read, writeSync };
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

/**
 * Whether this is a program made with `deno compile` (Deno 2's `Deno.build.standalone`): its
 * executable runs only itself, so it cannot start `deno eval`; deno children take `deno` from PATH.
 */
export const compiledDeno: boolean = deno?.build.standalone === true;

/** Resolve a runtime option ("node", "deno", or a path) to an executable: this runtime's own for its own name, unless `compiled`. */
export function runtimeCommand(runtime: string, compiled: boolean = compiledDeno): RuntimeCommand {
  const self = isDeno ? "deno" : "node";
  if (runtime === "node" || runtime === "deno") {
    return { kind: runtime, exe: runtime !== self ? runtime : deno ? (compiled ? "deno" : deno.execPath()) : process.execPath };
  }
  const base = runtime.slice(runtime.lastIndexOf("/") + 1);
  return { kind: base.includes("deno") ? "deno" : "node", exe: runtime };
}
