/**
 * The child's main loop: {@link childMain}, which the first stage calls with what it read, takes the
 * stream to the parent, waits for CONFIGURE, and serves calls until SHUTDOWN or the parent is gone.
 * Part of the child payload.
 *
 * @module
 */
import { StreamError } from "./errors.ts";
import { type Boot, childTransport } from "./transport.ts";
import { exitProcess, onUncaught, setTitle } from "./runtime.ts";
import { watchParent } from "./watchdog.ts";
import { CORE, HANDLE, MARKER, Message } from "./frames.ts";
import { Stream } from "./stream.ts";
import { becomeChild } from "./roles.ts";
import { setActiveRouter } from "./logapi.ts";
import { configureBody } from "./bodies.ts";
import { setRunningCore } from "./calls.ts";
import { fromParent, installDispatcher } from "./dispatch.ts";
import { Router } from "./router.ts";

const ascii = new TextEncoder();

/** Entry point of the payload: the first stage calls this with what it read. */
export function childMain(boot: Boot, core: Record<string, unknown>, payloadName: string = CORE.MODERN): void {
  setRunningCore(core);
  const transport = childTransport(boot);
  const router = new Router();
  setActiveRouter(router, true);
  // A plain (undeflated) core is not kept: a first grandchild fetches the compressed one (GET_MODULE).
  if (boot.payload) {
    router.payload = boot.payload;
    router.moduleCode.set(payloadName, boot.payload);
  }
  router.name = boot.name;
  const stream = new Stream("parent", transport);
  setTitle(`mitogen:${boot.name}`);
  let configured = false;
  stream.onMessage = (msg) => {
    if (configured || msg.handle !== HANDLE.CONFIGURE) {
      stream.close(new StreamError("first frame was not CONFIGURE"));
      return;
    }
    configured = true;
    const cfg = configureBody.decode(msg);
    router.myId = cfg.contextId;
    router.parentIds = cfg.parentIds;
    becomeChild(cfg.contextId, cfg.parentIds);
    router.name = cfg.name;
    router.path = Array.isArray(cfg.path) ? cfg.path.map(String) : [cfg.name];
    router.maxMessageSize = stream.maxMessageSize = cfg.maxMessageSize;
    // A parent's CONFIGURE has both (a session's has neither; sessions do not run childMain).
    router.unidirectional = cfg.unidirectional as boolean;
    router.debug = cfg.debug as boolean;
    setTitle(`mitogen:${cfg.name}`);
    router.setParent(stream);
    // Die with the parent even while user code blocks the event loop (see ARCHITECTURE.md, "The watchdog").
    router.log("debug", `watchdog: ${watchParent(cfg.parentPid)}`);
    // The code cache its parent asked for (see coreToSend in codecache.ts), made before any call has run here, and
    // after the watchdog and a log record, so that what they ran starts compiled in the next child too.
    const script = boot.script;
    if (cfg.codeCache && script) {
      // A value of each common kind encoded first, so that the cache holds the encoder too.
      Message.encoded([0, "", [null, true, 1.5, -1, 1 << 20], { a: [] }, new Uint8Array(1)]);
      router.route(Message.encoded(script.createCachedData(), { dst: cfg.parentIds[0] ?? 0, handle: cfg.codeCache }));
    }
    if (script?.cachedDataRejected !== undefined) router.log("debug", `code cache ${script.cachedDataRejected ? "rejected" : "used"}`);
  };
  // Parent gone: nothing left to say to it, and our children see EOF when we exit.
  stream.onClose = () => exitProcess(0);
  // SHUTDOWN: stop our children first (bounded), let the last writes out, then exit. Without children, no
  // timers: the first one costs a new child about 1 ms, and the parent kills a child that does not go.
  let exiting = false;
  const exit = (code: number) => {
    if (exiting) return;
    exiting = true;
    const bounded = router.children.length > 0;
    const timer = bounded ? setTimeout(() => exitProcess(code), 2000) : undefined;
    void (bounded ? Promise.race([router.shutdown(), new Promise((r) => setTimeout(r, 1500))]) : router.shutdown())
      .then(() => stream.flush())
      .finally(() => {
        // Not clearTimeout(undefined): Deno 2 loads its Node timers for that (15 to 20 ms in a new child).
        if (timer !== undefined) clearTimeout(timer);
        exitProcess(code);
      });
  };
  router.onParentLost = () => exitProcess(0);
  installDispatcher(router);
  router.addHandler(() => exit(0), { handle: HANDLE.SHUTDOWN, policy: (m) => fromParent(router, m) });
  onUncaught((what, err) => router.log("error", `${what}: ${(err as Error)?.stack ?? err}`));
  stream.start();
  stream.writeRaw(ascii.encode(MARKER.CONNECTED));
}
