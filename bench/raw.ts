/**
 * Raw references: the same shapes as the mitogen measurements, with nothing
 * but a child process and its stdio pipes. Each child script runs under
 * `node -e` or `deno eval`.
 *
 * @module
 */
import { type ChildProcess, fork, spawn } from "node:child_process";
import { shellQuote } from "../firststage.ts";

/** Which runtime a raw child runs on, and the executable. */
export interface Runtime {
  kind: "node" | "deno";
  exe: string;
}

/** argv to evaluate `src` with `rt` (as mitogen starts it: Deno without a config file). */
function evalArgs(rt: Runtime, src: string): string[] {
  return rt.kind === "node" ? ["-e", src] : ["eval", "--no-config", src];
}

const ENV = { ...process.env, DENO_NO_UPDATE_CHECK: "1", DENO_NO_PROMPT: "1" };

/** Every raw child still running, so an abort can kill them. */
const live = new Set<ChildProcess>();
process.on("exit", () => {
  for (const p of live) p.kill("SIGKILL");
});

/** Echo every byte of stdin to stdout, as it arrives. */
const ECHO: Record<Runtime["kind"], string> = {
  node: `process.stdin.on("data",d=>process.stdout.write(d))`,
  deno:
    `const b=new Uint8Array(262144);` +
    `for(;;){const n=await Deno.stdin.read(b);if(n===null)break;let o=0;while(o<n)o+=await Deno.stdout.write(b.subarray(o,n))}`,
};

/**
 * A relay chain: a process of depth k > 1 starts one of depth k - 1 and
 * forwards to it. A byte v > 0 goes one level further down as v - 1; a 0 (or
 * any byte at the last level) is echoed back, and answers travel up. So the
 * byte d - 1 sent to the head makes a round trip d processes deep.
 * The script reads itself from RELAY_SRC and its depth from RELAY_DEPTH. On
 * EOF each level closes its child's stdin and waits for it, so every process
 * is reaped by its own parent.
 */
const RELAY =
  `const D=globalThis.Deno,k=+process.env.RELAY_DEPTH,S=process.env.RELAY_SRC;let c=null;` +
  `const out=D?b=>{let o=0;while(o<b.length)o+=D.stdout.writeSync(b.subarray(o))}:b=>process.stdout.write(b);` +
  `if(k>1){c=process.getBuiltinModule("child_process").spawn(process.execPath,D?["eval",S]:["-e",S],` +
  `{stdio:["pipe","pipe","inherit"],env:{...process.env,RELAY_DEPTH:String(k-1)}});c.stdout.on("data",d=>out(new Uint8Array(d)))}` +
  `const on=d=>{for(const v of d){if(v===0||!c)out(Uint8Array.of(v));else c.stdin.write(Uint8Array.of(v-1))}};` +
  `const end=()=>{if(!c)process.exit(0);c.on("close",()=>process.exit(0));c.stdin.end()};` +
  `if(D)(async()=>{const b=new Uint8Array(65536);for(;;){const n=await D.stdin.read(b);if(n===null)break;on(b.subarray(0,n))}end()})();` +
  `else process.stdin.on("data",on).on("end",end)`;

/**
 * A long-lived raw child with pipes on stdin/stdout: `roundTrip(bytes)`
 * writes the bytes and resolves once as many have come back.
 */
export class RawPeer implements AsyncDisposable {
  readonly proc: ChildProcess;
  readonly #exited: Promise<void>;
  #want = 0;
  #have = 0;
  #waiter: { resolve: () => void; reject: (e: Error) => void } | null = null;
  #gone: Error | null = null;

  private constructor(argv: readonly string[], env: Record<string, string | undefined>, what: string) {
    const [exe = "", ...args] = argv;
    this.proc = spawn(exe, args, { stdio: ["pipe", "pipe", "inherit"], env });
    live.add(this.proc);
    this.#exited = new Promise((resolve) =>
      this.proc.once("close", () => {
        live.delete(this.proc);
        resolve();
      }),
    );
    const fail = (why: string) => {
      this.#gone ??= new Error(`raw ${what} ${why}`);
      const w = this.#waiter;
      this.#waiter = null;
      w?.reject(this.#gone);
    };
    this.proc.once("error", (err) => fail(`failed: ${err.message}`));
    this.proc.once("exit", (code, signal) => fail(`exited (${signal ?? code})`));
    this.proc.stdout?.on("data", (d: Uint8Array) => {
      this.#have += d.byteLength;
      if (this.#have >= this.#want && this.#waiter) {
        const w = this.#waiter;
        this.#waiter = null;
        w.resolve();
      }
    });
  }

