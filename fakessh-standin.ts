/**
 * fakessh's stand-in: `dist/mitogen.mjs` started as `ssh` by a program that
 * `fakessh.run` (fakessh.ts) runs. It parses ssh's command line, connects
 * back to the run over its unix socket, proves it knows the run's key, sends
 * the remote command, and relays its stdio and exit status (the frames:
 * fakessh-wire.ts).
 *
 * @module
 */
import { createConnection } from "node:net";
import { basename } from "node:path";
import nacl from "tweetnacl";
import { MitogenError } from "./errors.ts";
import { isDeno } from "./runtime.ts";
import { nodeTransport } from "./transport.ts";
import { stdinSource, stdioFlushed, stdioSink } from "./stdio.ts";
import { connectWithKey } from "./handshake.ts";
import {
  FAKESSH,
  type FakesshRequest,
  FrameReader,
  frame,
  HANDSHAKE_MS,
  isPrivate,
  MAX_FRAME,
  NONCE,
  SSH_FAILED,
  text,
  untext,
  waitDrain,
} from "./fakessh-wire.ts";

/** True when this process is the `ssh` stand-in of a fakessh run. */
export function isStandIn(argv1: string | undefined = process.argv[1]): boolean {
  return process.env.MITOGEN_ROLE === "ssh" || (argv1 !== undefined && basename(argv1) === "ssh");
}

/** ssh's options that take an argument (OpenSSH's getopt string). */
const WITH_ARG = new Set("bBcDeEFiIJlLmoOpPQRSwW");
/** Options whose job a tunnel cannot do: forwarding, multiplexing, background. */
const REFUSED = new Set("DLRWfMNOw");

/** The sftp subsystem (scp's default protocol, sftp): the host's own sftp-server, wherever its system keeps it. */
const SFTP_SERVER =
  'for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/lib/ssh/sftp-server /usr/libexec/sftp-server /usr/lib/sftp-server; do [ -x "$p" ] && exec "$p"; done; echo "fakessh: no sftp-server on this host" >&2; exit 127';

/** ssh's command line, as far as a stand-in needs it; `-o SendEnv=` and `-o SetEnv=` never pass on the run's own variables. */
export function parseSshArgs(argv: readonly string[], env: Record<string, string | undefined> = {}): FakesshRequest & { noStdin: boolean } {
  let user: string | null = null;
  let port: number | null = null;
  let noStdin = false;
  let subsystem = false;
  const sendEnv: string[] = [];
  const setEnv: Record<string, string> = {};
  const option = (raw: string) => {
    const m = /^\s*(\w+)\s*(?:=|\s)\s*(.*)$/.exec(raw);
    if (!m) return;
    const name = (m[1] as string).toLowerCase();
    const value = (m[2] as string).trim();
    if (name === "user") user = value;
    else if (name === "port") port = Number(value);
    else if (name === "sendenv") sendEnv.push(...value.split(/\s+/));
    else if (name === "setenv")
      for (const pair of value.split(/\s+/)) {
        const eq = pair.indexOf("=");
        if (eq > 0) setEnv[pair.slice(0, eq)] = pair.slice(eq + 1);
      }
  };
  let i = 0;
  for (; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === "--") {
      i++;
      break;
    }
    if (!a.startsWith("-") || a === "-") break;
    for (let j = 1; j < a.length; j++) {
      const c = a[j] as string;
      if (REFUSED.has(c)) throw new MitogenError(`fakessh: ssh option -${c} is not supported (only remote commands are tunnelled)`);
      if (!WITH_ARG.has(c)) {
        if (c === "n") noStdin = true;
        else if (c === "s") subsystem = true;
        continue;
      }
      const value = j + 1 < a.length ? a.slice(j + 1) : argv[++i];
      if (value === undefined) throw new MitogenError(`fakessh: ssh option -${c} needs a value`);
      if (c === "l") user = value;
      else if (c === "p") port = Number(value);
      else if (c === "o") option(value);
      break;
    }
  }
  let host = argv[i];
  if (host === undefined) throw new MitogenError("fakessh: ssh was started without a destination");
  const url = /^ssh:\/\/(?:([^@/]+)@)?(\[[^\]]+\]|[^:/]+)(?::(\d+))?\/?$/.exec(host);
  if (url) {
    if (url[1]) user = url[1];
    host = url[2] as string;
    if (url[3]) port = Number(url[3]);
  } else {
    const at = host.lastIndexOf("@");
    if (at >= 0) {
      user = host.slice(0, at);
      host = host.slice(at + 1);
    }
  }
  const words = argv.slice(i + 1);
  if (!words.length) throw new MitogenError("fakessh: ssh was started without a remote command (no shell sessions through the tunnel)");
  const forwarded: Record<string, string> = {};
  for (const pattern of sendEnv) {
    const re = new RegExp(
      `^${pattern
        .replace(/[.+^${}()|[\]\\]/g, "\\$&")
        .replaceAll("*", ".*")
        .replaceAll("?", ".")}$`,
    );
    for (const [k, v] of Object.entries(env)) if (v !== undefined && re.test(k)) forwarded[k] = v;
  }
  Object.assign(forwarded, setEnv);
  for (const k of Object.keys(forwarded)) if (isPrivate(k)) delete forwarded[k];
  let command = words.join(" ");
  if (subsystem) {
    if (command !== "sftp") throw new MitogenError(`fakessh: ssh subsystem ${JSON.stringify(command)} is not supported (only sftp)`);
    command = SFTP_SERVER;
  }
  return { host, user, port, command, env: forwarded, noStdin };
}

