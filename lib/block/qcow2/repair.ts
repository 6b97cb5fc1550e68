/**
 * Repair of a dirty image (lazy refcounts, left open by a crash) on a read-write open, as qemu
 * does before its first write: count every reference the image makes (header, L1 and L2 tables
 * of the active state and of every internal snapshot, data and compressed clusters, refcount
 * structures, snapshot table, bitmap directory, tables and data), make every refcount equal to
 * its count, then clear the dirty bit. Increments lost in the crash come back; leaks go away.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import type { ImageBitmaps } from "./bitmap.ts";
import { compressedDescriptor, entryOffset, isCompressed } from "./entry.ts";
import type { Qcow2Header } from "./header.ts";
import { readZeroPadded } from "./image.ts";
import type { RefcountStore } from "./refcount_store.ts";
import type { SnapshotEntry } from "./snapshot.ts";

/** Header offset of the incompatible feature bits (u64; bit 0 = dirty). */
const HEADER_INCOMPATIBLE = 72;

/** What the repair walks. */
export interface RepairInput {
  readonly file: FileEngine;
  readonly header: Qcow2Header;
  readonly refs: RefcountStore;
  /** The active L1 table as host-order words (hi, lo). */
  readonly l1: Uint32Array;
  readonly snapshots: readonly SnapshotEntry[];
  readonly bitmaps: ImageBitmaps | undefined;
}

/** Rebuild the refcounts of a dirty image and clear its dirty bit; returns clusters fixed. */
export async function repairDirtyImage(input: RepairInput): Promise<number> {
  const { file, header: h, refs } = input;
  const cs = h.clusterSize;
  const counts = new Map<number, number>();
  const ref = (offset: number, bytes: number) => {
    if (bytes <= 0) return;
    const last = Math.floor((offset + bytes - 1) / cs);
    for (let c = Math.floor(offset / cs); c <= last; c++) counts.set(c, (counts.get(c) ?? 0) + 1);
  };
  const read = async (offset: number, bytes: number): Promise<DataView> => {
    const buf = new Uint8Array(bytes);
    await readZeroPadded(file, buf, offset);
    return new DataView(buf.buffer);
  };

  ref(0, cs); // header and its extensions
  const walkL1 = async (l1: Uint32Array, l1Offset: number) => {
    ref(l1Offset, (l1.length >> 1) * 8);
    for (let i = 0; i < l1.length >> 1; i++) {
      const table = entryOffset(l1[i * 2]!, l1[i * 2 + 1]!);
      if (table === 0) continue;
      ref(table, cs);
      const v = await read(table, cs);
      const step = h.extendedL2 ? 16 : 8;
      for (let at = 0; at < cs; at += step) {
        const hi = v.getUint32(at), lo = v.getUint32(at + 4);
        if (isCompressed(hi)) {
          const d = compressedDescriptor(hi, lo, h.clusterBits);
          ref(d.offset - (d.offset % 512), d.length + (d.offset % 512));
        } else if (h.dataFile === undefined) {
          const host = entryOffset(hi, lo);
          if (host !== 0) ref(host, cs);
        }
      }
    }
  };
  await walkL1(input.l1, h.l1TableOffset);
  for (const sn of input.snapshots) {
    const v = await read(sn.l1TableOffset, sn.l1Size * 8);
    const words = new Uint32Array(sn.l1Size * 2);
    for (let i = 0; i < words.length; i++) words[i] = v.getUint32(i * 4);
    await walkL1(words, sn.l1TableOffset);
  }
  if (h.nbSnapshots > 0) ref(h.snapshotsOffset, snapshotTableBytes(input.snapshots));
  // The refcount structures themselves, as they are now.
  ref(refs.tableOffset, refs.tableClusters * cs);
  for (const off of refs.blockOffsets()) ref(off, cs);
  const dir = input.bitmaps?.directory;
  if (input.bitmaps !== undefined && dir !== undefined) {
    ref(dir.offset, dir.size);
    for (const s of input.bitmaps.stored) {
      ref(s.entry.tableOffset, s.entry.tableSize * 8);
      const v = await read(s.entry.tableOffset, s.entry.tableSize * 8);
      for (let i = 0; i < s.entry.tableSize; i++) {
        // Bitmap table entries keep their offset in the same bits as L1/L2 entries.
        const off = entryOffset(v.getUint32(i * 8), v.getUint32(i * 8 + 4));
        if (off !== 0) ref(off, cs);
      }
    }
  }
  const fixed = await refs.rebuild(counts);
  await refs.writeBlocks();
  await file.sync();
  if (refs.tableDirty) {
    await refs.writeTable();
    await file.sync();
  }
  const buf = new Uint8Array(8);
  new DataView(buf.buffer).setBigUint64(0, h.incompatible & ~1n);
  await file.pwrite(buf, HEADER_INCOMPATIBLE);
  await file.sync();
  return fixed;
}

/** Bytes of the snapshot table: entries of 40 bytes + extra data + id + name, 8-aligned. */
function snapshotTableBytes(snapshots: readonly SnapshotEntry[]): number {
  let n = 0;
  for (const s of snapshots) n += s.entryBytes;
  return n;
}
