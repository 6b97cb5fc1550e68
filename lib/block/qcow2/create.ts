/**
 * Creating empty qcow2 v3 images the way `qemu-img create -f qcow2` 7.2 lays them out, and the
 * temporary overlay qemu-nbd `-s` puts on top of its image.
 *
 * qemu does not write a finished image in one go: it writes a stub (header, a one-cluster refcount
 * table, an empty refcount block), then runs its ordinary allocator to reference those three
 * clusters, grows the L1 table to the virtual size, and finally rewrites the header with its
 * extensions. Where clusters land depends on that allocator (a new refcount block placed on the
 * first free cluster, retries after -EAGAIN, refcount table growth with 50% headroom, the old
 * table freed and left behind). `planQcow2` replays the same steps on an in-memory model of the
 * file, so the result is byte-identical to qemu-img's for every cluster size and refcount width.
 * The model is pure (no I/O); `createQcow2` writes the planned bytes.
 *
 * @module
 */

import { resolve } from "node:path";
import { BlockError, Errno } from "../types.ts";
import type { FileEngine } from "../../io/file_engine.ts";
import { INCOMPAT_EXTL2, MAX_L1_BYTES, MAX_REFTABLE_BYTES, QCOW2_MAGIC } from "./header.ts";

/** What `qemu-img create -f qcow2 -o ...` accepts that matters for an empty v3 image. */
export interface Qcow2CreateOptions {
  /** Virtual size in bytes; rounded up to a multiple of 512 like qemu-img does. */
  readonly size: number;
  /** 512 B .. 2 MiB, a power of two. Default 65536. */
  readonly clusterSize?: number;
  /** 1, 2, 4, .., 64. Default 16. */
  readonly refcountBits?: number;
  /** Subclusters (extended L2 entries); needs clusters of at least 16 KiB. Default false. */
  readonly extendedL2?: boolean;
  /** Compatible feature "lazy refcounts". Default false. */
  readonly lazyRefcounts?: boolean;
  /** Backing file name, stored verbatim (relative names resolve against the image's directory). */
  readonly backingFile?: string;
  /** Backing format (`raw`, `qcow2`, ...); stored in the backing format header extension. */
  readonly backingFormat?: string;
}

/** One write of the planned image. */
export interface Qcow2Chunk {
  readonly offset: number;
  readonly data: Uint8Array;
}

/** The planned image: where qemu's allocator put things, and the bytes to write. */
export interface Qcow2Plan {
  readonly size: number;
  readonly clusterSize: number;
  readonly refcountOrder: number;
  readonly l1TableOffset: number;
  readonly l1Size: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  /** File length; not cluster aligned: qemu writes only `l1Size * 8` bytes of the L1 table. */
  readonly fileLength: number;
  /** Ascending, non-overlapping writes that together cover `[0, fileLength)`. */
  readonly chunks: readonly Qcow2Chunk[];
}

const SECTOR = 512;
const DEFAULT_CLUSTER_SIZE = 65536;
/** sizeof(QCowHeader) in qemu 7.2: the v3 fields, compression_type and 7 padding bytes. */
const HEADER_LENGTH = 112;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_TABLE = 0x6803f857;
const MAX_BACKING_NAME = 1023;
/** qemu's backing_format buffer is 16 bytes: longer names are refused when read back. */
const MAX_BACKING_FORMAT = 15;
/** Largest chunk handed to one pwrite. */
const CHUNK_BYTES = 1 << 20;

