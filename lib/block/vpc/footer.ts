/**
 * The VHD (Virtual PC) on-disk structures, big-endian: the 512-byte hard disk footer
 * ("conectix"; at the end of every image, and copied at offset 0 of dynamic ones) and the
 * 1024-byte dynamic disk header ("cxsparse") that locates the block allocation table. The checks
 * and messages are qemu 7.2's vpc_open, in its order, including its rule for the disk size: the
 * CHS geometry, unless the creator application is one whose tools trust `current_size`, the
 * geometry is the maximum one, or the `force_size_calc` option says otherwise.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

export const VHD_FOOTER_SIZE = 512;
export const VHD_DYN_HEADER_SIZE = 1024;
const SECTOR = 512;

/** Disk types of the footer's `type` field. */
export const VHD_FIXED = 2;
export const VHD_DYNAMIC = 3;
export const VHD_DIFFERENCING = 4;

/** The largest disk qemu opens (2040 GiB), in sectors. */
export const VHD_MAX_SECTORS = 0xff000000;
/** 65535 x 16 x 255 sectors: a geometry that stands for "use current_size". */
export const VHD_MAX_GEOMETRY = 65535 * 16 * 255;
/** qemu's limit on BAT entries (its table must fit in an int of bytes). */
export const VHD_MAX_TABLE_ENTRIES = Math.floor(0x7fffffff / 4);
/** An unallocated BAT entry. */
export const VHD_BAT_UNUSED = 0xffffffff;

/**
 * The largest offset + length qemu's block layer reads (BDRV_MAX_LENGTH, 2^63 - 2^30): a
 * header or table said to lie beyond fails to read rather than reading as zeroes.
 */
export const BDRV_MAX_LENGTH = (1n << 63n) - (1n << 30n);

// Footer field offsets.
const F_TYPE = 60;
const F_DATA_OFFSET = 16;
const F_CREATOR_APP = 28;
const F_CURRENT_SIZE = 48;
const F_CYLS = 56;
const F_HEADS = 58;
const F_SECS = 59;
const F_CHECKSUM = 64;

// Dynamic header field offsets.
const D_TABLE_OFFSET = 16;
const D_MAX_TABLE_ENTRIES = 28;
const D_BLOCK_SIZE = 32;

const COOKIE = "conectix";
const DYN_COOKIE = "cxsparse";

/** Creator applications whose images take their size from current_size (qemu's list). */
const CURRENT_SIZE_CREATORS: readonly string[] = ["win ", "qem2", "d2v ", "CTXS", "tap\0"];

/** `force_size_calc`: how the disk size is found (undefined: qemu's autodetection). */
export type SizeCalc = "chs" | "current_size" | undefined;

function matches(b: Uint8Array, at: number, text: string): boolean {
  if (b.length < at + text.length) return false;
  for (let i = 0; i < text.length; i++) if (b[at + i] !== text.charCodeAt(i)) return false;
  return true;
}

/** qemu's vpc_probe: the footer cookie at the start of the file. */
export function hasVhdCookie(head: Uint8Array): boolean {
  return matches(head, 0, COOKIE);
}

/** The one's complement of the byte sum, the checksum field counted as zero. */
export function footerChecksum(footer: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < VHD_FOOTER_SIZE; i++) {
    if (i >= F_CHECKSUM && i < F_CHECKSUM + 4) continue;
    sum += footer[i] ?? 0;
  }
  return ~sum >>> 0;
}

/** Parses `force_size_calc` as qemu's vpc_parse_options does. */
export function parseSizeCalc(value: string | undefined): SizeCalc {
  if (value === undefined) return undefined;
  if (value === "chs" || value === "current_size") return value;
  throw new BlockError(Errno.EINVAL, `Invalid size calculation mode: '${value}'`);
}

/** The footer fields denbd uses; `bytes` is the footer as read (rewritten after allocations). */
export interface VhdFooter {
  readonly bytes: Uint8Array;
  readonly type: number;
  readonly dataOffset: bigint;
  readonly currentSize: bigint;
  /** cylinders x heads x sectors per track. */
  readonly chsSectors: number;
  readonly creatorApp: string;
}

/** Whether a footer sector carries the cookie (any copy). */
export function isFooter(b: Uint8Array): boolean {
  return matches(b, 0, COOKIE);
}

