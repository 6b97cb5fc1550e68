/**
 * The `compress` filter (qemu's block/filter-compress.c, `--image-opts driver=compress,...`):
 * every write becomes a compressed write of whole clusters into the format below (qcow2).
 *
 * qemu sets the filter's request alignment to the cluster size, so its block layer pads every
 * unaligned request: the head and tail clusters are read, merged with the data and written
 * whole (compressed). Write-zeroes keeps its aligned middle as a zero request and writes the
 * padded head/tail clusters as compressed data; discard drops partial clusters. Since a
 * compressed write into an allocated cluster fails (EIO, qemu's rule), a second unaligned write
 * into the same cluster fails too, exactly as through qemu-nbd. The alignment is advertised as
 * the minimum block size (nbdinfo: block_size_minimum = preferred = cluster size).
 *
 * @module
 */

import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  Filter,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";

/** A format that can store whole clusters compressed (qemu's `bdrv_co_pwritev_compressed`). */
export interface CompressedWriter {
  /** Allocation unit of compressed writes, in bytes. */
  readonly clusterSize: number;
  /**
   * Write `buf` at `offset` compressed: offset cluster-aligned, whole clusters (or up to the end
   * of the image), else EINVAL.
   */
  pwriteCompressed(buf: Uint8Array, offset: number): Promise<void>;
}

/** True when `dev` can take compressed writes (qemu's `block_driver_can_compress`). */
export function canCompress(dev: BlockDevice): dev is BlockDevice & CompressedWriter {
  const d = dev as Partial<CompressedWriter>;
  return typeof d.pwriteCompressed === "function" && typeof d.clusterSize === "number";
}

/** Largest unaligned request handled with one bounce buffer (NBD caps writes at 32 MiB). */
const MAX_PADDED = 64 * 1024 * 1024;

export class CompressFilter extends Filter {
  readonly #dev: BlockDevice & CompressedWriter;
  readonly #cs: number;
  readonly #caps: Capabilities;

  /**
   * Wrap a device that supports compressed writes. `format` names the driver below for the
   * error qemu gives when it cannot compress. A writable device whose size is not a multiple of
   * the cluster size is refused as qemu refuses it (the filter cannot resize).
   */
  constructor(next: BlockDevice, format = "(no format)") {
    if (!canCompress(next)) {
      throw new BlockError(
        Errno.ENOTSUP,
        `Compression is not supported for underlying format: ${format}`,
      );
    }
    super(next);
    this.#dev = next;
    this.#cs = next.clusterSize;
    if (next.caps.writable && next.size % this.#cs !== 0) {
      throw new BlockError(
        Errno.EPERM,
        "Cannot get 'write' permission without 'resize': Image size is not a multiple of request alignment",
      );
    }
    this.#caps = { ...next.caps, minBlock: Math.max(next.caps.minBlock, this.#cs) };
  }

  override get caps(): Capabilities {
    return this.#caps;
  }

  override async pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    const cs = this.#cs, end = offset + buf.length;
    if (buf.length === 0) return;
    const a = offset - (offset % cs);
    const b = Math.min(Math.ceil(end / cs) * cs, this.size);
    if (a === offset && b === end) return await this.#dev.pwriteCompressed(buf, offset);
    await this.#dev.pwriteCompressed(await this.#padded(buf, offset, a, b), a);
  }

  /** `buf` at `offset` merged into the clusters `[a, b)` read around it (qemu's RMW padding). */
  async #padded(buf: Uint8Array, offset: number, a: number, b: number): Promise<Uint8Array> {
    const cs = this.#cs, end = offset + buf.length;
    if (b - a > MAX_PADDED) {
      throw new BlockError(Errno.EINVAL, `compressed write of ${buf.length} bytes is too large`);
    }
    const out = new Uint8Array(b - a);
    const reads: Promise<void>[] = [];
    if (a < offset) reads.push(this.next.pread(out.subarray(0, Math.min(cs, b - a)), a));
    const tailStart = b - (b % cs === 0 ? cs : b % cs);
    if (end < b && (tailStart >= a + cs || a === offset)) {
      reads.push(this.next.pread(out.subarray(tailStart - a), tailStart));
    }
    await Promise.all(reads);
    out.set(buf, offset - a);
    return out;
  }

  override async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const cs = this.#cs, end = offset + length;
    if (length === 0) return;
    const a = Math.ceil(offset / cs) * cs;
    let b = end === this.size ? end : end - (end % cs);
    if (b < a) b = a;
    const headless = a === offset || a > end;
    if (!(a === offset && b === end) && flags.fastZero) {
      // Partial clusters need a data write: a fast zero cannot promise that.
      throw new BlockError(Errno.ENOTSUP, "zeroing part of a compressed-write cluster");
    }
    if (a > end || (a === b && !headless)) {
      // Head and tail are one cluster: one padded write covers it.
      return await this.pwrite(new Uint8Array(length), offset, flags);
    }
    if (offset < a) await this.pwrite(new Uint8Array(a - offset), offset, flags);
    if (b > a) await this.next.zero(a, b - a, flags);
    if (b < end) await this.pwrite(new Uint8Array(end - b), b, flags);
  }

  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    // Discard is advice: qemu drops the partial clusters at either end.
    const cs = this.#cs, end = offset + length;
    const a = Math.ceil(offset / cs) * cs;
    const b = end === this.size ? end : end - (end % cs);
    if (b <= a) return Promise.resolve();
    return this.next.trim(a, b - a, flags);
  }
}
