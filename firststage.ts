/**
 * The first stage, and the command that runs it: the one-line script a new child's runtime
 * evaluates (`node -e`, `deno eval`) to say READY and read the core; the shell command that
 * starts it behind ssh, sudo, a terminal or a container (`remoteCommand`); that command's
 * complaints when the target has no runtime; and the first stage kept out of logged lines.
 * Part of `mitogen:parent`.
 *
 * @module
 */
import { isDeno, runtimeCommand } from "./runtime.ts";
import { PDEATHSIG_ENV } from "./watchdog.ts";
import { MARKER } from "./frames.ts";
import { MODERN_NODE, notRuntime, OLDEST } from "./versions.ts";

/**
 * How a Deno child runs its first stage. `--unstable-ffi`: Deno 1.46 has
 * `Deno.dlopen` (for the parent-death signal, see `watchParent`) only with it,
 * and would start the watchdog worker instead (20 to 35 ms); Deno 2 accepts
 * the flag. The V8 flag: Deno 2 gives every Error a detailed stack trace when
 * it is made, and V8 then re-parses each function on the stack for its source
 * positions; the core's top level (where the codec library makes two Errors
 * as it loads) cost 9 to 15 ms that way. Positions are recorded at compile
 * time instead.
 */
export const DENO_EVAL: readonly string[] = ["eval", "--no-config", "--unstable-ffi", "--v8-flags=--no-enable-lazy-source-positions"];

/**
 * The first stage, as evaluated by `node -e` or `deno eval` with argv
 * `<name>`. It writes the READY line (`MITO000 <runtime> <version>`), reads
 * the payload's length (u32, big-endian) and then exactly the payload,
 * inflates it (unless `plain`: the parent sends the script itself) and runs
 * it; on EOF or garbage it says why on stderr and exits 1. No single quotes,
 * so it is safe inside '...' in any POSIX shell. It parses on every runtime
 * that can report itself, so one too old to run the core is still named
 * (see {@link childRuntime}).
 *
 * Node reads its stream from fd 3 (see transport.ts); Deno from fds 0/1. The
 * Node core gets `require` (`node -e` has it on every version) for builtins
 * where `process.getBuiltinModule` is missing (see `builtin` in runtime.ts).
 * The core gets the compressed payload too, to start children with; a plain
 * one it does not keep (see `childMain`).
 */
export function firstStage(kind: "node" | "deno", fds: "socket" | "split" | "tty" = "socket", plain = true): string {
  const ready = (version: string) => `"${MARKER.READY}${kind} "+${version}+"\\n"`;
  const fail = (exit: string) => `e=m=>{console.error("mitogen("+N+"): "+m);${exit}(1)}`;
  const run = (inflate: string, boot: string) => `try{new Function("B",${inflate}+"")(${boot})}catch(x){e("bad payload: "+x)}`;
  if (kind === "deno") {
    return (
      `const N=Deno.args[0],${fail("Deno.exit")},` +
      `r=async n=>{const b=new Uint8Array(n);for(let o=0,k;o<n;o+=k)if(!(k=await Deno.stdin.read(b.subarray(o))))e("EOF before payload");return b};` +
      `console.log("${MARKER.READY}deno "+Deno.version.deno);` +
      `const b=await r(new DataView((await r(4)).buffer).getUint32(0));` +
      (plain
        ? run("new TextDecoder().decode(b)", "{name:N,read:r}")
        : run(`await new Response(new Response(b).body.pipeThrough(new DecompressionStream("deflate-raw"))).text()`, "{name:N,payload:b,read:r}"))
    );
  }
  // Locally fd 3 is one socket both ways; through a shell (ssh) fd 3 reads and fd 4 writes.
  // Behind a terminal (su, doas) fds 3 and 4 are the pty, which only tty streams can use.
  const sockets = {
    socket: `s=new(g("net").Socket)({fd:3,readable:1,writable:1})`,
    split: `S=g("net").Socket,s=new S({fd:3,readable:1,writable:!1}),w=new S({fd:4,readable:!1,writable:1})`,
    tty: `T=g("tty"),s=new T.ReadStream(3),w=new T.WriteStream(4)`,
  }[fds];
  // READY goes out first, written at once: the parent sends the payload while this runtime loads `net` (~5 ms).
  return (
    `const g=require;g("fs").writeSync(${fds === "socket" ? 3 : 4},${ready("process.version")});` +
    `const N=process.argv.pop(),${sockets},${fail("process.exit")},` +
    `f=d=>{b=b?Buffer.concat([b,d]):d;if(b.length<4||b.length<(n=b.readUInt32BE()+4))return;s.pause().off("data",f).off("end",h);` +
    `const p=b.subarray(4,n);b.length>n&&s.unshift(b.subarray(n));` +
    `${run(plain ? "p" : `g("zlib").inflateRawSync(p)`, `{socket:s,${fds === "socket" ? "" : "out:w,"}name:N,${plain ? "" : "payload:p,"}require:g}`)}},` +
    `h=()=>e("EOF before payload");` +
    `let b,n;s.on("data",f).on("end",h)`
  );
}

