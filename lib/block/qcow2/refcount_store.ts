/**
 * The refcount structures of a writable qcow2 image: the refcount table and its blocks, cached in
 * memory (a block describes `clusterSize * 8 / refcountBits` clusters, so even a large image has
 * few), cluster allocation, and deferred decrements.
 *
 * Ordering (shared/reference/qcow2.md §2.4): increments are applied at once and written by
 * {@link RefcountStore.writeBlocks} before any structure that references the clusters; decrements
 * are queued and applied only by {@link RefcountStore.applyDecrements}, which the flush calls after
 * the mappings that dropped the references are on disk, so a freed cluster is never reused early.
 * New refcount blocks describe themselves: the block for table entry `i` is placed at the first
 * cluster it covers, which is free by definition (no block, refcount 0).
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import { BlockError, Errno } from "../types.ts";
import { MAX_REFTABLE_BYTES } from "./header.ts";

/** What the store needs from the header. */
export interface RefcountStoreInit {
  readonly file: FileEngine;
  readonly clusterSize: number;
  readonly refcountOrder: number;
  readonly tableOffset: number;
  readonly tableClusters: number;
}

interface Block {
  readonly bytes: Uint8Array;
  readonly view: DataView;
}

/** Header offset of refcount_table_offset (u64) followed by refcount_table_clusters (u32). */
const HEADER_REFTABLE_FIELDS = 48;

/** The refcounts of one image. Callers serialise access with the image's metadata mutex. */
export class RefcountStore {
  readonly #file: FileEngine;
  readonly #cs: number;
  readonly #bits: number;
  readonly #perBlock: number;
  readonly #max: number;
  #tableOffset: number;
  #tableClusters: number;
  /** Refcount block offsets by table index (0: none). */
  #table: number[] = [];
  readonly #tableDirty = new Set<number>();
  readonly #blocks = new Map<number, Block>();
  readonly #dirty = new Set<number>();
  /** Lowest cluster index that may be free. */
  #freeHint = 0;
  /** Host cluster indexes whose refcount drops by one at the next flush. */
  #pending: number[] = [];
  #pendingDiscard = new Set<number>();
  /** Where the next compressed cluster's bytes go (0: start a new cluster), see allocBytes. */
  #freeByte = 0;

  private constructor(init: RefcountStoreInit) {
    this.#file = init.file;
    this.#cs = init.clusterSize;
    this.#bits = 1 << init.refcountOrder;
    this.#perBlock = (init.clusterSize * 8) / this.#bits;
    this.#max = this.#bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.#bits - 1;
    this.#tableOffset = init.tableOffset;
    this.#tableClusters = init.tableClusters;
  }

