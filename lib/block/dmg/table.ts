/**
 * The chunk table of a UDIF (.dmg) image, read as qemu 7.2's dmg driver reads it:
 *
 * - the 512-byte "koly" trailer, looked for in the last 515 bytes of the file rounded up to
 *   whole sectors (odd-sized files put it in the second-last sector);
 * - the trailer's data fork offset, resource fork and XML plist (offset, length) and sector
 *   count, all big-endian u64s, checked against the trailer's offset;
 * - the "mish" blocks: in the resource fork when its length is not zero (length-prefixed
 *   resources), else base64 inside every `<data>...</data>` of the plist;
 * - each mish block: its first sector and data offset, then 40-byte chunk entries from byte
 *   204: type, sector, sector count, data offset, data length. Chunks of types qemu cannot read
 *   (comments, the last-entry marker, lzfse, ADC, unknown; bzip2 without libbz2) are dropped
 *   from the table with qemu's warning, so reading their sectors is an I/O error.
 *
 * qemu fails most of these checks with a bare EINVAL ("Could not open 'FILE': Invalid
 * argument"); {@link DmgInvalid} carries that case. Sizes and counts are bounded before
 * anything is allocated: qemu's own limits (64 MiB chunk length, 64 MiB of sectors per chunk,
 * 16 MiB of XML) and denbd's (the resource data and the number of chunks), so a hostile image
 * costs bounded memory and time.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

/** Chunk types (the mish entry's first u32). */
export const UDZE = 0x00000000; // zeroes
export const UDRW = 0x00000001; // stored as-is
export const UDIG = 0x00000002; // ignored: reads as zeroes
export const UDCO = 0x80000004; // ADC: not supported by qemu
export const UDZO = 0x80000005; // zlib
export const UDBZ = 0x80000006; // bzip2
export const ULFO = 0x80000007; // lzfse
export const UDCM = 0x7ffffffe; // comment
export const UDLE = 0xffffffff; // last entry

/** qemu's caps on one chunk's stored length and its sectors (DMG_LENGTHS_MAX). */
export const DMG_LENGTHS_MAX = 64 * 1024 * 1024;
export const DMG_SECTORCOUNTS_MAX = DMG_LENGTHS_MAX / 512;
/** qemu's cap on the XML plist. */
export const DMG_XML_MAX = 16 * 1024 * 1024;
/** denbd's cap on the resource data read in one piece (qemu reads resource by resource). */
export const DMG_RSRC_MAX = 64 * 1024 * 1024;
/** denbd's cap on the chunk count (a 64 MiB plist of entries holds ~1.6 M). */
export const DMG_CHUNKS_MAX = 4 * 1024 * 1024;

const MISH = 0x6d697368; // "mish"
const MISH_MIN = 244;
const MISH_ENTRIES = 204;
const ENTRY = 40;
const TWO64 = 1n << 64n;

/** qemu's bare EINVAL: the driver turns it into "Could not open 'FILE': Invalid argument". */
export class DmgInvalid extends Error {
  constructor(why: string) {
    super(why);
    this.name = "DmgInvalid";
  }
}

/** Reads `length` bytes at `offset`, zeroes past the end of the file. */
export type ReadAt = (offset: number, length: number) => Promise<Uint8Array>;

/** The chunk table, in the order of the mish entries (qemu assumes sectors ascend). */
export interface DmgTable {
  /** The trailer's sector count: the disk is this many 512-byte sectors. */
  readonly totalSectors: number;
  readonly count: number;
  readonly types: Uint32Array;
  /** First sector of each chunk. */
  readonly sectors: Float64Array;
  readonly sectorCounts: Float64Array;
  /** Where each chunk's bytes are in the file. */
  readonly offsets: Float64Array;
  readonly lengths: Float64Array;
}

