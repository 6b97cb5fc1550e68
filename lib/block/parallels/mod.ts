/**
 * The Parallels (ploop) format driver, read and write, as qemu 7.2's parallels driver serves it:
 *
 * - guest cluster `i` (`tracks` sectors) lives at sector `bat[i] * multiplier` of the file
 *   (multiplier 1 for the "WithoutFreeSpace" magic, `tracks` for "WithouFreSpacExt"); entry 0
 *   means unallocated, which reads as zeroes and reports hole,zero; allocated clusters report
 *   data (qemu does not ask the file below);
 * - a write to an unallocated cluster takes the cluster at the end of the data (`data_end`,
 *   the furthest of data_off and every BAT entry's end); when that passes the end of the file
 *   the file first grows by the cluster plus `prealloc-size` (128 MiB by default) of zeroes,
 *   by fallocate (`prealloc-mode=falloc`) or ftruncate (`truncate`), as qemu does. The data
 *   goes in first, then the BAT sector holding the entry (qemu writes the BAT at flush; writing
 *   it right after the data keeps the image consistent at every point);
 * - open read-write sets the header's `inuse` field (written and synced at once) and close
 *   clears it and truncates the file to the end of the data, dropping the preallocation; an
 *   image found with `inuse` set was not closed cleanly and, as in qemu, opens read-only only;
 * - the format extension is checked on read-only opens (qemu's messages) and ignored with qemu's
 *   warning on read-write ones; its dirty bitmaps are not exported (qemu-nbd -B cannot name them);
 * - no write-zeroes or discard in qemu's driver: zeroing writes zero bytes, trim does nothing;
 * - qemu's request alignment for this sector-based driver is 512, which is the advertised
 *   minimum block size.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import { parseSize } from "../../cli/numbers.ts";
import { PROGRAM } from "../../cli/errors.ts";
import type { FormatDriver } from "../formats.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  type ExtentList,
  STATE_HOLE,
  STATE_ZERO,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";
import {
  decodeParallelsHeader,
  type ParallelsHeader,
  PRL_HEADER_SIZE,
  PRL_INUSE_MAGIC,
  probeParallels,
  setInuse,
} from "./header.ts";
import { parseParallelsExtension } from "./extension.ts";
import { Mutex } from "../qcow2/sync.ts";

const SECTOR = 512;
/** Largest BAT held in memory (16 Mi clusters: 16 TiB of 1 MiB clusters); qemu's limit (2 GiB) is not practical. */
const MAX_BAT_BYTES = 64 * 1024 * 1024;
/** Largest cluster whose format extension denbd reads (it is checksummed as a whole). */
const MAX_EXT_CLUSTER = 64 * 1024 * 1024;
/** Zero bytes written per step when zeroing or growing the file without fallocate. */
const ZERO_CHUNK = 1024 * 1024;
const DEFAULT_PREALLOC_SIZE = 128 * 1024 * 1024;

/** The parallels entry of the format registry (lib/block/formats.ts). */
export const parallelsFormat: FormatDriver = {
  name: "parallels",
  probe: (head) => probeParallels(head),
  open: (file, ctx) =>
    openParallels(file, { writable: ctx.writable, options: ctx.options, warn: ctx.warn }),
  optionKeys: ["prealloc-mode", "prealloc-size"],
};

export interface ParallelsOpenOptions {
  readonly writable: boolean;
  readonly options?: Readonly<Record<string, string>>;
  readonly warn?: (msg: string) => void;
}

type PreallocMode = "falloc" | "truncate";

function preallocOptions(o: Readonly<Record<string, string>>, tracks: number) {
  let bytes = DEFAULT_PREALLOC_SIZE;
  const sizeText = o["prealloc-size"];
  if (sizeText !== undefined) {
    const v = parseSize(sizeText);
    if (typeof v !== "bigint") {
      throw new BlockError(
        Errno.EINVAL,
        "Parameter 'prealloc-size' expects a non-negative number below 2^64\n" +
          "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
          "and exabytes, respectively.",
      );
    }
    bytes = Number(v > BigInt(Number.MAX_SAFE_INTEGER) ? BigInt(Number.MAX_SAFE_INTEGER) : v);
  }
  const mode = o["prealloc-mode"] ?? "falloc";
  if (mode !== "falloc" && mode !== "truncate") {
    throw new BlockError(Errno.EINVAL, `invalid parameter value: ${mode}`);
  }
  // In sectors, at least one cluster.
  return { sectors: Math.max(tracks, Math.floor(bytes / SECTOR)), mode: mode as PreallocMode };
}

