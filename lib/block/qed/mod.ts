/**
 * The QED format driver, read and write, as qemu 7.2's qed driver serves images:
 *
 * - a guest offset goes through the L1 table (always in memory) to an L2 table (cached) to a
 *   data cluster; an L2 entry of 0 (or no L2 table) reads the backing file, or zeroes without
 *   one or past its end; an entry of 1 is a zero cluster. Block status: data clusters are data,
 *   zero clusters hole,zero, unallocated ones the backing file's status (hole,zero without);
 *   allocation depth 1 for data and zero clusters, the backing chain's depth + 1 below;
 * - a write to clusters that are not allocated takes the next clusters at the end of the file
 *   (qemu's file size, rounded down to whole clusters at open, then grown by each allocation),
 *   fills the rest of them from the backing file (zeroes without one) and writes them whole, then
 *   the L2 entries (the sectors holding them); a missing L2 table is allocated after the data,
 *   written whole and flushed before the L1 entry that points at it;
 * - without a backing file the first allocating write sets the need-check bit in the header;
 *   it is cleared (flush, header, flush) at close. qemu's driver also arms a 5 s timer to clear
 *   it, but on QEMU_CLOCK_VIRTUAL, which never runs in qemu-nbd: the bit stays set while
 *   qemu-nbd serves, and so it does here. With a backing file the data is flushed before the L2
 *   update instead and the bit is not used;
 * - write-zeroes of whole clusters makes unallocated clusters zero clusters (entry 1) and writes
 *   zero bytes into allocated ones; unaligned heads and tails are written as zero data (and fail
 *   with ENOTSUP for a fast zero), as qemu's block layer splits them;
 * - qed has no discard: trim does nothing;
 * - opened read-write with the need-check bit set, the image is checked and repaired first
 *   (check.ts), as qemu does, and the bit cleared (even when double references remain, as
 *   qemu-nbd's open-time drain clears it).
 *
 * Allocations are serialised by one lock, so two writes to the same new cluster allocate it once
 * and metadata writes never overtake each other; reads and writes to allocated clusters do not
 * wait.
 *
 * @module
 */

import { isAbsolute } from "node:path";
import { hasProtocol } from "../../cli/filename.ts";
import type { ImageFormat } from "../../cli/options.ts";
import type { FileEngine } from "../../io/file_engine.ts";
import type { FormatContext, FormatDriver } from "../formats.ts";
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
import { checkAndFix } from "./check.ts";
import {
  decodeQedHeader,
  encodeQedHeader,
  isValidClusterOffset,
  isValidTableOffset,
  QED_BACKING_NAME_MAX,
  QED_F_BACKING_FILE,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_F_NEED_CHECK,
  QED_HEADER_SIZE,
  type QedHeader,
  qedProbe,
} from "./header.ts";
import { L2Cache, QED_ZERO_CLUSTER, QedTable } from "./table.ts";
import { Mutex } from "../qcow2/sync.ts";
import { backingDepth } from "../backing_depth.ts";

export { qedProbe } from "./header.ts";

/** The qed entry of the format registry (lib/block/formats.ts). */
export const qedFormat: FormatDriver = {
  name: "qed",
  probe: (head) => qedProbe(head),
  open: (file, ctx) => openQed(file, ctx),
};

/** Largest L1/L2 table denbd loads (qemu allows 16 clusters of 64 MiB: 1 GiB each). */
const MAX_TABLE_BYTES = 64 * 1024 * 1024;
/** Memory for cached L2 tables (at least one table). */
const L2_CACHE_BYTES = 64 * 1024 * 1024;
/** Zero bytes written per step when zeroing allocated clusters. */
const ZERO_CHUNK = 1024 * 1024;
const SECTOR = 512;
const HOLE_ZERO = STATE_HOLE | STATE_ZERO;

