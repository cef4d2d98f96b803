/**
 * The `mitogen:parent` module: what a context needs to start children. The master has it built
 * in; a child fetches it (GET_MODULE "mitogen:parent") only when it first starts a child of its
 * own. This file is its face: the connection methods' entry points (`Router.local`, `.ssh`,
 * `.sudo`, `.su`, `.doas` and the container tools), each turning its options into a plain-data
 * `Method`, and `proxyConnect`, which a `via` context runs. The rest of the module:
 *
 * - start.ts: `Method`, `connect` (launch, spawn, bootstrap) and `start` (here or `via`);
 * - local.ts, ssh.ts, sudo.ts, terminal.ts (su, doas), wrap.ts (containers): each method's
 *   plain-data spec and launch builder;
 * - launch.ts: the `Launch` a builder makes and `spawnLaunch`; setpriv.ts: the parent-death signal;
 * - bootstrap.ts: the one handshake for any started child; codecache.ts: the core payload it sends;
 * - firststage.ts: the first stage and the remote command; versions.ts: the version gate.
 *
 * Node builtins come from `process.getBuiltinModule`, so this module runs
 * unchanged when evaluated from the compressed payload inside a child.
 *
 * @module
 */
import type { ContainerOptions, JailOptions, KubectlOptions, LocalOptions, SetnsOptions, SshOptions, SudoOptions, SuOptions } from "./options.ts";
import type { Context } from "./context.ts";
import type { Router } from "./router.ts";
import { Secret } from "./codec.ts";
import { StreamError } from "./errors.ts";
import { takesRouter } from "./calls.ts";
import { type Method, type ProxySpec, start } from "./start.ts";
import type { SshSpec } from "./ssh.ts";

/** {@link Router.local}: start a local context below `router`, or below `options.via`. */
export function local(router: Router, options: LocalOptions): Promise<Context> {
  const method: Method = {
    kind: "local",
    ...(options.runtime ? { runtime: options.runtime } : {}),
    ...(options.env ? { env: options.env } : {}),
    ...(options.cwd ? { cwd: options.cwd } : {}),
  };
  return start(router, options, method, "local");
}

/** Where an ssh context is, in its default name (`ssh.web1`, `ssh.web1:2222`), as Mitogen's. */
export const sshWhere = (o: { hostname: string; port?: number }): string => (o.port && o.port !== 22 ? `${o.hostname}:${o.port}` : o.hostname);

/** {@link Router.ssh}: start a context on another machine through the OpenSSH client. */
export function ssh(router: Router, options: SshOptions): Promise<Context> {
  if (!options.hostname) return Promise.reject(new StreamError("ssh: hostname is required"));
  return start(router, options, { kind: "ssh", ...sshSpec(options) }, "ssh", sshWhere(options));
}

/** SshOptions as the ssh method's plain-data spec, defaults filled in. */
export function sshSpec(options: SshOptions): SshSpec {
  return {
    hostname: options.hostname,
    ...(options.username === undefined ? {} : { username: options.username }),
    ...(options.port === undefined ? {} : { port: options.port }),
    ...(options.identityFile === undefined ? {} : { identityFile: options.identityFile }),
    ...(options.password === undefined ? {} : { password: options.password instanceof Secret ? options.password : new Secret(options.password) }),
    ...(options.knownHostsFile === undefined ? {} : { knownHostsFile: options.knownHostsFile }),
    checkHostKeys: options.checkHostKeys ?? "enforce",
    sshArgs: options.sshArgs ?? [],
    sshPath: options.sshPath ?? "ssh",
    compression: options.compression ?? false,
    runtime: options.runtime ?? "auto",
  };
}

/** {@link Router.sudo}: start a context as another user on the machine of `router` (or of `options.via`). */
export function sudo(router: Router, options: SudoOptions): Promise<Context> {
  const username = options.username ?? "root";
  const method: Method = {
    kind: "sudo",
    username,
    ...(options.password === undefined ? {} : { password: options.password instanceof Secret ? options.password : new Secret(options.password) }),
    sudoPath: options.sudoPath ?? "sudo",
    sudoArgs: options.sudoArgs ?? [],
    ...(options.runtime ? { runtime: options.runtime } : {}),
  };
  return start(router, options, method, "sudo", username);
}

const wrap = (argv: (string | false | undefined)[], runtime?: string): Method => ({
  kind: "wrap",
  argv: argv.filter((a): a is string => typeof a === "string"),
  runtime: runtime ?? "auto",
});

/** {@link Router.docker}: `docker exec -i [-u user] <container> /bin/sh -c ...`. */
export function docker(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "docker", "exec", "-i", ...(o.username ? ["-u", o.username] : []), ...(o.args ?? []), o.container], o.runtime);
  return start(router, o, argv, "docker", o.container);
}

