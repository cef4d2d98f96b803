/** handshake.ts over real sockets: shared-key and key-pair handshakes, sealed frames, garbage. */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createConnection, createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import fc from "fast-check";
import nacl from "tweetnacl";
import { nodeTransport, type Transport } from "../transport.ts";
import { StreamError } from "../errors.ts";
import {
  acceptSealed,
  acceptWithKey,
  BOX_AT,
  connectSealed,
  connectWithKey,
  generateKeyPair,
  HANDSHAKE_FAILURE,
  type HandshakeError,
  type HandshakeFailure,
  openInPlace,
  sealFrame,
} from "../handshake.ts";
import { checkLeaks, waitFor } from "./helpers.ts";

checkLeaks();

type Kind = "tcp" | "unix";

/** Two ends of a real connection: a node:net server on 127.0.0.1 port 0 or on a unix socket in a tmp dir. */
async function socketPair(kind: Kind): Promise<{ server: Socket; client: Socket; cleanup: () => void }> {
  const dir = kind === "unix" ? mkdtempSync(join(tmpdir(), "mitogen-hs-")) : null;
  const srv = createServer();
  const accepted = new Promise<Socket>((resolve) => srv.once("connection", resolve));
  await new Promise<void>((resolve) => (dir ? srv.listen(join(dir, "s"), resolve) : srv.listen(0, "127.0.0.1", resolve)));
  const address = srv.address();
  const client = dir ? createConnection(join(dir, "s")) : createConnection((address as { port: number }).port, "127.0.0.1");
  await new Promise<void>((resolve, reject) => {
    client.once("connect", resolve);
    client.once("error", reject);
  });
  const server = await accepted;
  srv.close(); // stops listening now; its callback would wait for the connections
  if (dir) rmSync(dir, { recursive: true, force: true });
  for (const s of [server, client]) s.on("error", () => {});
  return {
    server,
    client,
    cleanup: () => {
      server.destroy();
      client.destroy();
    },
  };
}

const closed = (s: Socket): Promise<void> => (s.destroyed ? Promise.resolve() : new Promise((resolve) => s.once("close", () => resolve())));

/** Everything a transport delivers, and how it ended. */
function collect(t: Transport): { chunks: Uint8Array[]; bytes: () => Uint8Array; ended: Promise<Error | undefined> } {
  const chunks: Uint8Array[] = [];
  const ended = new Promise<Error | undefined>((resolve) => t.start((c) => chunks.push(c.slice()), resolve));
  return {
    chunks,
    ended,
    bytes: () => {
      const out = new Uint8Array(chunks.reduce((n, c) => n + c.byteLength, 0));
      let at = 0;
      for (const c of chunks) {
        out.set(c, at);
        at += c.byteLength;
      }
      return out;
    },
  };
}

/** Bytes whose every position says where it is (so loss, duplication and reordering show). */
function pattern(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 31 + seed + (i >>> 8)) & 255;
  return out;
}

async function rejectsWith(p: Promise<unknown>, reason: HandshakeFailure): Promise<void> {
  await assert.rejects(p, (err: HandshakeError) => {
    assert.equal(err.name, "HandshakeError");
    assert.equal(err.reason, reason, err.message);
    assert.match(err.message, new RegExp(reason));
    return true;
  });
}

/** A raw transport whose outgoing writes go through `edit` (which returns the parts to really write). */
function tampered(raw: Transport, edit: (parts: readonly Uint8Array[], call: number) => readonly Uint8Array[]): Transport {
  let call = 0;
  return { ...raw, write: (parts) => raw.write(edit(parts, call++)) };
}

interface Handshake {
  name: string;
  kind: Kind;
  accept(raw: Transport, timeoutMs?: number): Promise<Transport>;
  connect(raw: Transport, timeoutMs?: number): Promise<Transport>;
}

