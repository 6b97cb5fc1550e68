/**
 * The VHDX format driver, read and write, fixed and dynamic images, as qemu 7.2's vhdx driver
 * serves them:
 *
 * - open follows vhdx_open: the "vhdxfile" identifier, the current header of two (CRC-32C,
 *   sequence numbers), the log (replayed when opened read-write; a read-only open of an image
 *   with a log to replay fails with qemu's message), the region table (BAT, metadata, no
 *   overlaps, no unknown required regions), the five required metadata items (a parent
 *   locator makes qemu refuse the image: differencing images are not supported by qemu 7.2),
 *   the BAT, and qemu's check that fully present blocks lie inside the file;
 * - qemu's vhdx has no block status: every byte reports as data (allocation depth 1), and its
 *   sector interface makes the minimum block size 512;
 * - a block whose BAT state is not present, undefined, zero or unmapped reads as zeroes; a
 *   fully present block reads from its file offset; a partially present one (differencing) or an
 *   unknown state fails with EIO;
 * - the first write of the session rewrites both headers with a new data write GUID, as qemu;
 *   a write into an unallocated block puts a new block at the end of the file rounded up to
 *   1 MiB (qemu's place), writes the data, syncs, then writes the BAT entry: the data and the
 *   file size are durable before the entry that points at them (qemu journals the entry through
 *   the log; a single 8-byte entry in an otherwise unchanged sector cannot tear);
 * - no write-zeroes or discard of its own in qemu: zeroing writes zero bytes into allocated
 *   blocks (unallocated ones already read as zeroes and stay so), fast zero fails with
 *   ENOTSUP, trim does nothing.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import { PROGRAM } from "../../cli/errors.ts";
import type { FormatDriver } from "../formats.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  type ExtentList,
  type FileRange,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";
import { HeaderPair } from "./headers.ts";
import {
  BAT_GUID,
  BLOCK_SIZE_MAX,
  BLOCK_SIZE_MIN,
  bytesEqual,
  decodeMetadataTable,
  decodeRegionTable,
  FILE_PARAMETERS_GUID,
  FILE_SIGNATURE,
  HEADER1_OFFSET,
  HEADER2_OFFSET,
  HEADER_BLOCK,
  HEADER_SIZE,
  isZero,
  LOGICAL_SECTOR_SIZE_GUID,
  MAX_SECTORS_PER_BLOCK,
  META_IS_REQUIRED,
  METADATA_GUID,
  METADATA_TABLE_SIZE,
  MiB,
  neededBatEntries,
  PAGE83_GUID,
  PARAMS_HAS_PARENT,
  PARENT_LOCATOR_GUID,
  PAYLOAD_BLOCK_FULLY_PRESENT,
  PAYLOAD_BLOCK_NOT_PRESENT,
  PAYLOAD_BLOCK_UNDEFINED,
  PAYLOAD_BLOCK_UNMAPPED,
  PAYLOAD_BLOCK_UNMAPPED_V095,
  PAYLOAD_BLOCK_ZERO,
  PHYSICAL_SECTOR_SIZE_GUID,
  qemuBatEntries,
  REGION_ENTRY_REQUIRED,
  REGION_SIGNATURE,
  REGION_TABLE_OFFSET,
  VIRTUAL_DISK_SIZE_GUID,
} from "./layout.ts";
import { VhdxLog } from "./log.ts";
import { Mutex } from "../qcow2/sync.ts";

/** The vhdx entry of the format registry (lib/block/formats.ts). */
export const vhdxFormat: FormatDriver = {
  name: "vhdx",
  probe: (head) => hasVhdxSignature(head) ? 100 : 0,
  open: (file, ctx) =>
    openVhdx(file, {
      writable: ctx.writable,
      warn: ctx.warn,
      zeroCopy: ctx.direct !== true && file.fd >= 0,
    }),
};

/** Whether a file starts with the VHDX file identifier (qemu's vhdx_probe). */
export function hasVhdxSignature(head: Uint8Array): boolean {
  return head.length >= 8 && bytesEqual(head.subarray(0, 8), FILE_SIGNATURE);
}

