/**
 * The VHDX metadata log, as qemu 7.2's vhdx-log.c finds and replays it at open:
 *
 * - the log is a circular buffer of 4 KiB sectors; an entry is a header sector (64-byte header,
 *   then 32-byte descriptors, continued in further sectors) followed by one data sector per
 *   data descriptor; its CRC-32C covers the whole entry with the checksum field zeroed;
 * - the search walks the whole buffer sector by sector and keeps the valid sequence (entries
 *   with consecutive sequence numbers) whose first entry has the highest sequence number;
 *   a valid entry header whose descriptors do not check fails the open (qemu: -EINVAL);
 * - replay writes each data sector (its first 8 and last 4 bytes come from the descriptor) and
 *   each zero run, grows the file to the entry's last file offset when that is not a whole MiB
 *   (qemu's rounding), flushes, then clears the log GUID in both headers.
 *
 * {@link encodeLogEntry} builds entries (the tests make dirty images with it).
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import { BlockError, Errno } from "../types.ts";
import { crc32c } from "./crc32c.ts";
import type { HeaderPair } from "./headers.ts";
import { bytesEqual, MiB, u64 } from "./layout.ts";

export const LOG_SECTOR = 4096;
export const LOG_SIGNATURE = 0x65676f6c; // "loge"
export const LOG_DESC_SIGNATURE = 0x63736564; // "desc"
export const LOG_ZERO_SIGNATURE = 0x6f72657a; // "zero"
export const LOG_DATA_SIGNATURE = 0x61746164; // "data"

/** Largest descriptor area denbd reads for one entry (qemu allocates whatever it says). */
const MAX_DESC_BYTES = 64 * MiB;
/** Bytes the search may read in all (bounds hostile logs whose entries overlap endlessly). */
const SEARCH_BUDGET = 4 * 1024 * MiB;

interface EntryHeader {
  signature: number;
  checksum: number;
  entryLength: number;
  sequence: bigint;
  descriptorCount: number;
  logGuid: Uint8Array;
  flushedFileOffset: number;
  lastFileOffset: number;
}

interface Descriptor {
  signature: number;
  trailing: Uint8Array;
  leading: Uint8Array;
  zeroLength: number;
  fileOffset: number;
  sequence: bigint;
}

