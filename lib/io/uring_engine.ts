/**
 * The io_uring file engine (`--aio=io_uring`, and the default where io_uring works): reads,
 * writes, fdatasync and fallocate go through one process-wide ring (ffi/io_uring.ts), so a tick's
 * requests cost one syscall and no blocking-pool thread each. Page-cache hits and small buffered
 * writes are still served synchronously first (page_cache.ts), as in the thread engine: that is
 * cheaper still. length/truncate/seek/prefetch stay synchronous libc calls.
 *
 * scripts/engine_bench.ts, 2 vCPUs: for page-cache misses and O_DIRECT at depth 32 the ring
 * matches or beats the thread engine's throughput on about a third of its CPU (0.4-0.6 of a core
 * against 1.3-1.6); at depth 1 both wait on the disk alike.
 *
 * @module
 */

import { Ring } from "../../ffi/io_uring.ts";
import {
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
import type { FileEngine, OpenOptions } from "./file_engine.ts";
import {
  fallocateError,
  fdLength,
  fdPrefetch,
  fdSeekData,
  fdSeekHole,
  fdTruncate,
} from "./fd_ops.ts";
import { PageCacheShortcut } from "./page_cache.ts";

const EINTR = 4;
const EAGAIN = 11;

let shared: Ring | undefined;
let sharedUsers = 0;
let lastClose: Promise<void> = Promise.resolve();

/**
 * The process-wide ring, set up on first use; every engine holds a reference and the last one
 * to close closes the ring. Throws an IoUringUnavailableError when io_uring cannot be used.
 */
function acquireRing(): Ring {
  shared ??= new Ring();
  sharedUsers++;
  return shared;
}

function releaseRing(ring: Ring): void {
  if (ring !== shared) return;
  if (--sharedUsers > 0) return;
  shared = undefined;
  lastClose = ring.close();
}

/** Resolves once the last released shared ring is fully closed (for tests and clean exits). */
export function sharedRingClosed(): Promise<void> {
  return lastClose;
}

export interface UringOptions extends OpenOptions {
  /** Use this ring instead of the shared one (it is not closed with the engine). */
  readonly ring?: Ring;
  /**
   * Serve page-cache hits and small writes synchronously before using the ring (default true;
   * false only to measure the ring alone).
   */
  readonly shortcuts?: boolean;
}

export class UringFileEngine implements FileEngine {
  readonly path: string;
  readonly fd: number;
  readonly #ring: Ring;
  readonly #ownsRing: boolean;
  readonly #cache: PageCacheShortcut;
  #closed = false;
  /** Ring operations naming this.fd that have not completed (see close). */
  #inRing = 0;

  /** Throws an IoUringUnavailableError (ffi/io_uring.ts) when io_uring cannot be set up. */
  constructor(path: string, options: UringOptions) {
    this.path = path;
    this.#ownsRing = options.ring === undefined;
    this.#ring = options.ring ?? acquireRing();
    try {
      const flags = (options.writable ? O_RDWR : O_RDONLY) | (options.direct ? O_DIRECT : 0);
      this.fd = options.fd ?? openFile(path, flags);
    } catch (e) {
      if (this.#ownsRing) releaseRing(this.#ring);
      throw e;
    }
    this.#cache = new PageCacheShortcut(this.fd, !options.direct && options.shortcuts !== false);
  }

  async pread(buf: Uint8Array, offset: number): Promise<number> {
    // A page-cache hit costs less as one synchronous preadv2 than as a ring round trip at queue
    // depth 1, and about the same at depth; misses go to the ring (engine_bench.ts).
    let done = this.#cache.read(buf, offset);
    if (done === buf.length) return done;
    if (done < 0) done = 0;
    while (done < buf.length) {
      const part = done === 0 ? buf : buf.subarray(done);
      this.#inRing++;
      const n = await this.#ring.read(this.fd, part, offset + done);
      this.#settled();
      if (n < 0) {
        if (n === -EINTR || n === -EAGAIN) continue;
        throw errnoError(`pread '${this.path}' at ${offset + done}+${part.length}`, -n);
      }
      if (n === 0) break; // end of file
      done += n;
    }
    return done;
  }

  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    // ext4 cannot take a buffered write without blocking, so io_uring hands it to a kernel
    // worker: a small one is cheaper done here (engine_bench.ts).
    let done = this.#cache.write(buf, offset);
    if (done === buf.length) return;
    if (done < 0) done = 0;
    while (done < buf.length) {
      const part = done === 0 ? buf : buf.subarray(done);
      this.#inRing++;
      const n = await this.#ring.write(this.fd, part, offset + done);
      this.#settled();
      if (n < 0) {
        if (n === -EINTR || n === -EAGAIN) continue;
        throw errnoError(`pwrite '${this.path}' at ${offset + done}+${part.length}`, -n);
      }
      // A regular file never accepts nothing; do not loop on it.
      if (n === 0) throw errnoError(`pwrite '${this.path}' at ${offset + done}`, Errno.EIO);
      done += n;
    }
  }

  async sync(): Promise<void> {
    this.#inRing++;
    const r = await this.#ring.fsync(this.fd, true);
    this.#settled();
    if (r < 0) throw errnoError(`fdatasync '${this.path}'`, -r);
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
    if (this.#inRing === 0) this.#release();
  }

  /**
   * The descriptor is closed only once no operation naming it is left in the ring: one still
   * queued for submission would otherwise reach a closed fd, or a reused one (another file).
   */
  #release(): void {
    libc().close(this.fd);
    if (this.#ownsRing) releaseRing(this.#ring);
  }

  /** One ring operation of this engine completed (ring operations never reject). */
  #settled(): void {
    if (--this.#inRing === 0 && this.#closed) this.#release();
  }

  async #fallocate(mode: number, offset: number, length: number): Promise<void> {
    if (length === 0) return;
    this.#inRing++;
    const r = await this.#ring.fallocate(this.fd, mode, offset, length);
    this.#settled();
    if (r === 0) return;
    throw fallocateError(this.path, mode, offset, length, -r);
  }
}
