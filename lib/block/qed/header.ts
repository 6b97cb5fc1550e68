/**
 * The QED header (docs/interop/qed_spec.txt): 64 little-endian bytes at the start of the first
 * cluster, decoded with a DataView. The checks and their messages are qemu 7.2's qed open (what
 * `qemu-nbd` prints after `Failed to blk_new_open 'FILE': `), in its order, including its
 * arithmetic where it wraps (the largest image size is computed modulo 2^64).
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

/** Bytes of the header structure (qemu reads exactly this much). */
export const QED_HEADER_SIZE = 64;
/** "QED\0" read as a little-endian u32. */
export const QED_MAGIC = 0x00444551;
/** The image has a backing file. */
export const QED_F_BACKING_FILE = 0x01n;
/** The image needs a consistency check before use (the dirty bit). */
export const QED_F_NEED_CHECK = 0x02n;
/** The backing file is raw: never probe it. */
export const QED_F_BACKING_FORMAT_NO_PROBE = 0x04n;
/** Feature bits qemu 7.2 knows (no compat or autoclear bits are defined). */
export const QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK |
  QED_F_BACKING_FORMAT_NO_PROBE;
export const QED_MIN_CLUSTER_SIZE = 4 * 1024;
export const QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024;
export const QED_MIN_TABLE_SIZE = 1;
export const QED_MAX_TABLE_SIZE = 16;
/** qemu's backing_file buffer: a name of this many bytes or more fails to read. */
export const QED_BACKING_NAME_MAX = 4096;
const SECTOR = 512;
const U64 = (1n << 64n) - 1n;

// Field offsets (the packed QEDHeader layout).
const OFF_MAGIC = 0;
const OFF_CLUSTER_SIZE = 4;
const OFF_TABLE_SIZE = 8;
const OFF_HEADER_SIZE = 12;
const OFF_FEATURES = 16;
const OFF_COMPAT = 24;
const OFF_AUTOCLEAR = 32;
const OFF_L1_TABLE = 40;
const OFF_IMAGE_SIZE = 48;
const OFF_BACKING_OFFSET = 56;
const OFF_BACKING_SIZE = 60;

/** The decoded header; the mutable fields are the ones a writer changes. */
export interface QedHeader {
  readonly clusterSize: number;
  /** Clusters per L1/L2 table. */
  readonly tableSize: number;
  /** Clusters before the first regular cluster. */
  readonly headerSize: number;
  features: bigint;
  readonly compatFeatures: bigint;
  autoclearFeatures: bigint;
  readonly l1TableOffset: number;
  /** Guest size in bytes. */
  readonly imageSize: number;
  readonly backingNameOffset: number;
  readonly backingNameSize: number;
}

