/**
 * qcow2 persistent dirty bitmaps: the bitmaps header extension, the bitmap directory, bitmap
 * tables and data, decoded and validated with qemu 7.2's rules and messages
 * (block/qcow2-bitmap.c, `qcow2_read_extensions`), an in-memory {@link DirtyBitmap} that answers
 * `qemu:dirty-bitmap:NAME` block status like qemu-nbd -B, and the pieces the store-on-close
 * needs.
 *
 * On disk (docs/interop/qcow2.txt, "Bitmaps extension"):
 * - extension 0x23852875: nb_bitmaps u32, reserved u32 (0), directory_size u64,
 *   directory_offset u64 (cluster aligned). Valid only while autoclear bit 0 is set: a program
 *   that rewrites the header without knowing bitmaps clears it, and then every bitmap is ignored
 *   (qemu warns; the clusters they used become leaks).
 * - directory: entries of 24 bytes + extra data + name, each padded to 8: table offset u64,
 *   table size u32 (entries), flags u32 (bit 0 in_use, bit 1 auto; qemu treats every other bit,
 *   extra_data_compatible included, as reserved), type u8 (1), granularity bits u8, name size
 *   u16, extra data size u32 (qemu: must be 0).
 * - table: one u64 per cluster of serialized bitmap: bits 9-55 data cluster offset; offset 0
 *   means all zeroes, or all ones when bit 0 is set.
 * - data: bit `n` (guest bytes `[n*gran, (n+1)*gran)`) is bit `n % 8` of byte `n / 8`; the
 *   serialization is `ceil(bits / 64) * 8` bytes, cut into clusters. Only clusters holding a
 *   set bit are stored.
 *
 * qemu's limits: 65535 bitmaps, directory ≤ 1024 × 65535 bytes, table ≤ 0x8000000 entries and
 * ≤ 512 MiB of bitmap data, granularity 2^9..2^31, names ≤ 1023 bytes.
 *
 * Lifecycle (what qemu does, and what the writer must reproduce):
 * - Open, any mode: every bitmap is loaded (a broken directory or table fails the open, with or
 *   without -B). A bitmap found with in_use set is "inconsistent": its data is not read, it can
 *   never be exported, and it is left untouched on disk.
 * - Open read-write ({@link markBitmapsInUse}, qemu's `update_ext_header_and_dir_in_place`):
 *   header rewritten with autoclear bit 0 cleared + fdatasync; directory rewritten in place with
 *   in_use set on every consistent bitmap; header rewritten + fdatasync; header rewritten with
 *   autoclear bit 0 set + fdatasync.
 * - While writable: every guest write, write-zeroes and discard that reaches the image marks
 *   the requested range in each enabled (`auto`) bitmap ({@link ImageBitmaps.mark}), whether or
 *   not the request succeeded. Under `--discard=ignore` NBD_CMD_TRIM does not reach the image and
 *   marks nothing; under `--discard=unmap` it marks the whole requested range (verified).
 * - Close ({@link storeBitmaps}, qemu's `qcow2_store_persistent_dirty_bitmaps`), for each
 *   consistent bitmap in directory order: allocate one cluster per data cluster holding a set
 *   bit and write it (ascending), then allocate and write the new table; then allocate and write a
 *   new directory (flags = auto or 0: in_use cleared), flush the metadata caches + fdatasync,
 *   rewrite the header pointing at the new directory (autoclear bit 0 set) + fdatasync, free the
 *   old directory, then for each old table free its data clusters and the table itself. Nothing
 *   is reused in place, so a crash at any point leaves either the old or the new state plus
 *   leaks; bitmaps still flagged in_use on disk become inconsistent, which is exactly qemu's
 *   crash semantics.
 *
 * @module
 */

import { type BlockBitmap, BlockError, Errno, type ExtentList, STATE_DIRTY } from "../types.ts";

/** Autoclear feature bit 0: the bitmaps extension is consistent. */
export const AUTOCLEAR_BITMAPS = 1n;
/** Directory entry flag: the bitmap was open for writing and may be stale. */
export const BITMAP_FLAG_IN_USE = 1;
/** Directory entry flag: the bitmap tracks writes (enabled). */
export const BITMAP_FLAG_AUTO = 2;
/** Flags qemu refuses (it does not implement extra_data_compatible). */
const RESERVED_FLAGS = 0xfffffffc;
/** Bitmap type 1, the only one defined: dirty tracking. */
const TYPE_DIRTY_TRACKING = 1;

/** qemu's limits (block/qcow2.h, block/qcow2-bitmap.c). */
export const MAX_BITMAPS = 65535;
export const MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS;
export const MAX_TABLE_ENTRIES = 0x8000000;
export const MAX_BITMAP_BYTES = 0x20000000;
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
export const MAX_NAME_BYTES = 1023;
const ENTRY_HEADER = 24;

/** Table entry bits: reserved 1-8 and 56-63 (high word 0xff000000, low word 0x1fe). */
const TABLE_RESERVED_HI = 0xff000000;
const TABLE_RESERVED_LO = 0x1fe;
const TABLE_ALL_ONES = 1;

const decoder = new TextDecoder("utf-8", { fatal: false });
const hex = (n: number) => `0x${n.toString(16)}`;

