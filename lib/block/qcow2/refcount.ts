/**
 * Refcount reading, used only by qemu's "metadata preallocation" heuristic
 * (`qcow2_detect_metadata_preallocation`): an image counts as preallocated when at least
 * max(real·10/9, real+2) clusters have a non-zero refcount, `real` being the clusters the host file
 * really occupies. Block status then asks the host file where its holes are.
 *
 * @module
 */

/** Positional reader that zero-fills past end of file. */
export type Reader = (buf: Uint8Array, offset: number) => Promise<void>;

/** True when refcount `index` of `block` is non-zero; `bits` is 1..64 (a power of two). */
export function refcountNonZero(block: Uint8Array, index: number, bits: number): boolean {
  if (bits < 8) {
    const bit = index * bits;
    const byte = block[bit >> 3] ?? 0;
    return ((byte >> (bit & 7)) & ((1 << bits) - 1)) !== 0;
  }
  const bytes = bits >> 3;
  const start = index * bytes;
  for (let i = start; i < start + bytes; i++) if (block[i]) return true;
  return false;
}

/** Geometry of the refcount structures. */
export interface RefcountGeometry {
  readonly clusterSize: number;
  readonly refcountOrder: number;
  readonly tableOffset: number;
  readonly tableClusters: number;
}

/**
 * Count clusters `[0, endCluster)` with a non-zero refcount, stopping once `threshold` is reached.
 * Throws on an unaligned refcount block offset (qemu signals corruption there).
 */
export async function countReferencedClusters(
  read: Reader,
  g: RefcountGeometry,
  endCluster: number,
  threshold: number,
): Promise<number> {
  const cs = g.clusterSize;
  const bits = 1 << g.refcountOrder;
  const perBlock = (cs * 8) / bits;
  const table = new Uint8Array(g.tableClusters * cs);
  await read(table, g.tableOffset);
  const tv = new DataView(table.buffer);
  const tableEntries = table.length / 8;
  const block = new Uint8Array(cs);
  let count = 0;
  for (let rt = 0; rt * perBlock < endCluster && count < threshold; rt++) {
    if (rt >= tableEntries) break;
    const off = (tv.getUint32(rt * 8) * 0x100000000 + tv.getUint32(rt * 8 + 4)) -
      (tv.getUint32(rt * 8 + 4) & 0x1ff);
    if (off === 0) continue;
    if (off % cs !== 0) throw new Error(`Refblock offset ${off} unaligned (reftable index ${rt})`);
    await read(block, off);
    const n = Math.min(perBlock, endCluster - rt * perBlock);
    for (let i = 0; i < n && count < threshold; i++) {
      if (refcountNonZero(block, i, bits)) count++;
    }
  }
  return count;
}
