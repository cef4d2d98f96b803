/**
 * The child payload's entry: every child runs this file and what it imports (`npm run build` prints
 * the list, and its size, which is a budget). It holds no code of its own: its exports are the
 * running core, what `import ... from "mitogen"` means in a shipped module (see evaluateModule in
 * calls.ts), and the build calls {@link childMain} (child.ts) on them.
 *
 * The floors, lowest first (a file imports only files on floors below its own):
 * errors, roles, logapi; runtime; codec; frames (header, Message); stream, flow; select (Latch,
 * Select); channels (Receiver, Sender, Channel); calls (the CALL_FUNCTION body, shipped code);
 * context (Context, CallScope); options (types); router; dispatch (serving calls); child.
 *
 * @module
 */
export * from "./errors.ts";
export * from "./codec.ts";
export * from "./runtime.ts";
export * from "./frames.ts";
export * from "./stream.ts";
export * from "./flow.ts";
export { Latch, Select } from "./select.ts";
export type { GetOptions, Selectable, SelectEvent } from "./select.ts";
export * from "./channels.ts";
export { contextId, isMaster, parentId, parentIds } from "./roles.ts";
export { log, logRecordOf, setActiveRouter } from "./logapi.ts";
export type { LogHost, LogLevel, LogRecord, LogSource } from "./logapi.ts";
export { CALL, evaluateModule, takesEcontext, takesRouter } from "./calls.ts";
export type { CallContextShape, CallLimits, CallOptions, Shippable } from "./calls.ts";
export * from "./context.ts";
export type * from "./options.ts";
export * from "./router.ts";
export { installDispatcher } from "./dispatch.ts";
export type { CallContext } from "./dispatch.ts";
export * from "./child.ts";
