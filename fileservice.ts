/**
 * `mitogen:fileservice`: Mitogen's FileService and PushFileService, a shipped module each context
 * loads on the first call of {@link FILE_SERVICE} (activation: the master maps the name to this
 * module, see LIBRARY_SERVICES in service.ts).
 *
 * The master serves the files it registered ({@link registerFiles}); any other context serves the
 * files it fetched, from a cache of its own, so a fan-out of N children behind one hop crosses the
 * master's link once. A context asks its parent (the first of `router.parentIds`), which asks its
 * own, up to the master: each hop's `fetch` streams from its cache, or from the fetch in flight that
 * fills it. The cache is a temporary directory per process (`mitogen-filecache-<random>` in the system
 * temp dir, 0700, removed at exit), so a large file costs a hop disk, not memory; the bytes travel
 * through flow-controlled Senders (each channel's credit window), in chunks of 1 MiB.
 *
 * The wire, one way (PROTOCOL.md, "Library calls"):
 *
 *     mitogen.FileService#fetch  { path, data: Sender }   data <- { size, mode, mtime }, chunks, { end: sha256hex, bytes }
 *                                                          reply { bytes, sha256 }
 *
 * @module
 */
import { MitogenError } from "./errors.ts";
import { builtin, nodeProcess } from "./runtime.ts";
import { Receiver, type Sender } from "./channels.ts";
import type { Context } from "./context.ts";
import type { StandardSchemaV1 } from "./calls.ts";
import { defineService, type Router, type ServiceCall, type ServiceDef, type ServicePolicy } from "./router.ts";

/** The name the file service is called by (Mitogen's `mitogen.service.FileService`). */
export const FILE_SERVICE = "mitogen.FileService";

/** Bytes per chunk on the wire. */
const CHUNK = 1024 * 1024;

type Fs = typeof import("node:fs");
type Stats = import("node:fs").Stats;
const fs = (): Fs => builtin("node:fs");
const path = (): typeof import("node:path") => builtin("node:path");
const sha256 = () => builtin("node:crypto").createHash("sha256");

function call<T>(fn: (...args: any[]) => void, ...args: unknown[]): Promise<T> {
  return new Promise((resolve, reject) => fn(...args, (err: Error | null, value: T) => (err ? reject(err) : resolve(value))));
}

/** A refused or failed fetch: the caller sees a CallError of this name (`remoteName === "FileServiceError"`). */
export class FileServiceError extends MitogenError {
  override name = "FileServiceError";
}

/** What a fetch says before the bytes. */
interface Head {
  size: number;
  mode: number;
  mtime: number;
}

/** End of the data: the sender's byte count and sha256. */
type End = { end: string; bytes: number };
const isEnd = (v: unknown): v is End => typeof v === "object" && v !== null && typeof (v as End).end === "string";

/** A file this context can serve: read at an offset as its bytes become available. */
interface Source {
  readonly head: Head;
  /** Up to `max` bytes at `offset`, once they are there; null at the end. */
  read(offset: number, max: number): Promise<Uint8Array | null>;
  close(): void;
}

// ---------------------------------------------------------------------------
// The master's registry: files and prefixes, checked after resolving symbolic links

interface Registry {
  /** Real paths of registered files. */
  files: Set<string>;
  /** Real paths of registered directories: every file below them. */
  prefixes: Set<string>;
  /** Real paths pushed to a context, by the id of the master's child that fetches them on its behalf. */
  pushed: Map<string, Set<number>>;
}

const registries = new WeakMap<Router, Registry>();

function registryOf(router: Router): Registry {
  let r = registries.get(router);
  if (!r) registries.set(router, (r = { files: new Set(), prefixes: new Set(), pushed: new Map() }));
  return r;
}

