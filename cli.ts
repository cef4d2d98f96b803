/**
 * The `mitogen` command, and the entry point of `dist/mitogen.mjs`: imported,
 * it is the library (everything `mod.ts` exports); run, it is the CLI.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { existsSync, readFileSync, realpathSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Receiver, Router } from "./mod.ts";
import { isStandIn, sshMain } from "./fakessh-standin.ts";
import { COMMANDS, runCommand, usage } from "./command.ts";
import { which } from "./which.ts";
import { SERVE_HELP, serveCommand } from "./serve.ts";

export * from "./mod.ts";

const HELP = `usage: mitogen <command> [options]

commands:
${Object.entries(COMMANDS)
  .map(([name, c]) => `  ${`${name} ${c.args.split(" ")[0]}`.padEnd(18)}${c.summary}`)
  .join("\n")}
  serve             keep the contexts the commands start, for the next ones (--status, --stop)
  demo              start local Node and Deno contexts, a via chain, calls and a stream
  help [command]    this text, or a command's
  --version         the version

examples:
  mitogen run web1,web2,db1 --via bastion --sudo -- uptime
  mitogen run @hosts.txt --forks 20 --json -- 'df -h /'
  mitogen call web1,web2 ./tasks.ts#inventory '{"deep":true}'
  mitogen eval web1 'process.version'
  mitogen put web1,web2 ./app.tar.gz /srv/app.tar.gz
`;

declare const MITOGEN_VERSION: string | undefined;

/** The package's version: built into dist/mitogen.mjs, or from the package.json beside the sources. */
function version(): string {
  if (typeof MITOGEN_VERSION === "string") return MITOGEN_VERSION;
  try {
    const pkg = JSON.parse(readFileSync(fileURLToPath(new URL("./package.json", import.meta.url)), "utf8")) as { name?: string; version?: string };
    if (pkg.name === "mitogen" && pkg.version) return pkg.version;
  } catch {
    // not there
  }
  return "unknown (neither built nor beside its package.json)";
}

/** Where the demo's remote module is: beside cli.ts, or one level up from dist/. */
function demoModule(): URL | null {
  for (const rel of ["./examples/tasks.ts", "../examples/tasks.ts"]) {
    const url = new URL(rel, import.meta.url);
    if (existsSync(fileURLToPath(url))) return url;
  }
  return null;
}

/**
 * The demo behind `npm run demo` and `npx mitogen demo`: local contexts only, no ssh needed. `b`
 * runs on deno when there is one (this runtime, or `deno` on PATH), else on node, saying so.
 */
export async function demo(out: (line: string) => void = console.log): Promise<void> {
  await using router = new Router();
  const bRuntime = "Deno" in globalThis || which("deno") !== null ? "deno" : "node";
  if (bRuntime === "node") out("(no deno on PATH: b runs on node; install deno to see a Deno context in the chain)");
  const t0 = performance.now();
  const a = await router.local({ runtime: "node", name: "a" });
  out(`started ${a} (node) in ${(performance.now() - t0).toFixed(0)} ms`);
  const b = await router.local({ runtime: bRuntime, name: "b", via: a });
  out(`started ${b} (${bRuntime}) via a`);
  const c = await router.local({ runtime: "node", name: "c", via: b });
  out(`started ${c} (node) via b`);
  out(`b.call(x => x * 2, 21)            = ${await b.call((x: number) => x * 2, 21)}`);
  out(`a runs on                          ${await a.call(() => `node ${process.version}, pid ${process.pid}`)}`);
  out(
    `b runs on                          ${await b.call(() => {
      const d = (globalThis as unknown as { Deno?: { version: { deno: string } } }).Deno;
      return `${d ? `deno ${d.version.deno}` : `node ${process.version}`}, pid ${process.pid}`;
    })}`,
  );
  const t1 = performance.now();
  for (let i = 0; i < 100; i++) await c.call(() => 0);
  out(`100 calls to c (2 hops)            ${(performance.now() - t1).toFixed(1)} ms`);

  const url = demoModule();
  if (url) {
    // The main way to ship code: a real module, typed, bundled once, fetched on demand.
    type Tasks = typeof import("./examples/tasks.ts");
    const tasks = await c.import<Tasks>(url);
    out(`c: tasks.inventory({ deep: false }) ${JSON.stringify(await tasks.inventory({ deep: false }))}`);
    await using recv = new Receiver(router);
    await tasks.squares(recv.toSender(), 5);
    const squares: unknown[] = [];
    for await (const msg of recv) squares.push(msg.unpickle());
    out(`squares streamed back from c       ${squares.join(" ")}`);
    const onB = await b.import<Tasks>(url);
    out(`b: tasks.delegate("node")          ${await onB.delegate("node")}`);
    out(`modules sent on the master's link  ${router.stats.modulesSent} (${router.stats.moduleBytesSent} bytes)`);
  } else out("(examples/tasks.ts not found beside this file: skipping the remote-module part)");

  try {
    await a.call(() => {
      throw new RangeError("demo failure");
    });
  } catch (err) {
    out(`a remote throw arrives as          ${(err as Error).name}: ${(err as Error).message}`);
  }
  await a
    .with({ timeout: 200 })
    .call(() => new Promise(() => {}))
    .catch((err: Error) => out(`a call with a 200 ms deadline      ${err.name}: ${err.message}`));
  await b.shutdown({ wait: true });
  out("b shut down (and c with it); done");
}

/** Run the CLI with `argv` (without the runtime and script). Returns the exit code. */
export async function runCli(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === "--version" || command === "-V") {
    process.stdout.write(`mitogen ${version()}\n`);
    return 0;
  }
  if (command === undefined || command === "help" || command === "--help" || command === "-h") {
    const topic = command === "help" ? rest[0] : undefined;
    if (topic === "serve") {
      process.stdout.write(SERVE_HELP);
      return 0;
    }
    if (topic && !COMMANDS[topic]) {
      process.stderr.write(`mitogen: no command ${JSON.stringify(topic)}\n${HELP}`);
      return 2;
    }
    process.stdout.write(topic ? usage(topic) : HELP);
    return command === undefined ? 2 : 0;
  }
  if (COMMANDS[command]) return runCommand(command, rest);
  if (command === "serve") return serveCommand(rest);
  if (command === "demo") {
    const { values } = parseArgs({ args: rest, options: { help: { type: "boolean", short: "h" } }, strict: false });
    if (values.help) {
      process.stdout.write("usage: mitogen demo\n\nstart local Node and Deno contexts, a via chain, calls and a stream\n");
      return 0;
    }
    await demo();
    return 0;
  }
  process.stderr.write(`mitogen: unknown command ${JSON.stringify(command)}\n${HELP}`);
  return 2;
}

function invokedDirectly(): boolean {
  const meta = import.meta as { main?: boolean };
  if (typeof meta.main === "boolean") return meta.main;
  const script = process.argv[1];
  if (!script) return false;
  try {
    return realpathSync(script) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (invokedDirectly()) {
  // Started as `ssh` (by fakessh.run), the file is the ssh stand-in; otherwise the CLI.
  const standIn = isStandIn();
  // The CLI exits once what it wrote has gone: a pipe takes a large record in more than one write.
  const exit = (code: number) => (standIn ? process.exit(code) : process.stdout.write("", () => process.stderr.write("", () => process.exit(code))));
  (standIn ? sshMain : runCli)(process.argv.slice(2)).then(
    (code) => exit(code),
    (err) => {
      process.stderr.write(`mitogen: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exit(1);
    },
  );
}