const server = generateKeyPair();
const client = generateKeyPair();
const key = nacl.randomBytes(32);
const HANDSHAKES: Handshake[] = [
  {
    name: "shared key over a unix socket",
    kind: "unix",
    accept: (raw, timeoutMs = 10_000) => acceptWithKey(raw, key, { timeoutMs }),
    connect: (raw, timeoutMs = 10_000) => connectWithKey(raw, key, { timeoutMs }),
  },
  {
    name: "key pairs over TCP",
    kind: "tcp",
    accept: async (raw, timeoutMs = 10_000) =>
      (await acceptSealed(raw, { keyPair: server, authorizedKeys: [generateKeyPair().publicKey, client.publicKey], timeoutMs })).transport,
    connect: (raw, timeoutMs = 10_000) => connectSealed(raw, { keyPair: client, serverKey: server.publicKey, timeoutMs }),
  },
];

test("generateKeyPair: base64 of 32-byte keys, the public key is the secret key's", () => {
  const pair = generateKeyPair();
  for (const k of [pair.publicKey, pair.secretKey]) {
    assert.match(k, /^[A-Za-z0-9+/]{43}=$/);
    assert.equal(Buffer.from(k, "base64").byteLength, 32);
    assert.equal(Buffer.from(Buffer.from(k, "base64")).toString("base64"), k);
  }
  const derived = nacl.box.keyPair.fromSecretKey(new Uint8Array(Buffer.from(pair.secretKey, "base64")));
  assert.equal(Buffer.from(derived.publicKey).toString("base64"), pair.publicKey);
  assert.notEqual(generateKeyPair().secretKey, pair.secretKey);
});

for (const hs of HANDSHAKES) {
  describe(hs.name, () => {
    test("bytes both ways, large writes intact and in order, bytes before start kept", async () => {
      const { server: s, client: c, cleanup } = await socketPair(hs.kind);
      try {
        const [a, b] = await Promise.all([hs.accept(nodeTransport(s, s)), hs.connect(nodeTransport(c, c))]);
        // Written at once, read only after a pause: the other side must keep them for start().
        a.write([new Uint8Array([1, 2, 3])]);
        b.write([new Uint8Array([9])]);
        await new Promise((r) => setTimeout(r, 50));
        const fromA = collect(b);
        const fromB = collect(a);
        const big = pattern(5 * 1024 * 1024 + 7, 1); // several sealed frames, and a cut in the middle of one write
        a.write([big.subarray(0, 100), big.subarray(100)]);
        b.write([pattern(3 * 1024 * 1024, 2)]);
        for (let i = 0; i < 50; i++) a.write([new Uint8Array([i])]);
        await Promise.all([a.flush(), b.flush()]);
        await waitFor(() => fromA.bytes().byteLength === 3 + big.byteLength + 50, 30_000, "a's bytes at b");
        await waitFor(() => fromB.bytes().byteLength === 1 + 3 * 1024 * 1024, 30_000, "b's bytes at a");
        const gotA = fromA.bytes();
        assert.deepEqual(gotA.subarray(0, 3), new Uint8Array([1, 2, 3]));
        assert.ok(Buffer.from(gotA.subarray(3, 3 + big.byteLength)).equals(big), "the large write arrived intact");
        assert.deepEqual(
          [...gotA.subarray(3 + big.byteLength)],
          Array.from({ length: 50 }, (_, i) => i),
        );
        const gotB = fromB.bytes();
        assert.equal(gotB[0], 9);
        assert.ok(Buffer.from(gotB.subarray(1)).equals(pattern(3 * 1024 * 1024, 2)));
        a.close();
        assert.equal(await fromB.ended, undefined, "a clean close ends a without an error");
        assert.equal(await fromA.ended, undefined, "and b");
      } finally {
        cleanup();
      }
    });

    test("an end before start is kept for start", async () => {
      const { server: s, client: c, cleanup } = await socketPair(hs.kind);
      try {
        const [a, b] = await Promise.all([hs.accept(nodeTransport(s, s)), hs.connect(nodeTransport(c, c))]);
        a.write([new Uint8Array([7, 7])]);
        await a.flush();
        a.close();
        await closed(c);
        const got = collect(b);
        assert.equal(await got.ended, undefined);
        assert.deepEqual(got.bytes(), new Uint8Array([7, 7]));
      } finally {
        cleanup();
      }
    });

    test("silence, or a peer closing mid-handshake: HandshakeError, raw transport closed", async () => {
      for (const side of ["accept", "connect"] as const) {
        const silent = await socketPair(hs.kind);
        const closing = await socketPair(hs.kind);
        try {
          const run = side === "accept" ? hs.accept : hs.connect;
          const [mine, peer] = side === "accept" ? [silent.server, silent.client] : [silent.client, silent.server];
          peer.resume(); // reads (and drops) what the handshake says, so it sees the end
          await rejectsWith(run(nodeTransport(mine, mine), 150), HANDSHAKE_FAILURE.TIMEOUT);
          await closed(mine);
          await closed(peer);
          const [mine2, peer2] = side === "accept" ? [closing.server, closing.client] : [closing.client, closing.server];
          const pending = run(nodeTransport(mine2, mine2), 5000);
          peer2.destroy();
          await rejectsWith(pending, HANDSHAKE_FAILURE.CLOSED);
          await closed(mine2);
        } finally {
          silent.cleanup();
          closing.cleanup();
        }
      }
    });

    test("a flipped byte in a frame ends the transport with an error", async () => {
      const { server: s, client: c, cleanup } = await socketPair(hs.kind);
      try {
        // The connector's handshake is its first two writes (one for the shared key); then one write per frame.
        const handshakeWrites = hs.kind === "unix" ? 1 : 2;
        const raw = tampered(nodeTransport(c, c), (parts, call) => {
          if (call !== handshakeWrites + 1) return parts;
          const last = (parts[parts.length - 1] as Uint8Array).slice();
          last[last.byteLength - 1] = (last[last.byteLength - 1] as number) ^ 0x40;
          return [...parts.slice(0, -1), last];
        });
        const [a, b] = await Promise.all([hs.accept(nodeTransport(s, s)), hs.connect(raw)]);
        const got = collect(a);
        b.write([new Uint8Array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])]);
        b.write([new Uint8Array([2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])]);
        b.write([new Uint8Array([3])]);
        if (hs.kind === "unix") {
          // Plain frames: the flip arrives as it is (the socket is private; nothing is sealed).
          await waitFor(() => got.bytes().byteLength === 41, 5000, "plain bytes");
          assert.equal(got.bytes()[39], 2 ^ 0x40);
          b.close();
          return;
        }
        const err = await got.ended;
        assert.ok(err instanceof StreamError, String(err));
        assert.match(err.message, /did not open/);
        assert.deepEqual(got.bytes(), new Uint8Array(20).fill(1), "the frame before the flip only");
        await closed(s);
      } finally {
        cleanup();
      }
    });
  });
}