/** An absolute path without `..` segments, resolved through symbolic links. */
async function realPath(file: string, what: string): Promise<string> {
  if (typeof file !== "string" || !path().isAbsolute(file)) throw new FileServiceError(`${what}: ${JSON.stringify(file)} is not an absolute path`);
  if (file.split("/").includes("..")) throw new FileServiceError(`${what}: ${file} has a .. segment`);
  try {
    return await call<string>(fs().realpath, file);
  } catch (err) {
    throw new FileServiceError(`${what}: ${file}: ${(err as Error)?.message ?? err}`, { cause: err });
  }
}

/**
 * Let any context below the master fetch the files `paths` and every file below the directories
 * `prefixes` (Mitogen's `FileService.register` and `register_prefix`) through {@link FILE_SERVICE}.
 * Each is resolved now (symbolic links included); a fetch is allowed only if its path, resolved the
 * same way, is one of these files or below one of these directories, and has no `..` segment.
 *
 * @example
 * ```ts
 * import { type CallContext, registerFiles, Router, takesRouter } from "mitogen";
 * await using router = new Router();
 * await registerFiles(router, { paths: ["/etc/hostname"], prefixes: ["/usr/share/zoneinfo"] });
 * const hop = await router.local({ name: "hop" });
 * const leaf = await router.local({ name: "leaf", via: hop });
 * // In the leaf: its own file service fetches through the hop (which keeps a copy), from the master.
 * const bytes = await leaf.call(
 *   takesRouter(({ router }: CallContext) => router.myself().callService("mitogen.FileService", "read", { path: "/etc/hostname" })),
 * );
 * console.log(new TextDecoder().decode(bytes as Uint8Array)); // web1
 * ```
 */
export async function registerFiles(router: Router, options: { paths?: string[]; prefixes?: string[] }): Promise<void> {
  const reg = registryOf(router);
  for (const p of options.paths ?? []) reg.files.add(await realPath(p, "cannot register"));
  for (const p of options.prefixes ?? []) reg.prefixes.add(await realPath(p, "cannot register"));
}

/** Open `file` in the master, if it is registered (or pushed to the master's child `via`). */
async function openRegistered(router: Router, file: string, via: number): Promise<Source> {
  const what = `${file} is not registered with the file service in ${router.name}`;
  const reg = registryOf(router);
  let real: string;
  try {
    real = await realPath(file, "refused");
  } catch (err) {
    throw new FileServiceError(`${what} (${(err as Error).message})`);
  }
  const ok = reg.files.has(real) || [...reg.prefixes].some((p) => real.startsWith(p.endsWith("/") ? p : `${p}/`)) || reg.pushed.get(real)?.has(via) === true;
  if (!ok) throw new FileServiceError(real === file ? what : `${what} (it resolves to ${real})`);
  return DiskSource.open(real, router.name);
}

/** A registered file in the master, read as it was when opened (a shrunk file fails). */
class DiskSource implements Source {
  readonly head: Head;
  readonly #file: string;
  #fd: number | null;

  private constructor(file: string, fd: number, st: Stats) {
    this.#file = file;
    this.#fd = fd;
    this.head = { size: st.size, mode: st.mode & 0o7777, mtime: st.mtimeMs / 1000 };
  }

  static async open(file: string, where: string): Promise<DiskSource> {
    const f = fs();
    let fd: number;
    try {
      fd = await call<number>(f.open, file, f.constants.O_RDONLY | f.constants.O_NONBLOCK | f.constants.O_NOFOLLOW);
    } catch (err) {
      throw new FileServiceError(`cannot read ${file} in ${where}: ${(err as Error)?.message ?? err}`, { cause: err });
    }
    const st = await call<Stats>(f.fstat, fd).catch((err: unknown) => {
      f.closeSync(fd);
      throw err;
    });
    if (!st.isFile()) {
      f.closeSync(fd);
      throw new FileServiceError(`cannot read ${file} in ${where}: only regular files are served`);
    }
    return new DiskSource(file, fd, st);
  }

