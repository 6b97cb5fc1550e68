/**
 * VMDK on-disk structures as qemu 7.2's vmdk driver reads them: the probe, the hosted sparse
 * header ("KDMV", version 1-3, with the streamOptimized footer), the ESX sparse header ("COWD",
 * what qemu calls VMDK3), and the text descriptor (createType, extent lines, CID, parentCID,
 * parentFileNameHint). The descriptor is parsed with qemu's string semantics (strstr, sscanf):
 * the first match anywhere wins and a NUL ends the text, so odd descriptors open as they do in
 * qemu. Checks and messages are vmdk_open_vmdk4's, in its order.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

export const SECTOR = 512;
/** What qemu reads of a descriptor for CID and parent lookups (DESC_SIZE, 20 sectors). */
export const DESC_SIZE = 20 * SECTOR;
/** The most of a descriptor file (or a sparse extent's head) qemu reads (vmdk_read_desc). */
export const DESC_READ_MAX = (1 << 20) - 1;
/** "COWD" (qemu's VMDK3_MAGIC) and "KDMV" (VMDK4_MAGIC), big-endian as qemu compares them. */
export const VMDK3_MAGIC = 0x434f5744;
export const VMDK4_MAGIC = 0x4b444d56;
export const FLAG_RGD = 1 << 1;
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_COMPRESS = 1 << 16;
export const FLAG_MARKER = 1 << 17;
export const COMPRESSION_DEFLATE = 1;
/** gd_offset of a streamOptimized image whose grain directory is in the footer. */
export const GD_AT_END = 0xffffffffffffffffn;
/** A grain table entry meaning "reads as zeroes" when the zeroed-grain flag is set. */
export const GTE_ZEROED = 1;
export const MARKER_EOS = 0;
export const MARKER_FOOTER = 3;
/** The largest sector a new grain may start at (qemu's VMDK_EXTENT_MAX_SECTORS). */
export const EXTENT_MAX_SECTORS = 2 ** 32;
/** Size of the hosted sparse header after the magic (the packed VMDK4Header). */
export const VMDK4_HEADER_SIZE = 75;

/** qemu's vmdk_probe: a magic number, or a text descriptor whose first line is version=1..3. */
export function probeVmdk(head: Uint8Array): number {
  if (head.length < 4) return 0;
  const magic = ((head[0]! << 24) | (head[1]! << 16) | (head[2]! << 8) | head[3]!) >>> 0;
  if (magic === VMDK3_MAGIC || magic === VMDK4_MAGIC) return 100;
  const end = head.length;
  let p = 0;
  while (p < end) {
    const c = head[p];
    if (c === 0x23) { // '#': a comment line
      while (p < end && head[p] !== 0x0a) p++;
      p++;
      continue;
    }
    if (c === 0x20) { // only blank lines before the version line
      while (p < end && head[p] === 0x20) p++;
      if (p < end && head[p] === 0x0d) p++;
      if (p === end || head[p] !== 0x0a) return 0;
      p++;
      continue;
    }
    const rest = end - p;
    const at = (s: string) => {
      for (let i = 0; i < s.length; i++) if (head[p + i] !== s.charCodeAt(i)) return false;
      return true;
    };
    for (const v of ["1", "2", "3"]) {
      if (rest >= 10 && at(`version=${v}\n`)) return 100;
      if (rest >= 11 && at(`version=${v}\r\n`)) return 100;
    }
    return 0;
  }
  return 0;
}

/** The hosted sparse header fields (VMDK4Header), as read after the magic. */
export interface Vmdk4Header {
  readonly version: number;
  readonly flags: number;
  readonly capacity: bigint;
  readonly granularity: bigint;
  readonly descOffset: bigint;
  readonly descSize: bigint;
  readonly numGtesPerGt: number;
  readonly rgdOffset: bigint;
  readonly gdOffset: bigint;
  readonly grainOffset: bigint;
  readonly compressAlgorithm: number;
}