test("PROTOCOL.md's handshake messages are the sizes each side sends (WELCOME is 145 bytes)", async () => {
  const doc = readFileSync(new URL("../PROTOCOL.md", import.meta.url), "utf8");
  const section = doc.slice(doc.indexOf("## Listeners: handshake and sealed frames"));
  /** The documented messages of the diagram after `heading`: [from, to, bytes]. */
  const documented = (heading: string): [string, string, number][] => {
    const block = section.slice(section.indexOf(heading)).split("\n\n")[1] ?? "";
    return [...block.matchAll(/^\s+(\w+)\s+->\s+(\w+)\s.*?(\d+) bytes$/gm)].map((m) => [m[1] as string, m[2] as string, Number(m[3])]);
  };
  for (const [hs, heading, names] of [
    [HANDSHAKES[0] as Handshake, "**Shared key**", ["listener", "connector"]],
    [HANDSHAKES[1] as Handshake, "**Key pairs**", ["server", "client"]],
  ] as const) {
    const { server: s, client: c, cleanup } = await socketPair(hs.kind);
    try {
      // Each handshake message is one write; record them in the order they are made.
      const sent: [string, string, number][] = [];
      const record = (raw: Transport, from: string, to: string): Transport =>
        tampered(raw, (parts) => {
          sent.push([from, to, parts.reduce((n, p) => n + p.byteLength, 0)]);
          return parts;
        });
      const [a, b] = await Promise.all([
        hs.accept(record(nodeTransport(s, s), names[0], names[1])),
        hs.connect(record(nodeTransport(c, c), names[1], names[0])),
      ]);
      const expected = documented(heading);
      assert.equal(expected.length, 3, `${heading}: three messages documented`);
      assert.deepEqual(sent, expected, `${heading}: the bytes sent are the ones documented`);
      a.close();
      b.close();
    } finally {
      cleanup();
    }
  }
});

