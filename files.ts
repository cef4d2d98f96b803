/**
 * Files through the tree: `ctx.putFile`, `ctx.getFile` and `router.putFile`
 * (fan-out). A shipped library module, `mitogen:files`: the master has it
 * built in, and a child fetches it (GET_MODULE) the first time it sends,
 * receives or relays a file.
 *
 * A transfer streams the file in chunks of {@link CHUNK} bytes through
 * flow-controlled Senders, so no process on the way holds more than a window
 * of it. Each target creates a temporary file in the target directory
 * (`.mitogen-tmp.<pidns>.<pid>.<random>`, O_EXCL|O_NOFOLLOW, mode 0600), checks
 * the byte count and the sha256 the sender computed, sets the mode (and mtime)
 * and fsyncs through the descriptor, and renames over the destination if the
 * temporary name is still the file written. Only regular files are sent. A fan-out is planned as the tree of the
 * targets below the sender: each context on the way gets the bytes once and
 * relays them to its part of the tree (see ARCHITECTURE.md, "Files").
 *
 * Node builtins come through `builtin()`, so this runs in every child
 * runtime (Node 12 and later, Deno).
 *
 * @module
 */
import { AbortError, CallError, ChannelError, MitogenError } from "./errors.ts";
import { Abort, builtin, nodeProcess, positionalIo } from "./runtime.ts";
import type { Message } from "./frames.ts";
import { Receiver, type Sender } from "./channels.ts";
import { takesRouter } from "./calls.ts";
import type { CallContext } from "./dispatch.ts";
import type { Context, FileFailure, FileOptions, FileResult } from "./context.ts";
import type { Router } from "./router.ts";

/** Bytes per chunk on the wire. */
export const CHUNK: number = 1024 * 1024;
/** How often the caller's `onProgress` hears of a running transfer, and how often a target reports (ms). */
const PROGRESS_MS = 250;
const REPORT_MS = 100;

/**
 * A file transfer failed: in one context (`ctx.putFile`, `ctx.getFile`) or in some of them
 * (`router.putFile`, whose other targets still finish). `results` and `failures` say which.
 */
export class FileTransferError extends MitogenError {
  override name = "FileTransferError";
  /** The contexts that have the file. */
  readonly results: FileResult[];
  /** The contexts that do not, and why. */
  readonly failures: FileFailure[];

  constructor(message: string, results: FileResult[] = [], failures: FileFailure[] = [], options?: ErrorOptions) {
    super(message, options);
    this.results = results;
    this.failures = failures;
  }
}

// ---------------------------------------------------------------------------
// Small promise wrappers over the callback API of node:fs (the same on Node 12 and Deno 1.46)

type Fs = typeof import("node:fs");
const fs = (): Fs => builtin("node:fs");
const path = (): typeof import("node:path") => builtin("node:path");
const sha256 = () => builtin("node:crypto").createHash("sha256");

function call<T>(fn: (...args: any[]) => void, ...args: unknown[]): Promise<T> {
  return new Promise((resolve, reject) => fn(...args, (err: Error | null, value: T) => (err ? reject(err) : resolve(value))));
}

const WHY: Record<string, string> = {
  ENOENT: "no such file or directory",
  EACCES: "permission denied",
  EPERM: "operation not permitted",
  ENOSPC: "no space left on device",
  EDQUOT: "disk quota exceeded",
  EISDIR: "is a directory",
  ENOTDIR: "a part of the path is not a directory",
  EROFS: "read-only file system",
};

/** A FileTransferError for a failed fs call: `<what>: <why> (<code>)`. */
function fsError(err: unknown, what: string): FileTransferError {
  if (err instanceof FileTransferError) return err;
  const code = (err as { code?: unknown } | null)?.code;
  const why = typeof code === "string" && WHY[code] ? `${WHY[code]} (${code})` : String((err as Error)?.message ?? err);
  return new FileTransferError(`${what}: ${why}`, [], [], { cause: err });
}

/** A failure's text, without the `FileTransferError: ` that a CallError puts in front. */
function text(err: Error): string {
  return err instanceof CallError && err.remoteName === "FileTransferError" ? err.remoteMessage : err.message;
}

// ---------------------------------------------------------------------------
// Writing: a temporary file in the target directory, renamed at the end

/**
 * Temporary files: `.mitogen-tmp.<pid namespace>.<pid>.<random>`, of a fixed length whatever the
 * destination's name (a name of 255 bytes still has room), and naming the process that writes it,
 * so that a later transfer to the directory can tell a dead process's leftover from a live one.
 */
const TEMP_NAME = /^\.mitogen-tmp\.(\d+)\.(\d+)\.[0-9a-f]{12}$/;