  /** Read the refcount table. */
  static async open(init: RefcountStoreInit): Promise<RefcountStore> {
    const s = new RefcountStore(init);
    const bytes = new Uint8Array(init.tableClusters * init.clusterSize);
    const n = await init.file.pread(bytes, init.tableOffset);
    bytes.fill(0, n);
    const v = new DataView(bytes.buffer);
    for (let i = 0; i < bytes.length / 8; i++) {
      const hi = v.getUint32(i * 8), lo = v.getUint32(i * 8 + 4);
      const off = (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
      if (off % init.clusterSize !== 0) {
        throw new BlockError(
          Errno.EIO,
          `qcow2 '${init.file.path}': refcount block offset 0x${
            off.toString(16)
          } unaligned (reftable index ${i})`,
        );
      }
      s.#table.push(off);
    }
    return s;
  }

  /** Where the refcount table is now, and its size in clusters. */
  get tableOffset(): number {
    return this.#tableOffset;
  }
  get tableClusters(): number {
    return this.#tableClusters;
  }

  /** Host offsets of every refcount block. */
  blockOffsets(): number[] {
    return this.#table.filter((off) => off !== 0);
  }

  /**
   * Set every refcount to `counts` (cluster index → references; absent = 0), creating blocks
   * for referenced ranges that have none. Returns how many refcounts changed. For the repair
   * of a dirty image: the caller counted every reference, the refcount structures included.
   */
  async rebuild(counts: Map<number, number>): Promise<number> {
    const per = this.#perBlock;
    const fail = (why: string) =>
      new BlockError(
        Errno.EIO,
        `qcow2 '${this.#file.path}': cannot repair refcounts (${why}); run 'qemu-img check -r all'`,
      );
    for (const c of [...counts.keys()]) {
      const rt = Math.floor(c / per);
      if (rt >= this.#table.length) throw fail(`cluster ${c} is beyond the refcount table`);
      if (this.#table[rt] === 0) {
        // The new block takes the first cluster of its range: it must be unreferenced.
        if (counts.has(rt * per)) throw fail(`no free place for the refcount block ${rt}`);
        await this.#slot(c);
        counts.set(rt * per, 1);
      }
    }
    let changed = 0;
    for (let rt = 0; rt < this.#table.length; rt++) {
      const off = this.#table[rt]!;
      if (off === 0) continue;
      const b = await this.#block(off);
      for (let i = 0; i < per; i++) {
        const want = counts.get(rt * per + i) ?? 0;
        if (want > this.#max) throw fail(`refcount overflow at cluster ${rt * per + i}`);
        if (this.#read(b, i) === want) continue;
        this.#write(b, i, want);
        this.#dirty.add(off);
        changed++;
      }
    }
    this.#freeHint = 0;
    this.#freeByte = 0;
    return changed;
  }

  /** Decrements waiting for the next flush. */
  get pendingCount(): number {
    return this.#pending.length;
  }

  /** True when blocks or table entries wait to be written. */
  get dirty(): boolean {
    return this.#dirty.size > 0 || this.#tableDirty.size > 0;
  }

  /** Refcount of host cluster `c`. */
  async get(c: number): Promise<number> {
    const rt = Math.floor(c / this.#perBlock);
    const off = this.#table[rt] ?? 0;
    if (off === 0) return 0;
    const b = await this.#block(off);
    return this.#read(b, c - rt * this.#perBlock);
  }

  /** Add `delta` to the refcount of host cluster `c` (creating its block if needed). */
  async add(c: number, delta: number): Promise<number> {
    const { block, index, offset } = await this.#slot(c);
    const v = this.#read(block, index) + delta;
    if (v < 0 || v > this.#max) {
      throw new BlockError(
        Errno.EIO,
        `qcow2 '${this.#file.path}': refcount of cluster at 0x${
          (c * this.#cs).toString(16)
        } would become ${v} (corrupt refcounts?)`,
      );
    }
    this.#write(block, index, v);
    this.#dirty.add(offset);
    if (v === 0 && c < this.#freeHint) this.#freeHint = c;
    return v;
  }

  /**
   * Allocate `n` free clusters (refcount 1 each), lowest first; returns their host offsets.
   * They are contiguous when free space allows (always at the end of the file), not otherwise:
   * with small clusters the self-describing refcount blocks break up every run.
   */
  async alloc(n: number): Promise<number[]> {
    const out: number[] = [];
    let c = Math.max(this.#freeHint, 1);
    while (out.length < n) {
      if ((c + 1) * this.#cs > Number.MAX_SAFE_INTEGER) {
        throw new BlockError(Errno.ENOSPC, `qcow2 '${this.#file.path}': image file too large`);
      }
      const { block, index, offset } = await this.#slot(c);
      if (this.#read(block, index) === 0) {
        this.#write(block, index, 1);
        this.#dirty.add(offset);
        out.push(c * this.#cs);
      }
      c++;
    }
    this.#freeHint = c;
    return out;
  }

  /**
   * Allocate `size` bytes (at most a cluster) for a compressed cluster, qemu's
   * `qcow2_alloc_bytes`: bytewise from the free byte offset left by the previous call, so several
   * compressed clusters share a host cluster; a stream that does not fit continues into the next
   * cluster when that one is free and adjacent, else starts a new cluster. Every host cluster the
   * bytes touch gains one reference (a shared cluster counts its streams). Returns the offset.
   */
  async allocBytes(size: number): Promise<number> {
    const cs = this.#cs;
    if (size <= 0 || size > cs) {
      throw new BlockError(
        Errno.EINVAL,
        `qcow2 '${this.#file.path}': cannot allocate ${size} bytes`,
      );
    }
    let offset = this.#freeByte;
    // A shared cluster whose refcount is saturated takes no more streams.
    if (offset !== 0 && await this.get(Math.floor(offset / cs)) >= this.#max) offset = 0;
    let freeInCluster = cs - (offset % cs);
    if (offset === 0 || freeInCluster < size) {
      const fresh = await this.#findFree();
      if (offset === 0 || Math.ceil(offset / cs) * cs !== fresh * cs) {
        offset = fresh * cs;
        freeInCluster = cs;
      } else {
        freeInCluster += cs;
      }
    }
    const first = Math.floor(offset / cs), last = Math.floor((offset + size - 1) / cs);
    for (let c = first; c <= last; c++) {
      await this.add(c, 1);
      if (c >= this.#freeHint) this.#freeHint = c + 1;
    }
    this.#freeByte = (offset + size) % cs === 0 ? 0 : offset + size;
    return offset;
  }

  /** Lowest free cluster index (refcount 0), without taking it. */
  async #findFree(): Promise<number> {
    for (let c = Math.max(this.#freeHint, 1);; c++) {
      if ((c + 1) * this.#cs > Number.MAX_SAFE_INTEGER) {
        throw new BlockError(Errno.ENOSPC, `qcow2 '${this.#file.path}': image file too large`);
      }
      // #slot first: creating a refcount block takes the first cluster of its range.
      const { block, index } = await this.#slot(c);
      if (this.#read(block, index) === 0) return c;
    }
  }

  /**
   * Allocate `n` contiguous free clusters (first fit) for a structure that must be contiguous
   * (bitmap tables, directories); returns the host offset.
   */
  async allocContiguous(n: number): Promise<number> {
    if (n >= this.#perBlock) {
      throw new BlockError(
        Errno.EFBIG,
        `qcow2 '${this.#file.path}': cannot allocate ${n} contiguous clusters`,
      );
    }
    let start = Math.max(this.#freeHint, 1);
    for (let c = start; c < start + n; c++) {
      if ((c + 1) * this.#cs > Number.MAX_SAFE_INTEGER) {
        throw new BlockError(Errno.ENOSPC, `qcow2 '${this.#file.path}': image file too large`);
      }
      const { block, index } = await this.#slot(c);
      if (this.#read(block, index) !== 0) start = c + 1;
    }
    for (let c = start; c < start + n; c++) await this.add(c, 1);
    return start * this.#cs;
  }

  /** Queue a decrement of every cluster touched by host bytes `[offset, offset+length)`. */
  queueDecrement(offset: number, length: number, discard = false): void {
    const first = Math.floor(offset / this.#cs);
    const last = Math.floor((offset + length - 1) / this.#cs);
    for (let c = first; c <= last; c++) {
      this.#pending.push(c);
      if (discard) this.#pendingDiscard.add(c);
    }
  }

  /**
   * Take the queued decrements (the flush applies them once their unmapping is durable), and
   * the clusters whose release came from a discard request (to punch once they are free).
   */
  takeDecrements(): { clusters: number[]; discard: Set<number> } {
    const clusters = this.#pending, discard = this.#pendingDiscard;
    this.#pending = [];
    this.#pendingDiscard = new Set();
    return { clusters, discard };
  }

  /**
   * Apply decrements taken by {@link takeDecrements}; freed clusters become allocatable.
   * Returns the clusters whose refcount reached 0.
   */
  async applyDecrements(clusters: readonly number[]): Promise<number[]> {
    const freed: number[] = [];
    for (const c of clusters) {
      // A reference to a cluster counted as free is corruption qemu-img check reports; do not
      // make it worse by creating refcount blocks for it.
      if (await this.get(c) > 0 && await this.add(c, -1) === 0) {
        freed.push(c);
        // The partly filled compressed cluster is gone: never append to a reused cluster.
        if (Math.floor(this.#freeByte / this.#cs) === c) this.#freeByte = 0;
      }
    }
    return freed;
  }

  /** Write every dirty refcount block (no sync). */
  async writeBlocks(): Promise<void> {
    const offs = [...this.#dirty];
    this.#dirty.clear();
    try {
      await Promise.all(offs.map((off) => this.#file.pwrite(this.#blocks.get(off)!.bytes, off)));
    } catch (e) {
      for (const o of offs) this.#dirty.add(o);
      throw e;
    }
  }

  /** True when table entries wait to be written (after their blocks are durable). */
  get tableDirty(): boolean {
    return this.#tableDirty.size > 0;
  }

  /** Write the dirty refcount table entries (no sync); their blocks must be durable first. */
  async writeTable(): Promise<void> {
    const idx = [...this.#tableDirty];
    this.#tableDirty.clear();
    const buf = new Uint8Array(8);
    const v = new DataView(buf.buffer);
    try {
      for (const i of idx) {
        const off = this.#table[i]!;
        v.setUint32(0, Math.floor(off / 0x100000000));
        v.setUint32(4, off >>> 0);
        await this.#file.pwrite(buf, this.#tableOffset + i * 8);
      }
    } catch (e) {
      for (const i of idx) this.#tableDirty.add(i);
      throw e;
    }
  }

  async #block(off: number): Promise<Block> {
    let b = this.#blocks.get(off);
    if (b === undefined) {
      const bytes = new Uint8Array(this.#cs);
      const n = await this.#file.pread(bytes, off);
      bytes.fill(0, n);
      // Another caller may have loaded it meanwhile: keep the first (it may be dirty).
      b = this.#blocks.get(off) ?? { bytes, view: new DataView(bytes.buffer) };
      this.#blocks.set(off, b);
    }
    return b;
  }

  /** The block and index holding cluster `c`'s refcount, creating table space and block. */
  async #slot(c: number): Promise<{ block: Block; index: number; offset: number }> {
    const rt = Math.floor(c / this.#perBlock);
    if (rt >= this.#table.length) await this.#growTable(rt + 1);
    let off = this.#table[rt]!;
    if (off === 0) {
      // Self-describing: the first cluster this block covers is free, as it has no block yet.
      off = rt * this.#perBlock * this.#cs;
      const bytes = new Uint8Array(this.#cs);
      const b = { bytes, view: new DataView(bytes.buffer) };
      this.#write(b, 0, 1);
      this.#blocks.set(off, b);
      this.#dirty.add(off);
      this.#table[rt] = off;
      this.#tableDirty.add(rt);
    }
    return { block: await this.#block(off), index: c - rt * this.#perBlock, offset: off };
  }

  /**
   * Move the refcount table to a larger one past every covered cluster (qemu's
   * `qcow2_refcount_area`): new self-describing blocks for the new area, the new table after
   * them, written and synced before the header switches to it; the old table is freed later.
   */
  async #growTable(minEntries: number): Promise<void> {
    const cs = this.#cs, per = this.#perBlock;
    const oldEntries = this.#table.length;
    const first = oldEntries * per; // first cluster with no table entry: all free
    const wanted = Math.max(minEntries, Math.ceil(oldEntries * 1.5), oldEntries + 1);
    const tableClusters = Math.ceil((wanted * 8) / cs);
    const entries = (tableClusters * cs) / 8;
    // One new block at `first` describes itself and the new table right after it.
    const area = 1 + tableClusters;
    if (tableClusters * cs > MAX_REFTABLE_BYTES || area > per) {
      throw new BlockError(
        Errno.EFBIG,
        `qcow2 '${this.#file.path}': refcount table cannot grow to ${entries} entries`,
      );
    }
    const table = this.#table.slice();
    while (table.length < entries) table.push(0);
    const bytes = new Uint8Array(cs);
    const block = { bytes, view: new DataView(bytes.buffer) };
    for (let j = 0; j < area; j++) this.#write(block, j, 1);
    const blockOff = first * cs;
    table[oldEntries] = blockOff;
    const tableOff = (first + 1) * cs;
    const tbytes = new Uint8Array(tableClusters * cs);
    const tv = new DataView(tbytes.buffer);
    for (let i = 0; i < table.length; i++) {
      tv.setUint32(i * 8, Math.floor(table[i]! / 0x100000000));
      tv.setUint32(i * 8 + 4, table[i]! >>> 0);
    }
    await this.writeBlocks();
    await this.#file.pwrite(bytes, blockOff);
    await this.#file.pwrite(tbytes, tableOff);
    await this.#file.sync();
    const h = new Uint8Array(12);
    const hv = new DataView(h.buffer);
    hv.setUint32(0, Math.floor(tableOff / 0x100000000));
    hv.setUint32(4, tableOff >>> 0);
    hv.setUint32(8, tableClusters);
    await this.#file.pwrite(h, HEADER_REFTABLE_FIELDS);
    await this.#file.sync();
    this.#blocks.set(blockOff, block);
    const oldOff = this.#tableOffset, oldClusters = this.#tableClusters;
    this.#table = table;
    this.#tableDirty.clear();
    this.#tableOffset = tableOff;
    this.#tableClusters = tableClusters;
    this.queueDecrement(oldOff, oldClusters * cs);
  }

  #read(b: Block, i: number): number {
    const bits = this.#bits;
    if (bits < 8) {
      const bit = i * bits;
      return (b.bytes[bit >> 3]! >> (bit & 7)) & ((1 << bits) - 1);
    }
    switch (bits) {
      case 8:
        return b.bytes[i]!;
      case 16:
        return b.view.getUint16(i * 2);
      case 32:
        return b.view.getUint32(i * 4);
      default: {
        const hi = b.view.getUint32(i * 8), lo = b.view.getUint32(i * 8 + 4);
        // Counts past 2^53 cannot be real: report them as the maximum (treated as overflow).
        return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + lo;
      }
    }
  }

  #write(b: Block, i: number, v: number): void {
    const bits = this.#bits;
    if (bits < 8) {
      const bit = i * bits;
      const mask = ((1 << bits) - 1) << (bit & 7);
      b.bytes[bit >> 3] = (b.bytes[bit >> 3]! & ~mask) | ((v << (bit & 7)) & mask);
      return;
    }
    switch (bits) {
      case 8:
        b.bytes[i] = v;
        return;
      case 16:
        b.view.setUint16(i * 2, v);
        return;
      case 32:
        b.view.setUint32(i * 4, v);
        return;
      default:
        b.view.setUint32(i * 8, Math.floor(v / 0x100000000));
        b.view.setUint32(i * 8 + 4, v >>> 0);
    }
  }
}