function einval(message: string): BlockError {
  return new BlockError(Errno.EINVAL, message);
}

function u64(v: DataView, at: number): number {
  return v.getUint32(at) * 0x100000000 + v.getUint32(at + 4);
}

function setU64(v: DataView, at: number, n: number): void {
  v.setUint32(at, Math.floor(n / 0x100000000));
  v.setUint32(at + 4, n >>> 0);
}

/**
 * Bytes a bitmap covers: qemu sizes it by the node length, the virtual size rounded down to
 * whole 512-byte sectors.
 */
export function bitmapLength(virtualSize: number): number {
  return Math.floor(virtualSize / 512) * 512;
}

/** Table entries a bitmap of `length` bytes at `2^granularityBits` needs (load_bitmap_data). */
export function bitmapTableSize(
  length: number,
  granularityBits: number,
  clusterSize: number,
): number {
  const bits = Math.ceil(length / 2 ** granularityBits);
  const bytes = Math.ceil(bits / 64) * 8;
  return Math.ceil(bytes / clusterSize);
}

// ---------------------------------------------------------------------------------------------
// Header extension

/** The bitmaps extension fields (`reserved` when the header decoder keeps it). */
export interface BitmapsExtensionFields {
  readonly nbBitmaps: number;
  readonly directorySize: number;
  readonly directoryOffset: number;
  readonly reserved?: number;
}

/** Decode the 24 data bytes of the bitmaps extension (length checked as qemu does). */
export function decodeBitmapsExtension(data: Uint8Array): Required<BitmapsExtensionFields> {
  if (data.length !== 24) throw einval("bitmaps_ext: Invalid extension length");
  const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
  return {
    nbBitmaps: v.getUint32(0),
    reserved: v.getUint32(4),
    directorySize: u64(v, 8),
    directoryOffset: u64(v, 16),
  };
}

/** Encode the bitmaps extension data (24 bytes, reserved 0). */
export function encodeBitmapsExtension(ext: BitmapsExtensionFields): Uint8Array {
  const out = new Uint8Array(24);
  const v = new DataView(out.buffer);
  v.setUint32(0, ext.nbBitmaps);
  setU64(v, 8, ext.directorySize);
  setU64(v, 16, ext.directoryOffset);
  return out;
}

/** qemu's checks on the extension (made only while autoclear bit 0 is set). */
export function validateBitmapsExtension(ext: BitmapsExtensionFields, clusterSize: number): void {
  if ((ext.reserved ?? 0) !== 0) throw einval("bitmaps_ext: Reserved field is not zero");
  if (ext.nbBitmaps > MAX_BITMAPS) {
    throw einval(
      `bitmaps_ext: Image has ${ext.nbBitmaps} bitmaps, ` +
        `exceeding the QEMU supported maximum of ${MAX_BITMAPS}`,
    );
  }
  if (ext.nbBitmaps === 0) throw einval("found bitmaps extension with zero bitmaps");
  if (ext.directoryOffset % clusterSize !== 0) {
    throw einval(
      `bitmaps_ext: invalid bitmap directory offset (${
        hex(ext.directoryOffset)
      } is not aligned to the cluster size ${clusterSize})`,
    );
  }
  if (ext.directorySize > MAX_DIRECTORY_BYTES) {
    throw einval(
      `bitmaps_ext: bitmap directory size (${ext.directorySize}) ` +
        `exceeds the maximum supported size (${MAX_DIRECTORY_BYTES})`,
    );
  }
}

/** The warning qemu prints when autoclear bit 0 is clear (all bitmaps are then ignored). */
export function lostBitmapsWarning(version: number): string {
  const what = version < 3
    ? "This qcow2 v2 image contains bitmaps, but they may have been modified by a program " +
      "without persistent bitmap support; so now they must all be considered inconsistent"
    : "a program lacking bitmap support modified this file, " +
      "so all bitmaps are now considered inconsistent";
  return `warning: ${what}\n` +
    "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.";
}

// ---------------------------------------------------------------------------------------------
// Directory

/** One bitmap directory entry. */
export interface BitmapDirEntry {
  readonly tableOffset: number;
  /** Table entries. */
  readonly tableSize: number;
  readonly flags: number;
  readonly type: number;
  readonly granularityBits: number;
  /** The name as qemu reads it: `name_size` bytes, cut at the first NUL. */
  readonly name: string;
  /** The same name as bytes (what a rewritten directory stores). */
  readonly nameBytes: Uint8Array;
  readonly extraDataSize: number;
  /** Offset of the entry inside the directory (for messages). */
  readonly at: number;
}

/** What directory validation needs to know about the image. */
export interface DirectoryContext {
  readonly clusterSize: number;
  /** Bytes the bitmaps cover ({@link bitmapLength} of the virtual size). */
  readonly length: number;
  /** File offset of the directory (for messages only). */
  readonly directoryOffset?: number;
}

function dirEntrySize(nameSize: number, extraSize: number): number {
  return (ENTRY_HEADER + nameSize + extraSize + 7) & ~7;
}

