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

  constructor(message?: string, options?: ErrorOptions) {
    super(message, options);
    // Runtimes before ES2022's `cause` (Node < 16.9) ignore the option: set it as newer ones do.
    if (options && "cause" in options && !("cause" in this)) Object.defineProperty(this, "cause", { value: options.cause, writable: true, configurable: true });
  }
}

/**
 * A remote function threw. `remoteName` is the class name of the remote error,
 * `remoteStack` its stack as printed by the remote runtime (with the context
 * path prepended), and `message` reads `Name: message`.
 *
 * @example
 * ```ts
 * import { CallError } from "mitogen";
 * const err = new CallError("TypeError", "x is not a function", "TypeError: x ...");
 * console.log(err.remoteName, err.message); // TypeError TypeError: x is not a function
 * ```
 */
export class CallError extends MitogenError {
  override name = "CallError";
  /** Class name of the error thrown remotely. */
  readonly remoteName: string;
  /** The remote error's own message (`message` is `remoteName: remoteMessage`). */
  readonly remoteMessage: string;
  /** The remote stack trace, as text. */
  readonly remoteStack: string;

  constructor(remoteName: string, message: string, remoteStack = "", options?: ErrorOptions) {
    super(`${remoteName}: ${message}`, options);
    this.remoteName = remoteName;
    this.remoteMessage = message;
    this.remoteStack = remoteStack;
    if (remoteStack) this.stack = `${this.stack ?? ""}\n--- remote stack ---\n${remoteStack}`;
  }

  /**
   * Build a CallError from anything thrown by user code. Never throws: of a
   * value whose fields cannot be read (a Proxy whose traps throw, a getter
   * that throws, a Symbol `name`) it says what can be read.
   */
  static fromThrown(thrown: unknown, where: string): CallError {
    let kind = 0; // 2 CallError, 1 other Error, 0 anything else
    let options: ErrorOptions | undefined;
    try {
      kind = thrown instanceof CallError ? 2 : thrown instanceof Error ? 1 : 0;
      if (kind && "cause" in (thrown as Error)) options = { cause: (thrown as Error).cause };
    } catch {
      // unreadable: a revoked Proxy, a trap that throws
    }
    if (!kind) return new CallError("Error", `non-Error thrown: ${safeString(thrown)}`, `[${where}]`, options);
    const read = (key: string, fallback: string): string => {
      try {
        const v = (thrown as Record<string, unknown>)[key];
        return typeof v === "string" ? v : v === undefined ? fallback : safeString(v, Infinity);
      } catch {
        return fallback;
      }
    };
    const name = read(kind === 2 ? "remoteName" : "name", "Error");
    const message = read("message", "(message could not be read)");
    if (kind === 2) return new CallError(name, message.startsWith(`${name}: `) ? message.slice(name.length + 2) : message, read("remoteStack", ""), options);
    return new CallError(name, message, `[${where}] ${read("stack", `${name}: ${message} (stack could not be read)`)}`, options);
  }
}

/** A channel died: the peer closed it, or the context behind it is gone. */
export class ChannelError extends MitogenError {
  override name = "ChannelError";
}

/**
 * A Latch was used after `close()` (Mitogen's `mitogen.core.LatchError`):
 * its `get()`, `put()`, `size()` and `empty()` throw it, and so do a closed
 * Receiver's `size()` and `empty()` and a closed Select's `empty()`. A closed
 * Receiver's `get()` throws ChannelError, as Mitogen's. Not a ChannelError:
 * as in Mitogen, the two are siblings under MitogenError.
 *
 * @example
 * ```ts
 * import { Latch, LatchError } from "mitogen";
 * const latch = new Latch();
 * latch.close();
 * try {
 *   latch.size();
 * } catch (err) {
 *   console.log(err instanceof LatchError); // true
 * }
 * ```
 */
export class LatchError extends MitogenError {
  override name = "LatchError";
}

/**
 * A Select was misused (Mitogen's `mitogen.select.Error`): a cycle of
 * Selects, a source that belongs to another Select, removing what is not a
 * member, or `get()` on a Select with no members.
 *
 * @example
 * ```ts
 * import { Select, SelectError } from "mitogen";
 * const sel = new Select();
 * await sel.get().catch((err) => console.log(err instanceof SelectError, err.message));
 * // true Cannot get(), Select instance is empty
 * ```
 */
export class SelectError extends MitogenError {
  override name = "SelectError";
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

/**
 * @internal Make each class's own name its constructor's name too. Minified
 * bundles (the child payload, shipped modules) rename classes, and Node's and
 * Deno's `inspect()` (so `console.log(err)`) print the constructor's name
 * beside `name`: `w [ChannelError]: ...` without this.
 */
export function keepErrorNames(classes: Record<string, unknown>): void {
  for (const name in classes) Object.defineProperty(classes[name], "name", { value: name, configurable: true });
}

keepErrorNames({ MitogenError, CallError, ChannelError, LatchError, SelectError, AbortError, StreamError, TimeoutError });

function safeString(value: unknown, max = 200): string {
  try {
    return String(value).slice(0, max);
  } catch (err) {
    try {
      return `(${Object.prototype.toString.call(value)} that cannot be printed)`;
    } catch {
      let why = "";
      try {
        why = `: ${String(err).slice(0, max)}`;
      } catch {
        // nothing more to say
      }
      return `(an unreadable ${typeof value}${why})`;
    }
  }
}
