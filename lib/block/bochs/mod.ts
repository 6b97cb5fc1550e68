/**
 * The bochs (growing redolog) format driver, read-only as in qemu 7.2 (block/bochs.c):
 *
 * - a 512-byte little-endian header: the magic "Bochs Virtual HD Image", type "Redolog",
 *   subtype "Growing" (each a NUL-terminated string in its field), version 2.0 or 1.0 (whose
 *   disk size sits 4 bytes earlier), the header size (where the catalog starts), the catalog's
 *   entry count, the bitmap and extent sizes;
 * - the catalog: one u32 per extent, the extent's index in the file or 0xffffffff (not
 *   allocated); an allocated extent is its bitmap (rounded up to sectors) then its data;
 * - a sector reads from the file when its extent is allocated and its bit is set in the
 *   extent's bitmap, else as zeroes.
 *
 * qemu's checks and messages, in its order: the catalog has at most 1 Mi entries, the extent
 * size is a power of two from 512 to 8 MiB, and the catalog covers the disk. Its 32-bit sums
 * (data offset, sectors per extent) wrap as qemu's do.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import type { FormatDriver } from "../formats.ts";
import { BlockError, Errno } from "../types.ts";
import { readBytes, ReadOnlyDevice, readOnlyRefusal, readPadded } from "../dmg/readonly.ts";

export const BOCHS_HEADER_SIZE = 512;
const MAGIC = "Bochs Virtual HD Image";
const REDOLOG = "Redolog";
const GROWING = "Growing";
export const BOCHS_VERSION = 0x00020000;
export const BOCHS_VERSION_1 = 0x00010000;
/** qemu's largest catalog (what bximage needs for ~8 TB). */
export const BOCHS_MAX_CATALOG = 0x100000;
/** qemu's largest extent. */
export const BOCHS_MAX_EXTENT = 0x800000;
/** A catalog entry of an extent never written. */
export const BOCHS_UNALLOCATED = 0xffffffff;

/** The decoded header. */
export interface BochsHeader {
  readonly version: number;
  /** Where the catalog starts (the header's size field). */
  readonly catalogOffset: number;
  readonly catalogEntries: number;
  /** Disk size: the header's, rounded down to sectors. */
  readonly diskSize: number;
  readonly extentSize: number;
  /** Sectors of each extent's bitmap and data, as qemu computes them (32-bit). */
  readonly bitmapSectors: number;
  readonly extentSectors: number;
  /** Where extent 0 starts: catalog offset + catalog bytes, in 32 bits as in qemu. */
  readonly dataOffset: number;
}

/** A NUL-terminated `s` at `at` (a strcmp match). */
function cString(b: Uint8Array, at: number, s: string): boolean {
  for (let i = 0; i < s.length; i++) if (b[at + i] !== s.charCodeAt(i)) return false;
  return b[at + s.length] === 0;
}

function hasBochsMagic(b: Uint8Array): boolean {
  if (b.length < BOCHS_HEADER_SIZE) return false;
  const version = new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(64, true);
  return cString(b, 0, MAGIC) && cString(b, 32, REDOLOG) && cString(b, 48, GROWING) &&
    (version === BOCHS_VERSION || version === BOCHS_VERSION_1);
}

/** qemu's bochs_probe. */
export function probeBochs(head: Uint8Array): number {
  return hasBochsMagic(head) ? 100 : 0;
}

function einval(msg: string): BlockError {
  return new BlockError(Errno.EINVAL, msg);
}

/** Sectors holding `bytes` as qemu counts them: 1 + (bytes - 1) / 512 in 32 bits (0 wraps). */
function sectors32(bytes: number): number {
  return (1 + Math.floor(((bytes - 1) >>> 0) / 512)) >>> 0;
}

/** Decodes and checks a header (shorter input reads as zero-padded, as qemu reads it). */
export function decodeBochsHeader(input: Uint8Array): BochsHeader {
  const b = new Uint8Array(BOCHS_HEADER_SIZE);
  b.set(input.subarray(0, BOCHS_HEADER_SIZE));
  if (!hasBochsMagic(b)) throw einval("Image not in Bochs format");
  const v = new DataView(b.buffer);
  const version = v.getUint32(64, true);
  const disk = v.getBigUint64(version === BOCHS_VERSION_1 ? 84 : 88, true);
  const totalSectors = disk / 512n;
  if (totalSectors * 512n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError(Errno.EFBIG, `bochs disk of ${disk} bytes is larger than denbd supports`);
  }
  const catalogEntries = v.getUint32(72, true);
  if (catalogEntries > BOCHS_MAX_CATALOG) {
    throw new BlockError(Errno.EFBIG, "Catalog size is too large");
  }
  const catalogOffset = v.getUint32(68, true);
  const bitmap = v.getUint32(76, true);
  const extentSize = v.getUint32(80, true);
  if (extentSize < 512) throw einval("Extent size must be at least 512");
  if ((extentSize & (extentSize - 1)) !== 0) {
    throw einval(`Extent size ${extentSize} is not a power of two`);
  }
  if (extentSize > BOCHS_MAX_EXTENT) throw einval(`Extent size ${extentSize} is too large`);
  const perExtent = extentSize / 512;
  if (BigInt(catalogEntries) < (totalSectors + BigInt(perExtent) - 1n) / BigInt(perExtent)) {
    throw einval("Catalog size is too small for this disk size");
  }
  return {
    version,
    catalogOffset,
    catalogEntries,
    diskSize: Number(totalSectors) * 512,
    extentSize,
    bitmapSectors: sectors32(bitmap),
    extentSectors: sectors32(extentSize),
    dataOffset: (catalogOffset + catalogEntries * 4) >>> 0,
  };
}

