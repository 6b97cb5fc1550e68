/**
 * The VMDK format driver, as qemu 7.2's block/vmdk.c serves it: monolithicSparse and
 * streamOptimized ("KDMV" with an embedded descriptor), text descriptors (monolithicFlat,
 * twoGbMaxExtentSparse/Flat, vmfs, vmfsSparse) naming FLAT, VMFS, SPARSE and VMFSSPARSE
 * ("COWD") extents, versions 1-3, zeroed grains, and parentFileNameHint/parentCID backing chains.
 *
 * - A grain whose table entry is 0 is unallocated: the backing file's bytes (zeroes without one);
 *   entry 1 with the zeroed-grain flag reads as zeroes and is allocated; a FLAT extent is data,
 *   its file's holes report zero (qemu recurses into the file for flat extents).
 * - A write into an unallocated grain allocates the next grain at the end of the extent file,
 *   writes the whole grain (the backing file's bytes around the request, or zeroes), then the
 *   grain table entry and its redundant copy, in that order; the first write after open puts a
 *   new random CID in the descriptor (qemu's vmdk_write_cid).
 * - streamOptimized: only whole unallocated grains may be written (compressed, with a marker);
 *   a write to an allocated grain is EIO, a partial one EINVAL, as in qemu.
 * - Write-zeroes sets whole grains to the zeroed entry when the image has zeroed grains; other
 *   parts are written as zero data, and fast zero fails with ENOTSUP there (qemu's fallback).
 *
 * Allocations and descriptor updates are serialised by one lock; reads and writes to allocated
 * grains do not wait (qemu holds one lock for all I/O).
 *
 * @module
 */

import { deflateSync, inflateSync } from "node:zlib";
import type { FileEngine } from "../../io/file_engine.ts";
import type { FormatContext, FormatDriver } from "../formats.ts";
import type { BackingChain } from "../qcow2/mod.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  ExtentList,
  type FileRange,
  STATE_HOLE,
  STATE_ZERO,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";
import {
  COMPRESSION_DEFLATE,
  cString,
  decodeVmdk3Header,
  decodeVmdk4Header,
  DESC_READ_MAX,
  DESC_SIZE,
  descriptionValue,
  EXTENT_MAX_SECTORS,
  FLAG_MARKER,
  FLAG_RGD,
  FLAG_ZERO_GRAIN,
  GD_AT_END,
  GTE_ZEROED,
  MARKER_EOS,
  MARKER_FOOTER,
  parentHint,
  parseExtentLines,
  probeVmdk,
  readCid,
  SECTOR,
  VMDK3_MAGIC,
  VMDK4_HEADER_SIZE,
  VMDK4_MAGIC,
  type Vmdk4Header,
  withCid,
} from "./header.ts";
import { Mutex } from "../qcow2/sync.ts";
import { backingDepth } from "../backing_depth.ts";

/** The vmdk entry of the format registry (lib/block/formats.ts). */
export const vmdkFormat: FormatDriver = {
  name: "vmdk",
  probe: (head) => probeVmdk(head),
  open: (file, ctx) => openVmdk(file, ctx),
};

/** Cached grain tables per extent (bytes); past it the oldest tables are dropped. */
const L2_CACHE_BYTES = 64 * 1024 * 1024;
const ZERO_CHUNK = 1024 * 1024;
/** Descriptors naming sparse extents that are descriptors again: how deep denbd follows. */
const MAX_NESTING = 4;

/** Unallocated, zeroed or at a file offset: what a grain lookup returns. */
const UNALLOC = -2;
const ZEROED = -3;

async function readPadded(file: FileEngine, buf: Uint8Array, offset: number): Promise<void> {
  const n = offset < 0 ? 0 : await file.pread(buf, offset);
  if (n < buf.length) buf.fill(0, n);
}

/** One extent: a flat range of a file, or a sparse extent with its grain directory. */
class Extent {
  readonly file: FileEngine;
  readonly flat: boolean;
  /** Guest bytes before this extent and its length in bytes. */
  start = 0;
  readonly bytes: number;
  readonly flatStart: number;
  readonly grainBytes: number;
  readonly compressed: boolean;
  readonly hasMarker: boolean;
  readonly zeroGrain: boolean;
  readonly l1: Uint32Array;
  readonly l1Backup: Uint32Array | undefined;
  readonly l2Entries: number;
  readonly l1EntryBytes: number;
  nextClusterSector: number;
  /** The file's length when last looked at (it only grows). */
  knownLength: number;
  readonly #l2 = new Map<number, Uint32Array | Promise<Uint32Array>>();
  #l2Bytes = 0;

