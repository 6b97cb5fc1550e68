/**
 * The VirtualBox VDI header (version 1.1): the 512-byte sector at the start of the image,
 * little-endian, decoded with a DataView. The checks and their messages are qemu 7.2's vdi_open
 * (what `qemu-nbd` prints after `Failed to blk_new_open 'FILE': `), in its order; a few more
 * guard denbd against damaged images qemu would open and then misread.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

/** Size of the header sector (qemu reads exactly this much, and probes need it). */
export const VDI_HEADER_SIZE = 512;
const SECTOR = 512;
/** The signature at byte 0x40 that probing looks for. */
export const VDI_SIGNATURE = 0xbeda107f;
/** Version 1.1, the only one qemu opens. */
export const VDI_VERSION_1_1 = 0x00010001;
export const VDI_TYPE_DYNAMIC = 1;
export const VDI_TYPE_STATIC = 2;
/** The only block size qemu accepts (1 MiB). */
export const VDI_BLOCK_SIZE = 1024 * 1024;
/** A block map entry of a block never written: reads as zeroes. */
export const VDI_UNALLOCATED = 0xffffffff;
/** A block map entry of a discarded block: reads as zeroes too. */
export const VDI_DISCARDED = 0xfffffffe;
/** qemu 7.2's largest block count (its block map must fit in an int) and disk size. */
export const VDI_BLOCKS_IN_IMAGE_MAX = (0x80000000 - SECTOR) / 4;
export const VDI_DISK_SIZE_MAX = VDI_BLOCKS_IN_IMAGE_MAX * VDI_BLOCK_SIZE;

// Field offsets (the packed VdiHeader layout).
const OFF_SIGNATURE = 0x40;
const OFF_VERSION = 0x44;
const OFF_IMAGE_TYPE = 0x4c;
const OFF_OFFSET_BMAP = 0x154;
const OFF_OFFSET_DATA = 0x158;
const OFF_SECTOR_SIZE = 0x168;
const OFF_DISK_SIZE = 0x170;
const OFF_BLOCK_SIZE = 0x178;
const OFF_BLOCKS_IN_IMAGE = 0x180;
const OFF_BLOCKS_ALLOCATED = 0x184;
const OFF_UUID_LINK = 0x1a8;
const OFF_UUID_PARENT = 0x1b8;

/** The fields denbd uses; `bytes` keeps the sector as read, for rewriting it. */
export interface VdiHeader {
  readonly imageType: number;
  readonly offsetBmap: number;
  readonly offsetData: number;
  /** Disk size in bytes, rounded up to 512 as qemu rounds odd sizes. */
  readonly diskSize: number;
  readonly blockSize: number;
  readonly blocksInImage: number;
  blocksAllocated: number;
  readonly bytes: Uint8Array;
}

/** Whether the first sector of a file carries the VDI signature (qemu's vdi_probe). */
export function hasVdiSignature(sector: Uint8Array): boolean {
  if (sector.length < VDI_HEADER_SIZE) return false;
  const v = new DataView(sector.buffer, sector.byteOffset, sector.byteLength);
  return v.getUint32(OFF_SIGNATURE, true) === VDI_SIGNATURE;
}

function hex(n: number | bigint): string {
  return `0x${n.toString(16)}`;
}

function isNullUuid(b: Uint8Array, at: number): boolean {
  for (let i = at; i < at + 16; i++) if (b[i] !== 0) return false;
  return true;
}

function unsupported(what: string): BlockError {
  return new BlockError(Errno.ENOTSUP, `unsupported VDI image (${what})`);
}

/**
 * Decodes and checks a header sector (shorter input is read as zero-padded, as qemu reads past
 * the end of a short file). Throws BlockError with qemu's message for what qemu refuses.
 */
