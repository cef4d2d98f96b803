/**
 * mitogen: start Node and Deno runtimes locally and on other machines with
 * nothing installed there but the runtime, ship code to them on demand, and
 * route calls and messages through the tree of contexts.
 *
 * @example
 * ```ts
 * import { Router } from "./mod.ts";
 * await using router = new Router();
 * const a = await router.local({ runtime: "node", name: "a" });
 * const b = await router.local({ runtime: "deno", via: a });
 * console.log(await b.call((x: number) => x * 2, 21)); // 42
 * ```
 *
 * @module
 */
export {
  AbortError,
  Broker,
  CallError,
  CallScope,
  Channel,
  ChannelError,
  Context,
  contextId,
  isMaster,
  Latch,
  log,
  Message,
  MitogenError,
  parentId,
  parentIds,
  Receiver,
  Secret,
  Select,
  Sender,
  StreamError,
  takesEcontext,
  takesRouter,
  TimeoutError,
} from "./core.ts";
export type {
  CallContext,
  CallOptions,
  GetOptions,
  LogLevel,
  LogRecord,
  LocalOptions,
  LogSource,
  ReceiverOptions,
  Remote,
  Selectable,
  SshOptions,
  SuOptions,
  StartOptions,
  ContainerOptions,
  KubectlOptions,
  SetnsOptions,
  JailOptions,
  SudoOptions,
  SelectEvent,
  ShutdownOptions,
} from "./core.ts";
export { defaultLogger, Router } from "./master.ts";
export { fakessh } from "./fakessh.ts";
export type { FakesshDest, FakesshOptions, FakesshRequest } from "./fakessh.ts";
export { FileTransferError } from "./files.ts";
export type { FileFailure, FileOptions, FileProgress, FileResult } from "./files.ts";
export type { LinkCounts } from "./frames.ts";
export type { RouterOptions, RouterStats } from "./master.ts";
export { formatRecord, logTo, logToFile } from "./logs.ts";
export type { FormatOptions, LevelLogger, LoggerStyle, LogSink, LogToFileOptions } from "./logs.ts";
export { main, runWithRouter, withRouter } from "./utils.ts";
export type { MainOptions } from "./utils.ts";
export { connect } from "./session.ts";
export type { ConnectOptions, Session } from "./session.ts";
export type { Listener, ListenAllow, ListenOptions, ListenRoute } from "./listen.ts";
export { generateKeyPair, HandshakeError } from "./handshake.ts";
export type { KeyPair } from "./handshake.ts";
