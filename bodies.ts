/**
 * The bodies of the reserved handles the payload sends or reads: for each, its type, its layout (as
 * PROTOCOL.md's "Bodies of the reserved handles" gives it), and one {@link Body}: `encode` makes the
 * message to its handle, `decode` reads one. Bodies of one scalar (GET_MODULE's name, CANCEL_CALL's
 * handle) or none (ALLOCATE_ID, SHUTDOWN) have no codec; FORWARD_MODULE's is listen.ts's. Part of the
 * child payload.
 *
 * `decode` gives the body as its sender wrote it, unchecked: a receiver checks what a peer could
 * have got wrong where it uses the field.
 *
 * @module
 */
import { HANDLE, Message, type MessageFields } from "./frames.ts";
import type { LogLevel, LogSource } from "./logapi.ts";

/** The codec of one reserved handle's body `T`. */
export interface Body<T> {
  /** A message to the handle, carrying `body`, with `fields` (dst, src...) set. */
  encode(body: T, fields?: MessageFields): Message;
  /** The body of a message to the handle. */
  decode(msg: Message): T;
}

/**
 * The Body of `handle`, whose data is `T` encoded as it is. With `args`, a body that cannot be encoded
 * is named by the path below its third field, under that name (CALL_FUNCTION's `args[1].cb`).
 */
export const body = <T>(handle: number, args?: string): Body<T> => ({
  encode: (b, fields) => Message.encoded(b, { ...fields, handle }, args, args && (b as unknown[])[2]),
  decode: (msg) => msg.unpickle() as T,
});

// ---------------------------------------------------------------------------
// CALL_FUNCTION (101)
//
//   [kind, target, args, flags?, limits?, chain?]
//
//   kind     0 SOURCE  target: a function's source              reply: its result
//            1 MODULE  target: "<module>#<export>", split at the last "#"   reply: its result
//            2 LOAD    target: a module name, args []           reply: its exported function names
//            3 FORGET  target "", args [], in a chain: clear its latched error   no reply
//   flags    bit 0 TAKES_ROUTER; left out or undefined: 0
//   limits   { timeout?: ms, cancel?: true }; left out or undefined: none
//   chain    the caller's number for a CallChain: calls of one (src_id, chain) run one after
//            another, in the order sent; left out or undefined: none (the call runs at once)
//
// Trailing fields may be left out: the commonest call is [0, source, args].

/** Kinds of CALL_FUNCTION body, and its flags. */
export const CALL = {
  /** target: a function's source. */
  SOURCE: 0,
  /** target: `module#export`, a function exported by a shipped module. */
  MODULE: 1,
  /** target: a module name; load it and answer with its exported function names. */
  LOAD: 2,
  /** In a chain: forget the error it latched (CallChain.reset). */
  FORGET: 3,
  /** flags bit: hand the function `{ router, econtext }` as an extra last argument. */
  TAKES_ROUTER: 1,
} as const;

/** The wire form of CallOptions, last in a CALL_FUNCTION body. */
export type CallLimits = { timeout?: number; cancel?: true };

/** A CALL_FUNCTION body. */
export type CallBody = [kind: number, target: string, args: unknown[], flags?: number, limits?: CallLimits | undefined, chain?: number];

/** A MODULE call's target: `<module>#<export>`. */
export const moduleTarget = (target: string): [module: string, name: string] => {
  const hash = target.lastIndexOf("#");
  return [target.slice(0, hash), target.slice(hash + 1)];
};

/** CALL_FUNCTION: a body that cannot be encoded is named by its argument (`args[1].cb`). */
export const callBody: Body<CallBody> = body(HANDLE.CALL_FUNCTION, "args");

// ---------------------------------------------------------------------------
// CALL_SERVICE (110), to the context serving the service
//
//   [service, method, args, limits?]
//
//   service  the name it was defined (and, at the master, registered) under
//   method   one of its methods' names
//   args     the one argument of the method, any value (checked by the method's `args`)
//   limits   as CALL_FUNCTION's (CANCEL_CALL cancels it too); left out or undefined: none
//   reply    the method's result; a noReply method's caller hears nil once the call is admitted;
//            reply_to 0: no answer at all (callServiceNoReply)

