/**
 * Attaching to a running tree: `connect()` opens a session with a context
 * that listens (`router.listen`, listen.ts), from another process on this
 * machine (unix socket) or elsewhere (TCP, sealed). The session has a
 * Router of its own, a context id from the tree, and reaches what its
 * listener allows: calls, Senders, Receivers and `ctx.import` work as from
 * the master. Modules it imports are bundled here and forwarded to the
 * listener (FORWARD_MODULE) before use, so the tree below can fetch them.
 * Master only.
 *
 * @module
 */
import { Buffer } from "node:buffer";
import { readFileSync } from "node:fs";
import { createConnection, type Socket } from "node:net";
import { MitogenError, StreamError } from "./errors.ts";
import { nodeTransport, type Transport } from "./transport.ts";
import { HANDLE } from "./frames.ts";
import { Stream } from "./stream.ts";
import type { Context } from "./context.ts";
import type { ContextInfo } from "./options.ts";
import { type ChildConfig, configureBody } from "./bodies.ts";
import { connectSealed, connectWithKey, type KeyPair } from "./handshake.ts";
import { Router, type RouterOptions } from "./master.ts";
import { forwardModuleBody } from "./listen.ts";

/** Options of {@link connect}: `path` for a unix listener, or `host` and `port` for TCP. */
export interface ConnectOptions {
  /** The listener's unix socket. */
  path?: string;
  /** The unix listener's key (32 bytes, or base64); default: read from `<path>.key`. */
  key?: Uint8Array | string;
  host?: string;
  port?: number;
  /** TCP: this client's key pair (its public key must be in the listener's authorizedKeys). */
  keyPair?: KeyPair;
  /** TCP: the listener's public key, pinned. */
  serverKey?: string;
  /** Milliseconds for connecting and the handshake (default 10 000). */
  timeout?: number;
  /** The session router's log sink (see RouterOptions). */
  log?: RouterOptions["log"];
}

/** An attached session; `await using` ends it. */
export interface Session extends AsyncDisposable {
  /** This process's router in the tree (a context id of its own; its parent is the listening context). */
  readonly router: Router;
  /** The listening context. */
  readonly context: Context;
  /** End the session: its calls fail, the tree forgets it. */
  close(): Promise<void>;
}

/** The session's router: a master's (it bundles what it imports) with the listener as its parent. */
class SessionRouter extends Router {
  readonly #forwarded = new Map<string, Promise<void>>();

  override allocateId(): Promise<number> {
    return Promise.reject(
      new MitogenError(
        "an attached session cannot start contexts of its own: start them from the listening context (session.context, with a takesRouter call)",
      ),
    );
  }

  /** The listening context and what its listener's `route` admits below it, as the listener says (`reachable` in listen.ts). */
  override async contexts(): Promise<ContextInfo[]> {
    const listener = this.contextById(this.parentIds[0] as number);
    return (await listener.callModule("mitogen:listen", "reachable")) as ContextInfo[];
  }

  /** Bundle here, then hand the code to the listener, which the tree below fetches modules from. */
  override async bundleModule(specifier: string | URL, runtime: string | null = null): Promise<string> {
    const name = await super.bundleModule(specifier, runtime);
    let sent = this.#forwarded.get(name);
    if (!sent) {
      const code = this.moduleCode.get(name) as Uint8Array;
      const listener = this.contextById(this.parentIds[0] as number);
      sent = listener.sendAwait(forwardModuleBody.encode([name, code])).then((ok) => {
        if (ok !== true) throw ok instanceof Error ? ok : new MitogenError(`the listener did not take module ${name}`);
      });
      sent.catch(() => this.#forwarded.delete(name));
      this.#forwarded.set(name, sent);
    }
    await sent;
    return name;
  }
}

function open(options: ConnectOptions, timeout: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket =
      options.path !== undefined ? createConnection(options.path) : createConnection({ host: options.host as string, port: options.port as number });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new MitogenError(`connect: no answer from ${where(options)} within ${timeout} ms`));
    }, timeout);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once("error", (err) => {
      clearTimeout(timer);
      reject(new MitogenError(`connect: cannot reach ${where(options)}: ${err.message}`, { cause: err }));
    });
  });
}

const where = (o: ConnectOptions) => (o.path !== undefined ? o.path : `${o.host}:${o.port}`);

/**
 * Attach to the context listening at `options.path` (unix) or `host:port` (TCP).
 *
 * @example
 * ```ts
 * import { mkdtempSync } from "node:fs";
 * import { tmpdir } from "node:os";
 * import { connect, Router } from "mitogen";
 * await using router = new Router();
 * const dir = mkdtempSync(`${tmpdir()}/mitogen-`); // owner-only
 * await using listener = await router.listen({ path: `${dir}/mitogen.sock` });
 * await using session = await connect({ path: `${dir}/mitogen.sock` });
 * console.log(await session.context.call(() => process.pid)); // the listening process
 * ```
 */
export async function connect(options: ConnectOptions): Promise<Session> {
  const timeout = options.timeout ?? 10_000;
  const unix = options.path !== undefined;
  if (unix === (options.host !== undefined || options.port !== undefined))
    throw new MitogenError("connect needs either path (a unix socket) or host and port (TCP)");
  let key: Uint8Array | null = null;
  if (unix) {
    const given = options.key ?? readKeyFile(`${options.path}.key`);
    key = typeof given === "string" ? new Uint8Array(Buffer.from(given.trim(), "base64")) : given;
    if (key.byteLength !== 32) throw new MitogenError("connect: the key must be 32 bytes");
  } else if (!options.keyPair || !options.serverKey) throw new MitogenError("connect over TCP needs keyPair and serverKey");
  const socket = await open(options, timeout);
  let transport: Transport;
  try {
    const raw = nodeTransport(socket, socket);
    transport = key
      ? await connectWithKey(raw, key, { timeoutMs: timeout })
      : await connectSealed(raw, { keyPair: options.keyPair as KeyPair, serverKey: options.serverKey as string, timeoutMs: timeout });
  } catch (err) {
    socket.destroy();
    throw err;
  }
  const router = new SessionRouter(options.log ? { log: options.log } : {});
  const stream = new Stream("listener", transport);
  const config = await new Promise<ChildConfig>((resolve, reject) => {
    const timer = setTimeout(() => {
      stream.close();
      reject(new MitogenError(`connect: ${where(options)} sent no configuration within ${timeout} ms`));
    }, timeout);
    stream.onMessage = (msg) => {
      clearTimeout(timer);
      if (msg.handle !== HANDLE.CONFIGURE) {
        stream.close(new StreamError("first frame was not CONFIGURE"));
        reject(new MitogenError(`connect: ${where(options)} did not start the session`));
        return;
      }
      resolve(configureBody.decode(msg));
    };
    stream.onClose = (err) => {
      clearTimeout(timer);
      reject(new MitogenError(`connect: ${where(options)} closed the session before it started${err ? `: ${err.message}` : ""}`));
    };
    stream.start();
  });
  router.myId = config.contextId;
  router.parentIds = config.parentIds;
  router.name = config.name;
  router.path = config.path;
  router.maxMessageSize = stream.maxMessageSize = config.maxMessageSize;
  router.setParent(stream);
  const context = router.contextById(config.parentIds[0] as number, config.listener ?? null);
  let closed: Promise<void> | null = null;
  const close = (): Promise<void> => {
    closed ??= (async () => {
      stream.close();
      await router.shutdown();
    })();
    return closed;
  };
  return { router, context, close, [Symbol.asyncDispose]: close };
}

function readKeyFile(file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch (err) {
    throw new MitogenError(`connect: no key given and cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
}
