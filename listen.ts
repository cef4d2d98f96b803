/**
 * Listeners: another process attaches to a running context over a unix
 * socket or TCP and uses the tree from there (Mitogen's `mitogen.unix`,
 * authenticated, and over TCP sealed). Shipped as `mitogen:listen`: any
 * context can listen; the attaching side is `connect()` in session.ts.
 *
 * A session is a stream of the listening context, with an id from the tree
 * like a child's, but it is not trusted like one: each message it sends is
 * admitted only if it is a call (CALL_FUNCTION, CALL_SERVICE, CANCEL_CALL), a message to a
 * dynamic handle (replies, Senders, flow credit) or FORWARD_MODULE, and only
 * to the contexts its listener's `route` names, never to another session. An
 * admitted message carries the listener's authority (auth_id), as in Mitogen:
 * the listening context vouches for it, so its children accept its calls as
 * from a parent. `route` is not a sandbox: a call runs as the listening
 * context, and code it runs there (`takesRouter`) reaches what that context does.
 *
 * Before the handshake a connection costs little and is capped: at most
 * `maxPending` at once, `maxPendingPerSource` from one TCP address (when full,
 * a newcomer from a source holding fewer takes the place of the oldest of the
 * source holding most), each within `handshakeTimeout`; the key material is
 * checked and derived once per listen(); refusals are logged once, then
 * counted ("refused N connections in the last 10 s: reason").
 *
 * @module
 */
import { MitogenError } from "./errors.ts";
import { asyncDispose, builtin, deno, nodeProcess } from "./runtime.ts";
import { nodeTransport } from "./transport.ts";
import { FIRST_DYNAMIC_HANDLE, HANDLE, handleName, Message } from "./frames.ts";
import { Stream } from "./stream.ts";
import { type Body, configureBody } from "./bodies.ts";
import { type CallContext, installDispatcher } from "./dispatch.ts";
import { takesRouter } from "./calls.ts";
import type { ChildLink, Router } from "./router.ts";
import { acceptWithKey, HandshakeError, type SealedServer, sealedServer } from "./handshake.ts";
import type { ContextInfo, Listener, ListenOptions, ListenRoute } from "./options.ts";

/** The runtime a session's context has in the tree (ADD_ROUTE), so listeners above know it is one. */
const SESSION_RUNTIME = "session";
/** Default of {@link ListenOptions.maxPending}. */
const MAX_PENDING = 64;
/** Default of {@link ListenOptions.maxPendingPerSource}. */
const MAX_PENDING_PER_SOURCE = 8;
/** Default of {@link ListenOptions.handshakeTimeout}. */
const HANDSHAKE_MS = 5_000;
/** Refusals after the first in this window are counted, and logged as one line at its end. */
const REFUSAL_WINDOW_MS = 10_000;

/** Streams of attached sessions, of every listener in this process, and their listener's `route`. */
const sessionStreams = new WeakMap<Stream, ListenRoute>();
const forwarding = new WeakSet<Router>();

/** The checks of the module doc, for one message from a session of a listener routing to `route`. */
function admit(router: Router, route: ListenRoute, msg: Message): string | null {
  const h = msg.handle;
  if (h !== HANDLE.CALL_FUNCTION && h !== HANDLE.CALL_SERVICE && h !== HANDLE.CANCEL_CALL && h !== HANDLE.FORWARD_MODULE && h < FIRST_DYNAMIC_HANDLE) {
    return `handle ${handleName(h)} is not open to attached sessions`;
  }
  if (msg.dst !== router.myId) {
    if (route === "listener" || h === HANDLE.FORWARD_MODULE) return `this listener admits messages to ${router.name} only`;
    const out = router.routeTo(msg.dst);
    if (!out && !router.starting(msg.dst)) return `context ${msg.dst} is not below ${router.name}`;
    // A session of this listener, or (as ADD_ROUTE told) of one further down.
    if ((out && sessionStreams.has(out)) || router.contextById(msg.dst).runtime === SESSION_RUNTIME)
      return `context ${msg.dst} is an attached session: sessions cannot reach each other`;
  }
  msg.auth = router.myId;
  return null;
}

// FORWARD_MODULE (108), from a session to its listener
//
//   [name, code]      answered true if inflate(code) is script "\n//# sourceURL=mitogen:///" name "\n"
//                     and name ends in "@" + the first 16 hex digits of SHA-256(script)

