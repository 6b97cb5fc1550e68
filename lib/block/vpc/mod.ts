/**
 * The VHD (Virtual PC, qemu's "vpc") format driver, read and write, as qemu 7.2's vpc driver
 * serves it:
 *
 * - a fixed image is its disk followed by the footer: reads and writes go straight to the file,
 *   and block status is data, with the file's holes (and anything past its end) zero, as qemu
 *   asks the file below;
 * - a dynamic image (footer copy at 0, "cxsparse" header, BAT) maps each block to a sector
 *   bitmap and the block's data. An unused entry reads as zeroes and reports hole,zero; a used
 *   one is data. Like qemu, the sector bitmaps are not read: every bit counts as set, and the
 *   first write to a block since the image was opened sets all its bits (qemu rewrites it
 *   whenever the block written changes; the bytes come out the same);
 * - differencing images open as dynamic ones without their parent, as qemu 7.2 opens them;
 * - a write to an unused block allocates it at the first free offset: the all-ones bitmap, the
 *   footer at the new end of the file and the data, made durable, then the BAT entry -- the
 *   bytes qemu leaves, written in an order where the table never points at unwritten data;
 * - no write-zeroes or discard of its own in qemu: zeroing writes zero bytes (fast zero fails
 *   with ENOTSUP) and trim does nothing.
 *
 * The disk size follows qemu's rule (footer.ts diskSectors) and its `force_size_calc` option.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import type { FormatDriver } from "../formats.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  type ExtentList,
  type FileRange,
  STATE_HOLE,
  STATE_ZERO,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";
import { loadBat } from "./bat.ts";
import {
  BDRV_MAX_LENGTH,
  decodeDynHeader,
  decodeFooter,
  diskSectors,
  hasVhdCookie,
  isFooter,
  parseSizeCalc,
  VHD_BAT_UNUSED,
  VHD_DYN_HEADER_SIZE,
  VHD_FIXED,
  VHD_FOOTER_SIZE,
  type VhdFooter,
} from "./footer.ts";
import { Mutex } from "../qcow2/sync.ts";

const SECTOR = 512;
/** Zero bytes written per step when zeroing. */
const ZERO_CHUNK = 1024 * 1024;

/** The vpc entry of the format registry (lib/block/formats.ts). */
export const vpcFormat: FormatDriver = {
  name: "vpc",
  probe: (head) => hasVhdCookie(head) ? 100 : 0,
  open: (file, ctx) =>
    openVpc(file, {
      writable: ctx.writable,
      sizeCalc: ctx.options["force_size_calc"],
      zeroCopy: ctx.zeroCopy === true && file.fd >= 0,
    }),
  optionKeys: ["force_size_calc"],
};

export interface VpcOpenOptions {
  readonly writable: boolean;
  /** The `force_size_calc` option as given ("chs", "current_size"; others are refused). */
  readonly sizeCalc?: string;
  /** Offer zero-copy reads (off under O_DIRECT). */
  readonly zeroCopy?: boolean;
}

/** Reads `length` bytes at `offset`, zeroes past the end of the file (qemu's reads). */
async function readZeroFilled(file: FileEngine, offset: number, length: number) {
  const b = new Uint8Array(length);
  if (offset < file.length()) {
    const got = await file.pread(b, offset);
    b.fill(0, got);
  }
  return b;
}

/** Opens a VHD image over `file`; closes the file if opening fails. */
export async function openVpc(file: FileEngine, options: VpcOpenOptions): Promise<BlockDevice> {
  try {
    const calc = parseSizeCalc(options.sizeCalc);
    const fileLength = file.length();
    let raw = await readZeroFilled(file, 0, VHD_FOOTER_SIZE);
    let dynamic = true;
    if (!isFooter(raw)) {
      // No copy at the start: a fixed image, whose only footer is at the end.
      if (fileLength < VHD_FOOTER_SIZE) {
        throw new BlockError(Errno.EINVAL, "File too small for a VHD header");
      }
      raw = await readZeroFilled(file, fileLength - VHD_FOOTER_SIZE, VHD_FOOTER_SIZE);
      if (!isFooter(raw) || new DataView(raw.buffer).getUint32(60) !== VHD_FIXED) {
        throw new BlockError(Errno.EINVAL, "invalid VPC image");
      }
      dynamic = false;
    }
    const footer = decodeFooter(raw);
    const size = diskSectors(footer, calc, file.path) * SECTOR;
    if (!dynamic) return new VpcFixedDevice(file, size, fileLength - VHD_FOOTER_SIZE, options);
    return await openDynamic(file, footer, size, options);
  } catch (e) {
    file.close();
    throw e;
  }
}

