/** The file service (Mitogen's FileService) and pushes (PushFileService): registered files fetched through the tree, cached per hop. */
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { type CallContext, fileService, pushFiles, registerFiles, type Router, takesRouter } from "../mod.ts";
import { checkLeaks, makeFile, quietRouter, RUNTIMES, sha256Of } from "./helpers.ts";

checkLeaks();

const MiB = 1024 * 1024;

/** In a context: ask its own file service for `path`, copied to `to` (shipped source: no free variables). */
const getInto = takesRouter((path: string, to: string, call: CallContext) => call.router.myself().callService("mitogen.FileService", "get", { path, to }));
/** In a context: the bytes of `path`, from its own file service. */
const readIt = takesRouter((path: string, call: CallContext) => call.router.myself().callService("mitogen.FileService", "read", { path }));

/** Bytes the master sent down its link to context `id`. */
const sentTo = (router: Router, id: number): number => router.getStats().links.find((l) => l.id === id)?.bytesOut ?? 0;

for (const runtime of RUNTIMES) {
  describe(`${runtime} children`, () => {
    test("10 children behind one hop fetch a registered file: it crosses the master's link once", async () => {
      await using router = quietRouter();
      const dir = mkdtempSync(join(tmpdir(), "mitogen-fsvc-"));
      try {
        const size = 3 * MiB + 12345;
        const src = makeFile(join(dir, "app.bin"), size);
        await registerFiles(router, { paths: [src] });
        const hop = await router.local({ runtime, name: "fsvc-hop" });
        const leaves = await Promise.all(Array.from({ length: 10 }, (_, i) => router.local({ runtime, name: `fsvc-leaf${i}`, via: hop })));
        // Each leaf loads the service module first, so what is left on the link is the file.
        await Promise.all(leaves.map((leaf) => leaf.call(readIt, "/nonexistent").catch(() => {})));
        const before = sentTo(router, hop.contextId);
        const results = (await Promise.all(leaves.map((leaf, i) => leaf.call(getInto, src, join(dir, `copy${i}`))))) as { bytes: number; sha256: string }[];
        const crossed = sentTo(router, hop.contextId) - before;
        const want = sha256Of(src);
        for (const [i, r] of results.entries()) {
          assert.deepEqual(r, { bytes: size, sha256: want });
          assert.equal(sha256Of(join(dir, `copy${i}`)), want);
        }
        assert.ok(crossed >= size && crossed < size * 1.2, `the master's link to the hop carried ${crossed} bytes for a file of ${size}`);
        // Later fetches through the hop are served from its copy: nothing more crosses.
        const again = sentTo(router, hop.contextId);
        assert.equal(Buffer.from((await leaves[0]?.call(readIt, src)) as Uint8Array).length, size);
        assert.ok(sentTo(router, hop.contextId) - again < 64 * 1024);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test("anything not registered is refused: other files, .. escapes, symbolic links out of a registered prefix", async () => {
      await using router = quietRouter();
      const dir = mkdtempSync(join(tmpdir(), "mitogen-fsvc-"));
      try {
        const pub = join(dir, "pub");
        mkdirSync(pub);
        writeFileSync(join(pub, "ok.txt"), "public");
        writeFileSync(join(dir, "secret.txt"), "secret");
        symlinkSync(join(dir, "secret.txt"), join(pub, "link.txt"));
        symlinkSync(join(pub, "ok.txt"), join(dir, "inside-link.txt"));
        await registerFiles(router, { prefixes: [pub] });
        const hop = await router.local({ runtime, name: "fsvc-refuse-hop" });
        const leaf = await router.local({ runtime, name: "fsvc-refuse-leaf", via: hop });
        const text = async (path: string) => Buffer.from((await leaf.call(readIt, path)) as Uint8Array).toString();
        assert.equal(await text(join(pub, "ok.txt")), "public");
        await assert.rejects(text(join(dir, "secret.txt")), /FileServiceError: .*secret\.txt is not registered with the file service in master/);
        await assert.rejects(text(`${pub}/../secret.txt`), /\.\. segment/);
        await assert.rejects(text(join(pub, "link.txt")), /is not registered .*\(it resolves to .*secret\.txt\)/);
        // A link from elsewhere to a registered file resolves into the prefix: served.
        assert.equal(await text(join(dir, "inside-link.txt")), "public");
        await assert.rejects(text("relative/path"), /not an absolute path/);
        // A refusal is not cached: registered later, the same path is served through the same hop.
        await registerFiles(router, { paths: [join(dir, "secret.txt")] });
        assert.equal(await text(join(dir, "secret.txt")), "secret");
        // The master asks its own service too.
        assert.equal(Buffer.from((await router.myself().callService(fileService, "read", { path: join(pub, "ok.txt") })) as Uint8Array).toString(), "public");
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test("push: files sent down a via chain ahead of need, each hop keeping a copy for its children", async () => {
      await using router = quietRouter();
      const dir = mkdtempSync(join(tmpdir(), "mitogen-fsvc-"));
      try {
        const size = 2 * MiB;
        const src = makeFile(join(dir, "pushed.bin"), size); // not registered
        const hop = await router.local({ runtime, name: "fsvc-push-hop" });
        const mid = await router.local({ runtime, name: "fsvc-push-mid", via: hop });
        const leaf = await router.local({ runtime, name: "fsvc-push-leaf", via: mid });
        const other = await router.local({ runtime, name: "fsvc-push-other" });
        await assert.rejects(leaf.call(readIt, src), /is not registered/);
        await pushFiles(router, leaf, [src]);
        // Every hop on the way holds it: a sibling of the leaf gets it from mid, nothing crosses the master's link.
        const sibling = await router.local({ runtime, name: "fsvc-push-sibling", via: mid });
        await sibling.call(readIt, "/nonexistent").catch(() => {});
        const before = sentTo(router, hop.contextId);
        assert.equal(Buffer.from((await leaf.call(readIt, src)) as Uint8Array).length, size);
        await sibling.call(getInto, src, join(dir, "sibling-copy"));
        assert.equal(sha256Of(join(dir, "sibling-copy")), sha256Of(src));
        assert.ok(sentTo(router, hop.contextId) - before < 64 * 1024, "served by the hops' copies");
        // A context off that chain may not fetch it.
        await assert.rejects(other.call(readIt, src), /is not registered/);
        assert.equal(readFileSync(src).length, size);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}
