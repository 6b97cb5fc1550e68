/**
 * The qcow2 write path: guest writes (in place, or into new clusters with copy-on-write from
 * whatever the range read before), write-zeroes and discard with qemu 7.2's entry semantics,
 * and the flush that makes metadata durable in a crash-safe order.
 *
 * Concurrency (shared/reference/qcow2.md §5.3): one metadata mutex guards every change of L1, L2
 * and refcounts and is never held across guest data I/O; per-guest-cluster locks serialise the
 * requests that change a cluster's mapping, so two writes into one unallocated cluster never
 * allocate it twice; in-place writes to clusters the image owns (COPIED) take no lock at all.
 *
 * Ordering (§2.4, via the flush): refcount blocks → sync → refcount table entries → sync → L2
 * slices → sync → L1 entries → sync → queued decrements (after in-flight I/O that may still use
 * the freed clusters has ended). New clusters are written with their data before the entry that
 * maps them is linked, and entries reach the disk only through the flush.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import { type BlockDevice, BlockError, Errno, ExtentList, STATE_ZERO } from "../types.ts";
import { compressedDescriptor, entryOffset, extendedKind, Kind, standardKind } from "./entry.ts";
import type { L2Cache } from "./l2_cache.ts";
import type { RefcountStore } from "./refcount_store.ts";
import { type BitmapStoreIo, encodeBitmapsExtension } from "./bitmap.ts";
import { bitmapsExtensionOffset, type Qcow2Header } from "./header.ts";
import { type IoEpochs, KeyedLocks, Mutex } from "./sync.ts";

const COPIED = 0x80000000;
/** Header offset of the autoclear feature bits (u64; bit 0 = bitmaps valid). */
const HEADER_AUTOCLEAR = 88;
const COMPRESSED = 0x40000000;
const ALL = 0xffffffff;

/** What the writer needs from the device it belongs to. */
export interface WriterHost {
  readonly file: FileEngine;
  readonly size: number;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  readonly version: 2 | 3;
  readonly l1TableOffset: number;
  /** L1 entries as host-order words (hi, lo), changed in place. */
  readonly l1: Uint32Array;
  readonly cache: L2Cache;
  readonly refs: RefcountStore;
  readonly backing: BlockDevice | undefined;
  readonly epochs: IoEpochs;
  /** Punch host clusters freed by discard requests out of the file once they are free. */
  readonly passDiscard: boolean;
  /** Read through the image as it is now (copy-on-write source). */
  pread(buf: Uint8Array, offset: number): Promise<void>;
  /** base:allocation of the image (to see whether a range reads as zeroes). */
  extents(offset: number, length: number, out: ExtentList): Promise<void>;
  /**
   * An encrypted image: the bytes to store for guest data `data` at host offset `host` (a
   * copy; whole 512-byte sectors). Zero fills are then written as encrypted zeroes, never
   * left to fallocate (zeroed host bytes would decrypt to noise).
   */
  readonly encrypt?: (data: Uint8Array, host: number) => Uint8Array;
}

/** An L2 entry: hi/lo words, and for extended L2 the zero and alloc bitmap words. */
interface Entry {
  hi: number;
  lo: number;
  zero: number;
  alloc: number;
}

/** One cluster's share of a write. Offsets inside the cluster unless named host. */
interface Piece {
  readonly cluster: number;
  readonly from: number;
  readonly to: number;
  /** The span written to the host cluster: the data plus copy-on-write fill around it. */
  spanFrom: number;
  spanTo: number;
  /** Host cluster offset written (existing, or new when `fresh`). */
  host: number;
  fresh: boolean;
  /** The fill reads as zeroes: zero the new cluster with fallocate and write only data. */
  zeroFill: boolean;
  /** Entry to link after the data is written (undefined: the entry does not change). */
  next: Entry | undefined;
  /** Host bytes to release once the new entry is linked. */
  release: [number, number] | undefined;
}

/** Dirty L2 bytes that trigger a flush (dirty slices cannot be evicted, so this bounds them). */
const DIRTY_BYTES_FLUSH = 16 * 1024 * 1024;
/** Largest zero fill written as bytes rather than fallocated (see #writePieces). */
const ZERO_FILL_BY_WRITE_MAX = 64 * 1024;
/** Queued decrements that trigger a flush. */
const PENDING_FLUSH = 8192;

function bitsBetween(first: number, last: number): number {
  // Bits first..last of a 32-bit word, as an unsigned number.
  const hiMask = last >= 31 ? ALL : ((1 << (last + 1)) >>> 0) - 1;
  const loMask = first <= 0 ? 0 : ((1 << first) >>> 0) - 1;
  return (hiMask & ~loMask) >>> 0;
}

