/**
 * libzstd through Deno FFI, for qcow2 compression_type=1. Only streaming decompression is bound:
 * qemu writes one frame per cluster with no length prefix and the range read from the image may
 * carry the next cluster's bytes after it, so the decoder must stop once the output is full
 * (what qemu's `qcow2_zstd_decompress` does), which the one-shot API cannot.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

const SYMBOLS = {
  // ZSTD_DCtx* ZSTD_createDCtx(void)
  ZSTD_createDCtx: { parameters: [], result: "pointer" },
  // size_t ZSTD_freeDCtx(ZSTD_DCtx* dctx)
  ZSTD_freeDCtx: { parameters: ["pointer"], result: "usize" },
  // size_t ZSTD_DCtx_reset(ZSTD_DCtx* dctx, ZSTD_ResetDirective reset)
  ZSTD_DCtx_reset: { parameters: ["pointer", "i32"], result: "usize" },
  // size_t ZSTD_DCtx_setParameter(ZSTD_DCtx* dctx, ZSTD_dParameter param, int value)
  ZSTD_DCtx_setParameter: { parameters: ["pointer", "i32", "i32"], result: "usize" },
  // size_t ZSTD_decompressStream(ZSTD_DCtx* zds, ZSTD_outBuffer* output, ZSTD_inBuffer* input)
  // ZSTD_outBuffer = { void* dst; size_t size; size_t pos; }, ZSTD_inBuffer = { const void* src;
  // size_t size; size_t pos; }: 24 bytes each on 64-bit Linux.
  ZSTD_decompressStream: { parameters: ["pointer", "buffer", "buffer"], result: "usize" },
  // unsigned ZSTD_isError(size_t code)
  ZSTD_isError: { parameters: ["usize"], result: "u32" },
} as const satisfies Deno.ForeignLibraryInterface;

const ZSTD_RESET_SESSION_ONLY = 1;
const ZSTD_D_WINDOW_LOG_MAX = 100;
/**
 * Largest window a frame may ask for: 8 MiB covers any 2 MiB cluster (qemu's frames use at most
 * the cluster size) and keeps a crafted frame from making libzstd allocate 128 MiB.
 */
const WINDOW_LOG_MAX = 23;

let lib: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;
let dctx: Deno.PointerValue = null;
const outStruct = new Uint8Array(24);
const inStruct = new Uint8Array(24);
const outView = new DataView(outStruct.buffer);
const inView = new DataView(inStruct.buffer);

function symbols(): Deno.DynamicLibrary<typeof SYMBOLS>["symbols"] {
  if (!lib) {
    try {
      lib = Deno.dlopen("libzstd.so.1", SYMBOLS);
    } catch (e) {
      throw new BlockError(
        Errno.EIO,
        `zstd-compressed qcow2 cluster, but libzstd.so.1 cannot be loaded (apt-get install libzstd1): ${
          (e as Error).message
        }`,
      );
    }
  }
  return lib.symbols;
}

function context(): NonNullable<Deno.PointerValue> {
  const s = symbols();
  if (dctx === null) {
    dctx = s.ZSTD_createDCtx();
    if (dctx === null) throw new BlockError(Errno.ENOMEM, "ZSTD_createDCtx failed");
    s.ZSTD_DCtx_setParameter(dctx, ZSTD_D_WINDOW_LOG_MAX, WINDOW_LOG_MAX);
  }
  return dctx;
}

function address(buf: Uint8Array): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

/**
 * Decompress zstd data from `src` until `dst` is full. Bytes after the point where `dst` filled
 * are ignored. Returns false when the data is corrupt or ends before `dst` is full.
 * Synchronous: the call is short (one cluster) and one shared context serves every image.
 */
export function zstdDecompress(src: Uint8Array, dst: Uint8Array): boolean {
  const s = symbols();
  const ctx = context();
  s.ZSTD_DCtx_reset(ctx, ZSTD_RESET_SESSION_ONLY);
  outView.setBigUint64(0, address(dst), true);
  outView.setBigUint64(8, BigInt(dst.length), true);
  outView.setBigUint64(16, 0n, true);
  inView.setBigUint64(0, address(src), true);
  inView.setBigUint64(8, BigInt(src.length), true);
  inView.setBigUint64(16, 0n, true);
  let outPos = 0;
  let inPos = 0;
  // Each round either makes progress or fails, and both positions are bounded.
  while (outPos < dst.length) {
    const ret = s.ZSTD_decompressStream(ctx, outStruct, inStruct);
    if (s.ZSTD_isError(ret)) return false;
    const newOut = Number(outView.getBigUint64(16, true));
    const newIn = Number(inView.getBigUint64(16, true));
    if (newOut <= outPos && newIn <= inPos) return false; // no progress: input exhausted
    outPos = newOut;
    inPos = newIn;
  }
  return true;
}