  async read(offset: number, max: number): Promise<Uint8Array | null> {
    const fd = this.#fd;
    const left = Math.min(max, this.head.size - offset);
    if (left <= 0 || fd === null) return null;
    const buf = new Uint8Array(left);
    let n = 0;
    for (let k = 1; n < left && k > 0; n += k) k = await call<number>(fs().read, fd, buf, n, left - n, offset + n);
    if (n < left) throw new FileServiceError(`${this.#file} shrank while being served: it had ${this.head.size} bytes`);
    return buf;
  }

  close(): void {
    const fd = this.#fd;
    this.#fd = null;
    if (fd !== null) fs().close(fd, () => {});
  }
}

// ---------------------------------------------------------------------------
// A hop's cache: files fetched from the parent, kept in a temporary directory

let cacheDir: string | null = null;

/** This process's cache directory, made on first use and removed at exit. */
function ownCacheDir(): string {
  if (cacheDir) return cacheDir;
  const dir = fs().mkdtempSync(path().join(builtin("node:os").tmpdir(), "mitogen-filecache-"));
  cacheDir = dir;
  const remove = () => {
    try {
      for (const name of fs().readdirSync(dir)) fs().unlinkSync(path().join(dir, name));
      fs().rmdirSync(dir);
    } catch {
      // gone already
    }
  };
  const g = globalThis as { Deno?: unknown; addEventListener?: (type: string, fn: () => void) => void };
  if (g.Deno && g.addEventListener) g.addEventListener("unload", remove);
  else nodeProcess().on("exit", remove);
  return dir;
}

let cached = 0;

/** One file fetched from the parent into the cache: complete, or still arriving (readers wait for its bytes). */
class CacheEntry {
  head: Head | null = null;
  /** Bytes written to the cache file so far. */
  written = 0;
  done = false;
  error: Error | null = null;
  readonly file: string;
  #wake: (() => void)[] = [];
  /** Resolves once the head is known (rejects as the fetch fails). */
  readonly started: Promise<Head>;

  readonly #failed: () => void;

  constructor(router: Router, wanted: string, onFail: () => void) {
    this.#failed = onFail;
    this.file = path().join(ownCacheDir(), String(++cached));
    this.started = this.#fetch(router, wanted).catch((err: unknown) => {
      this.error = err instanceof Error ? err : new MitogenError(String(err));
      this.#failed();
      this.#notify();
      throw this.error;
    });
    this.started.catch(() => {});
  }

  #notify(): void {
    for (const w of this.#wake.splice(0)) w();
  }

  /** Until more is written, the fetch ends, or it fails. */
  changed(): Promise<void> {
    return new Promise((go) => this.#wake.push(go));
  }

  async #fetch(router: Router, wanted: string): Promise<Head> {
    const f = fs();
    const parent = router.contextById(router.parentIds[0] ?? 0);
    const data = new Receiver(router, { respondent: parent });
    const remote = parent.callService(FILE_SERVICE, "fetch", { path: wanted, data: data.toSender() });
    let failed: unknown = null;
    remote.catch((err: unknown) => {
      failed = err;
      data.close();
    });
    const next = async (): Promise<unknown> => {
      try {
        return (await data.get()).unpickle();
      } catch (err) {
        await remote.catch(() => {});
        throw failed ?? new FileServiceError(`fetch of ${wanted} from ${parent.name} ended before the end of the file`, { cause: err });
      }
    };
    const fd = await call<number>(f.open, this.file, f.constants.O_RDWR | f.constants.O_CREAT | f.constants.O_EXCL | f.constants.O_NOFOLLOW, 0o600);
    let head: Head;
    try {
      head = (await next()) as Head;
    } catch (err) {
      f.close(fd, () => {});
      data.close();
      throw err;
    }
    this.head = head;
    const hash = sha256();
    void (async () => {
      try {
        for (;;) {
          const value = await next();
          if (value instanceof Uint8Array) {
            hash.update(value);
            for (let off = 0, n = 0; off < value.byteLength; off += n)
              n = await call<number>(f.write, fd, value, off, value.byteLength - off, this.written + off);
            this.written += value.byteLength;
            this.#notify();
          } else if (isEnd(value)) {
            const mine = hash.digest("hex");
            if (value.bytes !== this.written || value.end !== mine)
              throw new FileServiceError(
                `fetch of ${wanted} from ${parent.name}: ${this.written} bytes (sha256 ${mine}) arrived, ${value.bytes} (${value.end}) were sent`,
              );
            break;
          }
        }
        await remote;
        this.done = true;
      } catch (err) {
        this.error = err instanceof Error ? err : new MitogenError(String(err));
        this.#failed();
      } finally {
        f.close(fd, () => {});
        data.close();
        this.#notify();
      }
    })();
    return head;
  }

  /** A reader of this entry, on a descriptor of its own (Deno 1.x seeks before a positional read). */
  async reader(): Promise<Source> {
    const head = await this.started;
    const fd = await call<number>(fs().open, this.file, fs().constants.O_RDONLY | fs().constants.O_NOFOLLOW);
    let open = true;
    return {
      head,
      read: async (offset, max) => {
        while (offset >= this.written && !this.done) {
          if (this.error) throw this.error;
          await this.changed();
        }
        if (this.error) throw this.error;
        const left = Math.min(max, this.written - offset);
        if (left <= 0) return null;
        const buf = new Uint8Array(left);
        let n = 0;
        for (let k = 1; n < left && k > 0; n += k) k = await call<number>(fs().read, fd, buf, n, left - n, offset + n);
        return buf;
      },
      close: () => {
        if (open) fs().close(fd, () => {});
        open = false;
      },
    };
  }
}