/** Opens a Parallels image over `file`; closes the file if opening fails. */
export async function openParallels(
  file: FileEngine,
  options: ParallelsOpenOptions,
): Promise<ParallelsDevice> {
  try {
    const head = new Uint8Array(PRL_HEADER_SIZE);
    await readZeroPadded(file, head, 0);
    const h = decodeParallelsHeader(head);
    const batEnd = PRL_HEADER_SIZE + 4 * h.batEntries;
    if (4 * h.batEntries > MAX_BAT_BYTES) {
      throw new BlockError(
        Errno.ENOMEM,
        `Parallels BAT of ${h.batEntries} entries is larger than denbd supports (${
          MAX_BAT_BYTES / 4
        })`,
      );
    }
    // The header and BAT in whole sectors, as they are in the file (past its end: zeroes).
    const table = new Uint8Array(Math.ceil(batEnd / SECTOR) * SECTOR);
    await readZeroPadded(file, table, 0);
    let dataEnd = h.dataOff !== 0 ? h.dataOff : Math.ceil(batEnd / SECTOR);
    const bat = new Uint32Array(h.batEntries);
    const tv = new DataView(table.buffer);
    const clusterBytes = h.tracks * SECTOR;
    for (let i = 0; i < h.batEntries; i++) {
      const e = tv.getUint32(PRL_HEADER_SIZE + 4 * i, true);
      bat[i] = e;
      if (e === 0) continue;
      const sector = e * h.offMultiplier;
      if ((sector + h.tracks) * SECTOR > Number.MAX_SAFE_INTEGER) {
        throw new BlockError(
          Errno.EINVAL,
          `Corrupt Parallels image: BAT entry ${i} points at sector ${sector}, beyond what denbd can address`,
        );
      }
      if (sector >= dataEnd) dataEnd = sector + h.tracks;
      // Beyond qemu: a cluster over the header or BAT would be overwritten by the next allocation.
      if (sector * SECTOR < batEnd) {
        throw new BlockError(
          Errno.EINVAL,
          `Corrupt Parallels image: BAT entry ${i} points at offset ${
            sector * SECTOR
          }, inside the header and BAT (${batEnd} bytes)`,
        );
      }
    }
    if (h.inuse === PRL_INUSE_MAGIC && options.writable) {
      throw new BlockError(
        Errno.EACCES,
        "parallels: Image was not closed correctly; cannot be opened read/write",
      );
    }
    const prealloc = preallocOptions(options.options ?? {}, h.tracks);
    if (h.extOff !== 0) {
      if (options.writable) {
        options.warn?.(`${PROGRAM}: warning: Format Extension ignored in RW mode`);
      } else {
        if (clusterBytes > MAX_EXT_CLUSTER) {
          throw new BlockError(
            Errno.ENOMEM,
            `Parallels format extension cluster of ${clusterBytes} bytes is larger than denbd supports`,
          );
        }
        const ext = new Uint8Array(clusterBytes);
        const at = h.extOff * SECTOR;
        if (at <= Number.MAX_SAFE_INTEGER) await readZeroPadded(file, ext, at);
        parseParallelsExtension(ext, clusterBytes, h.size / SECTOR);
      }
    }
    if (options.writable && dataEnd * SECTOR < batEnd) {
      throw new BlockError(
        Errno.EINVAL,
        `Corrupt Parallels image: data offset ${
          dataEnd * SECTOR
        } is inside the BAT (${batEnd} bytes)`,
      );
    }
    const dev = new ParallelsDevice(file, h, table, bat, dataEnd, prealloc, options.writable);
    if (options.writable) {
      // qemu marks the image in use, synced, before the first guest write.
      setInuse(table, PRL_INUSE_MAGIC);
      await file.pwrite(table.subarray(0, SECTOR), 0);
      await file.sync();
    }
    return dev;
  } catch (e) {
    file.close();
    throw e;
  }
}

