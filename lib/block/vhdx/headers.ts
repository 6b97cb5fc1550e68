/**
 * The pair of VHDX headers: choosing the current one at open and rewriting them as qemu's
 * vhdx_update_headers does (the other header gets sequence+1, the session's file write GUID,
 * optionally a new data write GUID and a log GUID; done twice so both end up current).
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import {
  bytesEqual,
  decodeHeader,
  encodeHeader,
  HEADER1_OFFSET,
  HEADER2_OFFSET,
  HEADER_FIELDS,
  HEADER_SIZE,
  headerIsValid,
  randomGuid,
  type VhdxHeader,
} from "./layout.ts";

const OFFSETS = [HEADER1_OFFSET, HEADER2_OFFSET] as const;

export class HeaderPair {
  readonly headers: [VhdxHeader, VhdxHeader];
  current: 0 | 1;
  /** The file write GUID of every header this session writes. */
  readonly sessionGuid: Uint8Array = randomGuid();

  constructor(headers: [VhdxHeader, VhdxHeader], current: 0 | 1) {
    this.headers = headers;
    this.current = current;
  }

  get active(): VhdxHeader {
    return this.headers[this.current];
  }

  /**
   * qemu's vhdx_parse_header over the two 4 KiB blocks: the valid one, or of two valid ones the
   * higher sequence number; equal numbers only when the headers are identical (Disk2VHD).
   * Undefined when there is none ("No valid VHDX header found").
   */
  static choose(b1: Uint8Array, b2: Uint8Array): HeaderPair | undefined {
    const v1 = headerIsValid(b1);
    const v2 = headerIsValid(b2);
    const h: [VhdxHeader, VhdxHeader] = [decodeHeader(b1), decodeHeader(b2)];
    let current: 0 | 1;
    if (v1 && !v2) current = 0;
    else if (!v1 && v2) current = 1;
    else if (!v1 && !v2) return undefined;
    else if (h[0].sequence > h[1].sequence) current = 0;
    else if (h[1].sequence > h[0].sequence) current = 1;
    else if (bytesEqual(b1.subarray(0, HEADER_FIELDS), b2.subarray(0, HEADER_FIELDS))) current = 0;
    else return undefined;
    return new HeaderPair(h, current);
  }

  /** Both headers rewritten in turn (vhdx_update_headers), each written and synced. */
  async updateBoth(file: FileEngine, newDataGuid: boolean, logGuid?: Uint8Array): Promise<void> {
    await this.#updateOne(file, newDataGuid, logGuid);
    await this.#updateOne(file, newDataGuid, logGuid);
  }

  async #updateOne(file: FileEngine, newDataGuid: boolean, logGuid?: Uint8Array): Promise<void> {
    const idx = this.current === 0 ? 1 : 0;
    const target = this.headers[idx];
    target.sequence = (this.active.sequence + 1n) & 0xffffffffffffffffn;
    target.fileWriteGuid = this.sessionGuid.slice();
    if (newDataGuid) target.dataWriteGuid = randomGuid();
    if (logGuid) target.logGuid = logGuid.slice();
    // The reserved bytes of the 4 KiB are kept as they are in the file (the checksum covers them).
    const block = new Uint8Array(HEADER_SIZE);
    const n = await file.pread(block, OFFSETS[idx]);
    block.fill(0, n);
    encodeHeader(target, block);
    await file.pwrite(block, OFFSETS[idx]);
    await file.sync();
    this.current = idx;
  }
}
