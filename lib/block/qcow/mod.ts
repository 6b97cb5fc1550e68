/**
 * The qcow (version 1) format driver, read and write, as qemu 7.2's qcow driver serves it:
 *
 * - a two-level table: L1 entries are file offsets of L2 tables (2^l2_bits 64-bit big-endian
 *   entries), L2 entries file offsets of clusters (2^cluster_bits bytes); bit 63 marks a
 *   compressed cluster (raw deflate) whose size in bytes sits in the bits below it;
 * - unallocated clusters read from the backing file (the header names it; its format is probed,
 *   as qcow has no field for it), zeroes without one or past its end; block status reports them
 *   as the backing file reports them (hole,zero without one); allocated and compressed
 *   clusters report data (qemu does not ask the file below);
 * - a write to an unallocated cluster takes a new cluster at the end of the file (rounded up to
 *   a cluster) and writes only the request's bytes into it: like qemu, nothing is copied from
 *   the backing file, so the rest of the cluster reads as zeroes afterwards. A partial write to
 *   a compressed cluster first writes the whole decompressed cluster to a new one. A missing L2
 *   table is allocated (zeroed) at the end of the file the same way. Data goes in before the
 *   table entry that points at it (qemu writes the entry first);
 * - no write-zeroes or discard in qemu's driver: zeroing writes zero bytes, trim does nothing;
 * - AES-encrypted images are refused (qemu-nbd serves them with a key-secret; denbd does not);
 * - qemu's request alignment for qcow is 512, which is the advertised minimum block size.
 *
 * L1 is held in memory (capped), L2 tables are cached (bounded), the last decompressed cluster
 * too; allocations and table writes are serialised by one lock, writes into allocated clusters
 * do not wait for it.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import type { ImageFormat } from "../../cli/options.ts";
import { hasProtocol } from "../../cli/filename.ts";
import type { FormatContext, FormatDriver } from "../formats.ts";
import { COMPRESSION_ZLIB, decompressCluster } from "../qcow2/compressed.ts";
// Types only from qcow2/mod.ts: importing its code would close a cycle through formats.ts.
import type { BackingChain } from "../qcow2/mod.ts";
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
import {
  decodeQcowHeader,
  probeQcow,
  QCOW_CRYPT_AES,
  QCOW_HEADER_SIZE,
  type QcowHeader,
} from "./header.ts";
import { Mutex } from "../qcow2/sync.ts";
import { backingDepth } from "../backing_depth.ts";

const SECTOR = 512;
/** Largest L1 table held in memory (8 Mi entries). */
const MAX_L1_BYTES = 64 * 1024 * 1024;
/** L2 tables kept in memory (at most 64 KiB each). */
const L2_CACHE_TABLES = 1024;
const ZERO_CHUNK = 1024 * 1024;
const HOLE_ZERO = STATE_HOLE | STATE_ZERO;
const TWO32 = 0x100000000;

/** The qcow entry of the format registry (lib/block/formats.ts). */
export const qcowFormat: FormatDriver = {
  name: "qcow",
  probe: (head) => probeQcow(head),
  open: (file, ctx) => openQcow(file, ctx),
};

/** Deepest backing chain opened (qcow2's MAX_CHAIN_DEPTH). */
const MAX_CHAIN_DEPTH = 256;

/** A relative backing name is relative to the image's directory as written (qemu's path_combine). */
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

async function readZeroPadded(file: FileEngine, buf: Uint8Array, at: number): Promise<void> {
  const n = await file.pread(buf, at);
  if (n < buf.length) buf.fill(0, n);
}

/** What {@link openQcow} needs of the format context. */
export type QcowOpenContext = Pick<FormatContext, "writable" | "chain" | "openBacking">;