  constructor(init: {
    file: FileEngine;
    flat: boolean;
    sectors: number;
    flatStart?: number;
    clusterSectors?: number;
    l2Entries?: number;
    l1?: Uint32Array;
    l1Backup?: Uint32Array;
    compressed?: boolean;
    hasMarker?: boolean;
    zeroGrain?: boolean;
  }) {
    this.file = init.file;
    this.flat = init.flat;
    this.bytes = init.sectors * SECTOR;
    this.flatStart = init.flatStart ?? 0;
    const cs = init.flat ? init.sectors : init.clusterSectors!;
    this.grainBytes = cs * SECTOR;
    this.l2Entries = init.l2Entries ?? 0;
    this.l1EntryBytes = (((this.l2Entries * (init.clusterSectors ?? 0)) >>> 0) || 1) * SECTOR;
    this.l1 = init.l1 ?? new Uint32Array(0);
    this.l1Backup = init.l1Backup;
    this.compressed = init.compressed ?? false;
    this.hasMarker = init.hasMarker ?? false;
    this.zeroGrain = init.zeroGrain ?? false;
    this.knownLength = init.file.length();
    const fileSectors = Math.ceil(this.knownLength / SECTOR);
    this.nextClusterSector = init.flat ? 0 : Math.ceil(fileSectors / cs) * cs;
  }

  get end(): number {
    return this.start + this.bytes;
  }

  /** The cached grain table at sector `l2Sector`, or undefined when it must be loaded. */
  cachedTable(l2Sector: number): Uint32Array | undefined {
    const t = this.#l2.get(l2Sector);
    return t instanceof Uint32Array ? t : undefined;
  }

