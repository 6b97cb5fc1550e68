/**
 * Stands in for a format driver's missing write path: the export is presented as writable (the
 * same flags qemu-nbd advertises) and every change is refused with EPERM and a message naming
 * what is missing. Removed once the driver writes.
 *
 * @module
 */

import { BlockError, type Capabilities, Errno, Filter } from "../types.ts";

export class WritesUnsupportedFilter extends Filter {
  readonly #what: string;
  constructor(next: ConstructorParameters<typeof Filter>[0], what: string) {
    super(next);
    this.#what = what;
  }
  override get caps(): Capabilities {
    return { ...this.next.caps, writable: true, trim: true, zero: true, fastZero: true };
  }
  override pwrite(): Promise<void> {
    return Promise.reject(
      new BlockError(Errno.EPERM, `${this.#what} writes are not supported yet`),
    );
  }
  override zero(): Promise<void> {
    return Promise.reject(
      new BlockError(Errno.EPERM, `${this.#what} writes are not supported yet`),
    );
  }
  override trim(): Promise<void> {
    // TRIM is a hint: doing nothing is always correct.
    return Promise.resolve();
  }
}
