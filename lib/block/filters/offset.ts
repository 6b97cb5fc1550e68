/**
 * Offset/size window: exposes `[offset, offset+size)` of the layer below (qemu-nbd -o on a
 * format other than raw, where the raw driver cannot take the offset itself).
 *
 * @module
 */

import {
  type BlockDevice,
  type ExtentList,
  type FileRange,
  Filter,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";

export class OffsetFilter extends Filter {
  readonly #offset: number;
  readonly #size: number;

  constructor(next: BlockDevice, offset: number, size: number | undefined) {
    super(next);
    this.#offset = offset;
    this.#size = size ?? Math.max(0, next.size - offset);
  }
  override get size(): number {
    return this.#size;
  }
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.next.pread(buf, offset + this.#offset);
  }

  override fileRange(offset: number, length: number): FileRange | undefined {
    return this.next.fileRange?.(offset + this.#offset, length);
  }
  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.next.pwrite(buf, offset + this.#offset, flags);
  }
  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.next.trim(offset + this.#offset, length, flags);
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.next.zero(offset + this.#offset, length, flags);
  }
  override cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset + this.#offset, length);
  }
  override extents(offset: number, length: number, out: ExtentList): Promise<void> {
    return this.next.extents(offset + this.#offset, length, out);
  }
  override allocationDepth(offset: number, length: number, out: ExtentList): Promise<void> {
    if (!this.next.allocationDepth) {
      out.add(length, 1);
      return Promise.resolve();
    }
    return this.next.allocationDepth(offset + this.#offset, length, out);
  }
}
