/**
 * The `copy-on-read` filter (qemu's block/copy-on-read.c with block/io.c's
 * `bdrv_co_do_copy_on_readv`, `--image-opts driver=copy-on-read,...`): a read of data the top
 * image does not hold itself is written into the top image as it is read, so the backing chain
 * is pulled up cluster by cluster.
 *
 * qemu's rules, matched here: the read is widened to whole clusters of the top image; every run
 * of it not allocated in the top image (allocation depth != 1: in a backing file, or nowhere) is
 * read, then written to the top image — as a zero request (no unmap) when it is all zeroes, as
 * data otherwise; runs the top image holds are read directly. Over NBD a structured read only
 * reaches here for data extents (the session answers zero extents with holes without reading),
 * so, as with qemu-nbd, ranges that read as zeroes everywhere are not copied by reads; CACHE
 * copies its whole range. COR requests and writes through the filter are serialised per
 * cluster (qemu marks COR requests serialising), so a copy never overwrites a newer write.
 * With `bottom`, only reads of data allocated in the backing files down to that depth are
 * copied (qemu's `bottom` node). A read-only node is refused, as qemu refuses it.
 *
 * @module
 */

import { KeyedLocks } from "../qcow2/sync.ts";
import {
  type BlockDevice,
  BlockError,
  Errno,
  ExtentList,
  Filter,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";

/** Options of {@link CopyOnReadFilter}. */
export interface CopyOnReadOptions {
  /** Cluster size of the top image: the copy granularity (qemu's `bdrv_round_to_clusters`). */
  readonly clusterSize: number;
  /**
   * qemu's `bottom`: the allocation depth of the lowest backing image whose data is copied
   * (2 = the top image's own backing file). Absent: the whole chain, and unallocated ranges.
   */
  readonly bottom?: number;
}

/** qemu's MAX_BOUNCE_BUFFER: the largest run copied with one read and one write. */
const MAX_BOUNCE = 32768 * 512;
/** Depth runs gathered per query. */
const DEPTH_BATCH = 1024;

export class CopyOnReadFilter extends Filter {
  readonly #cs: number;
  readonly #bottom: number | undefined;
  readonly #locks = new KeyedLocks();

  constructor(next: BlockDevice, options: CopyOnReadOptions) {
    if (!next.caps.writable) throw new BlockError(Errno.EPERM, "Block node is read-only");
    if (next.allocationDepth === undefined) {
      throw new BlockError(Errno.ENOTSUP, "copy-on-read needs a format with allocation status");
    }
    if (!(options.clusterSize > 0)) {
      throw new BlockError(Errno.EINVAL, `invalid cluster size ${options.clusterSize}`);
    }
    super(next);
    this.#cs = options.clusterSize;
    this.#bottom = options.bottom;
  }

  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    if (buf.length === 0) return;
    if (this.#bottom === undefined) return await this.#copyOnRead(buf, offset, false);
    // With a bottom node, qemu flags only the runs allocated in the chain above it.
    const runs = await this.#depths(offset, buf.length);
    for (let i = 0; i < runs.length; i += 2) {
      const at = runs[i]!, depth = runs[i + 1]!;
      const stop = i + 2 < runs.length ? runs[i + 2]! : offset + buf.length;
      const part = buf.subarray(at - offset, stop - offset);
      if (depth >= 2 && depth <= this.#bottom) await this.#copyOnRead(part, at, false);
      else await this.next.pread(part, at);
    }
  }

  /** NBD_CMD_CACHE: qemu-nbd prefetches with copy-on-read, so the range is copied, not read out. */
  override async cache(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    await this.#copyOnRead(undefined, offset, true, length);
  }

  override async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    const release = await this.#lock(offset, buf.length);
    try {
      await this.next.pwrite(buf, offset, flags);
    } finally {
      release();
    }
  }

  override async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const release = await this.#lock(offset, length);
    try {
      await this.next.zero(offset, length, flags);
    } finally {
      release();
    }
  }

  override async trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    const release = await this.#lock(offset, length);
    try {
      await this.next.trim(offset, length, flags);
    } finally {
      release();
    }
  }

  #lock(offset: number, length: number): Promise<() => void> {
    const first = Math.floor(offset / this.#cs);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.#cs);
    return this.#locks.acquire(first, last);
  }

  /** Allocation depth runs of `[offset, offset+length)` as flat (start, depth) pairs. */
  async #depths(offset: number, length: number): Promise<number[]> {
    const out: number[] = [];
    const end = offset + length;
    // Bounded: every round covers at least one byte (or stops).
    for (let pos = offset, round = 0; pos < end && round < length; round++) {
      const list = new ExtentList(DEPTH_BATCH);
      await this.next.allocationDepth!(pos, end - pos, list);
      if (list.total === 0) break;
      const p = list.pairs;
      for (let i = 0; i < p.length && pos < end; i += 2) {
        const n = Math.min(p[i]!, end - pos);
        if (out.length === 0 || out[out.length - 1] !== p[i + 1]!) out.push(pos, p[i + 1]!);
        pos += n;
      }
    }
    return out;
  }

  /**
   * qemu's `bdrv_co_do_copy_on_readv`: widen `[offset, offset+length)` to clusters, copy every
   * run the top image does not hold, and fill `buf` (absent for a prefetch).
   */
  async #copyOnRead(
    buf: Uint8Array | undefined,
    offset: number,
    prefetch: boolean,
    length = buf?.length ?? 0,
  ): Promise<void> {
    const cs = this.#cs, end = offset + length;
    const a = offset - (offset % cs);
    const b = Math.min(Math.ceil(end / cs) * cs, this.size);
    const release = await this.#lock(a, b - a);
    try {
      const runs = await this.#depths(a, b - a);
      for (let i = 0; i < runs.length; i += 2) {
        const start = runs[i]!, depth = runs[i + 1]!;
        const stop = i + 2 < runs.length ? runs[i + 2]! : b;
        if (depth === 1) {
          // Held by the top image: read directly (nothing to do for a prefetch).
          const from = Math.max(start, offset), to = Math.min(stop, end);
          if (!prefetch && buf !== undefined && to > from) {
            await this.next.pread(buf.subarray(from - offset, to - offset), from);
          }
          continue;
        }
        for (let pos = start; pos < stop;) {
          const n = Math.min(stop - pos, MAX_BOUNCE);
          await this.#copy(buf, offset, end, pos, n);
          pos += n;
        }
      }
    } finally {
      release();
    }
  }

  /** Copy `[pos, pos+n)` up into the top image; the part inside the request goes to `buf`. */
  async #copy(
    buf: Uint8Array | undefined,
    offset: number,
    end: number,
    pos: number,
    n: number,
  ): Promise<void> {
    const bounce = new Uint8Array(n);
    await this.next.pread(bounce, pos);
    // Not a guest write: no FUA (qemu: BDRV_REQ_WRITE_UNCHANGED, no flush needed).
    if (isZero(bounce)) await this.next.zero(pos, n, { noHole: true });
    else await this.next.pwrite(bounce, pos, {});
    if (buf === undefined) return;
    const from = Math.max(pos, offset), to = Math.min(pos + n, end);
    if (to > from) buf.set(bounce.subarray(from - pos, to - pos), from - offset);
  }
}

