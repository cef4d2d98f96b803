/**
 * The error classes every context shares. They cross the wire by name (see
 * `codec.ts`), so a `ChannelError` thrown in a child is a `ChannelError` in the
 * master too.
 *
 * @module
 */

/** Base class of every error mitogen raises. */
export class MitogenError extends Error {
  override name = "MitogenError";
}

/**
 * A remote function threw. `remoteName` is the class name of the remote error,
 * `remoteStack` its stack as printed by the remote runtime (with the context
 * path prepended), and `message` reads `Name: message`.
 *
 * @example
 * ```ts
 * import { CallError } from "./errors.ts";
 * const err = new CallError("TypeError", "x is not a function", "TypeError: x ...");
 * console.log(err.remoteName, err.message); // TypeError TypeError: x is not a function
 * ```
 */
export class CallError extends MitogenError {
  override name = "CallError";
  /** Class name of the error thrown remotely. */
  readonly remoteName: string;
  /** The remote stack trace, as text. */
  readonly remoteStack: string;

  constructor(remoteName: string, message: string, remoteStack = "", options?: ErrorOptions) {
    super(`${remoteName}: ${message}`, options);
    this.remoteName = remoteName;
    this.remoteStack = remoteStack;
    if (remoteStack) this.stack = `${this.stack ?? ""}\n--- remote stack ---\n${remoteStack}`;
  }

  /** Build a CallError from something thrown by user code. */
  static fromThrown(thrown: unknown, where: string): CallError {
    if (thrown instanceof CallError) {
      const options = "cause" in thrown ? { cause: thrown.cause } : undefined;
      return new CallError(thrown.remoteName, thrown.message.slice(thrown.remoteName.length + 2), thrown.remoteStack, options);
    }
    if (thrown instanceof Error) {
      const options = "cause" in thrown ? { cause: thrown.cause } : undefined;
      return new CallError(thrown.name, thrown.message, `[${where}] ${thrown.stack ?? String(thrown)}`, options);
    }
    return new CallError("Error", `non-Error thrown: ${safeString(thrown)}`, `[${where}]`);
  }
}

/** A channel died: the peer closed it, or the context behind it is gone. */
export class ChannelError extends MitogenError {
  override name = "ChannelError";
}

/** A call was cancelled through its AbortSignal. */
export class AbortError extends MitogenError {
  override name = "AbortError";
}

/** A stream could not be established, or broke (bad frame, EOF, oversized frame). */
export class StreamError extends MitogenError {
  override name = "StreamError";
}

/** Something took longer than its timeout. */
export class TimeoutError extends MitogenError {
  override name = "TimeoutError";
}

function safeString(value: unknown): string {
  try {
    return String(value).slice(0, 200);
  } catch {
    return Object.prototype.toString.call(value);
  }
}