async function openDynamic(
  file: FileEngine,
  footer: VhdFooter,
  size: number,
  options: VpcOpenOptions,
): Promise<BlockDevice> {
  const fileLength = file.length();
  if (footer.dataOffset + BigInt(VHD_DYN_HEADER_SIZE) > BDRV_MAX_LENGTH) {
    throw new BlockError(Errno.EIO, "Error reading dynamic VHD header");
  }
  const dataOffset = Number(footer.dataOffset);
  const dyn = decodeDynHeader(
    await readZeroFilled(file, dataOffset, VHD_DYN_HEADER_SIZE),
    size / SECTOR,
  );
  const batBytes = BigInt(dyn.maxTableEntries) * 4n;
  if (dyn.tableOffset + batBytes > BDRV_MAX_LENGTH) {
    throw new BlockError(Errno.EIO, "Error reading pagetable");
  }
  // A table past the end of the file puts qemu's first free offset past it too.
  if (dyn.tableOffset + batBytes > BigInt(fileLength)) {
    throw new BlockError(
      Errno.EINVAL,
      "block-vpc: free_data_block_offset points after the end of file. The image has been truncated.",
    );
  }
  // Some 2 MiB images made by old tools carry a file size not a whole number of blocks.
  const used = Math.ceil(size / dyn.blockSize);
  const bat = await loadBat(file, {
    offset: Number(dyn.tableOffset),
    entries: dyn.maxTableEntries,
    used,
    blockSize: dyn.blockSize,
    bitmapSize: dyn.bitmapSize,
    fileLength,
    path: file.path,
    metadata: [
      { name: "the footer copy", start: 0, end: VHD_FOOTER_SIZE },
      { name: "the dynamic disk header", start: dataOffset, end: dataOffset + VHD_DYN_HEADER_SIZE },
    ],
  });
  return new VpcDynamicDevice(file, {
    size,
    footer: footer.bytes,
    fixedReads: footer.type === VHD_FIXED,
    tableOffset: Number(dyn.tableOffset),
    blockSize: dyn.blockSize,
    bitmapSize: dyn.bitmapSize,
    table: bat.table,
    freeOffset: bat.freeOffset,
  }, options);
}

function caps(writable: boolean): Capabilities {
  return {
    writable,
    flush: true,
    trim: writable,
    zero: writable,
    fastZero: writable,
    extents: true,
    minBlock: 1,
  };
}

function readOnly(): BlockError {
  return new BlockError(Errno.EPERM, "VHD image is read-only");
}

/** Writes zero bytes over a range, as qemu's block layer does for drivers without zeroing. */
async function writeZeroes(dev: BlockDevice, offset: number, length: number, flags: ZeroFlags) {
  if (flags.fastZero) {
    throw new BlockError(Errno.ENOTSUP, "VHD cannot zero without writing zero data");
  }
  const zeroes = new Uint8Array(Math.min(length, ZERO_CHUNK));
  for (let done = 0; done < length;) {
    const n = Math.min(length - done, zeroes.length);
    await dev.pwrite(zeroes.subarray(0, n), offset + done, flags);
    done += n;
  }
}

/**
 * Extents of file bytes `[at, at+length)` as qemu reports a range it asks the file about: data,
 * with the file's holes and anything past its end as zero.
 */
function fileExtents(f: FileEngine, at: number, length: number, out: ExtentList): void {
  const end = at + length;
  let pos = at;
  while (pos < end && !out.full) {
    const data = f.seekData(pos);
    if (data === -1 || data >= end) {
      out.add(end - pos, STATE_ZERO);
      return;
    }
    if (data > pos) {
      out.add(data - pos, STATE_ZERO);
      pos = data;
      continue;
    }
    const hole = Math.min(Math.max(f.seekHole(pos), pos + 1), end);
    out.add(hole - pos, 0);
    pos = hole;
  }
}

