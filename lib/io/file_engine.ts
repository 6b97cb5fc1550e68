/**
 * Positional file I/O behind one small interface, so engines (threads through `nonblocking` FFI,
 * io_uring) are interchangeable. Everything here works on a raw fd opened with FFI `open()`.
 *
 * @module
 */

import {
  EAGAIN,
  errno,
  errnoError,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  libc,
  O_DIRECT,
  O_RDONLY,
  O_RDWR,
  openFile,
  POSIX_FADV_WILLNEED,
  RWF_NOWAIT,
  SEEK_DATA,
  SEEK_END,
  SEEK_HOLE,
} from "../../ffi/libc.ts";
import { BlockError, Errno } from "../block/types.ts";
import { DirectFileEngine } from "./direct_engine.ts";

/** How an image file is opened. */
export interface OpenOptions {
  readonly writable: boolean;
  /** O_DIRECT (qemu's cache.direct=on: --cache=none|directsync). */
  readonly direct?: boolean;
  /** Use this already open descriptor instead of opening `path` (engines layered on one fd). */
  readonly fd?: number;
}

/** Positional I/O on one open file. */
export interface FileEngine {
  readonly path: string;
  readonly fd: number;
  /** Read up to `buf.length` bytes at `offset`; returns the count (short only at end of file). */
  pread(buf: Uint8Array, offset: number): Promise<number>;
  /** Write all of `buf` at `offset`. */
  pwrite(buf: Uint8Array, offset: number): Promise<void>;
  /** fdatasync(2). */
  sync(): Promise<void>;
  /** Current file length in bytes. */
  length(): number;
  /** Set the file length (ftruncate). */
  truncate(length: number): void;
  /** Deallocate a range; reads of it return zeroes. Throws ENOTSUP where the filesystem cannot. */
  punchHole(offset: number, length: number): Promise<void>;
  /** Zero a range and keep it allocated. Throws ENOTSUP where the filesystem cannot. */
  zeroRange(offset: number, length: number): Promise<void>;
  /** Offset of the next data at or after `offset`, or -1 when only a hole follows (ENXIO). */
  seekData(offset: number): number;
  /** Offset of the next hole at or after `offset` (end of file at the latest). */
  seekHole(offset: number): number;
  /** Prefetch hint (posix_fadvise WILLNEED). */
  prefetch(offset: number, length: number): void;
  close(): void;
}

/**
 * The thread engine: pread/pwrite as `nonblocking` FFI calls on Deno's blocking pool (up to 32
 * at once). errno is not readable after such a call, so a failed call is repeated synchronously
 * to learn why (deno-notes §2); that path is taken only on errors.
 */
/** Largest write done on the event-loop thread (see #pwriteInline). */
const INLINE_WRITE_MAX = 64 * 1024;

export class ThreadFileEngine implements FileEngine {
  readonly path: string;
  readonly fd: number;
  #closed = false;
  #nowait: boolean;
  readonly #iov = new BigUint64Array(2);
  #inlineWritesOffUntil = 0;
  readonly #iovBytes = new Uint8Array(this.#iov.buffer);

  constructor(path: string, options: OpenOptions) {
    this.path = path;
    const flags = (options.writable ? O_RDWR : O_RDONLY) | (options.direct ? O_DIRECT : 0);
    this.fd = options.fd ?? openFile(path, flags);
    // O_DIRECT bypasses the page cache, so a cached read can never hit.
    this.#nowait = !options.direct;
  }