  table(l2Sector: number): Uint32Array | Promise<Uint32Array> {
    const t = this.#l2.get(l2Sector);
    if (t !== undefined) return t;
    const size = this.l2Entries * 4;
    const p = (async () => {
      const bytes = new Uint8Array(size);
      await readPadded(this.file, bytes, l2Sector * SECTOR);
      // Entries are little-endian: read in place on the little-endian hosts denbd runs on.
      const tab = new Uint32Array(bytes.buffer);
      while (this.#l2Bytes + size > L2_CACHE_BYTES && this.#l2.size > 0) {
        const [oldest, t] = this.#l2.entries().next().value!;
        this.#l2.delete(oldest);
        // A table still loading was not counted yet.
        if (t instanceof Uint32Array) this.#l2Bytes -= size;
      }
      this.#l2.set(l2Sector, tab);
      this.#l2Bytes += size;
      return tab;
    })();
    this.#l2.set(l2Sector, p);
    p.catch(() => this.#l2.delete(l2Sector));
    return p;
  }
}

/** Where one grain lookup landed. */
interface Where {
  /** File offset of the grain start, or UNALLOC / ZEROED; -1 for a lookup error (EIO). */
  at: number;
  l1Index: number;
  l2Index: number;
  l2Sector: number;
}

/** Opens a VMDK image over `file`; closes every file it opened when opening fails. */
export async function openVmdk(file: FileEngine, ctx: FormatContext): Promise<VmdkDevice> {
  const extents: Extent[] = [];
  const opened: FileEngine[] = [file];
  let backing: BlockDevice | undefined;
  try {
    const st: OpenState = { ctx, extents, opened, descOffset: 0, desc: "" };
    const head = await readHead(file);
    const magic = new DataView(head.buffer).getUint32(0);
    if (magic === VMDK3_MAGIC || magic === VMDK4_MAGIC) {
      await openSparse(st, file, head, 0);
      st.descOffset = 0x200;
    } else {
      await openDescriptor(st, file, head, 0);
    }
    const descBytes = new Uint8Array(DESC_SIZE);
    await readPadded(file, descBytes, st.descOffset);
    descBytes[DESC_SIZE - 1] = 0;
    const desc = cString(descBytes);
    const hint = parentHint(desc, file.path);
    const cid = readCid(desc, false);
    const parentCid = readCid(desc, true);
    if (cid === undefined || parentCid === undefined) {
      throw new BlockError(Errno.EINVAL, `Could not open '${file.path}': Invalid argument`);
    }
    let pos = 0;
    for (const e of extents) {
      e.start = pos;
      pos += e.bytes;
    }
    if (pos > Number.MAX_SAFE_INTEGER) throw tooLarge(pos, `VMDK image '${file.path}'`);
    let parentOk = true;
    if (hint !== "") {
      backing = await openParent(file.path, hint, ctx.chain, ctx);
      parentOk = backing instanceof VmdkDevice && backing.cid === parentCid;
    }
    return new VmdkDevice(file, extents, opened, {
      writable: ctx.writable,
      backing,
      descOffset: st.descOffset,
      cid,
      parentOk,
    });
  } catch (e) {
    for (const f of opened) f.close();
    await backing?.close();
    throw e;
  }
}

interface OpenState {
  readonly ctx: FormatContext;
  readonly extents: Extent[];
  readonly opened: FileEngine[];
  descOffset: number;
  desc: string;
}

/**
 * A name relative to the image's directory, as qemu's path_combine joins it (no normalisation);
 * the same rule as qcow2's resolveBackingPath, kept here because importing qcow2/mod.ts would
 * close an import cycle through formats.ts.
 */
function resolveBackingPath(imagePath: string, name: string): string {
  if (name.startsWith("/")) return name;
  const slash = imagePath.lastIndexOf("/");
  return slash < 0 ? name : imagePath.slice(0, slash + 1) + name;
}

function realPath(path: string): string {
  try {
    return Deno.realPathSync(path);
  } catch {
    return path;
  }
}

async function openParent(
  path: string,
  hint: string,
  chain: BackingChain,
  ctx: FormatContext,
): Promise<BlockDevice> {
  const below: BackingChain = { paths: [...chain.paths, realPath(path)] };
  const target = resolveBackingPath(path, hint);
  if (below.paths.includes(realPath(target))) {
    throw new BlockError(
      Errno.EINVAL,
      `Backing file loop detected: '${path}' has parent '${hint}', which is above it in the chain`,
    );
  }
  try {
    return await ctx.openBacking(target, "vmdk", below);
  } catch (e) {
    // qemu's bdrv_open_backing_file prepends this at every level of the chain.
    if (!(e instanceof BlockError)) throw e;
    throw new BlockError(e.errno, `Could not open backing file: ${e.message}`);
  }
}

/** qemu's vmdk_read_desc: up to 1 MiB - 1 of the file's start. */
async function readHead(file: FileEngine): Promise<Uint8Array> {
  // qemu's bdrv_getlength counts whole sectors: only an empty file is too small.
  const size = Math.ceil(file.length() / SECTOR) * SECTOR;
  if (size < 4) throw new BlockError(Errno.EINVAL, "File is too small, not a valid image");
  const buf = new Uint8Array(Math.min(size, DESC_READ_MAX));
  await readPadded(file, buf, 0);
  return buf;
}

async function openDescriptor(
  st: OpenState,
  file: FileEngine,
  head: Uint8Array,
  depth: number,
): Promise<void> {
  if (depth > MAX_NESTING) {
    throw new BlockError(Errno.EINVAL, `VMDK descriptor nesting too deep in '${file.path}'`);
  }
  const desc = cString(head);
  const ct = descriptionValue(desc, "createType", 128);
  if (ct === undefined) throw new BlockError(Errno.EINVAL, "invalid VMDK image descriptor");
  const types = [
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
  ];
  if (!types.includes(ct)) {
    throw new BlockError(Errno.ENOTSUP, `Unsupported image type '${ct}'`);
  }
  st.descOffset = 0;
  for (const line of parseExtentLines(desc)) {
    const path = resolveBackingPath(file.path, line.fileName);
    if (line.type === "SESPARSE") {
      throw new BlockError(Errno.ENOTSUP, `Unsupported extent type '${line.type}'`);
    }
    if (line.sectors > 2 ** 53 / SECTOR || line.flatOffset > 2 ** 53 / SECTOR) {
      throw tooLarge(line.sectors * SECTOR, `Extent '${path}'`);
    }
    const ef = st.ctx.openFile(path, st.ctx.writable);
    st.opened.push(ef);
    if (line.type === "FLAT" || line.type === "VMFS") {
      st.extents.push(
        new Extent({
          file: ef,
          flat: true,
          sectors: line.sectors,
          flatStart: line.flatOffset * SECTOR,
        }),
      );
    } else {
      await openSparse(st, ef, await readHead(ef), depth + 1);
    }
  }
}

async function openSparse(
  st: OpenState,
  file: FileEngine,
  head: Uint8Array,
  depth: number,
): Promise<void> {
  const magic = new DataView(head.buffer, head.byteOffset).getUint32(0);
  if (magic === VMDK3_MAGIC) return await openCowd(st, file, head);
  if (magic !== VMDK4_MAGIC) throw new BlockError(Errno.EINVAL, "Image not in VMDK format");
  let h = decodeVmdk4Header(head.subarray(4));
  if (h.capacity === 0n && h.descOffset !== 0n) {
    const off = Number(h.descOffset) * SECTOR;
    const size = Math.ceil(file.length() / SECTOR) * SECTOR;
    const buf = new Uint8Array(Math.min(size, DESC_READ_MAX));
    await readPadded(file, buf, off);
    return await openDescriptor(st, file, buf, depth + 1);
  }
  if (h.gdOffset === GD_AT_END) h = await readFooter(file);
  const compressed = h.compressAlgorithm === COMPRESSION_DEFLATE;
  if (h.version > 3) {
    throw new BlockError(Errno.ENOTSUP, `Unsupported VMDK version ${h.version}`);
  }
  if (h.version === 3 && st.ctx.writable && !compressed) {
    throw new BlockError(Errno.EINVAL, "VMDK version 3 must be read only");
  }
  if (h.numGtesPerGt > 512) throw new BlockError(Errno.EINVAL, "L2 table size too big");
  // qemu keeps the product in 32 bits.
  const l1EntrySectors = Number((BigInt(h.numGtesPerGt) * h.granularity) & 0xffffffffn);
  if (l1EntrySectors === 0) throw new BlockError(Errno.EINVAL, "L1 entry size is invalid");
  const l1Size = Number(
    ((h.capacity + BigInt(l1EntrySectors) - 1n) / BigInt(l1EntrySectors)) & 0xffffffffn,
  );
  const rgd = (h.flags & FLAG_RGD) !== 0 ? h.rgdOffset * 512n : 0n;
  const fileSectors = Math.ceil(file.length() / SECTOR);
  if (BigInt(fileSectors) < h.grainOffset) {
    throw new BlockError(
      Errno.EINVAL,
      `File truncated, expecting at least ${BigInt.asIntN(64, h.grainOffset * 512n)} bytes`,
    );
  }
  checkExtentGeometry(h.granularity, l1Size);
  if (h.capacity > BigInt(2 ** 53 / SECTOR)) {
    throw tooLarge(Number(h.capacity) * SECTOR, `Extent '${file.path}'`);
  }
  const gd = h.gdOffset * 512n;
  const l1 = await readTable(file, gd, l1Size);
  const l1Backup = rgd !== 0n ? await readTable(file, rgd, l1Size) : undefined;
  st.extents.push(
    new Extent({
      file,
      flat: false,
      sectors: Number(h.capacity),
      clusterSectors: Number(h.granularity),
      l2Entries: h.numGtesPerGt,
      l1,
      l1Backup,
      compressed,
      hasMarker: (h.flags & FLAG_MARKER) !== 0,
      zeroGrain: (h.flags & FLAG_ZERO_GRAIN) !== 0,
    }),
  );
}

/**
 * A size past what a number holds exactly: qemu's own message when qemu refuses it too (past
 * its BDRV_MAX_LENGTH, about 2^63), else denbd's (between 2^53 and 2^63 qemu would open it).
 */
function tooLarge(bytes: number, what: string): BlockError {
  if (bytes >= 2 ** 63) {
    return new BlockError(Errno.EFBIG, "Could not refresh total sector count: File too large");
  }
  return new BlockError(Errno.EFBIG, `${what} is too large for denbd (${bytes} bytes)`);
}

function checkExtentGeometry(granularity: bigint, l1Size: number): void {
  if (granularity > 0x200000n) {
    throw new BlockError(Errno.EFBIG, "Invalid granularity, image may be corrupt");
  }
  if (l1Size > 32 * 1024 * 1024) throw new BlockError(Errno.EFBIG, "L1 size too big");
}

async function readTable(file: FileEngine, offset: bigint, entries: number): Promise<Uint32Array> {
  const bytes = new Uint8Array(entries * 4);
  if (offset < BigInt(Number.MAX_SAFE_INTEGER)) await readPadded(file, bytes, Number(offset));
  else bytes.fill(0);
  return new Uint32Array(bytes.buffer);
}

/** The streamOptimized footer: a footer marker, a header sector and an end-of-stream marker. */
async function readFooter(file: FileEngine): Promise<Vmdk4Header> {
  const buf = new Uint8Array(1536);
  const at = Math.ceil(file.length() / SECTOR) * SECTOR - 1536;
  if (at < 0) {
    throw new BlockError(Errno.EIO, "Failed to read footer: Input/output error");
  }
  await readPadded(file, buf, at);
  const v = new DataView(buf.buffer);
  if (
    v.getUint32(512) !== VMDK4_MAGIC || v.getUint32(8, true) !== 0 ||
    v.getUint32(12, true) !== MARKER_FOOTER || v.getBigUint64(1024, true) !== 0n ||
    v.getUint32(1032, true) !== 0 || v.getUint32(1036, true) !== MARKER_EOS
  ) {
    throw new BlockError(Errno.EINVAL, "Invalid footer");
  }
  return decodeVmdk4Header(buf.subarray(516, 516 + VMDK4_HEADER_SIZE));
}

/** An ESX sparse extent ("COWD"): 4096-entry grain tables, qemu's vmdk_open_vmfs_sparse. */
async function openCowd(st: OpenState, file: FileEngine, head: Uint8Array): Promise<void> {
  const h = decodeVmdk3Header(head.subarray(4));
  checkExtentGeometry(BigInt(h.granularity), h.l1dirSize);
  if (h.granularity === 0) {
    // qemu divides by it; denbd refuses the image instead.
    throw new BlockError(Errno.EINVAL, "Invalid granularity, image may be corrupt");
  }
  const l1 = await readTable(file, BigInt(h.l1dirOffset) * 512n, h.l1dirSize);
  st.extents.push(
    new Extent({
      file,
      flat: false,
      sectors: h.diskSectors,
      clusterSectors: h.granularity,
      l2Entries: 4096,
      l1,
    }),
  );
}

interface DeviceOptions {
  readonly writable: boolean;
  readonly backing: BlockDevice | undefined;
  readonly descOffset: number;
  readonly cid: number;
  /** The parent's CID is the parentCID recorded here (else reads of the parent fail, EINVAL). */
  readonly parentOk: boolean;
}

export class VmdkDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #file: FileEngine;
  readonly #extents: readonly Extent[];
  readonly #files: readonly FileEngine[];
  readonly #backing: BlockDevice | undefined;
  readonly #descOffset: number;
  readonly #parentOk: boolean;
  readonly #lock = new Mutex();
  #cid: number;
  #cidUpdated = false;

