/**
 * The decompressors of dmg chunks and cloop blocks, with qemu's success rule: the stream must
 * end, and must produce exactly the declared size (less or more is a read error).
 *
 * - zlib (dmg UDZO, cloop): a zlib-wrapped deflate stream, through node:zlib. Bytes after the
 *   end of the stream are ignored, as zlib's inflate leaves them unread.
 * - bzip2 (dmg UDBZ): libbz2.so.1.0 through Deno FFI, on Deno's blocking pool so the event loop
 *   keeps serving. qemu does this in its dmg-bz2 module; when the library cannot be loaded,
 *   {@link bzip2Available} is false and the dmg driver treats bzip2 chunks as qemu does without
 *   that module.
 *
 * @module
 */

import { inflateSync } from "node:zlib";

/** `src` inflated to exactly `size` bytes, or null (corrupt, short, long or unfinished). */
export function inflateExact(src: Uint8Array, size: number): Uint8Array | null {
  let out: Uint8Array;
  try {
    // maxOutputLength bounds a deflate bomb; one output chunk of the whole size avoids copies.
    out = inflateSync(src, { maxOutputLength: size, chunkSize: Math.max(size, 64) });
  } catch {
    return null;
  }
  if (out.length !== size) return null;
  return out.byteOffset === 0 && out.buffer.byteLength === size ? out : new Uint8Array(out);
}

const BZ2_SYMBOLS = {
  // int BZ2_bzBuffToBuffDecompress(char *dest, unsigned int *destLen, char *source,
  //                                unsigned int sourceLen, int small, int verbosity)
  BZ2_bzBuffToBuffDecompress: {
    parameters: ["buffer", "buffer", "buffer", "u32", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },
} as const satisfies Deno.ForeignLibraryInterface;

/** BZ_OK: the stream ended inside the output buffer. */
const BZ_OK = 0;

let bz2: Deno.DynamicLibrary<typeof BZ2_SYMBOLS>["symbols"] | null | undefined;

function libbz2(): Deno.DynamicLibrary<typeof BZ2_SYMBOLS>["symbols"] | null {
  if (bz2 === undefined) {
    try {
      bz2 = Deno.dlopen("libbz2.so.1.0", BZ2_SYMBOLS).symbols;
    } catch {
      bz2 = null;
    }
  }
  return bz2;
}

/** Whether bzip2 chunks can be decompressed (libbz2 loads). */
export function bzip2Available(): boolean {
  return libbz2() !== null;
}

/**
 * `src` bunzipped to exactly `size` bytes, or null. One call decodes the first stream: it fails
 * when the output would not fit (BZ_OUTBUFF_FULL), the input ends early or is corrupt, as
 * qemu's single BZ2_bzDecompress call with the chunk's size as the whole output buffer does.
 */
export async function bunzipExact(src: Uint8Array, size: number): Promise<Uint8Array | null> {
  const lib = libbz2();
  if (lib === null || size === 0) return null;
  const out = new Uint8Array(size);
  const len = new Uint32Array([size]);
  const rc = await lib.BZ2_bzBuffToBuffDecompress(out, len, src, src.length, 0, 0);
  if (rc !== BZ_OK || len[0] !== size) return null;
  return out;
}