/** Temporary files not yet renamed or removed, and the file each name was created as; removed if the process exits first. */
const temps = new Map<string, { dev: number; ino: number }>();
let cleanupInstalled = false;

/** Unlink `name` if it is still the file `id` (never a file that another user put in its place). */
function unlinkIfSame(name: string, id: { dev: number; ino: number }): void {
  try {
    const st = fs().lstatSync(name);
    if (st.dev === id.dev && st.ino === id.ino) fs().unlinkSync(name);
  } catch {
    // gone already
  }
}

function removeTemps(): void {
  for (const [t, id] of temps) unlinkIfSame(t, id);
  temps.clear();
}

function onExit(): void {
  if (cleanupInstalled) return;
  cleanupInstalled = true;
  const g = globalThis as { Deno?: unknown; addEventListener?: (type: string, fn: () => void) => void };
  // Deno.exit() and a natural end fire "unload"; Node's exit, "exit".
  if (g.Deno && g.addEventListener) g.addEventListener("unload", removeTemps);
  else nodeProcess().on("exit", removeTemps);
}

/** This process's pid namespace (the inode of /proc/self/ns/pid), or "" where /proc cannot tell. */
let pidNamespace: Promise<string> | null = null;
function ownNamespace(): Promise<string> {
  pidNamespace ??= call<string>(fs().readlink, "/proc/self/ns/pid").then(
    (link) => /^pid:\[(\d+)\]$/.exec(link)?.[1] ?? "",
    () => "",
  );
  return pidNamespace;
}

/**
 * Remove the temporary files that a writer killed before its cleanup left in `dir` (a master
 * SIGKILLed mid-transfer, whose child died with it): only names of {@link TEMP_NAME} from this pid
 * namespace whose process is gone, regular files of `uid` with one link, last written before
 * `start`. unlink() removes the name, never what a symbolic link points to. Errors are ignored:
 * this is housekeeping, not the transfer.
 */
async function sweep(dir: string, uid: number, start: number): Promise<void> {
  const ns = await ownNamespace();
  if (!ns) return;
  const me = String(nodeProcess().pid);
  const names = await call<string[]>(fs().readdir, dir);
  for (const name of names) {
    const m = TEMP_NAME.exec(name);
    if (!m || m[1] !== ns || m[2] === me) continue;
    try {
      const stat = await call<string>(fs().readFile, `/proc/${m[2]}/stat`, "latin1");
      if (!/\) [ZX] /.test(stat)) continue; // its writer may still be running (a zombie is not)
    } catch {
      // no such process: a leftover
    }
    const file = path().join(dir, name);
    try {
      const st = await call<import("node:fs").Stats>(fs().lstat, file);
      if (st.isFile() && st.uid === uid && st.nlink === 1 && st.mtimeMs < start) await call(fs().unlink, file);
    } catch {
      // gone, or not ours to remove
    }
  }
}

/** `fchmod`; Deno 1.x's node:fs has none, so there the file's /proc/self/fd link, which names the open file, not a path. */
async function fchmod(fd: number, id: { dev: number; ino: number }, mode: number): Promise<void> {
  const f = fs();
  if (typeof f.fchmod === "function") return call(f.fchmod, fd, mode);
  // Deno 1.x's fd is a resource id: find the descriptor of the same file among this process's own.
  for (const n of await call<string[]>(f.readdir, "/proc/self/fd")) {
    const link = `/proc/self/fd/${n}`;
    try {
      const st = await call<import("node:fs").Stats>(f.stat, link);
      if (st.dev === id.dev && st.ino === id.ino) return call(f.chmod, link, mode);
    } catch {
      // closed meanwhile
    }
  }
  throw new MitogenError("cannot set the mode: the open file is not in /proc/self/fd");
}

/** Bytes between the flushes a Writer starts while it writes. */
const SYNC_EVERY = 32 * 1024 * 1024;
/** Chunks a Writer writes at once (positional writes, so their order does not matter; one where they seek). */
const WRITES_IN_FLIGHT = positionalIo ? 4 : 1;

/**
 * Writes one file under a temporary name and renames it at the end (or removes it). Everything after
 * the create goes through the descriptor (write, fchmod, futimes, fsync), and the rename only happens
 * if the temporary name is still the file written: in a directory that others may write, nothing
 * they swap in for the temporary name is chmodded, touched or renamed over the destination.
 */
class Writer {
  readonly dst: string;
  readonly where: string;
  readonly #tmp: string;
  readonly #id: { dev: number; ino: number };
  #fd: number | null;
  readonly #hash = sha256();
  /** Writes in flight, and the first that failed. */
  readonly #pending = new Set<Promise<void>>();
  #error: FileTransferError | null = null;
  /** A flush in flight, and the bytes written when it started. */
  #syncing: Promise<void> | null = null;
  #synced = 0;
  /** Removing the leftovers of dead writers in the directory. */
  readonly #sweep: Promise<void>;
  /** Bytes taken (and hashed) so far. */
  bytes = 0;