  constructor(file: FileEngine, extents: Extent[], files: FileEngine[], o: DeviceOptions) {
    this.#file = file;
    this.#extents = extents;
    this.#files = files;
    this.#backing = o.backing;
    this.#descOffset = o.descOffset;
    this.#cid = o.cid;
    this.#parentOk = o.parentOk;
    this.size = extents.length === 0 ? 0 : extents[extents.length - 1]!.end;
    const w = o.writable;
    this.caps = {
      writable: w,
      flush: true,
      trim: w,
      zero: w,
      fastZero: w,
      extents: true,
      minBlock: 1,
    };
  }

  /** The image's CID (a parent's children record it as their parentCID). */
  get cid(): number {
    return this.#cid;
  }

  #extentAt(pos: number): Extent {
    for (const e of this.#extents) if (pos < e.end) return e;
    throw new BlockError(Errno.EIO, `VMDK offset ${pos} is in no extent`);
  }

  /** Looks up the grain holding `pos` (sparse extents). */
  #lookup(e: Extent, pos: number, w: Where): void | Promise<void> {
    const rel = pos - e.start;
    const l1Index = Math.floor(rel / e.l1EntryBytes);
    w.l1Index = l1Index;
    if (l1Index >= e.l1.length) {
      w.at = -1;
      return;
    }
    const l2Sector = e.l1[l1Index]!;
    w.l2Sector = l2Sector;
    if (l2Sector === 0) {
      w.at = UNALLOC;
      return;
    }
    const l2Index = Math.floor(rel / e.grainBytes) % e.l2Entries;
    w.l2Index = l2Index;
    const t = e.table(l2Sector);
    if (t instanceof Uint32Array) return this.#entry(e, t[l2Index]!, w);
    return t.then((tab) => this.#entry(e, tab[l2Index]!, w));
  }

