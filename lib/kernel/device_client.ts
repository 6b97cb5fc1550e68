/**
 * `-c /dev/nbdN`: what qemu-nbd's client thread does once the server listens. Connect to our own
 * socket, negotiate as qemu's client does for the kernel (no structured replies: the kernel
 * understands only simple ones; no block-size request), hand the socket to the device, and keep
 * NBD_DO_IT running on a thread of Deno's blocking pool while this thread serves the requests the
 * kernel sends back through that socket.
 *
 * @module
 */

import { type NbdDeviceOps, systemNbdOps } from "../../ffi/nbd_ioctl.ts";
import { closeSocket } from "../../ffi/socket.ts";
import { libc, strerror } from "../../ffi/libc.ts";
import { negotiate, OptionClient } from "../nbd/client.ts";
import { connectSocket } from "../net/connect.ts";
import { FdConn } from "../net/fd_conn.ts";
import type { ReadinessLoop } from "../net/readiness.ts";
import { bindDevice, DeviceError, deviceHint, openDevice, runDevice } from "./nbd_device.ts";
import { Errno } from "../errors.ts";
import {
  type NetlinkChannel,
  netlinkConnect,
  NetlinkError,
  openNetlink,
} from "../../ffi/nbd_netlink.ts";

import { NBD_FLAG_CAN_MULTI_CONN } from "../nbd/constants.ts";

export interface DeviceClientOptions {
  /** The device to bind (`-c`). */
  readonly device: string;
  /** The unix socket our server listens on. */
  readonly socket: string;
  /** The loop the connection waits in while it negotiates. */
  readonly loop: ReadinessLoop;
  /** The kernel's ioctls (a recording fake in tests). */
  readonly ops?: NbdDeviceOps;
  /** Bind over netlink with this many connections instead of the ioctls (denbd's option). */
  readonly connections?: number;
  /** Netlink's dead-connection timeout in seconds. */
  readonly deadConnTimeout?: number;
  /** The netlink socket (a fake in tests). */
  readonly netlink?: () => NetlinkChannel;
}

/**
 * A bound device. With the ioctls, `done` resolves when NBD_DO_IT returns (true: it ended
 * cleanly); a netlink device has no such thread, and `done` is undefined: the server ends when
 * the kernel closes the connections.
 */
export interface AttachedDevice {
  readonly done: Promise<boolean> | undefined;
}

/**
 * Bind the device to the server on `socket`. Throws (NbdHandshakeError, DeviceError, a connect
 * error) with qemu-nbd's words when any step before NBD_DO_IT fails; everything opened is closed.
 */
export async function attachDevice(o: DeviceClientOptions): Promise<AttachedDevice> {
  const ops = o.ops ?? systemNbdOps();
  if (o.connections !== undefined) return await attachNetlink(o, ops);
  const sockFd = await connectSocket({ transport: "unix", path: o.socket }, o.loop);
  let deviceFd = -1;
  try {
    const conn = new FdConn(sockFd, o.loop);
    const info = await negotiate(new OptionClient(conn), {
      structuredReply: false,
      requestBlockSize: false,
    });
    // From here on the kernel reads and writes the socket; this thread must not wait on it.
    o.loop.forget(sockFd);
    deviceFd = openDevice(ops, o.device);
    bindDevice(ops, deviceFd, o.device, sockFd, info);
  } catch (e) {
    if (deviceFd >= 0) ops.close(deviceFd);
    closeSocket(sockFd);
    throw e;
  }
  const serving = runDevice(ops, deviceFd);
  // Partitions appear once the device is live and opened again (qemu's show_parts thread);
  // the open waits for the partition table, which this process serves, so it runs elsewhere.
  const ended = await Promise.race([
    ops.rescan(o.device).then(() => false),
    serving.then(() => true),
  ]);
  const done = serving.then((ok) => {
    ops.close(deviceFd);
    closeSocket(sockFd);
    return ok;
  });
  if (ended) await done;
  return { done };
}

/** close(2) without shutdown: the kernel keeps using the socket. */
function closeFd(fd: number): void {
  libc().close(fd);
}

/** /dev/nbdN → N. */
function deviceIndex(device: string): number {
  const m = /^\/dev\/nbd(\d+)$/.exec(device);
  if (m === null) throw new DeviceError(`--connections needs a /dev/nbdN device, not '${device}'`);
  return Number(m[1]);
}

/** --connections: negotiate N sockets and hand them all to the kernel in one NBD_CMD_CONNECT. */
async function attachNetlink(o: DeviceClientOptions, ops: NbdDeviceOps): Promise<AttachedDevice> {
  const index = deviceIndex(o.device);
  const sockets: number[] = [];
  try {
    let flags = 0;
    let size = 0;
    let minBlock = 0;
    for (let i = 0; i < o.connections!; i++) {
      const fd = await connectSocket({ transport: "unix", path: o.socket }, o.loop);
      sockets.push(fd);
      const info = await negotiate(new OptionClient(new FdConn(fd, o.loop)), {
        structuredReply: false,
        requestBlockSize: false,
      });
      o.loop.forget(fd);
      ({ flags, size, minBlock } = info);
    }
    if (sockets.length > 1 && (flags & NBD_FLAG_CAN_MULTI_CONN) === 0) {
      throw new DeviceError(
        "the server does not allow several connections (no NBD_FLAG_CAN_MULTI_CONN)",
        "(serve with -e 0, or -e N with N at least --connections)",
      );
    }
    const ch = (o.netlink ?? openNetlink)();
    try {
      netlinkConnect(ch, {
        index,
        sockets,
        size,
        blockSize: Math.max(512, minBlock),
        flags,
        deadConnTimeout: o.deadConnTimeout,
      });
    } catch (e) {
      if (!(e instanceof NetlinkError)) throw e;
      const why = e.errno === 0 ? e.message : strerror(e.errno);
      throw new DeviceError(
        `Failed to connect ${o.device} over netlink: ${why}`,
        // No reply at all (errno 0) is the missing "nbd" family: the module is not loaded.
        deviceHint(o.device, e.errno === 0 ? Errno.ENOENT : e.errno),
      );
    } finally {
      ch.close();
    }
  } catch (e) {
    for (const fd of sockets) closeSocket(fd);
    throw e;
  }
  // The kernel holds its own references to the sockets now.
  for (const fd of sockets) closeFd(fd);
  await ops.rescan(o.device, true);
  return { done: undefined };
}
