import { fakessh, Router } from "./mod.ts";
await using router = new Router({ log: (r) => console.error("LOG", r.message) });
const ctx = await router.local({ name: "x" });
const t0 = performance.now();
const code = await fakessh.run(ctx, router, ["rsync", "-a", "/tmp/fs/src/", "x:/tmp/fs/dst/"]);
console.log("rsync exit", code, (performance.now() - t0).toFixed(0), "ms");
