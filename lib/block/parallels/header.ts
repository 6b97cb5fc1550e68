/**
 * The Parallels (ploop) image header: 64 little-endian bytes at the start of the file, followed
 * by the block allocation table (BAT), one 32-bit entry per cluster. The checks and messages are
 * qemu 7.2's parallels_open (docs/interop/parallels.txt describes the layout), in its order.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

/** Bytes of the fixed header; the BAT starts right after it. */
export const PRL_HEADER_SIZE = 64;
/** The magic of images whose BAT holds sector offsets (32-bit sizes). */
export const PRL_MAGIC_OLD = "WithoutFreeSpace";
/** The magic of images whose BAT holds cluster numbers (qemu-img creates these). */
export const PRL_MAGIC_EXT = "WithouFreSpacExt";
export const PRL_VERSION = 2;
/** The `inuse` value of an image open for writing (not closed cleanly when found at open). */
export const PRL_INUSE_MAGIC = 0x746f6e59;

const SECTOR = 512;
const INT32_MAX = 0x7fffffff;

// Field offsets of the packed header.
const OFF_VERSION = 16;
const OFF_TRACKS = 28;
const OFF_BAT_ENTRIES = 32;
const OFF_NB_SECTORS = 36;
const OFF_INUSE = 44;
const OFF_DATA_OFF = 48;
const OFF_EXT_OFF = 56;

export interface ParallelsHeader {
  /** Sectors per cluster. */
  readonly tracks: number;
  /** Sectors one BAT unit stands for: 1 (old magic) or `tracks`. */
  readonly offMultiplier: number;
  readonly batEntries: number;
  /** Guest size in bytes (nb_sectors * 512; 32 bits of sectors with the old magic). */
  readonly size: number;
  readonly inuse: number;
  /** data_off in sectors as stored (0: right after the BAT). */
  readonly dataOff: number;
  /** Format extension cluster, in sectors (0: none). */
  readonly extOff: number;
}

function magicIs(b: Uint8Array, magic: string): boolean {
  for (let i = 0; i < 16; i++) if (b[i] !== magic.charCodeAt(i)) return false;
  return true;
}

/** qemu's parallels_probe: either magic and version 2 (needs the whole header). */
export function probeParallels(head: Uint8Array): number {
  if (head.length < PRL_HEADER_SIZE) return 0;
  if (!magicIs(head, PRL_MAGIC_OLD) && !magicIs(head, PRL_MAGIC_EXT)) return 0;
  const v = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return v.getUint32(OFF_VERSION, true) === PRL_VERSION ? 100 : 0;
}

/** Decodes the header (shorter input reads as zero-padded, as qemu reads a short file). */
export function decodeParallelsHeader(input: Uint8Array): ParallelsHeader {
  const b = new Uint8Array(PRL_HEADER_SIZE);
  b.set(input.subarray(0, PRL_HEADER_SIZE));
  const v = new DataView(b.buffer);
  const notParallels = () => new BlockError(Errno.EINVAL, "Image not in Parallels format");
  if (v.getUint32(OFF_VERSION, true) !== PRL_VERSION) throw notParallels();
  let sectors = v.getBigUint64(OFF_NB_SECTORS, true);
  const tracks = v.getUint32(OFF_TRACKS, true);
  let offMultiplier: number;
  if (magicIs(b, PRL_MAGIC_OLD)) {
    offMultiplier = 1;
    sectors &= 0xffffffffn;
  } else if (magicIs(b, PRL_MAGIC_EXT)) {
    offMultiplier = tracks;
  } else {
    throw notParallels();
  }
  if (tracks === 0) throw new BlockError(Errno.EINVAL, "Invalid image: Zero sectors per track");
  if (tracks > Math.floor(INT32_MAX / 513)) {
    throw new BlockError(Errno.EFBIG, "Invalid image: Too big cluster");
  }
  const batEntries = v.getUint32(OFF_BAT_ENTRIES, true);
  if (batEntries > Math.floor(INT32_MAX / 4)) {
    throw new BlockError(Errno.EFBIG, "Catalog too large");
  }
  // Beyond qemu: byte offsets must stay exact as JS numbers.
  if (sectors * BigInt(SECTOR) > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError(
      Errno.EFBIG,
      `Parallels image size of ${sectors} sectors is larger than denbd supports`,
    );
  }
  return {
    tracks,
    offMultiplier,
    batEntries,
    size: Number(sectors) * SECTOR,
    inuse: v.getUint32(OFF_INUSE, true),
    dataOff: v.getUint32(OFF_DATA_OFF, true),
    extOff: Number(v.getBigUint64(OFF_EXT_OFF, true)),
  };
}

/** Sets the `inuse` field of a header held in memory. */
export function setInuse(header: Uint8Array, value: number): void {
  new DataView(header.buffer, header.byteOffset, header.byteLength).setUint32(
    OFF_INUSE,
    value >>> 0,
    true,
  );
}