/** A FORWARD_MODULE body: a module the session bundled, its name and its code (raw deflate). */
export type ForwardModuleBody = [name: string, code: Uint8Array];

/** FORWARD_MODULE (session.ts sends it, {@link serveForwardedModules} reads it). */
export const forwardModuleBody: Body<ForwardModuleBody> = {
  encode: (b, fields) => Message.encoded(b, { ...fields, handle: HANDLE.FORWARD_MODULE }),
  decode: (msg) => msg.unpickle() as ForwardModuleBody,
};

/** Modules a session bundled: checked against their names (content hashes) and held for GET_MODULE. */
function serveForwardedModules(router: Router): void {
  if (forwarding.has(router)) return;
  forwarding.add(router);
  router.addHandler(
    (msg) => {
      const body = forwardModuleBody.decode(msg);
      const [name, code] = Array.isArray(body) ? body : [];
      const m = typeof name === "string" ? /^[^/@\s]+@([0-9a-f]{16})$/.exec(name) : null;
      if (!m || typeof name !== "string" || !(code instanceof Uint8Array)) return msg.reply(new MitogenError("FORWARD_MODULE needs [name@hash16, code]"));
      let text: string;
      try {
        text = builtin("node:zlib").inflateRawSync(code).toString();
      } catch (err) {
        return msg.reply(new MitogenError(`module ${name}: code does not inflate: ${(err as Error).message}`));
      }
      const tail = `\n//# sourceURL=mitogen:///${name}\n`;
      const js = text.endsWith(tail) ? text.slice(0, -tail.length) : null;
      const hash = js === null ? "" : builtin("node:crypto").createHash("sha256").update(js).digest("hex").slice(0, 16);
      if (hash !== m[1]) return msg.reply(new MitogenError(`module ${name}: its code does not have that hash`));
      router.moduleCode.set(name, code);
      msg.reply(true);
    },
    { handle: HANDLE.FORWARD_MODULE, policy: (_m, stream) => stream !== null && sessionStreams.has(stream) },
  );
}

/** The contexts routed below `router` (attached sessions too, unless `sessions` is false), the oldest first. */
export function contextsBelow(router: Router, sessions = true): ContextInfo[] {
  return router
    .routedIds()
    .sort((a, b) => a - b)
    .flatMap((id) => {
      const c = router.contextById(id);
      return !sessions && c.runtime === SESSION_RUNTIME
        ? []
        : [{ id, name: c.name, method: c.method, parent: router.parentOf(id) ?? null, runtime: c.runtime }];
    });
}

/**
 * What a caller of this context may reach, as `router.contexts()` lists it: this context, and
 * the contexts below it but attached sessions, or, for a session of a `route: "listener"`
 * listener, this context only. An attached session's `contexts()` is this call.
 */
export const reachable: (call: CallContext) => ContextInfo[] = takesRouter(({ router, msg }: CallContext): ContextInfo[] => {
  const from = router.routeTo(msg.src);
  const self: ContextInfo = {
    id: router.myId,
    name: router.name,
    method: null,
    parent: router.parentIds[0] ?? null,
    runtime: deno ? `deno ${(deno as unknown as { version: { deno: string } }).version.deno}` : `node ${nodeProcess().versions.node}`,
  };
  return from && sessionStreams.get(from) === "listener" ? [self] : [self, ...contextsBelow(router, false)];
});

const base64 = (s: string): Uint8Array => new Uint8Array(builtin("node:buffer").Buffer.from(s, "base64"));

/**
 * Refuse a socket directory others can write, or one inside a directory others
 * can write without the sticky bit (they could rename it away and put their own
 * in its place): each could replace the socket or the key file. As OpenSSH's
 * StrictModes: every directory from `dir` up to / is owned by this user or
 * root, and writable by no one else unless sticky (/tmp).
 */
