/**
 * qcow2 header (v2 and v3) and header extensions: a pure decoder over the bytes of cluster 0, with
 * qemu 7.2's validation rules and error texts (block/qcow2.c `qcow2_do_open`). No I/O here.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

/** `QFI\xfb`. */
export const QCOW2_MAGIC = 0x514649fb;

/** Incompatible feature bits (v3). */
export const INCOMPAT_DIRTY = 1;
export const INCOMPAT_CORRUPT = 2;
export const INCOMPAT_DATA_FILE = 4;
export const INCOMPAT_COMPRESSION = 8;
export const INCOMPAT_EXTL2 = 16;
const INCOMPAT_KNOWN = 31;

/** Autoclear bit 1: the external data file is a valid raw image. */
export const AUTOCLEAR_DATA_FILE_RAW = 2;

const EXT_END = 0;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_TABLE = 0x6803f857;
const EXT_BITMAPS = 0x23852875;
const EXT_CRYPTO = 0x0537be77;
const EXT_DATA_FILE = 0x44415441;

/**
 * Byte offset of the bitmaps extension's data in cluster 0, or undefined when there is none
 * (to update it in place: its length is fixed).
 */
export function bitmapsExtensionOffset(cluster0: Uint8Array, h: Qcow2Header): number | undefined {
  const v = new DataView(cluster0.buffer, cluster0.byteOffset, cluster0.byteLength);
  const limit = Math.min(cluster0.length, h.clusterSize);
  let pos = h.version === 2 ? 72 : h.headerLength;
  while (pos + 8 <= limit) {
    const type = v.getUint32(pos), len = v.getUint32(pos + 4);
    pos += 8;
    if (type === EXT_END || len > limit - pos) return undefined;
    if (type === EXT_BITMAPS) return len === 24 ? pos : undefined;
    pos += (len + 7) & ~7;
  }
  return undefined;
}

/** qemu's limits (block/qcow2.h). */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
const MAX_BACKING_NAME = 1023;

/** One entry of the feature name table extension. */
export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  readonly type: number;
  readonly bit: number;
  readonly name: string;
}

/** The bitmaps extension (parsed, unused for reading). */
export interface BitmapsExtension {
  readonly nbBitmaps: number;
  /** Must be 0 (checked when bitmaps are loaded). */
  readonly reserved: number;
  readonly directorySize: number;
  readonly directoryOffset: number;
}

/** The full disk encryption header extension as found. */
export interface CryptoHeaderExtension {
  readonly extLength: number;
  readonly offset: number;
  readonly length: number;
}

/** Everything the read path needs from cluster 0. */
export interface Qcow2Header {
  readonly version: 2 | 3;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly size: number;
  readonly cryptMethod: number;
  readonly l1Size: number;
  readonly l1TableOffset: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  readonly nbSnapshots: number;
  readonly snapshotsOffset: number;
  readonly incompatible: bigint;
  readonly compatible: bigint;
  readonly autoclear: bigint;
  readonly refcountOrder: number;
  readonly headerLength: number;
  /** 0 zlib (raw deflate), 1 zstd. */
  readonly compressionType: number;
  readonly extendedL2: boolean;
  readonly backingFile: string | undefined;
  readonly backingFormat: string | undefined;
  readonly dataFile: string | undefined;
  readonly dataFileRaw: boolean;
  readonly featureNames: readonly FeatureName[];
  readonly bitmaps: BitmapsExtension | undefined;
  /**
   * The full disk encryption header extension (LUKS header location), unchecked: `extLength`
   * is the extension's length field (16 when well-formed); openQcow2 checks it in qemu's order.
   */
  readonly cryptoHeader: CryptoHeaderExtension | undefined;
  /** L1 entries needed to map the virtual size (qemu's l1_vm_state_index). */
  readonly l1NeededEntries: number;
}

function bad(errno: number, message: string): BlockError {
  return new BlockError(errno, message);
}

/** True when `bytes` starts with the qcow2 magic. */
export function hasQcow2Magic(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && bytes[0] === 0x51 && bytes[1] === 0x46 && bytes[2] === 0x49 &&
    bytes[3] === 0xfb;
}

/** A u64 as a number; values past 2^53 only occur in broken images and stay inexact but huge. */
function u64(view: DataView, at: number): number {
  return view.getUint32(at) * 0x100000000 + view.getUint32(at + 4);
}

const decoder = new TextDecoder("utf-8", { fatal: false });

/**
 * The "Unsupported qcow2 feature(s)" message qemu builds: names from the feature table for the
 * bits it knows, then "Unknown incompatible feature: <hex>" for the rest.
 */
