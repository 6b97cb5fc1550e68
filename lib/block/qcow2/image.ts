/**
 * The read-only qcow2 block device: guest reads, base:allocation and qemu:allocation-depth over
 * one image and its backing chain, with qemu 7.2's semantics (block/qcow2.c, block/io.c).
 *
 * Lookups run synchronously against the L2 cache; a miss awaits one shared load and retries.
 * Contiguous host ranges are read with one pread; requests run concurrently without locks since
 * nothing is ever written.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  ExtentList,
  STATE_HOLE,
  STATE_ZERO,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";
import { InflatePool } from "./inflate_pool.ts";
import { compressCluster } from "./deflate.ts";
import {
  compressedDescriptor,
  entryOffset,
  extendedKind,
  isCompressed,
  Kind,
  standardKind,
} from "./entry.ts";
import type { Qcow2Header } from "./header.ts";
import { L2Cache } from "./l2_cache.ts";
import { countReferencedClusters } from "./refcount.ts";
import type { RefcountStore } from "./refcount_store.ts";
import { IoEpochs } from "./sync.ts";
import { Qcow2Writer } from "./writer.ts";
import { markBitmapsInUse, storeBitmaps } from "./bitmap.ts";
import { CRYPT_SECTOR, type SectorCipher } from "../../crypto/cipher.ts";
import { backingDepth } from "../backing_depth.ts";

/** Everything the device needs, prepared by `openQcow2`. */
export interface Qcow2DeviceInit {
  readonly file: FileEngine;
  readonly header: Qcow2Header;
  /** L1 entries as host-order words, high word first (2 per entry). */
  readonly l1: Uint32Array;
  readonly backing: BlockDevice | undefined;
  readonly dataFile: BlockDevice | undefined;
  readonly l2CacheBytes: number;
  readonly l2SliceBytes: number;
  /** Set for a writable image: its refcounts (the file is then open read-write). */
  readonly refs?: RefcountStore;
  /** Punch freed clusters out of the file (see Qcow2OpenOptions.passDiscard). */
  readonly passDiscard?: boolean;
  /**
   * LUKS payload cipher (encrypt.format=luks): data clusters are encrypted per 512-byte sector
   * with the sector number of the host offset (qemu's crypt_physical_offset). Owned by the
   * device.
   */
  readonly crypto?: SectorCipher;
}

/** One lookup result; each request reuses its own. */
interface Run {
  kind: Kind;
  /** Bytes from the looked-up offset. */
  length: number;
  /** Data: host offset of the looked-up byte. */
  host: number;
  /** Compressed: the L2 entry words. */
  hi: number;
  lo: number;
  /** Data: every cluster of the run has COPIED set (the image may write it in place). */
  copied: boolean;
  /** Set when the lookup needs an L2 slice that is not cached. */
  missKey: number;
}

const HOLE_ZERO = STATE_HOLE | STATE_ZERO;
/** Bound on decompressed clusters kept for repeated small reads of one cluster. */
const DECOMPRESSED_CACHE_BYTES = 4 * 1024 * 1024;
/** Depth values collected from a backing file in one call. */
const DEPTH_BATCH = 1 << 16;
/** Clusters of one compressed write in flight at once (qemu's QCOW2_MAX_WORKERS). */
const COMPRESSED_WORKERS = 8;

function newRun(): Run {
  return { kind: Kind.Unalloc, length: 0, host: 0, hi: 0, lo: 0, copied: false, missKey: -1 };
}

/** Read from `file` with qemu's block-layer rule: bytes past end of file read as zeroes. */
export async function readZeroPadded(
  file: FileEngine,
  buf: Uint8Array,
  offset: number,
): Promise<void> {
  if (buf.length === 0) return;
  // Offsets from a broken image can be past any real file, or past what an i64 holds.
  if (offset + buf.length > Number.MAX_SAFE_INTEGER) {
    buf.fill(0);
    return;
  }
  const n = await file.pread(buf, offset);
  if (n < buf.length) buf.fill(0, n);
}