/** qemu's `check_dir_entry`: the reason an entry is refused, or undefined. */
function entryProblem(
  e: BitmapDirEntry,
  ctx: DirectoryContext,
  nameSize: number,
): string | undefined {
  const cs = ctx.clusterSize;
  if (e.tableSize === 0) return "bitmap table size is 0";
  if (e.tableOffset === 0) return "bitmap table offset is 0";
  if (e.tableOffset % cs !== 0) {
    return `bitmap table offset ${hex(e.tableOffset)} is not cluster aligned`;
  }
  if (e.tableSize > MAX_TABLE_ENTRIES) {
    return `bitmap table size ${e.tableSize} exceeds ${MAX_TABLE_ENTRIES}`;
  }
  if (e.granularityBits > MAX_GRANULARITY_BITS || e.granularityBits < MIN_GRANULARITY_BITS) {
    const range = `${MIN_GRANULARITY_BITS}..${MAX_GRANULARITY_BITS}`;
    return `granularity bits ${e.granularityBits} outside ${range}`;
  }
  if ((e.flags & RESERVED_FLAGS) >>> 0 !== 0) return `reserved flags set (${hex(e.flags >>> 0)})`;
  if (nameSize > MAX_NAME_BYTES) return `name size ${nameSize} exceeds ${MAX_NAME_BYTES}`;
  if (e.type !== TYPE_DIRTY_TRACKING) return `type ${e.type} is not 1 (dirty tracking)`;
  const phys = e.tableSize * cs;
  if (phys > MAX_BITMAP_BYTES) return `bitmap data size ${phys} exceeds ${MAX_BITMAP_BYTES}`;
  // A stale (in_use) bitmap may be too small after a resize; a consistent one may not.
  if (!(e.flags & BITMAP_FLAG_IN_USE) && ctx.length > phys * 8 * 2 ** e.granularityBits) {
    return `a table of ${e.tableSize} clusters cannot cover ${ctx.length} bytes`;
  }
  return undefined;
}

/**
 * Parse and validate a bitmap directory (qemu's `bitmap_list_load` + `check_dir_entry`).
 * `dir` is exactly `directory_size` bytes; throws BlockError(EINVAL) with qemu's message and a
 * parenthesised detail naming the entry's file offset.
 */
export function parseBitmapDirectory(
  dir: Uint8Array,
  nbBitmaps: number,
  ctx: DirectoryContext,
): BitmapDirEntry[] {
  if (dir.length === 0) throw einval("Requested bitmap directory size is zero");
  if (dir.length > MAX_DIRECTORY_BYTES) throw einval("Requested bitmap directory size is too big");
  const base = ctx.directoryOffset ?? 0;
  const where = (at: number) => `entry at ${hex(base + at)}`;
  const v = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  const out: BitmapDirEntry[] = [];
  let at = 0;
  // Every entry takes at least 24 bytes, so the loop is bounded by the directory size.
  while (at < dir.length) {
    if (at + ENTRY_HEADER > dir.length) {
      throw einval(`Broken bitmap directory (${where(at)}: header runs past the directory end)`);
    }
    if (out.length + 1 > nbBitmaps) {
      throw einval("More bitmaps found than specified in header extension");
    }
    const nameSize = v.getUint16(at + 18);
    const extraDataSize = v.getUint32(at + 20);
    const next = at + dirEntrySize(nameSize, extraDataSize);
    if (next > dir.length) {
      throw einval(`Broken bitmap directory (${where(at)}: name and extra data run past its end)`);
    }
    if (extraDataSize !== 0) {
      throw einval(`Bitmap extra data is not supported (${where(at)}: ${extraDataSize} bytes)`);
    }
    const raw = dir.subarray(
      at + ENTRY_HEADER + extraDataSize,
      at + ENTRY_HEADER + extraDataSize + nameSize,
    );
    const nul = raw.indexOf(0);
    const nameBytes = (nul < 0 ? raw : raw.subarray(0, nul)).slice();
    const e: BitmapDirEntry = {
      tableOffset: u64(v, at),
      tableSize: v.getUint32(at + 8),
      flags: v.getUint32(at + 12),
      type: v.getUint8(at + 16),
      granularityBits: v.getUint8(at + 17),
      name: decoder.decode(nameBytes),
      nameBytes,
      extraDataSize,
      at,
    };
    const problem = entryProblem(e, ctx, nameSize);
    if (problem !== undefined) {
      throw einval(`Bitmap '${e.name}' doesn't satisfy the constraints (${where(at)}: ${problem})`);
    }
    out.push(e);
    at = next;
  }
  if (out.length !== nbBitmaps) {
    throw einval(
      `Less bitmaps found than specified in header extension (${out.length} of ${nbBitmaps})`,
    );
  }
  return out;
}

/** What a directory entry is written from. */
export interface BitmapDirEntryInit {
  readonly tableOffset: number;
  readonly tableSize: number;
  readonly flags: number;
  readonly granularityBits: number;
  readonly nameBytes: Uint8Array;
}

