/**
 * Test-side VHD encoding: empty dynamic images with any block size (qemu-img always makes
 * 2 MiB blocks) and footer patches with the checksum recomputed, for the vpc tests.
 *
 * @module
 */

/** One's complement of the byte sum of a footer, its checksum field counted as zero. */
export function vhdChecksum(footer: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < 512; i++) if (i < 64 || i >= 68) sum += footer[i]!;
  return ~sum >>> 0;
}

export interface FooterEdit {
  creatorApp?: string;
  type?: number;
  currentSize?: bigint;
  chs?: [number, number, number];
  dataOffset?: bigint;
}

/** Applies `e` to the footer at `at` in `b` and fixes its checksum. */
export function editFooter(b: Uint8Array, at: number, e: FooterEdit): void {
  const f = b.subarray(at, at + 512);
  const v = new DataView(f.buffer, f.byteOffset, 512);
  if (e.creatorApp !== undefined) {
    for (let i = 0; i < 4; i++) f[28 + i] = e.creatorApp.charCodeAt(i) || 0;
  }
  if (e.type !== undefined) v.setUint32(60, e.type);
  if (e.currentSize !== undefined) v.setBigUint64(48, e.currentSize);
  if (e.dataOffset !== undefined) v.setBigUint64(16, e.dataOffset);
  if (e.chs !== undefined) {
    v.setUint16(56, e.chs[0]);
    f[58] = e.chs[1];
    f[59] = e.chs[2];
  }
  v.setUint32(64, vhdChecksum(f));
}

/** Edits both footers of a dynamic image (the copy at 0 and the one at the end). */
export function editDynamicFooters(b: Uint8Array, e: FooterEdit): void {
  editFooter(b, 0, e);
  editFooter(b, b.length - 512, e);
}

/**
 * An empty dynamic image laid out as qemu-img lays one out (footer, header at 512, BAT at
 * 1536, footer after the BAT), with `blockSize` blocks and `creatorApp` "qem2" (size from
 * current_size, geometry the maximum).
 */
export function emptyDynamicVhd(size: number, blockSize: number): Uint8Array {
  const entries = Math.ceil(size / blockSize);
  const batBytes = Math.ceil((entries * 4) / 512) * 512;
  const out = new Uint8Array(1536 + batBytes + 512);
  const footer = out.subarray(0, 512);
  const fv = new DataView(footer.buffer, 0, 512);
  footer.set(new TextEncoder().encode("conectix"));
  fv.setUint32(8, 2);
  fv.setUint32(12, 0x00010000);
  fv.setBigUint64(16, 512n);
  footer.set(new TextEncoder().encode("qem2"), 28);
  fv.setUint16(32, 5);
  fv.setUint16(34, 3);
  footer.set(new TextEncoder().encode("Wi2k"), 36);
  fv.setBigUint64(40, BigInt(size));
  fv.setBigUint64(48, BigInt(size));
  fv.setUint16(56, 65535);
  footer[58] = 16;
  footer[59] = 255;
  fv.setUint32(60, 3);
  footer.fill(0x5a, 68, 84);
  fv.setUint32(64, vhdChecksum(footer));
  const dyn = out.subarray(512, 1536);
  const dv = new DataView(dyn.buffer, 512, 1024);
  dyn.set(new TextEncoder().encode("cxsparse"));
  dv.setBigUint64(8, 0xffffffffffffffffn);
  dv.setBigUint64(16, 1536n);
  dv.setUint32(24, 0x00010000);
  dv.setUint32(28, entries);
  dv.setUint32(32, blockSize);
  let sum = 0;
  for (const x of dyn) sum += x;
  dv.setUint32(36, ~sum >>> 0);
  out.fill(0xff, 1536, 1536 + batBytes);
  out.set(footer, 1536 + batBytes);
  return out;
}