describe("sealed frames", () => {
  async function sealedPair(edit?: (parts: readonly Uint8Array[], call: number) => readonly Uint8Array[]) {
    const pair = await socketPair("tcp");
    const raw = edit ? tampered(nodeTransport(pair.client, pair.client), edit) : nodeTransport(pair.client, pair.client);
    const [accepted, b] = await Promise.all([
      acceptSealed(nodeTransport(pair.server, pair.server), { keyPair: server, authorizedKeys: [client.publicKey] }),
      connectSealed(raw, { keyPair: client, serverKey: server.publicKey }),
    ]);
    assert.equal(accepted.clientKey, client.publicKey);
    return { ...pair, a: accepted.transport, b };
  }

  for (const [name, edit] of [
    [
      "replayed",
      (() => {
        let first: readonly Uint8Array[] = [];
        return (parts: readonly Uint8Array[], call: number) => {
          if (call === 2) first = parts.map((p) => p.slice());
          return call === 3 ? first : parts; // the second frame is the first one again
        };
      })(),
    ],
    [
      "reordered",
      (() => {
        let held: readonly Uint8Array[] = [];
        return (parts: readonly Uint8Array[], call: number) => {
          if (call === 2) {
            held = parts.map((p) => p.slice());
            return [];
          }
          return call === 3 ? [...parts, ...held] : parts;
        };
      })(),
    ],
  ] as const) {
    test(`a ${name} frame ends the transport with an error`, async () => {
      const { a, b, server: s, cleanup } = await sealedPair(edit);
      try {
        const got = collect(a);
        b.write([new Uint8Array([1])]);
        b.write([new Uint8Array([2])]);
        b.write([new Uint8Array([3])]);
        const err = await got.ended;
        assert.ok(err instanceof StreamError, String(err));
        assert.ok(got.bytes().byteLength <= 1 && (got.bytes()[0] ?? 1) === 1, `only the first frame, if any: ${[...got.bytes()]}`);
        await closed(s);
      } finally {
        cleanup();
      }
    });
  }

  test("a frame sealed in place from one part or two is `length u32 BE | nacl.secretbox(...)`; opened in place, only an untouched box opens", () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ maxLength: 3000 }),
        fc.uint8Array({ minLength: 24, maxLength: 24 }),
        fc.uint8Array({ minLength: 32, maxLength: 32 }),
        fc.nat(),
        fc.nat(),
        (plain, nonce, k, flip, cut) => {
          // The plaintext as one part, or cut in two (a part may be empty).
          const at = cut % (plain.byteLength + 1);
          const frame = sealFrame(cut % 2 ? [plain] : [plain.subarray(0, at), plain.subarray(at)], nonce, k);
          const box = nacl.secretbox(plain, nonce, k);
          assert.equal(frame.byteLength, 4 + box.byteLength);
          assert.equal(new DataView(frame.buffer, frame.byteOffset).getUint32(0), box.byteLength);
          assert.deepEqual(frame.subarray(4), box);
          const read = new Uint8Array(BOX_AT + box.byteLength);
          read.set(box, BOX_AT);
          const bad = read.slice();
          bad[BOX_AT + (flip % box.byteLength)] = (bad[BOX_AT + (flip % box.byteLength)] as number) ^ 1;
          assert.deepEqual(openInPlace(read, nonce, k), plain);
          assert.equal(openInPlace(bad, nonce, k), null);
        },
      ),
      { numRuns: 300 },
    );
  });

  test("a frame claiming more than the cap ends the transport (nothing allocated by it)", async () => {
    const { a, client: c, server: s, cleanup } = await sealedPair();
    try {
      const got = collect(a);
      c.write(new Uint8Array([0xff, 0xff, 0xff, 0xff, 0]));
      const err = await got.ended;
      assert.ok(err instanceof StreamError, String(err));
      assert.match(err.message, /outside/);
      assert.equal(got.chunks.length, 0);
      await closed(s);
    } finally {
      cleanup();
    }
  });
});