/** A fixed image: the disk as it lies in the file, the footer after it. */
export class VpcFixedDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #file: FileEngine;
  /** Where the footer lies: writes stop there. */
  readonly #footerAt: number;
  readonly #zeroCopy: boolean;

  constructor(file: FileEngine, size: number, footerAt: number, options: VpcOpenOptions) {
    this.#file = file;
    this.size = size;
    this.#footerAt = footerAt;
    this.#zeroCopy = options.zeroCopy === true;
    this.caps = caps(options.writable);
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const n = await this.#file.pread(buf, offset);
    // A size taken from current_size may reach past the file: zeroes, as qemu reads them.
    if (n < buf.length) buf.fill(0, n);
  }

  fileRange(offset: number, _length: number): FileRange | undefined {
    if (!this.#zeroCopy) return undefined;
    return { fd: this.#file.fd, offset, data: false };
  }

  writeRange(offset: number, length: number): FileRange | undefined {
    if (!this.#zeroCopy || !this.caps.writable || offset + length > this.#footerAt) {
      return undefined;
    }
    return { fd: this.#file.fd, offset, data: false };
  }

  pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    if (!this.caps.writable) return Promise.reject(readOnly());
    if (offset + buf.length > this.#footerAt) {
      // Beyond qemu, which would overwrite the footer (or fail an assertion past the end).
      return Promise.reject(
        new BlockError(
          Errno.EIO,
          `VHD image '${this.#file.path}': write at ${offset} (${buf.length} bytes) reaches the footer at ${this.#footerAt}`,
        ),
      );
    }
    return this.#file.pwrite(buf, offset);
  }

  flush(): Promise<void> {
    return this.#file.sync();
  }

  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.resolve();
  }

  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return writeZeroes(this, offset, length, flags);
  }

  cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  extents(offset: number, length: number, out: ExtentList): Promise<void> {
    fileExtents(this.#file, offset, length, out);
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.#file.close();
    return Promise.resolve();
  }
}

export interface DynamicLayout {
  readonly size: number;
  /** The footer as read at offset 0: what goes to the end of the file after an allocation. */
  readonly footer: Uint8Array;
  /** The footer copy says "fixed": qemu then reads and writes the file directly. */
  readonly fixedReads: boolean;
  readonly tableOffset: number;
  readonly blockSize: number;
  readonly bitmapSize: number;
  readonly table: Uint32Array;
  readonly freeOffset: number;
}

