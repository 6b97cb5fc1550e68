/**
 * A protocol block device (nbd, http, null-co) seen as a file, so the qcow2 driver, which works
 * on files, can sit on top of it as qemu's formats sit on any protocol node. The "file" cannot
 * grow: qemu's protocols other than `file` have a fixed length too.
 *
 * @module
 */

import type { FileEngine } from "../../io/file_engine.ts";
import { type BlockDevice, BlockError, Errno } from "../types.ts";

export class DeviceFile implements FileEngine {
  /** The filename as given (a URL for nbd/http): used in messages only. */
  readonly path: string;
  /** No descriptor: code that needs one (fstat, O_DIRECT) must not be used on a DeviceFile. */
  readonly fd = -1;
  readonly #dev: BlockDevice;

  constructor(dev: BlockDevice, name: string) {
    this.#dev = dev;
    this.path = name;
  }

  async pread(buf: Uint8Array, offset: number): Promise<number> {
    const n = Math.max(0, Math.min(buf.length, this.#dev.size - offset));
    if (n === 0) return 0;
    await this.#dev.pread(n === buf.length ? buf : buf.subarray(0, n), offset);
    return n;
  }

  pwrite(buf: Uint8Array, offset: number): Promise<void> {
    if (offset + buf.length > this.#dev.size) {
      return Promise.reject(
        // EINVAL: what a protocol (an NBD server, say) answers for a write past its end.
        new BlockError(
          Errno.EINVAL,
          `'${this.path}': cannot grow a ${this.#dev.size}-byte protocol node to ${
            offset + buf.length
          } bytes`,
        ),
      );
    }
    return this.#dev.pwrite(buf, offset, {});
  }

  sync(): Promise<void> {
    return this.#dev.caps.flush ? this.#dev.flush() : Promise.resolve();
  }

  length(): number {
    return this.#dev.size;
  }

  truncate(length: number): void {
    if (length === this.#dev.size) return;
    throw new BlockError(Errno.ENOTSUP, `'${this.path}': cannot resize this protocol node`);
  }

  punchHole(offset: number, length: number): Promise<void> {
    if (!this.#dev.caps.trim) {
      return Promise.reject(new BlockError(Errno.ENOTSUP, "discard not supported"));
    }
    return this.#dev.trim(offset, length, {});
  }

  zeroRange(offset: number, length: number): Promise<void> {
    if (!this.#dev.caps.zero) {
      return Promise.reject(new BlockError(Errno.ENOTSUP, "write zeroes not supported"));
    }
    return this.#dev.zero(offset, length, { noHole: true });
  }

  /** Everything counts as data: the protocol's block status is asynchronous, this is not. */
  seekData(offset: number): number {
    return offset < this.#dev.size ? offset : -1;
  }

  seekHole(_offset: number): number {
    return this.#dev.size;
  }

  prefetch(): void {}

  close(): void {
    void this.#dev.close().catch(() => {});
  }
}
