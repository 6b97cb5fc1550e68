/**
 * Listening sockets as descriptors: a unix socket, every address a TCP host name resolves to
 * (qemu-nbd listens on each, IPv6 ones with IPV6_V6ONLY so both families can share a port), or
 * the descriptor socket activation hands over. Bind failures carry qemu-nbd's wording.
 *
 * @module
 */

import {
  AF_INET6,
  EADDRINUSE,
  getIntOption,
  IPPROTO_IPV6,
  IPV6_V6ONLY,
  makeNonBlocking,
  openSocket,
  setIntOption,
  SO_ACCEPTCONN,
  SO_REUSEADDR,
  sock,
  SocketError,
  SOL_SOCKET,
} from "../../ffi/socket.ts";
import { errno, libc, strerror } from "../../ffi/libc.ts";
import { type ListenAddress, portOf, resolveTcp, type SockAddr, unixSockAddr } from "./address.ts";

/** The listen backlog qemu-nbd asks for (SOMAXCONN: 4096 on current kernels; ss shows it). */
const BACKLOG = 4096;

/** A listening socket: its descriptor and what it is bound to. */
export interface ListenSocket {
  readonly fd: number;
  readonly tcp: boolean;
  /** The bound port for TCP (the real one when 0 was asked), else 0. */
  readonly port: number;
}

/**
 * Binding failed, in qemu-nbd's words: "Failed to bind socket to PATH: REASON" for a unix
 * socket, "Failed to find an available port: REASON" for TCP.
 */
export class BindError extends Error {
  readonly errno: number;
  constructor(where: string | undefined, err: number) {
    super(
      where === undefined
        ? `Failed to find an available port: ${strerror(err)}`
        : `Failed to bind socket to ${where}: ${strerror(err)}`,
    );
    this.name = "BindError";
    this.errno = err;
  }
  /** Whether the address was taken (EADDRINUSE). */
  get inUse(): boolean {
    return this.errno === EADDRINUSE;
  }
}

/** Remove the unix socket file at `path`, but only if it is a socket (never throws). */
export function removeSocketFile(path: string): void {
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch { /* does not exist */ }
}

/** Open the listening sockets for `address`; throws a BindError or SocketError. */
export function listenOn(address: ListenAddress): ListenSocket[] {
  switch (address.transport) {
    case "unix": {
      const addr = unixSockAddr(address.path);
      if (addr === undefined) {
        throw new Error(
          `UNIX socket path '${address.path}' is too long\nPath must be less than 108 bytes`,
        );
      }
      return [bindAndListen(addr, address.path, false)];
    }
    case "tcp": {
      const addrs = resolveTcp(address.hostname, address.port);
      const where = `${address.hostname}:${address.port}`;
      const out: ListenSocket[] = [];
      let first: unknown;
      for (const a of addrs) {
        try {
          out.push(bindAndListen(a, where, true));
        } catch (e) {
          first ??= e;
        }
      }
      if (out.length === 0) throw first ?? new Error(`No addresses found for ${where}`);
      return out;
    }
    case "fd":
      return [adopt(address.fd)];
  }
}

function bindAndListen(addr: SockAddr, where: string, tcp: boolean): ListenSocket {
  const fd = openSocket(addr.family);
  try {
    if (tcp) setIntOption(fd, SOL_SOCKET, SO_REUSEADDR, 1);
    if (addr.family === AF_INET6) setIntOption(fd, IPPROTO_IPV6, IPV6_V6ONLY, 1);
    const s = sock();
    if (s.bind(fd, addr.bytes, addr.bytes.length) !== 0) {
      throw new BindError(tcp ? undefined : where, errno());
    }
    if (s.listen(fd, BACKLOG) !== 0) throw new SocketError(errno(), `listen on ${where}`);
    return { fd, tcp, port: tcp ? boundPort(fd) : 0 };
  } catch (e) {
    libc().close(fd);
    throw e;
  }
}

/** Socket activation: the inherited descriptor must be a listening socket. */
function adopt(fd: number): ListenSocket {
  let listening: number;
  try {
    listening = getIntOption(fd, SOL_SOCKET, SO_ACCEPTCONN);
  } catch (e) {
    throw new Error(
      `socket activation: descriptor ${fd} is not a socket (${(e as Error).message})`,
    );
  }
  if (!listening) throw new Error(`socket activation: descriptor ${fd} is not listening`);
  makeNonBlocking(fd);
  const addr = new Uint8Array(128);
  const len = new Uint32Array([128]);
  const ok = sock().getsockname(fd, addr, new Uint8Array(len.buffer)) === 0;
  const family = ok ? new DataView(addr.buffer).getUint16(0, true) : 0;
  const tcp = family === 2 || family === AF_INET6;
  return { fd, tcp, port: tcp ? portOf(addr) : 0 };
}

function boundPort(fd: number): number {
  const addr = new Uint8Array(128);
  const len = new Uint32Array([128]);
  if (sock().getsockname(fd, addr, new Uint8Array(len.buffer)) !== 0) return 0;
  return portOf(addr);
}
