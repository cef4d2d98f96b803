/**
 * Starting one child: `Method`, how to reach it as plain data (so a `via` context can be asked to
 * start it); `connect`, which has the method's launch builder make its `Launch`, spawns it and
 * bootstraps the child; and `start`, which does that here or in a `via` context (`proxyConnect` in
 * parent.ts). Part of `mitogen:parent`.
 *
 * @module
 */
import type { Context } from "./context.ts";
import type { Router } from "./router.ts";
import { bootstrap, step } from "./bootstrap.ts";
import { type Launch, type Spawned, type Starting, spawnLaunch } from "./launch.ts";
import { type LocalSpec, localLaunch } from "./local.ts";
import { type SshSpec, sshLaunch } from "./ssh.ts";
import { type SudoSpec, sudoLaunch } from "./sudo.ts";
import { type TerminalSpec, terminalLaunch } from "./terminal.ts";
import { type WrapSpec, wrapLaunch } from "./wrap.ts";
import { childRuntime } from "./versions.ts";

/** How to reach a new child: on this machine, or over ssh. */
export type Method =
  | ({ kind: "local" } & LocalSpec)
  | ({ kind: "ssh" } & SshSpec)
  | ({ kind: "sudo" } & SudoSpec)
  | ({ kind: "wrap" } & WrapSpec)
  | ({ kind: "su" } & TerminalSpec)
  | ({ kind: "doas" } & TerminalSpec);

/** Everything needed to start one child. */
export interface ConnectSpec extends Starting {
  method: Method;
}

/** Start a child by `spec.method` and bootstrap it. */
export async function connect(router: Router, spec: ConnectSpec): Promise<Context> {
  const m = spec.method;
  // connectTimeout counts from here: a runtime's --version probe included.
  const t0 = Date.now();
  const launch =
    m.kind === "ssh"
      ? sshLaunch(spec, m)
      : m.kind === "sudo"
        ? sudoLaunch(spec, m)
        : m.kind === "wrap"
          ? wrapLaunch(spec, m)
          : m.kind === "su" || m.kind === "doas"
            ? terminalLaunch(spec, m)
            : await localLaunch(spec, m, t0);
  return spawnAndBootstrap(router, spec, launch, t0);
}

/** Start `launch` and bootstrap the child. */
async function spawnAndBootstrap(router: Router, spec: ConnectSpec, launch: Launch, t0: number): Promise<Context> {
  let child: Spawned;
  try {
    child = await spawnLaunch(launch);
  } catch (err) {
    launch.cleanup?.();
    throw err;
  }
  if (spec.namedByPid && child.pid !== undefined) spec.name = `${spec.name}.${child.pid}`;
  step(router, spec, t0, "spawn", `started ${launch.exe}`);
  return bootstrap(router, spec, child, launch, t0);
}

/**
 * What `proxyConnect` needs: a spec whose id (and default name) the `via` context makes. The
 * default name says what and where, as Mitogen's: `<label>.<where>` (`ssh.web1`, `sudo.root`,
 * `docker.app`), or `<label>.<pid>` without `where` (`local.4242`).
 */
export interface ProxySpec {
  /** The child's id, allocated by the caller and handed down with the request (LOAD_MODULE); else the `via` context asks for one. */
  id?: number;
  name?: string;
  /** The method as contexts list it: local, ssh, sudo, docker... */
  label: string;
  where?: string;
  connectTimeout: number;
  method: Method;
}

/**
 * Resolve a method's options into a spec, start the child here or `via` another context. Started
 * `via` a context below this one, it resolves once the request is sent: the id and the modules the
 * `via` context needs go ahead of it (LOAD_MODULE), and calls wait there until the child is connected.
 */
export async function start(
  router: Router,
  options: { id?: number; name?: string; via?: Context; connectTimeout?: number },
  method: Method,
  label: string,
  where?: string,
): Promise<Context> {
  const connectTimeout = options.connectTimeout ?? 30_000;
  const via = options.via;
  const name = options.name ?? (where === undefined ? label : `${label}.${where}`);
  if (!via) {
    const id = options.id ?? (await router.allocateId());
    const byPid = options.name === undefined && where === undefined;
    return connect(router, { id, name, connectTimeout, method, label, ...(byPid ? { namedByPid: true } : {}) });
  }
  const spec: ProxySpec = {
    ...(options.name === undefined ? {} : { name: options.name }),
    label,
    ...(where === undefined ? {} : { where }),
    connectTimeout,
    method,
  };
  if (!router.routeTo(via.contextId) && !router.starting(via.contextId)) {
    // Not below us: the via context allocates the id (every id a context announces was allocated through its own link).
    const [id, named] = (await via.callModule("mitogen:parent", "proxyConnect", spec)) as [number, string];
    const ctx = router.contextById(id, named);
    ctx.via = via;
    return ctx;
  }
  spec.id = await router.allocateId();
  const core = via.runtime ? childRuntime(via.runtime, via.name).core : null;
  router.pushDown(via.contextId, core ? ["mitogen:parent", core] : ["mitogen:parent"], [spec.id]);
  const ctx = router.contextById(spec.id, name);
  ctx.via = via;
  const id = spec.id;
  ctx._connecting(
    via.callModule("mitogen:parent", "proxyConnect", spec).then(
      (reply) => {
        ctx.name = (reply as [number, string])[1];
      },
      (err: Error) => {
        // Calls already sent fail with it too (if the via context could not say so itself).
        router.failChild(id, err.message);
        throw err;
      },
    ),
  );
  return ctx;
}
