/**
 * Discard policy (--discard). With `ignore` (qemu-nbd's default) TRIM succeeds and does nothing,
 * and WRITE_ZEROES never deallocates (qemu drops BDRV_REQ_MAY_UNMAP). With `unmap` requests pass
 * through and the driver may punch holes.
 *
 * @module
 */

import { Filter, type WriteFlags, type ZeroFlags } from "../types.ts";

export class DiscardIgnoreFilter extends Filter {
  override trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.resolve();
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.next.zero(offset, length, { ...flags, noHole: true });
  }
}
