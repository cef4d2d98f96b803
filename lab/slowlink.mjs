#!/usr/bin/env node
/**
 * A slow link for ssh: `ProxyCommand node lab/slowlink.mjs <delay-ms> %h %p`. It connects to
 * host:port and relays both ways, holding every chunk for <delay-ms> before passing it on, in
 * order, so the link's round trip grows by twice the delay (this kernel has no netem). Bandwidth is
 * not limited. Plain JavaScript, so ssh starts it without a loader. See bench/slowlink.ts.
 */
import { connect } from "node:net";

const [delayText, host, portText] = process.argv.slice(2);
const delay = Number(delayText);
const port = Number(portText);
if (!host || !(delay >= 0) || !(port > 0)) {
  process.stderr.write("usage: slowlink.mjs <delay-ms> <host> <port>\n");
  process.exit(2);
}

/**
 * Relay `from` to `to`, each chunk `delay` ms late. Timers of one duration fire in the order set,
 * so order holds; the end is passed on after the last chunk.
 */
function relay(from, to, end) {
  from.on("data", (chunk) => setTimeout(() => to.write(chunk), delay));
  from.on("end", () => setTimeout(end, delay));
}

const socket = connect({ host, port, noDelay: true });
socket.on("error", (err) => {
  process.stderr.write(`slowlink: ${host}:${port}: ${err.message}\n`);
  process.exit(1);
});
relay(process.stdin, socket, () => socket.end());
relay(socket, process.stdout, () => process.exit(0));
