/**
 * Handshakes for listeners, over any byte stream (a {@link Transport}), with
 * tweetnacl only:
 *
 * - {@link acceptWithKey} / {@link connectWithKey}: a shared-key
 *   challenge/response both ways (unix sockets: the socket itself is private),
 *   then plain bytes.
 * - {@link acceptSealed} / {@link connectSealed}: mutual authentication with
 *   static box key pairs, session keys from ephemeral ones, then every chunk
 *   sealed with `nacl.secretbox` and a per-direction counter as its nonce (TCP).
 *
 * Each resolves with a Transport that carries the bytes after the handshake;
 * bytes that arrive before its `start` are kept and delivered, in order. The
 * exact bytes are in PROTOCOL.md, "Listeners: handshake and sealed frames".
 * No `node:` imports: this module also runs in children (Node 12+, Deno 1.46+).
 *
 * @module
 */
import nacl from "tweetnacl";
import { MitogenError, StreamError } from "./errors.ts";
import { get32, put32 } from "./bytes.ts";
import type { Transport } from "./transport.ts";
import { Chunks } from "./chunks.ts";

/** Sizes and versions of the handshakes (see PROTOCOL.md). */
export const HANDSHAKE = {
  /** First byte of the messages that carry one. */
  VERSION: 1,
  /** secretbox / box nonce. */
  NONCE: 24,
  /** Curve25519 public or secret key, secretbox key. */
  KEY: 32,
  /** Poly1305 tag that a box adds. */
  TAG: 16,
  /** Key challenge: the 16-byte labels sealed with both nonces. */
  KEY_LABEL: 16,
  /** Sealed handshake: SHA-512 of the transcript, the plaintext of both boxes. */
  HASH: 64,
  /** Biggest plaintext of a sealed frame. */
  MAX_CHUNK: 1 << 20,
  /** Default bound of a whole handshake. */
  TIMEOUT_MS: 10_000,
} as const;

/** Domain-separation strings (ASCII), so no box of one step or role is accepted in another. */
const LABEL = {
  KEY_CONNECTOR: "mitogen key v1 c",
  KEY_LISTENER: "mitogen key v1 l",
  SEALED: "mitogen sealed v1",
  SEALED_C2S: "mitogen sealed v1 c2s",
  SEALED_S2C: "mitogen sealed v1 s2c",
} as const;

/** What a handshake failed on: the `reason` of a {@link HandshakeError}. */
export const HANDSHAKE_FAILURE = {
  UNAUTHORIZED: "client key not authorized",
  SERVER_KEY: "server key does not match the pinned serverKey",
  WRONG_KEY: "wrong key",
  TIMEOUT: "timed out",
  MALFORMED: "malformed",
  CLOSED: "closed",
} as const;

/** One of {@link HANDSHAKE_FAILURE}'s values. */
export type HandshakeFailure = (typeof HANDSHAKE_FAILURE)[keyof typeof HANDSHAKE_FAILURE];

/** A handshake failed; `reason` says on what. The raw transport is closed. */
export class HandshakeError extends MitogenError {
  override name = "HandshakeError";
  /** What failed, one of {@link HANDSHAKE_FAILURE}. */
  readonly reason: HandshakeFailure;

  constructor(reason: HandshakeFailure, detail = "", options?: ErrorOptions) {
    super(`handshake failed: ${reason}${detail ? ` (${detail})` : ""}`, options);
    this.reason = reason;
  }
}

/** A tweetnacl box key pair, base64 (what users pass around). */
export interface KeyPair {
  publicKey: string;
  secretKey: string;
}

/** Options of the shared-key handshake. */
export interface KeyOptions {
  /** Bound of the whole handshake (default 10 s). */
  timeoutMs?: number;
}

/** Options of {@link acceptSealed}. */
export interface AcceptSealedOptions {
  /** The listener's static key pair. */
  keyPair: KeyPair;
  /** Public keys (base64) of the clients let in. */
  authorizedKeys: readonly string[];
  /** Bound of the whole handshake (default 10 s). */
  timeoutMs?: number;
}