/** The feature name table qemu 7.2 writes (type 0 incompatible, 1 compatible, 2 autoclear). */
const FEATURE_NAMES: ReadonlyArray<readonly [number, number, string]> = [
  [0, 0, "dirty bit"],
  [0, 1, "corrupt bit"],
  [0, 2, "external data file"],
  [0, 3, "compression type"],
  [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"],
  [2, 0, "bitmaps"],
  [2, 1, "raw external data"],
];

function invalid(message: string): BlockError {
  return new BlockError(Errno.EINVAL, message);
}

/** Options after validation and defaults. */
interface Params {
  readonly size: number;
  readonly clusterBits: number;
  readonly refcountOrder: number;
  readonly extendedL2: boolean;
  readonly lazyRefcounts: boolean;
  readonly backingFile: string | undefined;
  readonly backingFormat: string | undefined;
  /** qemu-img only hints at a larger cluster size when one was given. */
  readonly clusterSizeGiven: boolean;
}

function validate(o: Qcow2CreateOptions): Params {
  if (!Number.isInteger(o.size) || o.size < 0) {
    throw invalid(`Invalid image size ${o.size}: must be a non-negative integer`);
  }
  const size = Math.ceil(o.size / SECTOR) * SECTOR;
  if (size > 2 ** 63 - 1) throw invalid("Image size cannot be negative");
  const cs = o.clusterSize ?? DEFAULT_CLUSTER_SIZE;
  const clusterBits = Math.log2(cs);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw invalid(`Cluster size must be a power of two between 512 and 2048k (got ${cs})`);
  }
  const bits = o.refcountBits ?? 16;
  const refcountOrder = Math.log2(bits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw invalid(
      `Refcount width must be a power of two and may not exceed 64 bits (got ${bits})`,
    );
  }
  const extendedL2 = o.extendedL2 ?? false;
  if (extendedL2 && clusterBits < 14) {
    throw invalid(
      "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
    );
  }
  const backingFile = o.backingFile === "" ? undefined : o.backingFile;
  const backingFormat = o.backingFormat === "" ? undefined : o.backingFormat;
  if (backingFormat !== undefined && backingFile === undefined) {
    throw invalid("Backing format cannot be used without backing file");
  }
  // qemu-img refuses this too: without a recorded format the reader would have to probe it.
  if (backingFile !== undefined && backingFormat === undefined) {
    throw invalid("Backing file specified without backing format");
  }
  if (
    backingFormat !== undefined &&
    new TextEncoder().encode(backingFormat).length > MAX_BACKING_FORMAT
  ) {
    throw invalid(
      `Backing format '${backingFormat}' is longer than ${MAX_BACKING_FORMAT} bytes`,
    );
  }
  return {
    size,
    clusterBits,
    refcountOrder,
    extendedL2,
    lazyRefcounts: o.lazyRefcounts ?? false,
    backingFile,
    backingFormat,
    clusterSizeGiven: o.clusterSize !== undefined,
  };
}

/** Signal from the allocator: metadata moved, the caller must search for space again. */
const AGAIN = Symbol("again");
type Again = typeof AGAIN;

/**
 * An in-memory qcow2 file plus the state of qemu's refcount allocator
 * (`free_cluster_index`, the in-memory refcount table and its highest used index).
 */
class ImageModel {
  readonly cs: number;
  readonly bits: number;
  /** Refcounts per refcount block. */
  readonly perBlock: number;
  /** Largest refcount (capped at 2^52 - 1 for 64-bit widths; creation never goes past 1). */
  readonly maxRefcount: number;
  /** Cluster index -> contents, for every cluster written. */
  readonly clusters = new Map<number, Uint8Array>();
  length = 0;
  reftable: number[];
  reftableOffset: number;
  maxReftableIndex = 0;
  freeIndex = 0;
  /** Refcount block cluster index -> how many of its refcounts are non-zero. */
  readonly #nonZero = new Map<number, number>();

  constructor(clusterBits: number, refcountOrder: number) {
    this.cs = 2 ** clusterBits;
    this.bits = 2 ** refcountOrder;
    this.perBlock = (this.cs * 8) / this.bits;
    this.maxRefcount = 2 ** Math.min(this.bits, 52) - 1;
    // qemu's stub: header in cluster 0, a one-cluster table at 1 pointing at an empty block at 2.
    this.reftable = new Array<number>(this.cs / 8).fill(0);
    this.reftable[0] = 2 * this.cs;
    this.reftableOffset = this.cs;
    this.touch(0, 3 * this.cs);
    this.#view(1).setBigUint64(0, BigInt(2 * this.cs));
  }

