/**
 * Read-only filter (-r): the export refuses every change. The protocol layer rejects writes on a
 * read-only export before they get here; this layer makes the device itself say so too.
 *
 * @module
 */

import { BlockError, type Capabilities, Errno, Filter } from "../types.ts";

export class ReadOnlyFilter extends Filter {
  override get caps(): Capabilities {
    return { ...this.next.caps, writable: false, trim: false, zero: false, fastZero: false };
  }
  override pwrite(): Promise<void> {
    return Promise.reject(new BlockError(Errno.EPERM, "Export is read-only"));
  }
  override trim(): Promise<void> {
    return Promise.reject(new BlockError(Errno.EPERM, "Export is read-only"));
  }
  override zero(): Promise<void> {
    return Promise.reject(new BlockError(Errno.EPERM, "Export is read-only"));
  }
}