const caches = new WeakMap<Router, Map<string, CacheEntry>>();

/** The file `wanted` as this context can serve it: the master's registered file, or this hop's cached copy (fetched once). */
function sourceOf(router: Router, wanted: string, via: number): Promise<Source> {
  if (router.parentIds.length === 0) return openRegistered(router, wanted, via);
  if (typeof wanted !== "string" || !wanted.startsWith("/") || wanted.split("/").includes(".."))
    return Promise.reject(new FileServiceError(`refused: ${JSON.stringify(wanted)} is not an absolute path without .. segments`));
  let map = caches.get(router);
  if (!map) caches.set(router, (map = new Map()));
  const entries = map;
  let entry = entries.get(wanted);
  if (!entry) {
    const made: CacheEntry = new CacheEntry(router, wanted, () => {
      if (entries.get(wanted) === made) entries.delete(wanted);
    });
    entries.set(wanted, made);
    entry = made;
  }
  return entry.reader();
}

/** Stream `source` to `data`: head, chunks, end. */
async function serve(source: Source, data: Sender): Promise<{ bytes: number; sha256: string }> {
  const hash = sha256();
  let offset = 0;
  await data.send(source.head);
  for (;;) {
    const chunk = await source.read(offset, CHUNK);
    if (!chunk) break;
    hash.update(chunk);
    offset += chunk.byteLength;
    await data.send(chunk);
  }
  const end: End = { end: hash.digest("hex"), bytes: offset };
  await data.send(end);
  return { bytes: offset, sha256: end.end };
}

