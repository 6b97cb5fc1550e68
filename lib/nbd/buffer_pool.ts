/**
 * Reusable I/O buffers for replies and WRITE payloads, so the hot path neither allocates nor
 * zero-fills a fresh buffer per request (allocation and GC were ~16% of a sequential read).
 *
 * Buffers come in power-of-two size classes; `get` returns a view of exactly the size asked
 * for. Contents are NOT zeroed: callers overwrite every byte (block drivers fill all of a read
 * buffer, see BlockDevice.pread). Pooled memory is bounded.
 *
 * @module
 */

const MIN_CLASS = 12; // 4 KiB
const MAX_CLASS = 26; // 64 MiB: a 32 MiB payload plus headers fits
/** Bytes kept in the pool at most; the rest is left to the garbage collector. */
const MAX_POOLED_BYTES = 128 * 1024 * 1024;

export class BufferPool {
  readonly #free: ArrayBuffer[][] = [];
  #pooled = 0;

  constructor() {
    for (let c = 0; c <= MAX_CLASS; c++) this.#free.push([]);
  }

  /** A buffer of exactly `size` bytes (not zeroed). */
  get(size: number): Uint8Array {
    const c = sizeClass(size);
    if (c > MAX_CLASS) return new Uint8Array(size);
    const ab = this.#free[c]!.pop();
    if (ab === undefined) return new Uint8Array(new ArrayBuffer(1 << c), 0, size);
    this.#pooled -= ab.byteLength;
    return new Uint8Array(ab, 0, size);
  }

  /** Return a buffer from `get` once nothing refers to it any more. */
  put(buf: Uint8Array): void {
    const ab = buf.buffer;
    if (!(ab instanceof ArrayBuffer)) return;
    const c = sizeClass(ab.byteLength);
    if (c > MAX_CLASS || ab.byteLength !== 1 << c || buf.byteOffset !== 0) return;
    if (this.#pooled + ab.byteLength > MAX_POOLED_BYTES) return;
    this.#free[c]!.push(ab);
    this.#pooled += ab.byteLength;
  }

  /** Bytes currently held for reuse. */
  get pooledBytes(): number {
    return this.#pooled;
  }
}

function sizeClass(size: number): number {
  if (size <= 1 << MIN_CLASS) return MIN_CLASS;
  return 32 - Math.clz32(size - 1);
}

/** The process-wide pool (JS is single-threaded: no locking needed). */
export const bufferPool = new BufferPool();