export function decodeVdiHeader(input: Uint8Array): VdiHeader {
  const bytes = new Uint8Array(VDI_HEADER_SIZE);
  bytes.set(input.subarray(0, VDI_HEADER_SIZE));
  const v = new DataView(bytes.buffer);
  const rawSize = v.getBigUint64(OFF_DISK_SIZE, true);
  if (rawSize > BigInt(VDI_DISK_SIZE_MAX)) {
    throw new BlockError(
      Errno.ENOTSUP,
      `Unsupported VDI image size (size is ${hex(rawSize)}, max supported is ${
        hex(VDI_DISK_SIZE_MAX)
      })`,
    );
  }
  // 'VBoxManage convertfromraw' makes odd sizes; qemu rounds them up to whole sectors.
  const diskSize = Math.ceil(Number(rawSize) / SECTOR) * SECTOR;
  const signature = v.getUint32(OFF_SIGNATURE, true);
  const version = v.getUint32(OFF_VERSION, true);
  const offsetBmap = v.getUint32(OFF_OFFSET_BMAP, true);
  const offsetData = v.getUint32(OFF_OFFSET_DATA, true);
  const sectorSize = v.getUint32(OFF_SECTOR_SIZE, true);
  const blockSize = v.getUint32(OFF_BLOCK_SIZE, true);
  const blocksInImage = v.getUint32(OFF_BLOCKS_IN_IMAGE, true);
  if (signature !== VDI_SIGNATURE) {
    throw new BlockError(
      Errno.EINVAL,
      `Image not in VDI format (bad signature ${signature.toString(16).padStart(8, "0")})`,
    );
  }
  if (version !== VDI_VERSION_1_1) {
    throw unsupported(`version ${version >>> 16}.${version & 0xffff}`);
  }
  if (offsetBmap % SECTOR !== 0) throw unsupported(`unaligned block map offset ${hex(offsetBmap)}`);
  if (offsetData % SECTOR !== 0) throw unsupported(`unaligned data offset ${hex(offsetData)}`);
  if (sectorSize !== SECTOR) throw unsupported(`sector size ${sectorSize} is not ${SECTOR}`);
  if (blockSize !== VDI_BLOCK_SIZE) {
    throw unsupported(`block size ${blockSize} is not ${VDI_BLOCK_SIZE}`);
  }
  if (diskSize > blocksInImage * blockSize) {
    throw unsupported(
      `disk size ${diskSize}, image bitmap has room for ${blocksInImage * blockSize}`,
    );
  }
  if (!isNullUuid(bytes, OFF_UUID_LINK)) throw unsupported("non-NULL link UUID");
  if (!isNullUuid(bytes, OFF_UUID_PARENT)) throw unsupported("non-NULL parent UUID");
  if (blocksInImage > VDI_BLOCKS_IN_IMAGE_MAX) {
    throw unsupported(`too many blocks ${blocksInImage}, max is ${VDI_BLOCKS_IN_IMAGE_MAX}`);
  }
  // Beyond qemu: a block map inside the header sector or overlapping the data area would be
  // overwritten by the first allocation.
  if (offsetBmap < VDI_HEADER_SIZE) {
    throw new BlockError(
      Errno.EINVAL,
      `Corrupt VDI image: block map offset ${hex(offsetBmap)} overlaps the header`,
    );
  }
  if (offsetData < offsetBmap + blocksInImage * 4) {
    throw new BlockError(
      Errno.EINVAL,
      `Corrupt VDI image: data offset ${hex(offsetData)} overlaps the block map (${
        hex(offsetBmap)
      }, ${blocksInImage} entries)`,
    );
  }
  return {
    imageType: v.getUint32(OFF_IMAGE_TYPE, true),
    offsetBmap,
    offsetData,
    diskSize,
    blockSize,
    blocksInImage,
    blocksAllocated: v.getUint32(OFF_BLOCKS_ALLOCATED, true),
    bytes,
  };
}

/**
 * The header sector to write back after allocating: the sector as read with blocks_allocated
 * updated and the disk size as qemu holds it (rounded up to 512), which is what qemu writes.
 */
export function encodeVdiHeader(h: VdiHeader): Uint8Array {
  const out = new Uint8Array(h.bytes);
  const v = new DataView(out.buffer);
  v.setBigUint64(OFF_DISK_SIZE, BigInt(h.diskSize), true);
  v.setUint32(OFF_BLOCKS_ALLOCATED, h.blocksAllocated >>> 0, true);
  return out;
}
