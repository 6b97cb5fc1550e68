/**
 * Compression of one qcow2 cluster for compressed writes, with qemu 7.2's parameters
 * (block/qcow2-threads.c): type 0 is raw deflate with a 4 KiB window (windowBits -12), memLevel 9
 * and the default level; type 1 is one zstd frame at zstd's default level. The output must fit
 * in `maxOut` bytes (qemu passes cluster_size - 1); when it does not, the cluster is not worth
 * compressing and the caller writes it as a normal cluster, as qemu does.
 *
 * @module
 */

import { constants, deflateRawSync } from "node:zlib";
import { BlockError, Errno } from "../types.ts";
import { COMPRESSION_ZSTD } from "./compressed.ts";

const SYMBOLS = {
  // ZSTD_CCtx* ZSTD_createCCtx(void)
  ZSTD_createCCtx: { parameters: [], result: "pointer" },
  // size_t ZSTD_compressCCtx(ZSTD_CCtx* cctx, void* dst, size_t dstCapacity,
  //                          const void* src, size_t srcSize, int compressionLevel)
  ZSTD_compressCCtx: {
    parameters: ["pointer", "buffer", "usize", "buffer", "usize", "i32"],
    result: "usize",
  },
  // unsigned ZSTD_isError(size_t code)
  ZSTD_isError: { parameters: ["usize"], result: "u32" },
  // ZSTD_ErrorCode ZSTD_getErrorCode(size_t functionResult)
  ZSTD_getErrorCode: { parameters: ["usize"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

/** ZSTD_CLEVEL_DEFAULT: what a fresh context compresses with (qemu sets no level). */
const ZSTD_LEVEL_DEFAULT = 3;
/** ZSTD_error_dstSize_tooSmall. */
const ZSTD_ERROR_DST_TOO_SMALL = 70;

let zstd: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;
let cctx: Deno.PointerValue = null;

function zstdContext(): [Deno.DynamicLibrary<typeof SYMBOLS>["symbols"], Deno.PointerObject] {
  if (zstd === undefined) {
    try {
      zstd = Deno.dlopen("libzstd.so.1", SYMBOLS);
    } catch (e) {
      throw new BlockError(
        Errno.ENOTSUP,
        `compressed write to a zstd qcow2 image, but libzstd.so.1 cannot be loaded (apt-get install libzstd1): ${
          (e as Error).message
        }`,
      );
    }
  }
  const s = zstd.symbols;
  if (cctx === null) {
    cctx = s.ZSTD_createCCtx();
    if (cctx === null) throw new BlockError(Errno.ENOMEM, "ZSTD_createCCtx failed");
  }
  return [s, cctx];
}

/**
 * Compress one cluster. Returns the compressed bytes, or null when they would not fit in
 * `maxOut` bytes. Synchronous: one 64 KiB cluster deflates in about a millisecond.
 */
export function compressCluster(type: number, src: Uint8Array, maxOut: number): Uint8Array | null {
  if (type === COMPRESSION_ZSTD) {
    const [s, ctx] = zstdContext();
    const dst = new Uint8Array(maxOut);
    const n = s.ZSTD_compressCCtx(
      ctx,
      dst,
      BigInt(maxOut),
      src,
      BigInt(src.length),
      ZSTD_LEVEL_DEFAULT,
    );
    if (s.ZSTD_isError(n)) {
      if (s.ZSTD_getErrorCode(n) === ZSTD_ERROR_DST_TOO_SMALL) return null;
      throw new BlockError(Errno.EINVAL, `zstd compression failed (code ${n})`);
    }
    return dst.subarray(0, Number(n));
  }
  let out: Uint8Array;
  try {
    out = deflateRawSync(src, {
      level: constants.Z_DEFAULT_COMPRESSION,
      windowBits: 12,
      memLevel: 9,
      strategy: constants.Z_DEFAULT_STRATEGY,
      // Stop as soon as the stream outgrows a cluster instead of finishing it.
      maxOutputLength: maxOut + 1,
    });
  } catch (e) {
    if ((e as { code?: string }).code === "ERR_BUFFER_TOO_LARGE") return null;
    throw new BlockError(Errno.EINVAL, `deflate failed: ${(e as Error).message}`);
  }
  return out.length <= maxOut ? out : null;
}