describe("refusals: each on the side that finds it, no transport on either", () => {
  /** Run both sides; return their settled results. */
  async function both(kind: Kind, accept: (raw: Transport) => Promise<unknown>, connect: (raw: Transport) => Promise<unknown>) {
    const { server: s, client: c, cleanup } = await socketPair(kind);
    try {
      const [a, b] = await Promise.allSettled([accept(nodeTransport(s, s)), connect(nodeTransport(c, c))]);
      await Promise.all([closed(s), closed(c)]);
      return { a, b };
    } finally {
      cleanup();
    }
  }
  const reasonOf = (r: PromiseSettledResult<unknown>): string => (r.status === "rejected" ? (r.reason as HandshakeError).reason : "resolved");

  test("wrong key (unix): the listener says wrong key, the connector that it was closed", async () => {
    const other = nacl.randomBytes(32);
    const { a, b } = await both(
      "unix",
      (raw) => acceptWithKey(raw, key),
      (raw) => connectWithKey(raw, other),
    );
    assert.equal(reasonOf(a), HANDSHAKE_FAILURE.WRONG_KEY);
    assert.equal(reasonOf(b), HANDSHAKE_FAILURE.CLOSED);
    assert.match((b as PromiseRejectedResult).reason.message, /wrong key\?/);
  });

  test("a listener that does not hold the key: the connector says wrong key", async () => {
    const { server: s, client: c, cleanup } = await socketPair("unix");
    try {
      s.write(new Uint8Array([1, ...nacl.randomBytes(24)]));
      s.once("data", () => s.write(nacl.randomBytes(80)));
      await rejectsWith(connectWithKey(nodeTransport(c, c), key), HANDSHAKE_FAILURE.WRONG_KEY);
      await closed(c);
    } finally {
      cleanup();
    }
  });

  test("client key not authorized: refused by the server; the client hears the close", async () => {
    const { a, b } = await both(
      "tcp",
      (raw) => acceptSealed(raw, { keyPair: server, authorizedKeys: [generateKeyPair().publicKey] }),
      (raw) => connectSealed(raw, { keyPair: client, serverKey: server.publicKey }),
    );
    assert.equal(reasonOf(a), HANDSHAKE_FAILURE.UNAUTHORIZED);
    assert.match((a as PromiseRejectedResult).reason.message, new RegExp(client.publicKey.replace(/[+/]/g, "\\$&")));
    assert.equal(reasonOf(b), HANDSHAKE_FAILURE.CLOSED);
    assert.match((b as PromiseRejectedResult).reason.message, /authorized\?/);
  });

  test("wrong pinned server key: refused by the client; the server hears the close", async () => {
    const { a, b } = await both(
      "tcp",
      (raw) => acceptSealed(raw, { keyPair: server, authorizedKeys: [client.publicKey] }),
      (raw) => connectSealed(raw, { keyPair: client, serverKey: generateKeyPair().publicKey }),
    );
    assert.equal(reasonOf(a), HANDSHAKE_FAILURE.CLOSED);
    assert.equal(reasonOf(b), HANDSHAKE_FAILURE.SERVER_KEY);
  });

  test("a server that names the pinned key without its secret: refused by the client", async () => {
    const { server: s, client: c, cleanup } = await socketPair("tcp");
    try {
      s.once("data", () => s.write(new Uint8Array([1, ...nacl.randomBytes(32), ...Buffer.from(server.publicKey, "base64"), ...nacl.randomBytes(80)])));
      await rejectsWith(connectSealed(nodeTransport(c, c), { keyPair: client, serverKey: server.publicKey }), HANDSHAKE_FAILURE.SERVER_KEY);
      await closed(c);
    } finally {
      cleanup();
    }
  });

  test("bad options are malformed, and close the raw transport", async () => {
    const bad: [string, (raw: Transport) => Promise<unknown>][] = [
      ["short key", (raw) => acceptWithKey(raw, new Uint8Array(31))],
      ["keyPair mismatch", (raw) => acceptSealed(raw, { keyPair: { publicKey: client.publicKey, secretKey: server.secretKey }, authorizedKeys: [] })],
      ["serverKey not base64", (raw) => connectSealed(raw, { keyPair: client, serverKey: "nope" })],
      ["authorizedKeys entry", (raw) => acceptSealed(raw, { keyPair: server, authorizedKeys: [`${client.publicKey}x`] })],
    ];
    for (const [what, run] of bad) {
      const { server: s, client: c, cleanup } = await socketPair("tcp");
      try {
        c.resume();
        await rejectsWith(run(nodeTransport(s, s)), HANDSHAKE_FAILURE.MALFORMED).catch((err: Error) => assert.fail(`${what}: ${err.message}`));
        await closed(s);
      } finally {
        cleanup();
      }
    }
  });
});