/** Largest BAT held in memory (32 Mi entries: 32 TiB of 1 MiB blocks, more of larger ones). */
const MAX_BAT_BYTES = 256 * MiB;
/** BAT bytes checked per read at open. */
const BAT_CHUNK = 4 * MiB;
/** Zero bytes written per step when zeroing. */
const ZERO_CHUNK = MiB;
const INT64_MAX = 2 ** 63;
/** qemu's answer to a write into the header section (not in lib/errors.ts's list). */
const EFAULT = 14;

export interface VhdxOpenOptions {
  readonly writable: boolean;
  /** error_report lines (qemu prints some diagnostics before failing the open). */
  readonly warn?: (msg: string) => void;
  /** Offer zero-copy reads and writes of fully present blocks (not under O_DIRECT). */
  readonly zeroCopy?: boolean;
}

const STRERROR: Record<number, string> = {
  [Errno.EINVAL]: "Invalid argument",
  [Errno.ENOTSUP]: "Operation not supported",
  [Errno.ENOMEM]: "Cannot allocate memory",
  [Errno.EIO]: "Input/output error",
};

/** bdrv_open_driver's message for a driver that failed without one of its own. */
function couldNotOpen(path: string, errno: number): BlockError {
  return new BlockError(errno, `Could not open '${path}': ${STRERROR[errno] ?? `errno ${errno}`}`);
}

/** The geometry and tables an open image keeps. */
interface VhdxLayout {
  readonly headers: HeaderPair;
  readonly size: number;
  readonly blockSize: number;
  readonly chunkRatio: number;
  readonly hasParent: boolean;
  readonly batOffset: number;
  readonly bat: Uint8Array;
  /** A log was replayed at open (the headers got their new data write GUID then). */
  readonly replayed: boolean;
}

/** A registered region [start, end) for qemu's overlap checks, newest first. */
interface Region {
  readonly start: number;
  readonly end: number;
}

function overlap(regions: readonly Region[], start: number, length: number): Region | undefined {
  const end = start + length;
  return regions.find((r) => !(start >= r.end || end <= r.start));
}

/** qemu's "%" PRIu64 "-%." PRIu64: the second number with zero precision (0 prints nothing). */
function overlapMessage(start: number, length: number, r: Region): string {
  return `${PROGRAM}: VHDX region ${start}-${start + length} overlaps with region ${r.start}-${
    r.end === 0 ? "" : r.end
  }`;
}

async function readAt(file: FileEngine, length: number, at: number): Promise<Uint8Array> {
  const b = new Uint8Array(length);
  const n = await file.pread(b, at);
  b.fill(0, n);
  return b;
}

/** Opens a VHDX image over `file`; closes the file if opening fails. */
export async function openVhdx(file: FileEngine, options: VhdxOpenOptions): Promise<VhdxDevice> {
  try {
    const layout = await readLayout(file, options);
    return new VhdxDevice(file, layout, options);
  } catch (e) {
    file.close();
    throw e;
  }
}