/**
 * Decodes a footer sector (shorter input reads as zero-padded) and checks its checksum, with
 * qemu's message. The cookie is the caller's test (it decides where the footer lies).
 */
export function decodeFooter(input: Uint8Array): VhdFooter {
  const bytes = new Uint8Array(VHD_FOOTER_SIZE);
  bytes.set(input.subarray(0, VHD_FOOTER_SIZE));
  const v = new DataView(bytes.buffer);
  if (footerChecksum(bytes) !== v.getUint32(F_CHECKSUM)) {
    throw new BlockError(Errno.EINVAL, "Incorrect header checksum");
  }
  return {
    bytes,
    type: v.getUint32(F_TYPE),
    dataOffset: v.getBigUint64(F_DATA_OFFSET),
    currentSize: v.getBigUint64(F_CURRENT_SIZE),
    chsSectors: v.getUint16(F_CYLS) * bytes[F_HEADS]! * bytes[F_SECS]!,
    creatorApp: String.fromCharCode(...bytes.subarray(F_CREATOR_APP, F_CREATOR_APP + 4)),
  };
}

/**
 * The disk size in sectors as qemu's vpc_open finds it: Virtual PC (and qemu's own "qemu"
 * images) go by the CHS geometry, Hyper-V, disk2vhd, XenServer and qemu's force_size images
 * ("qem2") by current_size; the maximum geometry always means current_size. Throws EFBIG past
 * 2040 GiB with the message qemu's generic open makes (vpc_open sets none).
 */
export function diskSectors(f: VhdFooter, calc: SizeCalc, path: string): number {
  const useChs = !CURRENT_SIZE_CREATORS.includes(f.creatorApp) || calc === "chs";
  let sectors = f.chsSectors;
  if (!useChs || sectors === VHD_MAX_GEOMETRY || calc === "current_size") {
    const s = f.currentSize / BigInt(SECTOR);
    sectors = s > BigInt(VHD_MAX_SECTORS) ? VHD_MAX_SECTORS + 1 : Number(s);
  }
  if (sectors > VHD_MAX_SECTORS) {
    throw new BlockError(Errno.EFBIG, `Could not open '${path}': File too large`);
  }
  return sectors;
}

/** The dynamic disk header fields denbd uses. */
export interface VhdDynHeader {
  readonly tableOffset: bigint;
  /** max_table_entries as stored (unsigned). */
  readonly maxTableEntries: number;
  readonly blockSize: number;
  /** qemu's sector bitmap size in front of each block: block_size / 4096 rounded up to 512. */
  readonly bitmapSize: number;
}

/**
 * Decodes and checks the dynamic header against the disk size, with qemu's messages in its
 * order (the cookie, the block size, the block count, the table size).
 */
export function decodeDynHeader(b: Uint8Array, sectors: number): VhdDynHeader {
  if (!matches(b, 0, DYN_COOKIE)) throw new BlockError(Errno.EINVAL, "Invalid header magic");
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const blockSize = v.getUint32(D_BLOCK_SIZE);
  if (blockSize < SECTOR || (blockSize & (blockSize - 1)) !== 0) {
    throw new BlockError(Errno.EINVAL, `Invalid block size ${blockSize}`);
  }
  const bitmapSize = Math.ceil(Math.floor(blockSize / (8 * SECTOR)) / SECTOR) * SECTOR;
  const maxTableEntries = v.getUint32(D_MAX_TABLE_ENTRIES);
  const diskBytes = sectors * SECTOR;
  if (Math.floor(diskBytes / blockSize) > 0xffffffff) {
    throw new BlockError(Errno.EINVAL, "Too many blocks");
  }
  // qemu holds the count in an int: a count of 2^31 or more is negative there, and its product
  // with the block size wraps around 2^64 (so it is never "too small").
  const covered = maxTableEntries >= 0x80000000
    ? Number.MAX_SAFE_INTEGER
    : maxTableEntries * blockSize;
  if (covered < diskBytes) throw new BlockError(Errno.EINVAL, "Page table too small");
  if (maxTableEntries > VHD_MAX_TABLE_ENTRIES) {
    throw new BlockError(
      Errno.EINVAL,
      `Max Table Entries too large (${maxTableEntries | 0})`,
    );
  }
  return {
    tableOffset: v.getBigUint64(D_TABLE_OFFSET),
    maxTableEntries,
    blockSize,
    bitmapSize,
  };
}