  async pread(buf: Uint8Array, offset: number): Promise<number> {
    // Page-cache hits are served synchronously (a memcpy, ~1.5 us for 4 KiB), which is far cheaper
    // than a hop to the blocking pool; RWF_NOWAIT makes the kernel refuse rather than wait for the
    // disk, and only what is not cached goes to the pool.
    let done = this.#preadCached(buf, offset);
    if (done === buf.length) return done;
    if (done < 0) done = 0;
    while (done < buf.length) {
      const part = done === 0 ? buf : buf.subarray(done);
      const n = Number(
        await libc().pread_nb(this.fd, part, BigInt(part.length), BigInt(offset + done)),
      );
      if (n < 0) {
        this.#fail(
          "pread",
          offset + done,
          part.length,
          () => libc().pread(this.fd, part, BigInt(part.length), BigInt(offset + done)),
        );
      }
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  /**
   * Small buffered writes go straight to the page cache on this thread (~25 us, ~25% less CPU
   * than a pool hop). A write can stall under dirty-page throttling, so one that takes over
   * 1 ms sends every write to the pool for the next second: a stall costs at most ~1 ms.
   * Returns the bytes written, or -1 when the pool should do it.
   */
  #pwriteInline(buf: Uint8Array, offset: number): number {
    if (!this.#nowait || buf.length > INLINE_WRITE_MAX || buf.length === 0) return -1;
    const now = performance.now();
    if (now < this.#inlineWritesOffUntil) return -1;
    const iov = this.#iov;
    iov[0] = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
    iov[1] = BigInt(buf.length);
    const n = Number(libc().pwritev2(this.fd, this.#iovBytes, 1, BigInt(offset), 0));
    if (performance.now() - now > 1) this.#inlineWritesOffUntil = performance.now() + 1000;
    return n;
  }

  /** Synchronous read of whatever is in the page cache: bytes read, 0 at EOF, -1 if none cached. */
  #preadCached(buf: Uint8Array, offset: number): number {
    if (!this.#nowait || buf.length === 0) return -1;
    const iov = this.#iov;
    iov[0] = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
    iov[1] = BigInt(buf.length);
    const n = Number(libc().preadv2(this.fd, this.#iovBytes, 1, BigInt(offset), RWF_NOWAIT));
    if (n >= 0) return n;
    const err = errno();
    // Kernels or filesystems without RWF_NOWAIT say EOPNOTSUPP/EINVAL: stop trying.
    if (err !== EAGAIN) this.#nowait = false;
    return -1;
  }

  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    let done = this.#pwriteInline(buf, offset);
    if (done === buf.length) return;
    if (done < 0) done = 0;
    while (done < buf.length) {
      const part = done === 0 ? buf : buf.subarray(done);
      const n = Number(
        await libc().pwrite_nb(this.fd, part, BigInt(part.length), BigInt(offset + done)),
      );
      if (n < 0) {
        this.#fail(
          "pwrite",
          offset + done,
          part.length,
          () => libc().pwrite(this.fd, part, BigInt(part.length), BigInt(offset + done)),
        );
      }
      done += n;
    }
  }

  async sync(): Promise<void> {
    if (await libc().fdatasync_nb(this.fd) < 0) {
      if (libc().fdatasync(this.fd) < 0) throw errnoError(`fdatasync '${this.path}'`);
    }
  }

  length(): number {
    const n = Number(libc().lseek(this.fd, 0n, SEEK_END));
    if (n < 0) throw errnoError(`lseek '${this.path}'`);
    return n;
  }

  truncate(length: number): void {
    if (libc().ftruncate(this.fd, BigInt(length)) < 0) throw errnoError(`ftruncate '${this.path}'`);
  }

  punchHole(offset: number, length: number): Promise<void> {
    return this.#fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  }

  zeroRange(offset: number, length: number): Promise<void> {
    return this.#fallocate(FALLOC_FL_ZERO_RANGE, offset, length);
  }

  seekData(offset: number): number {
    const r = Number(libc().lseek(this.fd, BigInt(offset), SEEK_DATA));
    if (r >= 0) return r;
    const err = errno();
    if (err === Errno.ENXIO) return -1;
    throw errnoError(`lseek SEEK_DATA '${this.path}' at ${offset}`, err);
  }

  seekHole(offset: number): number {
    const r = Number(libc().lseek(this.fd, BigInt(offset), SEEK_HOLE));
    if (r >= 0) return r;
    const err = errno();
    if (err === Errno.ENXIO) return offset;
    throw errnoError(`lseek SEEK_HOLE '${this.path}' at ${offset}`, err);
  }

  prefetch(offset: number, length: number): void {
    libc().posix_fadvise(this.fd, BigInt(offset), BigInt(length), POSIX_FADV_WILLNEED);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    libc().close(this.fd);
  }

  async #fallocate(mode: number, offset: number, length: number): Promise<void> {
    if (length === 0) return;
    if (await libc().fallocate_nb(this.fd, mode, BigInt(offset), BigInt(length)) === 0) return;
    if (libc().fallocate(this.fd, mode, BigInt(offset), BigInt(length)) === 0) return;
    const err = errno();
    // EOPNOTSUPP (95) is what filesystems without the mode answer; ENOSYS likewise.
    if (err === Errno.ENOTSUP || err === 38) {
      throw new BlockError(Errno.ENOTSUP, `fallocate mode ${mode} not supported on '${this.path}'`);
    }
    throw errnoError(`fallocate '${this.path}' at ${offset}+${length}`, err);
  }

  #fail(what: string, offset: number, length: number, retry: () => number | bigint): never {
    // Repeat synchronously so errno is from this thread; a retry that succeeds is still a
    // failure of the original call, reported as EIO.
    const r = Number(retry());
    const err = r < 0 ? errno() : Errno.EIO;
    throw errnoError(`${what} '${this.path}' at ${offset}+${length}`, err);
  }
}

/** Open an image file: the O_DIRECT engine when asked for, else the thread engine. */
export function openFileEngine(path: string, options: OpenOptions): FileEngine {
  if (options.direct) return new DirectFileEngine(path, options.writable);
  return new ThreadFileEngine(path, options);
}
