/**
 * The `luks` format driver (qemu 7.2's block/crypto.c over crypto/block-luks.c): a LUKS1
 * volume whose payload, from the header's payload offset to the end of the file, is the disk,
 * encrypted sector by sector with IVs numbered from the payload's first sector (the guest
 * offset / 512, not the file offset).
 *
 * - the key comes from `key-secret=ID` naming a `--object secret`; without it qemu's
 *   "Parameter 'key-secret' is required for cipher" (also for a probed volume);
 * - qemu's block layer aligns I/O to 512 bytes for this driver (`block_size_minimum` 512):
 *   unaligned reads read whole sectors, unaligned writes read-modify-write them under a lock;
 * - block status is all data (the driver has none of its own); discard is a no-op and write
 *   zeroes writes encrypted zeroes (fast zero: ENOTSUP), as qemu's generic fallbacks do.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import { ObjectError } from "../../objects/types.ts";
import type { FormatContext, FormatDriver } from "../formats.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  type ExtentList,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";
import { hasLuksMagic, LUKS_SECTOR } from "./header.ts";
import { type LuksVolume, secretPassword, unlockLuks } from "./unlock.ts";
import { Mutex } from "../qcow2/sync.ts";

export { hasLuksMagic } from "./header.ts";

/** The luks entry of the format registry (lib/block/formats.ts). */
export const luksFormat: FormatDriver = {
  name: "luks",
  probe: (head) => hasLuksMagic(head) ? 100 : 0,
  open: (file, ctx) => openLuks(file, ctx),
  optionKeys: ["key-secret"],
};

/** Zero bytes written per step when zeroing. */
const ZERO_CHUNK = 1024 * 1024;

/**
 * The password of `key-secret` (qemu looks it up before reading the header); `prefix` is
 * qcow2's "encrypt." in the messages.
 */
export function luksPassword(
  options: Readonly<Record<string, string>>,
  ctx: Pick<FormatContext, "objects">,
  key: string,
  prefix: string,
): Uint8Array {
  const id = options[key];
  if (id === undefined) {
    throw new BlockError(Errno.EINVAL, `Parameter '${prefix}key-secret' is required for cipher`);
  }
  let bytes: Uint8Array;
  try {
    if (ctx.objects === undefined) throw new ObjectError(`No secret with id '${id}'`);
    bytes = ctx.objects.secretBytes(id);
  } catch (e) {
    if (e instanceof ObjectError) throw new BlockError(Errno.EINVAL, e.message);
    throw e;
  }
  return secretPassword(bytes, id);
}

/** Opens a LUKS volume over `file`; closes the file if opening fails. */
export async function openLuks(file: FileEngine, ctx: FormatContext): Promise<LuksDevice> {
  let volume: LuksVolume | undefined;
  try {
    const password = luksPassword(ctx.options, ctx, "key-secret", "");
    volume = await unlockLuks(async (buf, off) => {
      const n = await file.pread(buf, off);
      if (n < buf.length) buf.fill(0, n);
    }, password);
    // qemu's size: the file's length in whole sectors, less the payload offset.
    const fileBytes = Math.ceil(file.length() / LUKS_SECTOR) * LUKS_SECTOR;
    if (volume.payloadOffset > fileBytes) {
      throw new BlockError(
        Errno.EIO,
        `Could not get the size of the LUKS payload: payload offset ${volume.payloadOffset} is past the end of the file (${fileBytes} bytes)`,
      );
    }
    return new LuksDevice(file, volume, fileBytes - volume.payloadOffset, ctx.writable);
  } catch (e) {
    volume?.cipher.close();
    file.close();
    throw e;
  }
}

