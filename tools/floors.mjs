/**
 * Prints the repository's modules by floor, from dependency-cruiser's JSON on stdin
 * (`npm run floors`): a file's floor is one above the highest of the files it imports (type-only
 * imports included), so each file imports only files on floors below its own. `*` marks the child
 * payload: core.ts and everything it imports. ARCHITECTURE.md's floors can be checked against this.
 * Then the violations of .dependency-cruiser.cjs's rules, if any: the exit code is 1 when there are.
 */
import { readFileSync } from "node:fs";

const result = JSON.parse(readFileSync(0, "utf8"));
const local = (d) => !d.coreModule && !d.couldNotResolve && d.resolved.endsWith(".ts") && !d.resolved.includes("node_modules/");
/** Local imports of each module of the repository's root. */
const imports = new Map(
  result.modules
    .filter((m) => !m.coreModule && m.source.endsWith(".ts") && !m.source.includes("node_modules/"))
    .map((m) => [m.source, [...new Set(m.dependencies.filter(local).map((d) => d.resolved))].sort()]),
);

const floors = new Map();
const floorOf = (file, path = []) => {
  if (floors.has(file)) return floors.get(file);
  if (path.includes(file)) return 0; // a cycle: reported below as a violation
  const deps = imports.get(file) ?? [];
  const floor = deps.length ? 1 + Math.max(...deps.map((d) => floorOf(d, [...path, file]))) : 0;
  floors.set(file, floor);
  return floor;
};
for (const file of imports.keys()) floorOf(file);

const payload = new Set();
const reach = (file) => {
  if (payload.has(file)) return;
  payload.add(file);
  for (const d of imports.get(file) ?? []) reach(d);
};
if (imports.has("core.ts")) reach("core.ts");

const width = Math.max(...[...imports.keys()].map((f) => f.length)) + 2;
console.log("floor  file (* = child payload)   imports");
const top = Math.max(...floors.values());
for (let floor = 0; floor <= top; floor++) {
  const files = [...floors]
    .filter(([, f]) => f === floor)
    .map(([file]) => file)
    .sort();
  for (const file of files) {
    const name = `${file}${payload.has(file) ? "*" : ""}`;
    const deps = (imports.get(file) ?? []).map((d) => d.replace(/\.ts$/, "")).join(", ");
    console.log(`${String(floor).padStart(5)}  ${name.padEnd(width)}  ${deps}`);
  }
}

const violations = result.summary.violations;
for (const v of violations) {
  const how = v.cycle?.length ? [v.from, ...v.cycle.map((c) => c.name ?? c)].join(" -> ") : `${v.from} -> ${v.to}`;
  console.error(`${v.rule.severity} ${v.rule.name}: ${how}`);
}
console.log(
  `${imports.size} files, ${violations.length ? `${violations.length} violations of .dependency-cruiser.cjs` : "no cycles, the payload imports only payload files"}`,
);
if (violations.some((v) => v.rule.severity === "error")) process.exitCode = 1;