async function readLayout(file: FileEngine, options: VhdxOpenOptions): Promise<VhdxLayout> {
  const path = file.path;
  const warn = options.warn ?? ((m: string) => console.error(m));
  const invalid = () => couldNotOpen(path, Errno.EINVAL);
  if (!hasVhdxSignature(await readAt(file, 8, 0))) throw invalid();

  const headers = HeaderPair.choose(
    await readAt(file, HEADER_SIZE, HEADER1_OFFSET),
    await readAt(file, HEADER_SIZE, HEADER2_OFFSET),
  );
  if (headers === undefined) throw new BlockError(Errno.EINVAL, "No valid VHDX header found");
  const hdr = headers.active;
  const regions: Region[] = [{ start: hdr.logOffset, end: hdr.logOffset + hdr.logLength }];
  let replayed = false;

  // vhdx_parse_log
  if (hdr.logOffset < MiB || hdr.logOffset % MiB !== 0) throw invalid();
  if (hdr.logVersion !== 0) throw invalid();
  if (!isZero(hdr.logGuid) && hdr.logLength !== 0) {
    if (hdr.logLength % MiB !== 0) throw invalid();
    const log = new VhdxLog(file, hdr.logOffset, hdr.logLength, hdr.logGuid);
    const seq = await log.search();
    if (seq !== undefined) {
      if (!options.writable) {
        throw new BlockError(
          Errno.EPERM,
          `VHDX image file '${path}' opened read-only, but contains a log that needs to be replayed\n` +
            `To replay the log, run:\nqemu-img check -r all '${path}'`,
        );
      }
      // The replay is the session's first visible write (vhdx_log_flush).
      await headers.updateBoth(file, true);
      await log.replay(seq, headers);
      replayed = true;
    }
  }

  // vhdx_open_region_tables
  const rt = decodeRegionTable(await readAt(file, HEADER_BLOCK, REGION_TABLE_OFFSET));
  if (!rt.checksumValid || rt.signature !== REGION_SIGNATURE || rt.entryCount > 2047) {
    throw invalid();
  }
  let batRegion: { fileOffset: number; length: number } | undefined;
  let metaRegion: { fileOffset: number; length: number } | undefined;
  for (const e of rt.entries) {
    const hit = overlap(regions, e.fileOffset, e.length);
    if (hit !== undefined) {
      warn(overlapMessage(e.fileOffset, e.length, hit));
      throw invalid();
    }
    regions.unshift({ start: e.fileOffset, end: e.fileOffset + e.length });
    if (bytesEqual(e.guid, BAT_GUID)) {
      if (batRegion !== undefined) throw invalid();
      batRegion = e;
    } else if (bytesEqual(e.guid, METADATA_GUID)) {
      if (metaRegion !== undefined) throw invalid();
      metaRegion = e;
    } else if (e.dataBits & REGION_ENTRY_REQUIRED) {
      throw couldNotOpen(path, Errno.ENOTSUP);
    }
  }
  if (batRegion === undefined || metaRegion === undefined) throw invalid();

  // vhdx_parse_metadata
  const mt = decodeMetadataTable(await readAt(file, METADATA_TABLE_SIZE, metaRegion.fileOffset));
  if (!mt.signatureValid) throw invalid();
  if (mt.entryCount * 32 > METADATA_TABLE_SIZE - 32) throw invalid();
  const items = [
    FILE_PARAMETERS_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    PAGE83_GUID,
    LOGICAL_SECTOR_SIZE_GUID,
    PHYSICAL_SECTOR_SIZE_GUID,
    PARENT_LOCATOR_GUID,
  ];
  const found: (number | undefined)[] = items.map(() => undefined);
  for (const e of mt.entries) {
    const i = items.findIndex((g) => bytesEqual(g, e.guid));
    if (i >= 0) {
      if (found[i] !== undefined) throw invalid();
      found[i] = e.offset;
    } else if (e.dataBits & META_IS_REQUIRED) {
      throw couldNotOpen(path, Errno.ENOTSUP);
    }
  }
  // All five required items and no parent locator (qemu 7.2 has no differencing support).
  if (found.slice(0, 5).some((o) => o === undefined) || found[5] !== undefined) {
    throw couldNotOpen(path, Errno.ENOTSUP);
  }
  const item = async (i: number, len: number) =>
    new DataView((await readAt(file, len, metaRegion!.fileOffset + found[i]!)).buffer);
  const params = await item(0, 8);
  const blockSize = params.getUint32(0, true);
  const dataBits = params.getUint32(4, true);
  const rawDiskSize = (await item(1, 8)).getBigUint64(0, true);
  const logicalSector = (await item(3, 4)).getUint32(0, true);
  await item(4, 4); // the physical sector size: read, not used (as qemu)
  if (blockSize < BLOCK_SIZE_MIN || blockSize > BLOCK_SIZE_MAX) throw invalid();
  if (logicalSector !== 512) throw couldNotOpen(path, Errno.ENOTSUP);
  if ((blockSize & (blockSize - 1)) !== 0) throw invalid();
  const chunkRatio = (MAX_SECTORS_PER_BLOCK * logicalSector) / blockSize;

  // The disk is whole logical sectors (total_sectors = size >> 9).
  const sizeBig = rawDiskSize & ~511n;
  const qemuEntries = qemuBatEntries(Number(sizeBig), blockSize, chunkRatio);
  if (qemuEntries > Math.floor(batRegion.length / 8)) throw invalid();
  if (sizeBig > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid();
  const size = Number(sizeBig);
  // Beyond qemu: its 32-bit count can wrap for huge sizes; the disk must fit the BAT it has.
  const needed = neededBatEntries(size, blockSize, chunkRatio);
  if (needed > Math.floor(batRegion.length / 8)) throw invalid();
  if (needed * 8 > MAX_BAT_BYTES) {
    throw new BlockError(
      Errno.ENOMEM,
      `VHDX BAT of ${needed} entries is larger than denbd supports (${MAX_BAT_BYTES / 8})`,
    );
  }

  // Read the BAT, checking fully present entries as vhdx_check_bat_entries does.
  const bat = new Uint8Array(needed * 8);
  const fileLength = file.length();
  let payblocks = chunkRatio;
  const chunk = new Uint8Array(Math.min(BAT_CHUNK, Math.max(8, qemuEntries * 8)));
  for (let first = 0; first < qemuEntries;) {
    const count = Math.min(qemuEntries - first, chunk.length / 8);
    const part = chunk.subarray(0, count * 8);
    const n = await file.pread(part, batRegion.fileOffset + first * 8);
    part.fill(0, n);
    if (first < needed) bat.set(part.subarray(0, Math.min(count, needed - first) * 8), first * 8);
    const v = new DataView(part.buffer, 0, part.length);
    for (let k = 0; k < count; k++) {
      const lo = v.getUint32(8 * k, true);
      if ((lo & 7) !== PAYLOAD_BLOCK_FULLY_PRESENT) continue;
      const i = first + k;
      const offset = v.getUint32(8 * k + 4, true) * 2 ** 32 + ((lo & 0xfff00000) >>> 0);
      const left = size - i * blockSize;
      const blockLength = left < 0 ? blockSize : Math.min(blockSize, left);
      if (offset > INT64_MAX - blockSize) {
        warn(`${PROGRAM}: VHDX BAT entry ${i} offset overflow.`);
        throw invalid();
      }
      if (offset >= fileLength) {
        warn(
          `${PROGRAM}: VHDX BAT entry ${i} start offset ${offset} points after end of file (${fileLength}). Image has probably been truncated.`,
        );
        throw invalid();
      }
      if (offset + blockLength > fileLength) {
        warn(
          `${PROGRAM}: VHDX BAT entry ${i} end offset ${
            offset + blockLength - 1
          } points after end of file (${fileLength}). Image has probably been truncated.`,
        );
        throw invalid();
      }
      // qemu counts only fully present entries here: every (chunk ratio + 1)th one is taken
      // for a bitmap entry and not checked against the regions.
      if (payblocks-- > 0) {
        const hit = overlap(regions, offset, blockSize);
        if (hit !== undefined) {
          warn(overlapMessage(offset, blockSize, hit));
          throw invalid();
        }
      } else {
        payblocks = chunkRatio;
      }
    }
    first += count;
  }

  return {
    headers,
    size,
    blockSize,
    chunkRatio,
    hasParent: (dataBits & PARAMS_HAS_PARENT) !== 0,
    batOffset: batRegion.fileOffset,
    bat,
    replayed,
  };
}

/** Whether a BAT state reads as zeroes (and is allocated on write). */
function readsZero(state: number): boolean {
  return state === PAYLOAD_BLOCK_NOT_PRESENT || state === PAYLOAD_BLOCK_UNDEFINED ||
    state === PAYLOAD_BLOCK_ZERO || state === PAYLOAD_BLOCK_UNMAPPED ||
    state === PAYLOAD_BLOCK_UNMAPPED_V095;
}

export class VhdxDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #file: FileEngine;
  readonly #headers: HeaderPair;
  readonly #bat: Uint8Array;
  readonly #batView: DataView;
  readonly #batOffset: number;
  readonly #blockSize: number;
  readonly #chunkRatio: number;
  readonly #hasParent: boolean;
  readonly #lock = new Mutex();
  /** The first visible write's header update, once started. */
  #visible: Promise<void> | undefined;
  /** The header update is on disk: plain writes may bypass the driver (writeRange). */
  #visibleDone = false;

  readonly #zeroCopy: boolean;

  constructor(file: FileEngine, layout: VhdxLayout, options: VhdxOpenOptions) {
    this.#zeroCopy = options.zeroCopy === true;
    this.#file = file;
    this.#headers = layout.headers;
    this.#bat = layout.bat;
    this.#batView = new DataView(layout.bat.buffer);
    this.#batOffset = layout.batOffset;
    this.#blockSize = layout.blockSize;
    this.#chunkRatio = layout.chunkRatio;
    this.#hasParent = layout.hasParent;
    // A log replay at open was the session's first visible write.
    if (layout.replayed) {
      this.#visible = Promise.resolve();
      this.#visibleDone = true;
    }
    this.size = layout.size;
    const w = options.writable;
    this.caps = {
      writable: w,
      flush: true,
      trim: w,
      zero: w,
      fastZero: w,
      extents: true,
      // qemu's vhdx has a sector interface: its request alignment is 512.
      minBlock: 512,
    };
  }

  /** The BAT index of payload block `block` (a bitmap entry follows every chunk). */
  #index(block: number): number {
    return block + Math.floor(block / this.#chunkRatio);
  }

  #state(idx: number): number {
    return this.#batView.getUint32(idx * 8, true) & 7;
  }

  /** The entry's file offset (1 MiB units in bits 20..63). */
  #offset(idx: number): number {
    const v = this.#batView;
    return v.getUint32(idx * 8 + 4, true) * 2 ** 32 +
      ((v.getUint32(idx * 8, true) & 0xfff00000) >>> 0);
  }

  #setEntry(idx: number, offset: number, state: number): Uint8Array {
    const v = this.#batView;
    v.setUint32(idx * 8, ((offset % 2 ** 32) | state) >>> 0, true);
    v.setUint32(idx * 8 + 4, Math.floor(offset / 2 ** 32), true);
    return this.#bat.subarray(idx * 8, idx * 8 + 8);
  }

  #noParent(): void {
    // qemu opens an image flagged as differencing without a parent locator, then fails its I/O.
    if (this.#hasParent) {
      throw new BlockError(Errno.ENOTSUP, "VHDX differencing images are not supported");
    }
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    this.#noParent();
    const bs = this.#blockSize;
    const reads: Promise<void>[] = [];
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(buf.length - done, bs - inBlock);
      const part = buf.subarray(done, done + n);
      const idx = this.#index(block);
      const state = this.#state(idx);
      if (readsZero(state)) {
        part.fill(0);
      } else if (state === PAYLOAD_BLOCK_FULLY_PRESENT) {
        const base = this.#offset(idx);
        // qemu adds the offset in the block only to a nonzero block offset.
        const at = base === 0 ? 0 : base + inBlock;
        reads.push(
          this.#file.pread(part, at).then((got) => {
            // Past the end of the file reads as zeroes, as qemu's file driver reads it.
            if (got < part.length) part.fill(0, got);
          }),
        );
      } else {
        // Partially present (differencing) or an undefined state value.
        await Promise.all(reads);
        throw new BlockError(Errno.EIO, `VHDX BAT entry ${idx} has state ${state}`);
      }
      done += n;
    }
    await Promise.all(reads);
  }

  /**
   * A range inside one fully present block lies as-is in the file (its holes read as zeroes,
   * as qemu reads them): sendfile may serve it. Everything reports as data in qemu's vhdx.
   */
  fileRange(offset: number, length: number): FileRange | undefined {
    const at = this.#fileAt(offset, length);
    return at === undefined ? undefined : { fd: this.#file.fd, offset: at, data: true };
  }

  /** Plain writes into a fully present block, once the session's header update is done. */
  writeRange(offset: number, length: number): FileRange | undefined {
    if (!this.caps.writable || this.#visibleDone !== true) return undefined;
    const at = this.#fileAt(offset, length);
    if (at === undefined || at < MiB) return undefined;
    return { fd: this.#file.fd, offset: at, data: false };
  }

  #fileAt(offset: number, length: number): number | undefined {
    if (!this.#zeroCopy || this.#hasParent) return undefined;
    const bs = this.#blockSize;
    const block = Math.floor(offset / bs);
    const inBlock = offset - block * bs;
    if (inBlock + length > bs) return undefined;
    const idx = this.#index(block);
    if (this.#state(idx) !== PAYLOAD_BLOCK_FULLY_PRESENT) return undefined;
    const base = this.#offset(idx);
    return base === 0 ? undefined : base + inBlock;
  }

  /** The first guest-visible write of the session: new data write GUID in both headers. */
  #visibleWrite(): Promise<void> {
    if (this.#visible === undefined) {
      this.#visible = this.#lock.run(async () => {
        await this.#headers.updateBoth(this.#file, true);
        this.#visibleDone = true;
      });
      // A failed update is retried by the next write.
      this.#visible.catch(() => this.#visible = undefined);
    }
    return this.#visible;
  }

  async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "VHDX image is read-only");
    this.#noParent();
    await this.#visibleWrite();
    const bs = this.#blockSize;
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(buf.length - done, bs - inBlock);
      await this.#writeInBlock(this.#index(block), inBlock, buf.subarray(done, done + n));
      done += n;
    }
    if (flags.fua) await this.#file.sync();
  }

  async #writeInBlock(idx: number, inBlock: number, part: Uint8Array): Promise<void> {
    const state = this.#state(idx);
    if (state === PAYLOAD_BLOCK_FULLY_PRESENT) {
      await this.#file.pwrite(part, this.#placed(idx, inBlock));
    } else if (readsZero(state)) {
      await this.#allocate(idx, inBlock, part);
    } else {
      throw new BlockError(Errno.EIO, `VHDX BAT entry ${idx} has state ${state}`);
    }
  }

  /** Where byte `inBlock` of a fully present block lies; qemu refuses the header section. */
  #placed(idx: number, inBlock: number): number {
    const base = this.#offset(idx);
    const at = base === 0 ? 0 : base + inBlock;
    if (at < MiB) {
      throw new BlockError(EFAULT, `VHDX BAT entry ${idx} points into the header section`);
    }
    return at;
  }

  /** A new block at the end of the file, its data, a sync, then its BAT entry. */
  #allocate(idx: number, inBlock: number, part: Uint8Array): Promise<void> {
    return this.#lock.run(async () => {
      const state = this.#state(idx);
      if (state === PAYLOAD_BLOCK_FULLY_PRESENT) {
        // Allocated by a write that held the lock before us.
        await this.#file.pwrite(part, this.#placed(idx, inBlock));
        return;
      }
      if (!readsZero(state)) {
        throw new BlockError(Errno.EIO, `VHDX BAT entry ${idx} has state ${state}`);
      }
      const f = this.#file;
      const bs = this.#blockSize;
      const at = Math.ceil(f.length() / MiB) * MiB;
      let grown = true;
      try {
        // The new block reads as zeroes around the data (qemu grows the file the same way).
        f.truncate(at + bs);
      } catch {
        grown = false;
      }
      if (grown) {
        await f.pwrite(part, at + inBlock);
      } else {
        const whole = new Uint8Array(bs);
        whole.set(part, inBlock);
        await f.pwrite(whole, at);
      }
      await f.sync();
      const entry = this.#setEntry(idx, at, PAYLOAD_BLOCK_FULLY_PRESENT);
      try {
        await f.pwrite(entry, this.#batOffset + idx * 8);
      } catch (e) {
        this.#setEntry(idx, 0, state);
        throw e;
      }
    });
  }

  flush(): Promise<void> {
    return this.#file.sync();
  }

  /** qemu's vhdx has no discard: a no-op, as qemu answers it. */
  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.resolve();
  }

  /** No write-zeroes in qemu's vhdx: zero bytes go into allocated blocks. */
  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "VHDX image is read-only");
    if (flags.fastZero) {
      throw new BlockError(Errno.ENOTSUP, "VHDX cannot zero without writing zero data");
    }
    this.#noParent();
    await this.#visibleWrite();
    const bs = this.#blockSize;
    const zeroes = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length;) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(length - done, bs - inBlock, zeroes.length);
      const idx = this.#index(block);
      // An unallocated block already reads as zeroes.
      if (!readsZero(this.#state(idx))) {
        await this.#writeInBlock(idx, inBlock, zeroes.subarray(0, n));
      }
      done += n;
    }
    if (flags.fua) await this.#file.sync();
  }

  cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  /** qemu's vhdx has no block status: everything is data. */
  extents(_offset: number, length: number, out: ExtentList): Promise<void> {
    out.add(length, 0);
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.#file.close();
    return Promise.resolve();
  }
}
