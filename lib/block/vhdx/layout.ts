/**
 * VHDX on-disk structures (MS-VHDX 1.0, as qemu 7.2's vhdx driver reads them): the file
 * identifier, the two headers, the region table, the metadata table and its items, BAT entries.
 * Decoders take the bytes as read and never throw on content: validity is the caller's decision,
 * made with qemu's rules in mod.ts. All integers are little-endian.
 *
 * @module
 */

import { crc32cWithHole } from "./crc32c.ts";

export const KiB = 1024;
export const MiB = 1024 * 1024;

/** The header section: file identifier, two headers, two region tables, each 64 KiB apart. */
export const HEADER_BLOCK = 64 * KiB;
export const HEADER1_OFFSET = HEADER_BLOCK;
export const HEADER2_OFFSET = 2 * HEADER_BLOCK;
export const REGION_TABLE_OFFSET = 3 * HEADER_BLOCK;
export const HEADER_SECTION_END = MiB;
/** A header's checksum covers its first 4 KiB; its fields take 80 bytes. */
export const HEADER_SIZE = 4 * KiB;
export const HEADER_FIELDS = 80;
/** The metadata table's reserved 64 KiB (header plus 2047 entries). */
export const METADATA_TABLE_SIZE = 64 * KiB;

export const BLOCK_SIZE_MIN = MiB;
export const BLOCK_SIZE_MAX = 256 * MiB;
/** Sectors per chunk: a sector bitmap block covers 2^23 sectors. */
export const MAX_SECTORS_PER_BLOCK = 1 << 23;

/** BAT entry states (low 3 bits). */
export const PAYLOAD_BLOCK_NOT_PRESENT = 0;
export const PAYLOAD_BLOCK_UNDEFINED = 1;
export const PAYLOAD_BLOCK_ZERO = 2;
export const PAYLOAD_BLOCK_UNMAPPED = 3;
export const PAYLOAD_BLOCK_UNMAPPED_V095 = 5;
export const PAYLOAD_BLOCK_FULLY_PRESENT = 6;
export const PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7;

/** File parameter bits. */
export const PARAMS_LEAVE_BLOCKS_ALLOCATED = 1;
export const PARAMS_HAS_PARENT = 2;

/** Region and metadata entry "required" bits. */
export const REGION_ENTRY_REQUIRED = 1;
export const META_IS_REQUIRED = 4;

const ascii = (s: string) => new TextEncoder().encode(s);
export const FILE_SIGNATURE = ascii("vhdxfile");
export const HEADER_SIGNATURE = 0x64616568; // "head"
export const REGION_SIGNATURE = 0x69676572; // "regi"
export const METADATA_SIGNATURE = ascii("metadata");

/**
 * A GUID as its 16 on-disk bytes, from the text form: the first three groups are stored
 * little-endian, the last two as written.
 */
