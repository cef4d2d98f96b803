/**
 * The core payload a child gets, behind one function (`coreToSend`): the compressed core, the
 * core's plain script, or, for a local node child, a small loader followed by the script and V8's
 * code cache for that runtime (asked of the first such child); and a pipelined start's first
 * payload, the core picker (`pickerToSend`). Part of `mitogen:parent`.
 *
 * @module
 */
import { builtin } from "./runtime.ts";
import { joinParts } from "./bytes.ts";
import type { Router } from "./router.ts";
import { corePicker } from "./firststage.ts";

/** What a child's first stage is sent after the payload's length, and the code cache asked of it. */
export interface CoreToSend {
  /** The payload the first stage runs: the core (compressed, or its plain script), or {@link LOADER}. */
  payload: Uint8Array;
  /** After the loader: the core's script and its code cache, if any (see {@link codeCached}); null without a loader. */
  rest: Uint8Array | null;
  /** Where the child is to send the code cache it makes (CONFIGURE's `codeCache`), when it is asked for one. */
  reply?: number;
  /** Forget a code cache asked for whose answer will not come. */
  drop: () => void;
}

/**
 * The core payload `core` for child `id`: plain (its script; the first stage takes it as it is) or
 * compressed; or with `cacheKey` (a local node child: its executable, NODE_OPTIONS, version and
 * core) the loader, the script and V8's code cache (see {@link codeCached}).
 */
export function coreToSend(router: Router, core: Uint8Array, id: number, plain: boolean | undefined, cacheKey: string | undefined): CoreToSend {
  const cached = cacheKey === undefined ? null : codeCached(router, cacheKey, core, id);
  if (!cached) return { payload: plain ? plainCore(core) : core, rest: null, drop: () => {} };
  return { payload: LOADER, ...cached };
}

let pickers: { plain: Uint8Array; deflated: Uint8Array } | null = null;

/** The payload of a pipelined start (see {@link corePicker}), plain or deflated. */
export function pickerToSend(plain: boolean | undefined): Uint8Array {
  if (!pickers) {
    const text = new TextEncoder().encode(corePicker());
    pickers = { plain: text, deflated: new Uint8Array(builtin("node:zlib").deflateRawSync(text)) };
  }
  return plain ? pickers.plain : pickers.deflated;
}

const plainCores = new WeakMap<Uint8Array, Uint8Array>();

/** The script of a compressed core payload, inflated once. */
function plainCore(core: Uint8Array): Uint8Array {
  let plain = plainCores.get(core);
  if (!plain) plainCores.set(core, (plain = new Uint8Array(builtin("node:zlib").inflateRawSync(core))));
  return plain;
}

/** Per child runtime (executable, NODE_OPTIONS, version, core): what follows the loader, with V8's code cache of the core; or "asked". */
const codeCaches = new Map<string, { rest: Uint8Array } | "asked">();

/**
 * The payload for a local node child whose core goes with a code cache: it reads `<u32 n><u32 m>`, the core's
 * script (n bytes) and the cache (m bytes, none yet when m is 0) that follow it on the stream, and compiles the
 * script with `vm.Script` (see {@link codeCached}).
 */
const LOADER = new TextEncoder().encode(
  'const s=B.socket,f=d=>{b=b?Buffer.concat([b,d]):d;if(b.length<8)return;const n=b.readUInt32BE(),m=b.readUInt32BE(4),e=8+n+m;if(b.length<e)return;s.pause().off("data",f);b.length>e&&s.unshift(b.subarray(e));' +
    'const c=new(B.require("vm").Script)(b.toString("latin1",8,8+n),m?{cachedData:b.subarray(8+n,e)}:{});c.runInThisContext()(Object.assign(B,{script:c}))};' +
    'let b;s.on("data",f).resume()',
);

/** The core's script, made a function of the boot object as `new Function("B", script)` would. */
const WRAP = [new TextEncoder().encode("(function(B){"), new TextEncoder().encode("\n})")] as const;

/**
 * What a local node child gets after {@link LOADER}: the core, and V8's code cache for that runtime once a child
 * has made one (the core then compiles in about 1 ms instead of 5, and the functions that child ran start
 * compiled). Without one yet, the first such child is asked for it: its CONFIGURE gets `codeCache`, a handle
 * here, and it answers with `createCachedData()` before it runs any call, so no code sent to it has run when it
 * is made. `drop` forgets an answer that never came.
 */
function codeCached(router: Router, key: string, core: Uint8Array, id: number): { rest: Uint8Array; reply?: number; drop: () => void } {
  const have = codeCaches.get(key);
  if (have && have !== "asked") return { rest: have.rest, drop: () => {} };
  const script = plainCore(core);
  const rest = (cache = new Uint8Array(0)) => {
    const head = new Uint8Array(8);
    new DataView(head.buffer).setUint32(0, WRAP[0].byteLength + script.byteLength + WRAP[1].byteLength);
    new DataView(head.buffer).setUint32(4, cache.byteLength);
    const parts = [head, WRAP[0], script, WRAP[1], cache];
    return joinParts(
      parts,
      parts.reduce((n, p) => n + p.byteLength, 0),
    );
  };
  if (have === "asked") return { rest: rest(), drop: () => {} };
  codeCaches.set(key, "asked");
  let reply = 0;
  const drop = () => {
    router.delHandler(reply);
    if (codeCaches.get(key) === "asked") codeCaches.delete(key);
  };
  reply = router.addHandler(
    (msg) => {
      let cache: unknown = null;
      try {
        cache = msg.src === id && !msg.isDead ? msg.unpickle() : null;
      } catch {
        // not a value: no cache
      }
      if (cache instanceof Uint8Array && cache.byteLength <= 8 * 1024 * 1024) codeCaches.set(key, { rest: rest(new Uint8Array(cache)) });
      else drop();
    },
    { persist: false },
  );
  return { rest: rest(), reply, drop };
}