async function readZeroPadded(file: FileEngine, buf: Uint8Array, at: number): Promise<void> {
  const n = await file.pread(buf, at);
  if (n < buf.length) buf.fill(0, n);
}

export class ParallelsDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #file: FileEngine;
  /** Header and BAT sectors as in the file (the BAT sectors are written back from here). */
  readonly #table: Uint8Array;
  readonly #tableView: DataView;
  readonly #bat: Uint32Array;
  readonly #mult: number;
  readonly #tracks: number;
  readonly #cs: number;
  /** End of the data in sectors: where the next cluster goes. */
  #dataEnd: number;
  #prealloc: { sectors: number; mode: PreallocMode };
  readonly #alloc = new Mutex();
  #closed = false;

  constructor(
    file: FileEngine,
    h: ParallelsHeader,
    table: Uint8Array,
    bat: Uint32Array,
    dataEnd: number,
    prealloc: { sectors: number; mode: PreallocMode },
    writable: boolean,
  ) {
    this.#file = file;
    this.#table = table;
    this.#tableView = new DataView(table.buffer);
    this.#bat = bat;
    this.#mult = h.offMultiplier;
    this.#tracks = h.tracks;
    this.#cs = h.tracks * SECTOR;
    this.#dataEnd = dataEnd;
    this.#prealloc = prealloc;
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

  /** File offset of guest cluster `idx`, or -1 when unallocated. */
  #host(idx: number): number {
    const e = idx < this.#bat.length ? this.#bat[idx]! : 0;
    return e === 0 ? -1 : e * this.#mult * SECTOR;
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    const cs = this.#cs;
    const idx = Math.floor(offset / cs);
    const inCluster = offset - idx * cs;
    if (inCluster + buf.length <= cs) {
      // Inside one cluster (the common case): no per-request bookkeeping.
      const host = this.#host(idx);
      if (host >= 0) return readZeroPadded(this.#file, buf, host + inCluster);
      buf.fill(0);
      return Promise.resolve();
    }
    return this.#preadSpanning(buf, offset);
  }

  async #preadSpanning(buf: Uint8Array, offset: number): Promise<void> {
    const cs = this.#cs;
    const reads: Promise<void>[] = [];
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const idx = Math.floor(pos / cs);
      const inCluster = pos - idx * cs;
      const n = Math.min(buf.length - done, cs - inCluster);
      const part = buf.subarray(done, done + n);
      const host = this.#host(idx);
      if (host < 0) part.fill(0);
      else reads.push(readZeroPadded(this.#file, part, host + inCluster));
      done += n;
    }
    if (reads.length === 1) return await reads[0];
    const results = await Promise.allSettled(reads);
    for (const r of results) if (r.status === "rejected") throw r.reason;
  }

  async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "Parallels image is read-only");
    const cs = this.#cs;
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const idx = Math.floor(pos / cs);
      const inCluster = pos - idx * cs;
      const n = Math.min(buf.length - done, cs - inCluster);
      const part = buf.subarray(done, done + n);
      const host = this.#host(idx);
      if (host >= 0) await this.#file.pwrite(part, host + inCluster);
      else await this.#allocate(idx, part, inCluster);
      done += n;
    }
    if (flags.fua) await this.#file.sync();
  }

  /**
   * Writes `part` at `inCluster` of unallocated guest cluster `idx`: a new cluster at the end of
   * the data (the file grown first, as qemu does), the data, then the BAT entry and its sector.
   */
  #allocate(idx: number, part: Uint8Array, inCluster: number): Promise<void> {
    return this.#alloc.run(async () => {
      const now = this.#host(idx);
      if (now >= 0) {
        // Allocated by a write that held the lock before us.
        await this.#file.pwrite(part, now + inCluster);
        return;
      }
      if (idx >= this.#bat.length) {
        // Only a damaged image (nb_sectors beyond the BAT) gets here; qemu asserts.
        throw new BlockError(
          Errno.EIO,
          `Parallels image '${this.#file.path}' has no BAT entry for cluster ${idx}`,
        );
      }
      const tracks = this.#tracks;
      // BAT entries count units of `multiplier` sectors: keep the new cluster on one.
      const start = Math.ceil(this.#dataEnd / this.#mult) * this.#mult;
      const entry = start / this.#mult;
      if (entry > 0xffffffff || (start + tracks) * SECTOR > Number.MAX_SAFE_INTEGER) {
        throw new BlockError(Errno.EFBIG, `Parallels image '${this.#file.path}' is full`);
      }
      const fileSectors = Math.floor(this.#file.length() / SECTOR);
      if (start + tracks > fileSectors) {
        await this.#grow(start, tracks + this.#prealloc.sectors);
      }
      this.#dataEnd = start + tracks;
      // Data first, then the BAT entry that points at it.
      await this.#file.pwrite(part, start * SECTOR + inCluster);
      this.#bat[idx] = entry;
      const at = PRL_HEADER_SIZE + 4 * idx;
      this.#tableView.setUint32(at, entry, true);
      const sector = Math.floor(at / SECTOR) * SECTOR;
      await this.#file.pwrite(this.#table.subarray(sector, sector + SECTOR), sector);
    });
  }

  /** Makes `[start, start+sectors)` (sectors) read as zeroes, growing the file over it. */
  async #grow(start: number, sectors: number): Promise<void> {
    const f = this.#file;
    const from = start * SECTOR;
    const to = (start + sectors) * SECTOR;
    if (this.#prealloc.mode === "falloc") {
      try {
        await f.zeroRange(from, to - from);
        if (f.length() >= to) return;
      } catch (e) {
        if (!(e instanceof BlockError) || e.errno !== Errno.ENOTSUP) throw e;
      }
    }
    // ftruncate zeroes what it adds; anything of the range already in the file is overwritten.
    const inside = Math.max(0, Math.min(f.length(), to) - from);
    const zeroes = new Uint8Array(Math.min(inside, ZERO_CHUNK));
    for (let done = 0; done < inside;) {
      const n = Math.min(inside - done, zeroes.length);
      await f.pwrite(zeroes.subarray(0, n), from + done);
      done += n;
    }
    if (f.length() < to) f.truncate(to);
  }

  flush(): Promise<void> {
    return this.#file.sync();
  }

  /** qemu's parallels has no discard: a no-op, as qemu answers it. */
  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.resolve();
  }

  /** No write-zeroes in qemu's parallels: its block layer writes zero bytes instead. */
  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (flags.fastZero) {
      throw new BlockError(Errno.ENOTSUP, "Parallels cannot zero without writing zero data");
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

  extents(offset: number, length: number, out: ExtentList): Promise<void> {
    const cs = this.#cs;
    const end = offset + length;
    let pos = offset;
    while (pos < end && !out.full) {
      const idx = Math.floor(pos / cs);
      const n = Math.min(end - pos, (idx + 1) * cs - pos);
      out.add(n, this.#host(idx) < 0 ? STATE_HOLE | STATE_ZERO : 0);
      pos += n;
    }
    return Promise.resolve();
  }

  /** qemu:allocation-depth: 1 where allocated, 0 elsewhere (no backing file). */
  allocationDepth(offset: number, length: number, out: ExtentList): Promise<void> {
    const cs = this.#cs;
    const end = offset + length;
    let pos = offset;
    while (pos < end && !out.full) {
      const idx = Math.floor(pos / cs);
      const n = Math.min(end - pos, (idx + 1) * cs - pos);
      out.add(n, this.#host(idx) < 0 ? 0 : 1);
      pos += n;
    }
    return Promise.resolve();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      if (this.caps.writable) {
        // qemu's close: inuse cleared (synced), then the file cut at the end of the data.
        // Errors are ignored, as qemu's close ignores them: the image then stays marked.
        await this.#alloc.run(async () => {
          setInuse(this.#table, 0);
          await this.#file.pwrite(this.#table.subarray(0, SECTOR), 0);
          await this.#file.sync();
          this.#file.truncate(this.#dataEnd * SECTOR);
          await this.#file.sync();
        }).catch(() => {});
      }
    } finally {
      this.#file.close();
    }
  }
}