export function guid(text: string): Uint8Array {
  const h = text.replaceAll("-", "");
  const b = new Uint8Array(16);
  for (let i = 0; i < 16; i++) b[i] = parseInt(h.slice(2 * i, 2 * i + 2), 16);
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

export const BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08");
export const METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
export const FILE_PARAMETERS_GUID = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
export const VIRTUAL_DISK_SIZE_GUID = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
export const PAGE83_GUID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746");
export const LOGICAL_SECTOR_SIZE_GUID = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
export const PHYSICAL_SECTOR_SIZE_GUID = guid("CDA348C7-445D-4471-9CC9-E9885251C556");
export const PARENT_LOCATOR_GUID = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");

export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

export function isZero(a: Uint8Array): boolean {
  for (let i = 0; i < a.length; i++) if (a[i] !== 0) return false;
  return true;
}

/** A random (version 4) GUID, as qemu's vhdx_guid_generate makes them. */
export function randomGuid(): Uint8Array {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  return b;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** A 64-bit field as a number (exact below 2^53; larger values only ever fail checks). */
export function u64(v: DataView, at: number): number {
  return Number(v.getBigUint64(at, true));
}

/** A VHDX header's fields (the first 80 bytes of its 4 KiB). */
export interface VhdxHeader {
  signature: number;
  checksum: number;
  sequence: bigint;
  fileWriteGuid: Uint8Array;
  dataWriteGuid: Uint8Array;
  logGuid: Uint8Array;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

export function decodeHeader(b: Uint8Array): VhdxHeader {
  const v = view(b);
  return {
    signature: v.getUint32(0, true),
    checksum: v.getUint32(4, true),
    sequence: v.getBigUint64(8, true),
    fileWriteGuid: b.slice(16, 32),
    dataWriteGuid: b.slice(32, 48),
    logGuid: b.slice(48, 64),
    logVersion: v.getUint16(64, true),
    version: v.getUint16(66, true),
    logLength: v.getUint32(68, true),
    logOffset: u64(v, 72),
  };
}

/** Writes `h`'s fields over the first 80 bytes of `block` (4 KiB) and sets its checksum. */
export function encodeHeader(h: VhdxHeader, block: Uint8Array): Uint8Array {
  const v = view(block);
  v.setUint32(0, h.signature, true);
  v.setBigUint64(8, h.sequence, true);
  block.set(h.fileWriteGuid, 16);
  block.set(h.dataWriteGuid, 32);
  block.set(h.logGuid, 48);
  v.setUint16(64, h.logVersion, true);
  v.setUint16(66, h.version, true);
  v.setUint32(68, h.logLength, true);
  v.setBigUint64(72, BigInt(h.logOffset), true);
  v.setUint32(4, 0, true);
  h.checksum = crc32cWithHole(block.subarray(0, HEADER_SIZE), 4);
  v.setUint32(4, h.checksum, true);
  return block;
}

/** Whether a 4 KiB header block carries a valid checksum, signature and version 1. */
export function headerIsValid(block: Uint8Array): boolean {
  const v = view(block);
  if (crc32cWithHole(block.subarray(0, HEADER_SIZE), 4) !== v.getUint32(4, true)) return false;
  return v.getUint32(0, true) === HEADER_SIGNATURE && v.getUint16(66, true) === 1;
}

export interface RegionEntry {
  readonly guid: Uint8Array;
  readonly fileOffset: number;
  readonly length: number;
  readonly dataBits: number;
}

export interface RegionTable {
  readonly checksumValid: boolean;
  readonly signature: number;
  readonly entryCount: number;
  /** The first min(entryCount, 2047) entries. */
  readonly entries: readonly RegionEntry[];
}

export function decodeRegionTable(b: Uint8Array): RegionTable {
  const v = view(b);
  const entryCount = v.getUint32(8, true);
  const entries: RegionEntry[] = [];
  const n = Math.min(entryCount, 2047);
  for (let i = 0; i < n; i++) {
    const at = 16 + 32 * i;
    entries.push({
      guid: b.slice(at, at + 16),
      fileOffset: u64(v, at + 16),
      length: v.getUint32(at + 24, true),
      dataBits: v.getUint32(at + 28, true),
    });
  }
  return {
    checksumValid: crc32cWithHole(b.subarray(0, HEADER_BLOCK), 4) === v.getUint32(4, true),
    signature: v.getUint32(0, true),
    entryCount,
    entries,
  };
}

export interface MetadataEntry {
  readonly guid: Uint8Array;
  readonly offset: number;
  readonly length: number;
  readonly dataBits: number;
}

export interface MetadataTable {
  readonly signatureValid: boolean;
  readonly entryCount: number;
  /** Empty when entryCount does not fit the table. */
  readonly entries: readonly MetadataEntry[];
}

export function decodeMetadataTable(b: Uint8Array): MetadataTable {
  const v = view(b);
  const entryCount = v.getUint16(10, true);
  const entries: MetadataEntry[] = [];
  if (entryCount * 32 <= METADATA_TABLE_SIZE - 32) {
    for (let i = 0; i < entryCount; i++) {
      const at = 32 + 32 * i;
      entries.push({
        guid: b.slice(at, at + 16),
        offset: v.getUint32(at + 16, true),
        length: v.getUint32(at + 20, true),
        dataBits: v.getUint32(at + 24, true),
      });
    }
  }
  return {
    signatureValid: bytesEqual(b.subarray(0, 8), METADATA_SIGNATURE),
    entryCount,
    entries,
  };
}

/** The number of BAT entries qemu expects (32-bit arithmetic, as vhdx_calc_bat_entries). */
export function qemuBatEntries(diskSize: number, blockSize: number, chunkRatio: number): number {
  const dataBlocks = Math.ceil(diskSize / blockSize) >>> 0;
  const bits = Math.log2(chunkRatio);
  return (dataBlocks + (((dataBlocks - 1) >>> 0) >>> bits)) >>> 0;
}

/** The BAT entries a disk really needs: payload entries plus one bitmap entry per full chunk. */
export function neededBatEntries(diskSize: number, blockSize: number, chunkRatio: number): number {
  const dataBlocks = Math.ceil(diskSize / blockSize);
  if (dataBlocks === 0) return 0;
  return dataBlocks + Math.floor((dataBlocks - 1) / chunkRatio);
}
