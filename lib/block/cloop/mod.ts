/**
 * The cloop (compressed loop) format driver, read-only as in qemu 7.2 (block/cloop.c):
 *
 * - a 128-byte shell-script preamble (probing compares qemu's "#V2.0 Format" script), then the
 *   big-endian block size (a non-zero multiple of 512, at most 64 MiB) and block count, then
 *   count + 1 big-endian u64 offsets: block i is the zlib stream at [offsets[i], offsets[i+1]);
 * - the offsets must not decrease and no block may take more than 128 MiB (qemu's checks and
 *   messages, in its order), and the table is at most 512 MiB;
 * - a block must inflate to exactly the block size, else the read is an I/O error;
 * - the disk is count * block size bytes.
 *
 * Decompressed blocks stay in a small cache (qemu keeps the last one).
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import type { FormatDriver } from "../formats.ts";
import { BlockError, Errno } from "../types.ts";
import { ChunkCache } from "../dmg/chunk_cache.ts";
import { inflateExact } from "../dmg/codecs.ts";
import { readBytes, readError, ReadOnlyDevice, readOnlyRefusal } from "../dmg/readonly.ts";

/** The V2.0 preamble qemu's probe compares (as much of it as the buffer holds). */
export const CLOOP_MAGIC = new TextEncoder().encode(
  "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
);
/** Where the block size and count are. */
export const CLOOP_HEADER = 128;
/** qemu's largest block size. */
export const CLOOP_MAX_BLOCK = 64 * 1024 * 1024;
/** qemu's largest offsets table. */
export const CLOOP_MAX_OFFSETS_BYTES = 512 * 1024 * 1024;
/** qemu's limit on the block count (its offsets table size must fit in 32 bits). */
export const CLOOP_MAX_BLOCKS = Math.floor((0xffffffff - 1) / 8);

/** qemu's cloop_probe (score 2: above raw, below any magic number). */
export function probeCloop(head: Uint8Array): number {
  const n = Math.min(CLOOP_MAGIC.length, head.length);
  for (let i = 0; i < n; i++) if (head[i] !== CLOOP_MAGIC[i]) return 0;
  return 2;
}

/** The cloop entry of the format registry (lib/block/formats.ts). */
export const cloopFormat: FormatDriver = {
  name: "cloop",
  probe: (head) => probeCloop(head),
  open: (file, ctx) => openCloop(file, { writable: ctx.writable }),
};

/** The decoded header and offsets. */
export interface CloopTable {
  readonly blockSize: number;
  readonly blocks: number;
  /**
   * The first blocks + 1 file offsets (exact below 2^53; larger ones lie past any file
   * anyway); entries past its end are 0 (a table that runs past the end of the file).
   */
  readonly offsets: Float64Array;
}

function einval(msg: string): BlockError {
  return new BlockError(Errno.EINVAL, msg);
}

/** Checks the 8 header bytes at 128 (block size, block count) with qemu's messages. */
export function decodeCloopHeader(b: Uint8Array): { blockSize: number; blocks: number } {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const blockSize = v.getUint32(0);
  if (blockSize % 512 !== 0) throw einval(`block_size ${blockSize} must be a multiple of 512`);
  if (blockSize === 0) throw einval("block_size cannot be zero");
  if (blockSize > CLOOP_MAX_BLOCK) {
    throw einval(`block_size ${blockSize} must be ${CLOOP_MAX_BLOCK / (1024 * 1024)} MB or less`);
  }
  const blocks = v.getUint32(4);
  if (blocks > CLOOP_MAX_BLOCKS) {
    throw einval(`n_blocks ${blocks} must be ${CLOOP_MAX_BLOCKS} or less`);
  }
  // qemu computes the table size in 32 bits: the largest count wraps it to 0, and its
  // allocation of 0 bytes then fails.
  const tableBytes = ((blocks + 1) * 8) >>> 0;
  if (tableBytes > CLOOP_MAX_OFFSETS_BYTES) {
    throw einval("image requires too many offsets, try increasing block size");
  }
  if (tableBytes === 0) throw new BlockError(Errno.ENOMEM, "Could not allocate offsets table");
  return { blockSize, blocks };
}