/** The write side of one qcow2 image. */
export class Qcow2Writer {
  readonly #h: WriterHost;
  readonly #cs: number;
  readonly #sc: number;
  readonly #l2Entries: number;
  readonly #entryWords: number;
  readonly #meta = new Mutex();
  readonly #locks = new KeyedLocks();
  readonly #l1Dirty = new Set<number>();
  #flushing: Promise<void> | undefined;

  constructor(host: WriterHost) {
    this.#h = host;
    this.#cs = host.clusterSize;
    this.#sc = host.extendedL2 ? host.clusterSize / 32 : host.clusterSize;
    this.#l2Entries = host.clusterSize / (host.extendedL2 ? 16 : 8);
    this.#entryWords = host.extendedL2 ? 4 : 2;
  }

  #error(errno: number, message: string): BlockError {
    return new BlockError(errno, `qcow2 '${this.#h.file.path}': ${message}`);
  }

  // -------------------------------------------------------------------------------------------
  // Writes

  /** Write `buf` at guest `offset` (the caller already tried the in-place fast path). */
  async write(buf: Uint8Array, offset: number): Promise<void> {
    const release = await this.#lockRange(offset, buf.length);
    try {
      await this.#writeLocked(buf, offset);
    } finally {
      release();
    }
    await this.#relieve();
  }

  /**
   * Store `data`, the compressed form of guest cluster `cluster`, as a compressed cluster
   * (qemu's `qcow2_alloc_compressed_cluster_offset` + the data write): refused with EIO when the
   * cluster already has a host offset (normal, zero-allocated or compressed: compression never
   * overwrites); a zero or unallocated entry is replaced. The bytes are allocated bytewise
   * (RefcountStore.allocBytes), written, then the entry is linked; the flush orders the rest.
   */
  async writeCompressed(cluster: number, data: Uint8Array): Promise<void> {
    const cs = this.#cs, h = this.#h;
    const release = await this.#locks.acquire(cluster, cluster);
    try {
      const host = await this.#meta.run(async () => {
        // Prepared like qemu's get_cluster_table: the L2 table becomes writable first.
        const e = await this.#readEntry(cluster, true);
        if (entryOffset(e.hi, e.lo) !== 0 || (e.hi & COMPRESSED) !== 0) {
          throw this.#error(
            Errno.EIO,
            `compressed write to guest offset ${cluster * cs}, which is already allocated`,
          );
        }
        return await h.refs.allocBytes(data.length);
      });
      try {
        await this.#io(() => h.file.pwrite(data, host));
      } catch (e) {
        await this.#meta.run(() => Promise.resolve(h.refs.queueDecrement(host, data.length)));
        throw e;
      }
      const x = 70 - h.clusterBits; // offset bits 0..x-1, then the extra sector count
      const nsec = Math.floor((host + data.length - 1) / 512) - Math.floor(host / 512);
      const next: Entry = {
        hi: (COMPRESSED | (nsec << (x - 32)) | Math.floor(host / 0x100000000)) >>> 0,
        lo: host >>> 0,
        // The subcluster bitmap of a compressed entry must be zero (qcow2 spec).
        zero: 0,
        alloc: 0,
      };
      await this.#meta.run(() => this.#writeEntry(cluster, next));
    } finally {
      release();
    }
    await this.#relieve();
  }

  #lockRange(offset: number, length: number): Promise<() => void> {
    const first = Math.floor(offset / this.#cs);
    const last = Math.floor((offset + length - 1) / this.#cs);
    return this.#locks.acquire(first, last);
  }

  /** The write proper; the caller holds the cluster locks of the range. */
  async #writeLocked(buf: Uint8Array, offset: number): Promise<void> {
    const pieces = await this.#meta.run(() => this.#plan(offset, buf.length));
    try {
      await this.#writePieces(pieces, buf, offset);
    } catch (e) {
      await this.#meta.run(() => {
        for (const p of pieces) if (p.fresh) this.#h.refs.queueDecrement(p.host, this.#cs);
        return Promise.resolve();
      });
      throw e;
    }
    if (pieces.some((p) => p.next !== undefined)) {
      await this.#meta.run(() => this.#link(pieces));
    }
  }

  /** Decide per cluster where the data goes; allocates new clusters (under the mutex). */
  async #plan(offset: number, length: number): Promise<Piece[]> {
    const cs = this.#cs;
    const pieces: Piece[] = [];
    const end = offset + length;
    let fresh = 0;
    for (let pos = offset; pos < end;) {
      const cluster = Math.floor(pos / cs);
      const base = cluster * cs;
      const to = Math.min(end - base, cs);
      const e = await this.#readEntry(cluster, true);
      const p = this.#h.extendedL2
        ? this.#planExtended(cluster, pos - base, to, e)
        : this.#planStandard(cluster, pos - base, to, e);
      if (p.fresh) fresh++;
      pieces.push(p);
      pos = base + to;
    }
    if (fresh > 0) {
      // Lowest free clusters first: contiguous at the end of the file, so a long write into
      // new space stays one host write.
      const hosts = await this.#h.refs.alloc(fresh);
      let i = 0;
      for (const p of pieces) {
        if (!p.fresh) continue;
        const host = hosts[i++]!;
        p.host = host;
        p.next!.hi = ((p.next!.hi & COPIED) | Math.floor(host / 0x100000000)) >>> 0;
        p.next!.lo = ((p.next!.lo & 0x1ff) | (host >>> 0)) >>> 0;
      }
    }
    for (const p of pieces) p.zeroFill = p.fresh && await this.#fillIsZero(p);
    return pieces;
  }

  #planStandard(cluster: number, from: number, to: number, e: Entry): Piece {
    const cs = this.#cs;
    const kind = standardKind(e.hi, e.lo, false);
    const host = entryOffset(e.hi, e.lo);
    const copied = (e.hi & COPIED) !== 0;
    const p: Piece = {
      cluster,
      from,
      to,
      spanFrom: from,
      spanTo: to,
      host,
      fresh: false,
      zeroFill: false,
      next: undefined,
      release: undefined,
    };
    if (kind === Kind.Data && copied) return p; // in place
    p.spanFrom = 0;
    p.spanTo = cs;
    if (kind === Kind.Zero && copied && host !== 0) {
      // ZERO_ALLOC owned by us: reuse the cluster, fill it, drop the zero flag.
      p.next = { hi: e.hi, lo: (e.lo & ~1) >>> 0, zero: 0, alloc: 0 };
      return p;
    }
    p.fresh = true;
    p.next = { hi: COPIED, lo: 0, zero: 0, alloc: 0 };
    p.release = this.#oldHostRange(e, kind, host);
    return p;
  }

  #planExtended(cluster: number, from: number, to: number, e: Entry): Piece {
    const sc = this.#sc;
    const s0 = Math.floor(from / sc), s1 = Math.floor((to - 1) / sc);
    const touched = bitsBetween(s0, s1);
    const host = entryOffset(e.hi, e.lo);
    const copied = (e.hi & COPIED) !== 0;
    const compressed = (e.hi & COMPRESSED) !== 0;
    const p: Piece = {
      cluster,
      from,
      to,
      spanFrom: from,
      spanTo: to,
      host,
      fresh: false,
      zeroFill: false,
      next: undefined,
      release: undefined,
    };
    if (!compressed && host !== 0 && copied) {
      // In place; a partly written subcluster that holds no data yet gets its rest filled.
      if ((e.alloc & (1 << s0)) === 0) p.spanFrom = s0 * sc;
      if ((e.alloc & (1 << s1)) === 0) p.spanTo = (s1 + 1) * sc;
      const alloc = (e.alloc | touched) >>> 0, zero = (e.zero & ~touched) >>> 0;
      if (alloc !== e.alloc || zero !== e.zero) p.next = { hi: e.hi, lo: e.lo, zero, alloc };
      return p;
    }
    // New cluster (qemu's calculate_l2_meta): the copied span reaches back to the first and on
    // to the last subcluster that held data (the whole of a compressed cluster); everything in
    // the span becomes allocated.
    let first = s0, last = s1;
    if (compressed) {
      first = 0;
      last = 31;
    } else if (host !== 0) {
      first = Math.min(s0, e.alloc === 0 ? 32 : 31 - Math.clz32(e.alloc & -e.alloc));
      last = 31 - Math.min(31 - s1, Math.clz32(e.alloc));
    }
    const span = bitsBetween(first, last);
    const alloc = ((compressed ? 0 : e.alloc) | span) >>> 0;
    const zero = compressed ? 0 : (e.zero & ~span) >>> 0;
    p.spanFrom = first * sc;
    p.spanTo = (last + 1) * sc;
    p.fresh = true;
    p.next = { hi: COPIED, lo: 0, zero, alloc };
    p.release = this.#oldHostRange(e, compressed ? Kind.Compressed : Kind.Data, host);
    return p;
  }

  /** Host bytes an entry holds (to release when it is replaced), or undefined. */
  #oldHostRange(e: Entry, kind: number, host: number): [number, number] | undefined {
    if (kind === Kind.Compressed) {
      const d = compressedDescriptor(e.hi, e.lo, this.#h.clusterBits);
      return [d.offset, d.length];
    }
    return host !== 0 ? [host, this.#cs] : undefined;
  }

  /** True when the fill around a new cluster's data reads as zeroes (fallocate it instead). */
  async #fillIsZero(p: Piece): Promise<boolean> {
    const base = p.cluster * this.#cs;
    const ranges: Array<[number, number]> = [];
    if (p.spanFrom < p.from) ranges.push([base + p.spanFrom, p.from - p.spanFrom]);
    if (p.to < p.spanTo) ranges.push([base + p.to, p.spanTo - p.to]);
    if (ranges.length === 0) return false;
    for (const [off, len] of ranges) {
      const n = Math.min(len, this.#h.size - off);
      if (n <= 0) continue;
      const out = new ExtentList(64);
      await this.#h.extents(off, n, out);
      if (out.total < n) return false;
      const pairs = out.pairs;
      for (let i = 1; i < pairs.length; i += 2) if ((pairs[i]! & STATE_ZERO) === 0) return false;
    }
    return true;
  }

  /** Fill and write every piece; host-contiguous spans go out as one write. */
  async #writePieces(pieces: readonly Piece[], buf: Uint8Array, offset: number): Promise<void> {
    const cs = this.#cs;
    const segs: Array<{ host: number; data: Uint8Array }> = [];
    for (const p of pieces) {
      const base = p.cluster * cs;
      const data = buf.subarray(base + p.from - offset, base + p.to - offset);
      // A fill that reads as zeroes: small spans are written as zero bytes with the data (one
      // page-cache write, cheaper here than a fallocate that may wait on the journal); large
      // ones are zeroed with fallocate like qemu's handle_alloc_space, then the data written.
      const spanBytes = p.spanTo - p.spanFrom;
      if (p.zeroFill && (spanBytes <= ZERO_FILL_BY_WRITE_MAX || this.#h.encrypt !== undefined)) {
        const span = new Uint8Array(spanBytes);
        span.set(data, p.from - p.spanFrom);
        segs.push({ host: p.host + p.spanFrom, data: span });
        continue;
      }
      if (p.zeroFill) {
        await this.#io(() => this.#h.file.zeroRange(p.host, cs)).catch((e) => {
          if (!(e instanceof BlockError) || e.errno !== Errno.ENOTSUP) throw e;
          p.zeroFill = false;
        });
      }
      if (p.zeroFill || (p.spanFrom === p.from && p.spanTo === p.to)) {
        segs.push({ host: p.host + p.from, data });
        continue;
      }
      const span = new Uint8Array(p.spanTo - p.spanFrom);
      if (p.spanFrom < p.from) {
        await this.#h.pread(span.subarray(0, p.from - p.spanFrom), base + p.spanFrom);
      }
      span.set(data, p.from - p.spanFrom);
      if (p.to < p.spanTo) {
        const tail = span.subarray(p.to - p.spanFrom);
        const inside = Math.max(0, Math.min(tail.length, this.#h.size - (base + p.to)));
        if (inside > 0) await this.#h.pread(tail.subarray(0, inside), base + p.to);
      }
      segs.push({ host: p.host + p.spanFrom, data: span });
    }
    // Merge neighbours in host order of issue; views of the caller's buffer merge for free.
    const merged: Array<{ host: number; data: Uint8Array }> = [];
    for (const s of segs) {
      const last = merged[merged.length - 1];
      if (last !== undefined && last.host + last.data.length === s.host) {
        const a = last.data, b = s.data;
        if (a.buffer === b.buffer && a.byteOffset + a.length === b.byteOffset) {
          last.data = new Uint8Array(a.buffer, a.byteOffset, a.length + b.length);
        } else {
          const c = new Uint8Array(a.length + b.length);
          c.set(a);
          c.set(b, a.length);
          last.data = c;
        }
        continue;
      }
      merged.push({ host: s.host, data: s.data });
    }
    const encrypt = this.#h.encrypt;
    if (encrypt !== undefined) { for (const s of merged) s.data = encrypt(s.data, s.host); }
    await Promise.all(merged.map((s) => this.#io(() => this.#h.file.pwrite(s.data, s.host))));
  }

  /** Run one data I/O inside an epoch (see IoEpochs). */
  async #io<T>(fn: () => Promise<T>): Promise<T> {
    const e = this.#h.epochs.begin();
    try {
      return await fn();
    } finally {
      this.#h.epochs.end(e);
    }
  }

  /** Publish the new entries and queue the release of what they replaced (under the mutex). */
  async #link(pieces: readonly Piece[]): Promise<void> {
    for (const p of pieces) {
      if (p.next === undefined) continue;
      await this.#writeEntry(p.cluster, p.next);
      if (p.release !== undefined) this.#h.refs.queueDecrement(p.release[0], p.release[1]);
    }
  }

  // -------------------------------------------------------------------------------------------
  // Entries and L2 tables (all under the metadata mutex)

  /**
   * Run `fn` on cluster `cluster`'s entry words, synchronously right after the slice is looked up
   * (no await in between, so the slice cannot be evicted under it), making its L2 table
   * writable first.
   */
  async #withEntry<T>(
    cluster: number,
    fn: (words: Uint32Array, w: number, key: number) => T,
  ): Promise<T> {
    const l1i = Math.floor(cluster / this.#l2Entries);
    const l1 = this.#h.l1;
    if (l1i >= l1.length >> 1) {
      throw this.#error(Errno.EIO, `guest cluster ${cluster} is beyond the L1 table`);
    }
    const sliceBytes = this.#h.cache.sliceBytes;
    const hi = l1[l1i * 2]!, lo = l1[l1i * 2 + 1]!;
    let table = entryOffset(hi, lo);
    if (table === 0 || (hi & COPIED) === 0) table = await this.#newTable(l1i, table);
    const tableByte = (cluster - l1i * this.#l2Entries) * this.#entryWords * 4;
    const sliceStart = tableByte - (tableByte % sliceBytes);
    const key = table + sliceStart;
    // A slice loaded can be evicted again before we look (other loads insert): retry.
    for (let round = 0; round < 100; round++) {
      await this.#h.cache.load(key);
      const words = this.#h.cache.get(key);
      if (words !== undefined) return fn(words, (tableByte - sliceStart) >> 2, key);
    }
    throw this.#error(Errno.EIO, `L2 cache thrashing at cluster ${cluster}`);
  }

  /**
   * A new L2 table for L1 index `l1i`: zeroed, or a copy of the shared table `old` (whose
   * reference is then dropped). Every slice of it is dirty, so the whole cluster is written
   * before the L1 entry that publishes it.
   */
  async #newTable(l1i: number, old: number): Promise<number> {
    if (old % this.#cs !== 0) {
      throw this.#error(Errno.EIO, `L2 table offset 0x${old.toString(16)} unaligned`);
    }
    const cs = this.#cs, sliceBytes = this.#h.cache.sliceBytes;
    const copies: Uint32Array[] = [];
    for (let s = 0; s < cs; s += sliceBytes) {
      copies.push(
        old === 0 ? new Uint32Array(sliceBytes >> 2) : (await this.#h.cache.load(old + s)).slice(),
      );
    }
    const table = (await this.#h.refs.alloc(1))[0]!;
    copies.forEach((words, i) => this.#h.cache.put(table + i * sliceBytes, words));
    this.#h.l1[l1i * 2] = (COPIED | Math.floor(table / 0x100000000)) >>> 0;
    this.#h.l1[l1i * 2 + 1] = table >>> 0;
    this.#l1Dirty.add(l1i);
    if (old !== 0) this.#h.refs.queueDecrement(old, cs);
    return table;
  }

  /** The entry of `cluster`; `prepare` makes its L2 table writable first (qemu's order). */
  async #readEntry(cluster: number, prepare = false): Promise<Entry> {
    const l1i = Math.floor(cluster / this.#l2Entries);
    const l1 = this.#h.l1;
    const none = { hi: 0, lo: 0, zero: 0, alloc: 0 };
    if (l1i >= l1.length >> 1) {
      throw this.#error(Errno.EIO, `guest cluster ${cluster} is beyond the L1 table`);
    }
    if (!prepare && entryOffset(l1[l1i * 2]!, l1[l1i * 2 + 1]!) === 0) return none;
    const ext = this.#h.extendedL2;
    return await this.#withEntry(cluster, (words, w) => ({
      hi: words[w]!,
      lo: words[w + 1]!,
      zero: ext ? words[w + 2]! : 0,
      alloc: ext ? words[w + 3]! : 0,
    }));
  }

  async #writeEntry(cluster: number, e: Entry): Promise<void> {
    const ext = this.#h.extendedL2;
    await this.#withEntry(cluster, (words, w, key) => {
      words[w] = e.hi;
      words[w + 1] = e.lo;
      if (ext) {
        words[w + 2] = e.zero;
        words[w + 3] = e.alloc;
      }
      this.#h.cache.markDirty(key);
    });
  }

  // -------------------------------------------------------------------------------------------
  // Write-zeroes and discard

  /**
   * WRITE_ZEROES as qemu's qcow2 driver and block layer do it: aligned units become zero
   * entries (unmapped unless `noHole`); a partial unit is zeroed whole when the rest of it
   * already reads as zeroes, else written with zero bytes (ENOTSUP under `fastZero`).
   */
  async zero(offset: number, length: number, noHole: boolean, fastZero: boolean): Promise<void> {
    const release = await this.#lockRange(offset, length);
    try {
      const unit = this.#sc, end = offset + length;
      let a = offset;
      if (a % unit !== 0) {
        const stop = Math.min(end, a - (a % unit) + unit);
        await this.#zeroPartial(a, stop, noHole, fastZero);
        a = stop;
      }
      let b = end === this.#h.size ? end : end - (end % unit);
      if (b < a) b = a;
      if (b > a) await this.#zeroAligned(a, b, noHole, fastZero);
      if (b < end) await this.#zeroPartial(b, end, noHole, fastZero);
    } finally {
      release();
    }
    await this.#relieve();
  }

  async #zeroPartial(a: number, b: number, noHole: boolean, fastZero: boolean): Promise<void> {
    const unit = this.#sc;
    const u0 = a - (a % unit);
    const u1 = Math.min(u0 + unit, this.#h.size);
    if (await this.#readsZero(u0, a - u0) && await this.#readsZero(b, u1 - b)) {
      const e = await this.#meta.run(() => this.#readEntry(Math.floor(u0 / this.#cs)));
      const sc = Math.floor((u0 % this.#cs) / unit);
      const kind = this.#h.extendedL2
        ? extendedKind(e.hi, e.lo, e.alloc, e.zero, sc, false)
        : standardKind(e.hi, e.lo, false);
      if (kind === Kind.Unalloc || kind === Kind.Zero) {
        if (await this.#zeroAligned(u0, u1, noHole, fastZero, true)) return;
      }
    }
    if (fastZero) throw this.#error(Errno.ENOTSUP, "zeroing this range needs a data write");
    await this.#writeZeroBytes(a, b);
  }

  /** qemu's fallback for zeroes entries cannot express: zero bytes, in bounded chunks. */
  async #writeZeroBytes(a: number, b: number): Promise<void> {
    const chunk = Math.max(this.#cs, 1024 * 1024);
    const zeros = new Uint8Array(Math.min(chunk, b - a));
    for (let pos = a; pos < b;) {
      const stop = Math.min(b, pos - (pos % chunk) + chunk);
      await this.#writeLocked(zeros.subarray(0, stop - pos), pos);
      pos = stop;
    }
  }

  async #readsZero(offset: number, length: number): Promise<boolean> {
    if (length <= 0) return true;
    const out = new ExtentList(64);
    await this.#h.extents(offset, length, out);
    if (out.total < length) return false;
    for (let i = 1; i < out.pairs.length; i += 2) {
      if ((out.pairs[i]! & STATE_ZERO) === 0) return false;
    }
    return true;
  }

  /**
   * Zero whole units `[a, b)` (b may be the unaligned end of the image). Returns false, when
   * `soft`, instead of writing data where entries cannot express the zeroes.
   */
  async #zeroAligned(
    a: number,
    b: number,
    noHole: boolean,
    fastZero: boolean,
    soft = false,
  ): Promise<boolean> {
    const h = this.#h;
    if (h.version === 2) {
      // No zero flag: without a backing file a discard reads as zeroes (qemu does that).
      if (h.backing === undefined) {
        await this.#meta.run(() => this.#discardClusters(a, b));
        return true;
      }
      if (soft) return false;
      if (fastZero) throw this.#error(Errno.ENOTSUP, "v2 image with backing file has no zero flag");
      await this.#writeZeroBytes(a, b);
      return true;
    }
    const cs = this.#cs;
    // Entries first; if one cluster cannot express its zeroes (part of a compressed cluster),
    // qemu's driver fails the whole range and the block layer writes zero bytes over all of it.
    const expressible = await this.#meta.run(async () => {
      const updates: Array<[number, Entry & { release?: [number, number] }]> = [];
      for (let pos = a; pos < b;) {
        const cluster = Math.floor(pos / cs);
        const base = cluster * cs;
        const stop = Math.min(b, base + cs);
        const e = await this.#readEntry(cluster);
        const whole = pos === base && (stop === base + cs || stop === h.size);
        const next = this.#zeroEntry(e, pos - base, stop - base, whole, !noHole);
        if (next === undefined) return false;
        if (next !== e) updates.push([cluster, next]);
        pos = stop;
      }
      for (const [cluster, next] of updates) {
        await this.#writeEntry(cluster, next);
        if (next.release !== undefined) {
          h.refs.queueDecrement(next.release[0], next.release[1], h.passDiscard);
        }
      }
      return true;
    });
    if (expressible) return true;
    if (soft) return false;
    if (fastZero) throw this.#error(Errno.ENOTSUP, "zeroing part of a compressed cluster");
    await this.#writeZeroBytes(a, b);
    return true;
  }

  /**
   * The entry after zeroing `[from, to)` of a cluster (whole cluster, or whole subclusters with
   * extended L2); the same object when nothing changes; undefined when it cannot be expressed.
   */
  #zeroEntry(
    e: Entry,
    from: number,
    to: number,
    whole: boolean,
    mayUnmap: boolean,
  ): (Entry & { release?: [number, number] }) | undefined {
    const compressed = (e.hi & COMPRESSED) !== 0;
    const host = entryOffset(e.hi, e.lo);
    if (this.#h.extendedL2) {
      const s0 = Math.floor(from / this.#sc), s1 = Math.floor((to - 1) / this.#sc);
      if (whole) {
        // Whole cluster: all zero bits; unmap frees the host cluster.
        const unmap = compressed || (mayUnmap && host !== 0);
        if (unmap) {
          return {
            hi: 0,
            lo: 0,
            zero: ALL,
            alloc: 0,
            release: this.#oldHostRange(e, compressed ? Kind.Compressed : Kind.Data, host),
          };
        }
        const n = { hi: e.hi, lo: e.lo, zero: ALL, alloc: 0 };
        return n.zero === e.zero && n.alloc === e.alloc ? e : n;
      }
      if (compressed) return undefined;
      const bits = bitsBetween(s0, s1);
      const zero = (e.zero | bits) >>> 0, alloc = (e.alloc & ~bits) >>> 0;
      return zero === e.zero && alloc === e.alloc ? e : { hi: e.hi, lo: e.lo, zero, alloc };
    }
    const kind = standardKind(e.hi, e.lo, false);
    const allocated = kind === Kind.Data || kind === Kind.Compressed || host !== 0;
    if (compressed || (mayUnmap && allocated)) {
      return {
        hi: 0,
        lo: 1,
        zero: 0,
        alloc: 0,
        release: this.#oldHostRange(e, kind, host),
      };
    }
    const n = { hi: e.hi, lo: (e.lo | 1) >>> 0, zero: 0, alloc: 0 };
    return n.lo === e.lo && n.hi === e.hi ? e : n;
  }

  /**
   * TRIM with --discard=unmap, as qemu's qcow2 discard: whole clusters only (plus a partial last
   * cluster at the end of the image); v2 images with a backing file ignore it.
   */
  async discard(offset: number, length: number): Promise<void> {
    const cs = this.#cs, end = offset + length;
    const a = Math.ceil(offset / cs) * cs;
    const b = end === this.#h.size ? end : end - (end % cs);
    if (b <= a) return;
    if (this.#h.version === 2 && this.#h.backing !== undefined) return;
    const release = await this.#lockRange(a, b - a);
    try {
      await this.#meta.run(() => this.#discardClusters(a, b));
    } finally {
      release();
    }
    await this.#relieve();
  }

  async #discardClusters(a: number, b: number): Promise<void> {
    const cs = this.#cs, h = this.#h;
    const keepZero = (allocated: boolean) => h.backing !== undefined || allocated;
    for (let pos = a; pos < b; pos += cs) {
      const cluster = Math.floor(pos / cs);
      const e = await this.#readEntry(cluster);
      const compressed = (e.hi & COMPRESSED) !== 0;
      const host = entryOffset(e.hi, e.lo);
      const allocated = compressed || host !== 0;
      // Nothing allocated and nothing below: the entry stays as it is (qemu keeps it too).
      if (!keepZero(allocated)) continue;
      let next: Entry;
      if (h.extendedL2) next = { hi: 0, lo: 0, zero: ALL, alloc: 0 };
      else next = { hi: 0, lo: h.version >= 3 ? 1 : 0, zero: 0, alloc: 0 };
      if (next.hi === e.hi && next.lo === e.lo && next.zero === e.zero && next.alloc === e.alloc) {
        continue;
      }
      await this.#writeEntry(cluster, next);
      const r = this.#oldHostRange(e, compressed ? Kind.Compressed : Kind.Data, host);
      if (r !== undefined) h.refs.queueDecrement(r[0], r[1], h.passDiscard);
    }
  }

  // -------------------------------------------------------------------------------------------
  // Persistent bitmaps: what bitmap.ts needs to mark them in use and store them on close

  /** The allocation, header and flush hooks of {@link storeBitmaps} / {@link markBitmapsInUse}. */
  bitmapIo(header: Qcow2Header): BitmapStoreIo {
    const h = this.#h, cs = this.#cs;
    return {
      clusterSize: cs,
      allocate: (bytes) =>
        this.#meta.run(() => h.refs.allocContiguous(Math.max(1, Math.ceil(bytes / cs)))),
      write: (offset, data) => h.file.pwrite(data, offset),
      flushCaches: () => this.flush(),
      updateHeader: async (ext, autoclearBitmaps) => {
        const cluster0 = new Uint8Array(cs);
        const n = await h.file.pread(cluster0, 0);
        const at = bitmapsExtensionOffset(cluster0.subarray(0, n), header);
        if (at === undefined) {
          throw this.#error(Errno.EIO, "the bitmaps header extension disappeared");
        }
        cluster0.set(encodeBitmapsExtension(ext), at);
        const v = new DataView(cluster0.buffer);
        const lo = v.getUint32(HEADER_AUTOCLEAR + 4);
        v.setUint32(HEADER_AUTOCLEAR + 4, autoclearBitmaps ? (lo | 1) >>> 0 : (lo & ~1) >>> 0);
        await h.file.pwrite(cluster0.subarray(0, at + 24), 0);
        await h.file.sync();
      },
      free: (offset, bytes) =>
        this.#meta.run(() => Promise.resolve(h.refs.queueDecrement(offset, bytes))),
    };
  }

  // -------------------------------------------------------------------------------------------
  // Flush

  /** Make everything completed so far durable, metadata in crash-safe order. */
  flush(): Promise<void> {
    return this.#meta.run(() => this.#flushLocked());
  }

  async #flushLocked(): Promise<void> {
    const h = this.#h, file = h.file;
    await h.refs.writeBlocks();
    await file.sync(); // data and refcount increments before anything that references them
    if (h.refs.tableDirty) {
      await h.refs.writeTable();
      await file.sync();
    }
    const slices = h.cache.takeDirty();
    if (slices.length > 0) {
      try {
        await Promise.all(slices.map((s) => file.pwrite(s.bytes, s.key)));
      } catch (e) {
        h.cache.restoreDirty(slices.map((s) => s.key));
        throw e;
      }
      await file.sync();
    }
    if (this.#l1Dirty.size > 0) {
      const idx = [...this.#l1Dirty];
      this.#l1Dirty.clear();
      const buf = new Uint8Array(8);
      const v = new DataView(buf.buffer);
      try {
        for (const i of idx) {
          v.setUint32(0, h.l1[i * 2]!);
          v.setUint32(4, h.l1[i * 2 + 1]!);
          await file.pwrite(buf, h.l1TableOffset + i * 8);
        }
      } catch (e) {
        for (const i of idx) this.#l1Dirty.add(i);
        throw e;
      }
      await file.sync();
    }
    const { clusters: dec, discard } = h.refs.takeDecrements();
    if (dec.length > 0) {
      // Nobody may still read or write a cluster being freed: wait for older I/O.
      await h.epochs.drain();
      const freed = await h.refs.applyDecrements(dec);
      await h.refs.writeBlocks();
      await file.sync();
      // Still under the metadata lock, so no allocation can hand a freed cluster out before
      // its hole is punched.
      await this.#punchFreed(freed.filter((c) => discard.has(c)));
    }
  }

  /**
   * Deallocate freed host clusters in the file, as qemu passes a discard request down. Like a
   * discard it is advice: a filesystem that cannot punch, or fails to, keeps the bytes.
   */
  async #punchFreed(clusters: number[]): Promise<void> {
    const cs = this.#cs, file = this.#h.file;
    clusters.sort((x, y) => x - y);
    for (let i = 0; i < clusters.length;) {
      let j = i + 1;
      while (j < clusters.length && clusters[j] === clusters[j - 1]! + 1) j++;
      try {
        await file.punchHole(clusters[i]! * cs, (j - i) * cs);
      } catch {
        // Advisory, as above.
      }
      i = j;
    }
  }

  /** Flush when dirty metadata piles up (dirty slices cannot be evicted). */
  async #relieve(): Promise<void> {
    const h = this.#h;
    if (
      h.cache.dirtyCount * h.cache.sliceBytes < DIRTY_BYTES_FLUSH &&
      h.refs.pendingCount < PENDING_FLUSH
    ) return;
    this.#flushing ??= this.flush().finally(() => (this.#flushing = undefined));
    await this.#flushing;
  }
}
