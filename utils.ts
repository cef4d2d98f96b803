/**
 * Mitogen's `mitogen.utils` and `mitogen.main()` for scripts: a master Router made for a
 * function and shut down however it ends. Master only.
 *
 * @module
 */
import type { LogLevel } from "./logapi.ts";
import { levelFromEnv, textLogger } from "./logs.ts";
import { Router, type RouterOptions } from "./master.ts";
import { nodeProcess } from "./runtime.ts";

/**
 * Run `fn(router, ...args)` with a new master {@link Router}, and shut the router down (every
 * context it started) however `fn` ends: its result, or its error, once the router is down.
 * Mitogen's `run_with_router`; the way a script without `await using` cannot forget `shutdown()`.
 *
 * @example
 * ```ts
 * import { runWithRouter } from "mitogen";
 * const pid = await runWithRouter(async (router) => {
 *   const ctx = await router.local();
 *   return ctx.call(() => process.pid);
 * });
 * console.log(pid);
 * ```
 */
export function runWithRouter<A extends unknown[], R>(fn: (router: Router, ...args: A) => R | Promise<R>, ...args: A): Promise<R> {
  return withRouter(fn)(...args);
}

/**
 * `fn` as a function that runs it with a new master {@link Router} made with `options`, shut down
 * however `fn` ends (see {@link runWithRouter}). Mitogen's `with_router`.
 *
 * @example
 * ```ts
 * import { type Router, withRouter } from "mitogen";
 * const double = withRouter(async (router: Router, n: number) => {
 *   const ctx = await router.local({ name: "doubler" });
 *   return ctx.call((x: number) => x * 2, n);
 * });
 * console.log(await double(21)); // 42
 * ```
 */
export function withRouter<A extends unknown[], R>(
  fn: (router: Router, ...args: A) => R | Promise<R>,
  options: RouterOptions = {},
): (...args: A) => Promise<R> {
  return async (...args: A): Promise<R> => {
    const router = new Router(options);
    try {
      return await fn(router, ...args);
    } finally {
      await router.shutdown();
    }
  };
}

/** Options of {@link main}: the Router's, and the level of the library's records shown. */
export interface MainOptions extends RouterOptions {
  /**
   * Lowest level of the library's own records the default logger shows (default "warn");
   * `MITOGEN_LOG`, when set, wins, as `MITOGEN_LOG_LEVEL` does for `mitogen.main()`. "debug"
   * also forwards children's debug records and shows each connection step. Ignored for the
   * sink when `log` is given.
   */
  level?: LogLevel;
}

/**
 * For a script: run `fn(router)` as {@link runWithRouter} does, with logging set up (records go to
 * stderr at `level`, with their time when MITOGEN_LOG is set); if `fn` fails, the error is logged
 * (source-mapped, as every logged error is) and the process exit code becomes 1. Resolves once
 * the router is down, never rejects. Mitogen's `mitogen.main()`.
 *
 * @example
 * ```ts
 * import { log, main } from "mitogen";
 * await main(async (router) => {
 *   const ctx = await router.local({ name: "worker" });
 *   log.info("worker runs", { runtime: ctx.runtime });
 * });
 * ```
 */
export async function main(fn: (router: Router) => unknown, options: MainOptions = {}): Promise<void> {
  const { level, ...routerOptions } = options;
  const min = levelFromEnv(level ?? "warn");
  const asked = nodeProcess().env.MITOGEN_LOG !== undefined;
  const router = new Router({
    debug: min === "debug",
    ...routerOptions,
    log: routerOptions.log ?? textLogger({ level: min, time: asked ? "clock" : false }),
  });
  try {
    await fn(router);
  } catch (err) {
    const message = err instanceof Error ? String(err) : `failed: ${String(err)}`;
    router.log("error", message, "user", err);
    nodeProcess().exitCode = 1;
  } finally {
    await router.shutdown();
  }
}
