/**
 * The Linux NBD driver's generic-netlink interface (<linux/nbd-netlink.h>), which qemu-nbd does
 * not use: one NBD_CMD_CONNECT hands the kernel several sockets at once (it then spreads requests
 * over them, for servers that advertise CAN_MULTI_CONN) and can set a dead-connection timeout;
 * no thread has to sit in NBD_DO_IT. Messages are encoded and decoded here; the socket is behind
 * {@link NetlinkChannel} so the exchange can be tested without the module.
 *
 * @module
 */

import { errno, libc } from "./libc.ts";
import { sock } from "./socket.ts";

const AF_NETLINK = 16;
const NETLINK_GENERIC = 16;
const SOCK_RAW = 3;
const SOCK_CLOEXEC = 0o2000000;
const MSG_DONTWAIT = 0x40;

const NLM_F_REQUEST = 1;
const NLM_F_ACK = 4;
const NLMSG_ERROR = 2;
const NLMSG_DONE = 3;
const NLA_F_NESTED = 0x8000;

const GENL_ID_CTRL = 0x10;
const CTRL_CMD_GETFAMILY = 3;
const CTRL_ATTR_FAMILY_ID = 1;
const CTRL_ATTR_FAMILY_NAME = 2;

const NBD_GENL_VERSION = 1;
export const NBD_CMD_CONNECT = 1;
export const NBD_CMD_DISCONNECT = 2;
export const NBD_ATTR_INDEX = 1;
export const NBD_ATTR_SIZE_BYTES = 2;
export const NBD_ATTR_BLOCK_SIZE_BYTES = 3;
export const NBD_ATTR_TIMEOUT = 4;
export const NBD_ATTR_SERVER_FLAGS = 5;
export const NBD_ATTR_SOCKETS = 7;
export const NBD_ATTR_DEAD_CONN_TIMEOUT = 8;
export const NBD_SOCK_ITEM = 1;
export const NBD_SOCK_FD = 1;

/** One request/reply exchange with the kernel's netlink. */
export interface NetlinkChannel {
  /** Send one message; the kernel's replies are queued by the time this returns. */
  send(msg: Uint8Array): void;
  /** The next queued datagram, or undefined when none is. */
  recv(): Uint8Array | undefined;
  close(): void;
}

/** A netlink failure: `errno` is the kernel's error (positive). */
export class NetlinkError extends Error {
  override name = "NetlinkError";
  readonly errno: number;
  constructor(errno: number, message: string) {
    super(message);
    this.errno = errno;
  }
}

/** An attribute: a number is a u32 (or u64 with `wide`), a string is NUL-terminated. */
type Attr =
  | { readonly type: number; readonly u32: number }
  | { readonly type: number; readonly u64: number }
  | { readonly type: number; readonly str: string }
  | { readonly type: number; readonly nested: readonly Attr[] };

function attrBytes(a: Attr): Uint8Array {
  let payload: Uint8Array;
  let type = a.type;
  if ("u32" in a) {
    payload = new Uint8Array(4);
    new DataView(payload.buffer).setUint32(0, a.u32, true);
  } else if ("u64" in a) {
    payload = new Uint8Array(8);
    new DataView(payload.buffer).setBigUint64(0, BigInt(a.u64), true);
  } else if ("str" in a) {
    payload = new TextEncoder().encode(a.str + "\0");
  } else {
    payload = concat(a.nested.map(attrBytes));
    type |= NLA_F_NESTED;
  }
  const len = 4 + payload.length;
  const out = new Uint8Array(align4(len));
  const v = new DataView(out.buffer);
  v.setUint16(0, len, true);
  v.setUint16(2, type, true);
  out.set(payload, 4);
  return out;
}

function align4(n: number): number {
  return (n + 3) & ~3;
}

function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A generic-netlink request: nlmsghdr, genlmsghdr, attributes. */
export function genlMessage(
  family: number,
  cmd: number,
  version: number,
  seq: number,
  attrs: readonly Attr[],
): Uint8Array {
  const body = concat(attrs.map(attrBytes));
  const out = new Uint8Array(16 + 4 + body.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, out.length, true);
  v.setUint16(4, family, true);
  v.setUint16(6, NLM_F_REQUEST | NLM_F_ACK, true);
  v.setUint32(8, seq, true);
  v.setUint32(12, 0, true);
  out[16] = cmd;
  out[17] = version;
  out.set(body, 20);
  return out;
}

/** The top-level attributes of a generic-netlink message (after its two headers). */
export function parseAttrs(msg: Uint8Array, offset = 20): Map<number, Uint8Array> {
  const attrs = new Map<number, Uint8Array>();
  const v = new DataView(msg.buffer, msg.byteOffset, msg.byteLength);
  const end = Math.min(msg.length, v.getUint32(0, true));
  for (let at = offset; at + 4 <= end;) {
    const len = v.getUint16(at, true);
    if (len < 4 || at + len > end) break;
    attrs.set(v.getUint16(at + 2, true) & ~NLA_F_NESTED, msg.subarray(at + 4, at + len));
    at += align4(len);
  }
  return attrs;
}

