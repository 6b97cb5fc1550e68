/**
 * L1/L2 entry and compressed-descriptor decoding: pure functions on the two 32-bit halves of an
 * entry (hi = bits 32..63, lo = bits 0..31), so the hot path never builds a BigInt.
 * Classification follows qemu's `qcow2_get_cluster_type` / `qcow2_get_subcluster_type`.
 *
 * @module
 */

/** What a (sub)cluster reads as. Numeric for cheap comparisons on the hot path. */
export const Kind = {
  /** Not allocated here: read the backing file (or zeroes). */
  Unalloc: 0,
  /** Reads as zeroes (ZERO_PLAIN or ZERO_ALLOC). */
  Zero: 1,
  /** Guest data at a host offset (NORMAL). */
  Data: 2,
  /** Compressed cluster. */
  Compressed: 3,
  /** An entry qemu treats as corruption (EIO). */
  Invalid: 4,
} as const;
/** One of the {@link Kind} values. */
export type Kind = typeof Kind[keyof typeof Kind];

const HI_COPIED = 0x80000000;
const HI_COMPRESSED = 0x40000000;
/** Offset bits 9..55: hi bits 0..23, lo bits 9..31. */
const HI_OFFSET = 0x00ffffff;
const LO_OFFSET = 0xfffffe00;

/** Host offset in an L1 entry or standard L2 entry (bits 9..55). */
export function entryOffset(hi: number, lo: number): number {
  return (hi & HI_OFFSET) * 0x100000000 + ((lo & LO_OFFSET) >>> 0);
}

/** True when bit 62 (compressed) is set. */
export function isCompressed(hi: number): boolean {
  return (hi & HI_COMPRESSED) !== 0;
}

/** Bit 63 (COPIED). */
export function isCopied(hi: number): boolean {
  return (hi & HI_COPIED) !== 0;
}

/**
 * Kind of a cluster with standard (64-bit) L2 entries.
 * @param dataFile the image has an external data file (offset 0 + COPIED is then valid data)
 */
export function standardKind(hi: number, lo: number, dataFile: boolean): Kind {
  if (hi & HI_COMPRESSED) return Kind.Compressed;
  if (lo & 1) return Kind.Zero;
  if (entryOffset(hi, lo) === 0) {
    return dataFile && (hi & HI_COPIED) ? Kind.Data : Kind.Unalloc;
  }
  return Kind.Data;
}

/**
 * Kind of subcluster `sc` (0..31) with extended L2 entries; `alloc` and `zero` are the low and
 * high words of the subcluster bitmap. A cluster with an offset but neither bit set for `sc` is
 * UNALLOCATED_ALLOC (reads from the backing file).
 */
export function extendedKind(
  hi: number,
  lo: number,
  alloc: number,
  zero: number,
  sc: number,
  dataFile: boolean,
): Kind {
  if (hi & HI_COMPRESSED) return Kind.Compressed;
  const bit = 1 << sc;
  const hasOffset = entryOffset(hi, lo) !== 0 || (dataFile && (hi & HI_COPIED) !== 0);
  if (hasOffset) {
    if (alloc & zero) return Kind.Invalid;
    if (zero & bit) return Kind.Zero;
    if (alloc & bit) return Kind.Data;
    return Kind.Unalloc;
  }
  if (alloc) return Kind.Invalid;
  return zero & bit ? Kind.Zero : Kind.Unalloc;
}

/** A compressed cluster's location in the image file. */
export interface CompressedDescriptor {
  /** Host byte offset of the compressed stream (not aligned). */
  readonly offset: number;
  /** Bytes to read: up to the end of the last 512-byte sector the descriptor covers. */
  readonly length: number;
}

/**
 * Decode a compressed L2 entry: offset in bits 0..x-1, x = 62 - (clusterBits - 8), then the count
 * of additional 512-byte sectors. Length as qemu computes it: (nsec + 1) * 512 - (offset % 512).
 */
export function compressedDescriptor(
  hi: number,
  lo: number,
  clusterBits: number,
): CompressedDescriptor {
  const x = 62 - (clusterBits - 8); // 49..61, so the split is always inside hi
  const hiOffsetBits = x - 32;
  const hiMask = (1 << hiOffsetBits) - 1;
  const offset = (hi & hiMask) * 0x100000000 + (lo >>> 0);
  const sizeMask = (1 << (clusterBits - 8)) - 1;
  const nsec = ((hi & 0x3fffffff) >>> hiOffsetBits) & sizeMask;
  return { offset, length: (nsec + 1) * 512 - (offset % 512) };
}