/** A CALL_SERVICE body. */
export type ServiceBody = [service: string, method: string, args: unknown, limits?: CallLimits];

/** CALL_SERVICE: a body that cannot be encoded is named by its argument (`args.cb`). */
export const serviceBody: Body<ServiceBody> = body(HANDLE.CALL_SERVICE, "args");

// ---------------------------------------------------------------------------
// FORWARD_LOG (102), to the master, reply_to 0
//
//   [contextId, name, level, source, message, path, time, data, category?]
//
//   level    debug, info, warn, error          time   ms since the epoch, the sender's clock
//   source   log, user, stdout, stderr         data   any value, or its JSON text cut at 64 KiB
//   category the logger's name; left out when it is its source's default
//            (log: "mitogen", user: "user", stdout: "stdout", stderr: "stderr")

/** A FORWARD_LOG body. */
export type LogBody = [
  contextId: number,
  name: string,
  level: LogLevel,
  source: LogSource,
  message: string,
  path: string[],
  time: number,
  data: unknown,
  category?: string,
];

/** FORWARD_LOG. */
export const logBody: Body<LogBody> = body(HANDLE.FORWARD_LOG);

// ---------------------------------------------------------------------------
// ADD_ROUTE (103), to the immediate parent, passed on unchanged up to the master
//
//   [id, name, parent, runtime, method?]
//
//   runtime  "node 12.22.12", "deno 2.9.6", "session", or nil
//   method   how it was started: "local", "ssh", "sudo", "docker"..., "session"; nil or left out: not known

/** An ADD_ROUTE body. */
export type AddRouteBody = [id: number, name: string, parent: number, runtime: string | null, method?: string | null];

/** ADD_ROUTE. */
export const addRouteBody: Body<AddRouteBody> = body(HANDLE.ADD_ROUTE);

// ---------------------------------------------------------------------------
// DEL_ROUTE (104), up from the stream that routes `id`, or down to children that talked to it
//
//   [id, reason]

/** A DEL_ROUTE body. */
export type DelRouteBody = [id: number, reason: string];

/** DEL_ROUTE. */
export const delRouteBody: Body<DelRouteBody> = body(HANDLE.DEL_ROUTE);

// ---------------------------------------------------------------------------
// LOAD_MODULE (107), from a parent, hop by hop toward `to`: what `to` is about to need
//
//   [to, modules, ids]
//
//   modules  [name, code][]: code the raw-deflated script, or nil where the receiving hop holds it
//   ids      ids of children `to` is about to start: each hop routes them toward `to` until
//            announced; `to` holds the messages for each until it is connected

/** A LOAD_MODULE body. */
export type LoadModuleBody = [to: number, modules: [name: string, code: Uint8Array | null][], ids: number[]];

/** LOAD_MODULE. */
export const loadModuleBody: Body<LoadModuleBody> = body(HANDLE.LOAD_MODULE);

// ---------------------------------------------------------------------------
// CONFIGURE (112), the first frame from a parent to a new child (or a listener to a session)
//
//   { contextId, parentIds, name, path, maxMessageSize, unidirectional, debug, parentPid?, codeCache? }
//   a session's: { contextId, parentIds, name, path, maxMessageSize, listener }

/** The configuration a parent sends a new child in its first frame (CONFIGURE). */
export interface ChildConfig {
  contextId: number;
  /** Every parent, the nearest first, the master (0) last. */
  parentIds: number[];
  name: string;
  maxMessageSize: number;
  /** The parent's unidirectional mode (not in a session's). */
  unidirectional?: boolean;
  /** Forward debug-level log records (not in a session's). */
  debug?: boolean;
  /** Names from the master down to this context. */
  path: string[];
  /** The parent context's pid, when it runs on the same machine (local, sudo, su, doas). */
  parentPid?: number;
  /** A handle of the parent's: send it V8's code cache of the core (only a core compiled by the parent's loader can). */
  codeCache?: number;
  /** A session's only: the name of the listener it attached to. */
  listener?: string;
}

/** CONFIGURE. */
export const configureBody: Body<ChildConfig> = body(HANDLE.CONFIGURE);