/** Longest backing chain accepted (qcow2/mod.ts has the same; not imported: it imports the registry). */
const MAX_CHAIN_DEPTH = 256;
/** Opens in progress in this process: a backstop for backing chains opened without `chain`. */
let opening = 0;

function realPath(path: string): string {
  try {
    return Deno.realPathSync(path);
  } catch {
    return path;
  }
}

/** Backing name → path: absolute as is, relative to the directory of the image naming it. */
function resolveBacking(imagePath: string, name: string): string {
  if (isAbsolute(name)) return name;
  const slash = imagePath.lastIndexOf("/");
  return slash < 0 ? name : imagePath.slice(0, slash + 1) + name;
}

async function readPadded(file: FileEngine, buf: Uint8Array, offset: number): Promise<void> {
  if (buf.length === 0) return;
  const n = await file.pread(buf, offset);
  if (n < buf.length) buf.fill(0, n);
}

/** Opens a QED image over `file`; closes the file (and backing files) if opening fails. */
export async function openQed(file: FileEngine, ctx: FormatContext): Promise<QedDevice> {
  const chain = ctx.chain.paths;
  const self = realPath(file.path);
  let backing: BlockDevice | undefined;
  opening++;
  try {
    if (chain.includes(self)) {
      throw new BlockError(
        Errno.EINVAL,
        `Backing file loop detected: '${file.path}' is its own backing file (chain: ${
          [...chain, self].join(" -> ")
        })`,
      );
    }
    if (chain.length >= MAX_CHAIN_DEPTH || opening > 4 * MAX_CHAIN_DEPTH) {
      throw new BlockError(
        Errno.EINVAL,
        `Backing chain of '${file.path}' is deeper than ${MAX_CHAIN_DEPTH} images`,
      );
    }
    const head = new Uint8Array(QED_HEADER_SIZE);
    await readPadded(file, head, 0);
    const fileLength = file.length();
    const h = decodeQedHeader(head, fileLength);
    if (h.imageSize > Number.MAX_SAFE_INTEGER) {
      throw new BlockError(
        Errno.ENOTSUP,
        `QED image size ${h.imageSize} is larger than denbd supports (2^53 bytes)`,
      );
    }
    const tableBytes = h.clusterSize * h.tableSize;
    if (tableBytes > MAX_TABLE_BYTES) {
      throw new BlockError(
        Errno.ENOTSUP,
        `QED tables of ${tableBytes} bytes (cluster_size ${h.clusterSize}, table_size ${h.tableSize}) are larger than denbd supports (${MAX_TABLE_BYTES})`,
      );
    }
    let backingName = "";
    if ((h.features & QED_F_BACKING_FILE) !== 0n) {
      if (h.backingNameSize >= QED_BACKING_NAME_MAX) {
        throw new BlockError(Errno.EINVAL, "Failed to read backing filename");
      }
      const raw = new Uint8Array(h.backingNameSize);
      await readPadded(file, raw, h.backingNameOffset);
      // qemu keeps it as a C string: a NUL ends it.
      const nul = raw.indexOf(0);
      backingName = new TextDecoder().decode(nul < 0 ? raw : raw.subarray(0, nul));
    }
    const fileSize = fileLength - (fileLength % h.clusterSize);
    if (ctx.writable && h.autoclearFeatures !== 0n) {
      // No autoclear bits are defined: clear every one, as qemu does on a read-write open.
      h.autoclearFeatures = 0n;
      await file.pwrite(encodeQedHeader(h, head), 0);
      await file.sync();
    }
    const l1Bytes = new Uint8Array(tableBytes);
    await readPadded(file, l1Bytes, h.l1TableOffset);
    const device = new QedDevice(file, h, new QedTable(l1Bytes), fileSize, head, ctx.writable);
    if (ctx.writable && (h.features & QED_F_NEED_CHECK) !== 0n) {
      await device.checkAtOpen();
    }
    if (backingName !== "") {
      const fmt: ImageFormat | undefined = (h.features & QED_F_BACKING_FORMAT_NO_PROBE) !== 0n
        ? "raw"
        : undefined;
      const below = { paths: [...chain, self] };
      const path = hasProtocol(backingName) ? backingName : resolveBacking(file.path, backingName);
      if (below.paths.includes(realPath(path))) {
        throw new BlockError(
          Errno.EINVAL,
          `Backing file loop detected: '${file.path}' has backing file '${backingName}', which is above it in the chain`,
        );
      }
      try {
        backing = await ctx.openBacking(path, fmt, below);
      } catch (e) {
        // qemu's bdrv_open_backing_file frames every error of the backing open.
        if (!(e instanceof BlockError)) throw e;
        throw new BlockError(e.errno, `Could not open backing file: ${e.message}`);
      }
      device.backing = backing;
    }
    return device;
  } catch (e) {
    await backing?.close().catch(() => {});
    file.close();
    throw e;
  } finally {
    opening--;
  }
}