/** A dynamic (or differencing) image. */
export class VpcDynamicDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #file: FileEngine;
  readonly #l: DynamicLayout;
  readonly #table: Uint32Array;
  readonly #bs: number;
  /** Blocks whose bitmap this process has set to all ones (1 per block). */
  readonly #bitmapSet: Uint8Array;
  readonly #alloc = new Mutex();
  readonly #zeroCopy: boolean;
  #free: number;

  constructor(file: FileEngine, layout: DynamicLayout, options: VpcOpenOptions) {
    this.#file = file;
    this.#l = layout;
    this.#table = layout.table;
    this.#bs = layout.blockSize;
    this.#bitmapSet = new Uint8Array(layout.table.length);
    this.#free = layout.freeOffset;
    this.#zeroCopy = options.zeroCopy === true && !layout.fixedReads;
    this.size = layout.size;
    this.caps = caps(options.writable);
  }

  /** File offset of byte `inBlock` of the block whose entry is `entry`. */
  #at(entry: number, inBlock: number): number {
    return entry * SECTOR + this.#l.bitmapSize + inBlock;
  }

  #block(pos: number): number {
    return Math.floor(pos / this.#bs);
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    if (this.#l.fixedReads) return this.#readFile(buf, offset);
    const bs = this.#bs;
    const block = this.#block(offset);
    const inBlock = offset - block * bs;
    if (inBlock + buf.length <= bs) return this.#readPart(buf, block, inBlock);
    const reads: Promise<void>[] = [];
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const b = this.#block(pos);
      const inB = pos - b * bs;
      const n = Math.min(buf.length - done, bs - inB);
      reads.push(this.#readPart(buf.subarray(done, done + n), b, inB));
      done += n;
    }
    return Promise.all(reads).then(() => {});
  }

  #readPart(part: Uint8Array, block: number, inBlock: number): Promise<void> {
    const entry = this.#table[block]!;
    if (entry === VHD_BAT_UNUSED) {
      part.fill(0);
      return Promise.resolve();
    }
    return this.#readFile(part, this.#at(entry, inBlock));
  }

  async #readFile(part: Uint8Array, at: number): Promise<void> {
    const got = await this.#file.pread(part, at);
    if (got < part.length) part.fill(0, got);
  }

  fileRange(offset: number, length: number): FileRange | undefined {
    if (!this.#zeroCopy) return undefined;
    const block = this.#block(offset);
    const inBlock = offset - block * this.#bs;
    if (inBlock + length > this.#bs) return undefined;
    const entry = this.#table[block]!;
    if (entry === VHD_BAT_UNUSED) return undefined;
    return { fd: this.#file.fd, offset: this.#at(entry, inBlock), data: true };
  }

  async pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    if (!this.caps.writable) throw readOnly();
    if (this.#l.fixedReads) {
      await this.#file.pwrite(buf, offset);
      return;
    }
    const bs = this.#bs;
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const block = this.#block(pos);
      const inBlock = pos - block * bs;
      const n = Math.min(buf.length - done, bs - inBlock);
      const part = buf.subarray(done, done + n);
      const entry = this.#table[block]!;
      if (entry === VHD_BAT_UNUSED) {
        await this.#allocate(block, inBlock, part);
      } else {
        if (this.#bitmapSet[block] === 0) await this.#setBitmap(block, entry);
        await this.#file.pwrite(part, this.#at(entry, inBlock));
      }
      done += n;
    }
  }

  /** Sets every bit of an allocated block's bitmap, as qemu does before writing into it. */
  async #setBitmap(block: number, entry: number): Promise<void> {
    this.#bitmapSet[block] = 1;
    if (this.#l.bitmapSize === 0) return;
    await this.#file.pwrite(new Uint8Array(this.#l.bitmapSize).fill(0xff), entry * SECTOR);
  }

  /**
   * A write into an unused block: the block goes at the first free offset, the bitmap (all
   * ones), the footer after the block and the data are written and made durable, then the BAT
   * entry. Until the entry is written the new bytes are unreferenced, so a crash leaves at most
   * a leak; the file never ends before a block the table points at.
   */
  #allocate(block: number, inBlock: number, part: Uint8Array): Promise<void> {
    return this.#alloc.run(async () => {
      const now = this.#table[block]!;
      if (now !== VHD_BAT_UNUSED) {
        // Allocated by a write that held the lock before us.
        await this.#file.pwrite(part, this.#at(now, inBlock));
        return;
      }
      const l = this.#l;
      const start = this.#free;
      const entry = start / SECTOR;
      const end = start + l.bitmapSize + this.#bs;
      if (!Number.isInteger(entry) || entry >= VHD_BAT_UNUSED) {
        throw new BlockError(
          Errno.EIO,
          `VHD image '${this.#file.path}': no BAT entry can address offset ${start}`,
        );
      }
      const oldLength = this.#file.length();
      const dataAt = start + l.bitmapSize;
      const writes: Promise<void>[] = [];
      if (l.bitmapSize > 0) {
        writes.push(this.#file.pwrite(new Uint8Array(l.bitmapSize).fill(0xff), start));
      }
      writes.push(this.#file.pwrite(l.footer, end));
      if (oldLength > dataAt) {
        // Old bytes (the old footer, anything past it) would show through the new block, as
        // they do in qemu: zero them first.
        await this.#file.pwrite(new Uint8Array(Math.min(this.#bs, oldLength - dataAt)), dataAt);
      }
      writes.push(this.#file.pwrite(part, dataAt + inBlock));
      await Promise.all(writes);
      await this.#file.sync();
      const be = new Uint8Array(4);
      new DataView(be.buffer).setUint32(0, entry);
      await this.#file.pwrite(be, l.tableOffset + block * 4);
      this.#free = end;
      this.#table[block] = entry;
      this.#bitmapSet[block] = 1;
    });
  }

  flush(): Promise<void> {
    return this.#file.sync();
  }

  /** qemu's vpc has no discard: a no-op, as qemu answers it. */
  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.resolve();
  }

  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return writeZeroes(this, offset, length, flags);
  }

  cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  extents(offset: number, length: number, out: ExtentList): Promise<void> {
    if (this.#l.fixedReads) {
      fileExtents(this.#file, offset, length, out);
      return Promise.resolve();
    }
    const bs = this.#bs;
    const end = offset + length;
    let pos = offset;
    while (pos < end && !out.full) {
      const block = this.#block(pos);
      const n = Math.min(end - pos, (block + 1) * bs - pos);
      out.add(n, this.#table[block] === VHD_BAT_UNUSED ? STATE_HOLE | STATE_ZERO : 0);
      pos += n;
    }
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.#file.close();
    return Promise.resolve();
  }
}