/** Copy `source` to `to` through a new file beside it (O_EXCL, 0600), renamed over `to` once complete. */
async function copyTo(source: Source, to: string, where: string): Promise<{ bytes: number; sha256: string }> {
  const f = fs();
  const tmp = path().join(path().dirname(to), `.mitogen-fetch.${nodeProcess().pid}.${builtin("node:crypto").randomBytes(6).toString("hex")}`);
  let fd: number;
  try {
    fd = await call<number>(f.open, tmp, f.constants.O_WRONLY | f.constants.O_CREAT | f.constants.O_EXCL | f.constants.O_NOFOLLOW, 0o600);
  } catch (err) {
    throw new FileServiceError(`cannot write ${to} in ${where}: ${(err as Error)?.message ?? err}`, { cause: err });
  }
  const hash = sha256();
  let offset = 0;
  try {
    for (;;) {
      const chunk = await source.read(offset, CHUNK);
      if (!chunk) break;
      hash.update(chunk);
      for (let off = 0, n = 0; off < chunk.byteLength; off += n) n = await call<number>(f.write, fd, chunk, off, chunk.byteLength - off, offset + off);
      offset += chunk.byteLength;
    }
    if (typeof f.fchmod === "function") await call(f.fchmod, fd, source.head.mode & 0o777);
    else await call(f.chmod, tmp, source.head.mode & 0o777);
    await call(f.fsync, fd);
    await call(f.close, fd);
    await call(f.rename, tmp, to);
  } catch (err) {
    f.close(fd, () => {});
    f.unlink(tmp, () => {});
    throw err instanceof FileServiceError ? err : new FileServiceError(`cannot write ${to} in ${where}: ${(err as Error)?.message ?? err}`, { cause: err });
  }
  return { bytes: offset, sha256: hash.digest("hex") };
}

async function using<T>(source: Promise<Source>, fn: (s: Source) => Promise<T>): Promise<T> {
  const s = await source;
  try {
    return await fn(s);
  } finally {
    s.close();
  }
}

/** The id of the master's child on the way to context `id` (the one that fetches from the master on its behalf). */
function firstHop(router: Router, id: number): number {
  let at = id;
  for (let i = 0; i < 64; i++) {
    const up = router.parentOf(at);
    if (up === undefined || up === router.myId) return at;
    at = up;
  }
  return at;
}

const str = (v: unknown): v is string => typeof v === "string";
/** A hand-made Standard Schema of a string (no dependency). */
const aString: StandardSchemaV1<string> = {
  "~standard": {
    version: 1,
    vendor: "mitogen",
    validate: (v: unknown) => (str(v) ? { value: v } : { issues: [{ message: "expected a string" }] }),
  },
};
const aSender: StandardSchemaV1<Sender> = {
  "~standard": {
    version: 1,
    vendor: "mitogen",
    validate: (v: unknown) => (typeof (v as Sender | null)?.send === "function" ? { value: v as Sender } : { issues: [{ message: "expected a Sender" }] }),
  },
};

/** A file service method as its callers see it: its argument `A`, checked field by field, and its result `R`. */
export interface FileServiceMethod<A, R> {
  policy?: ServicePolicy;
  args: { [K in keyof A]: StandardSchemaV1<A[K]> };
  run(args: A, call: ServiceCall): Promise<R>;
}

/** The file service's methods (see {@link fileService}). */
export interface FileServiceMethods {
  /** Stream `path` through `data` (what a hop asks its parent). */
  fetch: FileServiceMethod<{ path: string; data: Sender }, { bytes: number; sha256: string }>;
  /** Write `path` to `to` here. */
  get: FileServiceMethod<{ path: string; to: string }, { bytes: number; sha256: string }>;
  /** The bytes of `path`. */
  read: FileServiceMethod<{ path: string }, Uint8Array>;
  /** Fetch `path` into this context's cache ahead of need. */
  prefetch: FileServiceMethod<{ path: string }, { bytes: number }>;
}