/** The stand-in's main: parse ssh's argv, connect back to `run()`, relay stdio; resolves with the exit status. */
export async function sshMain(argv: string[]): Promise<number> {
  const fail = (message: string): number => {
    process.stderr.write(`${message}\n`);
    return SSH_FAILED;
  };
  const socketPath = process.env.MITOGEN_FAKESSH;
  const key64 = process.env.MITOGEN_FAKESSH_KEY;
  delete process.env.MITOGEN_ROLE;
  if (!socketPath || !key64) return fail("mitogen: started as ssh outside fakessh.run (MITOGEN_FAKESSH is not set)");
  let request: ReturnType<typeof parseSshArgs>;
  try {
    request = parseSshArgs(argv, process.env);
  } catch (err) {
    return fail((err as Error).message);
  }
  const key = new Uint8Array(Buffer.from(key64, "base64"));
  const socket = createConnection(socketPath);
  return new Promise<number>((resolve) => {
    let code = SSH_FAILED;
    let reported = false;
    /** EXIT came: this side has closed its end (the close handshake); nothing more is written. */
    let exited = false;
    const reader = new FrameReader(MAX_FRAME + 5);
    let input: { stop(): void } | null = null;
    const send = (type: number, body?: Uint8Array): boolean => (exited || socket.destroyed ? true : socket.write(frame(type, body)));
    const sendInput = () => {
      if (request.noStdin) {
        send(FAKESSH.EOF);
        return;
      }
      input = stdinSource(
        async (chunk) => {
          for (let at = 0; at < chunk.byteLength && !exited; at += MAX_FRAME) {
            if (!send(FAKESSH.STDIN, chunk.subarray(at, at + MAX_FRAME))) await waitDrain(socket);
          }
        },
        () => send(FAKESSH.EOF),
      );
    };
    // Output goes out in order; the socket is read no faster than stdout takes it.
    const stdout = stdioSink("stdout");
    const stderr = stdioSink("stderr");
    let writing: Promise<void> = Promise.resolve();
    let backlog = 0;
    const output = (sink: (chunk: Uint8Array) => Promise<void>, chunk: Uint8Array) => {
      if (++backlog > 4) socket.pause();
      writing = writing
        .then(() => sink(chunk))
        .catch(() => {}) // the program closed its end: what it did not read is dropped
        .finally(() => {
          if (--backlog <= 4) socket.resume();
        });
    };
    const onFrame = (type: number, body: Uint8Array) => {
      if (type === FAKESSH.STDOUT) output(stdout, body);
      else if (type === FAKESSH.STDERR) output(stderr, body);
      else if (type === FAKESSH.ERROR) output(stderr, text.encode(`ssh: ${untext.decode(body)}\n`));
      else if (type === FAKESSH.EXIT && body.byteLength === 4 && !exited) {
        code = new DataView(body.buffer, body.byteOffset, 4).getUint32(0);
        // The run side reads on until this end closes: stop the input and close it.
        exited = true;
        input?.stop();
        socket.end();
      }
    };
    const onData = (chunk: Uint8Array) => {
      try {
        for (const f of reader.push(chunk)) onFrame(f.type, f.body);
      } catch (err) {
        process.stderr.write(`ssh: ${(err as Error).message}\n`);
        socket.destroy();
      }
    };
    connectWithKey(nodeTransport(socket, socket), key, { timeoutMs: HANDSHAKE_MS }).then(
      (transport) => {
        const { noStdin: _, ...wire } = request;
        const nonce = nacl.randomBytes(NONCE);
        const sealed = nacl.secretbox(text.encode(JSON.stringify(wire)), nonce, key);
        const body = new Uint8Array(NONCE + sealed.byteLength);
        body.set(nonce);
        body.set(sealed, NONCE);
        send(FAKESSH.REQUEST, body);
        sendInput();
        transport.start(onData, () => {
          if (!exited && !reported) {
            reported = true;
            process.stderr.write("ssh: fakessh.run closed the connection before the remote command's exit status\n");
          }
        });
      },
      (err: Error) => {
        if (!reported) process.stderr.write(`ssh: fakessh.run at ${socketPath} did not accept this stand-in: ${err.message}\n`);
        reported = true;
      },
    );
    socket.on("error", (err) => {
      if (exited || reported) return; // the exit status is in: nothing was lost
      reported = true;
      process.stderr.write(`ssh: cannot reach fakessh.run at ${socketPath}: ${err.message}\n`);
    });
    // The program may close its end first (an sftp client that is done): that is no failure of ours.
    if (!isDeno) process.stdout.on("error", () => {});
    socket.on("close", () => {
      input?.stop();
      // The exit waits for the last output to leave this process: exiting with it queued would drop it.
      void writing.then(stdioFlushed).then(() => resolve(code));
    });
  });
}
