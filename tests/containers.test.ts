/**
 * Container and namespace methods, through stand-in executables on PATH that
 * check their arguments and then run the command here (as Mitogen's own tests
 * do): the whole path, argv to bootstrap to calls, runs for real.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { Context, Router } from "../mod.ts";
import { checkLeaks, quietRouter } from "./helpers.ts";

checkLeaks();

const STANDIN = `#!/bin/sh
# Stand-in for a container tool: record the arguments before "/bin/sh", then run the rest here.
tool=$(basename "$0")
log="$MITOGEN_STANDIN_DIR/$tool.argv"
: > "$log"
while [ $# -gt 0 ] && [ "$1" != /bin/sh ]; do printf '%s\\n' "$1" >> "$log"; shift; done
[ $# -gt 0 ] || { echo "$tool stand-in: no /bin/sh command in its arguments" >&2; exit 2; }
exec "$@"
`;

const TOOLS = ["docker", "podman", "buildah", "kubectl", "lxc-attach", "lxc", "incus", "nsenter", "jexec"];
let dir = "";
let savedPath: string | undefined;

before(() => {
  dir = mkdtempSync(join(tmpdir(), "mitogen-standins-"));
  for (const tool of TOOLS) writeFileSync(join(dir, tool), STANDIN, { mode: 0o755 });
  savedPath = process.env.PATH;
  process.env.PATH = `${dir}:${savedPath ?? ""}`;
  process.env.MITOGEN_STANDIN_DIR = dir;
});

after(() => {
  if (savedPath !== undefined) process.env.PATH = savedPath;
  delete process.env.MITOGEN_STANDIN_DIR;
  rmSync(dir, { recursive: true, force: true });
});

const argvOf = (tool: string) =>
  readFileSync(join(dir, `${tool}.argv`), "utf8")
    .split("\n")
    .filter(Boolean);

/** Method, start, the tool it runs, that tool's argv, and the context's default name (as Mitogen names it). */
const cases: [string, (r: Router) => Promise<Context>, string, string[], string][] = [
  ["docker", (r) => r.docker({ container: "web1", username: "app" }), "docker", ["exec", "-i", "-u", "app", "web1"], "docker.web1"],
  ["podman", (r) => r.podman({ container: "db1" }), "podman", ["exec", "-i", "db1"], "podman.db1"],
  // mitogen/buildah.py: buildah run [--user=<username>] -- <container> <boot command>
  ["buildah", (r) => r.buildah({ container: "working1", username: "app" }), "buildah", ["run", "--user=app", "--", "working1"], "buildah.working1"],
  ["buildah", (r) => r.buildah({ container: "working2" }), "buildah", ["run", "--", "working2"], "buildah.working2"],
  [
    "kubectl",
    (r) => r.kubectl({ pod: "api-0", namespace: "prod", container: "main" }),
    "kubectl",
    ["exec", "-i", "-n", "prod", "-c", "main", "api-0", "--"],
    "kubectl.api-0",
  ],
  ["lxc", (r) => r.lxc({ container: "box" }), "lxc-attach", ["-n", "box", "--"], "lxc.box"],
  ["lxd", (r) => r.lxd({ container: "box2" }), "lxc", ["exec", "--mode=non-interactive", "box2", "--"], "lxd.box2"],
  // mitogen/incus.py: incus exec --mode=non-interactive <container> -- <boot command>
  [
    "incus",
    (r) => r.incus({ container: "box3", args: ["--user", "0"] }),
    "incus",
    ["exec", "--mode=non-interactive", "--user", "0", "box3", "--"],
    "incus.box3",
  ],
  ["setns", (r) => r.setns({ pid: 4242 }), "nsenter", ["-t", "4242", "-a", "--"], "setns.4242"],
  ["jail", (r) => r.jail({ jail: "www", username: "www" }), "jexec", ["-U", "www", "www"], "jail.www"],
];

for (const [method, start, tool, expected, name] of cases) {
  test(`${method}: the right command line, then a working context (${expected.join(" ")})`, async () => {
    await using router = quietRouter();
    const ctx = await start(router);
    assert.deepEqual(argvOf(tool), expected);
    assert.equal(await ctx.call((x: number) => x * 2, 21), 42);
    // Named as Mitogen names them: what and where.
    assert.equal(ctx.name, name);
  });
}

test("runtime auto: a target with neither node nor deno says so", async () => {
  await using router = quietRouter();
  const bare = join(dir, "docker-without-runtimes");
  writeFileSync(bare, `#!/bin/sh\nwhile [ $# -gt 0 ] && [ "$1" != /bin/sh ]; do shift; done\nexec env PATH=/nonexistent "$@"\n`, { mode: 0o755 });
  await assert.rejects(router.docker({ container: "empty", path: bare }), /neither node nor deno found on/);
});

test("a container method through a via context, and a missing runtime named clearly", async () => {
  await using router = quietRouter();
  const hop = await router.local({ name: "hop" });
  const inside = await router.docker({ container: "web2", via: hop });
  assert.equal(await inside.call(() => "via hop"), "via hop");
  await assert.rejects(router.podman({ container: "db2", runtime: "/no/such/node" }), /^StreamError: podman\.db2: no \/no\/such\/node found on \S+$/);
});
