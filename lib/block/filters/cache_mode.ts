/**
 * Cache modes that change write semantics (--cache): `writethrough` and `directsync` make every
 * write durable before it completes (qemu turns the write cache off: each write is FUA);
 * `unsafe` ignores flushes and FUA. `writeback` and `none` need no filter.
 *
 * @module
 */

import { Filter, type WriteFlags, type ZeroFlags } from "../types.ts";

export class WriteThroughFilter extends Filter {
  override pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    return this.next.pwrite(buf, offset, { fua: true });
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.next.zero(offset, length, { ...flags, fua: true });
  }
  override trim(offset: number, length: number, _flags: WriteFlags): Promise<void> {
    return this.next.trim(offset, length, { fua: true });
  }
}

export class UnsafeCacheFilter extends Filter {
  override pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    return this.next.pwrite(buf, offset, {});
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.next.zero(offset, length, { ...flags, fua: false });
  }
  override trim(offset: number, length: number, _flags: WriteFlags): Promise<void> {
    return this.next.trim(offset, length, {});
  }
  override flush(): Promise<void> {
    return Promise.resolve();
  }
}
