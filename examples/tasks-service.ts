/**
 * A service the README's and GUIDE's examples register at the master (`router.registerService`):
 * any context loads this module the first time the service is called there.
 */
import { hostname } from "node:os";
import { defineService } from "mitogen";

/** Answers its parents (the default policy) with facts about the host it runs on. */
export const tasks = defineService({
  name: "tasks",
  methods: {
    hostname: { run: () => hostname() },
  },
});
