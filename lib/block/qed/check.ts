/**
 * The consistency check qemu 7.2 runs when it opens a QED image read-write with the need-check
 * (dirty) bit set (block/qed-check.c's behaviour, with fixing on):
 *
 * - L1 entries that are not a valid table offset are cleared (the L1 table is rewritten), and so
 *   are L2 entries that are not a valid data cluster offset (that L2 table is rewritten);
 * - every cluster referenced twice (tables or data) counts as a corruption, which is not fixed:
 *   the image still opens, but the dirty bit stays set;
 * - with no corruption left and no read error the bit is cleared (after a flush);
 * - only a read or write error fails the open ("Image corrupted").
 *
 * Leaked clusters are allowed (the next allocations go to the end of the file anyway).
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";
import { isValidClusterOffset, isValidTableOffset, type QedHeader } from "./header.ts";
import { QED_ZERO_CLUSTER, type QedTable } from "./table.ts";

/** Largest reference bitmap the check builds (one bit per cluster of the file). */
const MAX_BITMAP_BYTES = 256 * 1024 * 1024;

/** What the check needs from the image. */
export interface CheckTarget {
  readonly header: QedHeader;
  /** File length rounded down to whole clusters. */
  readonly fileSize: number;
  readonly l1: QedTable;
  /** Reads the L2 table at `offset` (through the driver's cache). */
  readTable(offset: number): Promise<QedTable>;
  /** Writes entries `[index, index+n)` of `table` (stored at `offset`) back to the file. */
  writeTable(table: QedTable, offset: number, index: number, n: number): Promise<void>;
}

export interface CheckResult {
  corruptions: number;
  fixed: number;
  leaks: number;
  checkErrors: number;
  /** The first read/write error, if any (the open then fails). */
  error?: unknown;
}

/** Runs the check with fixing on. */
export async function checkAndFix(t: CheckTarget): Promise<CheckResult> {
  const h = t.header;
  const cs = h.clusterSize;
  const res: CheckResult = { corruptions: 0, fixed: 0, leaks: 0, checkErrors: 0 };
  const nclusters = Math.ceil(t.fileSize / cs);
  if (nclusters / 8 > MAX_BITMAP_BYTES) {
    throw new BlockError(
      Errno.ENOMEM,
      `Image corrupted (a check of ${nclusters} clusters needs more memory than denbd allows)`,
    );
  }
  const used = new Uint8Array(Math.ceil(nclusters / 8));
  /** Marks `n` clusters from `offset` used; false when one of them already was. */
  const mark = (offset: number, n: number): boolean => {
    let dup = 0;
    for (let c = Math.floor(offset / cs), i = 0; i < n; i++, c++) {
      const bit = 1 << (c & 7);
      if (used[c >>> 3]! & bit) dup++;
      used[c >>> 3]! |= bit;
    }
    res.corruptions += dup;
    return dup === 0;
  };

  mark(h.l1TableOffset, h.tableSize);
  let badL1 = 0;
  for (let i = 0; i < t.l1.length; i++) {
    const off = t.l1.get(i);
    if (off === 0) continue;
    if (!isValidTableOffset(h, t.fileSize, off)) {
      t.l1.set(i, 0);
      res.fixed++;
      badL1++;
      continue;
    }
    if (!mark(off, h.tableSize)) continue; // a table referenced twice: not descended into
    let l2: QedTable;
    try {
      l2 = await t.readTable(off);
    } catch (e) {
      res.checkErrors++;
      res.error = e;
      continue;
    }
    let badL2 = 0;
    for (let j = 0; j < l2.length; j++) {
      const c = l2.get(j);
      if (c === 0 || c === QED_ZERO_CLUSTER) continue;
      if (!isValidClusterOffset(h, t.fileSize, c)) {
        l2.set(j, 0);
        res.fixed++;
        badL2++;
        continue;
      }
      mark(c, 1);
    }
    if (badL2 > 0) {
      try {
        await t.writeTable(l2, off, 0, l2.length);
      } catch (e) {
        res.checkErrors++;
        res.error = e;
      }
    }
  }
  if (badL1 > 0) {
    try {
      await t.writeTable(t.l1, h.l1TableOffset, 0, t.l1.length);
    } catch (e) {
      res.checkErrors++;
      res.error = e;
    }
  }
  if (res.error === undefined) {
    for (let c = h.headerSize; c < nclusters; c++) {
      if (!(used[c >>> 3]! & (1 << (c & 7)))) res.leaks++;
    }
  }
  return res;
}
