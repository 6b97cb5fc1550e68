/**
 * Protection of block 0 for format-probed raw images (qemu's raw driver does the same): when the
 * format was guessed, a write that would make the first sector look like another image format
 * is refused with EPERM, so a guest cannot turn its disk into, say, a qcow2 header pointing at
 * host files on the next open.
 *
 * @module
 */

import { BlockError, Errno, Filter, type WriteFlags } from "../types.ts";
import { probeFormat } from "../formats.ts";

const PROBE_SIZE = 512;

/**
 * Whether a first sector would be taken for a non-raw image format: qemu's raw driver runs
 * every format's probe over the 512 bytes (with no file name) and refuses anything but raw.
 */
export function looksLikeImageFormat(sector: Uint8Array): boolean {
  return probeFormat(sector.subarray(0, PROBE_SIZE), "") !== "raw";
}

export class ProbeGuardFilter extends Filter {
  override async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    if (offset < PROBE_SIZE && buf.length > 0) {
      // Build the first sector as it would be after this write.
      const sector = new Uint8Array(PROBE_SIZE);
      await this.next.pread(sector, 0);
      const n = Math.min(buf.length, PROBE_SIZE - offset);
      sector.set(buf.subarray(0, n), offset);
      if (looksLikeImageFormat(sector)) {
        throw new BlockError(
          Errno.EPERM,
          "Writing an image format header to block 0 of a probed raw image is not allowed",
        );
      }
    }
    return this.next.pwrite(buf, offset, flags);
  }
}