/** What dmg_open says besides its result. */
export interface DmgParseOptions {
  /** Whether bzip2 chunks can be read (qemu: the dmg-bz2 module is there). */
  readonly bzip2: boolean;
  /** qemu's warn_report_once lines (message without the program prefix). */
  readonly warn: (msg: string) => void;
  /** qemu's error_report lines printed before the open fails. */
  readonly report: (msg: string) => void;
}

/** Where the "koly" trailer starts in a file of `fileLength` bytes. */
export async function findKoly(read: ReadAt, fileLength: number): Promise<number> {
  // qemu sees the length of the file rounded up to a sector.
  const length = Math.ceil(fileLength / 512) * 512;
  if (length < 512) {
    throw new BlockError(Errno.EINVAL, "dmg file must be at least 512 bytes long");
  }
  const start = length > 511 + 512 ? length - 511 - 512 : 0;
  const n = Math.min(length, 515);
  const b = await read(start, n);
  for (let i = 0; i + 3 < n; i++) {
    if (b[i] === 0x6b && b[i + 1] === 0x6f && b[i + 2] === 0x6c && b[i + 3] === 0x79) {
      return start + i;
    }
  }
  throw new BlockError(Errno.EINVAL, "Could not locate UDIF trailer in dmg file");
}

function u64(b: Uint8Array, at: number): bigint {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(at);
}

function u32(b: Uint8Array, at: number): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(at);
}

/** Growable chunk columns. */
class Columns {
  count = 0;
  types = new Uint32Array(64);
  sectors = new Float64Array(64);
  sectorCounts = new Float64Array(64);
  offsets = new Float64Array(64);
  lengths = new Float64Array(64);

  reserve(n: number): void {
    if (n <= this.types.length) return;
    let cap = this.types.length;
    while (cap < n) cap *= 2;
    const grow = <T extends Uint32Array | Float64Array>(a: T, make: (n: number) => T): T => {
      const b = make(cap);
      b.set(a.subarray(0, this.count));
      return b;
    };
    this.types = grow(this.types, (n) => new Uint32Array(n));
    this.sectors = grow(this.sectors, (n) => new Float64Array(n));
    this.sectorCounts = grow(this.sectorCounts, (n) => new Float64Array(n));
    this.offsets = grow(this.offsets, (n) => new Float64Array(n));
    this.lengths = grow(this.lengths, (n) => new Float64Array(n));
  }
}

/** Reads the trailer and every mish block of the image. */
export async function readDmgTable(
  read: ReadAt,
  fileLength: number,
  opts: DmgParseOptions,
): Promise<DmgTable> {
  const koly = await findKoly(read, fileLength);
  const t = await read(koly, 512);
  const kolyAt = BigInt(koly);
  const dataFork = u64(t, 0x18);
  if (dataFork > kolyAt) throw new DmgInvalid(`data fork offset ${dataFork} past the trailer`);
  const rsrcOffset = u64(t, 0x28);
  const rsrcLength = u64(t, 0x30);
  if (rsrcOffset >= kolyAt || rsrcLength > kolyAt - rsrcOffset) {
    throw new DmgInvalid(`resource fork (${rsrcOffset}, ${rsrcLength}) past the trailer`);
  }
  const xmlOffset = u64(t, 0xd8);
  const xmlLength = u64(t, 0xe0);
  if (xmlOffset >= kolyAt || xmlLength > kolyAt - xmlOffset) {
    throw new DmgInvalid(`XML plist (${xmlOffset}, ${xmlLength}) past the trailer`);
  }
  const total = u64(t, 0x1ec);
  if (total >= 1n << 63n) throw new DmgInvalid(`negative sector count ${total}`);
  if (total * 512n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError(
      Errno.EFBIG,
      `dmg disk of ${total} sectors is larger than denbd supports`,
    );
  }
  const cols = new Columns();
  const state = { dataFork, cols, opts, warned: new Set<string>() };
  if (rsrcLength !== 0n) {
    await readResourceFork(read, state, Number(rsrcOffset), Number(rsrcLength));
  } else if (xmlLength !== 0n) {
    await readPlist(read, state, Number(xmlOffset), Number(xmlLength));
  } else {
    throw new DmgInvalid("neither a resource fork nor an XML plist");
  }
  return {
    totalSectors: Number(total),
    count: cols.count,
    types: cols.types.subarray(0, cols.count),
    sectors: cols.sectors.subarray(0, cols.count),
    sectorCounts: cols.sectorCounts.subarray(0, cols.count),
    offsets: cols.offsets.subarray(0, cols.count),
    lengths: cols.lengths.subarray(0, cols.count),
  };
}