  #entry(e: Extent, sector: number, w: Where): void {
    if (e.zeroGrain && sector === GTE_ZEROED) w.at = ZEROED;
    else if (sector === 0) w.at = UNALLOC;
    else w.at = sector * SECTOR;
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const reads: Promise<void>[] = [];
    const w: Where = { at: 0, l1Index: 0, l2Index: 0, l2Sector: 0 };
    // Grains that follow each other in the same file are read with one pread.
    let runFile: FileEngine | undefined;
    let runStart = 0;
    let runAt = 0;
    let runEnd = 0;
    const flushRun = () => {
      if (runFile !== undefined && runEnd > runStart) {
        reads.push(readPadded(runFile, buf.subarray(runStart, runEnd), runAt));
      }
      runFile = undefined;
    };
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const e = this.#extentAt(pos);
      const rel = pos - e.start;
      const inGrain = rel % e.grainBytes;
      const n = Math.min(buf.length - done, e.grainBytes - inGrain);
      const start = done;
      done += n;
      let at: number;
      if (e.flat) {
        at = e.flatStart + rel;
      } else {
        const p = this.#lookup(e, pos, w);
        if (p !== undefined) await p;
        if (w.at === -1) {
          throw new BlockError(Errno.EIO, `VMDK grain directory has no entry for ${pos}`);
        }
        if (w.at < 0 || e.compressed) {
          flushRun();
          const part = buf.subarray(start, done);
          if (w.at === ZEROED) part.fill(0);
          else if (w.at === UNALLOC) reads.push(this.#readBacking(part, pos));
          else reads.push(this.#readCompressed(e, w.at, inGrain, part));
          continue;
        }
        at = w.at + inGrain;
      }
      if (runFile === e.file && runAt + (runEnd - runStart) === at) {
        runEnd = done;
        continue;
      }
      flushRun();
      runFile = e.file;
      runStart = start;
      runAt = at;
      runEnd = done;
    }
    flushRun();
    await Promise.all(reads);
  }

  /** Zero-copy reads: a flat extent, or one uncompressed grain whose table is cached. */
  fileRange(offset: number, length: number): FileRange | undefined {
    const r = this.#direct(offset, length);
    return r === undefined ? undefined : { fd: r.e.file.fd, offset: r.at, data: !r.e.flat };
  }

