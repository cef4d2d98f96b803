/**
 * Files through ssh hops and sudo, on the netns hosts of lab/hosts.ts: master -> bastion (ssh) ->
 * inner (ssh via bastion) -> root on inner (sudo via inner). The hosts share this machine's file
 * system, so the test reads what each context wrote directly. Local cases are in files.test.ts.
 */
import assert from "node:assert/strict";
import { chmodSync, mkdirSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { Router } from "../mod.ts";
import { checkLeaks, makeFile, quietRouter, sha256Of } from "./helpers.ts";
import { hostTree, type TestHosts, useTestHosts } from "../lab/hosts.ts";

checkLeaks();

let hosts: TestHosts;
const { skip } = useTestHosts((ready) => {
  hosts = ready;
});

const MiB = 1024 * 1024;

let dir = "";
before(() => {
  dir = mkdtempSync(join(tmpdir(), "mitogen-files-hosts-"));
  chmodSync(dir, 0o755);
});
after(() => rmSync(dir, { recursive: true, force: true }));

const tree = (router: Router) => hostTree(router, hosts);

test("putFile two ssh hops away and into a sudo context there: root writes a file that came from the master", { skip }, async () => {
  await using router = quietRouter();
  const { bastion, inner, root } = await tree(router);
  const src = makeFile(join(dir, "src"), 20 * MiB + 3);
  const rootOnly = join(dir, "root-only");
  mkdirSync(rootOnly, { mode: 0o700 });
  const userDir = join(dir, "user");
  mkdirSync(userDir, { mode: 0o777 });
  chmodSync(userDir, 0o777);
  const put = await root.putFile(src, join(rootOnly, "file"), { mode: 0o640 });
  assert.equal(put.sha256, sha256Of(src));
  const st = statSync(join(rootOnly, "file"));
  assert.equal(st.uid, 0, "owned by root");
  assert.equal(st.mode & 0o7777, 0o640);
  assert.equal(sha256Of(join(rootOnly, "file")), sha256Of(src));
  // The test user may not write there
  await assert.rejects(
    inner.putFile(src, join(rootOnly, "nope")),
    /cannot write .*root-only\/nope in inner: cannot create a file in .*root-only: permission denied \(EACCES\)/,
  );
  // And back from root, to the master
  const got = await root.getFile(join(rootOnly, "file"), join(dir, "back"));
  assert.equal(got.sha256, sha256Of(src));
  assert.equal(sha256Of(join(dir, "back")), sha256Of(src));
  // Fan-out to inner and root: the master's link to bastion carries the file once
  const link = router.stats.links.get(bastion.contextId);
  assert.ok(link);
  const before = link.bytesOut;
  const both = await router.putFile([inner, root], src, join(userDir, "both"));
  assert.deepEqual(
    both.map((r) => [r.context.name, r.sha256]),
    [
      ["inner", sha256Of(src)],
      ["inner-root", sha256Of(src)],
    ],
  );
  const sent = link.bytesOut - before;
  assert.ok(sent >= 20 * MiB && sent < 20 * MiB * 1.05 + 65536, `the master sent ${sent} bytes to bastion`);
  // The last writer wins the same path; both wrote it whole
  assert.equal(sha256Of(join(userDir, "both")), sha256Of(src));
});