/** Opens a qcow image over `file` (and its backing chain); closes the file if opening fails. */
export async function openQcow(file: FileEngine, ctx: QcowOpenContext): Promise<QcowDevice> {
  let backing: BlockDevice | undefined;
  try {
    const head = new Uint8Array(QCOW_HEADER_SIZE);
    await readZeroPadded(file, head, 0);
    const h = decodeQcowHeader(head);
    if (h.cryptMethod === QCOW_CRYPT_AES) {
      throw new BlockError(
        Errno.ENOTSUP,
        "AES-encrypted qcow images are not supported by denbd; convert the image with 'qemu-img convert' to an unencrypted qcow, or to raw with the LUKS format",
      );
    }
    if (h.l1Size * 8 > MAX_L1_BYTES) {
      throw new BlockError(
        Errno.ENOMEM,
        `qcow L1 table of ${h.l1Size} entries is larger than denbd supports (${MAX_L1_BYTES / 8})`,
      );
    }
    const l1 = new Uint8Array(h.l1Size * 8);
    await readZeroPadded(file, l1, h.l1TableOffset);
    const l1v = new DataView(l1.buffer);
    for (let i = 0; i < h.l1Size; i++) {
      const hi = l1v.getUint32(i * 8);
      if (hi >= TWO32 / 2048) {
        throw new BlockError(
          Errno.EINVAL,
          `Corrupt qcow image: L1 entry ${i} (at offset ${
            h.l1TableOffset + i * 8
          }) points past what denbd can address`,
        );
      }
    }
    if (h.backingFileOffset !== 0 && h.backingFileSize > 0) {
      const name = new Uint8Array(h.backingFileSize);
      await readZeroPadded(file, name, h.backingFileOffset);
      const end = name.indexOf(0);
      const text = new TextDecoder().decode(end < 0 ? name : name.subarray(0, end));
      if (text !== "") backing = await openBackingFile(file.path, text, ctx.chain, ctx);
    }
    return new QcowDevice(file, h, l1, backing, ctx.writable);
  } catch (e) {
    file.close();
    await backing?.close();
    throw e;
  }
}

async function openBackingFile(
  imagePath: string,
  name: string,
  chain: BackingChain,
  ctx: QcowOpenContext,
): Promise<BlockDevice> {
  const self = realPath(imagePath);
  const below: BackingChain = { paths: [...chain.paths, self] };
  if (below.paths.length > MAX_CHAIN_DEPTH) {
    throw new BlockError(
      Errno.EINVAL,
      `Backing chain of '${imagePath}' is deeper than ${MAX_CHAIN_DEPTH} images`,
    );
  }
  // A protocol name (nbd://, json:) is opened as it is.
  const path = hasProtocol(name) ? name : resolveBackingPath(imagePath, name);
  if (!hasProtocol(name) && below.paths.includes(realPath(path))) {
    throw new BlockError(
      Errno.EINVAL,
      `Backing file loop detected: '${imagePath}' has backing file '${name}', which is above it in the chain`,
    );
  }
  try {
    return await ctx.openBacking(path, undefined as ImageFormat | undefined, below);
  } catch (e) {
    // qemu's bdrv_open_backing_file puts this before whatever the backing file's open said.
    if (e instanceof BlockError) {
      throw new BlockError(e.errno, `Could not open backing file: ${e.message}`);
    }
    throw e;
  }
}

/** What an L2 lookup found. */
const enum Kind {
  Unalloc,
  Normal,
  Compressed,
}