  /** Plain writes straight into the file: as fileRange, once the CID has been updated. */
  writeRange(offset: number, length: number): FileRange | undefined {
    if (!this.caps.writable || !this.#cidUpdated) return undefined;
    const r = this.#direct(offset, length);
    if (r === undefined || (!r.e.flat && r.at + length > r.e.knownLength)) return undefined;
    return { fd: r.e.file.fd, offset: r.at, data: !r.e.flat };
  }

  #direct(offset: number, length: number): { e: Extent; at: number } | undefined {
    let e: Extent | undefined;
    for (const x of this.#extents) {
      if (offset < x.end) {
        e = x;
        break;
      }
    }
    if (e === undefined || offset + length > e.end || e.compressed) return undefined;
    const rel = offset - e.start;
    if (e.flat) return { e, at: e.flatStart + rel };
    const inGrain = rel % e.grainBytes;
    if (inGrain + length > e.grainBytes) return undefined;
    const l2Sector = e.l1[Math.floor(rel / e.l1EntryBytes)];
    if (l2Sector === undefined || l2Sector === 0) return undefined;
    const t = e.cachedTable(l2Sector);
    if (t === undefined) return undefined;
    const entry = t[Math.floor(rel / e.grainBytes) % e.l2Entries]!;
    if (entry === 0 || (e.zeroGrain && entry === GTE_ZEROED)) return undefined;
    return { e, at: entry * SECTOR + inGrain };
  }

