/** The public API: pinned, so a change to it is never an accident. */
import assert from "node:assert/strict";
import { test } from "node:test";
import * as mitogen from "../mod.ts";
import { checkLeaks } from "./helpers.ts";

checkLeaks();

test("mod.ts exports exactly the public API", () => {
  assert.deepEqual(Object.keys(mitogen).sort(), [
    "AbortError",
    "Broker",
    "CallChain",
    "CallError",
    "CallScope",
    "Channel",
    "ChannelError",
    "Context",
    "FileServiceError",
    "FileTransferError",
    "HandshakeError",
    "Latch",
    "LatchError",
    "Message",
    "MitogenError",
    "Receiver",
    "Router",
    "Secret",
    "Select",
    "SelectError",
    "Sender",
    "ServiceError",
    "StreamError",
    "TimeoutError",
    "connect",
    "contextId",
    "contextService",
    "defaultLogger",
    "defineService",
    "fakessh",
    "fileService",
    "formatRecord",
    "generateKeyPair",
    "getContext",
    "isMaster",
    "log",
    "logTo",
    "logToFile",
    "main",
    "parentId",
    "parentIds",
    "pushFiles",
    "registerFiles",
    "runWithRouter",
    "takesEcontext",
    "takesRouter",
    "withRouter",
  ]);
});

test("fakessh is run and nothing else", () => {
  assert.deepEqual(Object.keys(mitogen.fakessh), ["run"]);
});

test("the master's roles", () => {
  assert.equal(mitogen.isMaster, true);
  assert.equal(mitogen.contextId, 0);
  assert.equal(mitogen.parentId, null);
  assert.deepEqual(mitogen.parentIds, []);
});

test("errors are classes with names and causes", () => {
  const cause = new Error("root");
  for (const Cls of [
    mitogen.MitogenError,
    mitogen.ChannelError,
    mitogen.LatchError,
    mitogen.SelectError,
    mitogen.StreamError,
    mitogen.TimeoutError,
    mitogen.AbortError,
  ]) {
    const err = new Cls("msg", { cause });
    assert.ok(err instanceof mitogen.MitogenError);
    assert.ok(err instanceof Error);
    assert.equal(err.name, Cls.name);
    assert.equal(err.cause, cause);
  }
  const call = new mitogen.CallError("TypeError", "bad", "stack here");
  assert.ok(call instanceof mitogen.MitogenError);
  assert.equal(call.message, "TypeError: bad");
});

test("Router, Context and Receiver are AsyncDisposable", () => {
  for (const Cls of [mitogen.Router, mitogen.Context, mitogen.Receiver, mitogen.Select]) {
    assert.equal(typeof Cls.prototype[Symbol.asyncDispose], "function", Cls.name);
  }
});