function dv(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function decodeEntryHeader(b: Uint8Array): EntryHeader {
  const v = dv(b);
  return {
    signature: v.getUint32(0, true),
    checksum: v.getUint32(4, true),
    entryLength: v.getUint32(8, true),
    sequence: v.getBigUint64(16, true),
    descriptorCount: v.getUint32(24, true),
    logGuid: b.slice(32, 48),
    flushedFileOffset: u64(v, 48),
    lastFileOffset: u64(v, 56),
  };
}

function decodeDescriptor(b: Uint8Array): Descriptor {
  const v = dv(b);
  return {
    signature: v.getUint32(0, true),
    trailing: b.slice(4, 8),
    leading: b.slice(8, 16),
    zeroLength: u64(v, 8),
    fileOffset: u64(v, 16),
    sequence: v.getBigUint64(24, true),
  };
}

/** Sectors holding the header and `count` descriptors (the header takes two slots). */
export function descriptorSectors(count: number): number {
  return Math.ceil((count + 2) / 128);
}

/** A read/write position pair in the circular log, byte offsets within it. */
interface Cursor {
  read: number;
  write: number;
}

/** A found sequence: where it starts and ends, how many entries, its first entry's header. */
export interface LogSequence {
  readonly read: number;
  readonly write: number;
  readonly count: number;
  readonly first: EntryHeader;
}

function corrupt(path: string): BlockError {
  return new BlockError(Errno.EINVAL, `Could not open '${path}': Invalid argument`);
}

/** The log region of one image, read through the file. */
export class VhdxLog {
  readonly #file: FileEngine;
  readonly #offset: number;
  readonly #length: number;
  readonly #guid: Uint8Array;
  #budget = SEARCH_BUDGET;

  constructor(file: FileEngine, offset: number, length: number, guid: Uint8Array) {
    this.#file = file;
    this.#offset = offset;
    this.#length = length;
    this.#guid = guid;
  }

  #inc(idx: number): number {
    idx += LOG_SECTOR;
    return idx >= this.#length ? 0 : idx;
  }

  async #pread(buf: Uint8Array, at: number): Promise<void> {
    this.#budget -= buf.length;
    if (this.#budget < 0) {
      throw new BlockError(
        Errno.EINVAL,
        `VHDX log of '${this.#file.path}' is too damaged to search (read limit reached)`,
      );
    }
    const n = await this.#file.pread(buf, at);
    buf.fill(0, n);
  }

  /** The entry header at the cursor, without moving it (vhdx_log_peek_hdr). */
  async #peek(c: Cursor): Promise<EntryHeader> {
    let read = c.read;
    if (read + 64 > this.#length) read = 0;
    if (read === c.write) throw corrupt(this.#file.path);
    const b = new Uint8Array(64);
    await this.#pread(b, this.#offset + read);
    return decodeEntryHeader(b);
  }

  /** Reads up to `count` sectors into `buf` from the cursor, moving it; returns sectors read. */
  async #readSectors(c: Cursor, buf: Uint8Array, count: number): Promise<number> {
    let done = 0;
    while (done < count && c.read !== c.write) {
      // One pread for the run up to the write position or the end of the buffer.
      let run = 1;
      let next = this.#inc(c.read);
      while (done + run < count && next !== c.write && next !== 0) {
        run++;
        next = this.#inc(next);
      }
      await this.#pread(
        buf.subarray(done * LOG_SECTOR, (done + run) * LOG_SECTOR),
        this.#offset + c.read,
      );
      c.read = next;
      done += run;
    }
    return done;
  }

  #headerValid(h: EntryHeader): boolean {
    return h.signature === LOG_SIGNATURE && h.entryLength <= this.#length &&
      h.entryLength % LOG_SECTOR === 0 && h.sequence !== 0n && bytesEqual(h.logGuid, this.#guid) &&
      h.descriptorCount * 32 <= h.entryLength;
  }

  /** Header and descriptors at the cursor, moving past them (vhdx_log_read_desc). */
  async #readDescriptors(c: Cursor): Promise<{ hdr: EntryHeader; area: Uint8Array }> {
    const hdr = await this.#peek(c);
    if (!this.#headerValid(hdr)) throw corrupt(this.#file.path);
    const sectors = descriptorSectors(hdr.descriptorCount);
    if (sectors * LOG_SECTOR > MAX_DESC_BYTES) {
      throw new BlockError(
        Errno.EINVAL,
        `VHDX log entry of '${this.#file.path}' has ${hdr.descriptorCount} descriptors, more than denbd reads`,
      );
    }
    const area = new Uint8Array(sectors * LOG_SECTOR);
    if (await this.#readSectors(c, area, sectors) !== sectors) throw corrupt(this.#file.path);
    for (let i = 0; i < hdr.descriptorCount; i++) {
      const d = decodeDescriptor(area.subarray(64 + 32 * i, 96 + 32 * i));
      const ok = d.sequence === hdr.sequence && d.fileOffset % LOG_SECTOR === 0 &&
        ((d.signature === LOG_ZERO_SIGNATURE && d.zeroLength % LOG_SECTOR === 0) ||
          d.signature === LOG_DESC_SIGNATURE);
      if (!ok) throw corrupt(this.#file.path);
    }
    return { hdr, area };
  }

  /** vhdx_validate_log_entry: the entry at the cursor, or undefined; the cursor moves on. */
  async #validate(c: Cursor, prevSeq: bigint): Promise<EntryHeader | undefined> {
    const hdr = await this.#peek(c);
    if (!this.#headerValid(hdr) || (prevSeq > 0n && hdr.sequence !== prevSeq + 1n)) {
      c.read = this.#inc(c.read);
      return undefined;
    }
    const descSectors = descriptorSectors(hdr.descriptorCount);
    const total = hdr.entryLength / LOG_SECTOR;
    const { area } = await this.#readDescriptors(c);
    area.fill(0, 4, 8);
    let crc = crc32c(0, area);
    const sector = new Uint8Array(LOG_SECTOR);
    for (let i = descSectors; i < total; i++) {
      if (await this.#readSectors(c, sector, 1) !== 1) return undefined;
      crc = crc32c(crc, sector);
    }
    return crc === hdr.checksum ? hdr : undefined;
  }

  /** vhdx_log_search: the active sequence, or undefined when the log holds none. */
  async search(): Promise<LogSequence | undefined> {
    const c: Cursor = { read: 0, write: this.#length };
    let best: LogSequence | undefined;
    for (;;) {
      let seq = 0n;
      const tail = c.read;
      const first = await this.#validate(c, seq);
      if (first !== undefined) {
        let write = c.read;
        let count = 1;
        for (;;) {
          const next = await this.#validate(c, seq);
          if (next === undefined) break;
          write = c.read;
          count++;
          seq = next.sequence;
        }
        if (best === undefined || first.sequence > best.first.sequence) {
          best = { read: tail, write, count, first };
        }
      }
      if (c.read < tail) break;
    }
    return best;
  }

  /** vhdx_log_flush: writes the sequence's sectors in place, then empties the log. */
  async replay(seq: LogSequence, headers: HeaderPair): Promise<void> {
    const f = this.#file;
    const c: Cursor = { read: seq.read, write: seq.write };
    const data = new Uint8Array(LOG_SECTOR);
    const out = new Uint8Array(LOG_SECTOR);
    const zeroes = new Uint8Array(MiB);
    for (let n = 0; n < seq.count; n++) {
      const peeked = await this.#peek(c);
      const fileLength = f.length();
      // A log that flushed more than the file holds: the file was truncated.
      if (peeked.flushedFileOffset > fileLength) throw corrupt(f.path);
      const { hdr, area } = await this.#readDescriptors(c);
      const limit = Math.max(fileLength, hdr.lastFileOffset) + MiB;
      for (let i = 0; i < hdr.descriptorCount; i++) {
        const d = decodeDescriptor(area.subarray(64 + 32 * i, 96 + 32 * i));
        if (d.signature === LOG_DESC_SIGNATURE) {
          if (await this.#readSectors(c, data, 1) !== 1) throw corrupt(f.path);
          const v = dv(data);
          const s = (BigInt(v.getUint32(4, true)) << 32n) | BigInt(v.getUint32(4092, true));
          if (s !== d.sequence) throw corrupt(f.path);
          if (d.fileOffset + LOG_SECTOR > limit) throw this.#beyond(d.fileOffset);
          out.set(d.leading, 0);
          out.set(data.subarray(8, 4092), 8);
          out.set(d.trailing, 4092);
          await f.pwrite(out, d.fileOffset);
        } else {
          // Beyond qemu: a zero run far past the file (a hostile length) is refused.
          if (d.fileOffset + d.zeroLength > limit) throw this.#beyond(d.fileOffset);
          for (let done = 0; done < d.zeroLength;) {
            const len = Math.min(zeroes.length, d.zeroLength - done);
            await f.pwrite(zeroes.subarray(0, len), d.fileOffset + done);
            done += len;
          }
        }
      }
      if (fileLength < hdr.lastFileOffset && hdr.lastFileOffset % MiB !== 0) {
        f.truncate(Math.ceil(hdr.lastFileOffset / MiB) * MiB);
      }
    }
    await f.sync();
    await headers.updateBoth(f, false, new Uint8Array(16));
  }

  #beyond(at: number): BlockError {
    return new BlockError(
      Errno.EINVAL,
      `VHDX log of '${this.#file.path}' writes at offset ${at}, past the end of the image`,
    );
  }
}

/** One write in a log entry: 4 KiB of `data` at `fileOffset`, or `zeroLength` zero bytes. */
export type LogWrite =
  | { readonly fileOffset: number; readonly data: Uint8Array }
  | { readonly fileOffset: number; readonly zeroLength: number };

/** Builds a log entry (header, descriptors, data sectors) with its checksum. */
export function encodeLogEntry(opts: {
  readonly sequence: bigint;
  readonly logGuid: Uint8Array;
  readonly tail?: number;
  readonly flushedFileOffset: number;
  readonly lastFileOffset: number;
  readonly writes: readonly LogWrite[];
}): Uint8Array {
  const descSectors = descriptorSectors(opts.writes.length);
  const dataCount = opts.writes.filter((w) => "data" in w).length;
  const out = new Uint8Array((descSectors + dataCount) * LOG_SECTOR);
  const v = dv(out);
  v.setUint32(0, LOG_SIGNATURE, true);
  v.setUint32(8, out.length, true);
  v.setUint32(12, opts.tail ?? 0, true);
  v.setBigUint64(16, opts.sequence, true);
  v.setUint32(24, opts.writes.length, true);
  out.set(opts.logGuid, 32);
  v.setBigUint64(48, BigInt(opts.flushedFileOffset), true);
  v.setBigUint64(56, BigInt(opts.lastFileOffset), true);
  let dataAt = descSectors * LOG_SECTOR;
  opts.writes.forEach((w, i) => {
    const d = 64 + 32 * i;
    v.setBigUint64(d + 16, BigInt(w.fileOffset), true);
    v.setBigUint64(d + 24, opts.sequence, true);
    if ("data" in w) {
      v.setUint32(d, LOG_DESC_SIGNATURE, true);
      out.set(w.data.subarray(4092, 4096), d + 4);
      out.set(w.data.subarray(0, 8), d + 8);
      v.setUint32(dataAt, LOG_DATA_SIGNATURE, true);
      v.setUint32(dataAt + 4, Number(opts.sequence >> 32n), true);
      out.set(w.data.subarray(8, 4092), dataAt + 8);
      v.setUint32(dataAt + 4092, Number(opts.sequence & 0xffffffffn), true);
      dataAt += LOG_SECTOR;
    } else {
      v.setUint32(d, LOG_ZERO_SIGNATURE, true);
      v.setBigUint64(d + 8, BigInt(w.zeroLength), true);
    }
  });
  v.setUint32(4, crc32c(0, out), true);
  return out;
}