interface ParseState {
  readonly dataFork: bigint;
  readonly cols: Columns;
  readonly opts: DmgParseOptions;
  readonly warned: Set<string>;
}

/** Length-prefixed resources, each a mish block (or something else, skipped). */
async function readResourceFork(
  read: ReadAt,
  s: ParseState,
  begin: number,
  length: number,
): Promise<void> {
  const head = await read(begin, 12);
  const dataOffset = u32(head, 0);
  if (dataOffset > length) throw new DmgInvalid(`resource data offset ${dataOffset}`);
  const count = u32(head, 8);
  // qemu adds the two as 32-bit numbers.
  if (count === 0 || ((dataOffset + count) >>> 0) > length) {
    throw new DmgInvalid(`resource data length ${count}`);
  }
  if (count > DMG_RSRC_MAX) {
    throw new BlockError(
      Errno.EFBIG,
      `dmg resource data of ${count} bytes is larger than denbd supports (${DMG_RSRC_MAX})`,
    );
  }
  const data = await read(begin + dataOffset, count);
  let pos = 0;
  // Each resource takes at least 5 bytes, so this ends within count / 5 steps.
  while (pos < count) {
    // A length field in the last 3 bytes runs past the resource data: qemu reads it from the
    // file all the same.
    const size = pos + 4 <= count
      ? u32(data, pos)
      : u32(await read(begin + dataOffset + pos, 4), 0);
    if (size === 0 || size > count - pos) throw new DmgInvalid(`resource size ${size} at ${pos}`);
    pos += 4;
    // The last resource may end 4 bytes past the resource data (qemu checks its size before
    // skipping the length field): those bytes come from the file.
    const body = pos + size <= count
      ? data.subarray(pos, pos + size)
      : await read(begin + dataOffset + pos, size);
    readMish(s, body);
    pos += size;
  }
}

/** Every `<data>` element of the plist, base64-decoded, as a mish block. */
async function readPlist(
  read: ReadAt,
  s: ParseState,
  begin: number,
  length: number,
): Promise<void> {
  if (length > DMG_XML_MAX) throw new DmgInvalid(`XML plist of ${length} bytes`);
  const bytes = await read(begin, length);
  // qemu searches the plist as a C string: it ends at the first NUL.
  let end = bytes.indexOf(0);
  if (end === -1) end = bytes.length;
  const text = new TextDecoder("latin1").decode(bytes.subarray(0, end));
  let at = 0;
  for (;;) {
    const open = text.indexOf("<data>", at);
    if (open === -1) return;
    const close = text.indexOf("</data>", open + 6);
    if (close === -1) throw new DmgInvalid("unterminated <data> in the XML plist");
    readMish(s, base64Decode(text, open + 6, close));
    at = close + 1;
  }
}

const B64_RANK = (() => {
  const r = new Int8Array(256).fill(-1);
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (let i = 0; i < 64; i++) r[abc.charCodeAt(i)] = i;
  r[0x3d] = 0; // '=' counts as a zero digit; trailing ones trim the output
  return r;
})();

/**
 * Base64 of `text[from, to)` as glib's g_base64_decode reads it: characters outside the
 * alphabet are skipped, every 4 digits give 3 bytes less one per '=' among the last two, and
 * an unfinished group at the end is dropped.
 */