  private constructor(dst: string, where: string, tmp: string, fd: number, st: import("node:fs").Stats, start: number) {
    this.dst = dst;
    this.where = where;
    this.#tmp = tmp;
    this.#fd = fd;
    this.#id = { dev: st.dev, ino: st.ino };
    this.#sweep = sweep(path().dirname(tmp), st.uid, start).catch(() => {});
  }

  /** Check the directory and create the temporary file; `where` names this context in errors. */
  static async open(dst: string, where: string): Promise<Writer> {
    const start = Date.now();
    const p = path();
    const f = fs();
    const what = `cannot write ${dst} in ${where}`;
    const dir = p.dirname(dst);
    let st: import("node:fs").Stats;
    try {
      st = await call(f.stat, dir);
    } catch (err) {
      if ((err as { code?: unknown }).code === "ENOENT") throw new FileTransferError(`${what}: its directory ${dir} does not exist`, [], [], { cause: err });
      throw fsError(err, what);
    }
    if (!st.isDirectory()) throw new FileTransferError(`${what}: ${dir} is not a directory`);
    const ns = (await ownNamespace()) || "0";
    const tmp = p.join(dir, `.mitogen-tmp.${ns}.${nodeProcess().pid}.${builtin("node:crypto").randomBytes(6).toString("hex")}`);
    // A new file (O_EXCL: never one that exists, nor a symbolic link's target), 0600 until the commit.
    const c = f.constants;
    let fd: number;
    try {
      fd = await call(f.open, tmp, c.O_WRONLY | c.O_CREAT | c.O_EXCL | c.O_NOFOLLOW, 0o600);
    } catch (err) {
      throw fsError(err, `${what}: cannot create a file in ${dir}`);
    }
    let created: import("node:fs").Stats;
    try {
      created = await call(f.fstat, fd);
    } catch (err) {
      f.closeSync(fd);
      throw fsError(err, what);
    }
    onExit();
    temps.set(tmp, { dev: created.dev, ino: created.ino });
    return new Writer(dst, where, tmp, fd, created, start);
  }

