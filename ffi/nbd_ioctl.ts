/**
 * The Linux NBD driver's ioctl interface (<linux/nbd.h>), behind a small interface so the
 * sequence qemu-nbd runs (lib/kernel/nbd_device.ts) can be tested against a recording fake on a
 * machine without the nbd module.
 *
 * @module
 */

import { cString, errno, libc, O_CLOEXEC, O_RDWR } from "./libc.ts";

// _IO(0xab, n)
export const NBD_SET_SOCK = 0xab00;
export const NBD_SET_BLKSIZE = 0xab01;
export const NBD_DO_IT = 0xab03;
export const NBD_CLEAR_SOCK = 0xab04;
export const NBD_CLEAR_QUE = 0xab05;
export const NBD_SET_SIZE_BLOCKS = 0xab07;
export const NBD_DISCONNECT = 0xab08;
export const NBD_SET_TIMEOUT = 0xab09;
export const NBD_SET_FLAGS = 0xab0a;
/** <linux/fs.h> BLKROSET, _IO(0x12, 93): its argument points to an int. */
export const BLKROSET = 0x125d;
/** BLKRRPART, _IO(0x12, 95): reread the partition table. */
export const BLKRRPART = 0x125f;

/** How long a partition rescan waits for NBD_DO_IT to make the device live. */
const RESCAN_WAIT_MS = 10_000;

/** What the device code needs from the kernel; every call is one system call. */
export interface NbdDeviceOps {
  /** open(path, O_RDWR): the descriptor, or -errno. */
  open(path: string): number;
  /** ioctl(fd, request, arg) with an integer argument: 0 (or the result), or -errno. */
  ioctl(fd: number, request: number, arg: number): number;
  /** ioctl(fd, BLKROSET, &value): 0 or -errno. */
  setReadOnly(fd: number, value: boolean): number;
  /**
   * NBD_DO_IT on a thread of its own (it returns when the device is disconnected): 0, or a
   * negative number when it failed (errno is not readable after a call on another thread).
   */
  doIt(fd: number): Promise<number>;
  /**
   * Once the device is live (its /sys/block/NAME/pid exists, at most RESCAN_WAIT_MS), open() and
   * close() it on another thread: the kernel rescans the partitions of a device NBD_DO_IT
   * started. `reread` also asks for it (BLKRRPART), for a device bound over netlink.
   */
  rescan(path: string, reread?: boolean): Promise<void>;
  close(fd: number): void;
}

/** The real kernel through libc. */
export function systemNbdOps(): NbdDeviceOps {
  const c = libc();
  return {
    open(path) {
      const fd = c.open(cString(path), O_RDWR | O_CLOEXEC, 0);
      return fd < 0 ? -errno() : fd;
    },
    ioctl(fd, request, arg) {
      const r = c.ioctl(fd, BigInt(request), BigInt(arg));
      return r < 0 ? -errno() : r;
    },
    setReadOnly(fd, value) {
      const v = new Int32Array([value ? 1 : 0]);
      const r = c.ioctl(fd, BigInt(BLKROSET), Deno.UnsafePointer.value(Deno.UnsafePointer.of(v)));
      return r < 0 ? -errno() : r;
    },
    async doIt(fd) {
      return await c.ioctl_nb(fd, BigInt(NBD_DO_IT), 0n);
    },
    async rescan(path, reread) {
      const pidFile = `/sys/block/${path.slice(path.lastIndexOf("/") + 1)}/pid`;
      for (const end = Date.now() + RESCAN_WAIT_MS; Date.now() < end;) {
        try {
          Deno.statSync(pidFile);
          break;
        } catch {
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
      }
      const fd = await c.open_nb(cString(path), O_RDWR | O_CLOEXEC, 0);
      if (fd < 0) return;
      if (reread) await c.ioctl_nb(fd, BigInt(BLKRRPART), 0n);
      c.close(fd);
    },
    close(fd) {
      c.close(fd);
    },
  };
}
