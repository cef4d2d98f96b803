/**
 * Listeners: another process attaches to a running context over a unix
 * socket or TCP and uses the tree from there (Mitogen's `mitogen.unix`,
 * authenticated, and over TCP sealed). Shipped as `mitogen:listen`: any
 * context can listen; the attaching side is `connect()` in session.ts.
 *
 * A session is a stream of the listening context, with an id from the tree
 * like a child's, but it is not trusted like one: each message it sends is
 * admitted only if it is a call (CALL_FUNCTION, CANCEL_CALL), a message to a
 * dynamic handle (replies, Senders, flow credit) or FORWARD_MODULE, and only
 * to the contexts its listener allows. An admitted message carries the
 * listener's authority (auth_id), as in Mitogen: the listening context vouches
 * for it, so its children accept its calls as from a parent.
 *
 * @module
 */
import {
  asyncDispose,
  builtin,
  type ChildLink,
  FIRST_DYNAMIC_HANDLE,
  HANDLE,
  installDispatcher,
  Message,
  MitogenError,
  nodeProcess,
  nodeTransport,
  type Router,
  Stream,
  type Transport,
} from "./core.ts";
import { acceptSealed, acceptWithKey, type KeyPair } from "./handshake.ts";

/** What a session may reach: the listening context and those below it (default), or the listening context only. */
export type ListenAllow = "call" | "listener";

/** Options of `router.listen()`: `path` for a unix socket, or `host` and `port` for TCP. */
export interface ListenOptions {
  /** A unix socket here, mode 0600, in a directory only this user can write. */
  path?: string;
  /** The unix listener's key (32 bytes, or base64). Default: a fresh one, written 0600 to `<path>.key`. */
  key?: Uint8Array | string;
  /** TCP: the address to listen on (127.0.0.1, ::1, ...). */
  host?: string;
  /** TCP: the port; 0 picks a free one (see `listener.port`). */
  port?: number;
  /** TCP: this listener's key pair (see `generateKeyPair`). */
  keyPair?: KeyPair;
  /** TCP: the public keys of the clients that may attach. */
  authorizedKeys?: readonly string[];
  /** What sessions may reach (default "call"). */
  allow?: ListenAllow;
  /** Milliseconds a connecting process has to complete the handshake (default 10 000). */
  handshakeTimeout?: number;
}

/** A listening socket; `await using` closes it. */
export interface Listener extends AsyncDisposable {
  /** The unix socket's path, or null for TCP. */
  readonly path: string | null;
  /** The key file written beside the socket, or null. */
  readonly keyFile: string | null;
  /** The TCP port (the one picked for `port: 0`), or null. */
  readonly port: number | null;
  /** Sessions attached now. */
  readonly sessions: number;
  /** Refuse new sessions, end the live ones, remove the socket (and the key file it wrote). */
  close(): Promise<void>;
}

/** Streams of attached sessions, of every listener in this process. */
const sessionStreams = new WeakSet<Stream>();
const forwarding = new WeakSet<Router>();

/** The checks of the module doc, for one message from a session of a listener allowing `allow`. */
function admit(router: Router, allow: ListenAllow, msg: Message): string | null {
  const h = msg.handle;
  if (h !== HANDLE.CALL_FUNCTION && h !== HANDLE.CANCEL_CALL && h !== HANDLE.FORWARD_MODULE && h < FIRST_DYNAMIC_HANDLE) {
    return `handle ${h} is not open to attached sessions`;
  }
  if (msg.dst !== router.myId) {
    if (allow === "listener" || h === HANDLE.FORWARD_MODULE) return `this listener admits messages to ${router.name} only`;
    const out = router.routeTo(msg.dst);
    if (!out || sessionStreams.has(out)) return `context ${msg.dst} is not below ${router.name}`;
  }
  msg.auth = router.myId;
  return null;
}