/** {@link Router.podman}: `podman exec -i [-u user] <container> /bin/sh -c ...`. */
export function podman(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "podman", "exec", "-i", ...(o.username ? ["-u", o.username] : []), ...(o.args ?? []), o.container], o.runtime);
  return start(router, o, argv, "podman", o.container);
}

/** {@link Router.buildah}: `buildah run [--user=user] -- <container> /bin/sh -c ...` (a working container), as Mitogen's buildah.py. */
export function buildah(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "buildah", "run", ...(o.username ? [`--user=${o.username}`] : []), ...(o.args ?? []), "--", o.container], o.runtime);
  return start(router, o, argv, "buildah", o.container);
}

/** {@link Router.kubectl}: `kubectl exec -i [-n namespace] [-c container] <pod> -- /bin/sh -c ...`. */
export function kubectl(router: Router, o: KubectlOptions): Promise<Context> {
  const argv = wrap(
    [
      o.path ?? "kubectl",
      ...(o.args ?? []),
      "exec",
      "-i",
      ...(o.namespace ? ["-n", o.namespace] : []),
      ...(o.container ? ["-c", o.container] : []),
      o.pod,
      "--",
    ],
    o.runtime,
  );
  return start(router, o, argv, "kubectl", o.pod);
}

/** {@link Router.lxc}: `lxc-attach -n <container> -- /bin/sh -c ...` (classic LXC). */
export function lxc(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "lxc-attach", ...(o.args ?? []), "-n", o.container, "--"], o.runtime);
  return start(router, o, argv, "lxc", o.container);
}

/** {@link Router.lxd}: `lxc exec --mode=non-interactive <container> -- /bin/sh -c ...` (LXD, Incus). */
export function lxd(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "lxc", "exec", "--mode=non-interactive", ...(o.args ?? []), o.container, "--"], o.runtime);
  return start(router, o, argv, "lxd", o.container);
}

/** {@link Router.incus}: `incus exec --mode=non-interactive <container> -- /bin/sh -c ...`, as Mitogen's incus.py. */
export function incus(router: Router, o: ContainerOptions): Promise<Context> {
  const argv = wrap([o.path ?? "incus", "exec", "--mode=non-interactive", ...(o.args ?? []), o.container, "--"], o.runtime);
  return start(router, o, argv, "incus", o.container);
}

/** {@link Router.setns}: enter every namespace of process `pid` (`nsenter -t <pid> -a`); needs root. */
export function setns(router: Router, o: SetnsOptions): Promise<Context> {
  const argv = wrap([o.path ?? "nsenter", "-t", String(o.pid), "-a", ...(o.args ?? []), "--"], o.runtime);
  return start(router, o, argv, "setns", String(o.pid));
}

/** {@link Router.jail}: `jexec [-U user] <jail> /bin/sh -c ...` (FreeBSD). */
export function jail(router: Router, o: JailOptions): Promise<Context> {
  const argv = wrap([o.path ?? "jexec", ...(o.username ? ["-U", o.username] : []), ...(o.args ?? []), o.jail], o.runtime);
  return start(router, o, argv, "jail", o.jail);
}

/** {@link Router.su}: start a context as another user through su (in a pty). */
export function su(router: Router, options: SuOptions): Promise<Context> {
  return terminalMethod(router, "su", options);
}

/** {@link Router.doas}: start a context as another user through doas (in a pty). */
export function doas(router: Router, options: SuOptions): Promise<Context> {
  return terminalMethod(router, "doas", options);
}

function terminalMethod(router: Router, kind: "su" | "doas", o: SuOptions): Promise<Context> {
  const username = o.username ?? "root";
  const method: Method = {
    kind,
    username,
    args: o.args ?? [],
    ...(o.password === undefined ? {} : { password: o.password instanceof Secret ? o.password : new Secret(o.password) }),
    ...(o.path ? { path: o.path } : {}),
    ...(o.runtime ? { runtime: o.runtime } : {}),
  };
  return start(router, o, method, kind, username);
}

/**
 * Run in a `via` context: start a child there, with the id in `spec` (whose messages this context
 * holds until it is connected, see Router.pushDown) or one allocated now. Resolves with its id and name;
 * a failure fails the messages held for it and is reported as its loss (DEL_ROUTE).
 */
export const proxyConnect: (spec: ProxySpec, call: { router: Router }) => Promise<[number, string]> = takesRouter(
  async (spec: ProxySpec, call: { router: Router }): Promise<[number, string]> => {
    try {
      const ctx = await start(
        call.router,
        { ...(spec.id === undefined ? {} : { id: spec.id }), ...(spec.name === undefined ? {} : { name: spec.name }), connectTimeout: spec.connectTimeout },
        spec.method,
        spec.label,
        spec.where,
      );
      // A pipelined start returns before it is connected: its failure is learnt here.
      await ctx.connected();
      return [ctx.contextId, ctx.name];
    } catch (err) {
      if (spec.id !== undefined) call.router.failChild(spec.id, (err as Error)?.message ?? String(err));
      throw err;
    }
  },
);