/** Decodes the 75 bytes after the magic (shorter input reads as zero-padded). */
export function decodeVmdk4Header(b: Uint8Array): Vmdk4Header {
  const buf = new Uint8Array(VMDK4_HEADER_SIZE);
  buf.set(b.subarray(0, VMDK4_HEADER_SIZE));
  const v = new DataView(buf.buffer);
  return {
    version: v.getUint32(0, true),
    flags: v.getUint32(4, true),
    capacity: v.getBigUint64(8, true),
    granularity: v.getBigUint64(16, true),
    descOffset: v.getBigUint64(24, true),
    descSize: v.getBigUint64(32, true),
    numGtesPerGt: v.getUint32(40, true),
    rgdOffset: v.getBigUint64(44, true),
    gdOffset: v.getBigUint64(52, true),
    grainOffset: v.getBigUint64(60, true),
    compressAlgorithm: v.getUint16(73, true),
  };
}

/** The ESX sparse ("COWD") header fields qemu uses, read after the magic. */
export interface Vmdk3Header {
  readonly diskSectors: number;
  readonly granularity: number;
  readonly l1dirOffset: number;
  readonly l1dirSize: number;
}

export function decodeVmdk3Header(b: Uint8Array): Vmdk3Header {
  const buf = new Uint8Array(40);
  buf.set(b.subarray(0, 40));
  const v = new DataView(buf.buffer);
  return {
    diskSectors: v.getUint32(8, true),
    granularity: v.getUint32(12, true),
    l1dirOffset: v.getUint32(16, true),
    l1dirSize: v.getUint32(20, true),
  };
}

/** Bytes as a C string: Latin-1 text up to the first NUL. */
export function cString(b: Uint8Array): string {
  const nul = b.indexOf(0);
  const s = nul < 0 ? b : b.subarray(0, nul);
  let out = "";
  for (let i = 0; i < s.length; i += 8192) {
    out += String.fromCharCode(...s.subarray(i, Math.min(s.length, i + 8192)));
  }
  return out;
}

/**
 * qemu's vmdk_parse_description: the text after the first `NAME="` up to the next `"`, or
 * undefined (also when longer than `max` - 1 characters, qemu's buffer).
 */
export function descriptionValue(desc: string, name: string, max: number): string | undefined {
  const at = desc.indexOf(name);
  if (at < 0) return undefined;
  const start = at + name.length + 2;
  if (start >= desc.length) return undefined;
  const end = desc.indexOf('"', start);
  if (end < 0 || max < end - start + 1) return undefined;
  return desc.slice(start, end);
}

/** The hex number after the first `CID=` (or `parentCID=`), as qemu's vmdk_read_cid scans it. */
export function readCid(desc: string, parent: boolean): number | undefined {
  const name = parent ? "parentCID" : "CID";
  const at = desc.indexOf(name);
  if (at < 0) return undefined;
  const m = /^[ \t\n\v\f\r]*[+-]?(?:0[xX])?([0-9a-fA-F]+)/.exec(desc.slice(at + name.length + 1));
  if (m === null) {
    // "0x" alone scans as 0.
    return /^[ \t\n\v\f\r]*[+-]?0/.test(desc.slice(at + name.length + 1)) ? 0 : undefined;
  }
  const neg = /^[ \t\n\v\f\r]*-/.test(desc.slice(at + name.length + 1));
  // strtoul: too large saturates, a minus sign negates modulo 2^32.
  let v = m[1]!.length > 8 ? 0xffffffff : parseInt(m[1]!, 16);
  if (neg) v = (0x100000000 - v) % 0x100000000;
  return v >>> 0;
}

/**
 * The descriptor with its CID replaced as qemu's vmdk_write_cid does: the text after the first
 * `CID=` becomes the new value and a newline, followed by everything from `parentCID` on.
 * Undefined when there is no parentCID (qemu then leaves the descriptor alone).
 */
export function withCid(desc: string, cid: number): string | undefined {
  const tail = desc.indexOf("parentCID");
  if (tail < 0) return undefined;
  const at = desc.indexOf("CID");
  return desc.slice(0, at + 4) + `${cid.toString(16)}\n` + desc.slice(tail);
}

/** qemu's vmdk_parent_open: the parentFileNameHint value, "" when absent. */
export function parentHint(desc: string, path: string): string {
  const at = desc.indexOf("parentFileNameHint");
  if (at < 0) return "";
  const start = at + "parentFileNameHint".length + 2;
  const end = desc.indexOf('"', start);
  if (end < 0 || end - start > 4095) {
    throw new BlockError(Errno.EINVAL, `Could not open '${path}': Invalid argument`);
  }
  return desc.slice(start, end);
}

