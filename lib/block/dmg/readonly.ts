/**
 * What the three read-only formats (dmg, cloop, bochs) share: qemu 7.2's drivers for them have
 * only open and read, so
 *
 * - opening read-write fails before the image is read, with bdrv_apply_auto_read_only's
 *   "Image is read-only" (EACCES): `qemu-nbd IMAGE` without -r, -s or a read-only backing use;
 * - there is no block status: the block layer reports every byte as data, allocated in this
 *   image (nbdinfo --map shows one data extent, allocation depth 1 everywhere);
 * - reads are whole sectors (request_alignment 512, advertised as the minimum block size);
 * - past the end of the file reads as zeroes, as qemu's file driver pads a short read.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  type ExtentList,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";

/** qemu's refusal to open these formats for writing. */
export function readOnlyRefusal(): BlockError {
  return new BlockError(Errno.EACCES, "Image is read-only");
}

/** The capabilities of every read-only format device. */
export const READ_ONLY_CAPS: Capabilities = {
  writable: false,
  flush: true,
  trim: false,
  zero: false,
  fastZero: false,
  extents: true,
  minBlock: 512,
};

/**
 * Reads `buf.length` bytes at `offset` of `file` whose length is `fileLength`, zeroes past the
 * end. Never asks the kernel for bytes past the end, so a hostile offset (up to 2^64) is just
 * zeroes, not an EINVAL from pread.
 */
export async function readPadded(
  file: FileEngine,
  buf: Uint8Array,
  offset: number,
  fileLength: number,
): Promise<void> {
  const avail = offset >= fileLength ? 0 : Math.min(buf.length, fileLength - offset);
  let got = 0;
  if (avail > 0) got = await file.pread(buf.subarray(0, avail), offset);
  if (got < buf.length) buf.fill(0, got);
}

/** A new zero-padded buffer with `length` bytes at `offset` (see {@link readPadded}). */
export async function readBytes(
  file: FileEngine,
  offset: number,
  length: number,
  fileLength: number,
): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await readPadded(file, buf, offset, fileLength);
  return buf;
}

/** The EIO a client gets for a sector qemu cannot read (a damaged or unsupported chunk). */
export function readError(path: string, what: string): BlockError {
  return new BlockError(Errno.EIO, `${path}: ${what}`);
}

/** Base of the three devices: everything but pread. */
export abstract class ReadOnlyDevice implements BlockDevice {
  abstract readonly size: number;
  readonly caps: Capabilities = READ_ONLY_CAPS;
  protected readonly file: FileEngine;

  constructor(file: FileEngine) {
    this.file = file;
  }

  abstract pread(buf: Uint8Array, offset: number): Promise<void>;

  pwrite(_buf: Uint8Array, _offset: number, _flags: WriteFlags): Promise<void> {
    return Promise.reject(new BlockError(Errno.EPERM, "Image is read-only"));
  }
  /** Nothing is ever written, so nothing to flush (qemu still advertises flush). */
  flush(): Promise<void> {
    return Promise.resolve();
  }
  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.reject(new BlockError(Errno.EPERM, "Image is read-only"));
  }
  zero(_offset: number, _length: number, _flags: ZeroFlags): Promise<void> {
    return Promise.reject(new BlockError(Errno.EPERM, "Image is read-only"));
  }
  cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }
  /** No block status in qemu's driver: all data. */
  extents(_offset: number, length: number, out: ExtentList): Promise<void> {
    out.add(length, 0);
    return Promise.resolve();
  }
  close(): Promise<void> {
    this.file.close();
    return Promise.resolve();
  }
}