  /** Contents of cluster `index`, created zeroed on first use. */
  cluster(index: number): Uint8Array {
    let c = this.clusters.get(index);
    if (c === undefined) {
      c = new Uint8Array(this.cs);
      this.clusters.set(index, c);
    }
    return c;
  }

  #view(index: number): DataView {
    const c = this.cluster(index);
    return new DataView(c.buffer, c.byteOffset, c.byteLength);
  }

  /** Record a write of `length` bytes at `offset` (contents set separately). */
  touch(offset: number, length: number): void {
    const last = Math.floor((offset + length - 1) / this.cs);
    for (let i = Math.floor(offset / this.cs); i <= last; i++) this.cluster(i);
    this.length = Math.max(this.length, offset + length);
  }

  /** Write zeroes over whole cluster `index`. */
  zeroCluster(index: number): void {
    this.cluster(index).fill(0);
    this.#nonZero.delete(index);
    this.touch(index * this.cs, this.cs);
  }

  /** Refcount `i` of refcount block cluster `block` (sub-byte widths are packed LSB first). */
  getRefcountIn(block: number, i: number): number {
    const c = this.cluster(block);
    if (this.bits < 8) {
      const bit = i * this.bits;
      return (c[bit >> 3]! >> (bit & 7)) & ((1 << this.bits) - 1);
    }
    const v = this.#view(block);
    switch (this.bits) {
      case 8:
        return c[i]!;
      case 16:
        return v.getUint16(i * 2);
      case 32:
        return v.getUint32(i * 4);
      default:
        return v.getUint32(i * 8) * 2 ** 32 + v.getUint32(i * 8 + 4);
    }
  }

  setRefcountIn(block: number, i: number, value: number): void {
    const was = this.getRefcountIn(block, i) !== 0;
    if (was !== (value !== 0)) {
      this.#nonZero.set(block, (this.#nonZero.get(block) ?? 0) + (was ? -1 : 1));
    }
    const c = this.cluster(block);
    if (this.bits < 8) {
      const bit = i * this.bits;
      const mask = ((1 << this.bits) - 1) << (bit & 7);
      c[bit >> 3] = (c[bit >> 3]! & ~mask) | ((value << (bit & 7)) & mask);
      return;
    }
    const v = this.#view(block);
    switch (this.bits) {
      case 8:
        c[i] = value;
        return;
      case 16:
        v.setUint16(i * 2, value);
        return;
      case 32:
        v.setUint32(i * 4, value);
        return;
      default:
        v.setUint32(i * 8, Math.floor(value / 2 ** 32));
        v.setUint32(i * 8 + 4, value >>> 0);
    }
  }

  /** Refcount of host cluster `index`; 0 where no refcount block covers it. */
  refcount(index: number): number {
    const ti = Math.floor(index / this.perBlock);
    const block = this.reftable[ti] ?? 0;
    if (block === 0) return 0;
    return this.getRefcountIn(block / this.cs, index % this.perBlock);
  }

  /** qemu's alloc_clusters_noref: the first run of `bytes` free clusters at or after the hint. */
  allocNoref(bytes: number): number {
    const n = Math.ceil(bytes / this.cs);
    // Every probe advances freeIndex and clusters past the refcount table are free, so this
    // ends within (table coverage + n) probes. A refcount block with no references (or none at
    // all) is free throughout and passed in one step, which is what keeps big L1 tables fast.
    let run = 0;
    while (run < n) {
      const index = this.freeIndex;
      const ti = Math.floor(index / this.perBlock);
      if (this.#blockEmpty(ti)) {
        const step = Math.min(n - run, (ti + 1) * this.perBlock - index);
        this.freeIndex += step;
        run += step;
      } else {
        this.freeIndex++;
        run = this.refcount(index) === 0 ? run + 1 : 0;
      }
    }
    return (this.freeIndex - n) * this.cs;
  }

  /** True when no cluster covered by refcount table entry `ti` is referenced. */
  #blockEmpty(ti: number): boolean {
    const block = this.reftable[ti] ?? 0;
    return block === 0 || (this.#nonZero.get(block / this.cs) ?? 0) === 0;
  }

  /** qemu's qcow2_alloc_clusters: find space, reference it, retry while metadata moved. */
  allocClusters(bytes: number): number {
    // Every retry follows the creation of a refcount block (or a bigger table), and no more can
    // be needed than it takes to cover the file plus this allocation, twice over.
    const limit = 16 + 4 * Math.ceil((this.length / this.cs + bytes / this.cs) / this.perBlock);
    for (let attempt = 0; attempt < limit; attempt++) {
      const offset = this.allocNoref(bytes);
      if (this.update(offset, bytes, 1) !== AGAIN) return offset;
    }
    throw new BlockError(Errno.EIO, `qcow2 create: allocation of ${bytes} bytes did not settle`);
  }

  /**
   * qemu's update_refcount: add `addend` to every cluster in the range. When a refcount block
   * had to be created first, nothing changes and AGAIN is returned.
   */
  update(offset: number, length: number, addend: 1 | -1): Again | void {
    if (length === 0) return;
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + length - 1) / this.cs);
    if (addend === 1) {
      // qemu increments cluster by cluster and, at the first missing refcount block, creates it
      // and undoes the increments. The new block never lies in [first, missing), and the undo
      // only moves free_cluster_index back to `first` (increments apply to free clusters), so
      // finding the missing block first gives the same result without the quadratic work.
      const lastTi = Math.floor(last / this.perBlock);
      for (let ti = Math.floor(first / this.perBlock); ti <= lastTi; ti++) {
        if ((this.reftable[ti] ?? 0) !== 0) continue;
        const missing = Math.max(first, ti * this.perBlock);
        const r = this.refblockFor(missing);
        if (missing > first && this.freeIndex > first) this.freeIndex = first;
        return r;
      }
    }
    for (let index = first; index <= last; index++) {
      const ti = Math.floor(index / this.perBlock);
      // Present: checked above for increments, and whatever is freed was referenced.
      const entry = this.reftable[ti] ?? 0;
      if (entry === 0) {
        throw new BlockError(Errno.EIO, `qcow2 create: no refcount block for cluster ${index}`);
      }
      const block = entry / this.cs;
      const value = this.getRefcountIn(block, index % this.perBlock) + addend;
      if (value < 0 || value > this.maxRefcount) {
        throw new BlockError(Errno.EINVAL, `qcow2 create: refcount overflow at cluster ${index}`);
      }
      if (value === 0 && index < this.freeIndex) this.freeIndex = index;
      this.setRefcountIn(block, index % this.perBlock, value);
    }
  }

  /** qemu's alloc_refcount_block: nothing if the block exists; else create it (and maybe grow). */
  refblockFor(index: number): Again | void {
    const cs = this.cs;
    const ti = Math.floor(index / this.perBlock);
    if ((this.reftable[ti] ?? 0) !== 0) return;
    const newBlock = this.allocNoref(cs);
    const newIndex = newBlock / cs;
    if (Math.floor(newIndex / this.perBlock) === ti) {
      // The new block covers itself.
      this.zeroCluster(newIndex);
      this.setRefcountIn(newIndex, newIndex % this.perBlock, 1);
    } else {
      if (this.update(newBlock, cs, 1) === AGAIN) return AGAIN;
      this.zeroCluster(newIndex);
    }
    if (ti < this.reftable.length) {
      this.reftable[ti] = newBlock;
      this.#writeReftableEntry(ti, newBlock);
      this.maxReftableIndex = Math.max(this.maxReftableIndex, ti);
      return AGAIN;
    }
    // The table is full: build a bigger one, with the refcount blocks describing it, past
    // everything in use so far.
    const blocksUsed = Math.ceil(Math.max(index + 1, newIndex + 1) / this.perBlock);
    this.refcountArea(blocksUsed * this.perBlock * cs, ti, newBlock);
    return AGAIN;
  }

  #writeReftableEntry(ti: number, value: number): void {
    const at = this.reftableOffset + ti * 8;
    this.#view(Math.floor(at / this.cs)).setBigUint64(at % this.cs, BigInt(value));
  }

  /**
   * qemu's qcow2_refcount_area (additional_clusters 0, exact_size false): a new refcount table
   * 1.5x as large as needed plus the refcount blocks covering it, from `start` on; the old
   * table is freed (its bytes stay in the file).
   */
  refcountArea(start: number, newIndex: number, newBlock: number): void {
    const cs = this.cs;
    const total = refblocksNeeded(start / cs, cs, this.perBlock, true);
    if (total > MAX_REFTABLE_BYTES) throw efbig();
    const areaIndex = Math.floor(start / cs / this.perBlock);
    const perTableCluster = cs / 8;
    const tableSize = Math.ceil((total + Math.ceil(total / 2)) / perTableCluster) *
      perTableCluster;
    const tableClusters = (tableSize * 8) / cs;
    if (tableSize > MAX_REFTABLE_BYTES) throw efbig();
    const table = new Array<number>(tableSize).fill(0);
    const keep = tableSize > this.maxReftableIndex ? this.maxReftableIndex + 1 : tableSize;
    for (let i = 0; i < keep; i++) table[i] = this.reftable[i] ?? 0;
    if (newBlock !== 0) table[newIndex] = newBlock;

    let fresh = 0;
    for (let i = areaIndex; i < total; i++) if (table[i] === 0) fresh++;
    const tableOffset = start + fresh * cs;
    const end = tableOffset + tableClusters * cs;
    let blockOffset = start;
    for (let i = areaIndex; i < total; i++) {
      if (table[i] === 0) {
        this.zeroCluster(blockOffset / cs);
        table[i] = blockOffset;
        blockOffset += cs;
      }
      const block = table[i]! / cs;
      const covered = i * this.perBlock * cs;
      if (covered >= end) continue;
      const from = covered < start ? (start - covered) / cs : 0;
      const to = Math.min((end - covered) / cs, this.perBlock);
      for (let j = from; j < to; j++) this.setRefcountIn(block, j, 1);
    }
    for (let c = 0; c < tableClusters; c++) {
      const v = this.#viewAt(tableOffset + c * cs);
      for (let k = 0; k < perTableCluster; k++) {
        v.setBigUint64(k * 8, BigInt(table[c * perTableCluster + k]!));
      }
    }
    this.touch(tableOffset, tableClusters * cs);

    const oldOffset = this.reftableOffset;
    const oldBytes = this.reftable.length * 8;
    this.reftable = table;
    this.reftableOffset = tableOffset;
    let max = table.length - 1;
    while (max > 0 && table[max] === 0) max--;
    this.maxReftableIndex = max;
    this.update(oldOffset, oldBytes, -1);
  }

  #viewAt(offset: number): DataView {
    return this.#view(offset / this.cs);
  }
}

