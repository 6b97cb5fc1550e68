/**
 * Decompression of one qcow2 compressed cluster: type 0 is raw deflate (no zlib header), type 1 a
 * zstd frame. Both must produce exactly one cluster; trailing input (the next cluster's bytes in
 * the same sector) is ignored, as in qemu's `qcow2_zlib_decompress` / `qcow2_zstd_decompress`.
 *
 * @module
 */

import { constants, inflateRawSync } from "node:zlib";
import { zstdDecompress } from "./zstd.ts";

/** compression_type values from the v3 header. */
export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

/**
 * Decompress `src` into `dst` (one cluster). Returns false for corrupt data, data that ends
 * before `dst` is full, or (deflate only) data that inflates to more than `dst`: qemu accepts
 * the first cluster of such an over-long stream, node:zlib cannot stop there; only a crafted
 * image has one.
 */
export function decompressCluster(type: number, src: Uint8Array, dst: Uint8Array): boolean {
  if (type === COMPRESSION_ZSTD) return zstdDecompress(src, dst);
  let out: Uint8Array;
  try {
    // SYNC_FLUSH: a truncated stream yields what it has instead of throwing; the length check
    // below then rejects it. maxOutputLength bounds memory for a deflate bomb.
    out = inflateRawSync(src, {
      maxOutputLength: dst.length,
      finishFlush: constants.Z_SYNC_FLUSH,
    });
  } catch {
    return false;
  }
  if (out.length !== dst.length) return false;
  dst.set(out);
  return true;
}
