/**
 * The Parallels format extension (docs/interop/parallels.txt): one cluster at `ext_off` with a
 * magic, an MD5 of the rest of the cluster and a list of features, of which qemu 7.2 knows dirty
 * bitmaps. qemu reads it only when the image is opened read-only, and refuses the image when the
 * extension is damaged; these are its checks and messages. denbd checks the bitmaps' geometry
 * as qemu does but does not export them (see the driver's module notes).
 *
 * @module
 */

import { createHash } from "node:crypto";
import { BlockError, Errno } from "../types.ts";

const EXT_MAGIC = 0xab234cef23dcea87n;
const END_OF_FEATURES = 0n;
const DIRTY_BITMAP_FEATURE = 0x20385fae252cb34an;
const EXT_HEADER_SIZE = 24;
const FEATURE_HEADER_SIZE = 24;
const BITMAP_FEATURE_SIZE = 32;

function invalid(msg: string): BlockError {
  return new BlockError(Errno.EINVAL, msg);
}

/** A dirty bitmap feature as found (not loaded). */
export interface ParallelsBitmapInfo {
  readonly id: string;
  readonly granularity: number;
  readonly l1Size: number;
}

function uuidString(b: Uint8Array): string {
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * Checks the extension cluster `ext` of an image of `totalSectors` sectors and clusters of
 * `clusterSize` bytes. Throws qemu's message for what qemu refuses.
 */
export function parseParallelsExtension(
  ext: Uint8Array,
  clusterSize: number,
  totalSectors: number,
): ParallelsBitmapInfo[] {
  const v = new DataView(ext.buffer, ext.byteOffset, ext.byteLength);
  const magic = v.getBigUint64(0, true);
  if (magic !== EXT_MAGIC) {
    throw invalid(
      `Wrong parallels Format Extension magic: 0x${magic.toString(16)}, expected: 0x${
        EXT_MAGIC.toString(16)
      }`,
    );
  }
  const sum = createHash("md5").update(ext.subarray(EXT_HEADER_SIZE, clusterSize)).digest();
  for (let i = 0; i < 16; i++) {
    if (sum[i] !== ext[8 + i]) {
      throw invalid("Wrong checksum in Format Extension header. Format extension is corrupted.");
    }
  }
  const bitmaps: ParallelsBitmapInfo[] = [];
  let pos = EXT_HEADER_SIZE;
  // Every feature advances pos by at least its header, so this ends within the cluster.
  for (;;) {
    const remaining = clusterSize - pos;
    if (remaining < FEATURE_HEADER_SIZE) {
      throw invalid(
        `Can not read feature header, as remaining bytes (${remaining}) in Format Extension is less than Feature header size (${FEATURE_HEADER_SIZE})`,
      );
    }
    const fmagic = v.getBigUint64(pos, true);
    const flags = v.getBigUint64(pos + 8, true);
    const dataSize = v.getUint32(pos + 16, true);
    pos += FEATURE_HEADER_SIZE;
    if (flags !== 0n) throw invalid("Flags for extension feature are unsupported");
    if (dataSize > clusterSize - pos) {
      throw invalid("Feature data_size exceedes Format Extension cluster");
    }
    if (fmagic === END_OF_FEATURES) return bitmaps;
    if (fmagic !== DIRTY_BITMAP_FEATURE) throw invalid(`Unknown feature: 0x${fmagic.toString(16)}`);
    bitmaps.push(checkBitmap(ext.subarray(pos, pos + dataSize), clusterSize, totalSectors));
    pos = Math.ceil((pos + dataSize) / 8) * 8;
  }
}

function checkBitmap(data: Uint8Array, clusterSize: number, totalSectors: number) {
  if (data.length < BITMAP_FEATURE_SIZE) {
    throw invalid(
      `Too small Bitmap Feature area in Parallels Format Extension: ${data.length} bytes, expected at least ${BITMAP_FEATURE_SIZE} bytes`,
    );
  }
  const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const size = v.getBigUint64(0, true);
  const granularity = v.getUint32(24, true) * 512;
  const l1Size = v.getUint32(28, true);
  if (size !== BigInt(totalSectors)) {
    throw invalid(
      `Bitmap size (in sectors) ${
        BigInt.asIntN(64, size)
      } differs from disk size in sectors ${totalSectors}`,
    );
  }
  if (l1Size * 8 > data.length - BITMAP_FEATURE_SIZE) {
    throw invalid("Bitmaps feature corrupted: l1 table exceeds extension data_size");
  }
  const id = uuidString(data.subarray(8, 24));
  if (granularity < 512 || (granularity & (granularity - 1)) !== 0) {
    throw invalid("Granularity must be power of 2 and at least 512");
  }
  // The serialized bitmap: one bit per granule, in 64-bit words; the table holds one entry
  // per cluster of it.
  const bits = Math.ceil((totalSectors * 512) / granularity);
  const bytes = Math.ceil(bits / 64) * 8;
  const expected = Math.ceil(bytes / clusterSize);
  if (expected !== l1Size) {
    throw invalid(
      `Bitmap table size ${l1Size} does not correspond to bitmap size and cluster size. Expected ${expected}`,
    );
  }
  return { id, granularity, l1Size };
}
