/**
 * What a context needs to start children: the first stage, the bootstrap
 * handshake, and the local connection method. The master has it built in;
 * a child receives it (LOAD_MODULE "mitogen:parent") only when asked to start
 * a child of its own.
 *
 * Node builtins come from `process.getBuiltinModule`, so this module runs
 * unchanged when evaluated from the compressed payload inside a child.
 *
 * @module
 */
import {
  type ChildConfig,
  type ChildLink,
  type Context,
  type LogSource,
  HANDLE,
  isDeno,
  type LocalOptions,
  MARKER,
  Message,
  type Router,
  Stream,
  StreamError,
  TimeoutError,
  nodeTransport,
  runtimeCommand,
  takesRouter,
} from "./core.ts";

/** Everything needed to start one child. */
export interface ConnectSpec {
  id: number;
  name: string;
  /** "node", "deno", or a path to either. */
  runtime: string;
  /** Milliseconds from spawn to the child's CONNECTED marker. */
  connectTimeout: number;
  env?: Record<string, string>;
  cwd?: string;
}

/**
 * The first stage, as evaluated by `node -e` or `deno eval` with argv
 * `<name> <payload length>`. It writes the READY marker, reads exactly the
 * payload, inflates it and runs it; on EOF or garbage it says why on stderr
 * and exits 1. No single quotes, so it is safe inside '...' in any POSIX shell.
 *
 * Node reads its stream from fd 3 (see runtime.ts); Deno from fds 0/1.
 */
export function firstStage(kind: "node" | "deno"): string {
  const ready = `"${MARKER.READY.trim()}\\n"`;
  const fail = `e=m=>{console.error("mitogen("+N+"): "+m);process.exit(1)}`;
  const run = (inflate: string, boot: string) => `try{new Function("B",${inflate}+"")(${boot})}catch(x){e("bad payload: "+x)}`;
  if (kind === "deno") {
    return (
      `const[N,L]=Deno.args,n=+L,b=new Uint8Array(n),${fail};` +
      `Deno.stdout.writeSync(new TextEncoder().encode(${ready}));` +
      `for(let o=0,r;o<n;o+=r)if((r=await Deno.stdin.read(b.subarray(o)))===null)e("EOF before payload");` +
      run(`await new Response(new Response(b).body.pipeThrough(new DecompressionStream("deflate-raw"))).text()`, "{name:N,payload:b}")
    );
  }
  return (
    `const g=process.getBuiltinModule,[N,L]=process.argv.slice(-2),n=+L,` +
    `s=new(g("net").Socket)({fd:3,readable:1,writable:1}),a=[],${fail},` +
    `f=d=>{a.push(d);if((l+=d.length)<n)return;s.pause().off("data",f).off("end",h);` +
    `const b=Buffer.concat(a),p=b.subarray(0,n);l>n&&s.unshift(b.subarray(n));` +
    `${run(`g("zlib").inflateRawSync(p)`, "{socket:s,name:N,payload:p}")}},h=()=>e("EOF before payload");` +
    `let l=0;s.on("data",f).on("end",h).write(${ready})`
  );
}

const MAX_LINE = 64 * 1024;

/** Split a byte stream into lines for the log; overlong lines are cut at 64 KiB. */
function forwardLines(
  readable: { on(e: "data", cb: (d: Uint8Array) => void): unknown; on(e: "end", cb: () => void): unknown },
  sink: (line: string) => void,
): void {
  const decoder = new TextDecoder();
  let partial = "";
  readable.on("data", (d) => {
    partial += decoder.decode(d, { stream: true });
    for (;;) {
      const nl = partial.indexOf("\n");
      if (nl >= 0 && nl <= MAX_LINE) {
        sink(partial.slice(0, nl));
        partial = partial.slice(nl + 1);
      } else if (partial.length > MAX_LINE) {
        sink(partial.slice(0, MAX_LINE));
        partial = partial.slice(MAX_LINE);
      } else break;
    }
  });
  readable.on("end", () => {
    partial += decoder.decode();
    if (partial) sink(partial);
    partial = "";
  });
}

/**
 * Start a local child (node or deno) and bootstrap it. Resolves with its
 * Context once it has sent CONNECTED; rejects with TimeoutError after
 * `connectTimeout`, or StreamError if it exits or breaks first.
 */