/**
 * Decodes and checks the offsets table (`blocks + 1` big-endian u64s). `b` may hold only the
 * first entries (the table runs past the end of the file): the rest are zeroes, as qemu reads
 * them, and are not stored -- {@link CloopTable.offsets} then has fewer entries, the missing
 * ones being 0.
 */
export function decodeCloopOffsets(b: Uint8Array, blocks: number): Float64Array {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const stored = Math.min(blocks + 1, Math.floor(b.length / 8));
  const out = new Float64Array(stored);
  let prev = stored > 0 ? v.getBigUint64(0) : 0n;
  if (stored > 0) out[0] = Number(prev);
  // Past the stored entries everything is 0: only the first of them can fail a check.
  const last = Math.min(blocks, stored);
  for (let i = 1; i <= last; i++) {
    const cur = i < stored ? v.getBigUint64(i * 8) : 0n;
    if (cur < prev) {
      throw einval(`offsets not monotonically increasing at index ${i}, image file is corrupt`);
    }
    if (cur - prev > BigInt(2 * CLOOP_MAX_BLOCK)) {
      throw einval(`invalid compressed block size at index ${i}, image file is corrupt`);
    }
    if (i < stored) out[i] = Number(cur);
    prev = cur;
  }
  return out;
}

export interface CloopOpenOptions {
  readonly writable: boolean;
  /** Decompressed bytes to keep (default: the cache's). */
  readonly cacheBytes?: number;
}

/** Opens a cloop image over `file`; closes the file if opening fails. */
export async function openCloop(file: FileEngine, options: CloopOpenOptions): Promise<CloopDevice> {
  try {
    if (options.writable) throw readOnlyRefusal();
    const fileLength = file.length();
    const { blockSize, blocks } = decodeCloopHeader(
      await readBytes(file, CLOOP_HEADER, 8, fileLength),
    );
    // Only the part of the table inside the file is read (and held): the rest is zeroes.
    const tableAt = CLOOP_HEADER + 8;
    const inFile = Math.min(
      (blocks + 1) * 8,
      Math.max(0, Math.ceil((fileLength - tableAt) / 8) * 8),
    );
    const offsets = decodeCloopOffsets(await readBytes(file, tableAt, inFile, fileLength), blocks);
    return new CloopDevice(file, { blockSize, blocks, offsets }, fileLength, options.cacheBytes);
  } catch (e) {
    file.close();
    throw e;
  }
}

export class CloopDevice extends ReadOnlyDevice {
  readonly size: number;
  readonly #t: CloopTable;
  readonly #fileLength: number;
  readonly #cache: ChunkCache;

  constructor(file: FileEngine, table: CloopTable, fileLength: number, cacheBytes?: number) {
    super(file);
    this.#t = table;
    this.#fileLength = fileLength;
    this.size = table.blocks * table.blockSize;
    this.#cache = new ChunkCache(cacheBytes);
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    const bs = this.#t.blockSize;
    const parts: Promise<void>[] = [];
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(buf.length - done, bs - inBlock);
      const part = buf.subarray(done, done + n);
      parts.push(this.#block(block).then((d) => part.set(d.subarray(inBlock, inBlock + n))));
      done += n;
    }
    const results = await Promise.allSettled(parts);
    for (const r of results) if (r.status === "rejected") throw r.reason;
  }

  #block(i: number): Promise<Uint8Array> {
    return this.#cache.get(i, async () => {
      const t = this.#t;
      const at = t.offsets[i] ?? 0;
      const length = (t.offsets[i + 1] ?? 0) - at;
      const src = await readBytes(this.file, at, length, this.#fileLength);
      const out = inflateExact(src, t.blockSize);
      if (out === null) {
        throw readError(
          this.file.path,
          `block ${i} (offset ${at}, ${length} bytes) does not inflate to ${t.blockSize} bytes`,
        );
      }
      return out;
    });
  }

  override close(): Promise<void> {
    this.#cache.clear();
    return super.close();
  }
}
