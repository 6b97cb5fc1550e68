/**
 * The export as the handshake presents it: transmission flags chosen by qemu-nbd's policy, size
 * and block sizes.
 *
 * @module
 */

import { type BlockBitmap, type BlockDevice, BlockError, Errno } from "../block/types.ts";
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_MAX_BUFFER_SIZE,
} from "./constants.ts";
import type { ExportDescriptor } from "./handshake.ts";

export interface ExportSettings {
  readonly name: string;
  readonly description: string | undefined;
  /** -e: connections allowed at once (0 = unlimited). */
  readonly shared: number;
  readonly allocationDepth: boolean;
  readonly bitmaps: readonly string[];
}

/**
 * Flags as qemu-nbd sets them: FLUSH, FUA and CACHE always; TRIM, WRITE_ZEROES and FAST_ZERO
 * when writable; CAN_MULTI_CONN exactly when more than one client may connect (every connection
 * shares one backend with no per-connection cache, so a flush on one covers all). SEND_DF is
 * added per connection once structured replies are negotiated.
 */
export function describeExport(device: BlockDevice, settings: ExportSettings): ExportDescriptor {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE;
  if (settings.shared !== 1) flags |= NBD_FLAG_CAN_MULTI_CONN;
  if (!device.caps.writable) {
    flags |= NBD_FLAG_READ_ONLY;
  } else {
    flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  }
  return {
    name: settings.name,
    description: settings.description,
    // qemu exports whole sectors only.
    size: Math.floor(device.size / 512) * 512,
    flags,
    minBlock: device.caps.minBlock,
    maxBlock: NBD_MAX_BUFFER_SIZE,
    allocationDepth: settings.allocationDepth,
    bitmaps: settings.bitmaps,
  };
}

/**
 * -B: find each bitmap for the export as qemu's `nbd_export_create` does (the device looks in
 * its image, then down the backing chain) and refuse what qemu refuses, with its messages.
 * qemu also refuses an enabled bitmap on a read-only export of a writable node; denbd's
 * read-only exports never open the node writable, so that case cannot arise.
 */
export function resolveExportBitmaps(
  device: Pick<BlockDevice, "dirtyBitmap">,
  names: readonly string[],
): BlockBitmap[] {
  return names.map((name) => {
    const bitmap = device.dirtyBitmap?.(name);
    if (bitmap === undefined) throw new BlockError(Errno.ENOENT, `Bitmap '${name}' is not found`);
    if (bitmap.inUse) {
      throw new BlockError(Errno.EINVAL, `Bitmap '${name}' is inconsistent and cannot be used`);
    }
    return bitmap;
  });
}