  /**
   * Queue `chunk` (hashed now, written at its offset); resolves once fewer than {@link WRITES_IN_FLIGHT}
   * writes are pending. The first write error is thrown here or by commit().
   */
  async write(chunk: Uint8Array): Promise<void> {
    const fd = this.#fd;
    if (this.#error) throw this.#error;
    if (fd === null) throw new FileTransferError(`cannot write ${this.dst} in ${this.where}: the file was closed`);
    this.#hash.update(chunk);
    const at = this.bytes;
    this.bytes += chunk.byteLength;
    const done = (async () => {
      for (let off = 0, n = 0; off < chunk.byteLength; off += n) n = await call<number>(fs().write, fd, chunk, off, chunk.byteLength - off, at + off);
    })().then(
      () => {
        this.#pending.delete(done);
      },
      (err: unknown) => {
        this.#pending.delete(done);
        this.#error ??= fsError(err, `cannot write ${this.dst} in ${this.where}`);
      },
    );
    this.#pending.add(done);
    // Flush as we go, so the disk writes while the rest arrives and the final fsync is short.
    if (this.bytes - this.#synced >= SYNC_EVERY && !this.#syncing) {
      this.#synced = this.bytes;
      const sync: Promise<void> = done
        .then(() => call<void>(fs().fdatasync, fd))
        .then(
          () => {
            this.#syncing = null;
          },
          () => {
            this.#syncing = null; // the final fsync reports what is wrong
          },
        );
      this.#syncing = sync;
    }
    while (this.#pending.size >= WRITES_IN_FLIGHT) await Promise.race(this.#pending);
    if (this.#error) throw this.#error;
  }

  /** Wait for the writes in flight; throw the first error. */
  async #settle(): Promise<void> {
    while (this.#pending.size) await Promise.race(this.#pending);
    await this.#syncing;
    if (this.#error) throw this.#error;
  }

  /**
   * Check what was written against the sender's count and hash; set mode and mtime and fsync, all
   * through the descriptor; rename only if the temporary name is still the file written.
   */
  async commit(bytes: number, hash: string, mode: number, mtime?: number): Promise<string> {
    const what = `cannot write ${this.dst} in ${this.where}`;
    await this.#settle();
    await this.#sweep;
    const fd = this.#fd;
    if (fd === null) throw new FileTransferError(`${what}: the file was closed`);
    const mine = this.#hash.digest("hex");
    if (this.bytes !== bytes) throw new FileTransferError(`${what}: ${this.bytes} bytes arrived, the sender sent ${bytes}`);
    if (mine !== hash) throw new FileTransferError(`${what}: sha256 mismatch (${mine} written, ${hash} sent)`);
    const f = fs();
    try {
      await fchmod(fd, this.#id, mode);
      if (mtime !== undefined) await call(f.futimes, fd, Date.now() / 1000, mtime);
      await call(f.fsync, fd);
    } catch (err) {
      throw fsError(err, what);
    }
    let now: import("node:fs").Stats | null = null;
    try {
      now = await call<import("node:fs").Stats>(f.lstat, this.#tmp);
    } catch {
      // gone: below
    }
    if (!now || now.dev !== this.#id.dev || now.ino !== this.#id.ino) {
      temps.delete(this.#tmp); // not ours any more: discard() leaves that name alone
      throw new FileTransferError(
        `${what}: its temporary file ${this.#tmp} was ${now ? "replaced" : "removed"} while it was written (a race with another user who can write ${path().dirname(this.#tmp)}?); ${this.dst} was left as it was`,
      );
    }
    try {
      await call(f.rename, this.#tmp, this.dst);
    } catch (err) {
      throw fsError(err, what);
    }
    temps.delete(this.#tmp);
    this.#fd = null;
    try {
      await call(f.close, fd);
    } catch {
      // written, synced and renamed: the file is complete
    }
    return mine;
  }

  /** Remove the temporary file if it is still ours (the destination is untouched); its fd is closed once no write is in flight. */
  discard(): void {
    const f = fs();
    const fd = this.#fd;
    this.#fd = null;
    if (temps.delete(this.#tmp)) unlinkIfSame(this.#tmp, this.#id);
    if (fd === null) return;
    const close = () => {
      try {
        f.closeSync(fd);
      } catch {
        // closed
      }
    };
    if (this.#pending.size || this.#syncing) void Promise.all([...this.#pending, this.#syncing]).then(close);
    else close();
  }
}

// ---------------------------------------------------------------------------
// The plan and the wire

/** What `receive` gets: its part of the plan. Without `path`, the node only relays. */
export interface ReceiveSpec {
  /** The context that runs this node. */
  id: number;
  path?: string;
  mode: number;
  mtime?: number;
  total: number;
  /** Where to send `{ ready: Sender }` once this node and its subtree can take data. */
  ctl?: Sender;
  /** Where targets report `{ id, bytes }`, at most every 100 ms (the sender of the file). */
  progress?: Sender;
  children: ReceiveSpec[];
}

/** One target's outcome, as it travels back up the tree. */
type Outcome = { id: number; bytes: number; sha256: string } | { id: number; error: Error };

/** End of the data: the sender's byte count and sha256. */
type End = { end: string; bytes: number };

const isEnd = (v: unknown): v is End => typeof v === "object" && v !== null && typeof (v as End).end === "string";

/** The tree of `targets` below `router`: a context on the way to one becomes a relay node. */
function plan(router: Router, targets: Context[], leaf: Omit<ReceiveSpec, "id" | "children" | "path">, dst: string): ReceiveSpec[] {
  const nodes = new Map<number, ReceiveSpec>();
  const roots: ReceiveSpec[] = [];
  const node = (id: number, depth: number): ReceiveSpec => {
    let n = nodes.get(id);
    if (n) return n;
    n = { id, ...leaf, children: [] };
    nodes.set(id, n);
    const up = id === router.myId ? undefined : router.parentOf(id);
    if (up === undefined || up === router.myId || depth > 64) roots.push(n);
    else node(up, depth + 1).children.push(n);
    return n;
  };
  for (const ctx of targets) node(ctx.contextId, 0).path = dst;
  return roots;
}

/** Ids of the targets in a subtree. */
function targetsOf(spec: ReceiveSpec): number[] {
  const out = spec.path === undefined ? [] : [spec.id];
  for (const c of spec.children) out.push(...targetsOf(c));
  return out;
}

/** A subtree being fed: its data Sender once ready, and its outcomes once done. */
interface Branch {
  spec: ReceiveSpec;
  data: Sender | null;
  /** Never rejects: a failed call is a failure of every target below. */
  outcomes: Promise<Outcome[]>;
}

/** Start `receive` in the first context of `spec` and wait until it (and its subtree) is ready for data. */
async function startBranch(router: Router, spec: ReceiveSpec, signal: AbortSignal): Promise<Branch> {
  const ctx = router.contextById(spec.id);
  const ctl = new Receiver(router, { persist: false, respondent: ctx });
  const node = { ...spec, ctl: ctl.toSender() };
  // This very context (the master has no call dispatcher): run the node here.
  const call =
    spec.id === router.myId
      ? receive(node, { router, econtext: router, msg: { src: router.myId } as Message, signal })
      : callReceive(ctx.with({ signal }), node);
  const outcomes = call.then(
    (list) => {
      ctl.close();
      return list;
    },
    (err: unknown) => {
      ctl.close();
      const error = err instanceof Error ? err : new MitogenError(String(err));
      return targetsOf(spec).map((id) => ({ id, error }));
    },
  );
  let data: Sender | null = null;
  try {
    const ready = (await ctl.get()).unpickle() as { ready?: Sender };
    data = ready.ready ?? null;
  } catch {
    // the call failed before it was ready: its outcomes say why
  }
  return { spec, data, outcomes };
}

/** Send `value` to every branch still taking data; one that cannot take it is dropped from then on. */
async function forward(branches: Branch[], value: unknown): Promise<void> {
  await Promise.all(
    branches.map(async (b) => {
      if (!b.data) return;
      try {
        await b.data.send(value);
      } catch {
        b.data = null; // it closed or its context is gone: its call's outcome says why
      }
    }),
  );
}

/**
 * `promise`, or an AbortError as soon as `signal` aborts. Its listener goes when either settles, so
 * nothing long-lived keeps the value (a race against one pending promise would keep every chunk).
 */
function until<T>(promise: Promise<T>, signal: AbortSignal, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(new AbortError(`${what} aborted`, { cause: signal.reason }));
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      },
      (err: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(err);
      },
    );
  });
}

/**
 * One node of a transfer, in the context `spec.id` (called by the node above it, or the sender): write
 * the file if it has a `path`, relay to its children, and return the outcomes of its whole subtree.
 */
/** Where a call can go: a Context, or a CallScope of one (`ctx.with({ signal })`). */
interface Callee {
  callModule(module: string, name: string, ...args: unknown[]): Promise<unknown>;
}

/**
 * The one way to call {@link receive} in `ctx` (PROTOCOL.md, "Library calls"):
 *
 *     mitogen:files#receive   { id, path?, mode, mtime?, total, ctl?, progress?, children: [spec] }
 *       ctl <- { ready: Sender }; data -> chunks, then { end: sha256hex, bytes }; progress <- { id, bytes }
 *       reply [{ id, bytes, sha256 } | { id, error }], one per target of the subtree
 */
function callReceive(ctx: Callee, spec: ReceiveSpec): Promise<Outcome[]> {
  return ctx.callModule("mitogen:files", "receive", spec) as Promise<Outcome[]>;
}

/**
 * The one way to call {@link send} in `ctx`:
 *
 *     mitogen:files#send   { path, data }   data <- { size, mode, mtime }, chunks, { end, bytes }   reply { bytes }
 */
function callSend(ctx: Callee, spec: { path: string; data: Sender }): Promise<{ bytes: number }> {
  return ctx.callModule("mitogen:files", "send", spec) as Promise<{ bytes: number }>;
}

export const receive: (spec: ReceiveSpec, call: CallContext) => Promise<Outcome[]> = takesRouter(async (spec: ReceiveSpec, cc: CallContext) => {
  const { router, signal } = cc;
  const data = new Receiver(router, { respondent: router.contextById(cc.msg.src) });
  const outcomes: Outcome[] = [];
  let writer: Writer | null = null;
  let failed: Error | null = null;
  const fail = (err: unknown) => {
    failed ??= err instanceof Error ? err : new MitogenError(String(err));
    writer?.discard();
    writer = null;
  };
  const onAbort = () => data.close();
  signal.addEventListener("abort", onAbort, { once: true });
  let branches: Branch[] = [];
  try {
    if (spec.path !== undefined) {
      try {
        writer = await Writer.open(spec.path, router.name);
      } catch (err) {
        fail(err); // this node still relays to its subtree
      }
    }
    branches = await Promise.all(spec.children.map((c) => startBranch(router, c, signal)));
    await spec.ctl?.send({ ready: data.toSender() });
    let end: End | null = null;
    let lastReport = Date.now();
    const report = (bytes: number) => {
      if (spec.path === undefined || !spec.progress) return;
      lastReport = Date.now();
      spec.progress.send({ id: router.myId, bytes }).catch(() => {});
    };
    for (;;) {
      let value: unknown;
      try {
        value = (await data.get()).unpickle();
      } catch (err) {
        if (signal.aborted) throw new AbortError(`transfer to ${router.name} aborted`, { cause: signal.reason });
        throw new ChannelError(`transfer to ${router.name} ended before the end of the file`, { cause: err });
      }
      if (value instanceof Uint8Array) {
        const w: Writer | null = writer;
        await Promise.all([w?.write(value).catch(fail), forward(branches, value)]);
        if (w && Date.now() - lastReport >= REPORT_MS) report(w.bytes);
      } else if (isEnd(value)) {
        end = value;
        break;
      }
    }
    await forward(branches, end);
    const w: Writer | null = writer;
    if (w) {
      try {
        const hash = await w.commit(end.bytes, end.end, spec.mode, spec.mtime);
        outcomes.push({ id: router.myId, bytes: w.bytes, sha256: hash });
        report(w.bytes);
      } catch (err) {
        fail(err);
      }
    }
    if (spec.path !== undefined && failed) outcomes.push({ id: router.myId, error: CallError.fromThrown(failed, router.path.join(" -> ")) });
    for (const b of branches) outcomes.push(...(await b.outcomes));
    return outcomes;
  } finally {
    signal.removeEventListener("abort", onAbort);
    data.close();
    (writer as Writer | null)?.discard();
  }
});

/** The context's end of `getFile`: stream file `spec.path` to `spec.data` (header, chunks, end). */
export const send: (spec: { path: string; data: Sender }, call: CallContext) => Promise<{ bytes: number }> = takesRouter(
  async (spec: { path: string; data: Sender }, cc: CallContext) => {
    const { router, signal } = cc;
    const source = await Source.open(spec.path, router.name);
    const what = `getFile of ${spec.path} from ${router.name}`;
    try {
      await until(spec.data.send({ size: source.size, mode: source.mode, mtime: source.mtime }), signal, what);
      for (;;) {
        const chunk = await until(source.next(), signal, what);
        if (!chunk) break;
        await until(spec.data.send(chunk), signal, what);
      }
      await spec.data.send({ end: source.sha256(), bytes: source.sent } satisfies End);
      return { bytes: source.sent };
    } finally {
      source.close();
    }
  },
);

// ---------------------------------------------------------------------------
// Reading

/** What a file that is not a regular one is, for errors: from the type bits of its mode (Deno 1.x's isFIFO() and the like say false). */
function kind(st: import("node:fs").Stats): string {
  switch (st.mode & 0o170000) {
    case 0o040000:
      return "a directory";
    case 0o010000:
      return "a FIFO (named pipe)";
    case 0o140000:
      return "a socket";
    case 0o020000:
      return "a character device";
    case 0o060000:
      return "a block device";
    default:
      return "of an unknown type";
  }
}

/**
 * A file read in chunks of {@link CHUNK}, exactly as many bytes as it had when opened; one whose size
 * is 0 (`/proc/self/status`, say: the kernel makes its content as it is read) is read to its end.
 */
class Source {
  readonly path: string;
  readonly where: string;
  readonly size: number;
  readonly mode: number;
  readonly mtime: number;
  sent = 0;
  #fd: number | null;
  #ahead: Promise<Uint8Array | null> | null = null;
  readonly #hash = sha256();
  /** No size to go by: read until a read returns nothing. */
  readonly #toEnd: boolean;

  private constructor(path: string, where: string, fd: number, st: import("node:fs").Stats) {
    this.path = path;
    this.where = where;
    this.#fd = fd;
    this.size = st.size;
    this.#toEnd = st.size === 0;
    this.mode = st.mode & 0o7777;
    this.mtime = st.mtimeMs / 1000;
  }

  /**
   * Only a regular file: the type is checked before the open (opening a FIFO blocks until a writer
   * comes, and a blocked open holds a thread of the pool for good), the open is non-blocking (a
   * FIFO swapped in meanwhile opens at once) and the type is checked again on the descriptor.
   */
  static async open(file: string, where: string): Promise<Source> {
    const what = `cannot read ${file} in ${where}`;
    const f = fs();
    const refuse = (st: import("node:fs").Stats) => new FileTransferError(`${what}: not a regular file but ${kind(st)}; only regular files can be sent`);
    let fd: number;
    try {
      const st = await call<import("node:fs").Stats>(f.stat, file);
      if (!st.isFile()) throw refuse(st);
      fd = await call(f.open, file, f.constants.O_RDONLY | f.constants.O_NONBLOCK);
    } catch (err) {
      throw fsError(err, what);
    }
    try {
      const st = await call<import("node:fs").Stats>(f.fstat, fd);
      if (!st.isFile()) throw refuse(st);
      return new Source(file, where, fd, st);
    } catch (err) {
      f.closeSync(fd);
      throw fsError(err, what);
    }
  }

  /**
   * The next chunk (a fresh buffer), or null at the end; fails if the file shrank or cannot be read.
   * The chunk after it is read meanwhile.
   */
  async next(): Promise<Uint8Array | null> {
    const chunk = await (this.#ahead ?? this.#read(this.sent));
    this.#ahead = null;
    if (!chunk) return null;
    this.#hash.update(chunk);
    this.sent += chunk.byteLength;
    if (this.sent < this.size && positionalIo) {
      this.#ahead = this.#read(this.sent);
      this.#ahead.catch(() => {}); // its error comes from the next call
    }
    return chunk;
  }

  async #read(at: number): Promise<Uint8Array | null> {
    const left = this.#toEnd ? CHUNK : this.size - at;
    const fd = this.#fd;
    if (left <= 0 || fd === null) return null;
    const buf = new Uint8Array(Math.min(CHUNK, left));
    let n = 0;
    try {
      for (let k = 1; n < buf.byteLength && k > 0; n += k) k = await call<number>(fs().read, fd, buf, n, buf.byteLength - n, at + n);
    } catch (err) {
      throw fsError(err, `cannot read ${this.path} in ${this.where}`);
    }
    if (this.#toEnd) return n === 0 ? null : n < buf.byteLength ? buf.slice(0, n) : buf;
    if (n < buf.byteLength)
      throw new FileTransferError(`source ${this.path} in ${this.where} shrank while being sent: it had ${this.size} bytes, ${at + n} could be read`);
    return buf;
  }

  sha256(): string {
    return this.#hash.digest("hex");
  }

  /** Close the file, once a read ahead (if any) has finished. */
  close(): void {
    const fd = this.#fd;
    if (fd === null) return;
    this.#fd = null;
    const close = () => {
      try {
        fs().closeSync(fd);
      } catch {
        // closed
      }
    };
    if (this.#ahead) void this.#ahead.then(close, close);
    else close();
  }
}

// ---------------------------------------------------------------------------
// The caller's side

/** Calls `onProgress` for every target every 250 ms with the latest bytes each reported, until stopped. */
function progressReporter(router: Router, targets: Context[], total: number, onProgress: FileOptions["onProgress"]) {
  const latest = new Map<number, number>(targets.map((c) => [c.contextId, 0]));
  const recv = onProgress ? new Receiver(router) : null;
  const tell = (id: number, bytes: number) => {
    try {
      onProgress?.({ bytes, total, context: router.contextById(id) });
    } catch (err) {
      router.log("warn", `onProgress threw: ${(err as Error)?.message ?? err}`);
    }
  };
  if (recv) {
    void (async () => {
      for await (const msg of recv) {
        const { id, bytes } = msg.unpickle() as { id: number; bytes: number };
        if (latest.has(id)) latest.set(id, bytes);
      }
    })();
  }
  const timer = onProgress
    ? setInterval(() => {
        for (const [id, bytes] of latest) tell(id, bytes);
      }, PROGRESS_MS)
    : undefined;
  return {
    sender: recv?.toSender(),
    /** Local progress (getFile). */
    set: (id: number, bytes: number) => latest.set(id, bytes),
    /** Stop the timer; report each context's final bytes once. */
    stop(final: Map<number, number> | null) {
      clearInterval(timer);
      recv?.close();
      if (final) for (const [id, bytes] of final) tell(id, bytes);
    },
  };
}

/** The mode a copy gets by default: the source's, its setuid, setgid and sticky bits only if asked for. */
const sourceMode = (mode: number, options: FileOptions): number => mode & (options.keepSetuid ? 0o7777 : 0o777);

/**
 * {@link Router.putFile}: send local file `src` to `dst` in each of `targets`, once over each link of
 * the tree below `router`.
 */
export async function putFile(router: Router, targets: Context[], src: string, dst: string, options: FileOptions = {}): Promise<FileResult[]> {
  const outer = options.signal;
  if (outer?.aborted) throw new AbortError(`putFile of ${src} aborted`, { cause: outer.reason });
  const source = await Source.open(src, router.name);
  if (!targets.length) {
    source.close();
    return [];
  }
  // Our own controller: the caller's signal, and a failed source, both cancel every branch.
  const controller = new Abort();
  const cancel = () => controller.abort(outer?.reason);
  outer?.addEventListener("abort", cancel, { once: true });
  const what = `putFile of ${src}`;
  const progress = progressReporter(router, targets, source.size, options.onProgress);
  let final: Map<number, number> | null = null;
  try {
    const leaf: Omit<ReceiveSpec, "id" | "children" | "path"> = {
      mode: options.mode ?? sourceMode(source.mode, options),
      total: source.size,
      ...(options.preserveTimes ? { mtime: source.mtime } : {}),
      ...(progress.sender ? { progress: progress.sender } : {}),
    };
    const signal = controller.signal;
    const branches = await until(Promise.all(plan(router, targets, leaf, dst).map((spec) => startBranch(router, spec, signal))), signal, what);
    for (;;) {
      const chunk = await until(source.next(), signal, what);
      if (!chunk) break;
      await until(forward(branches, chunk), signal, what);
    }
    await forward(branches, { end: source.sha256(), bytes: source.sent } satisfies End);
    const outcomes = (await until(Promise.all(branches.map((b) => b.outcomes)), signal, what)).flat();
    const results: FileResult[] = [];
    const failures: FileFailure[] = [];
    const seen = new Set<number>();
    for (const o of outcomes) {
      seen.add(o.id);
      const context = router.contextById(o.id);
      if ("error" in o) failures.push({ context, error: o.error });
      else results.push({ context, bytes: o.bytes, sha256: o.sha256 });
    }
    final = new Map(results.map((r) => [r.context.contextId, r.bytes]));
    if (failures.length) {
      const list = failures.map((f) => `${f.context.name}: ${text(f.error)}`).join("; ");
      throw new FileTransferError(`putFile of ${src} to ${dst} failed in ${failures.length} of ${seen.size} contexts: ${list}`, results, failures, {
        cause: failures[0]?.error,
      });
    }
    // In the order asked for, each context once.
    return [...new Set(targets)].map((t) => results.find((r) => r.context === t)).filter((r): r is FileResult => r !== undefined);
  } catch (err) {
    controller.abort(err);
    throw err;
  } finally {
    progress.stop(final);
    outer?.removeEventListener("abort", cancel);
    source.close();
  }
}

/** {@link Context.putFile}: {@link putFile} to one context; its failure is the FileTransferError. */
export async function putOne(router: Router, ctx: Context, src: string, dst: string, options: FileOptions = {}): Promise<FileResult> {
  try {
    return (await putFile(router, [ctx], src, dst, options))[0] as FileResult;
  } catch (err) {
    const f = err instanceof FileTransferError ? err.failures[0] : undefined;
    if (f) throw new FileTransferError(text(f.error), [], (err as FileTransferError).failures, { cause: f.error });
    throw err;
  }
}

/** {@link Context.getFile}: copy `src` in `ctx` to local file `dst`, through the same writer as putFile. */
export async function getFile(router: Router, ctx: Context, src: string, dst: string, options: FileOptions = {}): Promise<FileResult> {
  const outer = options.signal;
  if (outer?.aborted) throw new AbortError(`getFile of ${src} aborted`, { cause: outer.reason });
  const writer = await Writer.open(dst, router.name);
  const controller = new Abort();
  const cancel = () => controller.abort(outer?.reason);
  outer?.addEventListener("abort", cancel, { once: true });
  const data = new Receiver(router, { respondent: ctx });
  const remote = callSend(ctx.with({ signal: controller.signal }), { path: src, data: data.toSender() });
  // A remote failure (no such file, say) ends the local loop; its error is the one to report.
  let remoteError: unknown = null;
  remote.catch((err: unknown) => {
    remoteError = err;
    data.close();
  });
  let total = 0;
  const progress = progressReporter(router, [ctx], 0, options.onProgress && ((p) => options.onProgress?.({ ...p, total })));
  let final: Map<number, number> | null = null;
  try {
    const next = async (): Promise<unknown> => {
      try {
        return (await data.get()).unpickle();
      } catch (err) {
        if (controller.signal.aborted) throw new AbortError(`getFile of ${src} aborted`, { cause: outer?.reason });
        await remote.catch(() => {});
        if (remoteError) throw remoteError;
        throw new ChannelError(`getFile of ${src} from ${ctx.name} ended before the end of the file`, { cause: err });
      }
    };
    const head = (await next()) as { size: number; mode: number; mtime: number };
    total = head.size;
    let end: End | null = null;
    while (!end) {
      const value = await next();
      if (value instanceof Uint8Array) {
        await writer.write(value);
        progress.set(ctx.contextId, writer.bytes);
      } else if (isEnd(value)) end = value;
    }
    if (head.size > 0 && end.bytes !== head.size)
      throw new FileTransferError(`getFile of ${src} from ${ctx.name}: ${end.bytes} bytes sent, the file had ${head.size}`);
    const hash = await writer.commit(end.bytes, end.end, options.mode ?? sourceMode(head.mode, options), options.preserveTimes ? head.mtime : undefined);
    await remote;
    final = new Map([[ctx.contextId, writer.bytes]]);
    return { context: ctx, bytes: writer.bytes, sha256: hash };
  } catch (err) {
    controller.abort(err);
    const e = err instanceof Error ? err : new MitogenError(String(err));
    if (e instanceof FileTransferError || e instanceof AbortError) throw e;
    throw new FileTransferError(text(e), [], [{ context: ctx, error: e }], { cause: e });
  } finally {
    progress.stop(final);
    outer?.removeEventListener("abort", cancel);
    writer.discard();
    data.close();
  }
}
