/**
 * The dynamic VHD's block allocation table: one big-endian 32-bit entry per block, the sector
 * where the block's sector bitmap starts (the data follows the bitmap), or 0xffffffff. Loaded
 * once and held decoded; qemu's open rules (the first free offset past every block, the
 * "truncated" check) plus denbd's own checks against blocks that overlap the metadata or each
 * other, which qemu would open and then misread or overwrite.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import { BlockError, Errno } from "../types.ts";
import { VHD_BAT_UNUSED } from "./footer.ts";

const SECTOR = 512;
/** Largest part of the table held in memory (64 Mi entries: 128 TiB in 2 MiB blocks). */
export const MAX_BAT_ENTRIES_IN_MEMORY = 64 * 1024 * 1024;
/** Bytes read per step while loading. */
const READ_CHUNK = 4 * 1024 * 1024;

/** A metadata region no block may overlap. */
export interface Region {
  readonly name: string;
  readonly start: number;
  readonly end: number;
}

export interface BatLayout {
  /** File offset of the table. */
  readonly offset: number;
  /** Entries stored (max_table_entries). */
  readonly entries: number;
  /** Entries the disk uses (ceil(size / block size)); only these are kept. */
  readonly used: number;
  readonly blockSize: number;
  readonly bitmapSize: number;
  readonly fileLength: number;
  readonly path: string;
  /** The footer copy and the dynamic header. */
  readonly metadata: readonly Region[];
}

/** The loaded table and the first free file offset after every block (qemu's). */
export interface LoadedBat {
  readonly table: Uint32Array;
  readonly freeOffset: number;
}

function corrupt(path: string, msg: string): BlockError {
  return new BlockError(Errno.EINVAL, `Corrupt VHD image '${path}': ${msg}`);
}

/**
 * Reads and checks the table. Entries past `used` count for the free offset, as in qemu, but
 * are not kept. The caller has checked that the table lies inside the file.
 */
export async function loadBat(file: FileEngine, l: BatLayout): Promise<LoadedBat> {
  if (l.used > MAX_BAT_ENTRIES_IN_MEMORY) {
    throw new BlockError(
      Errno.ENOMEM,
      `VHD block allocation table of ${l.used} entries is larger than denbd supports (${MAX_BAT_ENTRIES_IN_MEMORY})`,
    );
  }
  const table = new Uint32Array(l.used);
  const span = l.bitmapSize + l.blockSize;
  const batEnd = l.offset + l.entries * 4;
  let free = Math.ceil(batEnd / SECTOR) * SECTOR;
  const chunk = new Uint8Array(Math.min(READ_CHUNK, Math.max(4, l.entries * 4)));
  const view = new DataView(chunk.buffer);
  for (let first = 0; first < l.entries;) {
    const n = Math.min(l.entries - first, chunk.length / 4);
    const bytes = chunk.subarray(0, n * 4);
    const got = await file.pread(bytes, l.offset + first * 4);
    bytes.fill(0, got);
    for (let i = 0; i < n; i++) {
      const e = view.getUint32(i * 4);
      if (first + i < l.used) table[first + i] = e;
      if (e !== VHD_BAT_UNUSED) free = Math.max(free, e * SECTOR + span);
    }
    first += n;
  }
  if (free > l.fileLength) {
    throw new BlockError(
      Errno.EINVAL,
      "block-vpc: free_data_block_offset points after the end of file. The image has been truncated.",
    );
  }
  checkOverlaps(table, l, batEnd);
  return { table, freeOffset: free };
}

/**
 * Beyond qemu: a block whose bitmap or data overlaps the footer copy, the dynamic header, the
 * table or another block would read metadata as guest data, and writes to it would overwrite
 * that metadata or alias another guest block.
 */
function checkOverlaps(table: Uint32Array, l: BatLayout, batEnd: number): void {
  const span = l.bitmapSize + l.blockSize;
  const regions: Region[] = [...l.metadata, {
    name: "the block allocation table",
    start: l.offset,
    end: batEnd,
  }];
  let count = 0;
  for (let i = 0; i < table.length; i++) if (table[i] !== VHD_BAT_UNUSED) count++;
  const starts = new Float64Array(count);
  let k = 0;
  for (let i = 0; i < table.length; i++) {
    const e = table[i]!;
    if (e === VHD_BAT_UNUSED) continue;
    const start = e * SECTOR;
    for (const r of regions) {
      if (start < r.end && start + span > r.start) {
        throw corrupt(
          l.path,
          `block ${i} (BAT entry at offset ${
            l.offset + i * 4
          }: sector ${e}) overlaps ${r.name} at offset ${r.start}`,
        );
      }
    }
    starts[k++] = start;
  }
  starts.sort();
  for (let j = 1; j < starts.length; j++) {
    if (starts[j]! - starts[j - 1]! < span) {
      const a = table.findIndex((e) => e * SECTOR === starts[j - 1]);
      const b = table.findIndex((e, i) => i !== a && e * SECTOR === starts[j]);
      throw corrupt(
        l.path,
        `blocks ${Math.min(a, b)} and ${Math.max(a, b)} overlap at offset ${
          starts[j]
        } (BAT at offset ${l.offset})`,
      );
    }
  }
}
