/**
 * A /dev/nbdN device driven through the kernel's ioctl interface, in qemu-nbd 7.2's order and
 * words (nbd/client.c nbd_init, nbd_client, nbd_disconnect): bind a negotiated socket, let the
 * kernel serve the block device until it is disconnected, and disconnect it from another process
 * (`-d`). The ioctls go through {@link NbdDeviceOps}, so tests can record them.
 *
 * @module
 */

import {
  NBD_CLEAR_QUE,
  NBD_CLEAR_SOCK,
  NBD_DISCONNECT,
  NBD_SET_BLKSIZE,
  NBD_SET_FLAGS,
  NBD_SET_SIZE_BLOCKS,
  NBD_SET_SOCK,
  type NbdDeviceOps,
} from "../../ffi/nbd_ioctl.ts";
import { strerror } from "../../ffi/libc.ts";
import { Errno } from "../errors.ts";
import { NBD_FLAG_READ_ONLY } from "../nbd/constants.ts";

const SECTOR_SIZE = 512;

/** What the kernel is told about the export. */
export interface DeviceExport {
  readonly size: number;
  /** Transmission flags as the server sent them. */
  readonly flags: number;
  /** The server's minimum block size (0 when it sent none). */
  readonly minBlock: number;
}

/**
 * A device step that failed: `message` is qemu-nbd's line, `hint` (when there is one) a second
 * line saying what to do about the errno behind it.
 */
export class DeviceError extends Error {
  override name = "DeviceError";
  readonly hint: string | undefined;
  constructor(message: string, hint?: string) {
    super(message);
    this.hint = hint;
  }
}

/** open(2) of the device for -c, with qemu-nbd's message and a hint for the usual causes. */
export function openDevice(ops: NbdDeviceOps, path: string): number {
  const fd = ops.open(path);
  if (fd >= 0) return fd;
  const err = -fd;
  throw new DeviceError(`Failed to open ${path}: ${strerror(err)}`, deviceHint(path, err));
}

/**
 * The hint line for an errno from opening or binding `device` (ioctl or netlink), or undefined
 * when there is nothing to add to qemu-nbd's message.
 */
export function deviceHint(device: string, err: number): string | undefined {
  switch (err) {
    case Errno.ENOENT:
    case Errno.ENXIO:
      return `(is the nbd kernel module loaded? try 'modprobe nbd' and check that ${device} exists)`;
    case Errno.EACCES:
    case Errno.EPERM:
      return "(binding an NBD device needs root)";
    case Errno.EBUSY:
      return `(${device} is already connected; 'denbd -d ${device}' disconnects it)`;
  }
  return undefined;
}

/** qemu's nbd_init: hand `sockFd` to the kernel and describe the export to it. */
export function bindDevice(
  ops: NbdDeviceOps,
  deviceFd: number,
  device: string,
  sockFd: number,
  exp: DeviceExport,
): void {
  const sectorSize = Math.max(SECTOR_SIZE, exp.minBlock);
  // A trailing partial sector is not visible through the device (as with qemu-nbd).
  const sectors = Math.floor(exp.size / sectorSize);
  let r = ops.ioctl(deviceFd, NBD_SET_SOCK, sockFd);
  if (r < 0) throw new DeviceError("Failed to set NBD socket", setSockHint(device, -r));
  r = ops.ioctl(deviceFd, NBD_SET_BLKSIZE, sectorSize);
  if (r < 0) throw new DeviceError("Failed setting NBD block size", errnoHint(-r));
  r = ops.ioctl(deviceFd, NBD_SET_SIZE_BLOCKS, sectors);
  if (r < 0) throw new DeviceError("Failed setting size (in blocks)", errnoHint(-r));
  r = ops.ioctl(deviceFd, NBD_SET_FLAGS, exp.flags);
  if (r === -Errno.ENOTTY) {
    // Kernels before 3.x had no NBD_SET_FLAGS: read-only is all they can be told.
    r = ops.setReadOnly(deviceFd, (exp.flags & NBD_FLAG_READ_ONLY) !== 0);
    if (r < 0) throw new DeviceError("Failed setting read-only attribute", errnoHint(-r));
  } else if (r < 0) {
    throw new DeviceError("Failed setting flags", errnoHint(-r));
  }
}

function setSockHint(device: string, err: number): string {
  if (err === Errno.ENOTTY || err === Errno.EINVAL) {
    return `(${device} is not an NBD device: ${strerror(err)})`;
  }
  return deviceHint(device, err) ?? errnoHint(err);
}

function errnoHint(err: number): string {
  return `(${strerror(err)})`;
}

/**
 * qemu's nbd_client: NBD_DO_IT serves the device until it is disconnected (or its socket
 * closes), then the queue and socket are cleared. True when NBD_DO_IT ended without an error.
 */
export async function runDevice(ops: NbdDeviceOps, deviceFd: number): Promise<boolean> {
  const r = await ops.doIt(deviceFd);
  ops.ioctl(deviceFd, NBD_CLEAR_QUE, 0);
  ops.ioctl(deviceFd, NBD_CLEAR_SOCK, 0);
  return r >= 0;
}

/**
 * qemu's nbd_disconnect (-d): errors are ignored, as qemu-nbd ignores them (the device may not be
 * connected at all). Throws only when the device cannot be opened.
 */
export function disconnectDevice(ops: NbdDeviceOps, path: string): void {
  const fd = ops.open(path);
  if (fd < 0) throw new DeviceError(`Cannot open ${path}: ${strerror(-fd)}`, deviceHint(path, -fd));
  try {
    ops.ioctl(fd, NBD_CLEAR_QUE, 0);
    ops.ioctl(fd, NBD_DISCONNECT, 0);
    ops.ioctl(fd, NBD_CLEAR_SOCK, 0);
  } finally {
    ops.close(fd);
  }
}
