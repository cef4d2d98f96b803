/**
 * fakessh's wire: what `fakessh.run` (fakessh.ts) and its `ssh` stand-in
 * (fakessh-standin.ts) say to each other over the run's unix socket.
 *
 * The socket's frames, after the handshake (big-endian):
 *
 *     type u8 | length u32 | bytes          types: FAKESSH
 *
 * The handshake is handshake.ts's shared-key one (`acceptWithKey`,
 * `connectWithKey`: each side proves it holds the run's one-time key). The
 * stand-in's first frame is REQUEST: `nonce (24) | secretbox(JSON request,
 * nonce, key)`. A failed handshake, or a first frame that is not a REQUEST
 * that opens, ends the connection. EXIT, after all output, starts the close
 * handshake: the stand-in closes its end, the run side reads on until it has
 * (PROTOCOL.md).
 *
 * @module
 */
import type { Socket } from "node:net";
import nacl from "tweetnacl";
import { MitogenError } from "./errors.ts";
import { Chunks } from "./chunks.ts";

/** Frame types on the stand-in's socket. */
export const FAKESSH = {
  /** stand-in -> run: bytes for the remote command's stdin. */
  STDIN: 1,
  /** stand-in -> run: the stand-in's stdin ended. */
  EOF: 2,
  /** run -> stand-in: bytes of the remote command's stdout. */
  STDOUT: 3,
  /** run -> stand-in: bytes of the remote command's stderr. */
  STDERR: 4,
  /** run -> stand-in: the exit status (u32), the run side's last frame; the stand-in then closes its end. */
  EXIT: 5,
  /** run -> stand-in: why the command could not run (UTF-8), before EXIT 255. */
  ERROR: 6,
  /** stand-in -> run, first frame: nonce (24) | secretbox(JSON request, nonce, key). */
  REQUEST: 7,
} as const;

/** The biggest frame either side accepts (stdin chunks are cut to fit). */
export const MAX_FRAME = 1 << 20;
/** The nonce of the sealed REQUEST. */
export const NONCE = nacl.secretbox.nonceLength;
/** A stand-in that has not proven the key by then is dropped. */
export const HANDSHAKE_MS = 10_000;
/** The exit status of ssh itself failing (OpenSSH's). */
export const SSH_FAILED = 255;

/** What the stand-in asks for: the command line and the destination ssh was given. */
export interface FakesshRequest {
  host: string;
  user: string | null;
  port: number | null;
  /** The remote command, as ssh sends it: its words joined by spaces. */
  command: string;
  /** Variables named by `-o SendEnv=` that were set (git's GIT_PROTOCOL). */
  env: Record<string, string>;
}

/** Variables of the run itself (its key, its socket, the stand-in's role): never sent to a remote command. */
export const isPrivate = (name: string): boolean => name.startsWith("MITOGEN_FAKESSH") || name === "MITOGEN_ROLE";

/** One frame: `type u8 | length u32 | body`. */
export function frame(type: number, body: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(5 + body.byteLength);
  out[0] = type;
  new DataView(out.buffer).setUint32(1, body.byteLength);
  out.set(body, 5);
  return out;
}

/**
 * Splits a byte stream into frames (type u8 | length u32 | bytes), refusing any over `max`. Chunks
 * are kept as they came until a frame is whole (see {@link Chunks}), then taken once: a frame
 * spread over many chunks is not joined again with each one.
 */
export class FrameReader {
  readonly #in = new Chunks();
  readonly max: number;
  constructor(max: number) {
    this.max = max;
  }

  /** Add `chunk`; returns the frames now complete. Throws on a frame over the limit. */
  push(chunk: Uint8Array): { type: number; body: Uint8Array }[] {
    this.#in.push(chunk);
    const frames: { type: number; body: Uint8Array }[] = [];
    while (this.#in.size >= 5) {
      const head = this.#in.take(5);
      const length = new DataView(head.buffer, head.byteOffset, 5).getUint32(1);
      if (length > this.max) throw new MitogenError(`fakessh: a frame of ${length} bytes is over the ${this.max} limit`);
      if (this.#in.size < length) {
        this.#in.unshift(head);
        break;
      }
      frames.push({ type: head[0] as number, body: this.#in.take(length) });
    }
    return frames;
  }
}

/** UTF-8 both ways. */
export const text: TextEncoder = new TextEncoder();
export const untext: TextDecoder = new TextDecoder();

/** Resolves once `socket` drains or closes. */
export function waitDrain(socket: Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      socket.off("drain", done);
      socket.off("close", done);
      resolve();
    };
    socket.on("drain", done);
    socket.on("close", done);
  });
}