/** Modules a session bundled: checked against their names (content hashes) and held for GET_MODULE. */
function serveForwardedModules(router: Router): void {
  if (forwarding.has(router)) return;
  forwarding.add(router);
  router.addHandler(
    (msg) => {
      const body = msg.unpickle() as [unknown, unknown];
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

const base64 = (s: string): Uint8Array => new Uint8Array(builtin("node:buffer").Buffer.from(s, "base64"));

/** Refuse a socket directory others can write: they could replace the socket or the key file. */
function checkDirectory(dir: string): void {
  const fs = builtin("node:fs");
  const st = fs.statSync(dir);
  const uid = nodeProcess().getuid?.();
  if (!st.isDirectory()) throw new MitogenError(`listen: ${dir} is not a directory`);
  if ((uid !== undefined && st.uid !== uid) || st.mode & 0o022) {
    throw new MitogenError(
      `listen: ${dir} must be a directory only this user can write (it has mode ${(st.mode & 0o777).toString(8)}, owner uid ${st.uid}); use e.g. $XDG_RUNTIME_DIR or a 0700 directory`,
    );
  }
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

/** {@link Router.listen}: listen for sessions attaching to `router`'s context. */
export async function listen(router: Router, options: ListenOptions): Promise<Listener> {
  const fs = builtin("node:fs");
  const net = builtin("node:net");
  const unix = options.path !== undefined;
  if (unix === (options.host !== undefined || options.port !== undefined))
    throw new MitogenError("listen needs either path (a unix socket) or host and port (TCP)");
  const allow = options.allow ?? "call";
  if (allow !== "call" && allow !== "listener") throw new MitogenError(`listen: allow must be "call" or "listener", not ${JSON.stringify(allow)}`);
  const timeoutMs = options.handshakeTimeout ?? 10_000;
  let key: Uint8Array | null = null;
  let keyFile: string | null = null;
  const path = options.path ?? null;
  if (path !== null) {
    checkDirectory(builtin("node:path").dirname(path));
    await clearStale(path);
    key = typeof options.key === "string" ? base64(options.key) : (options.key ?? builtin("node:crypto").randomBytes(32));
    if (key.byteLength !== 32) throw new MitogenError("listen: key must be 32 bytes");
    if (options.key === undefined) {
      keyFile = `${path}.key`;
      fs.writeFileSync(keyFile, builtin("node:buffer").Buffer.from(key).toString("base64"), { mode: 0o600 });
      fs.chmodSync(keyFile, 0o600);
    }
  } else {
    if (!options.keyPair || !options.authorizedKeys) throw new MitogenError("listen over TCP needs keyPair and authorizedKeys");
    if (!options.host) throw new MitogenError("listen over TCP needs host (e.g. 127.0.0.1)");
  }
  installDispatcher(router); // the master has none until something may call into it
  serveForwardedModules(router);
  const live = new Set<Stream>();
  const sockets = new Set<import("node:net").Socket>();
  let closing = false;
  const server = net.createServer((socket: import("node:net").Socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    void attach(socket).catch((err: unknown) => {
      router.log("warn", `listener: refused a connection: ${err instanceof Error ? err.message : String(err)}`);
      socket.destroy();
    });
  });
  const attach = async (socket: import("node:net").Socket) => {
    if (closing) throw new MitogenError("the listener is closing");
    socket.setNoDelay?.(true);
    const raw = nodeTransport(socket, socket);
    let transport: Transport;
    if (key) transport = await acceptWithKey(raw, key, { timeoutMs });
    else {
      const opts = { keyPair: options.keyPair as KeyPair, authorizedKeys: options.authorizedKeys as readonly string[], timeoutMs };
      transport = (await acceptSealed(raw, opts)).transport;
    }
    if (closing) {
      transport.close();
      throw new MitogenError("the listener is closing");
    }
    const id = await router.allocateId();
    const name = `session.${id}`;
    const stream = new Stream(name, transport, router.maxMessageSize);
    const link: ChildLink = {
      stream,
      stop: () => {
        stream.close();
        return Promise.resolve();
      },
      admit: (msg) => admit(router, allow, msg),
    };
    sessionStreams.add(stream);
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
    stream.send(Message.encoded(config, { dst: id, src: router.myId, auth: router.myId, handle: HANDLE.CONFIGURE }));
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
  if (path !== null) fs.chmodSync(path, 0o600);
  const address = server.address();
  const port = path === null && address && typeof address === "object" ? address.port : null;
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
        const stopped = new Promise<void>((resolve) => server.close(() => resolve()));
        for (const s of live) s.close();
        for (const s of sockets) s.destroy();
        await stopped;
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