function isZero(b: Uint8Array): boolean {
  // Word-wise where the view is aligned; the tail byte by byte.
  const words = b.byteOffset % 4 === 0 ? Math.floor(b.length / 4) : 0;
  const w = new Uint32Array(b.buffer, b.byteOffset, words);
  for (let i = 0; i < words; i++) if (w[i] !== 0) return false;
  for (let i = words * 4; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/**
 * qemu-nbd answers NBD_CMD_CACHE on an image with a backing file by prefetching with
 * copy-on-read (BDRV_REQ_COPY_ON_READ | BDRV_REQ_PREFETCH), even without the copy-on-read
 * filter: the range ends up allocated in the top image. Read-only, that needs write permission
 * it does not have, and every CACHE fails with EPERM. Reads and writes are unchanged; writes go
 * through the copier so a copy never overwrites newer data.
 */
export class PrefetchCopyFilter extends Filter {
  readonly #dev: BlockDevice;
  readonly #writable: boolean;

  constructor(dev: BlockDevice, clusterSize: number) {
    const writable = dev.caps.writable;
    super(writable ? new CopyOnReadFilter(dev, { clusterSize }) : dev);
    this.#dev = dev;
    this.#writable = writable;
  }

  override pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.#dev.pread(buf, offset);
  }

  override cache(offset: number, length: number): Promise<void> {
    if (!this.#writable) {
      return Promise.reject(new BlockError(Errno.EPERM, "Operation not permitted"));
    }
    return this.next.cache(offset, length);
  }
}

/** Wraps a top qcow2 image that has a backing file in {@linkcode PrefetchCopyFilter}. */
export function withPrefetchCopy(dev: BlockDevice): BlockDevice {
  const q = dev as { hasBacking?: boolean; clusterSize?: number };
  if (q.hasBacking !== true || q.clusterSize === undefined || dev.allocationDepth === undefined) {
    return dev;
  }
  return new PrefetchCopyFilter(dev, q.clusterSize);
}