/**
 * Send `msg` and collect the replies up to its acknowledgement: the data messages, or a
 * NetlinkError with the kernel's errno.
 */
function exchange(ch: NetlinkChannel, msg: Uint8Array, what: string): Uint8Array[] {
  ch.send(msg);
  const seq = new DataView(msg.buffer, msg.byteOffset).getUint32(8, true);
  const replies: Uint8Array[] = [];
  for (let i = 0; i < 64; i++) {
    const dgram = ch.recv();
    if (dgram === undefined) throw new NetlinkError(0, `${what}: no reply from the kernel`);
    // A datagram may hold several messages.
    for (let at = 0; at + 16 <= dgram.length;) {
      const v = new DataView(dgram.buffer, dgram.byteOffset + at);
      const len = v.getUint32(0, true);
      if (len < 16 || at + len > dgram.length) break;
      const m = dgram.subarray(at, at + len);
      at += align4(len);
      if (v.getUint32(8, true) !== seq) continue;
      const type = v.getUint16(4, true);
      if (type === NLMSG_ERROR) {
        const err = -v.getInt32(16, true);
        if (err === 0) return replies;
        throw new NetlinkError(err, what);
      }
      if (type === NLMSG_DONE) return replies;
      replies.push(m);
    }
  }
  throw new NetlinkError(0, `${what}: no acknowledgement from the kernel`);
}

/** The id of the "nbd" generic-netlink family (the module registers it). */
export function nbdFamily(ch: NetlinkChannel): number {
  const replies = exchange(
    ch,
    genlMessage(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, 1, [{
      type: CTRL_ATTR_FAMILY_NAME,
      str: "nbd",
    }]),
    "looking up the nbd netlink family",
  );
  for (const r of replies) {
    const id = parseAttrs(r).get(CTRL_ATTR_FAMILY_ID);
    if (id !== undefined && id.length >= 2) return id[0]! | (id[1]! << 8);
  }
  throw new NetlinkError(0, "the kernel did not name the nbd netlink family");
}

/** What NBD_CMD_CONNECT tells the kernel. */
export interface NetlinkConnect {
  /** Device index (N of /dev/nbdN). */
  readonly index: number;
  readonly sockets: readonly number[];
  readonly size: number;
  readonly blockSize: number;
  /** Transmission flags from the server. */
  readonly flags: number;
  /** Seconds before a request times out (0: the kernel's default). */
  readonly timeout?: number;
  /** Seconds to wait for a dead connection to be replaced before failing I/O (0: none). */
  readonly deadConnTimeout?: number;
}

/** The attributes of an NBD_CMD_CONNECT. */
export function connectAttrs(c: NetlinkConnect): Attr[] {
  const attrs: Attr[] = [
    { type: NBD_ATTR_INDEX, u32: c.index },
    { type: NBD_ATTR_SIZE_BYTES, u64: c.size },
    { type: NBD_ATTR_BLOCK_SIZE_BYTES, u64: c.blockSize },
    { type: NBD_ATTR_SERVER_FLAGS, u64: c.flags },
  ];
  if (c.timeout) attrs.push({ type: NBD_ATTR_TIMEOUT, u64: c.timeout });
  if (c.deadConnTimeout) attrs.push({ type: NBD_ATTR_DEAD_CONN_TIMEOUT, u64: c.deadConnTimeout });
  attrs.push({
    type: NBD_ATTR_SOCKETS,
    nested: c.sockets.map((fd) => ({
      type: NBD_SOCK_ITEM,
      nested: [{ type: NBD_SOCK_FD, u32: fd }],
    })),
  });
  return attrs;
}

/** NBD_CMD_CONNECT: the device is live when this returns. */
export function netlinkConnect(ch: NetlinkChannel, c: NetlinkConnect): void {
  const family = nbdFamily(ch);
  exchange(
    ch,
    genlMessage(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, 2, connectAttrs(c)),
    "connect",
  );
}

/** A netlink socket to the kernel's generic netlink. */
export function openNetlink(): NetlinkChannel {
  const s = sock();
  const fd = s.socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
  if (fd < 0) throw new NetlinkError(errno(), "netlink socket");
  const buf = new Uint8Array(65536);
  return {
    send(msg) {
      if (Number(s.send(fd, msg, BigInt(msg.length), 0)) !== msg.length) {
        throw new NetlinkError(errno(), "netlink send");
      }
    },
    recv() {
      const n = Number(s.recv(fd, buf, BigInt(buf.length), MSG_DONTWAIT));
      return n > 0 ? buf.slice(0, n) : undefined;
    },
    close() {
      libc().close(fd);
    },
  };
}
