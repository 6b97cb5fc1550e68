/**
 * qemu's `null-co` / `null-aio` protocol drivers: a disk of `size` bytes (default 1 GiB) that
 * discards writes. Reads return zeroes (qemu leaves the buffer untouched unless `read-zeroes=on`;
 * a fresh NBD reply buffer is zeroes there too), and block status says "hole", plus "zero" with
 * `read-zeroes=on`, as qemu-nbd reports them.
 *
 * @module
 */

import {
  type BlockDevice,
  type Capabilities,
  type ExtentList,
  STATE_HOLE,
  STATE_ZERO,
} from "../types.ts";

export interface NullOptions {
  /** Bytes; qemu rounds the length up to whole 512-byte sectors. */
  readonly size: number;
  readonly readZeroes: boolean;
  /** qemu's `latency-ns`: every request completes after this delay. */
  readonly latencyNs: number;
  readonly writable: boolean;
}

export class NullDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #zeroes: boolean;
  readonly #delayMs: number;

  constructor(options: NullOptions) {
    this.size = Math.ceil(options.size / 512) * 512;
    this.#zeroes = options.readZeroes;
    this.#delayMs = options.latencyNs / 1e6;
    this.caps = {
      writable: options.writable,
      flush: true,
      trim: options.writable,
      zero: options.writable,
      fastZero: options.writable,
      extents: true,
      minBlock: 1,
    };
  }

  #done(): Promise<void> {
    if (this.#delayMs <= 0) return Promise.resolve();
    return new Promise((r) => setTimeout(r, this.#delayMs));
  }

  pread(buf: Uint8Array): Promise<void> {
    buf.fill(0);
    return this.#done();
  }
  pwrite(): Promise<void> {
    return this.#done();
  }
  flush(): Promise<void> {
    return this.#done();
  }
  trim(): Promise<void> {
    return this.#done();
  }
  zero(): Promise<void> {
    return this.#done();
  }
  cache(): Promise<void> {
    return Promise.resolve();
  }
  extents(_offset: number, length: number, out: ExtentList): Promise<void> {
    out.add(length, STATE_HOLE | (this.#zeroes ? STATE_ZERO : 0));
    return Promise.resolve();
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}
