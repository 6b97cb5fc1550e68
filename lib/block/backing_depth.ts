/**
 * qemu:allocation-depth below a format layer, shared by the drivers with backing files (qcow2,
 * qcow, qed, vmdk).
 *
 * @module
 */

import { type BlockDevice, ExtentList } from "./types.ts";

/** Extents fetched from the backing file per step: bounds the temporary list. */
const DEPTH_BATCH = 1 << 16;

/**
 * Depth of `[pos, pos+n)` where this layer has nothing: the backing file's depths shifted by one
 * (0 stays 0); a backing file without a chain is allocated everywhere; past its end counts as
 * allocated in it (qemu); no backing file is depth 0. Appended to `out` (stops when it is full).
 */
export async function backingDepth(
  backing: BlockDevice | undefined,
  pos: number,
  n: number,
  out: ExtentList,
): Promise<void> {
  if (backing === undefined) {
    out.add(n, 0);
    return;
  }
  const inside = Math.max(0, Math.min(n, backing.size - pos));
  let done = 0;
  if (inside > 0 && backing.allocationDepth !== undefined) {
    // Each batch advances by what it covered.
    while (done < inside && !out.full) {
      const tmp = new ExtentList(DEPTH_BATCH);
      await backing.allocationDepth(pos + done, inside - done, tmp);
      if (tmp.total === 0) break;
      const p = tmp.pairs;
      for (let i = 0; i < p.length; i += 2) {
        const d = p[i + 1]!;
        if (!out.add(p[i]!, d === 0 ? 0 : d + 1)) return;
      }
      done += tmp.total;
    }
    if (done < inside) return;
  } else if (inside > 0) {
    if (!out.add(inside, 2)) return;
  }
  if (n > inside) out.add(n - inside, 2);
}
