/**
 * O_DIRECT file engine (qemu's cache.direct=on: --cache=none and --cache=directsync).
 *
 * O_DIRECT needs offsets, lengths and buffer addresses aligned to the device's logical block
 * size. Clients may send any alignment (qemu accepts them too), so every transfer goes through an
 * aligned bounce buffer; unaligned writes are read-modify-write of the covering blocks. Writes
 * whose block ranges overlap are serialised, so a read-modify-write can never undo a concurrent
 * write to the same block (qemu's "serialising requests").
 *
 * @module
 */

import { errno, libc, O_DIRECT, O_RDONLY, O_RDWR, openFile } from "../../ffi/libc.ts";
import { type FileEngine, ThreadFileEngine } from "./file_engine.ts";

/** Bounce buffers larger than this are split into several transfers. */
const MAX_BOUNCE = 4 * 1024 * 1024;

/** A buffer of `size` bytes whose address is a multiple of `align`. */
export function alignedBuffer(size: number, align: number): Uint8Array {
  const raw = new Uint8Array(size + align);
  const addr = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(raw)));
  const pad = (align - (addr % align)) % align;
  return raw.subarray(pad, pad + size);
}

/**
 * The smallest alignment O_DIRECT accepts on this file: 512 where the device allows it, else
 * 4096 (what qemu's probe finds on common hardware).
 */
export function probeDirectAlignment(fd: number): number {
  for (const align of [512, 4096]) {
    const buf = alignedBuffer(align, 4096);
    const r = Number(libc().pread(fd, buf, BigInt(align), 0n));
    if (r >= 0) return align;
    if (errno() !== 22) return 4096; // not an alignment problem: assume the safe value
  }
  return 4096;
}

interface Range {
  readonly start: number;
  readonly end: number;
  readonly done: Promise<void>;
}

export interface DirectOptions {
  /**
   * The engine that moves the aligned transfers, given the O_DIRECT descriptor (which it then
   * owns); the thread engine by default.
   */
  readonly inner?: (fd: number) => FileEngine;
}

export class DirectFileEngine implements FileEngine {
  readonly path: string;
  readonly fd: number;
  /** Required alignment of offsets, lengths and buffer addresses. */
  readonly alignment: number;
  readonly #inner: FileEngine;
  readonly #writes = new Set<Range>();

  constructor(path: string, writable: boolean, options: DirectOptions = {}) {
    this.path = path;
    this.fd = openFile(path, (writable ? O_RDWR : O_RDONLY) | O_DIRECT);
    try {
      this.alignment = probeDirectAlignment(this.fd);
      this.#inner = options.inner?.(this.fd) ??
        new ThreadFileEngine(path, { writable, direct: true, fd: this.fd });
    } catch (e) {
      libc().close(this.fd);
      throw e;
    }
  }

  async pread(buf: Uint8Array, offset: number): Promise<number> {
    const a = this.alignment;
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const start = pos - (pos % a);
      const want = Math.min(buf.length - done, MAX_BOUNCE - (pos - start));
      const end = roundUp(pos + want, a);
      const bounce = alignedBuffer(end - start, a);
      const n = await this.#inner.pread(bounce, start);
      const avail = Math.max(0, Math.min(n - (pos - start), want));
      buf.set(bounce.subarray(pos - start, pos - start + avail), done);
      done += avail;
      if (avail < want) break; // end of file
    }
    return done;
  }

  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    const a = this.alignment;
    const start = offset - (offset % a);
    const end = roundUp(offset + buf.length, a);
    const release = await this.#lock(start, end);
    try {
      for (let blockStart = start; blockStart < end; blockStart += MAX_BOUNCE) {
        const blockEnd = Math.min(end, blockStart + MAX_BOUNCE);
        const bounce = alignedBuffer(blockEnd - blockStart, a);
        const from = Math.max(offset, blockStart);
        const to = Math.min(offset + buf.length, blockEnd);
        // Partial first or last block: fetch what is there first.
        if (from > blockStart || to < blockEnd) {
          const n = await this.#inner.pread(bounce, blockStart);
          bounce.fill(0, Math.max(0, n));
        }
        bounce.set(buf.subarray(from - offset, to - offset), from - blockStart);
        await this.#inner.pwrite(bounce, blockStart);
      }
    } finally {
      release();
    }
  }

  sync(): Promise<void> {
    return this.#inner.sync();
  }
  length(): number {
    return this.#inner.length();
  }
  truncate(length: number): void {
    this.#inner.truncate(length);
  }
  async punchHole(offset: number, length: number): Promise<void> {
    const release = await this.#lock(
      offset - (offset % this.alignment),
      roundUp(offset + length, this.alignment),
    );
    try {
      await this.#inner.punchHole(offset, length);
    } finally {
      release();
    }
  }
  async zeroRange(offset: number, length: number): Promise<void> {
    const release = await this.#lock(
      offset - (offset % this.alignment),
      roundUp(offset + length, this.alignment),
    );
    try {
      await this.#inner.zeroRange(offset, length);
    } finally {
      release();
    }
  }
  seekData(offset: number): number {
    return this.#inner.seekData(offset);
  }
  seekHole(offset: number): number {
    return this.#inner.seekHole(offset);
  }
  prefetch(): void {
    // The page cache is bypassed: nothing to prefetch into.
  }
  close(): void {
    this.#inner.close();
  }

  /** Wait until no write overlaps `[start, end)`, then hold it; returns the release function. */
  async #lock(start: number, end: number): Promise<() => void> {
    for (;;) {
      let blocker: Range | undefined;
      for (const r of this.#writes) {
        if (r.start < end && start < r.end) {
          blocker = r;
          break;
        }
      }
      if (blocker === undefined) break;
      await blocker.done;
    }
    let release!: () => void;
    const range: Range = { start, end, done: new Promise<void>((resolve) => release = resolve) };
    this.#writes.add(range);
    return () => {
      this.#writes.delete(range);
      release();
    };
  }
}

function roundUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}
