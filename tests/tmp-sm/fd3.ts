const { spawn } = process.getBuiltinModule("node:child_process");
const p = spawn(
  "node",
  [
    "-e",
    "const s=new (require('net').Socket)({fd:3,readable:false,writable:true});const b=Buffer.alloc(16<<20,7);let n=0;const w=()=>{while(n<32){n++;if(!s.write(b))return s.once('drain',w)}s.end()};w()",
  ],
  { stdio: ["ignore", "ignore", "inherit", "pipe"] },
);
let total = 0;
const start = process.memoryUsage().rss / 1048576;
let peak = 0;
const sizes = new Map();
(p.stdio[3] as any).on("data", (d: Uint8Array) => {
  total += d.byteLength;
  sizes.set(d.byteLength, (sizes.get(d.byteLength) ?? 0) + 1);
  peak = Math.max(peak, process.memoryUsage().rss / 1048576);
});
p.on("close", () => console.log(total, [...sizes].slice(0, 3), "start", start, "peak", peak));
