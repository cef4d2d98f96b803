/**
 * The methods that wrap a command running another command somewhere: docker, podman, buildah,
 * kubectl, lxc, lxd, incus, setns (nsenter) and jail (jexec). Each says its argv (see parent.ts); the child runs
 * as `<argv> /bin/sh -c <remote command>`. Part of `mitogen:parent`.
 *
 * @module
 */
import { nodeProcess } from "./runtime.ts";
import { StreamError } from "./errors.ts";
import { missingRuntime, remoteCommand } from "./firststage.ts";
import type { Launch, Starting } from "./launch.ts";

/** What a wrapping method needs: the command that runs another, and the runtime to run behind it. */
export interface WrapSpec {
  argv: string[];
  runtime: string;
}

/**
 * A command that runs another command somewhere (docker exec, kubectl exec, nsenter...): it runs `/bin/sh -c`.
 * The launch builder of docker, podman, buildah, lxc, lxd, incus (options: ContainerOptions), kubectl (KubectlOptions), setns (SetnsOptions) and jail (JailOptions).
 */
export function wrapLaunch(spec: Starting, m: WrapSpec): Launch {
  const [exe, ...prefix] = m.argv;
  if (!exe) throw new StreamError(`${spec.name}: empty command`);
  return {
    exe,
    args: [...prefix, "/bin/sh", "-c", remoteCommand(m.runtime, spec.name)],
    env: { ...nodeProcess().env },
    streamOn: "stdio",
    stdoutIsOutput: false,
    watch(line) {
      const missing = missingRuntime(line);
      return missing ? new StreamError(`${spec.name}: ${missing}`) : undefined;
    },
  };
}
