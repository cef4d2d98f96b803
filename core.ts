/**
 * The child payload's entry: every child runs this file and what it imports (`npm run build` prints
 * the list, and its size, which is a budget). It holds no code of its own: its exports are the
 * running core, what `import ... from "mitogen"` means in a shipped module (see evaluateModule in
 * calls.ts), and the build calls {@link childMain} (child.ts) on them.
 *
 * The payload's floors, lowest first: a file imports only files on floors below its own, not even a
 * type from above (`npm run cycles` prints the whole repository's):
 *
 *   0  errors (error classes), roles (isMaster, contextId...), logapi (log, LogRecord), runtime (shims)
 *   1  bytes (allocator, views), watchdog (the parent watchdog)
 *   2  chunks (unread input), codec (values on the wire), transport (Transport over streams)
 *   3  frames (handles, header, Message)
 *   4  stream (frames over a Transport), flow (credit windows), select (Latch, Select),
 *      bodies (the reserved handles' bodies)
 *   5  calls (making calls, shipped code), channels (Receiver, Sender, Channel)
 *   6  context (Context, CallScope)
 *   7  options (types: the connection methods' and listeners' options)
 *   8  router (Router)
 *   9  dispatch (serving calls)
 *  10  child (childMain)
 *
 * @module
 */
// What shipped modules and user code may take from "mitogen" in a child; names only the payload's
// own files use are left out (each export is a name the payload carries). The build checks that
// every name a shipped module imports from a payload file is here.
export * from "./errors.ts";
export { Secret } from "./codec.ts";
export type { Binder, Encoded, WireRef } from "./codec.ts";
export { Abort, asyncDispose, builtin, compiledDeno, deno, isDeno, nodeProcess, positionalIo, runtimeCommand } from "./runtime.ts";
export type { Compilers, DenoStdio, RuntimeCommand } from "./runtime.ts";
export { get32, joinParts, put32 } from "./bytes.ts";
export * from "./chunks.ts";
export { nodeTransport } from "./transport.ts";
export type { Boot, Transport } from "./transport.ts";
export { PDEATHSIG_ENV } from "./watchdog.ts";
export { CORE, DEFAULT_MAX_MESSAGE_SIZE, FIRST_DYNAMIC_HANDLE, HANDLE, handleName, MARKER, Message } from "./frames.ts";
export type { MessageFields, MessageHost, MessageRecipient } from "./frames.ts";
export * from "./stream.ts";
export type { FlowHost } from "./flow.ts";
export { Latch, Select } from "./select.ts";
export type { GetOptions, Selectable, SelectEvent } from "./select.ts";
export * from "./channels.ts";
export { contextId, isMaster, parentId, parentIds } from "./roles.ts";
export { log, logRecordOf, setActiveRouter } from "./logapi.ts";
export type { LogHost, LogLevel, LogRecord, LogSource } from "./logapi.ts";
export { configureBody, serviceBody } from "./bodies.ts";
export type { AddRouteBody, Body, CallBody, CallLimits, ChildConfig, DelRouteBody, LogBody, ServiceBody } from "./bodies.ts";
export { evaluateModule, replyError, replySafely, takesEcontext, takesRouter } from "./calls.ts";
export type { ArgsIn, ArgsOut, ArgSpec, CallContextShape, CallOptions, Shippable, StandardResult, StandardSchemaV1 } from "./calls.ts";
export * from "./context.ts";
export type * from "./options.ts";
export * from "./router.ts";
export { installDispatcher } from "./dispatch.ts";
export type { CallContext } from "./dispatch.ts";
export * from "./child.ts";
