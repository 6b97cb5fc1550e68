/**
 * The VDI block map: one little-endian 32-bit entry per 1 MiB guest block, the index of the
 * image block that holds it, or VDI_UNALLOCATED / VDI_DISCARDED (both read as zeroes). Kept
 * as the bytes of the file's map sectors, so a changed entry is written back as the sector that
 * holds it (qemu writes whole map sectors too).
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";
import { VDI_DISCARDED } from "./header.ts";

const SECTOR = 512;
const ENTRIES_PER_SECTOR = SECTOR / 4;

/** Whether an entry points at an image block. */
export function isAllocated(entry: number): boolean {
  return entry < VDI_DISCARDED;
}

export class VdiBlockMap {
  /** The map's sectors as stored (whole sectors: the tail past the last entry is kept too). */
  readonly bytes: Uint8Array;
  readonly length: number;
  readonly #view: DataView;

  /** @param bytes the map sectors read from the file; `length` entries are used */
  constructor(bytes: Uint8Array, length: number) {
    if (bytes.length < length * 4) throw new RangeError("block map shorter than its entries");
    this.bytes = bytes;
    this.length = length;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  /** Bytes of a map of `entries` entries, in whole sectors. */
  static byteLength(entries: number): number {
    return Math.ceil((entries * 4) / SECTOR) * SECTOR;
  }

  get(block: number): number {
    return this.#view.getUint32(block * 4, true);
  }

  set(block: number, entry: number): void {
    this.#view.setUint32(block * 4, entry >>> 0, true);
  }

  /** The sector of the map holding `block`'s entry: its byte offset in the map and bytes. */
  sectorOf(block: number): { offset: number; bytes: Uint8Array } {
    const offset = Math.floor(block / ENTRIES_PER_SECTOR) * SECTOR;
    return { offset, bytes: this.bytes.subarray(offset, offset + SECTOR) };
  }

  /**
   * Checks every allocated entry against the image: an index at or past blocks_in_image (what
   * `qemu-img check` calls "too large") or a block starting past the end of the file means a
   * damaged image whose reads and writes would land in the wrong place. Returns the number of
   * allocated entries.
   */
  validate(limits: { blocks: number; offsetData: number; blockSize: number; fileLength: number }) {
    let allocated = 0;
    for (let i = 0; i < this.length; i++) {
      const e = this.get(i);
      if (!isAllocated(e)) continue;
      allocated++;
      if (e >= limits.blocks) {
        throw new BlockError(
          Errno.EINVAL,
          `Corrupt VDI image: block map entry ${i} is ${e}, beyond the image's ${limits.blocks} blocks`,
        );
      }
      const at = limits.offsetData + e * limits.blockSize;
      if (at >= limits.fileLength) {
        throw new BlockError(
          Errno.EINVAL,
          `Corrupt VDI image: block map entry ${i} points at offset ${at}, past the end of the file (${limits.fileLength} bytes)`,
        );
      }
    }
    return allocated;
  }
}