/** Encode a directory (no extra data, as qemu writes it). */
export function encodeBitmapDirectory(entries: readonly BitmapDirEntryInit[]): Uint8Array {
  let size = 0;
  for (const e of entries) size += dirEntrySize(e.nameBytes.length, 0);
  const out = new Uint8Array(size);
  const v = new DataView(out.buffer);
  let at = 0;
  for (const e of entries) {
    setU64(v, at, e.tableOffset);
    v.setUint32(at + 8, e.tableSize);
    v.setUint32(at + 12, e.flags >>> 0);
    v.setUint8(at + 16, TYPE_DIRTY_TRACKING);
    v.setUint8(at + 17, e.granularityBits);
    v.setUint16(at + 18, e.nameBytes.length);
    out.set(e.nameBytes, at + ENTRY_HEADER);
    at += dirEntrySize(e.nameBytes.length, 0);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Tables

/** Table entry value for an all-ones cluster (data offsets are > 0, all-zeroes is 0). */
export const TABLE_ONES = -1;

/**
 * Decode and validate a bitmap table (qemu's `bitmap_table_load` + `check_table_entry`).
 * Returns one number per entry: the data cluster offset, 0 for all zeroes, or {@link TABLE_ONES}.
 * `fail(detail)` builds the error for an invalid entry.
 */
export function parseBitmapTable(
  bytes: Uint8Array,
  clusterSize: number,
  fail: (detail: string) => Error,
): number[] {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = bytes.length >>> 3;
  const out = new Array<number>(n);
  for (let i = 0; i < n; i++) {
    const hi = v.getUint32(i * 8);
    const lo = v.getUint32(i * 8 + 4);
    const raw = () => `0x${hi.toString(16).padStart(8, "0")}${lo.toString(16).padStart(8, "0")}`;
    if ((hi & TABLE_RESERVED_HI) !== 0 || (lo & TABLE_RESERVED_LO) !== 0) {
      throw fail(`entry ${i} = ${raw()} has reserved bits set`);
    }
    const offset = hi * 0x100000000 + ((lo & ~0x1ff) >>> 0);
    if (offset === 0) {
      out[i] = lo & TABLE_ALL_ONES ? TABLE_ONES : 0;
      continue;
    }
    if (lo & TABLE_ALL_ONES) throw fail(`entry ${i} = ${raw()} has both an offset and bit 0`);
    if (offset % clusterSize !== 0) {
      throw fail(`entry ${i} = ${raw()} is not cluster aligned`);
    }
    out[i] = offset;
  }
  return out;
}

/** Encode a table from {@link parseBitmapTable}'s representation. */
export function encodeBitmapTable(entries: readonly number[]): Uint8Array {
  const out = new Uint8Array(entries.length * 8);
  const v = new DataView(out.buffer);
  entries.forEach((e, i) => {
    if (e === TABLE_ONES) v.setUint32(i * 8 + 4, TABLE_ALL_ONES);
    else setU64(v, i * 8, e);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// In-memory bitmap

/** Bits per chunk of the sparse bit store. */
const CHUNK_BITS = 1 << 16;
const CHUNK_WORDS = CHUNK_BITS >>> 5;
/** A chunk with every bit set (shared, never written). */
const FULL = new Uint32Array(0);

/** Index of the lowest set bit of a non-zero 32-bit value. */
function ctz(v: number): number {
  return 31 - Math.clz32(v & -v);
}

/**
 * A sparse bit set: chunks of 65536 bits, absent when clear and shared when full, so a
 * mostly-clean bitmap of a large disk costs little and clean stretches are skipped quickly.
 * Bit indexes go up to 2^32 (512 MiB of bitmap), beyond 32-bit integers, hence plain division.
 */
class SparseBits {
  readonly #chunks: (Uint32Array | undefined)[] = [];
  readonly size: number;

  constructor(size: number) {
    this.size = size;
  }

  /** Set bits `[first, end)`. */
  set(first: number, end: number): void {
    end = Math.min(end, this.size);
    while (first < end) {
      const ci = Math.floor(first / CHUNK_BITS);
      const c0 = ci * CHUNK_BITS;
      const s = first - c0;
      const e = Math.min(end - c0, CHUNK_BITS);
      let c = this.#chunks[ci];
      if (s === 0 && e === CHUNK_BITS) {
        this.#chunks[ci] = FULL;
      } else if (c !== FULL) {
        if (c === undefined) c = this.#chunks[ci] = new Uint32Array(CHUNK_WORDS);
        setWordBits(c, s, e);
      }
      first = c0 + e;
    }
  }

  /** First set bit in `[from, limit)`, or -1. */
  nextSet(from: number, limit: number): number {
    limit = Math.min(limit, this.size);
    let b = from;
    while (b < limit) {
      const ci = Math.floor(b / CHUNK_BITS);
      const c0 = ci * CHUNK_BITS;
      const c = this.#chunks[ci];
      if (c === FULL) return b;
      if (c !== undefined) {
        const r = scan(c, b - c0, Math.min(limit - c0, CHUNK_BITS), false);
        if (r >= 0) return c0 + r;
      }
      b = c0 + CHUNK_BITS;
    }
    return -1;
  }

  /** First clear bit in `[from, limit)`, or `limit`. */
  nextClear(from: number, limit: number): number {
    let b = from;
    while (b < limit) {
      if (b >= this.size) return b;
      const ci = Math.floor(b / CHUNK_BITS);
      const c0 = ci * CHUNK_BITS;
      const c = this.#chunks[ci];
      if (c === undefined) return b;
      if (c !== FULL) {
        const r = scan(c, b - c0, Math.min(limit - c0, CHUNK_BITS), true);
        if (r >= 0) return c0 + r;
      }
      b = c0 + CHUNK_BITS;
    }
    return limit;
  }

  /** Number of set bits. */
  count(): number {
    let n = 0;
    this.#chunks.forEach((c, ci) => {
      if (c === FULL) n += Math.min(CHUNK_BITS, this.size - ci * CHUNK_BITS);
      else if (c !== undefined) { for (const w of c) n += popcount(w); }
    });
    return n;
  }

  /** 32 bits starting at `bit` (a multiple of 32), bit 0 of the result first. */
  word(bit: number): number {
    const ci = Math.floor(bit / CHUNK_BITS);
    const c = this.#chunks[ci];
    if (c === undefined) return 0;
    if (c === FULL) return 0xffffffff;
    return c[(bit - ci * CHUNK_BITS) >>> 5]!;
  }

  /** OR `v` into the 32 bits starting at `bit` (a multiple of 32; bits past `size` dropped). */
  orWord(bit: number, v: number): void {
    if (v === 0 || bit >= this.size) return;
    const room = this.size - bit;
    if (room < 32) v &= (1 << room) - 1;
    if (v === 0) return;
    const ci = Math.floor(bit / CHUNK_BITS);
    let c = this.#chunks[ci];
    if (c === FULL) return;
    if (c === undefined) c = this.#chunks[ci] = new Uint32Array(CHUNK_WORDS);
    c[(bit - ci * CHUNK_BITS) >>> 5]! |= v;
  }
}

function popcount(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** Set bits `[s, e)` of a chunk. */
function setWordBits(c: Uint32Array, s: number, e: number): void {
  while (s < e) {
    const w = s >>> 5;
    const lo = s & 31;
    const hi = Math.min(e - (w << 5), 32);
    const mask = hi === 32 ? (0xffffffff << lo) : ((1 << hi) - 1) & (0xffffffff << lo);
    c[w]! |= mask;
    s = (w << 5) + hi;
  }
}

/** First set (or, with `clear`, clear) bit of a chunk in `[s, e)`, or -1. */
function scan(c: Uint32Array, s: number, e: number, clear: boolean): number {
  for (let w = s >>> 5; w << 5 < e; w++) {
    let v = clear ? ~c[w]! : c[w]!;
    if (w << 5 < s) v &= 0xffffffff << (s & 31);
    const top = e - (w << 5);
    if (top < 32) v &= (1 << top) - 1;
    if (v !== 0) return (w << 5) + ctz(v);
  }
  return -1;
}

/** What a {@link DirtyBitmap} is made from. */
export interface DirtyBitmapInit {
  readonly name: string;
  readonly granularityBits: number;
  /** Bytes covered ({@link bitmapLength} of the virtual size). */
  readonly length: number;
  /** The `auto` flag: writes mark it. */
  readonly enabled: boolean;
  /** in_use was set when the image was opened: the contents are unusable. */
  readonly inUse: boolean;
}

/**
 * A dirty bitmap in memory, at its granularity: qemu's BdrvDirtyBitmap for one persistent
 * bitmap. Block status over it reproduces qemu-nbd's `qemu:dirty-bitmap:NAME` replies.
 */
export class DirtyBitmap implements BlockBitmap {
  readonly name: string;
  /** Bytes per bit. */
  readonly granularity: number;
  readonly granularityBits: number;
  /** Bytes covered. */
  readonly length: number;
  /** Number of bits. */
  readonly bits: number;
  readonly #enabled: boolean;
  readonly #inUse: boolean;
  readonly #set: SparseBits;

  constructor(init: DirtyBitmapInit) {
    this.name = init.name;
    this.granularityBits = init.granularityBits;
    this.granularity = 2 ** init.granularityBits;
    this.length = init.length;
    this.bits = Math.ceil(init.length / this.granularity);
    this.#enabled = init.enabled;
    this.#inUse = init.inUse;
    this.#set = new SparseBits(this.bits);
  }

  /** The `auto` flag: writes mark this bitmap. */
  get isEnabled(): boolean {
    return this.#enabled;
  }

  /** in_use was set at open ("inconsistent"): never exported, never stored. */
  get inUse(): boolean {
    return this.#inUse;
  }

  /** Number of dirty bits (granules). */
  get dirtyCount(): number {
    return this.#set.count();
  }

  /**
   * Record a guest write, write-zeroes or discard of `[offset, offset+length)`: every granule it
   * touches becomes dirty. Does nothing on a disabled bitmap (qemu skips those).
   */
  mark(offset: number, length: number): void {
    if (!this.#enabled || length <= 0) return;
    this.setDirty(offset, length);
  }

  /** Mark `[offset, offset+length)` dirty whatever the enabled state (loading, tests). */
  setDirty(offset: number, length: number): void {
    if (length <= 0) return;
    const g = this.granularity;
    this.#set.set(Math.floor(offset / g), Math.ceil((offset + length) / g));
  }

  /** True when the granule holding `offset` is dirty. */
  isDirty(offset: number): boolean {
    const bit = Math.floor(offset / this.granularity);
    return this.#set.nextSet(bit, bit + 1) === bit;
  }

  /**
   * Dirty status of `[offset, offset+length)` as qemu's `bitmap_to_extents`: dirty runs are the
   * dirty granules clipped to the request, clean gaps between them 0, and a final clean extent
   * up to the end unless `out` filled up first.
   */
  extents(offset: number, length: number, out: ExtentList): void {
    const end = offset + length;
    const stop = Math.min(end, this.length);
    const g = this.granularity;
    const lastBit = Math.ceil(stop / g);
    let start = offset;
    // Each pass consumes at least one dirty run; `out` bounds the number of passes.
    while (start < stop) {
      const d = this.#set.nextSet(Math.floor(start / g), lastBit);
      if (d < 0) break;
      const dirtyStart = Math.max(start, d * g);
      const dirtyEnd = Math.min(stop, this.#set.nextClear(d, lastBit) * g);
      if (!out.add(dirtyStart - start, 0) || !out.add(dirtyEnd - dirtyStart, STATE_DIRTY)) return;
      start = dirtyEnd;
    }
    out.add(end - start, 0);
  }

  /** Bits `[first, first + 8*out.length)` serialized into `out` (LSB first); `first` % 32 == 0. */
  serialize(first: number, out: Uint8Array): void {
    const v = new DataView(out.buffer, out.byteOffset, out.byteLength);
    const words = out.length >>> 2;
    for (let i = 0; i < words; i++) v.setUint32(i * 4, this.#set.word(first + i * 32), true);
    for (let i = words * 4; i < out.length; i++) out[i] = 0;
  }

  /** OR serialized bits (LSB first) from `data` into bits starting at `first` (% 32 == 0). */
  deserialize(first: number, data: Uint8Array): void {
    const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
    const words = data.length >>> 2;
    for (let i = 0; i < words && first + i * 32 < this.bits; i++) {
      this.#set.orWord(first + i * 32, v.getUint32(i * 4, true));
    }
  }

  /** First dirty bit in `[from, limit)`, or -1 (for serialization). */
  nextDirtyBit(from: number, limit: number): number {
    return this.#set.nextSet(from, limit);
  }

  /** Mark bits `[first, end)` dirty (all-ones table entries). */
  setBits(first: number, end: number): void {
    this.#set.set(first, end);
  }
}

// ---------------------------------------------------------------------------------------------
// Serialization for the store

/** A bitmap's on-disk image: the table size and the data clusters that hold a set bit. */
export interface SerializedBitmap {
  /** Table entries (one per cluster of serialized bitmap). */
  readonly tableSize: number;
  /** Clusters with at least one set bit, ascending by index; `data` is one whole cluster. */
  readonly clusters: readonly { readonly index: number; readonly data: Uint8Array }[];
}

/**
 * Serialize `bitmap` for a table of `clusterSize`-byte clusters, as qemu's `store_bitmap_data`
 * does: all-zero clusters are left out (table entry 0), the rest are whole zero-padded clusters.
 */
export function serializeBitmap(bitmap: DirtyBitmap, clusterSize: number): SerializedBitmap {
  const tableSize = bitmapTableSize(bitmap.length, bitmap.granularityBits, clusterSize);
  if (tableSize > MAX_TABLE_ENTRIES || tableSize * clusterSize > MAX_BITMAP_BYTES) {
    throw einval(`Bitmap '${bitmap.name}' is too big`);
  }
  const perCluster = clusterSize * 8;
  const clusters: { index: number; data: Uint8Array }[] = [];
  // Each pass emits one cluster, so the loop runs at most tableSize times.
  for (let bit = bitmap.nextDirtyBit(0, bitmap.bits); bit >= 0;) {
    const index = Math.floor(bit / perCluster);
    const data = new Uint8Array(clusterSize);
    bitmap.serialize(index * perCluster, data);
    clusters.push({ index, data });
    bit = bitmap.nextDirtyBit((index + 1) * perCluster, bitmap.bits);
  }
  return { tableSize, clusters };
}

// ---------------------------------------------------------------------------------------------
// Loading at open

/** File access for loading: reads past the end of the file return zeroes. */
export type ReadAt = (buf: Uint8Array, offset: number) => Promise<void>;

/** One bitmap of an image with its on-disk location (internal to the load/store functions). */
export interface StoredBitmap {
  readonly bitmap: DirtyBitmap;
  entry: BitmapDirEntryInit;
  /** The decoded table, kept to free its clusters after a store; undefined when in_use. */
  table: number[] | undefined;
}

/** What {@link loadImageBitmaps} needs from the header. */
export interface BitmapHeaderInfo {
  readonly version: number;
  readonly clusterSize: number;
  readonly size: number;
  readonly autoclear: bigint;
  readonly bitmaps: BitmapsExtensionFields | undefined;
}

/** Largest read issued while loading data clusters. */
const MAX_READ = 1 << 20;

/**
 * The persistent bitmaps of one qcow2 image (not of its backing chain): lookup by name for -B,
 * write tracking, and the on-disk state the store-on-close replaces.
 */
export class ImageBitmaps {
  readonly #stored: StoredBitmap[];
  #directory: { offset: number; size: number } | undefined;

  /** @internal use {@link loadImageBitmaps} */
  constructor(stored: StoredBitmap[], directory: { offset: number; size: number } | undefined) {
    this.#stored = stored;
    this.#directory = directory;
  }

  /** An image without bitmaps. */
  static empty(): ImageBitmaps {
    return new ImageBitmaps([], undefined);
  }

  /** Every bitmap, in directory order (inconsistent ones included). */
  get list(): readonly DirtyBitmap[] {
    return this.#stored.map((s) => s.bitmap);
  }

  /** The directory as last read or written: file offset and size in bytes. */
  get directory(): { readonly offset: number; readonly size: number } | undefined {
    return this.#directory;
  }

  /** The bitmap named `name` (exact match, as qemu's strcmp), or undefined. */
  find(name: string): DirtyBitmap | undefined {
    return this.#stored.find((s) => s.bitmap.name === name)?.bitmap;
  }

  /** True when some bitmap is consistent (a read-write open must mark and later store them). */
  get hasConsistent(): boolean {
    return this.#stored.some((s) => !s.bitmap.inUse);
  }

  /**
   * Record a guest write / write-zeroes / discard of `[offset, offset+length)` in every enabled
   * bitmap. The writer calls this for each such request reaching the image, after it completes,
   * success or not (qemu's `bdrv_co_write_req_finish`).
   */
  mark(offset: number, length: number): void {
    for (const s of this.#stored) s.bitmap.mark(offset, length);
  }

  /** @internal for {@link storeBitmaps} / {@link markBitmapsInUse} */
  get stored(): StoredBitmap[] {
    return this.#stored;
  }

  /** @internal */
  setDirectory(d: { offset: number; size: number } | undefined): void {
    this.#directory = d;
  }
}

/** Options of {@link loadImageBitmaps}. */
export interface LoadBitmapsOptions {
  /** Positional reads of the image file (zero-filled past its end). */
  readonly read: ReadAt;
  /** Where qemu's warnings go (autoclear bit cleared by another program). */
  readonly warn?: (message: string) => void;
}

/**
 * Load every bitmap of an image as qemu's `qcow2_load_dirty_bitmaps` does at open: validate the
 * extension and directory, then per bitmap in directory order create it (duplicate names fail),
 * and unless it is in_use read and check its table and data. Any failure fails the open.
 */
export async function loadImageBitmaps(
  h: BitmapHeaderInfo,
  options: LoadBitmapsOptions,
): Promise<ImageBitmaps> {
  const ext = h.bitmaps;
  if (ext === undefined) return ImageBitmaps.empty();
  if ((h.autoclear & AUTOCLEAR_BITMAPS) === 0n) {
    options.warn?.(lostBitmapsWarning(h.version));
    return ImageBitmaps.empty();
  }
  const cs = h.clusterSize;
  validateBitmapsExtension(ext, cs);
  const length = bitmapLength(h.size);
  if (ext.directorySize === 0) throw einval("Requested bitmap directory size is zero");
  const dir = new Uint8Array(ext.directorySize);
  await options.read(dir, ext.directoryOffset);
  const entries = parseBitmapDirectory(dir, ext.nbBitmaps, {
    clusterSize: cs,
    length,
    directoryOffset: ext.directoryOffset,
  });
  const stored: StoredBitmap[] = [];
  const names = new Set<string>();
  for (const e of entries) {
    if (names.has(e.name)) throw einval(`Bitmap already exists: ${e.name}`);
    names.add(e.name);
    const inUse = (e.flags & BITMAP_FLAG_IN_USE) !== 0;
    const bitmap = new DirtyBitmap({
      name: e.name,
      granularityBits: e.granularityBits,
      length,
      enabled: (e.flags & BITMAP_FLAG_AUTO) !== 0,
      inUse,
    });
    let table: number[] | undefined;
    if (!inUse) {
      table = await readTable(e, cs, options.read);
      await loadData(bitmap, e, table, cs, options.read);
    }
    stored.push({ bitmap, entry: e, table });
  }
  return new ImageBitmaps(stored, { offset: ext.directoryOffset, size: ext.directorySize });
}

async function readTable(e: BitmapDirEntry, cs: number, read: ReadAt): Promise<number[]> {
  const bytes = new Uint8Array(e.tableSize * 8);
  await read(bytes, e.tableOffset);
  return parseBitmapTable(
    bytes,
    cs,
    (detail) =>
      einval(
        `Could not read bitmap_table table from image for bitmap '${e.name}': ` +
          `Invalid argument (table at ${hex(e.tableOffset)}: ${detail})`,
      ),
  );
}

async function loadData(
  bitmap: DirtyBitmap,
  e: BitmapDirEntry,
  table: readonly number[],
  cs: number,
  read: ReadAt,
): Promise<void> {
  const need = bitmapTableSize(bitmap.length, e.granularityBits, cs);
  if (need !== table.length || need > MAX_TABLE_ENTRIES) {
    throw einval(
      `Could not read bitmap '${e.name}' from image: Invalid argument (its table has ` +
        `${table.length} entries, ${bitmap.length} bytes at granularity ${bitmap.granularity} ` +
        `need ${need})`,
    );
  }
  const perCluster = cs * 8;
  // Coalesce runs of consecutive data clusters into reads of up to MAX_READ bytes.
  for (let i = 0; i < table.length;) {
    const t = table[i]!;
    if (t === 0) {
      i++;
      continue;
    }
    if (t === TABLE_ONES) {
      bitmap.setBits(i * perCluster, (i + 1) * perCluster);
      i++;
      continue;
    }
    let n = 1;
    while (
      i + n < table.length && table[i + n] === t + n * cs && (n + 1) * cs <= Math.max(MAX_READ, cs)
    ) n++;
    const buf = new Uint8Array(n * cs);
    await read(buf, t);
    for (let k = 0; k < n; k++) {
      bitmap.deserialize((i + k) * perCluster, buf.subarray(k * cs, (k + 1) * cs));
    }
    i += n;
  }
}

// ---------------------------------------------------------------------------------------------
// Writing back (called by the qcow2 writer)

/** The writer's primitives the bitmap updates need. */
export interface BitmapStoreIo {
  readonly clusterSize: number;
  /** Allocate contiguous clusters for `bytes` (rounded up), refcount +1; returns the offset. */
  allocate(bytes: number): Promise<number>;
  /** Write `data` at a host offset (no flush). */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** qemu's `qcow2_flush_caches`: write dirty L2 / refcount metadata, then fdatasync. */
  flushCaches(): Promise<void>;
  /**
   * Rewrite the header with this bitmaps extension and autoclear bit 0 as given, then
   * fdatasync (qemu's `update_header_sync`). The extension data is
   * {@link encodeBitmapsExtension}.
   */
  updateHeader(ext: BitmapsExtensionFields, autoclearBitmaps: boolean): Promise<void>;
  /**
   * Refcount −1 over `bytes` from `offset` (qemu's `qcow2_free_clusters`; qemu punches freed
   * bitmap data clusters, not tables or directories).
   */
  free(offset: number, bytes: number): Promise<void>;
}

/**
 * Read-write open: set in_use on every consistent bitmap, rewriting the directory in place
 * between header updates with autoclear bit 0 cleared (qemu's
 * `update_ext_header_and_dir_in_place`). Does nothing when no bitmap is consistent.
 */
export async function markBitmapsInUse(image: ImageBitmaps, io: BitmapStoreIo): Promise<void> {
  const dir = image.directory;
  if (dir === undefined || !image.hasConsistent) return;
  const entries = image.stored.map((s) => ({
    ...s.entry,
    flags: s.bitmap.inUse ? s.entry.flags : s.entry.flags | BITMAP_FLAG_IN_USE,
  }));
  const bytes = encodeBitmapDirectory(entries);
  if (bytes.length !== dir.size) {
    // qemu refuses too (a name stored with trailing NULs changes the entry size).
    throw einval("Can't update bitmap directory: Invalid argument");
  }
  const ext = { nbBitmaps: entries.length, directorySize: dir.size, directoryOffset: dir.offset };
  await io.updateHeader(ext, false);
  await io.write(dir.offset, bytes);
  await io.updateHeader(ext, false);
  await io.updateHeader(ext, true);
  image.stored.forEach((s, i) => s.entry = entries[i]!);
}

/**
 * Close of a read-write image: write every consistent bitmap to new clusters with in_use
 * cleared, switch the header to a new directory, then free the old directory, tables and data
 * (the order in the module comment). In_use (inconsistent) bitmaps keep their entry as it is.
 * Does nothing when no bitmap is consistent.
 */
export async function storeBitmaps(image: ImageBitmaps, io: BitmapStoreIo): Promise<void> {
  if (!image.hasConsistent) return;
  const cs = io.clusterSize;
  const drop: { offset: number; size: number; table: readonly number[] }[] = [];
  const next: { entry: BitmapDirEntryInit; table: number[] | undefined }[] = [];
  for (const s of image.stored) {
    if (s.bitmap.inUse) {
      next.push({ entry: s.entry, table: s.table });
      continue;
    }
    const ser = serializeBitmap(s.bitmap, cs);
    const table = new Array<number>(ser.tableSize).fill(0);
    for (const c of ser.clusters) {
      const off = await io.allocate(cs);
      table[c.index] = off;
      await io.write(off, c.data);
    }
    const tableOffset = await io.allocate(ser.tableSize * 8);
    await io.write(tableOffset, encodeBitmapTable(table));
    drop.push({
      offset: s.entry.tableOffset,
      size: s.entry.tableSize * 8,
      table: s.table ?? [],
    });
    next.push({
      entry: {
        tableOffset,
        tableSize: ser.tableSize,
        flags: s.bitmap.isEnabled ? BITMAP_FLAG_AUTO : 0,
        granularityBits: s.bitmap.granularityBits,
        nameBytes: s.entry.nameBytes,
      },
      table,
    });
  }
  const dirBytes = encodeBitmapDirectory(next.map((n) => n.entry));
  if (dirBytes.length > MAX_DIRECTORY_BYTES) throw einval("Bitmap directory is too large");
  const dirOffset = await io.allocate(dirBytes.length);
  await io.write(dirOffset, dirBytes);
  await io.flushCaches();
  await io.updateHeader(
    { nbBitmaps: next.length, directorySize: dirBytes.length, directoryOffset: dirOffset },
    true,
  );
  const old = image.directory;
  image.setDirectory({ offset: dirOffset, size: dirBytes.length });
  image.stored.forEach((s, i) => {
    s.entry = next[i]!.entry;
    s.table = next[i]!.table;
  });
  if (old !== undefined) await io.free(old.offset, old.size);
  for (const d of drop) {
    for (const t of d.table) if (t > 0) await io.free(t, cs);
    await io.free(d.offset, d.size);
  }
}