/** One extent line of a descriptor, as qemu's vmdk_parse_extents keeps it. */
export interface ExtentLine {
  readonly sectors: number;
  readonly type: "FLAT" | "SPARSE" | "VMFS" | "VMFSSPARSE" | "SESPARSE";
  readonly fileName: string;
  /** FLAT: the start in its file, in sectors (VMFS: 0). */
  readonly flatOffset: number;
}

const SPACE = " \t\n\v\f\r";

/**
 * A tiny sscanf for `"%10s %lld %10s \"%511[^\n\r\"]\" %lld"`, qemu's extent line format, with
 * C's rules (conversions skip any whitespace, newlines included). Returns the conversions made.
 */
function scanExtent(s: string, from: number) {
  let p = from;
  const ws = () => {
    while (p < s.length && SPACE.includes(s[p]!)) p++;
  };
  const word = (max: number): string | undefined => {
    ws();
    const st = p;
    while (p < s.length && p - st < max && !SPACE.includes(s[p]!)) p++;
    return p > st ? s.slice(st, p) : undefined;
  };
  const int = (): number | undefined => {
    ws();
    const m = /^[+-]?[0-9]+/.exec(s.slice(p, p + 40));
    if (m === null) return undefined;
    p += m[0].length;
    // Past int64 saturates (strtoll); denbd keeps it in a double, checked by the caller.
    const v = Number(m[0]);
    return Math.max(-(2 ** 63), Math.min(2 ** 63, v));
  };
  const out: {
    n: number;
    access?: string;
    sectors?: number;
    type?: string;
    name?: string;
    flat?: number;
  } = {
    n: 0,
  };
  out.access = word(10);
  if (out.access === undefined) return out;
  out.n++;
  out.sectors = int();
  if (out.sectors === undefined) return out;
  out.n++;
  out.type = word(10);
  if (out.type === undefined) return out;
  out.n++;
  ws();
  if (s[p] !== '"') return out;
  p++;
  const st = p;
  while (p < s.length && p - st < 511 && !'\n\r"'.includes(s[p]!)) p++;
  if (p === st) return out;
  out.name = s.slice(st, p);
  out.n++;
  if (s[p] !== '"') return out;
  p++;
  out.flat = int();
  if (out.flat !== undefined) out.n++;
  return out;
}

/**
 * The extent lines of a descriptor, qemu's way: lines whose access is not RW, whose type is
 * unknown (ZERO included) or whose size is not positive are skipped; a FLAT line without an
 * offset, or other lines with one, is "Invalid extent line".
 */
export function parseExtentLines(desc: string): ExtentLine[] {
  const out: ExtentLine[] = [];
  let sectors = 0;
  for (let p = 0; p < desc.length;) {
    const nl = desc.indexOf("\n", p);
    const next = nl < 0 ? desc.length : nl + 1;
    const m = scanExtent(desc, p);
    if (m.sectors !== undefined) sectors = m.sectors;
    let flat = m.flat ?? -1;
    const line = () => desc.slice(p, nl < 0 ? desc.length : nl);
    if (m.n < 4 || m.access !== "RW") {
      p = next;
      continue;
    }
    if (m.type === "FLAT") {
      if (m.n !== 5 || flat < 0) {
        throw new BlockError(Errno.EINVAL, `Invalid extent line: ${line()}`);
      }
    } else if (m.type === "VMFS") {
      if (m.n !== 4) throw new BlockError(Errno.EINVAL, `Invalid extent line: ${line()}`);
      flat = 0;
    } else if (m.n !== 4) {
      throw new BlockError(Errno.EINVAL, `Invalid extent line: ${line()}`);
    }
    const t = m.type!;
    if (
      sectors > 0 &&
      (t === "FLAT" || t === "SPARSE" || t === "VMFS" || t === "VMFSSPARSE" || t === "SESPARSE")
    ) {
      out.push({ sectors, type: t, fileName: m.name!, flatOffset: flat });
    }
    p = next;
  }
  return out;
}
