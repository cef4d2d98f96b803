/**
 * mitogen: start Node and Deno runtimes locally and on other machines with
 * nothing installed there but the runtime, ship code to them on demand, and
 * route calls and messages through the tree of contexts.
 *
 * @example
 * ```ts
 * import { Router } from "mitogen";
 * await using router = new Router();
 * const a = await router.local({ runtime: "node", name: "a" });
 * const b = await router.local({ runtime: "deno", via: a });
 * console.log(await b.call((x: number) => x * 2, 21)); // 42
 * ```
 *
 * @module
 */
export { AbortError, CallError, ChannelError, LatchError, MitogenError, SelectError, StreamError, TimeoutError } from "./errors.ts";
export { Secret } from "./codec.ts";
export { Message } from "./frames.ts";
export type { LinkCounts } from "./stream.ts";
export { Latch, Select } from "./select.ts";
export type { GetOptions, Selectable, SelectEvent } from "./select.ts";
export { Channel, Receiver, Sender } from "./channels.ts";
export type { ReceiverOptions } from "./channels.ts";
export { contextId, isMaster, parentId, parentIds } from "./roles.ts";
export { log } from "./logapi.ts";
export type { Logger, LogLevel, LogRecord, LogSource } from "./logapi.ts";
export { takesEcontext, takesRouter } from "./calls.ts";
export type { ArgsIn, ArgsOut, ArgSpec, CallOptions, StandardResult, StandardSchemaV1 } from "./calls.ts";
export type { CallContext } from "./dispatch.ts";
export { CallChain, CallScope, Context } from "./context.ts";
export type {
  FileFailure,
  FileOptions,
  FileProgress,
  FileResult,
  Remote,
  ServiceArgs,
  ServiceClient,
  ServiceResult,
  ServiceShape,
  ShutdownOptions,
} from "./context.ts";
export { Broker, defineService } from "./router.ts";
export type { ServiceCall, ServiceDef, ServiceMethod, ServiceMethods, ServicePolicy, ServicePool } from "./router.ts";
export { ServiceError } from "./service.ts";
export { FileServiceError, fileService, pushFiles, registerFiles } from "./fileservice.ts";
export type { FileServiceMethod, FileServiceMethods } from "./fileservice.ts";
export { contextService, getContext } from "./contextservice.ts";
export type { ContextMethod, ContextServiceMethods, ContextSpec } from "./contextservice.ts";
export type {
  ContainerOptions,
  ContextInfo,
  JailOptions,
  KubectlOptions,
  Listener,
  ListenAllow,
  ListenOptions,
  ListenRoute,
  LocalOptions,
  SetnsOptions,
  SshOptions,
  SudoOptions,
  SuOptions,
  StartOptions,
} from "./options.ts";
export { defaultLogger, Router } from "./master.ts";
export { fakessh } from "./fakessh.ts";
export type { FakesshDest, FakesshOptions, FakesshRequest } from "./fakessh.ts";
export { FileTransferError } from "./files.ts";
export type { RouterOptions, RouterStats } from "./master.ts";
export { formatRecord, logTo, logToFile } from "./logs.ts";
export type { FormatOptions, LevelLogger, LoggerStyle, LogSink, LogToFileOptions } from "./logs.ts";
export { main, runWithRouter, withRouter } from "./utils.ts";
export type { MainOptions } from "./utils.ts";
export { connect } from "./session.ts";
export type { ConnectOptions, Session } from "./session.ts";
export { generateKeyPair, HandshakeError } from "./handshake.ts";
export type { KeyPair } from "./handshake.ts";
