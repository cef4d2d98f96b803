/**
 * The compressed payloads a master sends: the core (every child) and the
 * library's shipped modules (e.g. the parent module, for children that start
 * children). In `dist/mitogen.mjs` they are constants written at build time;
 * a copy of the sources served over http (JSR) reads them from
 * dist/payloads.json, written by the build that preceded its publishing;
 * running from source files, they are built once per process with esbuild
 * (see build.ts).
 *
 * @module
 */
import { MitogenError } from "./errors.ts";

/**
 * The library's own shipped modules, by name, and their source: the master has each built in, and a
 * child fetches one (GET_MODULE) the first time it needs it, like any `ctx.import`ed module.
 */
export const SHIPPED = {
  /** Starting children: first stage, bootstrap, connection methods. */
  "mitogen:parent": "parent.ts",
  /** A subprocess with its stdio tunnelled through the tree (fakessh's remote half). */
  "mitogen:tunnel": "tunnel.ts",
  /** File transfer: putFile, getFile, fan-out relays. */
  "mitogen:files": "files.ts",
  /** Listeners: sessions attaching to a context (router.listen), with tweetnacl handshakes. */
  "mitogen:listen": "listen.ts",
  /** Services: the pool, policies, argument checks, activation (router.serve, CALL_SERVICE). */
  "mitogen:service": "service.ts",
  /** The file service and pushes (Mitogen's FileService, PushFileService): files fetched through the tree, cached per hop. */
  "mitogen:fileservice": "fileservice.ts",
  /** The context service (Mitogen's ContextService): one context per spec, shared by every caller. */
  "mitogen:contextservice": "contextservice.ts",
} as const;

/** A library module shipped to children on demand. */
export type ShippedName = keyof typeof SHIPPED;

/** The compressed payloads (as `B`: bytes, or base64 in JSON) and their raw sizes. */
interface PayloadSet<B> {
  /** The core for ES2022 runtimes (CORE.MODERN). */
  core: B;
  /** The core lowered for Node 12 (CORE.LOWERED). */
  coreLowered: B;
  /** The shipped modules of {@link SHIPPED}, compressed. */
  modules: Record<ShippedName, B>;
  coreRaw: number;
  coreLoweredRaw: number;
  modulesRaw: Record<ShippedName, number>;
}

/** The compressed payloads and their raw sizes. */
export type Payloads = PayloadSet<Uint8Array>;

/** The payloads as JSON: base64 for the bytes. The single file has them built in; a copy of the sources served over http (JSR) has them in dist/payloads.json. */
export type PayloadsJson = PayloadSet<string>;

declare const MITOGEN_PAYLOADS: PayloadsJson | undefined;

/** Where a copy of the sources that is not on disk (JSR, any http server) finds its payloads, built when it was published. */
export const PREBUILT = "./dist/payloads.json";

const decode = (b64: string): Uint8Array => new Uint8Array(Buffer.from(b64, "base64"));

const fromJson = (p: PayloadsJson): Payloads => ({
  core: decode(p.core),
  coreLowered: decode(p.coreLowered),
  modules: Object.fromEntries(Object.entries(p.modules).map(([k, v]) => [k, decode(v)])) as Record<ShippedName, Uint8Array>,
  coreRaw: p.coreRaw,
  coreLoweredRaw: p.coreLoweredRaw,
  modulesRaw: p.modulesRaw,
});

/** The payloads a copy of the sources served from `here` (not a file) was published with. */
async function prebuilt(here: string): Promise<Payloads> {
  const url = new URL(PREBUILT, here).href;
  try {
    const json = (await import(url, { with: { type: "json" } })) as { default: PayloadsJson };
    return fromJson(json.default);
  } catch (err) {
    throw new MitogenError(
      `mitogen was loaded from ${here}, not from files, and its prebuilt payloads (${url}) did not load: publish with \`npm run publish:jsr\`, which builds them first`,
      { cause: err },
    );
  }
}

let cached: Promise<Payloads> | null = null;

/** The payloads, built or decoded once per process: built in (the single file), prebuilt (served over http) or built from the sources here. */
export function payloads(): Promise<Payloads> {
  cached ??=
    typeof MITOGEN_PAYLOADS !== "undefined"
      ? Promise.resolve(fromJson(MITOGEN_PAYLOADS))
      : !import.meta.url.startsWith("file:")
        ? prebuilt(import.meta.url)
        : import(new URL("./build.ts", import.meta.url).href).then((m: { buildPayloads(): Promise<Payloads> }) => m.buildPayloads());
  return cached;
}
