/**
 * The compressed payloads a master sends: the core (every child) and the
 * library's shipped modules (e.g. the parent module, for children that start
 * children). In `dist/mitogen.mjs` they
 * are constants written at build time; running from source, they are built
 * once per process with esbuild (see build.ts).
 *
 * @module
 */

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

/** The compressed payloads and their raw sizes. */
export interface Payloads {
  /** The core for ES2022 runtimes (CORE.MODERN). */
  core: Uint8Array;
  /** The core lowered for Node 12 (CORE.LOWERED). */
  coreLowered: Uint8Array;
  /** The shipped modules of {@link SHIPPED}, compressed. */
  modules: Record<ShippedName, Uint8Array>;
  coreRaw: number;
  coreLoweredRaw: number;
  modulesRaw: Record<ShippedName, number>;
}

declare const MITOGEN_PAYLOADS:
  | {
      core: string;
      coreLowered: string;
      modules: Record<ShippedName, string>;
      coreRaw: number;
      coreLoweredRaw: number;
      modulesRaw: Record<ShippedName, number>;
    }
  | undefined;

const decode = (b64: string): Uint8Array => new Uint8Array(Buffer.from(b64, "base64"));

let cached: Promise<Payloads> | null = null;

/** The payloads, built or decoded once per process. */
export function payloads(): Promise<Payloads> {
  cached ??=
    typeof MITOGEN_PAYLOADS === "undefined"
      ? import(new URL("./build.ts", import.meta.url).href).then((m: { buildPayloads(): Promise<Payloads> }) => m.buildPayloads())
      : Promise.resolve({
          core: decode(MITOGEN_PAYLOADS.core),
          coreLowered: decode(MITOGEN_PAYLOADS.coreLowered),
          modules: Object.fromEntries(Object.entries(MITOGEN_PAYLOADS.modules).map(([k, v]) => [k, decode(v)])) as Record<ShippedName, Uint8Array>,
          coreRaw: MITOGEN_PAYLOADS.coreRaw,
          coreLoweredRaw: MITOGEN_PAYLOADS.coreLoweredRaw,
          modulesRaw: MITOGEN_PAYLOADS.modulesRaw,
        });
  return cached;
}
