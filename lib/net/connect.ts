/**
 * Client sockets through FFI: a non-blocking connect to a unix path or to each address a TCP
 * name resolves to, waited for in a readiness loop. Clients that run TLS need the descriptor
 * (GnuTLS reads and writes it), which Deno.connect does not give.
 *
 * @module
 */

import { errno, strerror } from "../../ffi/libc.ts";
import {
  closeSocket,
  EINPROGRESS,
  getIntOption,
  openSocket,
  SO_ERROR,
  sock,
  SOL_SOCKET,
} from "../../ffi/socket.ts";
import { resolveTcp, type ServerAddress, type SockAddr, unixSockAddr } from "./address.ts";
import { POLLOUT, type ReadinessLoop } from "./readiness.ts";

/** qemu's words for a refused connect. */
function connectError(err: number, what: string): Error {
  return new Error(`Failed to connect to '${what}': ${strerror(err)}`);
}

async function connectOne(addr: SockAddr, loop: ReadinessLoop, what: string): Promise<number> {
  const fd = openSocket(addr.family);
  try {
    if (sock().connect(fd, addr.bytes, addr.bytes.length) !== 0) {
      const err = errno();
      if (err !== EINPROGRESS) throw connectError(err, what);
      await loop.wait(fd, POLLOUT);
      const soErr = getIntOption(fd, SOL_SOCKET, SO_ERROR);
      if (soErr !== 0) throw connectError(soErr, what);
    }
    return fd;
  } catch (e) {
    closeSocket(fd);
    throw e;
  }
}

/** A connected non-blocking socket to `address` (the first TCP address that answers). */
export async function connectSocket(address: ServerAddress, loop: ReadinessLoop): Promise<number> {
  if (address.transport === "unix") {
    const addr = unixSockAddr(address.path);
    if (addr === undefined) throw new Error(`UNIX socket path '${address.path}' is too long`);
    return await connectOne(addr, loop, address.path);
  }
  const what = `${address.hostname}:${address.port}`;
  let last: unknown = new Error(`Failed to connect to '${what}'`);
  for (const addr of resolveTcp(address.hostname, address.port)) {
    try {
      return await connectOne(addr, loop, what);
    } catch (e) {
      last = e;
    }
  }
  throw last;
}