function efbig(): BlockError {
  return new BlockError(Errno.EFBIG, "The image size is too large for file format 'qcow2'");
}

/**
 * qemu's qcow2_refcount_metadata_size fixed point: refcount blocks needed to cover `clusters`
 * plus themselves and their table (with `generous`, room for a 1.5x table as well).
 */
function refblocksNeeded(
  clusters: number,
  cs: number,
  perBlock: number,
  generous: boolean,
): number {
  const perTableCluster = cs / 8;
  let table = 0, blocks = 0, n = 0, last: number;
  let extra = generous;
  let count = clusters;
  // Converges in a handful of rounds; the bound only guards against a logic error.
  for (let round = 0; round < 1000; round++) {
    last = n;
    blocks = Math.ceil((count + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    n = count + blocks + table;
    if (n === last && extra) {
      count += Math.ceil(table / 2);
      n = 0;
      extra = false;
    }
    if (n === last) return blocks;
  }
  throw new BlockError(Errno.EIO, "qcow2 create: refcount metadata size did not converge");
}

/** Cluster 0 as qemu's qcow2_update_header writes it. */
function encodeHeader(p: Params, m: ImageModel, l1Offset: number, l1Size: number): Uint8Array {
  const cs = m.cs;
  const out = new Uint8Array(cs);
  const v = new DataView(out.buffer);
  const enc = new TextEncoder();
  v.setUint32(0, QCOW2_MAGIC);
  v.setUint32(4, 3);
  v.setUint32(20, p.clusterBits);
  v.setBigUint64(24, BigInt(p.size));
  v.setUint32(32, 0); // no encryption
  v.setUint32(36, l1Size);
  v.setBigUint64(40, BigInt(l1Offset));
  v.setBigUint64(48, BigInt(m.reftableOffset));
  v.setUint32(56, (m.reftable.length * 8) / cs);
  v.setBigUint64(72, p.extendedL2 ? BigInt(INCOMPAT_EXTL2) : 0n);
  v.setBigUint64(80, p.lazyRefcounts ? 1n : 0n);
  v.setUint32(96, p.refcountOrder);
  v.setUint32(100, HEADER_LENGTH);
  // Byte 104, compression type, stays 0 (zlib).

  let pos = HEADER_LENGTH;
  const ext = (type: number, data: Uint8Array): void => {
    const padded = (data.length + 7) & ~7;
    if (pos + 8 + padded > cs) throw noSpace(p);
    v.setUint32(pos, type);
    v.setUint32(pos + 4, data.length);
    out.set(data, pos + 8);
    pos += 8 + padded;
  };
  if (p.backingFormat !== undefined) ext(EXT_BACKING_FORMAT, enc.encode(p.backingFormat));
  // qemu leaves the 392-byte table out of small clusters so a backing name still fits.
  if (cs > 4096) {
    const table = new Uint8Array(FEATURE_NAMES.length * 48);
    FEATURE_NAMES.forEach(([type, bit, name], i) => {
      table[i * 48] = type;
      table[i * 48 + 1] = bit;
      table.set(enc.encode(name), i * 48 + 2);
    });
    ext(EXT_FEATURE_TABLE, table);
  }
  ext(0, new Uint8Array(0)); // end of extensions
  if (p.backingFile !== undefined) {
    const name = enc.encode(p.backingFile);
    if (name.length > cs - pos) throw noSpace(p);
    out.set(name, pos);
    v.setBigUint64(8, BigInt(pos));
    v.setUint32(16, name.length);
  }
  return out;
}

function noSpace(p: Params): BlockError {
  return new BlockError(
    Errno.ENOSPC,
    `Could not assign backing file '${p.backingFile}' with format '${p.backingFormat ?? ""}': ` +
      "the header extensions and the name do not fit in one cluster (use a larger cluster size)",
  );
}

/**
 * Plan an empty qcow2 v3 image: validate `options` (throws BlockError with qemu's wording) and
 * replay qemu-img's creation steps. Pure: no I/O.
 */
export function planQcow2(options: Qcow2CreateOptions): Qcow2Plan {
  const p = validate(options);
  if (
    p.backingFile !== undefined && new TextEncoder().encode(p.backingFile).length > MAX_BACKING_NAME
  ) {
    throw new BlockError(
      Errno.EINVAL,
      `Could not assign backing file '${p.backingFile}' with format ` +
        `'${p.backingFormat ?? ""}': name longer than ${MAX_BACKING_NAME} bytes`,
    );
  }
  const m = new ImageModel(p.clusterBits, p.refcountOrder);
  const cs = m.cs;
  // Fail on a header that cannot fit before doing any work (qemu fails only at the very end).
  encodeHeader(p, m, 0, 0);

  if (m.allocClusters(3 * cs) !== 0) {
    throw new BlockError(Errno.EIO, "qcow2 create: first cluster of an empty image in use");
  }
  // blk_truncate to the virtual size: an exactly sized L1 table, zero-filled.
  const l2Entries = cs / (p.extendedL2 ? 16 : 8);
  const l1Size = Math.ceil(p.size / (l2Entries * cs));
  if (l1Size > MAX_L1_BYTES / 8) {
    const e = efbig();
    if (p.clusterSizeGiven) e.message += " (try using a larger cluster size)";
    throw e;
  }
  let l1Offset = 0;
  if (l1Size > 0) {
    l1Offset = m.allocClusters(l1Size * 8);
    m.touch(l1Offset, l1Size * 8);
  }
  m.clusters.set(0, encodeHeader(p, m, l1Offset, l1Size));

  return {
    size: p.size,
    clusterSize: cs,
    refcountOrder: p.refcountOrder,
    l1TableOffset: l1Offset,
    l1Size,
    refcountTableOffset: m.reftableOffset,
    refcountTableClusters: (m.reftable.length * 8) / cs,
    fileLength: m.length,
    chunks: toChunks(m),
  };
}

/** Coalesce the model's clusters into writes of at most CHUNK_BYTES, clipped to the length. */
function toChunks(m: ImageModel): Qcow2Chunk[] {
  const cs = m.cs;
  const indexes = [...m.clusters.keys()].sort((a, b) => a - b);
  const out: Qcow2Chunk[] = [];
  const perChunk = Math.max(1, CHUNK_BYTES / cs);
  let i = 0;
  while (i < indexes.length) {
    const first = indexes[i]!;
    let n = 1;
    while (i + n < indexes.length && indexes[i + n] === first + n && n < perChunk) n++;
    const start = first * cs;
    const len = Math.min(n * cs, m.length - start);
    const data = new Uint8Array(len);
    for (let k = 0; k < n; k++) {
      const c = m.clusters.get(first + k)!;
      data.set(c.subarray(0, Math.min(cs, len - k * cs)), k * cs);
    }
    out.push({ offset: start, data });
    i += n;
  }
  return out;
}

/**
 * Create an empty qcow2 v3 image, laid out exactly as `qemu-img create -f qcow2` 7.2 does.
 * A path is created or truncated (mode 0644 when new, like qemu); a FileEngine (opened
 * writable) is truncated to zero first. Returns the plan that was written.
 */
export async function createQcow2(
  target: string | FileEngine,
  options: Qcow2CreateOptions,
): Promise<Qcow2Plan> {
  const plan = planQcow2(options);
  await writePlan(target, plan);
  return plan;
}

async function writePlan(target: string | FileEngine, plan: Qcow2Plan): Promise<void> {
  if (typeof target !== "string") {
    target.truncate(0);
    for (const c of plan.chunks) await target.pwrite(c.data, c.offset);
    target.truncate(plan.fileLength);
    return;
  }
  const file = await Deno.open(target, { write: true, create: true, truncate: true, mode: 0o644 });
  try {
    for (const c of plan.chunks) {
      await file.seek(c.offset, Deno.SeekMode.Start);
      let done = 0;
      // write() may be short; each round writes at least one byte.
      while (done < c.data.length) done += await file.write(c.data.subarray(done));
    }
    await file.truncate(plan.fileLength);
  } finally {
    file.close();
  }
}

// ---------------------------------------------------------------------------------------------
// `-s` / `--snapshot`: the temporary overlay

/**
 * Directory for `-s` overlays, qemu 7.2's `create_tmp_file` rule: glib's temp dir ($TMPDIR when
 * set and non-empty, else /tmp), except that exactly "/tmp" becomes "/var/tmp" (disk images
 * should not land on a tmpfs). "/tmp/" or any other value is used as given.
 */
export function tempOverlayDir(
  getenv: (name: string) => string | undefined = (n) => Deno.env.get(n),
): string {
  const t = getenv("TMPDIR");
  const dir = t === undefined || t === "" ? "/tmp" : t;
  return dir === "/tmp" ? "/var/tmp" : dir;
}

/** mkstemp-style suffix; glib's names seen from qemu-nbd use upper-case letters and digits. */
const NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/**
 * Reserve a fresh `DIR/vl.XXXXXX` file (created empty, exclusively, mode 0600, like g_mkstemp)
 * and return its path. Throws with qemu's wording ("Could not open temporary file ...").
 */
export async function tempOverlayPath(
  getenv: (name: string) => string | undefined = (n) => Deno.env.get(n),
): Promise<string> {
  const dir = tempOverlayDir(getenv);
  const rnd = new Uint8Array(6);
  let path = "";
  // 36^6 names: a collision streak of 100 means something else is wrong.
  for (let attempt = 0; attempt < 100; attempt++) {
    crypto.getRandomValues(rnd);
    path = `${dir}/vl.${Array.from(rnd, (b) => NAME_CHARS[b % NAME_CHARS.length]).join("")}`;
    try {
      const f = await Deno.open(path, { write: true, createNew: true, mode: 0o600 });
      f.close();
      return path;
    } catch (e) {
      if (e instanceof Deno.errors.AlreadyExists) continue;
      const why = e instanceof Error ? e.message : String(e);
      throw new BlockError(
        e instanceof Deno.errors.NotFound
          ? Errno.ENOENT
          : e instanceof Deno.errors.PermissionDenied
          ? Errno.EACCES
          : Errno.EIO,
        `Could not open temporary file '${path}': ${why}`,
      );
    }
  }
  throw new BlockError(Errno.EEXIST, `Could not open temporary file '${path}': File exists`);
}

/** What the `-s` overlay needs to know about the image under it. */
export interface TempOverlayOptions {
  /** Virtual size of the image (qemu uses its length, rounded up to 512). */
  readonly size: number;
  /**
   * Record this backing file in the overlay header. qemu does not (it attaches the image in
   * memory, the overlay header has no backing name); recording it lets a driver that follows
   * header backing links open the chain itself. Made absolute, since the overlay lives elsewhere.
   */
  readonly backingFile?: string;
  readonly backingFormat?: string;
  /** Environment lookup for TMPDIR (tests). */
  readonly getenv?: (name: string) => string | undefined;
}

/**
 * Create the `-s` overlay: a default qcow2 (64 KiB clusters, v3, 16-bit refcounts) of the
 * image's size at `tempOverlayPath()`. Returns the path; the caller opens it and then unlinks it.
 * On failure nothing is left behind.
 */
export async function createTempOverlay(options: TempOverlayOptions): Promise<string> {
  const backingFile = options.backingFile === undefined || options.backingFile === ""
    ? options.backingFile
    : resolve(options.backingFile);
  const create: Qcow2CreateOptions = {
    size: options.size,
    ...(backingFile !== undefined ? { backingFile } : {}),
    ...(options.backingFormat !== undefined ? { backingFormat: options.backingFormat } : {}),
  };
  // Plan (and so validate) before touching the file system.
  const plan = planQcow2(create);
  const path = await tempOverlayPath(options.getenv);
  try {
    await writePlan(path, plan);
  } catch (e) {
    await Deno.remove(path).catch(() => {});
    throw e;
  }
  return path;
}
