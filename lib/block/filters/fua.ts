/**
 * FUA emulation for layers with no native force-unit-access: the write, then a flush, as qemu's
 * block layer does for file-posix.
 *
 * @module
 */

import { type FileRange, Filter, type WriteFlags, type ZeroFlags } from "../types.ts";

export class FuaEmulationFilter extends Filter {
  override async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    await this.next.pwrite(buf, offset, flags);
    if (flags.fua) await this.next.flush();
  }
  /** A plain write passes through unchanged (FUA writes never take writeRange). */
  override writeRange(offset: number, length: number): FileRange | undefined {
    return this.next.writeRange?.(offset, length);
  }
  override async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.next.zero(offset, length, flags);
    if (flags.fua) await this.next.flush();
  }
  override async trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    await this.next.trim(offset, length, flags);
    if (flags.fua) await this.next.flush();
  }
}