  async #readBacking(part: Uint8Array, pos: number): Promise<void> {
    const b = this.#backing;
    if (b === undefined) {
      part.fill(0);
      return;
    }
    if (!this.#parentOk) {
      throw new BlockError(Errno.EINVAL, "VMDK parent CID does not match the image's parentCID");
    }
    const n = Math.max(0, Math.min(part.length, b.size - pos));
    if (n < part.length) part.fill(0, n);
    if (n > 0) await b.pread(part.subarray(0, n), pos);
  }

  async #readCompressed(e: Extent, at: number, inGrain: number, part: Uint8Array): Promise<void> {
    const gb = e.grainBytes;
    const raw = new Uint8Array(gb * 2);
    await readPadded(e.file, raw, at);
    let data = raw;
    let len = gb;
    if (e.hasMarker) {
      len = new DataView(raw.buffer).getUint32(8, true);
      data = raw.subarray(12);
    }
    const bad = () => new BlockError(Errno.EINVAL, `VMDK compressed grain at ${at} is damaged`);
    if (len === 0 || len > gb * 2) throw bad();
    let out: Uint8Array;
    try {
      out = inflateSync(data.subarray(0, len), { maxOutputLength: gb });
    } catch {
      throw bad();
    }
    if (inGrain + part.length > out.length) throw bad();
    part.set(out.subarray(inGrain, inGrain + part.length));
  }

  async pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "VMDK image is read-only");
    const w: Where = { at: 0, l1Index: 0, l2Index: 0, l2Sector: 0 };
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const e = this.#extentAt(pos);
      const rel = pos - e.start;
      const inGrain = rel % e.grainBytes;
      const n = Math.min(buf.length - done, e.grainBytes - inGrain);
      const part = buf.subarray(done, done + n);
      done += n;
      if (e.flat) {
        await e.file.pwrite(part, e.flatStart + rel);
      } else {
        const p = this.#lookup(e, pos, w);
        if (p !== undefined) await p;
        if (w.at >= 0 && !e.compressed) {
          // A damaged entry pointing past the end of the file (qemu-img check: "points after
          // EOF") would make denbd write far out; qemu writes there, denbd refuses.
          if (w.at >= e.knownLength && w.at >= (e.knownLength = e.file.length())) {
            throw new BlockError(
              Errno.EIO,
              `VMDK grain at offset ${w.at} of '${e.file.path}' is past its end (${e.knownLength} bytes)`,
            );
          }
          await e.file.pwrite(part, w.at + inGrain);
        } else await this.#lock.run(() => this.#allocate(e, pos, inGrain, part));
      }
      if (!this.#cidUpdated) await this.#lock.run(() => this.#updateCid());
    }
  }

  /** A write into a grain that is not allocated (or any write to a streamOptimized extent). */
  async #allocate(e: Extent, pos: number, inGrain: number, part: Uint8Array): Promise<void> {
    const w: Where = { at: 0, l1Index: 0, l2Index: 0, l2Sector: 0 };
    const p = this.#lookup(e, pos, w);
    if (p !== undefined) await p;
    if (w.at === -1) {
      throw new BlockError(Errno.EINVAL, `VMDK grain directory has no entry for ${pos}`);
    }
    if (e.compressed && w.at >= 0) {
      throw new BlockError(Errno.EIO, "Could not write to allocated cluster for streamOptimized");
    }
    if (w.at >= 0) {
      // Allocated by a write that held the lock before us.
      await e.file.pwrite(part, w.at + inGrain);
      return;
    }
    if (w.l2Sector === 0) {
      // qemu preallocates every grain table and allocates none.
      throw new BlockError(Errno.EIO, `VMDK image has no grain table for offset ${pos}`);
    }
    this.#checkTable(e, w);
    if (e.nextClusterSector >= EXTENT_MAX_SECTORS) {
      throw new BlockError(Errno.EINVAL, `VMDK extent '${e.file.path}' is full`);
    }
    const gb = e.grainBytes;
    const sector = e.nextClusterSector;
    e.nextClusterSector += gb / SECTOR;
    const grainStart = pos - inGrain;
    const whole = new Uint8Array(gb);
    const grainLen = Math.min(gb, e.end - grainStart);
    if (w.at === UNALLOC && this.#backing !== undefined) {
      if (!this.#parentOk) {
        throw new BlockError(Errno.EINVAL, "VMDK parent CID does not match the image's parentCID");
      }
      await this.#readBacking(whole.subarray(0, grainLen), grainStart);
    }
    if (e.compressed) {
      // qemu first fills the new grain (zeroes or the parent's bytes), then writes the
      // compressed grain over its start; only whole grains can be compressed.
      await e.file.pwrite(whole, sector * SECTOR);
      if (inGrain !== 0 || part.length > gb || (part.length < gb && pos + part.length !== e.end)) {
        throw new BlockError(Errno.EINVAL, "streamOptimized VMDK takes whole grains only");
      }
      if (!e.hasMarker) {
        throw new BlockError(Errno.EINVAL, "VMDK compressed extent without markers");
      }
      const z = deflateSync(part);
      const out = new Uint8Array(12 + z.length);
      const v = new DataView(out.buffer);
      v.setBigUint64(0, BigInt(pos / SECTOR), true);
      v.setUint32(8, z.length, true);
      out.set(z, 12);
      await e.file.pwrite(out, sector * SECTOR);
      e.nextClusterSector = Math.ceil((sector * SECTOR + out.length) / SECTOR);
    } else {
      whole.set(part, inGrain);
      await e.file.pwrite(whole, sector * SECTOR);
    }
    await this.#setEntry(e, w, sector);
  }

  /**
   * A grain table that does not lie inside its file (a damaged directory) reads as zeroes, as in
   * qemu, but denbd does not write an entry there: qemu would write far past the end.
   */
  #checkTable(e: Extent, w: Where): void {
    const len = e.file.length();
    const backup = e.l1Backup?.[w.l1Index] ?? 0;
    for (const sector of backup === 0 ? [w.l2Sector] : [w.l2Sector, backup]) {
      if (sector * SECTOR + e.l2Entries * 4 > len) {
        throw new BlockError(
          Errno.EIO,
          `VMDK grain table at offset ${
            sector * SECTOR
          } of '${e.file.path}' is past its end (${len} bytes)`,
        );
      }
    }
  }

  /** Writes a grain table entry, its redundant copy, then updates the cache. */
  async #setEntry(e: Extent, w: Where, value: number): Promise<void> {
    this.#checkTable(e, w);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, value, true);
    await e.file.pwrite(b, w.l2Sector * SECTOR + w.l2Index * 4);
    const backup = e.l1Backup?.[w.l1Index] ?? 0;
    if (backup !== 0) await e.file.pwrite(b, backup * SECTOR + w.l2Index * 4);
    const t = await e.table(w.l2Sector);
    t[w.l2Index] = value;
  }

  /** The first write after open gives the image a new CID (qemu's vmdk_write_cid). */
  async #updateCid(): Promise<void> {
    if (this.#cidUpdated) return;
    this.#cidUpdated = true;
    const bytes = new Uint8Array(DESC_SIZE);
    await readPadded(this.#file, bytes, this.#descOffset);
    bytes[DESC_SIZE - 1] = 0;
    const cid = crypto.getRandomValues(new Uint32Array(1))[0]!;
    const text = withCid(cString(bytes), cid);
    if (text === undefined) throw new BlockError(Errno.EINVAL, "VMDK descriptor has no parentCID");
    const out = new Uint8Array(DESC_SIZE);
    for (let i = 0; i < Math.min(text.length, DESC_SIZE - 1); i++) out[i] = text.charCodeAt(i);
    await this.#file.pwrite(out, this.#descOffset);
    await this.#file.sync();
    this.#cid = cid;
  }

  async flush(): Promise<void> {
    await Promise.all(this.#files.map((f) => f.sync()));
  }

  /** qemu's vmdk has no discard: a no-op. */
  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.resolve();
  }

  /**
   * qemu's block layer splits write-zeroes at the grain size of the sparse extents: whole grains
   * become zeroed entries when the extent has them; everything else is written as zero data
   * (ENOTSUP for fast zero).
   */
  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "VMDK image is read-only");
    const align = Math.max(1, ...this.#extents.filter((e) => !e.flat).map((e) => e.grainBytes));
    const end = offset + length;
    const headEnd = Math.min(end, Math.ceil(offset / align) * align);
    const tailStart = Math.max(headEnd, Math.floor(end / align) * align);
    const parts: [number, number][] = [];
    if (headEnd > offset) parts.push([offset, headEnd]);
    if (tailStart > headEnd) parts.push([headEnd, tailStart]);
    if (end > tailStart) parts.push([tailStart, end]);
    for (const [a, b] of parts) {
      if (await this.#zeroGrains(a, b - a)) continue;
      if (flags.fastZero) throw new BlockError(Errno.ENOTSUP, "VMDK cannot zero this range fast");
      await this.#writeZeroes(a, b - a, flags);
    }
  }

  /** qemu's zeroed vmdk_pwritev: a dry run first, then the grain entries. False: ENOTSUP. */
  async #zeroGrains(offset: number, length: number): Promise<boolean> {
    const w: Where = { at: 0, l1Index: 0, l2Index: 0, l2Sector: 0 };
    const walk = async (dry: boolean): Promise<boolean> => {
      for (let pos = offset; pos < offset + length;) {
        const e = this.#extentAt(pos);
        const inGrain = (pos - e.start) % e.grainBytes;
        const n = Math.min(offset + length - pos, e.grainBytes - inGrain);
        if (e.flat || !e.zeroGrain || inGrain !== 0 || n < e.grainBytes) return false;
        const p = this.#lookup(e, pos, w);
        if (p !== undefined) await p;
        if (w.at === -1) {
          throw new BlockError(Errno.EINVAL, `VMDK grain directory has no entry for ${pos}`);
        }
        if (e.compressed && w.at >= 0) {
          throw new BlockError(
            Errno.EIO,
            "Could not write to allocated cluster for streamOptimized",
          );
        }
        if (!dry && w.at !== ZEROED) {
          if (w.l2Sector === 0) {
            throw new BlockError(Errno.EIO, `VMDK image has no grain table for offset ${pos}`);
          }
          await this.#setEntry(e, w, GTE_ZEROED);
        }
        pos += n;
        if (!this.#cidUpdated) await this.#updateCid();
      }
      return true;
    };
    return await this.#lock.run(async () => (await walk(true)) && (await walk(false)));
  }

  async #writeZeroes(offset: number, length: number, flags: WriteFlags): Promise<void> {
    const zeroes = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length;) {
      const n = Math.min(length - done, zeroes.length);
      await this.pwrite(zeroes.subarray(0, n), offset + done, flags);
      done += n;
    }
  }

  cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  async extents(offset: number, length: number, out: ExtentList): Promise<void> {
    const end = offset + length;
    const w: Where = { at: 0, l1Index: 0, l2Index: 0, l2Sector: 0 };
    let pos = offset;
    while (pos < end && !out.full) {
      const e = this.#extentAt(pos);
      const rel = pos - e.start;
      const inGrain = rel % e.grainBytes;
      const n = Math.min(end - pos, e.grainBytes - inGrain);
      const before = out.total;
      if (e.flat) {
        fileExtents(e.file, e.flatStart + rel, n, out);
      } else {
        const p = this.#lookup(e, pos, w);
        if (p !== undefined) await p;
        if (w.at === -1) {
          throw new BlockError(Errno.EIO, `VMDK grain directory has no entry for ${pos}`);
        }
        if (w.at === ZEROED) out.add(n, STATE_HOLE | STATE_ZERO);
        else if (w.at === UNALLOC) await this.#backingExtents(pos, n, out);
        else out.add(n, 0);
      }
      if (out.total - before < n) return;
      pos += n;
    }
  }

  async #backingExtents(pos: number, n: number, out: ExtentList): Promise<void> {
    const b = this.#backing;
    const inside = b === undefined ? 0 : Math.max(0, Math.min(n, b.size - pos));
    if (inside > 0) {
      const before = out.total;
      await b!.extents(pos, inside, out);
      if (out.total - before < inside) return;
    }
    if (n > inside) out.add(n - inside, STATE_HOLE | STATE_ZERO);
  }

  async allocationDepth(offset: number, length: number, out: ExtentList): Promise<void> {
    const end = offset + length;
    const w: Where = { at: 0, l1Index: 0, l2Index: 0, l2Sector: 0 };
    let pos = offset;
    while (pos < end && !out.full) {
      const e = this.#extentAt(pos);
      const inGrain = (pos - e.start) % e.grainBytes;
      const n = Math.min(end - pos, e.grainBytes - inGrain);
      const before = out.total;
      let unalloc = false;
      if (!e.flat) {
        const p = this.#lookup(e, pos, w);
        if (p !== undefined) await p;
        if (w.at === -1) {
          throw new BlockError(Errno.EIO, `VMDK grain directory has no entry for ${pos}`);
        }
        unalloc = w.at === UNALLOC;
      }
      if (!unalloc) out.add(n, 1);
      else await backingDepth(this.#backing, pos, n, out);
      if (out.total - before < n) return;
      pos += n;
    }
  }

  async close(): Promise<void> {
    for (const f of this.#files) f.close();
    await this.#backing?.close();
  }
}

/** A flat extent's status as qemu reports it: data, with the file's holes and its end as zero. */
function fileExtents(f: FileEngine, at: number, length: number, out: ExtentList): void {
  const end = at + length;
  let pos = at;
  while (pos < end) {
    const data = f.seekData(pos);
    if (data === -1 || data >= end) {
      out.add(end - pos, STATE_ZERO);
      return;
    }
    if (data > pos) {
      out.add(data - pos, STATE_ZERO);
      pos = data;
      continue;
    }
    const hole = Math.min(Math.max(f.seekHole(pos), pos + 1), end);
    out.add(hole - pos, 0);
    pos = hole;
  }
}