export class LuksDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly #file: FileEngine;
  readonly #volume: LuksVolume;
  readonly #payload: number;
  readonly #rmw = new Mutex();
  #closed = false;

  constructor(file: FileEngine, volume: LuksVolume, size: number, writable: boolean) {
    this.#file = file;
    this.#volume = volume;
    this.#payload = volume.payloadOffset;
    this.size = size;
    this.caps = {
      writable,
      flush: true,
      trim: writable,
      zero: writable,
      fastZero: writable,
      extents: true,
      minBlock: LUKS_SECTOR,
    };
  }

  /** The LUKS header as read at open. */
  get header(): LuksVolume["header"] {
    return this.#volume.header;
  }

  #checkOpen(): void {
    if (this.#closed) throw new BlockError(Errno.EIO, `luks '${this.#file.path}' is closed`);
  }

  /** Reads and decrypts whole sectors into `buf` (aligned offset and length). */
  async #readSectors(buf: Uint8Array, offset: number): Promise<void> {
    const n = await this.#file.pread(buf, this.#payload + offset);
    // Past the end of the file the block layer reads zeroes, which then decrypt as anything.
    if (n < buf.length) buf.fill(0, n);
    this.#volume.cipher.decrypt(buf, offset / LUKS_SECTOR);
  }

  /** Encrypts a copy of `data` (whole sectors) and writes it. */
  async #writeSectors(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    const enc = new Uint8Array(data);
    this.#volume.cipher.encrypt(enc, offset / LUKS_SECTOR);
    await this.#file.pwrite(enc, this.#payload + offset);
    if (fua) await this.#file.sync();
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    this.#checkOpen();
    if (buf.length === 0) return;
    const end = offset + buf.length;
    if (offset % LUKS_SECTOR === 0 && end % LUKS_SECTOR === 0) {
      return await this.#readSectors(buf, offset);
    }
    const a = offset - (offset % LUKS_SECTOR);
    const b = Math.ceil(end / LUKS_SECTOR) * LUKS_SECTOR;
    const tmp = new Uint8Array(b - a);
    await this.#readSectors(tmp, a);
    buf.set(tmp.subarray(offset - a, end - a));
  }

  async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    this.#checkOpen();
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "LUKS image is read-only");
    if (buf.length === 0) return;
    const end = offset + buf.length;
    const fua = flags.fua === true;
    if (offset % LUKS_SECTOR === 0 && end % LUKS_SECTOR === 0) {
      return await this.#writeSectors(buf, offset, fua);
    }
    const a = offset - (offset % LUKS_SECTOR);
    const b = Math.ceil(end / LUKS_SECTOR) * LUKS_SECTOR;
    await this.#rmw.run(async () => {
      const tmp = new Uint8Array(b - a);
      // Only the partial first and last sectors need their old bytes.
      await this.#readSectors(tmp.subarray(0, LUKS_SECTOR), a);
      if (b - LUKS_SECTOR > a) {
        await this.#readSectors(tmp.subarray(tmp.length - LUKS_SECTOR), b - LUKS_SECTOR);
      }
      tmp.set(buf, offset - a);
      await this.#writeSectors(tmp, a, fua);
    });
  }

  flush(): Promise<void> {
    this.#checkOpen();
    return this.#file.sync();
  }

  /** qemu's luks has no discard: a no-op, as qemu answers it. */
  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    this.#checkOpen();
    return Promise.resolve();
  }

  /** No write-zeroes in qemu's luks: its block layer writes (encrypted) zero bytes instead. */
  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.#checkOpen();
    if (flags.fastZero) {
      throw new BlockError(Errno.ENOTSUP, "LUKS cannot zero without writing zero data");
    }
    const zeroes = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length;) {
      const n = Math.min(length - done, zeroes.length);
      await this.pwrite(zeroes.subarray(0, n), offset + done, flags);
      done += n;
    }
  }

  cache(_offset: number, _length: number): Promise<void> {
    this.#checkOpen();
    return Promise.resolve();
  }

  /** All data: qemu's crypto driver has no block status, so the block layer says data. */
  extents(_offset: number, length: number, out: ExtentList): Promise<void> {
    this.#checkOpen();
    out.add(length, 0);
    return Promise.resolve();
  }

  close(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    this.#closed = true;
    this.#volume.cipher.close();
    this.#file.close();
    return Promise.resolve();
  }
}
