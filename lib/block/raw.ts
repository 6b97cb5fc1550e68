/**
 * The raw format driver: the guest disk is the file, optionally a window `[offset, offset+size)`
 * of it (qemu's raw `offset=`/`size=`, and qemu-nbd -o).
 *
 * Size follows qemu: without an explicit size the file length is rounded up to 512 bytes (a
 * 1000-byte file is a 1024-byte disk); reads past the real end of file return zeroes.
 * Block status comes from SEEK_DATA/SEEK_HOLE: holes are "hole,zero", everything else data.
 *
 * @module
 */

import type { FileEngine } from "../io/file_engine.ts";
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
} from "./types.ts";

export interface RawOptions {
  readonly writable: boolean;
  /** Byte offset of the disk inside the file. */
  readonly offset: number;
  /** Disk size; undefined = rest of the file, rounded up to 512. */
  readonly size: number | undefined;
  /** Request alignment (1, or 512 for format-probed images and O_DIRECT). */
  readonly minBlock: number;
  /**
   * Offer zero-copy reads (BlockDevice.fileRange). Off under O_DIRECT: sendfile would read
   * through the page cache that --cache=none bypasses.
   */
  readonly zeroCopy?: boolean;
}

/** Largest single zero-filled write used to emulate WRITE_ZEROES where fallocate cannot. */
const ZERO_WRITE_CHUNK = 1024 * 1024;

export class RawDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #file: FileEngine;
  readonly #offset: number;
  /**
   * The last data run SEEK_DATA/SEEK_HOLE found, [start, end) in file offsets. Every sparse read
   * asks for extents, and two lseeks per 4 KiB read cost ~10% of a random-read workload; a write
   * cannot turn data into a hole, so the run stays valid until this device punches one.
   * (Another process punching holes in the file would make reads of them send zero data where
   * a hole chunk would have done: the same bytes.)
   */
  #dataStart = 0;
  #dataEnd = 0;
  readonly #zeroCopy: boolean;

  constructor(file: FileEngine, options: RawOptions) {
    this.#file = file;
    this.#offset = options.offset;
    this.#zeroCopy = options.zeroCopy === true;
    const fileLength = file.length();
    const sectors = Math.ceil(fileLength / 512) * 512;
    if (options.offset > sectors) {
      throw new BlockError(
        Errno.EINVAL,
        `Offset (${options.offset}) cannot be greater than size of the containing file (${fileLength})`,
      );
    }
    if (options.size !== undefined) {
      if (options.size % 512 !== 0) {
        throw new BlockError(
          Errno.EINVAL,
          `Specified size ${options.size} is not a multiple of 512`,
        );
      }
      if (options.offset + options.size > sectors) {
        throw new BlockError(
          Errno.EINVAL,
          `The sum of offset (${options.offset}) and size (${options.size}) has to be smaller or equal to the actual size of the containing file (${fileLength})`,
        );
      }
      this.size = options.size;
    } else {
      this.size = Math.ceil((sectors - options.offset) / 512) * 512;
    }
    this.caps = {
      writable: options.writable,
      flush: true,
      trim: options.writable,
      zero: options.writable,
      fastZero: options.writable,
      extents: true,
      minBlock: options.minBlock,
    };
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const n = await this.#file.pread(buf, this.#offset + offset);
    // Past the real end of file (the 512-byte rounding tail): zeroes, as qemu reads them.
    if (n < buf.length) buf.fill(0, n);
  }

  fileRange(offset: number, length: number): FileRange | undefined {
    if (!this.#zeroCopy) return undefined;
    const at = this.#offset + offset;
    // Known data: inside the run the last block-status query found (see #dataStart).
    const data = at >= this.#dataStart && at + length <= this.#dataEnd;
    return { fd: this.#file.fd, offset: at, data };
  }

  writeRange(offset: number, _length: number): FileRange | undefined {
    if (!this.#zeroCopy || !this.caps.writable) return undefined;
    return { fd: this.#file.fd, offset: this.#offset + offset, data: false };
  }

  pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    return this.#file.pwrite(buf, this.#offset + offset);
  }

  flush(): Promise<void> {
    return this.#file.sync();
  }

  async trim(offset: number, length: number, _flags: WriteFlags): Promise<void> {
    try {
      await this.#punchHole(this.#offset + offset, length);
    } catch (e) {
      // Discard is a hint: a filesystem that cannot punch holes simply keeps the data.
      if (!(e instanceof BlockError && e.errno === Errno.ENOTSUP)) throw e;
    }
  }

  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const at = this.#offset + offset;
    if (!flags.noHole) {
      try {
        await this.#punchHole(at, length);
        // Punching keeps the file size; a range past the end must still exist afterwards.
        if (at + length > this.#file.length()) await this.#file.zeroRange(at, length);
        return;
      } catch (e) {
        if (!(e instanceof BlockError && e.errno === Errno.ENOTSUP)) throw e;
      }
    }
    try {
      await this.#file.zeroRange(at, length);
      return;
    } catch (e) {
      if (!(e instanceof BlockError && e.errno === Errno.ENOTSUP)) throw e;
      if (flags.fastZero) {
        throw new BlockError(Errno.ENOTSUP, "fast zeroing is not supported by this file");
      }
    }
    const chunk = new Uint8Array(Math.min(length, ZERO_WRITE_CHUNK));
    for (let done = 0; done < length; done += chunk.length) {
      const n = Math.min(chunk.length, length - done);
      await this.#file.pwrite(n === chunk.length ? chunk : chunk.subarray(0, n), at + done);
    }
  }

  cache(offset: number, length: number): Promise<void> {
    this.#file.prefetch(this.#offset + offset, length);
    return Promise.resolve();
  }

  /** Punch a hole, forgetting the known data run on both sides of the wait. */
  async #punchHole(at: number, length: number): Promise<void> {
    this.#dataStart = this.#dataEnd = 0;
    try {
      await this.#file.punchHole(at, length);
    } finally {
      this.#dataStart = this.#dataEnd = 0;
    }
  }

  extents(offset: number, length: number, out: ExtentList): Promise<void> {
    const file = this.#file;
    const base = this.#offset;
    const end = offset + length;
    let pos = offset;
    while (pos < end && !out.full) {
      if (base + pos >= this.#dataStart && base + pos < this.#dataEnd) {
        const stop = Math.min(this.#dataEnd - base, end);
        out.add(stop - pos, 0);
        pos = stop;
        continue;
      }
      const data = file.seekData(base + pos);
      if (data === -1 || data - base >= end) {
        out.add(end - pos, STATE_HOLE | STATE_ZERO); // trailing hole
        break;
      }
      if (data - base > pos) {
        out.add(data - base - pos, STATE_HOLE | STATE_ZERO);
        pos = data - base;
        continue;
      }
      const hole = file.seekHole(base + pos) - base;
      if (hole > pos) {
        this.#dataStart = base + pos;
        this.#dataEnd = base + hole;
      }
      const stop = Math.min(Math.max(hole, pos + 1), end);
      out.add(stop - pos, 0);
      pos = stop;
    }
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.#file.close();
    return Promise.resolve();
  }
}