export async function connectLocal(router: Router, spec: ConnectSpec): Promise<Context> {
  const payload = router.payload;
  if (!payload) throw new StreamError("this context has no payload to start children with");
  const { spawn } = process.getBuiltinModule("node:child_process");
  const cmd = runtimeCommand(spec.runtime);
  const stage = firstStage(cmd.kind);
  const args = cmd.kind === "node" ? ["-e", stage, spec.name, String(payload.byteLength)] : ["eval", stage, spec.name, String(payload.byteLength)];
  const env = { ...process.env, DENO_NO_UPDATE_CHECK: "1", DENO_NO_PROMPT: "1", ...spec.env };
  const proc = spawn(cmd.exe, args, {
    stdio: cmd.kind === "node" ? ["ignore", "pipe", "pipe", "pipe"] : ["pipe", "pipe", "pipe"],
    env,
    ...(spec.cwd === undefined ? {} : { cwd: spec.cwd }),
  });
  type R = Parameters<typeof nodeTransport>[0];
  type W = Parameters<typeof nodeTransport>[1];
  const [stdin, stdout, stderr, fd3] = proc.stdio as unknown as [W | undefined, R | undefined, R | undefined, (R & W) | undefined];
  const reader = cmd.kind === "node" ? fd3 : stdout;
  const writer = cmd.kind === "node" ? fd3 : stdin;
  if (!reader || !writer || !stdout || !stderr) {
    // Spawning failed outright (Deno reports it this way; Node through "error").
    const err = await new Promise<Error>((resolve) => {
      const timer = setTimeout(() => resolve(new Error("no stdio")), 1000);
      proc.once("error", (e) => {
        clearTimeout(timer);
        resolve(e);
      });
    });
    throw new StreamError(`cannot start ${cmd.exe}: ${err.message}`, { cause: err });
  }
  const transport = nodeTransport(reader, writer);
  const stream = new Stream(spec.name, transport, router.maxMessageSize);

  const tail: string[] = [];
  const output = (source: LogSource) => (line: string) => {
    if (source === "stderr") {
      tail.push(line);
      if (tail.length > 20) tail.shift();
    }
    router.logRecord({
      contextId: spec.id,
      name: spec.name,
      path: [...router.path, spec.name],
      level: source === "stderr" ? "warn" : "info",
      source,
      message: line,
    });
  };
  if (cmd.kind === "node") forwardLines(stdout, output("stdout"));
  forwardLines(stderr, output("stderr"));

  const exited = new Promise<void>((resolve) => proc.once("close", () => resolve()));
  const stop = async (): Promise<void> => {
    if (proc.exitCode === null && proc.signalCode === null) {
      if (!stream.closed) stream.send(Message.encoded(null, { dst: spec.id, src: router.myId, auth: router.myId, handle: HANDLE.SHUTDOWN }));
      const timer = setTimeout(() => proc.kill("SIGKILL"), 3000);
      await exited;
      clearTimeout(timer);
    } else await exited;
    stream.close();
  };
  const link: ChildLink = { stream, stop };

  // Frames that arrive between CONNECTED and adoption are held, not lost.
  const early: Message[] = [];
  stream.onMessage = (msg) => early.push(msg);
  let failed: (err: Error) => void = () => {};
  const failure = new Promise<never>((_, reject) => (failed = reject));
  // EOF during bootstrap means the process is exiting: its exit status (below) says more.
  stream.onClose = (err) => err instanceof StreamError && failed(err);
  proc.once("error", (err) => failed(new StreamError(`cannot start ${cmd.exe}: ${err.message}`, { cause: err })));
  const exitError = () => {
    const why = proc.signalCode ? `was killed by ${proc.signalCode}` : `exited with code ${proc.exitCode}`;
    const said = tail.length ? `; stderr:\n${tail.join("\n")}` : "";
    return new StreamError(`${spec.name}: ${cmd.exe} ${why} before connecting${said}`);
  };
  // Report an exit once the last stderr lines are in.
  void exited.then(() => failed(exitError()));
  const timer = setTimeout(() => failed(new TimeoutError(`${spec.name}: not connected within ${spec.connectTimeout} ms`)), spec.connectTimeout);

  try {
    stream.start();
    const ready = stream.expectMarker(MARKER.READY);
    const connected = stream.expectMarker(MARKER.CONNECTED);
    connected.catch(() => {}); // awaited below, unless bootstrap fails first
    // A marker lost to EOF is reported through `failure`, with the exit status.
    const settle = (marker: Promise<void>) => marker.catch((err: Error) => (err instanceof StreamError && !stream.closed ? Promise.reject(err) : failure));
    await Promise.race([settle(ready), failure]);
    stream.writeRaw(payload);
    const config: ChildConfig = {
      contextId: spec.id,
      parentIds: [...router.parentIds, router.myId],
      name: spec.name,
      maxMessageSize: router.maxMessageSize,
      unidirectional: router.unidirectional,
      debug: router.debug,
      path: [...router.path, spec.name],
    };
    stream.send(Message.encoded(config, { dst: spec.id, src: router.myId, auth: router.myId, handle: HANDLE.CONFIGURE }));
    await Promise.race([settle(connected), failure]);
  } catch (err) {
    proc.kill("SIGKILL");
    await exited;
    stream.close();
    throw err;
  } finally {
    clearTimeout(timer);
  }
  const ctx = router.addChild(link, spec.id, spec.name);
  for (const msg of early.splice(0)) stream.onMessage(msg);
  return ctx;
}

/** {@link Router.local}: start a local context below `router`, or below `options.via`. */
export async function local(router: Router, options: LocalOptions): Promise<Context> {
  const id = await router.allocateId();
  const spec: ConnectSpec = {
    id,
    name: options.name ?? `local.${id}`,
    runtime: options.runtime ?? (isDeno ? "deno" : "node"),
    connectTimeout: options.connectTimeout ?? 30_000,
    ...(options.env ? { env: options.env } : {}),
    ...(options.cwd ? { cwd: options.cwd } : {}),
  };
  const via = options.via;
  if (!via) return connectLocal(router, spec);
  await via.callModule("mitogen:parent", "proxyConnectLocal", spec);
  const ctx = router.contextById(id, spec.name);
  ctx.via = via;
  return ctx;
}

/** Run in a `via` context: start a local child there. Resolves with its id. */
export const proxyConnectLocal: (spec: ConnectSpec, call: { router: Router }) => Promise<number> = takesRouter(
  async (spec: ConnectSpec, call: { router: Router }): Promise<number> => (await connectLocal(call.router, spec)).contextId,
);