export function base64Decode(text: string, from = 0, to = text.length): Uint8Array {
  const out = new Uint8Array(Math.floor(((to - from) * 3) / 4) + 3);
  let n = 0;
  let v = 0;
  let digits = 0;
  let last0 = 0;
  let last1 = 0;
  for (let i = from; i < to; i++) {
    const c = text.charCodeAt(i);
    const rank = c < 256 ? B64_RANK[c]! : -1;
    if (rank < 0) continue;
    last1 = last0;
    last0 = c;
    v = ((v << 6) | rank) & 0xffffff;
    if (++digits === 4) {
      out[n++] = v >> 16;
      if (last1 !== 0x3d) out[n++] = (v >> 8) & 0xff;
      if (last0 !== 0x3d) out[n++] = v & 0xff;
      digits = 0;
    }
  }
  return out.subarray(0, n);
}

function knownType(type: number, bzip2: boolean): boolean {
  switch (type) {
    case UDZE:
    case UDRW:
    case UDIG:
    case UDZO:
      return true;
    case UDBZ:
      return bzip2;
    default:
      return false;
  }
}

function warnOnce(s: ParseState, msg: string): void {
  if (s.warned.has(msg)) return;
  s.warned.add(msg);
  s.opts.warn(msg);
}

/** One mish block's chunks appended to the table (a block without the magic is skipped). */
function readMish(s: ParseState, b: Uint8Array): void {
  if (b.length < MISH_MIN || u32(b, 0) !== MISH) return;
  const firstSector = u64(b, 8);
  const inOffset = s.dataFork + u64(b, 0x18);
  const entries = Math.floor((b.length - MISH_ENTRIES) / ENTRY);
  const cols = s.cols;
  if (cols.count + entries > DMG_CHUNKS_MAX) {
    throw new BlockError(
      Errno.EFBIG,
      `dmg image has more than ${DMG_CHUNKS_MAX} chunks, more than denbd supports`,
    );
  }
  cols.reserve(cols.count + entries);
  for (let e = 0, at = MISH_ENTRIES; e < entries; e++, at += ENTRY) {
    const type = u32(b, at);
    if (!knownType(type, s.opts.bzip2)) {
      if (type === UDBZ) {
        warnOnce(
          s,
          "dmg-bzip2 module is missing, accessing bzip2 compressed blocks will result in I/O errors",
        );
      } else if (type === ULFO) {
        warnOnce(
          s,
          "dmg-lzfse module is missing, accessing lzfse compressed blocks will result in I/O errors",
        );
      } else if (type !== UDCM && type !== UDLE) {
        warnOnce(
          s,
          `Image contains chunks of unknown type ${
            type.toString(16)
          }, accessing them will result in I/O errors`,
        );
      }
      continue;
    }
    // The index qemu names in its messages counts only the chunks kept.
    const i = cols.count;
    const sectorCount = u64(b, at + 0x10);
    if (type !== UDZE && type !== UDIG && sectorCount > BigInt(DMG_SECTORCOUNTS_MAX)) {
      s.opts.report(
        `sector count ${sectorCount} for chunk ${i} is larger than max (${DMG_SECTORCOUNTS_MAX})`,
      );
      throw new DmgInvalid(`sector count of chunk ${i}`);
    }
    const length = u64(b, at + 0x20);
    if (length > BigInt(DMG_LENGTHS_MAX)) {
      s.opts.report(`length ${length} for chunk ${i} is larger than max (${DMG_LENGTHS_MAX})`);
      throw new DmgInvalid(`length of chunk ${i}`);
    }
    cols.types[i] = type;
    // u64 sums wrap as qemu's do; past 2^53 they are far beyond any disk or file anyway.
    cols.sectors[i] = Number((u64(b, at + 8) + firstSector) % TWO64);
    cols.sectorCounts[i] = Number(sectorCount);
    cols.offsets[i] = Number((u64(b, at + 0x18) + inOffset) % TWO64);
    cols.lengths[i] = Number(length);
    cols.count = i + 1;
  }
}