/** What a lookup found for the start of a range. */
const enum Kind {
  /** Data clusters in the image file. */
  Data,
  /** Zero clusters (entry 1). */
  Zero,
  /** Entries of 0 in an L2 table. */
  UnallocL2,
  /** No L2 table for this range. */
  UnallocL1,
}

/** A lookup result, reused by each request (no per-cluster objects). */
interface Run {
  kind: Kind;
  /** Bytes from the looked-up offset with this kind (contiguous in the file for data). */
  length: number;
  /** Data: file offset of the looked-up byte. */
  host: number;
  /** The L2 table (not for UnallocL1) and its file offset. */
  table: QedTable | undefined;
  tableOffset: number;
  /** Set when the L2 table at `tableOffset` is not cached. */
  miss: boolean;
}

function newRun(): Run {
  return {
    kind: Kind.UnallocL1,
    length: 0,
    host: 0,
    table: undefined,
    tableOffset: 0,
    miss: false,
  };
}

export class QedDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  /** The backing image (set by openQed after the checks). */
  backing: BlockDevice | undefined;
  readonly #file: FileEngine;
  readonly #h: QedHeader;
  readonly #l1: QedTable;
  /** qemu's s->file_size: where the next cluster goes. */
  #fileSize: number;
  /** The header bytes as read (rewritten with updated fields). */
  readonly #head: Uint8Array;
  readonly #cs: number;
  readonly #nelems: number;
  /** Guest bytes one L2 table maps. */
  readonly #l2Span: number;
  readonly #tableBytes: number;
  readonly #cache: L2Cache;
  readonly #loading = new Map<number, Promise<QedTable>>();
  readonly #alloc = new Mutex();
  #closed = false;

  constructor(
    file: FileEngine,
    header: QedHeader,
    l1: QedTable,
    fileSize: number,
    head: Uint8Array,
    writable: boolean,
  ) {
    this.#file = file;
    this.#h = header;
    this.#l1 = l1;
    this.#fileSize = fileSize;
    this.#head = head;
    this.#cs = header.clusterSize;
    this.#tableBytes = header.clusterSize * header.tableSize;
    this.#nelems = this.#tableBytes / 8;
    this.#l2Span = this.#nelems * this.#cs;
    this.#cache = new L2Cache(Math.floor(L2_CACHE_BYTES / this.#tableBytes));
    this.size = header.imageSize;
    this.caps = {
      writable,
      flush: true,
      trim: writable,
      zero: writable,
      fastZero: writable,
      extents: true,
      // qed has sector-based read/write callbacks: qemu's request alignment is 512.
      minBlock: SECTOR,
    };
  }

  /** The need-check bit is set in the header as last written. */
  get needsCheck(): boolean {
    return (this.#h.features & QED_F_NEED_CHECK) !== 0n;
  }

  /** Cluster size in bytes. */
  get clusterSize(): number {
    return this.#cs;
  }

  /** The image has a backing file. */
  get hasBacking(): boolean {
    return this.backing !== undefined;
  }

  // ---- tables ----

  #invalid(what: string): BlockError {
    return new BlockError(Errno.EINVAL, `QED image '${this.#file.path}': ${what}`);
  }

  /** The L2 table at `offset`, from the cache or the file (concurrent loads share one read). */
  #loadTable(offset: number): Promise<QedTable> {
    const hit = this.#cache.get(offset);
    if (hit !== undefined) return Promise.resolve(hit);
    let p = this.#loading.get(offset);
    if (p === undefined) {
      p = (async () => {
        try {
          const bytes = new Uint8Array(this.#tableBytes);
          await readPadded(this.#file, bytes, offset);
          // A writer may have put its (newer) copy in the cache meanwhile.
          const now = this.#cache.get(offset);
          if (now !== undefined) return now;
          const t = new QedTable(bytes);
          this.#cache.set(offset, t);
          return t;
        } finally {
          this.#loading.delete(offset);
        }
      })();
      this.#loading.set(offset, p);
    }
    return p;
  }

  /**
   * qemu's qed_find_cluster for `[pos, pos+len)`: fills `r` with the kind and length of the run
   * at `pos` (within one L2 table). Returns false, with `r.miss` set, when the L2 table must be
   * loaded first. Throws EINVAL for offsets qemu refuses.
   */
  #lookup(pos: number, len: number, r: Run): boolean {
    const cs = this.#cs;
    const l1i = Math.floor(pos / this.#l2Span);
    len = Math.min(len, (l1i + 1) * this.#l2Span - pos);
    r.miss = false;
    const l2Off = this.#l1.get(l1i);
    if (l2Off === 0) {
      r.kind = Kind.UnallocL1;
      r.length = len;
      r.table = undefined;
      return true;
    }
    if (!isValidTableOffset(this.#h, this.#fileSize, l2Off)) {
      throw this.#invalid(`L1 entry ${l1i} (${l2Off}) is not a valid L2 table offset`);
    }
    const t = this.#cache.get(l2Off);
    r.tableOffset = l2Off;
    if (t === undefined) {
      r.miss = true;
      return false;
    }
    r.table = t;
    const inCluster = pos % cs;
    const index = Math.floor(pos / cs) % this.#nelems;
    const end = Math.min(this.#nelems, index + Math.ceil((inCluster + len) / cs));
    const first = t.get(index);
    let i = index + 1;
    if (first === 0 || first === QED_ZERO_CLUSTER) {
      while (i < end && t.get(i) === first) i++;
      r.kind = first === 0 ? Kind.UnallocL2 : Kind.Zero;
    } else {
      if (!isValidClusterOffset(this.#h, this.#fileSize, first)) {
        throw this.#invalid(
          `L2 entry ${index} of the table at ${l2Off} (${first}) is not a valid cluster offset`,
        );
      }
      let last = first;
      while (i < end && t.get(i) === last + cs) {
        last += cs;
        i++;
      }
      r.kind = Kind.Data;
      r.host = first + inCluster;
    }
    r.length = Math.min(len, (i - index) * cs - inCluster);
    return true;
  }

  async #find(pos: number, len: number, r: Run): Promise<void> {
    // Bounded: each pass loads the missing table; a table evicted at once is read again.
    for (let tries = 0; !this.#lookup(pos, len, r); tries++) {
      const t = await this.#loadTable(r.tableOffset);
      if (tries > 2) {
        // Under heavy eviction, use the loaded table directly.
        this.#cache.set(r.tableOffset, t);
      }
    }
  }

  // ---- reads ----

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const r = newRun();
    // Fast path: one data run covers the whole request.
    if (this.#lookup(offset, buf.length, r) && r.kind === Kind.Data && r.length === buf.length) {
      return await readPadded(this.#file, buf, r.host);
    }
    const reads: Promise<void>[] = [];
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      await this.#find(pos, buf.length - done, r);
      const part = buf.subarray(done, done + r.length);
      switch (r.kind) {
        case Kind.Data:
          reads.push(readPadded(this.#file, part, r.host));
          break;
        case Kind.Zero:
          part.fill(0);
          break;
        default:
          reads.push(this.#readBacking(part, pos));
      }
      done += r.length;
    }
    if (reads.length === 1) return await reads[0];
    const results = await Promise.allSettled(reads);
    for (const res of results) if (res.status === "rejected") throw res.reason;
  }

  /** Guest bytes at `pos` from the backing file; zeroes without one or past its end. */
  async #readBacking(buf: Uint8Array, pos: number): Promise<void> {
    const b = this.backing;
    const n = b === undefined ? 0 : Math.max(0, Math.min(buf.length, b.size - pos));
    if (n < buf.length) buf.fill(0, n);
    if (n > 0) await b!.pread(buf.subarray(0, n), pos);
  }

  fileRange(offset: number, length: number): FileRange | undefined {
    if (this.#file.fd < 0) return undefined;
    const r = newRun();
    try {
      if (!this.#lookup(offset, length, r)) return undefined;
    } catch {
      return undefined; // pread reports the error
    }
    if (r.kind !== Kind.Data || r.length < length) return undefined;
    return { fd: this.#file.fd, offset: r.host, data: true };
  }

  writeRange(offset: number, length: number): FileRange | undefined {
    if (!this.caps.writable || this.#closed) return undefined;
    return this.fileRange(offset, length);
  }

  // ---- writes ----

  #checkWritable(): void {
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "QED image is read-only");
  }

  async pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    this.#checkWritable();
    await this.#write(buf, offset, buf.length, false);
  }

  /**
   * One write request: `data` at `offset`, or (`zero`) `length` bytes of whole clusters the
   * qed way (zero clusters where nothing is allocated). Segment by segment, as qemu's request
   * loop: allocated runs in place, the others through the allocation lock.
   */
  async #write(data: Uint8Array, offset: number, length: number, zero: boolean): Promise<void> {
    const r = newRun();
    for (let done = 0; done < length;) {
      const pos = offset + done;
      await this.#find(pos, length - done, r);
      if (r.kind === Kind.Data) {
        const n = r.length;
        if (zero) await this.#zeroInPlace(r.host, n);
        else await this.#file.pwrite(data.subarray(done, done + n), r.host);
        done += n;
      } else {
        const part = zero ? data : data.subarray(done);
        done += await this.#alloc.run(() => this.#allocate(pos, part, length - done, zero));
      }
    }
  }

  async #zeroInPlace(host: number, n: number): Promise<void> {
    const zeroes = new Uint8Array(Math.min(n, ZERO_CHUNK));
    for (let done = 0; done < n;) {
      const k = Math.min(n - done, zeroes.length);
      await this.#file.pwrite(zeroes.subarray(0, k), host + done);
      done += k;
    }
  }

  /**
   * One segment of a write at `pos` that found no data cluster, under the allocation lock
   * (qemu's qed_aio_write_alloc). Looks up again (an earlier writer may have allocated it),
   * then allocates. Returns the bytes handled.
   */
  async #allocate(pos: number, data: Uint8Array, length: number, zero: boolean): Promise<number> {
    const r = newRun();
    await this.#find(pos, length, r);
    const n = r.length;
    if (r.kind === Kind.Data) {
      if (zero) await this.#zeroInPlace(r.host, n);
      else await this.#file.pwrite(data.subarray(0, n), r.host);
      return n;
    }
    if (zero && r.kind === Kind.Zero) return n;
    const cs = this.#cs;
    const inCluster = pos % cs;
    const nclusters = Math.ceil((inCluster + n) / cs);
    let cluster = QED_ZERO_CLUSTER;
    if (!zero) {
      cluster = this.#fileSize;
      this.#fileSize += nclusters * cs;
    }
    if (this.backing === undefined && !this.needsCheck) {
      this.#h.features |= QED_F_NEED_CHECK;
      await this.#writeHeader();
    }
    if (!zero) {
      await this.#writeNewClusters(
        pos - inCluster,
        inCluster,
        data.subarray(0, n),
        nclusters,
        cluster,
      );
      // With a backing file qemu flushes the data before the L2 update (no dirty bit then).
      if (this.backing !== undefined) await this.#file.sync();
    }
    await this.#updateL2(r, pos, nclusters, cluster);
    return n;
  }

  /**
   * The new clusters at file offset `host` for guest offset `start`: backing data (or zeroes)
   * around `data`, which begins `front` bytes into the first cluster; one write.
   */
  async #writeNewClusters(
    start: number,
    front: number,
    data: Uint8Array,
    nclusters: number,
    host: number,
  ): Promise<void> {
    const total = nclusters * this.#cs;
    if (front === 0 && data.length === total) {
      await this.#file.pwrite(data, host);
      return;
    }
    const buf = new Uint8Array(total);
    const backEnd = front + data.length;
    if (this.backing !== undefined) {
      if (front > 0) await this.#readBacking(buf.subarray(0, front), start);
      if (backEnd < total) await this.#readBacking(buf.subarray(backEnd), start + backEnd);
    }
    buf.set(data, front);
    await this.#file.pwrite(buf, host);
  }

  /** Points `nclusters` L2 entries from `pos` at `cluster` (or marks them zero), qemu's order. */
  async #updateL2(r: Run, pos: number, nclusters: number, cluster: number): Promise<void> {
    const cs = this.#cs;
    const index = Math.floor(pos / cs) % this.#nelems;
    const fill = (t: QedTable) => {
      for (let i = 0; i < nclusters; i++) {
        t.set(index + i, cluster === QED_ZERO_CLUSTER ? cluster : cluster + i * cs);
      }
    };
    if (r.kind === Kind.UnallocL1) {
      // A new L2 table after the data: written whole and flushed, then the L1 entry.
      const tableOffset = this.#fileSize;
      this.#fileSize += this.#tableBytes;
      const t = new QedTable(new Uint8Array(this.#tableBytes));
      fill(t);
      await this.#file.pwrite(t.bytes, tableOffset);
      await this.#file.sync();
      this.#cache.set(tableOffset, t);
      const l1i = Math.floor(pos / this.#l2Span);
      this.#l1.set(l1i, tableOffset);
      const s = this.#l1.sectors(l1i, 1);
      await this.#file.pwrite(s.bytes, this.#h.l1TableOffset + s.offset);
      return;
    }
    const t = r.table!;
    fill(t);
    const s = t.sectors(index, nclusters);
    await this.#file.pwrite(s.bytes, r.tableOffset + s.offset);
    // Loads that raced with this update must not replace the updated table.
    this.#cache.set(r.tableOffset, t);
  }

  /** The header's fields written in place (the 64-byte structure). */
  async #writeHeader(): Promise<void> {
    await this.#file.pwrite(encodeQedHeader(this.#h, this.#head), 0);
  }

  // ---- the need-check bit ----

  /** qemu's open-time check of a dirty image opened read-write (see check.ts). */
  async checkAtOpen(): Promise<void> {
    const res = await checkAndFix({
      header: this.#h,
      fileSize: this.#fileSize,
      l1: this.#l1,
      readTable: (off) => this.#loadTable(off),
      writeTable: async (t, off, index, n) => {
        const s = t.sectors(index, n);
        await this.#file.pwrite(s.bytes, off + s.offset);
      },
    });
    if (res.error !== undefined) {
      const why = res.error instanceof Error ? res.error.message : String(res.error);
      throw new BlockError(
        res.error instanceof BlockError ? res.error.errno : Errno.EIO,
        `Image corrupted (${why})`,
      );
    }
    // With no corruption left qemu's check marks the image clean. With some it stays dirty and
    // qed's need-check timer is armed; qemu-nbd drains the node while it sets the export up,
    // and the drain fires that timer at once: the bit is cleared right after the open either way.
    await this.#markClean();
  }

  /** Flush, clear the bit, write the header, flush (qemu's close). */
  async #markClean(): Promise<void> {
    if (!this.needsCheck || this.#closed) return;
    await this.#file.sync();
    this.#h.features &= ~QED_F_NEED_CHECK;
    await this.#writeHeader();
    await this.#file.sync();
  }

  // ---- the rest of the interface ----

  flush(): Promise<void> {
    return this.#file.sync();
  }

  /** qed has no discard: a no-op, as qemu answers it. */
  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.resolve();
  }

  /**
   * qemu's block layer over qed: the unaligned head and tail as zero data (ENOTSUP for a fast
   * zero, after any aligned part before it), whole clusters by the driver.
   */
  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.#checkWritable();
    const cs = this.#cs;
    let head = offset % cs;
    const tail = (offset + length) % cs;
    let zeroes: Uint8Array | undefined;
    while (length > 0) {
      let num = length;
      if (head !== 0) {
        num = Math.min(length, cs - head);
        head = (head + num) % cs;
      } else if (tail !== 0 && num > cs) {
        num -= tail;
      }
      if (offset % cs === 0 && num % cs === 0) {
        await this.#write(new Uint8Array(0), offset, num, true);
      } else {
        if (flags.fastZero) {
          throw new BlockError(Errno.ENOTSUP, "QED cannot zero a partial cluster without writing");
        }
        zeroes ??= new Uint8Array(cs);
        await this.#write(zeroes.subarray(0, num), offset, num, false);
      }
      offset += num;
      length -= num;
    }
  }

  cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  async extents(offset: number, length: number, out: ExtentList): Promise<void> {
    const end = offset + length;
    const r = newRun();
    let pos = offset;
    while (pos < end && !out.full) {
      await this.#find(pos, end - pos, r);
      const n = r.length;
      const before = out.total;
      switch (r.kind) {
        case Kind.Data:
          out.add(n, 0);
          break;
        case Kind.Zero:
          out.add(n, HOLE_ZERO);
          break;
        default:
          await this.#backingExtents(pos, n, out);
      }
      if (out.total - before < n) return;
      pos += n;
    }
  }

  /** Unallocated here: the backing file's status, zeroes past its end (qemu's block_status_above). */
  async #backingExtents(pos: number, n: number, out: ExtentList): Promise<void> {
    const b = this.backing;
    const inside = b === undefined ? 0 : Math.max(0, Math.min(n, b.size - pos));
    if (inside > 0) {
      const before = out.total;
      await b!.extents(pos, inside, out);
      if (out.total - before < inside) return;
    }
    if (n > inside) out.add(n - inside, HOLE_ZERO);
  }

  async allocationDepth(offset: number, length: number, out: ExtentList): Promise<void> {
    const end = offset + length;
    const r = newRun();
    let pos = offset;
    while (pos < end && !out.full) {
      await this.#find(pos, end - pos, r);
      const n = r.length;
      const before = out.total;
      if (r.kind === Kind.Data || r.kind === Kind.Zero) out.add(n, 1);
      else await backingDepth(this.backing, pos, n, out);
      if (out.total - before < n) return;
      pos += n;
    }
  }

  /** qemu's close: flush, then a clean header (need-check cleared). */
  async close(): Promise<void> {
    if (this.#closed) return;
    try {
      if (this.caps.writable) {
        await this.#alloc.run(async () => {
          await this.#file.sync();
          await this.#markClean();
        });
      }
    } finally {
      this.#closed = true;
      this.#cache.clear();
      this.#file.close();
      await this.backing?.close();
    }
  }
}
