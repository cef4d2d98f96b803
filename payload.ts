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
  core: Uint8Array;
  parent: Uint8Array;
  coreRaw: number;
  parentRaw: number;
}

declare const MITOGEN_PAYLOADS: { core: string; parent: string; coreRaw: number; parentRaw: number } | undefined;

let cached: Promise<Payloads> | null = null;

/** The payloads, built or decoded once per process. */
export function payloads(): Promise<Payloads> {
  cached ??=
    typeof MITOGEN_PAYLOADS === "undefined"
      ? import(new URL("./build.ts", import.meta.url).href).then((m: { buildPayloads(): Promise<Payloads> }) => m.buildPayloads())
      : Promise.resolve({
          core: new Uint8Array(Buffer.from(MITOGEN_PAYLOADS.core, "base64")),
          parent: new Uint8Array(Buffer.from(MITOGEN_PAYLOADS.parent, "base64")),
          coreRaw: MITOGEN_PAYLOADS.coreRaw,
          parentRaw: MITOGEN_PAYLOADS.parentRaw,
        });
  return cached;
}