/**
 * What a pipelined start sends first, before it knows the child's runtime (see {@link firstStage},
 * which runs it as a payload): it reads the `length | core` that follows it, the ES2022 core, and
 * runs that. A Node too old for it (before 16.11) skips it, then skips the frames after it (the
 * parent sent them before READY) up to the `length | core` the parent sends once READY says so
 * (the core lowered for Node 12), runs that and hands the frames back to the socket. Deno reads
 * with the first stage's exact reader (`B.read`). Deflated or not as the first stage expects
 * (`B.payload` is there when deflated, and becomes the core's bytes).
 */
export function corePicker(): string {
  const [major, minor] = MODERN_NODE;
  return (
    `if(B.socket){const s=B.socket,z=B.payload,v=process.versions.node.split(".").map(Number),o=v[0]<${major}||v[0]==${major}&&v[1]<${minor},` +
    `e=m=>{console.error("mitogen("+B.name+"): "+m);process.exit(1)},` +
    `go=(p,r)=>{s.pause().off("data",f).off("end",h);r.length&&s.unshift(r);if(z)B.payload=p;` +
    `try{new Function("B",z?B.require("zlib").inflateRawSync(p)+"":p+"")(B)}catch(x){e("bad payload: "+x)}},` +
    `f=d=>{b=b?Buffer.concat([b,d]):d;` +
    `if(!k){if(b.length<4||b.length<(n=b.readUInt32BE()+4))return;if(!o)return go(b.subarray(4,n),b.subarray(n));b=b.subarray(n);k=1}` +
    // Frames start with "MG" (77, 71); a core's length with 0 (it is under 16 MiB).
    `for(let i=0;b.length>=i+4;)if(b[i]==77&&b[i+1]==71){if(b.length<i+28)return;i+=28+b.readUInt32BE(i+24)}` +
    `else{const m=i+4+b.readUInt32BE(i);if(b.length<m)return;return go(b.subarray(i+4,m),Buffer.concat([b.subarray(0,i),b.subarray(m)]))}},` +
    `h=()=>e("EOF before payload");let b,n,k;s.on("data",f).on("end",h).resume()}` +
    `else(async()=>{const r=B.read,z=B.payload,p=await r(new DataView((await r(4)).buffer).getUint32(0));if(z)B.payload=p;` +
    `new Function("B",z?await new Response(new Response(p).body.pipeThrough(new DecompressionStream("deflate-raw"))).text():new TextDecoder().decode(p))(B)})()` +
    `.catch(x=>{console.error("mitogen("+B.name+"): bad payload: "+x);Deno.exit(1)})`
  );
}

let stages: string[] | null = null;

/** `line` with any first stage in it replaced by `<first stage>`: a program that is no runtime may echo its argv. */
export function withoutStages(line: string): string {
  if (!/const (g=require|N=Deno)/.test(line)) return line;
  stages ??= [true, false].flatMap((plain) => [
    ...(["socket", "split", "tty"] as const).map((fds) => firstStage("node", fds, plain)),
    firstStage("deno", "socket", plain),
  ]);
  for (const stage of stages) line = line.split(stage).join("<first stage>");
  return line;
}

/** A runtime named neither node nor deno: is it one? Its `--version` says (`v12.22.12`, `deno 2.9.6 (...)`). */
export function oddName(runtime: string): boolean {
  return !/node|deno/.test(runtime.slice(runtime.lastIndexOf("/") + 1));
}

/** Quote a word for any POSIX shell. */
export function shellQuote(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'"'"'`)}'`;
}

