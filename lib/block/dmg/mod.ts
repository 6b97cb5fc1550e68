/**
 * The dmg (Apple UDIF) format driver, read-only as in qemu 7.2 (block/dmg.c): the chunk table
 * of table.ts, then per chunk type
 *
 * - zeroes (UDZE) and ignored (UDIG) read as zeroes;
 * - raw (UDRW) is read straight from the file into the caller's buffer (and offered for
 *   zero-copy); bytes of the chunk past its stored length read as zeroes;
 * - zlib (UDZO) and bzip2 (UDBZ) chunks are decompressed whole, must give exactly their
 *   sectors, and stay in a {@link ChunkCache};
 * - a sector in no chunk of the table (a gap, a dropped lzfse/ADC/unknown chunk, a chunk past
 *   the end of a damaged table) is an I/O error, as in qemu.
 *
 * Chunks are looked up with qemu's binary search over the table in its order, so an image
 * whose chunks are out of order finds (or misses) the same chunks as in qemu.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import { PROGRAM } from "../../cli/errors.ts";
import type { FormatDriver } from "../formats.ts";
import { BlockError, Errno, type FileRange } from "../types.ts";
import { ChunkCache } from "./chunk_cache.ts";
import { bunzipExact, bzip2Available, inflateExact } from "./codecs.ts";
import { readBytes, readError, ReadOnlyDevice, readOnlyRefusal, readPadded } from "./readonly.ts";
import { DmgInvalid, type DmgTable, readDmgTable, UDBZ, UDIG, UDRW, UDZE, UDZO } from "./table.ts";

/** qemu's dmg_probe: a file name ending in ".dmg" (longer than that) scores 2; contents never. */
export function probeDmg(filename: string): number {
  return filename.length > 4 && filename.endsWith(".dmg") ? 2 : 0;
}

/** The dmg entry of the format registry (lib/block/formats.ts). */
export const dmgFormat: FormatDriver = {
  name: "dmg",
  probe: (_head, filename) => probeDmg(filename),
  open: (file, ctx) =>
    openDmg(file, {
      writable: ctx.writable,
      warn: (msg) => ctx.warn(`${PROGRAM}: warning: ${msg}`),
      report: (msg) => ctx.warn(`${PROGRAM}: ${msg}`),
    }),
};

export interface DmgOpenOptions {
  readonly writable: boolean;
  /** A warning line, as printed. */
  readonly warn: (msg: string) => void;
  /** An error_report line, as printed (before the open fails). */
  readonly report: (msg: string) => void;
  /** Decompressed bytes to keep (default: the cache's). */
  readonly cacheBytes?: number;
  /** Treat bzip2 as unavailable, as a qemu without its dmg-bz2 module (tests). */
  readonly noBzip2?: boolean;
}

/** Opens a dmg image over `file`; closes the file if opening fails. */
export async function openDmg(file: FileEngine, options: DmgOpenOptions): Promise<DmgDevice> {
  try {
    if (options.writable) throw readOnlyRefusal();
    const fileLength = file.length();
    const table = await readDmgTable(
      (offset, length) => readBytes(file, offset, length, fileLength),
      fileLength,
      {
        bzip2: !options.noBzip2 && bzip2Available(),
        warn: options.warn,
        report: options.report,
      },
    );
    return new DmgDevice(file, table, fileLength, options.cacheBytes);
  } catch (e) {
    file.close();
    if (e instanceof DmgInvalid) {
      throw new BlockError(Errno.EINVAL, `Could not open '${file.path}': Invalid argument`);
    }
    throw e;
  }
}

export class DmgDevice extends ReadOnlyDevice {
  readonly size: number;
  readonly #t: DmgTable;
  readonly #fileLength: number;
  readonly #cache: ChunkCache;

  constructor(file: FileEngine, table: DmgTable, fileLength: number, cacheBytes?: number) {
    super(file);
    this.#t = table;
    this.#fileLength = fileLength;
    this.size = table.totalSectors * 512;
    this.#cache = new ChunkCache(cacheBytes);
  }

  /** The chunk holding `sector` by qemu's binary search, or -1. */
  chunkOf(sector: number): number {
    const t = this.#t;
    let lo = 0;
    // qemu starts the upper bound at the count itself; that index holds no chunk.
    let hi = t.count;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (mid >= t.count) return -1;
      if (t.sectors[mid]! > sector) {
        if (mid === 0) return -1;
        hi = mid - 1;
      } else if (t.sectors[mid]! + t.sectorCounts[mid]! > sector) {
        return mid;
      } else {
        lo = mid + 1;
      }
    }
    return -1;
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const t = this.#t;
    const parts: Promise<void>[] = [];
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const sector = Math.floor(pos / 512);
      const c = this.chunkOf(sector);
      if (c < 0) {
        await Promise.allSettled(parts);
        throw readError(this.file.path, `sector ${sector} is in no readable chunk`);
      }
      const start = t.sectors[c]! * 512;
      const inChunk = pos - start;
      const n = Math.min(buf.length - done, start + t.sectorCounts[c]! * 512 - pos);
      const part = buf.subarray(done, done + n);
      const type = t.types[c]!;
      if (type === UDZE || type === UDIG) {
        part.fill(0);
      } else if (type === UDRW) {
        const stored = Math.max(0, Math.min(n, t.lengths[c]! - inChunk));
        part.fill(0, stored);
        if (stored > 0) {
          parts.push(
            readPadded(
              this.file,
              part.subarray(0, stored),
              t.offsets[c]! + inChunk,
              this.#fileLength,
            ),
          );
        }
      } else {
        parts.push(this.#decoded(c).then((d) => part.set(d.subarray(inChunk, inChunk + n))));
      }
      done += n;
    }
    const results = await Promise.allSettled(parts);
    for (const r of results) if (r.status === "rejected") throw r.reason;
  }

  /** A compressed chunk's bytes, decompressed (cached). */
  #decoded(c: number): Promise<Uint8Array> {
    return this.#cache.get(c, async () => {
      const t = this.#t;
      const size = t.sectorCounts[c]! * 512;
      const src = await readBytes(this.file, t.offsets[c]!, t.lengths[c]!, this.#fileLength);
      const out = t.types[c] === UDZO
        ? inflateExact(src, size)
        : t.types[c] === UDBZ
        ? await bunzipExact(src, size)
        : null;
      if (out === null) {
        throw readError(
          this.file.path,
          `chunk ${c} (offset ${t.offsets[c]}, ${
            t.lengths[c]
          } bytes) does not decompress to ${size} bytes`,
        );
      }
      return out;
    });
  }

  /** A read inside one raw chunk's stored bytes lies as-is in the file. */
  fileRange(offset: number, length: number): FileRange | undefined {
    const t = this.#t;
    const c = this.chunkOf(Math.floor(offset / 512));
    if (c < 0 || t.types[c] !== UDRW) return undefined;
    const inChunk = offset - t.sectors[c]! * 512;
    if (inChunk + length > Math.min(t.lengths[c]!, t.sectorCounts[c]! * 512)) return undefined;
    const at = t.offsets[c]! + inChunk;
    if (at + length > this.#fileLength) return undefined;
    return { fd: this.file.fd, offset: at, data: true };
  }

  override close(): Promise<void> {
    this.#cache.clear();
    return super.close();
  }
}