export function unsupportedFeaturesMessage(mask: bigint, table: readonly FeatureName[]): string {
  const parts: string[] = [];
  let rest = mask;
  for (const f of table) {
    if (f.type !== 0 || f.bit > 63) continue;
    const b = 1n << BigInt(f.bit);
    if (rest & b) {
      parts.push(f.name.slice(0, 46));
      rest &= ~b;
    }
  }
  if (rest) parts.push(`Unknown incompatible feature: ${rest.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${parts.join(", ")}`;
}

/**
 * Decode and validate the header in `cluster0` (at least the first cluster of the file, or the
 * whole file when shorter; missing bytes read as zero like qemu's file layer).
 * Throws BlockError with qemu's wording for anything qemu refuses at open.
 */
export function parseHeader(cluster0: Uint8Array): Qcow2Header {
  if (cluster0.length < 72 || !hasQcow2Magic(cluster0)) {
    throw bad(Errno.EINVAL, "Image is not in qcow2 format");
  }
  const v = new DataView(cluster0.buffer, cluster0.byteOffset, cluster0.byteLength);
  const version = v.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw bad(Errno.ENOTSUP, `Unsupported qcow2 version ${version}`);
  }
  const clusterBits = v.getUint32(20);
  if (clusterBits < 9 || clusterBits > 21) {
    throw bad(Errno.EINVAL, `Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 1 << clusterBits;
  let incompatible = 0n, compatible = 0n, autoclear = 0n;
  let refcountOrder = 4, headerLength = 72;
  if (version === 3) {
    if (cluster0.length < 104) throw bad(Errno.EINVAL, "qcow2 header too short");
    incompatible = v.getBigUint64(72);
    compatible = v.getBigUint64(80);
    autoclear = v.getBigUint64(88);
    refcountOrder = v.getUint32(96);
    headerLength = v.getUint32(100);
    if (headerLength < 104) throw bad(Errno.EINVAL, "qcow2 header too short");
  }
  if (headerLength > clusterSize) {
    throw bad(Errno.EINVAL, "qcow2 header exceeds cluster size");
  }
  if (headerLength > cluster0.length) throw bad(Errno.EINVAL, "qcow2 header too short");
  const backingOffset = u64(v, 8);
  if (backingOffset > clusterSize) throw bad(Errno.EINVAL, "Invalid backing file offset");

  let compressionType = 0;
  if (headerLength > 104) compressionType = v.getUint8(104);

  // Extensions come before the feature check: their names go into its error message.
  const ext = parseExtensions(v, headerLength, backingOffset || clusterSize, clusterSize);

  const unknown = incompatible & ~BigInt(INCOMPAT_KNOWN);
  if (unknown) throw bad(Errno.ENOTSUP, unsupportedFeaturesMessage(unknown, ext.featureNames));

  if (refcountOrder > 6) {
    throw bad(Errno.EINVAL, "Reference count entry width too large; may not exceed 64 bits");
  }
  if (compressionType > 1) {
    throw bad(Errno.ENOTSUP, `qcow2: unknown compression type: ${compressionType}`);
  }
  const compressionBit = (incompatible & BigInt(INCOMPAT_COMPRESSION)) !== 0n;
  if (compressionType === 0 && compressionBit) {
    throw bad(Errno.EINVAL, "qcow2: Compression type incompatible feature bit must not be set");
  }
  if (compressionType !== 0 && !compressionBit) {
    throw bad(Errno.EINVAL, "qcow2: Compression type incompatible feature bit must be set");
  }
  const extendedL2 = (incompatible & BigInt(INCOMPAT_EXTL2)) !== 0n;
  if (extendedL2 && clusterBits < 14) {
    throw bad(
      Errno.EINVAL,
      "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
    );
  }

  const cryptMethod = v.getUint32(32);
  if (cryptMethod > 2) throw bad(Errno.EINVAL, `Unsupported encryption method: ${cryptMethod}`);

  const size = u64(v, 24);
  const l1Size = v.getUint32(36);
  const l1TableOffset = u64(v, 40);
  const refcountTableOffset = u64(v, 48);
  const refcountTableClusters = v.getUint32(56);
  const nbSnapshots = v.getUint32(60);
  const snapshotsOffset = u64(v, 64);

  if (refcountTableClusters === 0) {
    throw bad(Errno.EINVAL, "Image does not contain a reference count table");
  }
  validateTable(
    refcountTableOffset,
    refcountTableClusters,
    clusterSize,
    MAX_REFTABLE_BYTES,
    clusterSize,
    "Reference count table",
  );
  validateTable(snapshotsOffset, nbSnapshots, 40, 40 * 65536, clusterSize, "Snapshot table");

  const l2Entries = clusterSize / (extendedL2 ? 16 : 8);
  if (l1Size > MAX_L1_BYTES / 8) throw bad(Errno.EFBIG, "Active L1 table too large");
  const l1NeededEntries = Math.ceil(size / (l2Entries * clusterSize));
  if (l1NeededEntries > 0x7fffffff) throw bad(Errno.EFBIG, "Image is too big");
  if (l1Size < l1NeededEntries) throw bad(Errno.EINVAL, "L1 table is too small");
  validateTable(l1TableOffset, l1Size, 8, MAX_L1_BYTES, clusterSize, "Active L1 table");

  let backingFile: string | undefined;
  if (backingOffset !== 0) {
    const len = v.getUint32(16);
    if (len > Math.min(MAX_BACKING_NAME, clusterSize - backingOffset)) {
      throw bad(Errno.EINVAL, "Backing file name too long");
    }
    const end = Math.min(backingOffset + len, cluster0.length);
    backingFile = decoder.decode(cluster0.subarray(backingOffset, end));
  }

  const dataFileBit = (incompatible & BigInt(INCOMPAT_DATA_FILE)) !== 0n;
  if (dataFileBit && ext.dataFile === undefined) {
    throw bad(Errno.EINVAL, "'data-file' is required for this image");
  }
  const dataFileRaw = (autoclear & BigInt(AUTOCLEAR_DATA_FILE_RAW)) !== 0n;

  return {
    version,
    clusterBits,
    clusterSize,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatible,
    compatible,
    autoclear,
    refcountOrder,
    headerLength,
    compressionType,
    extendedL2,
    backingFile,
    backingFormat: ext.backingFormat,
    dataFile: dataFileBit ? ext.dataFile : undefined,
    dataFileRaw: dataFileBit && dataFileRaw,
    featureNames: ext.featureNames,
    bitmaps: ext.bitmaps,
    cryptoHeader: ext.cryptoHeader,
    l1NeededEntries,
  };
}

/** qemu's `qcow2_validate_table`: size limit, then offset alignment and overflow. */
export function validateTable(
  offset: number,
  entries: number,
  entryLen: number,
  maxBytes: number,
  clusterSize: number,
  name: string,
): void {
  if (entries > Math.floor(maxBytes / entryLen)) throw bad(Errno.EFBIG, `${name} too large`);
  if (offset + entries * entryLen > 2 ** 63 - 1 || offset % clusterSize !== 0) {
    throw bad(Errno.EINVAL, `${name} offset invalid`);
  }
}

interface Extensions {
  backingFormat: string | undefined;
  dataFile: string | undefined;
  featureNames: FeatureName[];
  bitmaps: BitmapsExtension | undefined;
  cryptoHeader: CryptoHeaderExtension | undefined;
}

/** Walk the extension list from `start` up to `end` (the backing name or the cluster end). */
function parseExtensions(v: DataView, start: number, end: number, clusterSize: number): Extensions {
  const out: Extensions = {
    backingFormat: undefined,
    dataFile: undefined,
    featureNames: [],
    bitmaps: undefined,
    cryptoHeader: undefined,
  };
  const bytes = new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  const limit = Math.min(end, v.byteLength, clusterSize);
  let pos = start;
  // Each extension takes at least 8 bytes, so the loop is bounded by the cluster size.
  while (pos + 8 <= limit) {
    const type = v.getUint32(pos);
    const len = v.getUint32(pos + 4);
    pos += 8;
    if (type === EXT_END) break;
    if (len > limit - pos) throw bad(Errno.EINVAL, "Invalid qcow2 header extension: too large");
    const data = bytes.subarray(pos, pos + len);
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (len >= 16) {
          throw bad(Errno.EINVAL, `ERROR: ext_backing_format: len=${len} too large (>=16)`);
        }
        out.backingFormat = decoder.decode(data);
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const nameBytes = data.subarray(i + 2, i + 48);
          const nul = nameBytes.indexOf(0);
          out.featureNames.push({
            type: data[i]!,
            bit: data[i + 1]!,
            name: decoder.decode(nul < 0 ? nameBytes : nameBytes.subarray(0, nul)),
          });
        }
        break;
      case EXT_BITMAPS: {
        if (len !== 24) throw bad(Errno.EINVAL, "bitmaps_ext: Invalid extension length");
        const d = new DataView(data.buffer, data.byteOffset, data.byteLength);
        out.bitmaps = {
          nbBitmaps: d.getUint32(0),
          reserved: d.getUint32(4),
          directorySize: u64(d, 8),
          directoryOffset: u64(d, 16),
        };
        break;
      }
      case EXT_DATA_FILE:
        out.dataFile = decoder.decode(data);
        break;
      case EXT_CRYPTO: {
        const d = new DataView(data.buffer, data.byteOffset, data.byteLength);
        out.cryptoHeader = {
          extLength: len,
          offset: len >= 8 ? u64(d, 0) : 0,
          length: len >= 16 ? u64(d, 8) : 0,
        };
        break;
      }
      default:
        break; // unknown extensions are ignored when reading
    }
    pos += (len + 7) & ~7;
  }
  return out;
}
