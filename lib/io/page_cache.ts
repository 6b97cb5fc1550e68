/**
 * Synchronous page-cache shortcuts shared by the thread and io_uring engines: a read that the
 * page cache can serve is a memcpy (~1.5 us for 4 KiB), and a small buffered write is a copy into
 * it; doing either on the event-loop thread beats any asynchronous path (a pool hop, or an
 * io_uring write that ext4 hands to a kernel worker). scripts/engine_bench.ts measures both.
 *
 * @module
 */

import { EAGAIN, errno, libc, RWF_NOWAIT } from "../../ffi/libc.ts";

/** Largest write done on the event-loop thread. */
const INLINE_WRITE_MAX = 64 * 1024;
/** An inline write slower than this backs off (see {@link PageCacheShortcut.write}). */
const SLOW_WRITE_MS = 1;
const MIN_BACKOFF_MS = 16;
const MAX_BACKOFF_MS = 1000;

export class PageCacheShortcut {
  readonly #fd: number;
  #nowait: boolean;
  readonly #backoff = new InlineWriteBackoff();
  readonly #iov = new BigUint64Array(2);
  readonly #iovBytes = new Uint8Array(this.#iov.buffer);

  /** `enabled` is false under O_DIRECT, where the page cache is bypassed. */
  constructor(fd: number, enabled: boolean) {
    this.#fd = fd;
    this.#nowait = enabled;
  }

  /**
   * preadv2(RWF_NOWAIT): whatever the page cache holds, without waiting for the disk. Returns the
   * bytes read, 0 at end of file, or -1 when nothing is cached (the caller reads it another way).
   */
  read(buf: Uint8Array, offset: number): number {
    if (!this.#nowait || buf.length === 0) return -1;
    const n = Number(libc().preadv2(this.#fd, this.#vector(buf), 1, BigInt(offset), RWF_NOWAIT));
    if (n >= 0) return n;
    // Kernels or filesystems without RWF_NOWAIT say EOPNOTSUPP/EINVAL: stop trying.
    if (errno() !== EAGAIN) this.#nowait = false;
    return -1;
  }

  /**
   * A small buffered write on this thread (~3 us for 4 KiB, far less CPU than a pool hop or an
   * io_uring write, which ext4 hands to a kernel worker). A write can stall the event loop under
   * dirty-page throttling, so one that takes over 1 ms sends writes the other way for a while:
   * 16 ms after an isolated slow write (on 2 cores that is mostly the scheduler preempting this
   * thread), doubling up to 1 s while slow writes keep coming within 2 s of each other. A stall
   * thus costs at most ~1 ms per back-off period. Returns the bytes written, or -1 when the
   * caller should write it another way (which also reports any error).
   */
  write(buf: Uint8Array, offset: number): number {
    if (!this.#nowait || buf.length > INLINE_WRITE_MAX || buf.length === 0) return -1;
    const start = performance.now();
    if (!this.#backoff.allows(start)) return -1;
    const n = Number(libc().pwritev2(this.#fd, this.#vector(buf), 1, BigInt(offset), 0));
    this.#backoff.record(start, performance.now());
    return n;
  }

  #vector(buf: Uint8Array): Uint8Array {
    this.#iov[0] = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
    this.#iov[1] = BigInt(buf.length);
    return this.#iovBytes;
  }
}

/** When inline writes pause after slow ones (times in ms, as performance.now() gives them). */
export class InlineWriteBackoff {
  #offUntil = -Infinity;
  #lastSlow = -Infinity;
  #period = MIN_BACKOFF_MS;

  /** Whether a write starting at `now` may go inline. */
  allows(now: number): boolean {
    return now >= this.#offUntil;
  }

  /** Record an inline write that ran from `start` to `end`. */
  record(start: number, end: number): void {
    if (end - start <= SLOW_WRITE_MS) return;
    this.#period = end - this.#lastSlow < 2000
      ? Math.min(this.#period * 2, MAX_BACKOFF_MS)
      : MIN_BACKOFF_MS;
    this.#lastSlow = end;
    this.#offUntil = end + this.#period;
  }
}
