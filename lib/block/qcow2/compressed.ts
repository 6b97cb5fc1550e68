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
 * Decompress `src` into a new buffer of exactly `size` bytes (one cluster), or null for corrupt
 * data, data that ends before the cluster is full, or (deflate only) data that inflates to more
 * than a cluster: qemu accepts the first cluster of such an over-long stream, node:zlib cannot
 * stop there; only a crafted image has one. The buffer owns its ArrayBuffer, so it can be
 * transferred between Workers without a copy.
 */
export function decompressCluster(type: number, src: Uint8Array, size: number): Uint8Array | null {
  if (type === COMPRESSION_ZSTD) {
    const dst = new Uint8Array(size);
    return zstdDecompress(src, dst) ? dst : null;
  }
  let out: Uint8Array;
  try {
    // SYNC_FLUSH: a truncated stream yields what it has instead of throwing; the length check
    // below then rejects it. maxOutputLength bounds memory for a deflate bomb. A chunk of one
    // cluster makes zlib write straight into the result (the 16 KiB default costs 25% in copies).
    out = inflateRawSync(src, {
      maxOutputLength: size,
      finishFlush: constants.Z_SYNC_FLUSH,
      chunkSize: Math.max(size, constants.Z_MIN_CHUNK),
    });
  } catch {
    return null;
  }
  if (out.length !== size) return null;
  // Small results may share Node's buffer pool: copy those (Buffer#slice would not copy).
  if (out.byteOffset !== 0 || out.buffer.byteLength !== size) return new Uint8Array(out);
  return new Uint8Array(out.buffer, 0, size);
}