  /** A child echoing stdin to stdout. */
  static echo(rt: Runtime): RawPeer {
    return new RawPeer([rt.exe, ...evalArgs(rt, ECHO[rt.kind])], ENV, `${rt.kind} child`);
  }

  /** The head of a relay chain `depth` processes long. */
  static relay(rt: Runtime, depth: number): RawPeer {
    return new RawPeer([rt.exe, ...evalArgs(rt, RELAY)], { ...ENV, RELAY_SRC: RELAY, RELAY_DEPTH: String(depth) }, `${rt.kind} relay chain`);
  }

  /** An ssh client (or any command) whose far end echoes stdin to stdout: `argv` in full, remote command included (see {@link remoteEcho}). */
  static command(argv: readonly string[]): RawPeer {
    return new RawPeer(argv, ENV, JSON.stringify(argv[0] ?? ""));
  }

  /** Write `bytes`; resolve once the same number of bytes has come back. */
  roundTrip(bytes: Uint8Array): Promise<void> {
    return this.roundTripMany([bytes]);
  }

  /** Write each of `chunks` with a write of its own (all at once); resolve once as many bytes have come back. */
  roundTripMany(chunks: readonly Uint8Array[]): Promise<void> {
    if (this.#gone) return Promise.reject(this.#gone);
    for (const c of chunks) this.#want += c.byteLength;
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
      for (const c of chunks) this.proc.stdin?.write(c);
    });
  }

  /** Close stdin (the chain then ends level by level); SIGKILL after 3 s. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.proc.stdin?.end();
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 3000);
    await this.#exited;
    clearTimeout(timer);
  }
}

/** The remote shell command of an ssh echo: `node -e '<echo>'`, or deno by absolute path without its update check. */
export function remoteEcho(kind: Runtime["kind"], exe: string): string {
  return kind === "node"
    ? `${shellQuote(exe)} -e ${shellQuote(ECHO.node)}`
    : `DENO_NO_UPDATE_CHECK=1 exec ${shellQuote(exe)} eval --no-config ${shellQuote(ECHO.deno)}`;
}

/**
 * Node's own IPC: a `child_process.fork` child (always node, whatever the
 * bench's --runtime) sending every message back; `roundTrip(msg)` sends one
 * and resolves when it is back.
 */
export class ForkPeer implements AsyncDisposable {
  readonly proc: ChildProcess;
  readonly #exited: Promise<void>;
  #waiter: { resolve: () => void; reject: (e: Error) => void } | null = null;
  #gone: Error | null = null;

  constructor() {
    const script = new URL("./fixtures/ipc-echo.cjs", import.meta.url);
    this.proc = fork(script, [], { execPath: process.execPath, execArgv: [], stdio: ["ignore", "ignore", "inherit", "ipc"], env: ENV });
    live.add(this.proc);
    // "exit", not "close": a child with an IPC channel and no stdio pipes may never emit "close".
    this.#exited = new Promise((resolve) =>
      this.proc.once("exit", () => {
        live.delete(this.proc);
        resolve();
      }),
    );
    const fail = (why: string) => {
      this.#gone ??= new Error(`fork child ${why}`);
      const w = this.#waiter;
      this.#waiter = null;
      w?.reject(this.#gone);
    };
    this.proc.once("error", (err) => fail(`failed: ${err.message}`));
    this.proc.once("exit", (code, signal) => fail(`exited (${signal ?? code})`));
    this.proc.on("message", () => {
      const w = this.#waiter;
      this.#waiter = null;
      w?.resolve();
    });
  }

  /** Send `msg`; resolve when the child has sent it back. */
  roundTrip(msg: number): Promise<void> {
    if (this.#gone) return Promise.reject(this.#gone);
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
      this.proc.send(msg);
    });
  }

  /** Disconnect the channel (the child then exits); SIGKILL after 3 s. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (this.proc.connected) this.proc.disconnect();
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 3000);
    await this.#exited;
    clearTimeout(timer);
  }
}

/** Spawn `exe -e ''` (or `deno eval ''`) and resolve when it has exited; SIGKILL after `limitMs`. `without`: variables left out of its environment. */
export function spawnToExit(rt: Runtime, limitMs = 20_000, without: readonly string[] = []): Promise<void> {
  const env: Record<string, string | undefined> = { ...ENV };
  for (const name of without) delete env[name];
  return new Promise((resolve, reject) => {
    const proc = spawn(rt.exe, evalArgs(rt, ""), { stdio: "ignore", env });
    live.add(proc);
    const timer = setTimeout(() => proc.kill("SIGKILL"), limitMs);
    proc.once("error", (err) => {
      clearTimeout(timer);
      live.delete(proc);
      reject(err);
    });
    proc.once("exit", (code, signal) => {
      clearTimeout(timer);
      live.delete(proc);
      if (code === 0) resolve();
      else reject(new Error(`${rt.exe} exited (${signal ?? code})`));
    });
  });
}

