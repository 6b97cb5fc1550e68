/**
 * Protection of block 0 for format-probed raw images (qemu's raw driver does the same): when the
 * format was guessed, a write that would make the first sector look like another image format
 * is refused with EPERM, so a guest cannot turn its disk into, say, a qcow2 header pointing at
 * host files on the next open.
 *
 * @module
 */

import { BlockError, Errno, Filter, type WriteFlags } from "../types.ts";

const PROBE_SIZE = 512;

/** Magic strings of formats qemu would probe from the first sector. */
const MAGICS: readonly Uint8Array[] = [
  [0x51, 0x46, 0x49, 0xfb], // qcow / qcow2 "QFI\xfb"
  [0x4b, 0x44, 0x4d, 0x56], // vmdk "KDMV"
  [0x51, 0x45, 0x44, 0x00], // qed "QED\0"
  [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe], // luks
  [0x63, 0x6f, 0x6e, 0x65, 0x63, 0x74, 0x69, 0x78], // vpc "conectix"
  [0x76, 0x68, 0x64, 0x78, 0x66, 0x69, 0x6c, 0x65], // vhdx "vhdxfile"
].map((m) => new Uint8Array(m));

/** Whether a first sector would be taken for a non-raw image format. */
export function looksLikeImageFormat(sector: Uint8Array): boolean {
  for (const m of MAGICS) {
    if (sector.length >= m.length && m.every((b, i) => sector[i] === b)) return true;
  }
  // vdi keeps its signature at byte 64.
  if (sector.length >= 68) {
    const v = new DataView(sector.buffer, sector.byteOffset, sector.byteLength);
    if (v.getUint32(64, true) === 0xbeda107f) return true;
  }
  return false;
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
