/**
 * The compressed payloads a master sends: the core (every child) and the
 * parent module (children that start children). In `dist/mitogen.mjs` they
 * are constants written at build time; running from source, they are built
 * once per process with esbuild (see build.ts).
 *
 * @module
 */

/** The compressed payloads and their raw sizes. */
export interface Payloads {
  /** The core for ES2022 runtimes (CORE.MODERN). */
  core: Uint8Array;
  /** The core lowered for Node 12 (CORE.LOWERED). */
  coreLowered: Uint8Array;
  parent: Uint8Array;
  coreRaw: number;
  coreLoweredRaw: number;
  parentRaw: number;
}

declare const MITOGEN_PAYLOADS: { core: string; coreLowered: string; parent: string; coreRaw: number; coreLoweredRaw: number; parentRaw: number } | undefined;

let cached: Promise<Payloads> | null = null;

/** The payloads, built or decoded once per process. */
export function payloads(): Promise<Payloads> {
  cached ??=
    typeof MITOGEN_PAYLOADS === "undefined"
      ? import(new URL("./build.ts", import.meta.url).href).then((m: { buildPayloads(): Promise<Payloads> }) => m.buildPayloads())
      : Promise.resolve({
          core: new Uint8Array(Buffer.from(MITOGEN_PAYLOADS.core, "base64")),
          coreLowered: new Uint8Array(Buffer.from(MITOGEN_PAYLOADS.coreLowered, "base64")),
          parent: new Uint8Array(Buffer.from(MITOGEN_PAYLOADS.parent, "base64")),
          coreRaw: MITOGEN_PAYLOADS.coreRaw,
          coreLoweredRaw: MITOGEN_PAYLOADS.coreLoweredRaw,
          parentRaw: MITOGEN_PAYLOADS.parentRaw,
        });
  return cached;
}
