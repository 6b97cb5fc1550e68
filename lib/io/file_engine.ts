/**
 * Positional file I/O behind one small interface, so engines (threads through `nonblocking` FFI
 * here, io_uring in uring_engine.ts, Linux AIO in aio_engine.ts, all of them optionally under
 * the O_DIRECT engine of direct_engine.ts) are interchangeable. Everything here works on a raw fd
 * opened with FFI `open()`. This module holds the interface, the shared option types and the
 * thread engine; engine_factory.ts chooses and builds an engine from the options, so the engines
 * import this module and nothing here imports them.
 *
 * @module
 */

import {
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
} from "../../ffi/libc.ts";
import { Errno } from "../errors.ts";
import {
  fallocateError,
  fdLength,
  fdPrefetch,
  fdSeekData,
  fdSeekHole,
  fdTruncate,
} from "./fd_ops.ts";
import { PageCacheShortcut } from "./page_cache.ts";

/**
 * Which engine moves the bytes: the thread engine, the io_uring engine, Linux AIO ("native",
 * O_DIRECT only), or "auto" (io_uring where the kernel allows it, else threads).
 */
export type EngineChoice = "threads" | "io_uring" | "native" | "auto";

/** How an image file is opened. */
export interface OpenOptions {
  readonly writable: boolean;
  /** O_DIRECT (qemu's cache.direct=on: --cache=none|directsync). */
  readonly direct?: boolean;
  /** Use this already open descriptor instead of opening `path` (engines layered on one fd). */
  readonly fd?: number;
  /** Engine for openFileEngine (engine_factory.ts; default "threads"). */
  readonly aio?: EngineChoice;
  /** Where "auto" says, once per process, that it fell back to threads (-v's stderr). */
  readonly log?: (msg: string) => void;
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
export class ThreadFileEngine implements FileEngine {
  readonly path: string;
  readonly fd: number;
  #closed = false;
  readonly #cache: PageCacheShortcut;

  constructor(path: string, options: OpenOptions) {
    this.path = path;
    const flags = (options.writable ? O_RDWR : O_RDONLY) | (options.direct ? O_DIRECT : 0);
    this.fd = options.fd ?? openFile(path, flags);
    // O_DIRECT bypasses the page cache, so a cached read can never hit.
    this.#cache = new PageCacheShortcut(this.fd, !options.direct);
  }

  async pread(buf: Uint8Array, offset: number): Promise<number> {
    // Page-cache hits are served synchronously, which is far cheaper than a hop to the blocking
    // pool; only what is not cached goes to the pool.
    let done = this.#cache.read(buf, offset);
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

  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    let done = this.#cache.write(buf, offset);
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
    return fdLength(this.fd, this.path);
  }

  truncate(length: number): void {
    fdTruncate(this.fd, this.path, length);
  }

  punchHole(offset: number, length: number): Promise<void> {
    return this.#fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  }

  zeroRange(offset: number, length: number): Promise<void> {
    return this.#fallocate(FALLOC_FL_ZERO_RANGE, offset, length);
  }

  seekData(offset: number): number {
    return fdSeekData(this.fd, this.path, offset);
  }

  seekHole(offset: number): number {
    return fdSeekHole(this.fd, this.path, offset);
  }

  prefetch(offset: number, length: number): void {
    fdPrefetch(this.fd, offset, length);
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
    throw fallocateError(this.path, mode, offset, length, errno());
  }

  #fail(what: string, offset: number, length: number, retry: () => number | bigint): never {
    // Repeat synchronously so errno is from this thread; a retry that succeeds is still a
    // failure of the original call, reported as EIO.
    const r = Number(retry());
    const err = r < 0 ? errno() : Errno.EIO;
    throw errnoError(`${what} '${this.path}' at ${offset}+${length}`, err);
  }
}