/** A read-only qcow2 image as a {@link BlockDevice}. */
export class Qcow2Device implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  /** The header as decoded at open. */
  readonly header: Qcow2Header;
  /** The corrupt bit was set (opened anyway: reading is allowed, as in qemu). */
  readonly corrupt: boolean;

  readonly #file: FileEngine;
  readonly #backing: BlockDevice | undefined;
  readonly #dataFile: BlockDevice | undefined;
  readonly #l1: Uint32Array;
  readonly #l1Size: number;
  readonly #cache: L2Cache;
  readonly #cs: number;
  readonly #cb: number;
  readonly #ext: boolean;
  readonly #l2Entries: number;
  readonly #entryWords: number;
  readonly #scSize: number;
  readonly #v2: boolean;
  readonly #hasDataFile: boolean;
  readonly #compression: number;
  readonly #decompressed = new Map<number, Promise<Uint8Array>>();
  readonly #inflate = new InflatePool();
  readonly #decompressedMax: number;
  #prealloc: Promise<boolean> | undefined;
  #closed = false;
  readonly #writer: Qcow2Writer | undefined;
  /** Data I/O in flight, so freed clusters are reused only after it ends (writable only). */
  readonly #epochs: IoEpochs | undefined;
  readonly #crypto: SectorCipher | undefined;
  /** Serialises read-modify-write of partial sectors in an encrypted image. */
  #rmwTail: Promise<void> = Promise.resolve();

  constructor(init: Qcow2DeviceInit) {
    const h = init.header;
    this.header = h;
    this.size = h.size;
    this.corrupt = (h.incompatible & 2n) !== 0n;
    this.#file = init.file;
    this.#backing = init.backing;
    this.#dataFile = init.dataFile;
    this.#l1 = init.l1;
    this.#l1Size = init.l1.length >> 1;
    this.#cs = h.clusterSize;
    this.#cb = h.clusterBits;
    this.#ext = h.extendedL2;
    this.#entryWords = h.extendedL2 ? 4 : 2;
    this.#l2Entries = h.clusterSize / (h.extendedL2 ? 16 : 8);
    this.#scSize = h.extendedL2 ? h.clusterSize / 32 : h.clusterSize;
    this.#v2 = h.version === 2;
    this.#hasDataFile = init.dataFile !== undefined;
    this.#compression = h.compressionType;
    this.#decompressedMax = Math.max(1, Math.floor(DECOMPRESSED_CACHE_BYTES / h.clusterSize));
    this.#crypto = init.crypto;
    this.#cache = new L2Cache(
      init.l2SliceBytes,
      init.l2CacheBytes,
      (buf, off) => readZeroPadded(this.#file, buf, off),
    );
    const writable = init.refs !== undefined;
    this.caps = {
      writable,
      flush: true,
      trim: writable,
      zero: writable,
      fastZero: writable,
      extents: true,
      // qemu aligns requests of an encrypted image to its 512-byte encryption sectors.
      minBlock: init.crypto !== undefined ? CRYPT_SECTOR : 1,
    };
    if (init.refs !== undefined) {
      this.#epochs = new IoEpochs();
      this.#writer = new Qcow2Writer({
        file: this.#file,
        size: this.size,
        clusterSize: h.clusterSize,
        clusterBits: h.clusterBits,
        extendedL2: h.extendedL2,
        version: h.version,
        l1TableOffset: h.l1TableOffset,
        l1: this.#l1,
        cache: this.#cache,
        refs: init.refs,
        backing: this.#backing,
        epochs: this.#epochs,
        passDiscard: init.passDiscard ?? false,
        pread: (buf, off) => this.pread(buf, off),
        extents: (off, len, out) => this.extents(off, len, out),
        encrypt: init.crypto === undefined
          ? undefined
          : (data, host) => this.#encrypted(data, host),
      });
    }
  }

  /** L2 slices currently cached (for tests). */
  get cachedSlices(): number {
    return this.#cache.size;
  }

  /** Capacity of the L2 cache in slices, and the slice size in bytes (for tests). */
  get cacheGeometry(): { slices: number; sliceBytes: number } {
    return { slices: this.#cache.capacity, sliceBytes: this.#cache.sliceBytes };
  }

  #corruption(message: string): BlockError {
    return new BlockError(Errno.EIO, `qcow2 '${this.#file.path}': ${message}`);
  }

  /**
   * Classify `[pos, pos+max)` into `r`: the run of equal kind (and, for data, contiguous host
   * offsets) starting at `pos`, never past the current L2 slice. Returns false with `r.missKey`
   * set when the slice is not cached. Throws EIO for entries qemu treats as corruption.
   */
  #lookup(pos: number, max: number, r: Run): boolean {
    const cs = this.#cs;
    const cIdx = Math.floor(pos / cs);
    const l1i = Math.floor(cIdx / this.#l2Entries);
    const span = this.#l2Entries * cs;
    const l1 = this.#l1;
    if (l1i >= this.#l1Size || entryOffset(l1[l1i * 2]!, l1[l1i * 2 + 1]!) === 0) {
      // Unallocated L2 table: extend over following empty L1 entries.
      let next = l1i + 1;
      while (
        next < this.#l1Size && next * span < pos + max &&
        entryOffset(l1[next * 2]!, l1[next * 2 + 1]!) === 0
      ) next++;
      r.kind = Kind.Unalloc;
      r.length = l1i >= this.#l1Size ? max : Math.min(max, next * span - pos);
      return true;
    }
    const l2Offset = entryOffset(l1[l1i * 2]!, l1[l1i * 2 + 1]!);
    if (l2Offset % cs !== 0) {
      throw this.#corruption(
        `L2 table offset 0x${l2Offset.toString(16)} unaligned (L1 index: 0x${
          l1i.toString(16)
        }) at guest offset ${pos}`,
      );
    }
    const l2Index = cIdx - l1i * this.#l2Entries;
    const entryBytes = this.#entryWords * 4;
    const sliceBytes = this.#cache.sliceBytes;
    const tableByte = l2Index * entryBytes;
    const sliceStart = tableByte - (tableByte % sliceBytes);
    const key = l2Offset + sliceStart;
    const words = this.#cache.get(key);
    if (words === undefined) {
      r.missKey = key;
      return false;
    }
    let w = (tableByte - sliceStart) >> 2;
    const end = pos + max;
    const ext = this.#ext;
    const scSize = this.#scSize;
    let guestCluster = cIdx * cs;
    let within = pos - guestCluster; // offset into the first cluster
    let len = 0;
    let kind: Kind = Kind.Invalid;
    let expect = 0; // next contiguous host offset for a data run
    for (; w < words.length; w += this.#entryWords) {
      const hi = words[w]!, lo = words[w + 1]!;
      const zero = ext ? words[w + 2]! : 0, alloc = ext ? words[w + 3]! : 0;
      const host = entryOffset(hi, lo);
      const copied = (hi & 0x80000000) !== 0;
      if (isCompressed(hi)) {
        if (len > 0) break;
        if (this.#hasDataFile) {
          throw this.#corruption(
            `Compressed cluster entry found in image with external data file at guest offset ${guestCluster}`,
          );
        }
        r.kind = Kind.Compressed;
        r.hi = hi;
        r.lo = lo;
        r.length = Math.min(cs - within, max);
        return true;
      }
      // qemu checks entries that carry a host offset: NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC.
      if (
        host !== 0 || (this.#hasDataFile && (hi & 0x80000000) !== 0 && (ext || (lo & 1) === 0))
      ) this.#checkHost(host, guestCluster, l2Offset, (sliceStart + w * 4) / entryBytes);
      let sc = ext ? Math.floor(within / scSize) : 0;
      const units = ext ? 32 : 1;
      const unit = ext ? scSize : cs;
      let stop = false;
      for (; sc < units; sc++) {
        const k = ext
          ? extendedKind(hi, lo, alloc, zero, sc, this.#hasDataFile)
          : standardKind(hi, lo, this.#hasDataFile);
        if (k === Kind.Invalid) {
          throw this.#corruption(
            `Invalid cluster entry found (L2 offset: 0x${l2Offset.toString(16)}, L2 index: 0x${
              ((sliceStart + w * 4) / entryBytes).toString(16)
            }) at guest offset ${guestCluster}`,
          );
        }
        if (k === Kind.Zero && this.#v2) {
          throw this.#corruption(
            `Zero cluster entry found in pre-v3 image (L2 offset: 0x${
              l2Offset.toString(16)
            }) at guest offset ${guestCluster}`,
          );
        }
        const unitHost = host + sc * unit;
        const skip = within - sc * unit; // > 0 only in the first unit
        if (len === 0) {
          kind = k;
          expect = unitHost + (skip > 0 ? skip : 0);
          r.host = expect;
          r.copied = copied;
        } else if (
          k !== kind || (k === Kind.Data && (unitHost !== expect || copied !== r.copied))
        ) {
          stop = true;
          break;
        }
        const n = skip > 0 ? unit - skip : unit;
        len += n;
        expect += n;
        if (pos + len >= end) {
          stop = true;
          break;
        }
      }
      if (stop) break;
      guestCluster += cs;
      within = 0;
    }
    r.kind = kind;
    r.length = Math.min(len, max);
    return true;
  }

  /** qemu's checks on an entry that carries a host offset (NORMAL, ZERO_ALLOC, UNALLOC_ALLOC). */
  #checkHost(host: number, guestCluster: number, l2Offset: number, l2Index: number): void {
    if (host % this.#cs !== 0) {
      throw this.#corruption(
        `Cluster allocation offset 0x${host.toString(16)} unaligned (L2 offset: 0x${
          l2Offset.toString(16)
        }, L2 index: 0x${l2Index.toString(16)}) at guest offset ${guestCluster}`,
      );
    }
    if (this.#hasDataFile && host !== guestCluster) {
      throw this.#corruption(
        `External data file host cluster offset 0x${
          host.toString(16)
        } does not match guest cluster offset: 0x${guestCluster.toString(16)}`,
      );
    }
  }

  /** Look up `pos`, loading L2 slices as needed. */
  async #resolve(pos: number, max: number, r: Run): Promise<void> {
    // Bounded: each round either succeeds or loads the slice it missed; a slice evicted before
    // the retry is loaded again, so cap the rounds to stay safe under extreme cache pressure.
    for (let round = 0; round < 1000; round++) {
      if (this.#lookup(pos, max, r)) return;
      await this.#cache.load(r.missKey);
    }
    throw new BlockError(Errno.EIO, `qcow2 '${this.#file.path}': L2 cache thrashing at ${pos}`);
  }

  #checkOpen(): void {
    if (this.#closed) throw new BlockError(Errno.EIO, `qcow2 '${this.#file.path}' is closed`);
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    if (this.#crypto !== undefined && !this.#aligned(offset, buf.length)) {
      // Whole encryption sectors only: read them into a bounce buffer.
      const a = offset - (offset % CRYPT_SECTOR);
      const b = Math.ceil((offset + buf.length) / CRYPT_SECTOR) * CRYPT_SECTOR;
      const tmp = new Uint8Array(b - a);
      await this.pread(tmp, a);
      buf.set(tmp.subarray(offset - a, offset - a + buf.length));
      return;
    }
    const epochs = this.#epochs;
    if (epochs === undefined) return this.#pread(buf, offset);
    const e = epochs.begin();
    try {
      await this.#pread(buf, offset);
    } finally {
      epochs.end(e);
    }
  }

  async #pread(buf: Uint8Array, offset: number): Promise<void> {
    this.#checkOpen();
    const end = offset + buf.length;
    const r = newRun();
    const tasks: Promise<void>[] = [];
    // A pending data run: [dataStart, dataStart+dataLen) of buf from host dataHost.
    let dataStart = 0, dataLen = 0, dataHost = 0;
    let pos = offset;
    let failure: unknown;
    try {
      while (pos < end) {
        if (!this.#lookup(pos, end - pos, r)) await this.#resolve(pos, end - pos, r);
        const at = pos - offset;
        const n = r.length;
        if (r.kind === Kind.Data) {
          if (dataLen > 0 && dataStart + dataLen === at && dataHost + dataLen === r.host) {
            dataLen += n;
          } else {
            if (dataLen > 0) {
              tasks.push(this.#readData(buf.subarray(dataStart, dataStart + dataLen), dataHost));
            }
            dataStart = at;
            dataLen = n;
            dataHost = r.host;
          }
        } else if (r.kind === Kind.Zero) {
          buf.fill(0, at, at + n);
        } else if (r.kind === Kind.Unalloc) {
          tasks.push(this.#readBacking(buf.subarray(at, at + n), pos));
        } else {
          tasks.push(this.#readCompressed(buf.subarray(at, at + n), pos, r.hi, r.lo));
        }
        pos += n;
      }
      if (dataLen > 0) {
        tasks.push(this.#readData(buf.subarray(dataStart, dataStart + dataLen), dataHost));
      }
    } catch (e) {
      failure = e;
    }
    // Wait for every started read even after an error: none may land in a buffer the caller
    // already reuses.
    if (tasks.length === 1 && failure === undefined) {
      await tasks[0];
      return;
    }
    const results = await Promise.allSettled(tasks);
    if (failure !== undefined) throw failure;
    for (const res of results) if (res.status === "rejected") throw res.reason;
  }

  #readData(buf: Uint8Array, host: number): Promise<void> {
    const crypto = this.#crypto;
    if (crypto !== undefined) {
      return this.#readPlain(buf, host).then(() => crypto.decrypt(buf, host / CRYPT_SECTOR));
    }
    return this.#readPlain(buf, host);
  }

  /** Both ends on encryption sector boundaries. */
  #aligned(offset: number, length: number): boolean {
    return offset % CRYPT_SECTOR === 0 && length % CRYPT_SECTOR === 0;
  }

  /** An encrypted copy of `data` (whole sectors) for host offset `host`. */
  #encrypted(data: Uint8Array, host: number): Uint8Array {
    const out = new Uint8Array(data);
    this.#crypto!.encrypt(out, host / CRYPT_SECTOR);
    return out;
  }

  /** Runs `fn` after every read-modify-write queued before it. */
  async #rmw(fn: () => Promise<void>): Promise<void> {
    const prev = this.#rmwTail;
    let release!: () => void;
    this.#rmwTail = new Promise((r) => release = r);
    await prev;
    try {
      await fn();
    } finally {
      release();
    }
  }

  /** A write of `buf` at an offset or length off the encryption sectors: whole sectors. */
  async #pwriteUnaligned(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    const a = offset - (offset % CRYPT_SECTOR);
    const b = Math.ceil((offset + buf.length) / CRYPT_SECTOR) * CRYPT_SECTOR;
    await this.#rmw(async () => {
      const tmp = new Uint8Array(b - a);
      await this.pread(tmp.subarray(0, CRYPT_SECTOR), a);
      if (b - CRYPT_SECTOR > a) {
        await this.pread(tmp.subarray(tmp.length - CRYPT_SECTOR), b - CRYPT_SECTOR);
      }
      tmp.set(buf, offset - a);
      await this.pwrite(tmp, a, flags);
    });
  }

  #readPlain(buf: Uint8Array, host: number): Promise<void> {
    const df = this.#dataFile;
    if (df === undefined) return readZeroPadded(this.#file, buf, host);
    const n = Math.max(0, Math.min(buf.length, df.size - host));
    if (n < buf.length) buf.fill(0, n);
    return n > 0 ? df.pread(buf.subarray(0, n), host) : Promise.resolve();
  }

  async #readBacking(buf: Uint8Array, pos: number): Promise<void> {
    const b = this.#backing;
    const n = b === undefined ? 0 : Math.max(0, Math.min(buf.length, b.size - pos));
    if (n < buf.length) buf.fill(0, n);
    if (n > 0) await b!.pread(buf.subarray(0, n), pos);
  }

  async #readCompressed(buf: Uint8Array, pos: number, hi: number, lo: number): Promise<void> {
    const cluster = await this.#decompress(pos - (pos % this.#cs), hi, lo);
    const within = pos % this.#cs;
    buf.set(cluster.subarray(within, within + buf.length));
  }

  /** The decompressed cluster for a compressed entry; concurrent readers share one job. */
  #decompress(guestCluster: number, hi: number, lo: number): Promise<Uint8Array> {
    const d = compressedDescriptor(hi, lo, this.#cb);
    const key = d.offset * 4096 + (d.length >>> 9); // unique per (offset, sectors)
    let p = this.#decompressed.get(key);
    if (p !== undefined) {
      this.#decompressed.delete(key);
      this.#decompressed.set(key, p);
      return p;
    }
    p = (async () => {
      const src = new Uint8Array(d.length);
      await readZeroPadded(this.#file, src, d.offset);
      const out = await this.#inflate.decompress(this.#compression, src, this.#cs);
      if (out === null) {
        throw this.#corruption(
          `corrupt compressed cluster at host offset ${d.offset} (${d.length} bytes) for guest offset ${guestCluster}`,
        );
      }
      return out;
    })();
    p.catch(() => this.#decompressed.delete(key));
    while (this.#decompressed.size >= this.#decompressedMax) {
      const oldest = this.#decompressed.keys().next().value;
      if (oldest === undefined) break;
      this.#decompressed.delete(oldest);
    }
    this.#decompressed.set(key, p);
    return p;
  }

  async extents(offset: number, length: number, out: ExtentList): Promise<void> {
    this.#checkOpen();
    const end = offset + length;
    const r = newRun();
    let pos = offset;
    while (pos < end && !out.full) {
      if (!this.#lookup(pos, end - pos, r)) await this.#resolve(pos, end - pos, r);
      const n = r.length;
      const before = out.total;
      switch (r.kind) {
        case Kind.Data:
          // qemu does not look into the file under an encrypted image (no offset to recurse).
          if (this.#crypto === undefined && await this.#metadataPreallocated()) {
            await this.#dataExtents(r.host, n, out);
          } else {
            out.add(n, 0);
          }
          break;
        case Kind.Compressed:
          out.add(n, 0);
          break;
        case Kind.Zero:
          out.add(n, HOLE_ZERO);
          break;
        default:
          await this.#backingExtents(pos, n, out);
      }
      if (out.total - before < n) return; // the list filled up
      pos += n;
    }
  }

  /** Unallocated here: the backing file's status, zeroes past its end (qemu's `bdrv_co_block_status_above`). */
  async #backingExtents(pos: number, n: number, out: ExtentList): Promise<void> {
    const b = this.#backing;
    const inside = b === undefined ? 0 : Math.max(0, Math.min(n, b.size - pos));
    if (inside > 0) {
      const before = out.total;
      await b!.extents(pos, inside, out);
      if (out.total - before < inside) return;
    }
    if (n > inside) out.add(n - inside, HOLE_ZERO);
  }

  /**
   * Status of a data run in a metadata-preallocated image: qemu recurses into the host file
   * (BDRV_BLOCK_RECURSE) and adds ZERO where it has holes or ends.
   */
  async #dataExtents(host: number, n: number, out: ExtentList): Promise<void> {
    const df = this.#dataFile;
    if (df !== undefined) {
      const inside = Math.max(0, Math.min(n, df.size - host));
      if (inside > 0) {
        const tmp = new ExtentList(DEPTH_BATCH);
        await df.extents(host, inside, tmp);
        const p = tmp.pairs;
        for (let i = 0; i < p.length; i += 2) out.add(p[i]!, p[i + 1]! & STATE_ZERO);
        if (tmp.total < inside) return;
      }
      if (n > inside) out.add(n - inside, STATE_ZERO);
      return;
    }
    const file = this.#file;
    const fileLen = Math.ceil(file.length() / 512) * 512;
    let at = host;
    const stop = host + n;
    while (at < stop && !out.full) {
      if (at >= fileLen) {
        out.add(stop - at, STATE_ZERO);
        return;
      }
      const data = file.seekData(at);
      if (data === -1) {
        out.add(stop - at, STATE_ZERO); // trailing hole
        return;
      }
      if (data > at) {
        const len = Math.min(data, stop) - at;
        out.add(len, STATE_ZERO);
        at += len;
        continue;
      }
      const hole = Math.min(file.seekHole(at), fileLen);
      const len = Math.min(Math.max(hole, at + 1), stop) - at;
      out.add(len, 0);
      at += len;
    }
  }

  /** qemu's `qcow2_detect_metadata_preallocation`, once per image; errors count as "no". */
  #metadataPreallocated(): Promise<boolean> {
    this.#prealloc ??= (async () => {
      try {
        const st = await Deno.stat(this.#file.path);
        const realClusters = Math.floor((st.blocks ?? 0) * 512 / this.#cs);
        const threshold = Math.max(Math.floor(realClusters * 10 / 9), realClusters + 2);
        const endCluster = Math.ceil(this.#file.length() / this.#cs);
        const h = this.header;
        const count = await countReferencedClusters(
          (buf, off) => readZeroPadded(this.#file, buf, off),
          {
            clusterSize: h.clusterSize,
            refcountOrder: h.refcountOrder,
            tableOffset: h.refcountTableOffset,
            tableClusters: h.refcountTableClusters,
          },
          endCluster,
          threshold,
        );
        return count >= threshold;
      } catch {
        return false;
      }
    })();
    return this.#prealloc;
  }

  async allocationDepth(offset: number, length: number, out: ExtentList): Promise<void> {
    this.#checkOpen();
    const end = offset + length;
    const r = newRun();
    let pos = offset;
    while (pos < end && !out.full) {
      if (!this.#lookup(pos, end - pos, r)) await this.#resolve(pos, end - pos, r);
      const n = r.length;
      const before = out.total;
      if (r.kind !== Kind.Unalloc) out.add(n, 1);
      else await backingDepth(this.#backing, pos, n, out);
      if (out.total - before < n) return;
      pos += n;
    }
  }

  cache(_offset: number, _length: number): Promise<void> {
    this.#checkOpen();
    return Promise.resolve();
  }

  flush(): Promise<void> {
    this.#checkOpen();
    return this.#writer?.flush() ?? Promise.resolve();
  }

  async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    this.#checkOpen();
    const writer = this.#writer;
    if (writer === undefined) throw new BlockError(Errno.EPERM, "qcow2 image is read-only");
    if (this.#crypto !== undefined && !this.#aligned(offset, buf.length)) {
      return await this.#pwriteUnaligned(buf, offset, flags);
    }
    try {
      if (!(await this.#writeInPlace(buf, offset))) await writer.write(buf, offset);
    } finally {
      this.bitmaps?.mark(offset, buf.length);
    }
  }

  /** Guest cluster size in bytes (the granularity of compressed writes). */
  /** The image has a backing file (NBD_CMD_CACHE then copies from it, see copy_on_read.ts). */
  get hasBacking(): boolean {
    return this.#backing !== undefined;
  }

  get clusterSize(): number {
    return this.#cs;
  }

  /**
   * Write `buf` at `offset` as compressed clusters, qemu 7.2's `qcow2_co_pwritev_compressed_part`:
   * `offset` cluster-aligned and whole clusters only (the last may end at the end of the image),
   * else EINVAL; each cluster is compressed (zero-padded at the end of the image) and stored
   * compressed, or written as a normal cluster when it does not compress below a cluster;
   * compressed writes into an allocated cluster fail with EIO (see Qcow2Writer.writeCompressed).
   * Clusters go out up to 8 at a time (qemu's QCOW2_MAX_WORKERS); the first error is reported
   * once every started cluster has finished.
   */
  async pwriteCompressed(buf: Uint8Array, offset: number): Promise<void> {
    this.#checkOpen();
    const writer = this.#writer;
    if (writer === undefined) throw new BlockError(Errno.EPERM, "qcow2 image is read-only");
    if (this.#hasDataFile) {
      throw new BlockError(
        Errno.ENOTSUP,
        "qcow2: compressed writes need an image without data file",
      );
    }
    if (this.#crypto !== undefined) {
      // qemu-img refuses compression with encryption; qemu's driver would store plaintext.
      throw new BlockError(Errno.ENOTSUP, "qcow2: compressed writes into an encrypted image");
    }
    const cs = this.#cs, end = offset + buf.length;
    if (buf.length === 0) return;
    if (offset % cs !== 0 || (buf.length % cs !== 0 && end !== this.size)) {
      throw new BlockError(
        Errno.EINVAL,
        `qcow2: compressed write of ${buf.length} bytes at ${offset} is not cluster-aligned (cluster size ${cs})`,
      );
    }
    try {
      let failure: unknown;
      const inFlight = new Set<Promise<void>>();
      for (let pos = offset; pos < end && failure === undefined; pos += cs) {
        const p = this.#writeOneCompressed(
          buf.subarray(pos - offset, Math.min(end, pos + cs) - offset),
          pos,
        )
          .catch((e) => {
            failure ??= e;
          })
          .finally(() => inFlight.delete(p));
        inFlight.add(p);
        if (inFlight.size >= COMPRESSED_WORKERS) await Promise.race(inFlight);
      }
      await Promise.all(inFlight);
      if (failure !== undefined) throw failure;
    } finally {
      this.bitmaps?.mark(offset, buf.length);
    }
  }

  async #writeOneCompressed(chunk: Uint8Array, pos: number): Promise<void> {
    const cs = this.#cs;
    let src = chunk;
    if (chunk.length < cs) {
      src = new Uint8Array(cs); // the end of the image: zero-padded, as qemu does
      src.set(chunk);
    }
    const packed = compressCluster(this.#compression, src, cs - 1);
    if (packed === null) {
      // Not worth it: a normal write, in place when the cluster is already ours (qemu's path).
      if (!(await this.#writeInPlace(chunk, pos))) await this.#writer!.write(chunk, pos);
      return;
    }
    await this.#writer!.writeCompressed(pos / cs, packed);
    // A decompressed copy cached under the same host range belonged to an older stream.
    this.#decompressed.clear();
  }

  /**
   * The fast path: when every byte maps to data clusters the image owns (COPIED), write them
   * where they are, with no lock and no metadata change. False when the writer must plan it.
   */
  async #writeInPlace(buf: Uint8Array, offset: number): Promise<boolean> {
    const end = offset + buf.length;
    const r = newRun();
    const runs: number[] = [];
    for (let pos = offset; pos < end;) {
      if (!this.#lookup(pos, end - pos, r)) await this.#resolve(pos, end - pos, r);
      if (r.kind !== Kind.Data || !r.copied || this.#hasDataFile) return false;
      runs.push(pos - offset, r.length, r.host);
      pos += r.length;
    }
    const e = this.#epochs!.begin();
    try {
      const writes: Promise<void>[] = [];
      for (let i = 0; i < runs.length; i += 3) {
        const at = runs[i]!;
        const host = runs[i + 2]!;
        let part = buf.subarray(at, at + runs[i + 1]!);
        if (this.#crypto !== undefined) part = this.#encrypted(part, host);
        writes.push(this.#file.pwrite(part, host));
      }
      await Promise.all(writes);
    } finally {
      this.#epochs!.end(e);
    }
    return true;
  }

  trim(offset: number, length: number, _flags: WriteFlags): Promise<void> {
    this.#checkOpen();
    const writer = this.#writer;
    if (writer === undefined) {
      return Promise.reject(new BlockError(Errno.EPERM, "qcow2 image is read-only"));
    }
    return writer.discard(offset, length).finally(() => this.bitmaps?.mark(offset, length));
  }

  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.#checkOpen();
    const writer = this.#writer;
    if (writer === undefined) {
      return Promise.reject(new BlockError(Errno.EPERM, "qcow2 image is read-only"));
    }
    if (this.#crypto !== undefined && !this.#aligned(offset, length)) {
      return this.#zeroUnaligned(offset, length, flags);
    }
    return writer.zero(offset, length, flags.noHole === true, flags.fastZero === true)
      .finally(() => this.bitmaps?.mark(offset, length));
  }

  /**
   * Zeroing off the encryption sectors (qemu's block layer aligns it): the partial sectors at
   * the ends get zero bytes (read-modify-write), the whole sectors between the writer's zeroing.
   */
  async #zeroUnaligned(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (flags.fastZero) {
      throw new BlockError(Errno.ENOTSUP, "qcow2: zeroing a partial encryption sector");
    }
    const end = offset + length;
    const a = Math.ceil(offset / CRYPT_SECTOR) * CRYPT_SECTOR;
    const b = Math.max(a, end - (end % CRYPT_SECTOR));
    if (a >= end || b <= offset) {
      await this.pwrite(new Uint8Array(length), offset, flags);
      return;
    }
    if (offset < a) await this.pwrite(new Uint8Array(a - offset), offset, flags);
    if (b > a) await this.zero(a, b - a, flags);
    if (end > b) await this.pwrite(new Uint8Array(end - b), b, flags);
  }

  /** Read-write open with persistent bitmaps: flag them in use on disk, as qemu does. */
  async markBitmapsInUse(): Promise<void> {
    if (this.#writer === undefined || this.bitmaps === undefined) return;
    await markBitmapsInUse(this.bitmaps, this.#writer.bitmapIo(this.header));
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    // A clean close leaves every refcount exact: flush applies the queued decrements.
    let flushError: unknown;
    const writer = this.#writer;
    if (writer !== undefined) {
      try {
        if (this.bitmaps !== undefined) {
          await storeBitmaps(this.bitmaps, writer.bitmapIo(this.header));
        }
        await writer.flush();
      } catch (e) {
        flushError = e;
      }
    }
    this.#closed = true;
    this.#cache.clear();
    this.#decompressed.clear();
    this.#inflate.close();
    this.#crypto?.close();
    try {
      await this.#backing?.close();
      await this.#dataFile?.close();
    } finally {
      this.#file.close();
    }
    if (flushError !== undefined) throw flushError;
  }

  // ---- Persistent dirty bitmaps (bitmap.ts, qemu-nbd -B). Kept at the end of the class on
  // purpose; openQcow2 assigns `bitmaps` right after construction. ----

  /** This image's own persistent bitmaps (not its backing chain's); set by openQcow2. */
  bitmaps: import("./bitmap.ts").ImageBitmaps | undefined;

  /** qemu's -B lookup: this image's bitmaps first, then down the backing chain. */
  dirtyBitmap(name: string): import("../types.ts").BlockBitmap | undefined {
    return this.bitmaps?.find(name) ?? this.#backing?.dirtyBitmap?.(name);
  }
}
