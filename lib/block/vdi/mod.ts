/**
 * The VDI (VirtualBox) format driver, read and write, dynamic and static images, as qemu 7.2's
 * vdi driver serves them:
 *
 * - a guest block (1 MiB) whose map entry is unallocated or discarded reads as zeroes and is
 *   reported hole,zero; an allocated block is data. In a static image every block is
 *   allocated and qemu asks the file below (BDRV_BLOCK_RECURSE), so its holes report zero;
 * - a write to an unallocated block allocates image block `blocks_allocated` (the end of a
 *   file qemu wrote), writes the whole block (the request's bytes, zeroes around them), then
 *   the header with the new count and the map sector holding the entry, in that order;
 * - qemu's vdi has no write-zeroes or discard of its own: zeroing writes zero bytes (so it
 *   allocates, and fast zero fails with ENOTSUP) and trim does nothing.
 *
 * Allocations are serialised by one lock, so two writes to the same new block allocate it once
 * and metadata writes never overtake each other; writes to allocated blocks do not wait.
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
import { isAllocated, VdiBlockMap } from "./block_map.ts";
import {
  decodeVdiHeader,
  encodeVdiHeader,
  hasVdiSignature,
  VDI_HEADER_SIZE,
  VDI_TYPE_STATIC,
  type VdiHeader,
} from "./header.ts";
import { Mutex } from "../qcow2/sync.ts";

export { hasVdiSignature } from "./header.ts";

/** The vdi entry of the format registry (lib/block/formats.ts). */
export const vdiFormat: FormatDriver = {
  name: "vdi",
  probe: (head) => hasVdiSignature(head) ? 100 : 0,
  open: (file, ctx) => openVdi(file, { writable: ctx.writable, zeroCopy: ctx.zeroCopy }),
};

/** Largest block map held in memory (a 256 TiB disk); qemu's limit (4 GiB) is not practical. */
const MAX_MAP_BYTES = 1 << 30;
/** Zero bytes written per step when zeroing. */
const ZERO_CHUNK = 1024 * 1024;

export interface VdiOpenOptions {
  readonly writable: boolean;
  /** Offer fileRange/writeRange for allocated blocks (a plain file, page cache). */
  readonly zeroCopy?: boolean;
}

/** Opens a VDI image over `file`; closes the file if opening fails. */
export async function openVdi(file: FileEngine, options: VdiOpenOptions): Promise<VdiDevice> {
  try {
    const head = new Uint8Array(VDI_HEADER_SIZE);
    await file.pread(head, 0);
    const header = decodeVdiHeader(head);
    const fileLength = file.length();
    const mapBytes = VdiBlockMap.byteLength(header.blocksInImage);
    if (mapBytes > MAX_MAP_BYTES) {
      throw new BlockError(
        Errno.ENOMEM,
        `VDI block map of ${mapBytes} bytes is larger than denbd supports (${MAX_MAP_BYTES})`,
      );
    }
    if (header.offsetBmap + header.blocksInImage * 4 > fileLength) {
      throw new BlockError(
        Errno.EINVAL,
        `Corrupt VDI image: the block map (offset ${header.offsetBmap}, ${header.blocksInImage} entries) ends past the end of the file (${fileLength} bytes)`,
      );
    }
    const bytes = new Uint8Array(mapBytes);
    const n = await file.pread(bytes, header.offsetBmap);
    bytes.fill(0, n);
    const map = new VdiBlockMap(bytes, header.blocksInImage);
    map.validate({
      blocks: header.blocksInImage,
      offsetData: header.offsetData,
      blockSize: header.blockSize,
      fileLength,
    });
    return new VdiDevice(file, header, map, options);
  } catch (e) {
    file.close();
    throw e;
  }
}

