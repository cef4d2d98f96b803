/**
 * The bootstrap: the one handshake for any started child, whatever started it (a process, an
 * in-process ssh channel). It forwards the child's output to the log, lets the method answer
 * prompts, reads the READY line (the version gate), sends the core payload and CONFIGURE, waits
 * for CONNECTED and adopts the child. Part of `mitogen:parent`.
 *
 * @module
 */
import type { ChildLink, Router } from "./router.ts";
import type { Context } from "./context.ts";
import { CORE, HANDLE, MARKER, Message } from "./frames.ts";
import { type ChildConfig, configureBody } from "./bodies.ts";
import { type LogSource, logRecordOf } from "./logapi.ts";
import { nodeProcess } from "./runtime.ts";
import { nodeTransport } from "./transport.ts";
import { Stream } from "./stream.ts";
import { StreamError, TimeoutError } from "./errors.ts";
import { type CoreToSend, coreToSend, pickerToSend } from "./codecache.ts";
import { withoutStages } from "./firststage.ts";
import type { Launch, Spawned, Starting } from "./launch.ts";
import { childRuntime } from "./versions.ts";

const MAX_LINE = 64 * 1024;

/**
 * Split a byte stream into lines for the log; overlong lines are cut at 64 KiB. While `router`'s link to
 * its parent (where the lines go) is congested, the stream is not read.
 */
function forwardLines(
  router: Router,
  readable: { on(e: "data", cb: (d: Uint8Array) => void): unknown; on(e: "end", cb: () => void): unknown; pause?(): unknown; resume?(): unknown },
  sink: (line: string) => void,
  /** Sees an unfinished line (a prompt waits without a newline); true consumes it. */
  unfinished?: (partial: string) => boolean,
): void {
  const decoder = new TextDecoder();
  let partial = "";
  readable.on("data", (d) => {
    partial += decoder.decode(d, { stream: true });
    for (;;) {
      const nl = partial.indexOf("\n");
      if (nl >= 0 && nl <= MAX_LINE) {
        // A line ends at \n or \r\n (ssh ends its complaints with \r\n): no \r in a log line or an error quoting it.
        sink(partial.slice(0, partial[nl - 1] === "\r" ? nl - 1 : nl));
        partial = partial.slice(nl + 1);
      } else if (partial.length > MAX_LINE) {
        sink(partial.slice(0, MAX_LINE));
        partial = partial.slice(MAX_LINE);
      } else break;
    }
    if (partial && unfinished?.(partial)) partial = "";
    const up = router.parent;
    if (up?.congested) {
      readable.pause?.();
      up.onDrain(() => readable.resume?.());
    }
  });
  readable.on("end", () => {
    partial += decoder.decode();
    if (partial) sink(partial);
    partial = "";
  });
}

/** A connection step, as a debug record of this context: `<name>: <what> (+<ms> ms)`, data `{ step, ms }`. */
export function step(router: Router, spec: Starting, t0: number, name: string, what: string): void {
  const ms = Date.now() - t0;
  router.log("debug", `${spec.name}: ${what} (+${ms} ms)`, "log", { step: name, context: spec.name, ms });
}

/**
 * Bootstrap a started child. Resolves with its Context once it has sent
 * CONNECTED; rejects with TimeoutError after `connectTimeout`, or StreamError
 * if it ends, breaks, reports a runtime too old, or `hooks.watch` reports a
 * failure first. The core payload for the child's runtime comes from this
 * context's module cache, or its parent's (GET_MODULE).
 *
 * With `hooks.pipeline` (no prompt can come on the stream) the core picker, the
 * ES2022 core and CONFIGURE are written at once, and the Context is handed out
 * then: frames sent to it follow them. A Node too old for that core gets the
 * lowered one once READY says so. The start goes on behind `ctx.connected()`
 * (the same errors, the same connectTimeout), and a failure fails every call
 * to the context with its error.
 */