/**
 * Run `argv` (stdin and stdout on /dev/null, or `input` written to stdin) and
 * resolve when it has exited 0; otherwise reject with how it ended and the end
 * of its stderr. SIGKILL after `limitMs`.
 */
export function commandToExit(argv: readonly string[], limitMs = 20_000, input?: string): Promise<void> {
  const [exe, ...args] = argv;
  if (!exe) return Promise.reject(new Error("commandToExit: empty argv"));
  return new Promise((resolve, reject) => {
    const proc = spawn(exe, args, { stdio: [input === undefined ? "ignore" : "pipe", "ignore", "pipe"], env: ENV });
    proc.stdin?.on("error", () => {}).end(input); // the command may exit before reading it all
    live.add(proc);
    let stderr = "";
    proc.stderr?.setEncoding("utf8").on("data", (s: string) => (stderr = (stderr + s).slice(-2000)));
    const timer = setTimeout(() => proc.kill("SIGKILL"), limitMs);
    proc.once("error", (err) => {
      clearTimeout(timer);
      live.delete(proc);
      reject(err);
    });
    proc.once("close", (code, signal) => {
      clearTimeout(timer);
      live.delete(proc);
      if (code === 0) resolve();
      else reject(new Error(`${exe} exited (${signal ?? code})${stderr.trim() ? `: ${stderr.trim().split("\n").at(-1)}` : ""}`));
    });
  });
}

/** Write `blocks` blocks of `size` bytes to stdout, waiting for drain, then exit; prints its peak RSS (MiB) on stderr. */
const SOURCE =
  `const D=globalThis.Deno,n=+process.env.RAW_BLOCKS,b=new Uint8Array(+process.env.RAW_SIZE).fill(90);` +
  `const hwm=()=>+/VmHWM:\\s+(\\d+)/.exec(process.getBuiltinModule("fs").readFileSync("/proc/self/status","latin1"))[1]/1024;` +
  `(async()=>{for(let i=0;i<n;i++){if(D){let o=0;while(o<b.length)o+=await D.stdout.write(b.subarray(o))}` +
  `else if(!process.stdout.write(b))await new Promise(r=>process.stdout.once("drain",r))}` +
  `process.stderr.write(hwm()+"\\n");if(!D)process.stdout.end()})()`;

/**
 * A one-way stream: a child writes `blocks` blocks of `size` bytes to its
 * stdout; resolves with the milliseconds until all of them were read here
 * (with `copy`, each gathered into a fresh buffer), and the child's peak RSS in MiB.
 */
export function streamFrom(rt: Runtime, blocks: number, size: number, copy = false, limitMs = 120_000): Promise<{ ms: number; peakMiB: number }> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const proc = spawn(rt.exe, evalArgs(rt, SOURCE), {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...ENV, RAW_BLOCKS: String(blocks), RAW_SIZE: String(size) },
    });
    live.add(proc);
    let got = 0;
    let ms = 0;
    let err = "";
    // With `copy`, each block is gathered into a fresh buffer of its own, as a receiver of whole values must.
    let block: Uint8Array | null = null;
    let filled = 0;
    proc.stdout?.on("data", (d: Uint8Array) => {
      got += d.byteLength;
      for (let off = 0; copy && off < d.byteLength; ) {
        block ??= new Uint8Array(size);
        const k = Math.min(size - filled, d.byteLength - off);
        block.set(d.subarray(off, off + k), filled);
        filled += k;
        off += k;
        if (filled === size) {
          block = null;
          filled = 0;
        }
      }
      if (got === blocks * size) ms = performance.now() - t0;
    });
    proc.stderr?.setEncoding("utf8").on("data", (t: string) => (err += t));
    const timer = setTimeout(() => proc.kill("SIGKILL"), limitMs);
    proc.once("close", (code, signal) => {
      clearTimeout(timer);
      live.delete(proc);
      if (got !== blocks * size) reject(new Error(`raw stream: ${got} of ${blocks * size} bytes (${signal ?? code}) ${err.trim()}`));
      else resolve({ ms, peakMiB: Number.parseFloat(err) });
    });
  });
}

/** Kill every raw child still running (used before a hard exit). */
export function killAll(): void {
  for (const p of live) p.kill("SIGKILL");
}
