/**
 * The Linux AIO file engine (`--aio=native`, qemu's aio=native): reads and writes go through one
 * Linux AIO context per thread (ffi/linux_aio.ts), a tick's worth in one io_submit, completions
 * reaped without blocking the event loop. It needs no io_uring, so it works where io_uring is
 * disabled (DENBD_IO_URING_DISABLE included).
 *
 * Linux AIO is asynchronous only under O_DIRECT, so this engine always runs inside the O_DIRECT
 * engine (direct_engine.ts), which hands it aligned bounce buffers, offsets and lengths; the
 * factory (engine_factory.ts) refuses native AIO without --cache=none|directsync as qemu-nbd does.
 *
 * What Linux AIO lacks goes where the thread engine would send it: fdatasync and fallocate to
 * Deno's blocking pool, length/truncate/seek/prefetch as synchronous libc calls (qemu also
 * flushes and discards through its thread pool under aio=native). A read or write the kernel
 * would have had to sleep for inside io_submit comes back -EAGAIN (RWF_NOWAIT) and is done on
 * the blocking pool instead: a write into a hole, say, that needs blocks allocated.
 *
 * @module
 */

import { AioContext } from "../../ffi/linux_aio.ts";
import { errnoError, libc, O_DIRECT, O_RDONLY, O_RDWR, openFile } from "../../ffi/libc.ts";
import { Errno } from "../errors.ts";
import { type FileEngine, type OpenOptions, ThreadFileEngine } from "./file_engine.ts";

const EINTR = 4;
const EAGAIN = 11;

let shared: AioContext | undefined;
let sharedUsers = 0;
let lastClose: Promise<void> = Promise.resolve();

/**
 * This thread's context, set up on first use; every engine holds a reference and the last one
 * to close closes it. Throws a LinuxAioUnavailableError when io_setup is refused.
 */
function acquireContext(): AioContext {
  shared ??= new AioContext();
  sharedUsers++;
  return shared;
}

function releaseContext(ctx: AioContext): void {
  if (ctx !== shared) return;
  if (--sharedUsers > 0) return;
  shared = undefined;
  lastClose = ctx.close();
}

/** Resolves once the last released shared context is fully closed (for tests and clean exits). */
export function sharedAioContextClosed(): Promise<void> {
  return lastClose;
}

export interface AioOptions extends OpenOptions {
  /** Use this context instead of the shared one (it is not closed with the engine). */
  readonly context?: AioContext;
}

/** Where this thread's reads and writes went, over every engine (for tests and measurements). */
export const aioStats = {
  /** Operations completed through Linux AIO. */
  aio: 0,
  /** Operations sent to the blocking pool after an -EAGAIN (RWF_NOWAIT) completion. */
  fallback: 0,
};

export class AioFileEngine implements FileEngine {
  readonly path: string;
  readonly fd: number;
  readonly #ctx: AioContext;
  readonly #ownsContext: boolean;
  /** The same descriptor through the thread engine: fallbacks and what AIO cannot do. */
  readonly #threads: ThreadFileEngine;
  #closed = false;
  /** Operations naming this.fd that have not completed (see close). */
  #busy = 0;

  /**
   * Opens `path` with O_DIRECT unless `options.fd` is given (then owned by the engine). Throws a
   * LinuxAioUnavailableError (ffi/linux_aio.ts) when Linux AIO cannot be set up.
   */
  constructor(path: string, options: AioOptions) {
    this.path = path;
    this.#ownsContext = options.context === undefined;
    this.#ctx = options.context ?? acquireContext();
    try {
      this.fd = options.fd ?? openFile(path, (options.writable ? O_RDWR : O_RDONLY) | O_DIRECT);
    } catch (e) {
      if (this.#ownsContext) releaseContext(this.#ctx);
      throw e;
    }
    this.#threads = new ThreadFileEngine(path, {
      writable: options.writable,
      direct: true,
      fd: this.fd,
    });
  }

  /** `buf` and `offset` must suit O_DIRECT (direct_engine.ts makes them). */
  async pread(buf: Uint8Array, offset: number): Promise<number> {
    this.#busy++;
    try {
      let done = 0;
      while (done < buf.length) {
        const part = done === 0 ? buf : buf.subarray(done);
        const n = await this.#ctx.read(this.fd, part, offset + done);
        if (n === -EAGAIN) {
          aioStats.fallback++;
          return done + await this.#threads.pread(part, offset + done);
        }
        if (n === -EINTR) continue;
        if (n < 0) {
          throw errnoError(`pread '${this.path}' at ${offset + done}+${part.length}`, -n);
        }
        aioStats.aio++;
        done += n;
        // O_DIRECT reads come back short only at end of file (and reading on from an unaligned
        // end would be refused with EINVAL).
        if (n < part.length) break;
      }
      return done;
    } finally {
      this.#settled();
    }
  }

  /** `buf` and `offset` must suit O_DIRECT (direct_engine.ts makes them). */
  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    this.#busy++;
    try {
      let done = 0;
      while (done < buf.length) {
        const part = done === 0 ? buf : buf.subarray(done);
        const n = await this.#ctx.write(this.fd, part, offset + done);
        if (n === -EAGAIN) {
          aioStats.fallback++;
          return await this.#threads.pwrite(part, offset + done);
        }
        if (n === -EINTR) continue;
        if (n < 0) {
          throw errnoError(`pwrite '${this.path}' at ${offset + done}+${part.length}`, -n);
        }
        // A regular file never accepts nothing; do not loop on it.
        if (n === 0) throw errnoError(`pwrite '${this.path}' at ${offset + done}`, Errno.EIO);
        aioStats.aio++;
        done += n;
      }
    } finally {
      this.#settled();
    }
  }

  sync(): Promise<void> {
    return this.#onThreads(() => this.#threads.sync());
  }

  length(): number {
    return this.#threads.length();
  }

  truncate(length: number): void {
    this.#threads.truncate(length);
  }

  punchHole(offset: number, length: number): Promise<void> {
    return this.#onThreads(() => this.#threads.punchHole(offset, length));
  }

  zeroRange(offset: number, length: number): Promise<void> {
    return this.#onThreads(() => this.#threads.zeroRange(offset, length));
  }

  seekData(offset: number): number {
    return this.#threads.seekData(offset);
  }

  seekHole(offset: number): number {
    return this.#threads.seekHole(offset);
  }

  prefetch(offset: number, length: number): void {
    this.#threads.prefetch(offset, length);
  }

  /**
   * The descriptor is closed once no operation naming it is left in the kernel or on the
   * blocking pool: it could otherwise reach a closed fd, or a reused one (another file).
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#busy === 0) this.#release();
  }

  async #onThreads(op: () => Promise<void>): Promise<void> {
    this.#busy++;
    try {
      await op();
    } finally {
      this.#settled();
    }
  }

  #settled(): void {
    if (--this.#busy === 0 && this.#closed) this.#release();
  }

  #release(): void {
    libc().close(this.fd);
    if (this.#ownsContext) releaseContext(this.#ctx);
  }
}