describe("property: garbage and truncated handshakes", () => {
  const RUNS = 20;
  const TIMEOUT = 100;
  /** Fails if `p` has not settled within a generous bound. */
  async function bounded<T>(p: Promise<T>, what: string): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const hang = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} hung`)), 5000);
    });
    try {
      return await Promise.race([p, hang]);
    } finally {
      clearTimeout(timer);
    }
  }
  const SIDES: { name: string; kind: Kind; run: (raw: Transport) => Promise<unknown>; connector: (raw: Transport) => Promise<unknown>; size: number }[] = [
    {
      name: "acceptWithKey",
      kind: "unix",
      run: (raw) => acceptWithKey(raw, key, { timeoutMs: TIMEOUT }),
      connector: (raw) => connectWithKey(raw, key, { timeoutMs: TIMEOUT }),
      size: 105,
    },
    {
      name: "acceptSealed",
      kind: "tcp",
      run: (raw) => acceptSealed(raw, { keyPair: server, authorizedKeys: [client.publicKey], timeoutMs: TIMEOUT }),
      connector: (raw) => connectSealed(raw, { keyPair: client, serverKey: server.publicKey, timeoutMs: TIMEOUT }),
      size: 145,
    },
    {
      name: "connectWithKey",
      kind: "unix",
      run: (raw) => connectWithKey(raw, key, { timeoutMs: TIMEOUT }),
      connector: (raw) => acceptWithKey(raw, key, { timeoutMs: TIMEOUT }),
      size: 105,
    },
    {
      name: "connectSealed",
      kind: "tcp",
      run: (raw) => connectSealed(raw, { keyPair: client, serverKey: server.publicKey, timeoutMs: TIMEOUT }),
      connector: async (raw) => (await acceptSealed(raw, { keyPair: server, authorizedKeys: [client.publicKey], timeoutMs: TIMEOUT })).transport,
      size: 145,
    },
  ];

  for (const side of SIDES) {
    test(`${side.name}: random garbage, then silence or a close, rejects with HandshakeError and closes`, async () => {
      await fc.assert(
        fc.asyncProperty(fc.uint8Array({ maxLength: 400 }), fc.boolean(), async (garbage, hangUp) => {
          const { server: s, client: c, cleanup } = await socketPair(side.kind);
          try {
            c.resume();
            c.write(garbage);
            if (hangUp) c.end();
            const result = await bounded(
              side.run(nodeTransport(s, s)).then(
                () => null,
                (e: unknown) => e,
              ),
              side.name,
            );
            assert.equal((result as HandshakeError | null)?.name, "HandshakeError", String(result));
            await bounded(closed(s), "the raw close");
          } finally {
            cleanup();
          }
        }),
        { numRuns: RUNS },
      );
    });

    test(`${side.name}: a real peer's handshake cut short rejects with HandshakeError and closes`, async () => {
      await fc.assert(
        fc.asyncProperty(fc.integer({ min: 0, max: side.size - 1 }), fc.boolean(), async (keep, hangUp) => {
          const { server: s, client: c, cleanup } = await socketPair(side.kind);
          try {
            const rawC = nodeTransport(c, c);
            let passed = 0;
            const cut = tampered(rawC, (parts) => {
              const out: Uint8Array[] = [];
              for (const p of parts) {
                const n = Math.max(0, Math.min(p.byteLength, keep - passed));
                if (n) out.push(p.subarray(0, n));
                passed += p.byteLength;
              }
              if (passed >= keep && hangUp) queueMicrotask(() => c.end());
              return out;
            });
            const peer = side.connector(cut).catch(() => {});
            const result = await bounded(
              side.run(nodeTransport(s, s)).then(
                () => null,
                (e: unknown) => e,
              ),
              side.name,
            );
            assert.equal((result as HandshakeError | null)?.name, "HandshakeError", `kept ${keep}: ${String(result)}`);
            await bounded(peer, "the peer");
            await bounded(closed(s), "the raw close");
          } finally {
            cleanup();
          }
        }),
        { numRuns: RUNS },
      );
    });
  }
});