/**
 * The file service (Mitogen's FileService with PushFileService's `get`): in the master it serves
 * registered files ({@link registerFiles}); in any other context the files it fetched from its
 * parent, cached. Call it by name in any context: `ctx.callService("mitogen.FileService", "get",
 * { path, to })`.
 *
 * - `fetch({ path, data })`: stream the file to Sender `data` (`{ size, mode, mtime }`, chunks,
 *   `{ end, bytes }`); for the contexts below (policy `"children"`).
 * - `get({ path, to })`: make this context hold the file, fetched through its parents (once per
 *   hop), and copy it to local file `to` (written beside it, renamed over it); `{ bytes, sha256 }`.
 * - `read({ path })`: the file's bytes (a small file).
 * - `prefetch({ path })`: fetch it into this context's cache ahead of need (what {@link pushFiles}
 *   calls); `{ bytes }`.
 *
 * @example
 * ```ts
 * import { type CallContext, fileService, registerFiles, Router, takesRouter } from "mitogen";
 * import { tmpdir } from "node:os";
 * await using router = new Router();
 * await registerFiles(router, { paths: ["/etc/hostname"] });
 * const child = await router.local();
 * const to = `${tmpdir()}/hostname-copy`;
 * const copied = await child.call(
 *   takesRouter((to: string, { router }: CallContext) =>
 *     router.myself().service<typeof fileService>("mitogen.FileService").get({ path: "/etc/hostname", to }),
 *   ),
 *   to,
 * );
 * console.log(copied); // { bytes: 5, sha256: "..." }
 * ```
 */
export const fileService: ServiceDef<typeof FILE_SERVICE, FileServiceMethods> = defineService({
  name: FILE_SERVICE,
  methods: {
    fetch: {
      policy: "children",
      args: { path: aString, data: aSender },
      run: ({ path: p, data }, { router, caller }) => using(sourceOf(router, p, firstHop(router, caller.contextId)), (s) => serve(s, data)),
    },
    get: {
      args: { path: aString, to: aString },
      run: ({ path: p, to }, { router }) => using(sourceOf(router, p, router.myId), (s) => copyTo(s, to, router.name)),
    },
    read: {
      args: { path: aString },
      run: ({ path: p }, { router }) =>
        using(sourceOf(router, p, router.myId), async (s) => {
          const parts: Uint8Array[] = [];
          let offset = 0;
          for (let c = await s.read(0, CHUNK); c; c = await s.read(offset, CHUNK)) {
            parts.push(c);
            offset += c.byteLength;
          }
          const out = new Uint8Array(offset);
          let at = 0;
          for (const c of parts) {
            out.set(c, at);
            at += c.byteLength;
          }
          return out;
        }),
    },
    prefetch: {
      args: { path: aString },
      run: ({ path: p }, { router }) =>
        using(sourceOf(router, p, router.myId), async (s) => {
          let offset = 0;
          for (let c = await s.read(0, CHUNK); c; c = await s.read(offset, CHUNK)) offset += c.byteLength;
          return { bytes: offset };
        }),
    },
  },
});

/**
 * Push `paths` (files of the master) to `context` ahead of need, as Mitogen's PushFileService: each
 * context on its via chain fetches them once and keeps a copy for its children, and `context`
 * holds them for a later `get` or `read`. Pushing grants these files, registered or not, to the
 * master's child on that chain (so to it and the contexts below it), and to no other context.
 *
 * @example
 * ```ts
 * import { type CallContext, pushFiles, Router, takesRouter } from "mitogen";
 * await using router = new Router();
 * const hop = await router.local({ name: "hop" });
 * const leaf = await router.local({ name: "leaf", via: hop });
 * await pushFiles(router, leaf, ["/etc/hostname"]); // hop and leaf hold it now
 * const read = takesRouter(({ router }: CallContext) => router.myself().callService("mitogen.FileService", "read", { path: "/etc/hostname" }));
 * console.log((await leaf.call(read) as Uint8Array).length); // 5
 * ```
 */
export async function pushFiles(router: Router, context: Context, paths: string[]): Promise<void> {
  const reg = registryOf(router);
  const hop = firstHop(router, context.contextId);
  for (const p of paths) {
    const real = await realPath(p, "cannot push");
    let ids = reg.pushed.get(real);
    if (!ids) reg.pushed.set(real, (ids = new Set()));
    ids.add(hop);
  }
  await Promise.all(paths.map((p) => context.callService(FILE_SERVICE, "prefetch", { path: p })));
}

/** The services this module defines, for activation by name. */
export const services: ServiceDef[] = [fileService];