/** The bochs entry of the format registry (lib/block/formats.ts). */
export const bochsFormat: FormatDriver = {
  name: "bochs",
  probe: (head) => probeBochs(head),
  open: (file, ctx) => openBochs(file, { writable: ctx.writable }),
};

export interface BochsOpenOptions {
  readonly writable: boolean;
}

/** Opens a bochs image over `file`; closes the file if opening fails. */
export async function openBochs(file: FileEngine, options: BochsOpenOptions): Promise<BochsDevice> {
  try {
    if (options.writable) throw readOnlyRefusal();
    const fileLength = file.length();
    const header = decodeBochsHeader(await readBytes(file, 0, BOCHS_HEADER_SIZE, fileLength));
    const raw = await readBytes(file, header.catalogOffset, header.catalogEntries * 4, fileLength);
    const catalog = new Uint32Array(header.catalogEntries);
    const v = new DataView(raw.buffer);
    for (let i = 0; i < catalog.length; i++) catalog[i] = v.getUint32(i * 4, true);
    return new BochsDevice(file, header, catalog, fileLength);
  } catch (e) {
    file.close();
    throw e;
  }
}

export class BochsDevice extends ReadOnlyDevice {
  readonly size: number;
  readonly #h: BochsHeader;
  readonly #catalog: Uint32Array;
  readonly #fileLength: number;
  /** Bytes from one extent's start in the file to the next one's (u32 sector sum, as qemu). */
  readonly #stride: number;

  constructor(file: FileEngine, header: BochsHeader, catalog: Uint32Array, fileLength: number) {
    super(file);
    this.#h = header;
    this.#catalog = catalog;
    this.#fileLength = fileLength;
    this.size = header.diskSize;
    this.#stride = 512 * ((header.extentSectors + header.bitmapSectors) >>> 0);
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const es = this.#h.extentSize;
    const parts: Promise<void>[] = [];
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const extent = Math.floor(pos / es);
      const inExtent = pos - extent * es;
      const n = Math.min(buf.length - done, es - inExtent);
      const part = buf.subarray(done, done + n);
      const entry = this.#catalog[extent]!;
      if (entry === BOCHS_UNALLOCATED) {
        part.fill(0);
      } else {
        parts.push(this.#readExtent(part, entry, inExtent));
      }
      done += n;
    }
    const results = await Promise.allSettled(parts);
    for (const r of results) if (r.status === "rejected") throw r.reason;
  }

  /** `part` from byte `inExtent` of the allocated extent stored at index `entry`. */
  async #readExtent(part: Uint8Array, entry: number, inExtent: number): Promise<void> {
    const h = this.#h;
    // Past 2^53 this loses precision, but such an offset is far past the end of any file.
    const bitmapAt = h.dataOffset + entry * this.#stride;
    const dataAt = bitmapAt + 512 * h.bitmapSectors;
    const first = Math.floor(inExtent / 512);
    const last = Math.floor((inExtent + part.length - 1) / 512);
    const bits = new Uint8Array((last >> 3) - (first >> 3) + 1);
    await readPadded(this.file, bits, bitmapAt + (first >> 3), this.#fileLength);
    const isSet = (s: number) => ((bits[(s >> 3) - (first >> 3)]! >> (s & 7)) & 1) === 1;
    const reads: Promise<void>[] = [];
    // Runs of sectors with the same bit: one read or one fill each.
    for (let s = first; s <= last;) {
      const set = isSet(s);
      let e = s + 1;
      while (e <= last && isSet(e) === set) e++;
      const from = Math.max(s * 512, inExtent) - inExtent;
      const to = Math.min(e * 512, inExtent + part.length) - inExtent;
      const run = part.subarray(from, to);
      if (set) {
        reads.push(readPadded(this.file, run, dataAt + inExtent + from, this.#fileLength));
      } else {
        run.fill(0);
      }
      s = e;
    }
    await Promise.all(reads);
  }
}
