/**
 * This context's role in the tree (Mitogen's `is_master`, `context_id`, `parent_id`, `parent_ids`):
 * the master's values until childMain configures a child. Part of the child payload.
 *
 * @module
 */

/** True in the master; false in every child. */
export let isMaster = true;
/** This context's id; the master is 0. */
export let contextId = 0;
/** Id of the immediate parent, or null in the master. */
export let parentId: number | null = null;
/** Ids of every parent, the nearest first and the master (0) last; empty in the master. */
export let parentIds: readonly number[] = [];

/** @internal childMain's CONFIGURE: this context is a child, `id`, below `parents` (the nearest first). */
export function becomeChild(id: number, parents: readonly number[]): void {
  contextId = id;
  parentIds = parents;
  parentId = parents[0] ?? null;
  isMaster = false;
}
