/**
 * The docs stay readable: README, ARCHITECTURE.md and PROTOCOL.md within their sizes, and every
 * link and file name they cite exists.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const DOCS = ["README.md", "GUIDE.md", "CONNECTIONS.md", "ARCHITECTURE.md", "PROTOCOL.md", "BENCHMARKS.md", "CHANGELOG.md"];
/** Bytes: what a newcomer reads in half an hour. */
const LIMITS: Record<string, number> = { "README.md": 12_000, "ARCHITECTURE.md": 25_000, "PROTOCOL.md": 26_000 };
/** File names the docs use for a user's own files, or for files in dist/ (built) and a user's folder. */
const EXAMPLES = new Set(["mitogen.mjs", "mitogen.cjs", "mitogen.d.ts", "main.ts", "main.mjs", "tasks.ts", "tasks.mjs", "tasks.js", "x.ts", "x.js"]);

test("README, ARCHITECTURE.md and PROTOCOL.md are within their sizes", () => {
  for (const [doc, limit] of Object.entries(LIMITS)) {
    const size = statSync(join(root, doc)).size;
    assert.ok(size <= limit, `${doc} is ${size} bytes, more than ${limit}`);
  }
});

test("every relative link and file name the docs cite exists", () => {
  const missing: string[] = [];
  for (const doc of DOCS) {
    const text = readFileSync(join(root, doc), "utf8");
    for (const [, target] of text.matchAll(/\]\(([^)#\s]+)/g)) {
      if (!/^[a-z]+:/.test(target as string) && !existsSync(join(root, target as string))) missing.push(`${doc}: link to ${target}`);
    }
    for (const [name] of text.matchAll(/(?:\.?[\w-]+\/)*[\w.-]+\.(?:ts|md)\b/g)) {
      const base = name.split("/").pop() as string;
      if (EXAMPLES.has(base) || name.startsWith("dist/")) continue;
      if (!existsSync(join(root, name)) && !existsSync(join(root, "tests", name))) missing.push(`${doc}: ${name}`);
    }
  }
  assert.deepEqual(missing, []);
});