/** Options of {@link connectSealed}. */
export interface ConnectSealedOptions {
  /** The client's static key pair. */
  keyPair: KeyPair;
  /** The listener's public key (base64): anything else is refused. */
  serverKey: string;
  /** Bound of the whole handshake (default 10 s). */
  timeoutMs?: number;
}

// ---------------------------------------------------------------------------
// bytes

const ascii = (s: string): Uint8Array => {
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
};

function concat(parts: readonly Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.byteLength;
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

const B64 = /^[A-Za-z0-9+/]{43}=$/;

// Base64 by the runtime: btoa and atob (Deno, Node 16 and later), else Buffer (Node 12 and 14, which have
// no btoa). Keys are 32 bytes: their binary strings are short.

function toBase64(bytes: Uint8Array): string {
  return typeof btoa === "function" ? btoa(String.fromCharCode(...bytes)) : Buffer.from(bytes).toString("base64");
}

/** A 32-byte key from base64, or a HandshakeError naming `what`. */
function key32(text: unknown, what: string): Uint8Array {
  if (typeof text !== "string" || !B64.test(text)) throw new HandshakeError(HANDSHAKE_FAILURE.MALFORMED, `${what} is not the base64 of 32 bytes`);
  return typeof atob === "function" ? Uint8Array.from(atob(text), (c) => c.charCodeAt(0)) : new Uint8Array(Buffer.from(text, "base64"));
}

/** Generate a tweetnacl box key pair (Curve25519), base64. */
export function generateKeyPair(): KeyPair {
  const pair = nacl.box.keyPair();
  return { publicKey: toBase64(pair.publicKey), secretKey: toBase64(pair.secretKey) };
}

function staticPair(pair: KeyPair): { publicKey: Uint8Array; secretKey: Uint8Array } {
  const secretKey = key32(pair?.secretKey, "keyPair.secretKey");
  const publicKey = key32(pair.publicKey, "keyPair.publicKey");
  if (!nacl.verify(nacl.box.keyPair.fromSecretKey(secretKey).publicKey, publicKey))
    throw new HandshakeError(HANDSHAKE_FAILURE.MALFORMED, "keyPair.publicKey is not the public key of keyPair.secretKey");
  return { publicKey, secretKey };
}

// ---------------------------------------------------------------------------
// the raw side during a handshake, and the transport after it

/** The bytes after a handshake, kept until `start`. */
class After implements Transport {
  readonly #raw: Transport;
  readonly #write: (parts: readonly Uint8Array[]) => void;
  #pending: Uint8Array[] | null = [];
  #ended = false;
  #endError: Error | undefined;
  #onData: ((chunk: Uint8Array) => void) | null = null;
  #onEnd: ((error?: Error) => void) | null = null;

  constructor(raw: Transport, write: (parts: readonly Uint8Array[]) => void) {
    this.#raw = raw;
    this.#write = write;
  }

  deliver(chunk: Uint8Array): void {
    if (this.#ended || !chunk.byteLength) return;
    if (this.#onData) this.#onData(chunk);
    else this.#pending?.push(chunk);
  }

  end(error?: Error): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#endError = error;
    const onEnd = this.#onEnd;
    if (onEnd) {
      this.#onEnd = null;
      onEnd(error);
    }
  }

  start(onData: (chunk: Uint8Array) => void, onEnd: (error?: Error) => void): void {
    if (this.#onData) throw new MitogenError("Transport.start called twice");
    const pending = this.#pending ?? [];
    this.#pending = null;
    this.#onData = onData;
    for (const chunk of pending) onData(chunk);
    if (this.#ended) onEnd(this.#endError);
    else this.#onEnd = onEnd;
  }

  write(parts: readonly Uint8Array[]): void {
    if (!this.#ended) this.#write(parts);
  }

  flush(): Promise<void> {
    return this.#raw.flush();
  }

  close(): void {
    this.#raw.close();
  }

  // Backpressure passes through to the raw transport.
  queued(): number {
    return this.#raw.queued?.() ?? 0;
  }

  onDrain(fn: () => void): void {
    this.#raw.onDrain?.(fn);
  }

  pause(): void {
    this.#raw.pause?.();
  }

  resume(): void {
    this.#raw.resume?.();
  }
}

/** Reads fixed-size handshake messages off the raw transport, within one deadline. */
class Wire {
  readonly raw: Transport;
  readonly #in = new Chunks();
  #want: { n: number; resolve: (b: Uint8Array) => void } | null = null;
  #failure: HandshakeError | null = null;
  #reject: ((err: HandshakeError) => void) | null = null;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** Once the handshake is done, where bytes go. */
  #after: ((chunk: Uint8Array) => void) | null = null;
  #afterEnd: ((error?: Error) => void) | null = null;
  readonly #closedHint: string;
  /** Settles with the failure of the handshake, if it fails. */
  readonly failed: Promise<never>;

  constructor(raw: Transport, timeoutMs: number | undefined, closedHint: string) {
    this.raw = raw;
    this.#closedHint = closedHint;
    this.failed = new Promise<never>((_, reject) => {
      this.#reject = reject;
    });
    this.failed.catch(() => {});
    const ms = timeoutMs ?? HANDSHAKE.TIMEOUT_MS;
    this.#timer = setTimeout(() => this.fail(new HandshakeError(HANDSHAKE_FAILURE.TIMEOUT, `no handshake within ${ms} ms`)), ms);
    raw.start(
      (chunk) => this.#data(chunk),
      (err) => this.#end(err),
    );
  }

  #data(chunk: Uint8Array): void {
    if (this.#after) {
      this.#after(chunk);
      return;
    }
    if (this.#failure) return;
    this.#in.push(chunk);
    this.#serve();
  }

  #end(err?: Error): void {
    if (this.#afterEnd) {
      this.#afterEnd(err);
      return;
    }
    this.fail(new HandshakeError(HANDSHAKE_FAILURE.CLOSED, this.#closedHint, err ? { cause: err } : undefined));
  }

  #serve(): void {
    const want = this.#want;
    if (!want || this.#in.size < want.n) return;
    this.#want = null;
    want.resolve(this.#in.take(want.n));
  }

  /** The next `n` bytes (n is a fixed message size: nothing is allocated by a claimed length). */
  read(n: number): Promise<Uint8Array> {
    if (this.#failure) return this.failed;
    return Promise.race([
      new Promise<Uint8Array>((resolve) => {
        this.#want = { n, resolve };
        this.#serve();
      }),
      this.failed,
    ]);
  }

  /** End the handshake with `err`: reject, close the raw transport. */
  fail(err: HandshakeError): void {
    if (this.#failure || this.#after) return;
    this.#failure = err;
    clearTimeout(this.#timer);
    this.#in.takeAll();
    this.#want = null;
    this.#reject?.(err);
    this.raw.close();
  }

  /**
   * The handshake is done: from now on raw bytes go to `onData` (first those
   * already read past it), and the raw end to `onEnd`.
   */
  done(onData: (chunk: Uint8Array) => void, onEnd: (error?: Error) => void): void {
    clearTimeout(this.#timer);
    this.#after = onData;
    this.#afterEnd = onEnd;
    for (const chunk of this.#in.takeAll()) onData(chunk);
  }
}

/** Run `steps` against `wire`; any throw fails the handshake with a HandshakeError. */
async function run<T>(wire: Wire, steps: () => Promise<T>): Promise<T> {
  try {
    return await steps();
  } catch (err) {
    const failure =
      err instanceof HandshakeError ? err : new HandshakeError(HANDSHAKE_FAILURE.MALFORMED, err instanceof Error ? err.message : String(err), { cause: err });
    wire.fail(failure);
    throw failure;
  }
}

/** A plain transport over `wire` once the handshake is done. */
function plain(wire: Wire): Transport {
  const raw = wire.raw;
  const after = new After(raw, (parts) => raw.write(parts));
  wire.done(
    (chunk) => after.deliver(chunk),
    (err) => after.end(err),
  );
  return after;
}

function checkVersion(byte: number | undefined, who: string): void {
  if (byte !== HANDSHAKE.VERSION) throw new HandshakeError(HANDSHAKE_FAILURE.MALFORMED, `${who} speaks version ${byte}, not ${HANDSHAKE.VERSION}`);
}

// ---------------------------------------------------------------------------
// shared key (unix sockets)

function keyOf(key: Uint8Array): Uint8Array {
  if (!(key instanceof Uint8Array) || key.byteLength !== HANDSHAKE.KEY) throw new HandshakeError(HANDSHAKE_FAILURE.MALFORMED, "the key is not 32 bytes");
  return key;
}

/** The plaintext of a key-challenge box: label | listener nonce | connector nonce. */
const keyProof = (label: string, nonceL: Uint8Array, nonceC: Uint8Array): Uint8Array => concat([ascii(label), nonceL, nonceC]);
const KEY_BOX = HANDSHAKE.KEY_LABEL + 2 * HANDSHAKE.NONCE + HANDSHAKE.TAG;

/**
 * The listener's side of the shared-key handshake: resolves once the
 * connector has proven it holds `key` (and been shown that this side does).
 */
export async function acceptWithKey(raw: Transport, key: Uint8Array, options: KeyOptions = {}): Promise<Transport> {
  const wire = new Wire(raw, options.timeoutMs, "the connector closed the connection during the handshake");
  return run(wire, async () => {
    const k = keyOf(key);
    const nonceL = nacl.randomBytes(HANDSHAKE.NONCE);
    raw.write([new Uint8Array([HANDSHAKE.VERSION]), nonceL]);
    const m2 = await wire.read(1 + HANDSHAKE.NONCE + KEY_BOX);
    checkVersion(m2[0], "the connector");
    const nonceC = m2.slice(1, 1 + HANDSHAKE.NONCE);
    const opened = nacl.secretbox.open(m2.subarray(1 + HANDSHAKE.NONCE), nonceL, k);
    if (!opened || !nacl.verify(opened, keyProof(LABEL.KEY_CONNECTOR, nonceL, nonceC)))
      throw new HandshakeError(HANDSHAKE_FAILURE.WRONG_KEY, "the connector's answer does not open with the key");
    raw.write([nacl.secretbox(keyProof(LABEL.KEY_LISTENER, nonceL, nonceC), nonceC, k)]);
    return plain(wire);
  });
}

/**
 * The connector's side of the shared-key handshake: resolves once both sides
 * have proven they hold `key`.
 */
export async function connectWithKey(raw: Transport, key: Uint8Array, options: KeyOptions = {}): Promise<Transport> {
  const wire = new Wire(raw, options.timeoutMs, "the listener closed the connection during the handshake (wrong key?)");
  return run(wire, async () => {
    const k = keyOf(key);
    const m1 = await wire.read(1 + HANDSHAKE.NONCE);
    checkVersion(m1[0], "the listener");
    const nonceL = m1.slice(1);
    const nonceC = nacl.randomBytes(HANDSHAKE.NONCE);
    raw.write([new Uint8Array([HANDSHAKE.VERSION]), nonceC, nacl.secretbox(keyProof(LABEL.KEY_CONNECTOR, nonceL, nonceC), nonceL, k)]);
    const m3 = await wire.read(KEY_BOX);
    const opened = nacl.secretbox.open(m3, nonceC, k);
    if (!opened || !nacl.verify(opened, keyProof(LABEL.KEY_LISTENER, nonceL, nonceC)))
      throw new HandshakeError(HANDSHAKE_FAILURE.WRONG_KEY, "the listener's answer does not open with the key");
    return plain(wire);
  });
}

// ---------------------------------------------------------------------------
// key pairs (TCP): the handshake, then sealed frames

/** Message sizes of the sealed handshake. */
const SEALED = {
  /** client -> server: version | client ephemeral | client static. */
  HELLO: 1 + 2 * HANDSHAKE.KEY,
  /** server -> client: version | server ephemeral | server static | box. */
  WELCOME: 1 + 2 * HANDSHAKE.KEY + HANDSHAKE.HASH + HANDSHAKE.TAG,
  /** client -> server: box. */
  PROOF: HANDSHAKE.HASH + HANDSHAKE.TAG,
} as const;

interface Session {
  /** SHA-512 of the transcript. */
  h: Uint8Array;
  /** box.before of the static keys. */
  statics: Uint8Array;
  /** box.before of the ephemeral keys. */
  ephemerals: Uint8Array;
}

/** h = SHA-512("mitogen sealed v1" | ce | cs | se | ss). */
const transcript = (ce: Uint8Array, cs: Uint8Array, se: Uint8Array, ss: Uint8Array): Uint8Array => nacl.hash(concat([ascii(LABEL.SEALED), ce, cs, se, ss]));

function session(
  ce: Uint8Array,
  cs: Uint8Array,
  se: Uint8Array,
  ss: Uint8Array,
  peerEphemeral: Uint8Array,
  peerStatic: Uint8Array,
  mine: { e: Uint8Array; s: Uint8Array },
): Session {
  return {
    h: transcript(ce, cs, se, ss),
    statics: nacl.box.before(peerStatic, mine.s),
    ephemerals: nacl.box.before(peerEphemeral, mine.e),
  };
}

/** The two directional keys: SHA-512(label | ephemeral DH | static DH | h), first 32 bytes. */
function directionKey(s: Session, label: string): Uint8Array {
  return nacl.hash(concat([ascii(label), s.ephemerals, s.statics, s.h])).slice(0, HANDSHAKE.KEY);
}

/** Set `nonce` to a sealed frame's nonce: the frame's counter, 24 bytes big-endian. */
function counterNonce(nonce: Uint8Array, n: number): Uint8Array {
  put32(nonce, 16, Math.floor(n / 2 ** 32));
  put32(nonce, 20, n >>> 0);
  return nonce;
}

/**
 * tweetnacl's secretbox on padded buffers, which works in place:
 * `crypto_secretbox` takes 32 zero bytes then the plaintext and leaves 16 zero
 * bytes, the tag, then the ciphertext; `crypto_secretbox_open` takes 16 zero
 * bytes, the tag, the ciphertext and leaves 32 zero bytes then the plaintext.
 * Both return 0, or -1 (a box that does not open). `nacl.secretbox` copies
 * into fresh padded buffers and back, a third of its cost on small frames.
 */
const secretboxInPlace = (
  nacl as unknown as {
    lowlevel: Record<
      "crypto_secretbox" | "crypto_secretbox_open",
      (out: Uint8Array, input: Uint8Array, length: number, nonce: Uint8Array, key: Uint8Array) => number
    >;
  }
).lowlevel;
/** Zero bytes before the plaintext of a padded secretbox buffer; the tag starts halfway. */
const ZEROS = 32;
/** @internal Where a box read off the wire goes in its buffer: after the zero bytes that `crypto_secretbox_open` wants. */
export const BOX_AT: number = ZEROS - HANDSHAKE.TAG;

/** @internal The sealed frame of `parts` (their bytes in order), `length u32 BE | nacl.secretbox(bytes, nonce, key)`: one buffer, sealed in place. */
export function sealFrame(parts: readonly Uint8Array[], nonce: Uint8Array, key: Uint8Array): Uint8Array {
  let at = ZEROS;
  for (const p of parts) at += p.byteLength;
  const buf = new Uint8Array(at);
  at = ZEROS;
  for (const p of parts) {
    buf.set(p, at);
    at += p.byteLength;
  }
  secretboxInPlace.crypto_secretbox(buf, buf, buf.byteLength, nonce, key);
  // The length goes in the last 4 of the 16 zero bytes before the tag.
  put32(buf, BOX_AT - 4, buf.byteLength - BOX_AT);
  return buf.subarray(BOX_AT - 4);
}

/** @internal Open in place the box in `buf` from {@link BOX_AT} on (the bytes before it zero): its plaintext, a view of `buf`, or null. */
export function openInPlace(buf: Uint8Array, nonce: Uint8Array, key: Uint8Array): Uint8Array | null {
  return secretboxInPlace.crypto_secretbox_open(buf, buf, buf.byteLength, nonce, key) === 0 ? buf.subarray(ZEROS) : null;
}

/** Biggest box of a sealed frame. */
const MAX_BOX = HANDSHAKE.MAX_CHUNK + HANDSHAKE.TAG;

/**
 * A transport that seals every write with `sendKey` and opens every frame
 * with `receiveKey`:
 *
 *     length u32 BE | nacl.secretbox(chunk, counter nonce, key)     length = chunk + 16 <= 1 MiB + 16
 *
 * A frame over the limit, or one that does not open (tampered, replayed,
 * reordered: the counter then differs), closes the raw transport and ends
 * this one with a StreamError.
 */
function sealed(wire: Wire, sendKey: Uint8Array, receiveKey: Uint8Array): Transport {
  const raw = wire.raw;
  let sent = 0;
  let received = 0;
  const sendNonce = new Uint8Array(HANDSHAKE.NONCE);
  const receiveNonce = new Uint8Array(HANDSHAKE.NONCE);
  let broken = false;
  // A write becomes frames of up to MAX_CHUNK bytes, small parts joined: each byte is copied once, into its frame.
  const after = new After(raw, (parts) => {
    if (broken) return;
    const frames: Uint8Array[] = [];
    let group: Uint8Array[] = [];
    let size = 0;
    const seal = (): void => {
      if (size) frames.push(sealFrame(group, counterNonce(sendNonce, sent++), sendKey));
      group = [];
      size = 0;
    };
    for (let p of parts) {
      while (size + p.byteLength > HANDSHAKE.MAX_CHUNK) {
        const take = HANDSHAKE.MAX_CHUNK - size;
        group.push(p.subarray(0, take));
        size += take;
        seal();
        p = p.subarray(take);
      }
      if (p.byteLength) {
        group.push(p);
        size += p.byteLength;
      }
    }
    seal();
    if (frames.length) raw.write(frames);
  });
  // The frame being read: its 4-byte length, then its box, filled in and opened in place (see openInPlace).
  const head = new Uint8Array(4);
  let headFill = 0;
  let box: Uint8Array | null = null;
  let boxFill = 0;
  const breakWith = (message: string): void => {
    broken = true;
    after.end(new StreamError(`sealed transport: ${message}`));
    raw.close();
  };
  const onData = (chunk: Uint8Array): void => {
    let at = 0;
    while (at < chunk.byteLength && !broken) {
      if (!box) {
        while (headFill < 4 && at < chunk.byteLength) head[headFill++] = chunk[at++] as number;
        if (headFill < 4) return;
        headFill = 0;
        const length = get32(head, 0);
        if (length > MAX_BOX || length <= HANDSHAKE.TAG) {
          breakWith(`a frame of ${length} bytes is outside 17..${MAX_BOX}`);
          return;
        }
        box = new Uint8Array(BOX_AT + length);
        boxFill = BOX_AT;
      }
      const n = Math.min(box.byteLength - boxFill, chunk.byteLength - at);
      box.set(chunk.subarray(at, at + n), boxFill);
      boxFill += n;
      at += n;
      if (boxFill < box.byteLength) return;
      const opened = openInPlace(box, counterNonce(receiveNonce, received++), receiveKey);
      box = null;
      if (!opened) {
        breakWith("a frame did not open (tampered, replayed or out of order)");
        return;
      }
      after.deliver(opened);
    }
  };
  wire.done(onData, (err) => {
    broken = true;
    after.end(err);
  });
  return after;
}

/**
 * The listener's key material, checked and derived once: its static pair
 * (the public key checked against the secret's) and the authorized keys,
 * each decoded once, its static box.before computed on first use and kept.
 */
export interface SealedServer {
  /** The listener's side of the key-pair handshake over `raw` (see {@link acceptSealed}). */
  accept(raw: Transport, timeoutMs?: number): Promise<{ transport: Transport; clientKey: string }>;
}

/**
 * Check `options` (a HandshakeError naming the bad value, at once) and keep
 * what every handshake would otherwise derive again: a HELLO then costs a map
 * lookup if its key is not authorized, one scalar multiplication (the fresh
 * ephemeral pair) if it is; the ephemeral box.before waits for the client's proof.
 */
export function sealedServer(options: Omit<AcceptSealedOptions, "timeoutMs">): SealedServer {
  const me = staticPair(options.keyPair);
  if (!Array.isArray(options.authorizedKeys)) throw new HandshakeError(HANDSHAKE_FAILURE.MALFORMED, "authorizedKeys is not an array of base64 keys");
  /** Each authorized key (base64) and, once a client used it, S = box.before(it, my static secret). */
  const authorized = new Map<string, Uint8Array | null>();
  options.authorizedKeys.forEach((k, i) => {
    key32(k, `authorizedKeys[${i}] (${JSON.stringify(String(k).slice(0, 60))})`);
    authorized.set(k, null);
  });
  const staticsOf = (clientKey: string, cs: Uint8Array): Uint8Array => {
    let s = authorized.get(clientKey);
    if (!s) authorized.set(clientKey, (s = nacl.box.before(cs, me.secretKey)));
    return s;
  };
  return {
    accept(raw, timeoutMs) {
      const wire = new Wire(raw, timeoutMs, "the client closed the connection during the handshake");
      return run(wire, async () => {
        const hello = await wire.read(SEALED.HELLO);
        checkVersion(hello[0], "the client");
        const ce = hello.slice(1, 33);
        const cs = hello.slice(33, 65);
        const clientKey = toBase64(cs);
        if (!authorized.has(clientKey)) throw new HandshakeError(HANDSHAKE_FAILURE.UNAUTHORIZED, clientKey);
        const eph = nacl.box.keyPair();
        const h = transcript(ce, cs, eph.publicKey, me.publicKey);
        const statics = staticsOf(clientKey, cs);
        const proof = nacl.secretbox(h, h.subarray(0, HANDSHAKE.NONCE), statics);
        raw.write([new Uint8Array([HANDSHAKE.VERSION]), eph.publicKey, me.publicKey, proof]);
        const answer = await wire.read(SEALED.PROOF);
        const opened = nacl.secretbox.open(answer, h.subarray(HANDSHAKE.NONCE, 2 * HANDSHAKE.NONCE), statics);
        if (!opened || !nacl.verify(opened, h)) throw new HandshakeError(HANDSHAKE_FAILURE.WRONG_KEY, `the client's proof for ${clientKey} does not open`);
        const s: Session = { h, statics, ephemerals: nacl.box.before(ce, eph.secretKey) };
        return { transport: sealed(wire, directionKey(s, LABEL.SEALED_S2C), directionKey(s, LABEL.SEALED_C2S)), clientKey };
      });
    },
  };
}

/**
 * The listener's side of the key-pair handshake: resolves with the sealed
 * transport and the client's public key (base64), once the client proved it
 * holds the secret key of one of `authorizedKeys`. A listener that accepts
 * many connections makes one {@link sealedServer} instead.
 */
export async function acceptSealed(raw: Transport, options: AcceptSealedOptions): Promise<{ transport: Transport; clientKey: string }> {
  let server: SealedServer;
  try {
    server = sealedServer(options);
  } catch (err) {
    raw.close();
    throw err;
  }
  return server.accept(raw, options.timeoutMs);
}

/**
 * The client's side of the key-pair handshake: resolves with the sealed
 * transport once the listener proved it holds `serverKey`'s secret key.
 */
export async function connectSealed(raw: Transport, options: ConnectSealedOptions): Promise<Transport> {
  const wire = new Wire(raw, options.timeoutMs, "the server closed the connection during the handshake (is this client's key authorized?)");
  return run(wire, async () => {
    const me = staticPair(options.keyPair);
    const pinned = key32(options.serverKey, "serverKey");
    const eph = nacl.box.keyPair();
    raw.write([new Uint8Array([HANDSHAKE.VERSION]), eph.publicKey, me.publicKey]);
    const welcome = await wire.read(SEALED.WELCOME);
    checkVersion(welcome[0], "the server");
    const se = welcome.slice(1, 33);
    const ss = welcome.slice(33, 65);
    if (!nacl.verify(ss, pinned)) throw new HandshakeError(HANDSHAKE_FAILURE.SERVER_KEY, `the server has ${toBase64(ss)}`);
    const s = session(eph.publicKey, me.publicKey, se, ss, se, ss, { e: eph.secretKey, s: me.secretKey });
    const opened = nacl.secretbox.open(welcome.subarray(65), s.h.subarray(0, HANDSHAKE.NONCE), s.statics);
    if (!opened || !nacl.verify(opened, s.h)) throw new HandshakeError(HANDSHAKE_FAILURE.SERVER_KEY, "the server's proof does not open with the pinned key");
    raw.write([nacl.secretbox(s.h, s.h.subarray(HANDSHAKE.NONCE, 2 * HANDSHAKE.NONCE), s.statics)]);
    return sealed(wire, directionKey(s, LABEL.SEALED_C2S), directionKey(s, LABEL.SEALED_S2C));
  });
}