function checkDirectory(dir: string): void {
  const fs = builtin("node:fs");
  const pathMod = builtin("node:path");
  const uid = nodeProcess().getuid?.();
  const fix = "use e.g. $XDG_RUNTIME_DIR or a 0700 directory in a directory only its owner can change";
  let at: string;
  try {
    at = fs.realpathSync(dir);
  } catch (err) {
    throw new MitogenError(`listen: cannot use directory ${dir}: ${(err as Error).message}`, { cause: err });
  }
  const first = fs.statSync(at);
  if (!first.isDirectory()) throw new MitogenError(`listen: ${dir} is not a directory`);
  if ((uid !== undefined && first.uid !== uid) || first.mode & 0o022) {
    throw new MitogenError(
      `listen: ${dir} must be a directory only this user can write (it has mode ${(first.mode & 0o777).toString(8)}, owner uid ${first.uid}); ${fix}`,
    );
  }
  for (let parent = pathMod.dirname(at); ; parent = pathMod.dirname(parent)) {
    const st = fs.statSync(parent);
    const owner = st.uid === 0 || uid === undefined || st.uid === uid;
    if (!owner || (st.mode & 0o022 && !(st.mode & 0o1000))) {
      throw new MitogenError(
        `listen: ${dir} is inside ${parent} (mode ${(st.mode & 0o7777).toString(8)}, owner uid ${st.uid}), which others can change: they could rename ${dir} and put their own in its place; ${fix}`,
      );
    }
    if (parent === pathMod.dirname(parent)) break;
  }
}

/** Write the unix listener's new key file: created here (O_EXCL|O_NOFOLLOW, 0600), never through a link. */
function writeKeyFile(file: string, key: Uint8Array): void {
  const fs = builtin("node:fs");
  let st: import("node:fs").Stats | null = null;
  try {
    st = fs.lstatSync(file);
  } catch {
    // none: the usual case
  }
  // A stale key file of a listener that died is ours to replace (the directory is only ours); anything else is refused.
  if (st) {
    if (!st.isFile() || st.nlink !== 1)
      throw new MitogenError(`listen: ${file} exists and is not a key file (a link or not a regular file); remove it or pass key`);
    fs.unlinkSync(file);
  }
  const c = fs.constants;
  // Mode 0600 at creation (a umask only takes bits away); Deno 1.46 has no fchmodSync.
  const fd = fs.openSync(file, c.O_WRONLY | c.O_CREAT | c.O_EXCL | (c.O_NOFOLLOW ?? 0), 0o600);
  try {
    fs.writeSync(fd, builtin("node:buffer").Buffer.from(key).toString("base64"));
  } finally {
    fs.closeSync(fd);
  }
}

/** A positive integer option, or an error naming it and its value. */
function count(value: number | undefined, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (!Number.isSafeInteger(value) || value < 1) throw new MitogenError(`listen: ${name} must be a positive integer, not ${String(value)}`);
  return value;
}

/** Refusals of connections, logged once, then counted per reason: one line per reason per window. */
function refusalLog(router: Router, where: () => string): { refused(reason: string, detail: string): void; close(): void } {
  const counts = new Map<string, number>();
  let timer: ReturnType<typeof setTimeout> | null = null;
  let closed = false;
  const flush = (): void => {
    if (timer !== null) clearTimeout(timer);
    timer = null;
    if (!counts.size) return;
    for (const [reason, n] of counts) {
      router.log("warn", `listener ${where()}: refused ${n} connection${n === 1 ? "" : "s"} in the last ${REFUSAL_WINDOW_MS / 1000} s: ${reason}`);
    }
    counts.clear();
    // Still refusing: a new window, so a flood costs one line per reason per window.
    timer = setTimeout(flush, REFUSAL_WINDOW_MS);
  };
  return {
    refused(reason, detail) {
      if (closed) return;
      if (timer === null) {
        router.log("warn", `listener ${where()}: refused a connection: ${detail} (more in the next ${REFUSAL_WINDOW_MS / 1000} s are counted)`);
        timer = setTimeout(flush, REFUSAL_WINDOW_MS);
      } else counts.set(reason, (counts.get(reason) ?? 0) + 1);
    },
    /** Log what was counted; no timer is left. */
    close() {
      closed = true;
      flush();
      if (timer !== null) clearTimeout(timer);
      timer = null;
    },
  };
}