/**
 * The command the remote shell runs. Node reads the stream from fd 3 and
 * writes it to fd 4, with stdin at /dev/null and stdout joined to stderr, so
 * nothing it (or a subprocess) prints can reach the stream. Deno keeps the
 * stream on 0/1 (it cannot read an inherited fd 3).
 *
 * `auto` runs the newest of `node` and `nodejs` on PATH (by `--version`),
 * or `deno` when neither is there or the newest is older than Node 12. A
 * runtime named neither node nor deno is asked `--version` first, and runs
 * as what it says it is.
 *
 * With `pdeathsig` (not for sudo and the terminal methods, whose child
 * watches the parent context's pid anyway), node runs under `setpriv
 * --pdeathsig KILL` where the target has one that can, and is told so
 * (see watchParent in watchdog.ts). With `plain` the first stage takes the
 * core undeflated (see {@link firstStage}).
 */
export function remoteCommand(runtime: string, name: string, terminal = false, pdeathsig = !terminal, plain = false): string {
  // Behind a terminal stdout and stderr are the stream's own device: what the child prints is dropped.
  const out = terminal ? ">/dev/null 2>&1" : "1>&2";
  const tool = pdeathsig
    ? `P=;setpriv --pdeathsig KILL true 2>/dev/null&&P="setpriv --pdeathsig KILL --"&&export ${PDEATHSIG_ENV}=$PPID:\${EUID:-$(id -u)};exec $P `
    : "exec ";
  const node = (exe: string) => `${tool}${exe} -e '${firstStage("node", terminal ? "tty" : "split", plain)}' ${shellQuote(name)} 3<&0 4>&1 </dev/null ${out}`;
  const deno = (exe: string) =>
    `DENO_NO_UPDATE_CHECK=1 exec ${exe} ${DENO_EVAL.join(" ")} '${firstStage("deno", "socket", plain)}' ${shellQuote(name)}${terminal ? " 2>/dev/null" : ""}`;
  if (runtime === "auto") {
    const [major, minor] = OLDEST.node;
    // p: the newest node found, q: its major * 1000 + minor (a --version that is not a version counts as 0).
    return (
      `p=;q=-1;for c in node nodejs;do command -v $c >/dev/null 2>&1||continue;v=$($c --version 2>/dev/null </dev/null);v=\${v#v};` +
      `M=\${v%%.*};m=\${v#*.};m=\${m%%.*};case $M.$m in *[!0-9.]*|.*|*.)M=0 m=0;;esac;[ $((M*1000+m)) -gt $q ]&&p=$c q=$((M*1000+m));done;` +
      `if [ -n "$p" ]&&{ [ $q -ge ${major * 1000 + minor} ]||! command -v deno >/dev/null 2>&1;};then ${node("$p")};` +
      `elif command -v deno >/dev/null 2>&1;then ${deno("deno")};` +
      `else echo "mitogen: neither node nor deno found on $(hostname)" >&2;exit 127;fi`
    );
  }
  const exe = shellQuote(runtime);
  if (oddName(runtime)) {
    return (
      `v=$(${exe} --version 2>&1 </dev/null);case $v in v[0-9]*)${node(exe)};;"deno "[0-9]*)${deno(exe)};;` +
      `*)echo "mitogen: ${exe.replace(/["$`\\]/g, "")} is not node or deno; its --version says: $v" >&2;exit 126;;esac`
    );
  }
  // A runtime the target lacks is named as such, not left to the shell's "exec: deno: not found".
  const guard = `command -v ${exe} >/dev/null 2>&1||{ echo "mitogen: no ${exe.replace(/["$`\\]/g, "")} found on $(hostname)" >&2;exit 127;};`;
  return guard + (runtimeCommand(runtime).kind === "deno" ? deno(exe) : node(exe));
}

/** This context's own executable, which is also there for another user on the same machine. */
export function ownRuntime(): string {
  return runtimeCommand(isDeno ? "deno" : "node").exe;
}

/** The remote command's complaint that the target has no runtime (see remoteCommand), or null. */
export function missingRuntime(line: string): string | null {
  if (/^mitogen: (neither node nor deno|no .+) found on /.test(line)) return line.replace(/^mitogen: /, "");
  const odd = /mitogen: (.*) is not node or deno; its --version says: ?(.*)/.exec(line);
  return odd ? notRuntime(odd[1] ?? "", odd[2] ?? "") : null;
}
