/**
 * The qcow (version 1) header: 48 big-endian bytes at the start of the image. The checks and
 * messages are qemu 7.2's qcow_open, in its order.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

export const QCOW_HEADER_SIZE = 48;
/** "QFI\xfb", shared with qcow2 (which takes versions 2 and 3). */
export const QCOW_MAGIC = 0x514649fb;
export const QCOW_VERSION = 1;
export const QCOW_CRYPT_NONE = 0;
export const QCOW_CRYPT_AES = 1;
/** qemu's limit on the backing file name. */
const MAX_BACKING_NAME = 1023;
const INT_MAX = 0x7fffffff;

export interface QcowHeader {
  readonly backingFileOffset: number;
  readonly backingFileSize: number;
  /** Guest size in bytes: the header's size rounded down to whole sectors, as qemu takes it. */
  readonly size: number;
  readonly clusterBits: number;
  readonly l2Bits: number;
  readonly cryptMethod: number;
  readonly l1TableOffset: number;
  /** L1 entries: the size in units of one L2 table's coverage, rounded up. */
  readonly l1Size: number;
}

/** qemu's qcow_probe: the magic and version 1 (needs the whole header). */
export function probeQcow(head: Uint8Array): number {
  if (head.length < QCOW_HEADER_SIZE) return 0;
  const v = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return v.getUint32(0) === QCOW_MAGIC && v.getUint32(4) === QCOW_VERSION ? 100 : 0;
}

function invalid(msg: string): BlockError {
  return new BlockError(Errno.EINVAL, msg);
}

/** A u64 field as a number; past 2^53 it cannot be an offset in any file denbd can open. */
function offset(v: DataView, at: number, what: string): number {
  const x = v.getBigUint64(at);
  if (x > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw invalid(`Corrupt qcow image: ${what} 0x${x.toString(16)} is out of range`);
  }
  return Number(x);
}

/**
 * Decodes the header (shorter input reads as zero-padded). Throws BlockError with qemu's
 * message for what qemu refuses; encrypted images are refused later by the driver.
 */
export function decodeQcowHeader(input: Uint8Array): QcowHeader {
  const b = new Uint8Array(QCOW_HEADER_SIZE);
  b.set(input.subarray(0, QCOW_HEADER_SIZE));
  const v = new DataView(b.buffer);
  if (v.getUint32(0) !== QCOW_MAGIC) throw invalid("Image not in qcow format");
  const version = v.getUint32(4);
  if (version !== QCOW_VERSION) {
    throw new BlockError(
      Errno.ENOTSUP,
      `qcow (v${QCOW_VERSION}) does not support qcow version ${version}` +
        (version === 2 || version === 3 ? "\nTry the 'qcow2' driver instead." : ""),
    );
  }
  const rawSize = v.getBigUint64(24);
  if (rawSize <= 1n) throw invalid("Image size is too small (must be at least 2 bytes)");
  const clusterBits = b[32]!;
  const l2Bits = b[33]!;
  if (clusterBits < 9 || clusterBits > 16) {
    throw invalid("Cluster size must be between 512 and 64k");
  }
  if (l2Bits < 9 - 3 || l2Bits > 16 - 3) throw invalid("L2 table size must be between 512 and 64k");
  const cryptMethod = v.getUint32(36);
  if (cryptMethod !== QCOW_CRYPT_NONE && cryptMethod !== QCOW_CRYPT_AES) {
    throw invalid("invalid encryption method in qcow header");
  }
  const shift = BigInt(clusterBits + l2Bits);
  if (rawSize > (1n << 64n) - 1n - (1n << shift)) throw invalid("Image too large");
  const l1Size = (rawSize + (1n << shift) - 1n) >> shift;
  if (l1Size > BigInt(Math.floor(INT_MAX / 8))) throw invalid("Image too large");
  // Beyond qemu: byte offsets must stay exact as JS numbers.
  if (rawSize > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError(
      Errno.EFBIG,
      `qcow image size ${rawSize} is larger than denbd supports`,
    );
  }
  const backingFileOffset = offset(v, 8, "backing file offset");
  const backingFileSize = v.getUint32(16);
  if (backingFileOffset !== 0 && backingFileSize > MAX_BACKING_NAME) {
    throw invalid("Backing file name too long");
  }
  return {
    backingFileOffset,
    backingFileSize,
    size: Math.floor(Number(rawSize) / 512) * 512,
    clusterBits,
    l2Bits,
    cryptMethod,
    l1TableOffset: offset(v, 40, "L1 table offset"),
    l1Size: Number(l1Size),
  };
}