/** Remove a socket file nobody listens on any more; refuse one in use or any other file. */
async function clearStale(path: string): Promise<void> {
  const fs = builtin("node:fs");
  let st: { isSocket(): boolean };
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new MitogenError(`listen: ${path} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const s = builtin("node:net").createConnection(path);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
  if (live) throw new MitogenError(`listen: ${path} is in use by another listener`);
  fs.unlinkSync(path);
}

/** `route`, or the deprecated `allow` it replaces; an error names a bad value. */
function routeOf(options: ListenOptions): ListenRoute {
  const old = options.allow === undefined ? undefined : ({ call: "below", listener: "listener" } as const)[options.allow];
  if (options.allow !== undefined && !old)
    throw new MitogenError(`listen: allow (deprecated: use route) must be "call" or "listener", not ${JSON.stringify(options.allow)}`);
  const route = options.route ?? old ?? "below";
  if (route !== "below" && route !== "listener") throw new MitogenError(`listen: route must be "below" or "listener", not ${JSON.stringify(route)}`);
  if (old && options.route !== undefined && old !== options.route)
    throw new MitogenError(`listen: allow ${JSON.stringify(options.allow)} (deprecated) contradicts route ${JSON.stringify(options.route)}: give route only`);
  return route;
}

/** {@link Router.listen}: listen for sessions attaching to `router`'s context. */
export async function listen(router: Router, options: ListenOptions): Promise<Listener> {
  const fs = builtin("node:fs");
  const net = builtin("node:net");
  const unix = options.path !== undefined;
  if (unix === (options.host !== undefined || options.port !== undefined))
    throw new MitogenError("listen needs either path (a unix socket) or host and port (TCP)");
  const route = routeOf(options);
  const timeoutMs = options.handshakeTimeout ?? HANDSHAKE_MS;
  if (typeof timeoutMs !== "number" || !Number.isFinite(timeoutMs) || timeoutMs <= 0)
    throw new MitogenError(`listen: handshakeTimeout must be a positive finite number of milliseconds, not ${String(timeoutMs)}`);
  const maxPending = count(options.maxPending, "maxPending", MAX_PENDING);
  const maxPerSource = unix ? maxPending : count(options.maxPendingPerSource, "maxPendingPerSource", MAX_PENDING_PER_SOURCE);
  let key: Uint8Array | null = null;
  let keyFile: string | null = null;
  let sealed: SealedServer | null = null;
  const path = options.path ?? null;
  if (path !== null) {
    checkDirectory(builtin("node:path").dirname(path));
    await clearStale(path);
    key = typeof options.key === "string" ? base64(options.key) : (options.key ?? builtin("node:crypto").randomBytes(32));
    if (key.byteLength !== 32) throw new MitogenError("listen: key must be 32 bytes");
    if (options.key === undefined) {
      keyFile = `${path}.key`;
      writeKeyFile(keyFile, key);
    }
  } else {
    if (!options.keyPair || !options.authorizedKeys) throw new MitogenError("listen over TCP needs keyPair and authorizedKeys");
    if (!options.host) throw new MitogenError("listen over TCP needs host (e.g. 127.0.0.1)");
    try {
      sealed = sealedServer({ keyPair: options.keyPair, authorizedKeys: options.authorizedKeys });
    } catch (err) {
      throw new MitogenError(`listen: ${err instanceof HandshakeError ? err.message.replace(/^handshake failed: malformed \((.*)\)$/, "$1") : String(err)}`, {
        cause: err,
      });
    }
  }
  installDispatcher(router); // the master has none until something may call into it
  serveForwardedModules(router);
  let where = path ?? `${options.host}:${options.port}`;
  const refusals = refusalLog(router, () => where);
  const live = new Set<Stream>();
  const sockets = new Set<import("node:net").Socket>();
  /** Connections in their handshake, per source (a TCP address; "unix"), each set in arrival order. */
  const pending = new Map<string, Set<import("node:net").Socket>>();
  let pendingCount = 0;
  const settle = (source: string, socket: import("node:net").Socket): void => {
    const set = pending.get(source);
    if (!set?.delete(socket)) return;
    pendingCount--;
    if (!set.size) pending.delete(source);
  };
  /** Make room for a connection from `source`, or say why not. */
  const room = (source: string): string | null => {
    const mine = pending.get(source)?.size ?? 0;
    if (mine >= maxPerSource) return `${maxPerSource} connections from ${source} are in their handshake (maxPendingPerSource)`;
    if (pendingCount < maxPending) return null;
    let top: [string, Set<import("node:net").Socket>] | null = null;
    for (const entry of pending) if (!top || entry[1].size > top[1].size) top = entry;
    if (!top || top[1].size <= mine + 1) return `${maxPending} connections are in their handshake (maxPending)`;
    const oldest = top[1].values().next().value as import("node:net").Socket;
    settle(top[0], oldest);
    oldest.destroy();
    refusals.refused(
      "dropped in its handshake for a connection from a source with fewer (maxPending)",
      `dropped one from ${top[0]} in its handshake, to admit one from ${source}`,
    );
    return null;
  };
  let closing = false;
  const server = net.createServer((socket: import("node:net").Socket) => {
    const source = path !== null ? "unix" : (socket.remoteAddress ?? "unknown");
    socket.on("error", () => {}); // a reset before the handshake ends is the handshake's failure
    if (closing) {
      socket.destroy();
      return;
    }
    const full = room(source);
    if (full) {
      refusals.refused(full, `from ${source}: ${full}`);
      socket.destroy();
      return;
    }
    let set = pending.get(source);
    if (!set) pending.set(source, (set = new Set()));
    set.add(socket);
    pendingCount++;
    sockets.add(socket);
    socket.once("close", () => {
      sockets.delete(socket);
      settle(source, socket);
    });
    void attach(socket).then(
      () => settle(source, socket),
      (err: unknown) => {
        settle(source, socket);
        socket.destroy();
        if (closing) return; // ended by close(), not refused
        const reason = err instanceof HandshakeError ? `handshake failed: ${err.reason}` : err instanceof Error ? err.message : String(err);
        refusals.refused(reason, `from ${source}: ${err instanceof Error ? err.message : String(err)}`);
      },
    );
  });
  const attach = async (socket: import("node:net").Socket) => {
    socket.setNoDelay?.(true);
    const raw = nodeTransport(socket, socket);
    const transport = key ? await acceptWithKey(raw, key, { timeoutMs }) : (await (sealed as SealedServer).accept(raw, timeoutMs)).transport;
    if (closing) {
      transport.close();
      throw new MitogenError("the listener is closing");
    }
    const id = await router.allocateId();
    const name = `session.${id}`;
    const stream = new Stream(name, transport, router.maxMessageSize);
    const link: ChildLink = {
      stream,
      runtime: SESSION_RUNTIME,
      method: SESSION_RUNTIME,
      stop: () => {
        stream.close();
        return Promise.resolve();
      },
      admit: (msg) => admit(router, route, msg),
    };
    sessionStreams.set(stream, route);
    live.add(stream);
    router.addChild(link, id, name);
    const onClose = stream.onClose;
    stream.onClose = (err) => {
      live.delete(stream);
      onClose(err);
    };
    stream.start();
    const config = {
      contextId: id,
      parentIds: [router.myId, ...router.parentIds],
      name,
      path: [...router.path, name],
      maxMessageSize: router.maxMessageSize,
      listener: router.name,
    };
    stream.send(configureBody.encode(config, { dst: id, src: router.myId, auth: router.myId }));
    router.log("debug", `listener: ${name} attached`);
  };
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    const done = () => {
      server.off("error", reject);
      resolve();
    };
    if (path !== null) server.listen(path, done);
    else server.listen(options.port ?? 0, options.host, done);
  });
  // An accept that fails (EMFILE) must not end the process: it is a refusal like any other.
  server.on("error", (err: Error) => {
    if (!closing) refusals.refused(`accept failed: ${err.message}`, `accept failed: ${err.message}`);
  });
  if (path !== null) fs.chmodSync(path, 0o600);
  const address = server.address();
  const port = path === null && address && typeof address === "object" ? address.port : null;
  where = path ?? `${options.host}:${port}`;
  let closed: Promise<void> | null = null;
  const listener: Listener = {
    path,
    keyFile,
    port,
    get sessions() {
      return live.size;
    },
    close() {
      closed ??= (async () => {
        closing = true;
        // close()'s callback waits for every connection, all destroyed here; Deno 1.46 never calls
        // it once one was accepted, so wait for it at most a second (the socket is closed already).
        let timer: ReturnType<typeof setTimeout> | undefined;
        const stopped = new Promise<void>((resolve) => {
          server.close(() => resolve());
          timer = setTimeout(resolve, 1000);
        });
        for (const s of live) s.close();
        for (const s of sockets) s.destroy();
        await stopped;
        clearTimeout(timer);
        refusals.close();
        for (const f of [path, keyFile]) {
          if (f === null) continue;
          try {
            fs.unlinkSync(f);
          } catch {
            // gone already
          }
        }
      })();
      return closed;
    },
    [asyncDispose]() {
      return this.close();
    },
  };
  router.atShutdown(() => listener.close());
  return listener;
}