export class QcowDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #file: FileEngine;
  readonly #l1: DataView;
  readonly #l1Bytes: Uint8Array;
  readonly #l1Offset: number;
  readonly #cb: number;
  readonly #cs: number;
  readonly #l2Bits: number;
  readonly #l2Bytes: number;
  readonly #backing: BlockDevice | undefined;
  /** L2 tables by file offset (insertion order: the oldest is evicted first). */
  readonly #l2 = new Map<number, DataView>();
  readonly #l2Loading = new Map<number, Promise<DataView>>();
  /** The last decompressed cluster and the file offset of its compressed bytes. */
  #zOffset = -1;
  #zData: Uint8Array | undefined;
  readonly #alloc = new Mutex();
  // The entry of the last #peek (no allocation per lookup).
  #hi = 0;
  #lo = 0;

  constructor(
    file: FileEngine,
    h: QcowHeader,
    l1: Uint8Array,
    backing: BlockDevice | undefined,
    writable: boolean,
  ) {
    this.#file = file;
    this.#l1Bytes = l1;
    this.#l1 = new DataView(l1.buffer);
    this.#l1Offset = h.l1TableOffset;
    this.#cb = h.clusterBits;
    this.#cs = 1 << h.clusterBits;
    this.#l2Bits = h.l2Bits;
    this.#l2Bytes = 8 << h.l2Bits;
    this.#backing = backing;
    this.size = h.size;
    this.caps = {
      writable,
      flush: true,
      trim: writable,
      zero: writable,
      fastZero: writable,
      extents: true,
      minBlock: SECTOR,
    };
  }

  #corrupt(msg: string): BlockError {
    return new BlockError(Errno.EIO, `qcow image '${this.#file.path}': ${msg}`);
  }

  /** File offset of the L2 table for guest offset `pos` (0: none). */
  #l2Offset(pos: number): number {
    const i = Math.floor(pos / (this.#cs * (1 << this.#l2Bits)));
    return this.#l1.getUint32(i * 8) * TWO32 + this.#l1.getUint32(i * 8 + 4);
  }

  async #table(at: number): Promise<DataView> {
    const t = this.#l2.get(at);
    if (t !== undefined) return t;
    let p = this.#l2Loading.get(at);
    if (p === undefined) {
      p = (async () => {
        const b = new Uint8Array(this.#l2Bytes);
        await readZeroPadded(this.#file, b, at);
        const v = new DataView(b.buffer);
        this.#remember(at, v);
        return v;
      })();
      this.#l2Loading.set(at, p);
      p.finally(() => this.#l2Loading.delete(at)).catch(() => {});
    }
    return await p;
  }

  #remember(at: number, v: DataView): void {
    if (this.#l2.size >= L2_CACHE_TABLES) {
      this.#l2.delete(this.#l2.keys().next().value!);
    }
    this.#l2.set(at, v);
  }

  #index(pos: number): number {
    return Math.floor(pos / this.#cs) & ((1 << this.#l2Bits) - 1);
  }

  /**
   * The kind of the cluster of `pos`, synchronously, with its entry in #hi/#lo (read them before
   * any await); -1 when its L2 table is not in memory and no `t` is given.
   */
  #peek(pos: number, t?: DataView): number {
    const l2 = this.#l2Offset(pos);
    if (l2 === 0) return Kind.Unalloc;
    t ??= this.#l2.get(l2);
    if (t === undefined) return -1;
    const i = this.#index(pos) * 8;
    const hi = t.getUint32(i);
    const lo = t.getUint32(i + 4);
    this.#hi = hi;
    this.#lo = lo;
    return hi === 0 && lo === 0
      ? Kind.Unalloc
      : (hi & 0x80000000) !== 0
      ? Kind.Compressed
      : Kind.Normal;
  }

  /** #peek, loading the table when needed (for callers that do not use #hi/#lo). */
  async #kindOf(pos: number): Promise<number> {
    const k = this.#peek(pos);
    return k >= 0 ? k : this.#peek(pos, await this.#table(this.#l2Offset(pos)));
  }

  /** Host offset of a normal cluster entry, checked as qemu checks it (EIO otherwise). */
  #normalHost(hi: number, lo: number, pos: number): number {
    if (hi >= TWO32 / 2048 || (lo & 511) !== 0) {
      throw this.#corrupt(
        `cluster offset 0x${(hi * TWO32 + lo).toString(16)} for guest offset ${pos} is invalid`,
      );
    }
    return hi * TWO32 + lo;
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const cs = this.#cs;
    const reads: Promise<void>[] = [];
    let failure: unknown;
    try {
      for (let done = 0; done < buf.length;) {
        const pos = offset + done;
        const inCluster = pos & (cs - 1);
        const n = Math.min(buf.length - done, cs - inCluster);
        const part = buf.subarray(done, done + n);
        let k = this.#peek(pos);
        if (k < 0) k = this.#peek(pos, await this.#table(this.#l2Offset(pos)));
        if (k === Kind.Unalloc) {
          reads.push(this.#readBacking(part, pos));
        } else if (k === Kind.Normal) {
          const host = this.#normalHost(this.#hi, this.#lo, pos);
          reads.push(readZeroPadded(this.#file, part, host + inCluster));
        } else {
          const c = await this.#decompress(this.#hi, this.#lo, pos);
          part.set(c.subarray(inCluster, inCluster + n));
        }
        done += n;
      }
    } catch (e) {
      failure = e;
    }
    // Every started read finishes before we return: none may land in a reused buffer.
    const results = await Promise.allSettled(reads);
    if (failure !== undefined) throw failure;
    for (const r of results) if (r.status === "rejected") throw r.reason;
  }

  async #readBacking(buf: Uint8Array, pos: number): Promise<void> {
    const b = this.#backing;
    const n = b === undefined ? 0 : Math.max(0, Math.min(buf.length, b.size - pos));
    if (n < buf.length) buf.fill(0, n);
    if (n > 0) await b!.pread(buf.subarray(0, n), pos);
  }

  /** The cluster a compressed entry holds (the last one is cached, as in qemu). */
  async #decompress(hi: number, lo: number, pos: number): Promise<Uint8Array> {
    const e = (BigInt(hi) << 32n) | BigInt(lo);
    const shift = BigInt(63 - this.#cb);
    const at = Number(e & ((1n << shift) - 1n));
    const length = Number((e >> shift) & BigInt(this.#cs - 1));
    if (at === this.#zOffset && this.#zData !== undefined) return this.#zData;
    if (at > Number.MAX_SAFE_INTEGER - length) {
      throw this.#corrupt(`compressed cluster offset ${at} for guest offset ${pos} is invalid`);
    }
    const src = new Uint8Array(length);
    await readZeroPadded(this.#file, src, at);
    const out = decompressCluster(COMPRESSION_ZLIB, src, this.#cs);
    if (out === null) {
      throw this.#corrupt(
        `corrupt compressed cluster at offset ${at} (${length} bytes) for guest offset ${pos}`,
      );
    }
    this.#zOffset = at;
    this.#zData = out;
    return out;
  }

  async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "qcow image is read-only");
    const cs = this.#cs;
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const inCluster = pos & (cs - 1);
      const n = Math.min(buf.length - done, cs - inCluster);
      const part = buf.subarray(done, done + n);
      let k = this.#peek(pos);
      if (k < 0) k = this.#peek(pos, await this.#table(this.#l2Offset(pos)));
      if (k === Kind.Normal) {
        const host = this.#normalHost(this.#hi, this.#lo, pos);
        await this.#file.pwrite(part, host + inCluster);
      } else {
        await this.#allocate(pos, inCluster, part);
      }
      done += n;
    }
    if (flags.fua) await this.#file.sync();
  }

  /** The end of the file rounded up to a cluster: where qemu puts a new table or cluster. */
  #nextCluster(): number {
    return Math.ceil(this.#file.length() / this.#cs) * this.#cs;
  }

  /** A write into an unallocated or compressed cluster: qemu's get_cluster_offset(allocate=1). */
  #allocate(pos: number, inCluster: number, part: Uint8Array): Promise<void> {
    return this.#alloc.run(async () => {
      const f = this.#file;
      const cs = this.#cs;
      let l2 = this.#l2Offset(pos);
      if (l2 === 0) {
        // A new zeroed L2 table at the end of the file, then the L1 entry pointing at it.
        l2 = this.#nextCluster();
        const table = new Uint8Array(this.#l2Bytes);
        await f.pwrite(table, l2);
        const i = Math.floor(pos / (cs * (1 << this.#l2Bits)));
        this.#l1.setUint32(i * 8, Math.floor(l2 / TWO32));
        this.#l1.setUint32(i * 8 + 4, l2 % TWO32);
        this.#remember(l2, new DataView(table.buffer));
        await f.pwrite(this.#l1Bytes.subarray(i * 8, i * 8 + 8), this.#l1Offset + i * 8);
      }
      const t = this.#l2.get(l2) ?? await this.#table(l2);
      const ti = this.#index(pos) * 8;
      const hi = t.getUint32(ti);
      const lo = t.getUint32(ti + 4);
      if ((hi & 0x80000000) === 0 && (hi !== 0 || lo !== 0)) {
        // Allocated by a write that held the lock before us.
        await f.pwrite(part, this.#normalHost(hi, lo, pos) + inCluster);
        return;
      }
      const host = this.#nextCluster();
      if (host + cs > Number.MAX_SAFE_INTEGER) {
        throw new BlockError(Errno.EFBIG, `qcow image '${f.path}' is too large`);
      }
      if (hi !== 0 && part.length < cs) {
        // A partial write into a compressed cluster: its whole content moves to the new one.
        const old = await this.#decompress(hi, lo, pos);
        await f.pwrite(old, host);
      } else {
        f.truncate(host + cs);
      }
      this.#zOffset = -1;
      this.#zData = undefined;
      await f.pwrite(part, host + inCluster);
      // The data is in place: now the entry that points at it, in the file, then in memory
      // (so a table reloaded meanwhile cannot miss it).
      const entry = new Uint8Array(8);
      const ev = new DataView(entry.buffer);
      ev.setUint32(0, Math.floor(host / TWO32));
      ev.setUint32(4, host % TWO32);
      await f.pwrite(entry, l2 + ti);
      for (const v of new Set([t, this.#l2.get(l2)])) {
        v?.setUint32(ti, ev.getUint32(0));
        v?.setUint32(ti + 4, ev.getUint32(4));
      }
    });
  }

  flush(): Promise<void> {
    return this.#file.sync();
  }

  /** qemu's qcow has no discard: a no-op, as qemu answers it. */
  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.resolve();
  }

  /** No write-zeroes in qemu's qcow: its block layer writes zero bytes instead. */
  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (flags.fastZero) {
      throw new BlockError(Errno.ENOTSUP, "qcow cannot zero without writing zero data");
    }
    const zeroes = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length;) {
      const n = Math.min(length - done, zeroes.length);
      await this.pwrite(zeroes.subarray(0, n), offset + done, {});
      done += n;
    }
    if (flags.fua) await this.#file.sync();
  }

  cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  /** Runs of allocated (true) or unallocated clusters from `pos`, at most to `end`. */
  async #run(pos: number, end: number): Promise<{ n: number; allocated: boolean }> {
    const cs = this.#cs;
    const allocated = (await this.#kindOf(pos)) !== Kind.Unalloc;
    let next = Math.min(end, (Math.floor(pos / cs) + 1) * cs);
    while (next < end) {
      if (((await this.#kindOf(next)) !== Kind.Unalloc) !== allocated) break;
      next = Math.min(end, next + cs);
    }
    return { n: next - pos, allocated };
  }

  async extents(offset: number, length: number, out: ExtentList): Promise<void> {
    const end = offset + length;
    let pos = offset;
    while (pos < end && !out.full) {
      const r = await this.#run(pos, end);
      const before = out.total;
      if (r.allocated) out.add(r.n, 0);
      else await this.#backingExtents(pos, r.n, out);
      if (out.total - before < r.n) return;
      pos += r.n;
    }
  }

  /** Unallocated here: the backing file's status, zeroes past its end. */
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

  async allocationDepth(offset: number, length: number, out: ExtentList): Promise<void> {
    const end = offset + length;
    let pos = offset;
    while (pos < end && !out.full) {
      const r = await this.#run(pos, end);
      const before = out.total;
      if (r.allocated) out.add(r.n, 1);
      else await backingDepth(this.#backing, pos, r.n, out);
      if (out.total - before < r.n) return;
      pos += r.n;
    }
  }

  async close(): Promise<void> {
    this.#file.close();
    await this.#backing?.close();
  }
}