export async function bootstrap(
  router: Router,
  spec: Starting,
  child: Spawned,
  hooks: Pick<Launch, "watch" | "prompt" | "cleanup" | "terminal" | "plain" | "codeCache" | "pipeline">,
  t0: number = Date.now(),
): Promise<Context> {
  const stream = new Stream(spec.name, nodeTransport(child.reader, child.writer), router.maxMessageSize);
  let starting = true;
  let failed: (err: Error) => void = () => {};
  const failure = new Promise<never>((_, reject) => (failed = reject));
  failure.catch(() => {});
  const tail: string[] = [];
  const answer = (text: string) => stream.writeRaw(new TextEncoder().encode(text));
  const output = (source: LogSource) => (said: string) => {
    const line = withoutStages(said);
    if (source === "stderr") {
      if (starting && hooks.watch) {
        const verdict = hooks.watch(line, answer);
        if (verdict instanceof Error) failed(verdict);
        if (verdict === true) return;
      }
      tail.push(line);
      if (tail.length > 20) tail.shift();
    }
    router.logRecord(logRecordOf(spec.id, spec.name, [...router.path, spec.name], "info", source, line));
  };
  if (child.stdout) forwardLines(router, child.stdout, output("stdout"));
  // Prompts come without a newline: let the method see unfinished lines while connecting.
  forwardLines(router, child.stderr, output("stderr"), (partial) => {
    if (!starting || !hooks.watch || !hooks.prompt?.test(partial)) return false;
    const verdict = hooks.watch(partial, answer);
    if (verdict instanceof Error) failed(verdict);
    return true;
  });

  const stop = async (): Promise<void> => {
    if (child.status() === null) {
      if (!stream.closed) stream.send(Message.encoded(null, { dst: spec.id, src: router.myId, auth: router.myId, handle: HANDLE.SHUTDOWN }));
      const timer = setTimeout(() => child.kill(), 3000);
      await child.gone;
      clearTimeout(timer);
    } else await child.gone;
    stream.close();
  };
  const ended = (ms: number) =>
    new Promise<string | null>((resolve) => {
      const timer = setTimeout(() => resolve(child.status()), ms);
      void child.gone.then(() => {
        clearTimeout(timer);
        resolve(child.status());
      });
    });
  const link: ChildLink = { stream, stop, ended, method: spec.label ?? spec.method.kind };

  // Frames that arrive before the child is announced (ADD_ROUTE, once READY is read) are held, not lost.
  const early: Message[] = [];
  const hold = (msg: Message) => early.push(msg);
  stream.onMessage = hold;
  // EOF during bootstrap means the child is ending: how it ended (below) says more.
  const onClose = (err?: Error) => starting && err instanceof StreamError && failed(err);
  stream.onClose = onClose;
  child.onError(failed);
  const exitError = () => {
    const said = tail.length ? `; stderr:\n${tail.join("\n")}` : "";
    return new StreamError(`${spec.name}: ${child.what} ${child.status() ?? "ended"} before connecting${said}`);
  };
  // Report an exit once the last stderr lines are in.
  void child.gone.then(() => failed(exitError()));
  const timer = setTimeout(
    () => failed(new TimeoutError(`${spec.name}: not connected within ${spec.connectTimeout} ms`)),
    Math.max(0, spec.connectTimeout - (Date.now() - t0)),
  );
  const writePayload = (payload: Uint8Array, rest: Uint8Array | null = null) => {
    const length = new Uint8Array(4);
    new DataView(length.buffer).setUint32(0, payload.byteLength);
    stream.writeRaw(length);
    stream.writeRaw(payload);
    if (rest) stream.writeRaw(rest);
  };
  const configure = (codeCache?: number) => {
    const config: ChildConfig = {
      contextId: spec.id,
      parentIds: [router.myId, ...router.parentIds],
      name: spec.name,
      maxMessageSize: router.maxMessageSize,
      unidirectional: router.unidirectional,
      debug: router.debug,
      path: [...router.path, spec.name],
      // The child watches this pid when it shares our machine (see watchParent).
      ...(/^(local|sudo|su|doas)$/.test(spec.method.kind) ? { parentPid: nodeProcess().pid } : {}),
      ...(codeCache ? { codeCache } : {}),
    };
    stream.send(configureBody.encode(config, { dst: spec.id, src: router.myId, auth: router.myId }));
    step(router, spec, t0, "configure", "CONFIGURE sent");
  };
  /** Adopt the stream (routes, and the router's own close handler, which a failed start still reaches). */
  const adopt = (announce: boolean): Context => {
    const ctx = router.addChild(link, spec.id, spec.name, announce);
    const routerClose = stream.onClose;
    stream.onClose = (err) => {
      onClose(err);
      routerClose(err);
    };
    return ctx;
  };
  let sent: CoreToSend | null = null;
  // A pipelined start: the Context, handed out once the core and CONFIGURE are written; its frames are held until READY.
  let handOut: (ctx: Context) => void = () => {};
  const handedOut = new Promise<Context>((resolve) => (handOut = resolve));
  let inbound: ((msg: Message) => void) | null = null;

  const started = (async (): Promise<Context> => {
    let ctx: Context | null = null;
    let modernKept = false;
    try {
      stream.start();
      const terminal = hooks.terminal;
      const ready = stream.expectMarker(
        MARKER.READY,
        terminal &&
          ((text) => {
            for (const line of text.split(/\r?\n/)) if (line.trim()) tail.push(line);
            tail.splice(0, Math.max(0, tail.length - 20));
            const verdict = terminal(text, answer);
            if (verdict) failed(verdict);
          }),
      );
      const connected = stream.expectMarker(MARKER.CONNECTED);
      connected.catch(() => {}); // awaited below, unless bootstrap fails first
      // A marker lost to EOF is reported through `failure`, with the exit status.
      const settle = <T>(marker: Promise<T>) => marker.catch((err: Error) => (err instanceof StreamError && !stream.closed ? Promise.reject(err) : failure));
      // The core `name` as sent; a child given it compressed keeps it, to start children of its own.
      const coreFor = async (name: string) => {
        const code = await Promise.race([router.fetchModuleCode(name), failure]);
        const payload = coreToSend(router, code, spec.id, hooks.plain, undefined).payload;
        return { payload, kept: payload === code };
      };
      if (hooks.pipeline) {
        writePayload(pickerToSend(hooks.plain));
        const modern = await coreFor(CORE.MODERN);
        writePayload(modern.payload);
        modernKept = modern.kept;
        step(router, spec, t0, "payload", `core picker and ${CORE.MODERN} sent`);
        configure();
        ctx = adopt(false);
        inbound = stream.onMessage;
        stream.onMessage = hold;
        step(router, spec, t0, "handed", `handed out as context ${spec.id}`);
        handOut(ctx);
      }
      const runtime = childRuntime(await Promise.race([settle(ready), failure]), spec.name);
      step(router, spec, t0, "ready", `first stage READY (${runtime.text})`);
      link.runtime = runtime.text;
      if (ctx) {
        // The picker skips the frames sent so far and runs this core, which follows them.
        if (runtime.core === CORE.MODERN && modernKept) router.noteHeld(spec.id, CORE.MODERN);
        if (runtime.core !== CORE.MODERN) {
          const lowered = await coreFor(runtime.core);
          writePayload(lowered.payload);
          if (lowered.kept) router.noteHeld(spec.id, runtime.core);
          step(router, spec, t0, "payload", `${runtime.core} sent`);
        }
        router.announceChild(link);
        stream.onMessage = inbound as (msg: Message) => void;
        for (const msg of early.splice(0)) stream.onMessage(msg);
      } else {
        const core = await Promise.race([router.fetchModuleCode(runtime.core), failure]);
        sent = coreToSend(
          router,
          core,
          spec.id,
          hooks.plain,
          hooks.codeCache === undefined ? undefined : `${hooks.codeCache}\0${runtime.text}\0${runtime.core}`,
        );
        writePayload(sent.payload, sent.rest);
        if (sent.payload === core) router.noteHeld(spec.id, runtime.core);
        step(router, spec, t0, "payload", `payload sent (${runtime.core}, ${sent.payload.byteLength} bytes)`);
        configure(sent.reply);
      }
      await Promise.race([settle(connected), failure]);
      step(router, spec, t0, "connected", "CONNECTED");
    } catch (err) {
      if (sent?.reply) sent.drop();
      step(router, spec, t0, "failed", `failed: ${(err as Error).message}`);
      child.kill();
      await child.gone;
      stream.close();
      throw err;
    } finally {
      starting = false;
      clearTimeout(timer);
      hooks.cleanup?.();
    }
    if (ctx) return ctx;
    ctx = adopt(true);
    if (sent?.reply) void ctx.disconnected().then(sent.drop);
    for (const msg of early.splice(0)) stream.onMessage(msg);
    step(router, spec, t0, "adopted", `connected as context ${spec.id}`);
    return ctx;
  })();
  if (!hooks.pipeline) return started;
  link.connecting = started;
  started.catch(() => {});
  return Promise.race([handedOut, started]);
}
