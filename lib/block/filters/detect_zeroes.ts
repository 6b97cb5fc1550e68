/**
 * Detect-zeroes (--detect-zeroes=on|unmap): a write whose data is all zero becomes a
 * WRITE_ZEROES, which may deallocate with `unmap` (qemu allows that only with --discard=unmap,
 * checked on the command line).
 *
 * @module
 */

import { Filter, type WriteFlags } from "../types.ts";

export class DetectZeroesFilter extends Filter {
  readonly #unmap: boolean;

  constructor(next: ConstructorParameters<typeof Filter>[0], unmap: boolean) {
    super(next);
    this.#unmap = unmap;
  }

  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    if (buf.length > 0 && isZero(buf)) {
      return this.next.zero(offset, buf.length, { fua: flags.fua, noHole: !this.#unmap });
    }
    return this.next.pwrite(buf, offset, flags);
  }
}

/** True when every byte of `buf` is zero (checked 8 bytes at a time where aligned). */
export function isZero(buf: Uint8Array): boolean {
  let i = 0;
  const n = buf.length;
  // Unaligned head, then 64-bit words, then the tail.
  while (i < n && (buf.byteOffset + i) % 8 !== 0) if (buf[i++] !== 0) return false;
  const words = Math.floor((n - i) / 8);
  if (words > 0) {
    const w = new BigUint64Array(buf.buffer, buf.byteOffset + i, words);
    for (let k = 0; k < words; k++) if (w[k] !== 0n) return false;
    i += words * 8;
  }
  while (i < n) if (buf[i++] !== 0) return false;
  return true;
}