/** Whether `head` starts with the QED magic (qemu's bdrv_qed_probe: 100, else 0). */
export function qedProbe(head: Uint8Array): number {
  if (head.length < QED_HEADER_SIZE) return 0;
  const v = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return v.getUint32(OFF_MAGIC, true) === QED_MAGIC ? 100 : 0;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** qemu's largest image size for a geometry, with its uint64 wrap-around. */
export function qedMaxImageSize(clusterSize: number, tableSize: number): bigint {
  const entries = BigInt(tableSize * clusterSize) / 8n;
  return (entries * BigInt(clusterSize) * entries) & U64;
}

/** qemu's check of a table offset: cluster-aligned, past the header, the whole table in the file. */
export function isValidTableOffset(h: QedHeader, fileSize: number, offset: number): boolean {
  const end = offset + (h.tableSize - 1) * h.clusterSize;
  // qemu's overflow test also rejects a one-cluster table (end == offset).
  if (end <= offset) return false;
  return isValidClusterOffset(h, fileSize, offset) && isValidClusterOffset(h, fileSize, end);
}

/** qemu's check of a data cluster offset: aligned, past the header, before the end of the file. */
export function isValidClusterOffset(h: QedHeader, fileSize: number, offset: number): boolean {
  if (offset % h.clusterSize !== 0) return false;
  return offset >= h.headerSize * h.clusterSize && offset < fileSize;
}

function invalid(msg: string): BlockError {
  return new BlockError(Errno.EINVAL, msg);
}

/**
 * Decodes and checks a header (shorter input is read as zero-padded, as qemu reads past the end
 * of a short file). `fileLength` is the image file's length: tables must lie inside it.
 */
export function decodeQedHeader(input: Uint8Array, fileLength: number): QedHeader {
  const bytes = new Uint8Array(QED_HEADER_SIZE);
  bytes.set(input.subarray(0, QED_HEADER_SIZE));
  const v = new DataView(bytes.buffer);
  if (v.getUint32(OFF_MAGIC, true) !== QED_MAGIC) throw invalid("Image not in QED format");
  const features = v.getBigUint64(OFF_FEATURES, true);
  if ((features & ~QED_FEATURE_MASK) !== 0n) {
    throw new BlockError(
      Errno.ENOTSUP,
      `Unsupported QED features: ${(features & ~QED_FEATURE_MASK).toString(16)}`,
    );
  }
  const clusterSize = v.getUint32(OFF_CLUSTER_SIZE, true);
  if (
    clusterSize < QED_MIN_CLUSTER_SIZE || clusterSize > QED_MAX_CLUSTER_SIZE ||
    !isPowerOfTwo(clusterSize)
  ) {
    throw invalid("QED cluster size is invalid");
  }
  const tableSize = v.getUint32(OFF_TABLE_SIZE, true);
  if (
    tableSize < QED_MIN_TABLE_SIZE || tableSize > QED_MAX_TABLE_SIZE || !isPowerOfTwo(tableSize)
  ) {
    throw invalid("QED table size is invalid");
  }
  const rawSize = v.getBigUint64(OFF_IMAGE_SIZE, true);
  if (rawSize % BigInt(SECTOR) !== 0n || rawSize > qedMaxImageSize(clusterSize, tableSize)) {
    throw invalid("QED image size is invalid");
  }
  const rawL1 = v.getBigUint64(OFF_L1_TABLE, true);
  const headerSize = v.getUint32(OFF_HEADER_SIZE, true);
  const h: QedHeader = {
    clusterSize,
    tableSize,
    headerSize,
    features,
    compatFeatures: v.getBigUint64(OFF_COMPAT, true),
    autoclearFeatures: v.getBigUint64(OFF_AUTOCLEAR, true),
    // Offsets past 2^53 are past any file: clamp so the range checks below refuse them.
    l1TableOffset: rawL1 > BigInt(Number.MAX_SAFE_INTEGER)
      ? Number.MAX_SAFE_INTEGER
      : Number(rawL1),
    imageSize: Number(rawSize),
    backingNameOffset: v.getUint32(OFF_BACKING_OFFSET, true),
    backingNameSize: v.getUint32(OFF_BACKING_SIZE, true),
  };
  // qemu rounds the file length down to whole clusters.
  const fileSize = fileLength - (fileLength % clusterSize);
  if (!isValidTableOffset(h, fileSize, h.l1TableOffset)) {
    throw invalid("QED table offset is invalid");
  }
  if (headerSize > Math.floor(0xffffffff / clusterSize)) {
    throw invalid("QED header size is too large");
  }
  if (
    (features & QED_F_BACKING_FILE) !== 0n &&
    h.backingNameOffset + h.backingNameSize > clusterSize * headerSize
  ) {
    throw invalid("QED backing filename offset is invalid");
  }
  return h;
}

/**
 * `h`'s fields written into `into` (a copy of the file's first bytes, at least
 * {@link QED_HEADER_SIZE} long): what qemu writes back when it updates the header in place.
 */
export function encodeQedHeader(h: QedHeader, into: Uint8Array): Uint8Array {
  const out = new Uint8Array(into);
  const v = new DataView(out.buffer);
  v.setUint32(OFF_MAGIC, QED_MAGIC, true);
  v.setUint32(OFF_CLUSTER_SIZE, h.clusterSize, true);
  v.setUint32(OFF_TABLE_SIZE, h.tableSize, true);
  v.setUint32(OFF_HEADER_SIZE, h.headerSize, true);
  v.setBigUint64(OFF_FEATURES, h.features, true);
  v.setBigUint64(OFF_COMPAT, h.compatFeatures, true);
  v.setBigUint64(OFF_AUTOCLEAR, h.autoclearFeatures, true);
  v.setBigUint64(OFF_L1_TABLE, BigInt(h.l1TableOffset), true);
  v.setBigUint64(OFF_IMAGE_SIZE, BigInt(h.imageSize), true);
  v.setUint32(OFF_BACKING_OFFSET, h.backingNameOffset, true);
  v.setUint32(OFF_BACKING_SIZE, h.backingNameSize, true);
  return out;
}