export class VdiDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #file: FileEngine;
  readonly #header: VdiHeader;
  readonly #map: VdiBlockMap;
  readonly #blockSize: number;
  readonly #static: boolean;
  readonly #alloc = new Mutex();
  readonly #zeroCopy: boolean;

  constructor(file: FileEngine, header: VdiHeader, map: VdiBlockMap, options: VdiOpenOptions) {
    this.#file = file;
    this.#header = header;
    this.#map = map;
    this.#blockSize = header.blockSize;
    this.#static = header.imageType === VDI_TYPE_STATIC;
    this.size = header.diskSize;
    this.#zeroCopy = options.zeroCopy ?? false;
    const w = options.writable;
    this.caps = {
      writable: w,
      flush: true,
      trim: w,
      zero: w,
      fastZero: w,
      extents: true,
      minBlock: 1,
    };
  }

  /** The file offset of byte `inBlock` of image block `entry`. */
  #at(entry: number, inBlock: number): number {
    return this.#header.offsetData + entry * this.#blockSize + inBlock;
  }

  /**
   * Where a range inside one allocated block lies in the file (blocks are stored as-is), for
   * the session's page-cache and sendfile paths. A dynamic image's allocated block is data;
   * a static one's may hold file holes, so it is not known to be.
   */
  fileRange(offset: number, length: number): FileRange | undefined {
    if (!this.#zeroCopy) return undefined;
    const bs = this.#blockSize;
    const block = Math.floor(offset / bs);
    const inBlock = offset - block * bs;
    if (inBlock + length > bs) return undefined;
    const entry = this.#map.get(block);
    if (!isAllocated(entry)) return undefined;
    return { fd: this.#file.fd, offset: this.#at(entry, inBlock), data: !this.#static };
  }

  /** A write inside one allocated block goes straight into the file. */
  writeRange(offset: number, length: number): FileRange | undefined {
    if (!this.caps.writable) return undefined;
    return this.fileRange(offset, length);
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const bs = this.#blockSize;
    const reads: Promise<void>[] = [];
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(buf.length - done, bs - inBlock);
      const part = buf.subarray(done, done + n);
      const entry = this.#map.get(block);
      if (!isAllocated(entry)) {
        part.fill(0);
      } else {
        reads.push(
          this.#file.pread(part, this.#at(entry, inBlock)).then((got) => {
            // Past the end of the file reads as zeroes, as qemu's file driver reads it.
            if (got < part.length) part.fill(0, got);
          }),
        );
      }
      done += n;
    }
    await Promise.all(reads);
  }

  async pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "VDI image is read-only");
    const bs = this.#blockSize;
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(buf.length - done, bs - inBlock);
      const part = buf.subarray(done, done + n);
      const entry = this.#map.get(block);
      if (isAllocated(entry)) {
        await this.#file.pwrite(part, this.#at(entry, inBlock));
      } else {
        await this.#allocate(block, inBlock, part);
      }
      done += n;
    }
  }

  /** A write into an unallocated block: a new image block, then header and map (qemu's order). */
  #allocate(block: number, inBlock: number, part: Uint8Array): Promise<void> {
    return this.#alloc.run(async () => {
      const now = this.#map.get(block);
      if (isAllocated(now)) {
        // Allocated by a write that held the lock before us.
        await this.#file.pwrite(part, this.#at(now, inBlock));
        return;
      }
      const h = this.#header;
      const entry = h.blocksAllocated;
      if (entry >= h.blocksInImage) {
        // Only a damaged count gets here: the image has room for blocks_in_image blocks.
        throw new BlockError(
          Errno.EIO,
          `VDI image '${this.#file.path}' has no free block (blocks_allocated ${entry})`,
        );
      }
      const data = new Uint8Array(this.#blockSize);
      data.set(part, inBlock);
      await this.#file.pwrite(data, this.#at(entry, 0));
      this.#map.set(block, entry);
      h.blocksAllocated = entry + 1;
      await this.#file.pwrite(encodeVdiHeader(h), 0);
      const sector = this.#map.sectorOf(block);
      await this.#file.pwrite(sector.bytes, h.offsetBmap + sector.offset);
    });
  }

  flush(): Promise<void> {
    return this.#file.sync();
  }

  /** qemu's vdi has no discard: a no-op, as qemu answers it. */
  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.resolve();
  }

  /** No write-zeroes in qemu's vdi: its block layer writes zero bytes instead. */
  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (flags.fastZero) {
      throw new BlockError(Errno.ENOTSUP, "VDI cannot zero without writing zero data");
    }
    const zeroes = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length;) {
      const n = Math.min(length - done, zeroes.length);
      await this.pwrite(zeroes.subarray(0, n), offset + done, flags);
      done += n;
    }
  }

  cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  extents(offset: number, length: number, out: ExtentList): Promise<void> {
    const bs = this.#blockSize;
    const end = offset + length;
    let pos = offset;
    while (pos < end && !out.full) {
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(end - pos, bs - inBlock);
      const entry = this.#map.get(block);
      if (!isAllocated(entry)) {
        out.add(n, STATE_HOLE | STATE_ZERO);
      } else if (!this.#static) {
        out.add(n, 0);
      } else {
        this.#fileExtents(this.#at(entry, inBlock), n, out);
      }
      pos += n;
    }
    return Promise.resolve();
  }

  /**
   * A static image's block as qemu reports it: data, with the file's holes (and anything past
   * its end) as zero -- qemu recurses into the file for static images.
   */
  #fileExtents(at: number, length: number, out: ExtentList): void {
    const f = this.#file;
    const end = at + length;
    let pos = at;
    while (pos < end) {
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

  close(): Promise<void> {
    this.#file.close();
    return Promise.resolve();
  }
}
