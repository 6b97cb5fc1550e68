/**
 * Where the server listens, as socket addresses: unix paths, TCP host/port pairs resolved with
 * getaddrinfo(3) (every address a name resolves to, as qemu-nbd listens on each), and an
 * inherited descriptor for socket activation. Encoding of `struct sockaddr_*` lives here only.
 *
 * @module
 */

import {
  AF_INET,
  AF_INET6,
  AF_UNIX,
  AF_UNSPEC,
  AI_PASSIVE,
  sock,
  SOCK_STREAM,
} from "../../ffi/socket.ts";
import { cString } from "../../ffi/libc.ts";

/** A server's address as -k or -b/-p name it (what a client connects to). */
export type ServerAddress =
  | { readonly transport: "tcp"; readonly hostname: string; readonly port: number }
  | { readonly transport: "unix"; readonly path: string };

/** Where to listen: a server address, or (socket activation) an inherited listening socket. */
export type ListenAddress = ServerAddress | { readonly transport: "fd"; readonly fd: number };

/** One concrete socket address: its family and the bytes of its struct sockaddr. */
export interface SockAddr {
  readonly family: number;
  readonly bytes: Uint8Array<ArrayBuffer>;
}

/** sun_path's size in struct sockaddr_un. */
const UNIX_PATH_MAX = 108;

/** struct sockaddr_un for `path`; undefined when the path does not fit. */
export function unixSockAddr(path: string): SockAddr | undefined {
  const name = new TextEncoder().encode(path);
  if (name.length >= UNIX_PATH_MAX) return undefined;
  const bytes = new Uint8Array(2 + UNIX_PATH_MAX);
  new DataView(bytes.buffer).setUint16(0, AF_UNIX, true);
  bytes.set(name, 2);
  return { family: AF_UNIX, bytes };
}

/** A failed name lookup, with getaddrinfo's own words. */
export class ResolveError extends Error {
  constructor(host: string, port: number, why: string) {
    super(`address resolution failed for ${host}:${port}: ${why}`);
    this.name = "ResolveError";
  }
}

/** Every stream address `host` resolves to (numeric forms included), in resolver order. */
export function resolveTcp(host: string, port: number): SockAddr[] {
  const s = sock();
  // struct addrinfo (x86_64): flags @0, family @4, socktype @8, protocol @12, addrlen @16,
  // addr @24, canonname @32, next @40.
  const hints = new Uint8Array(48);
  const hv = new DataView(hints.buffer);
  hv.setInt32(0, AI_PASSIVE, true);
  hv.setInt32(4, AF_UNSPEC, true);
  hv.setInt32(8, SOCK_STREAM, true);
  const result = new BigUint64Array(1);
  const rc = s.getaddrinfo(
    cString(host),
    cString(String(port)),
    hints,
    new Uint8Array(result.buffer),
  );
  if (rc !== 0) {
    const msg = s.gai_strerror(rc);
    throw new ResolveError(host, port, msg ? Deno.UnsafePointerView.getCString(msg) : `${rc}`);
  }
  const out: SockAddr[] = [];
  const head = Deno.UnsafePointer.create(result[0]!);
  try {
    let p = head;
    for (let i = 0; p !== null && i < 64; i++) {
      const v = new Deno.UnsafePointerView(p);
      const family = v.getInt32(4);
      const len = v.getUint32(16);
      const addr = v.getPointer(24);
      if ((family === AF_INET || family === AF_INET6) && addr !== null) {
        const bytes = new Uint8Array(len);
        Deno.UnsafePointerView.copyInto(addr, bytes);
        if (!out.some((a) => sameBytes(a.bytes, bytes))) out.push({ family, bytes });
      }
      p = v.getPointer(40);
    }
  } finally {
    s.freeaddrinfo(head);
  }
  return out;
}

/** The port a bound TCP socket address carries. */
export function portOf(addr: Uint8Array): number {
  return new DataView(addr.buffer, addr.byteOffset).getUint16(2, false);
}

/** "127.0.0.1:10809" or "[::1]:10809" for a TCP socket address. */
export function formatSockAddr(addr: SockAddr): string {
  const b = addr.bytes;
  if (addr.family === AF_INET) return `${b[4]}.${b[5]}.${b[6]}.${b[7]}:${portOf(b)}`;
  if (addr.family === AF_INET6) {
    const v = new DataView(b.buffer, b.byteOffset);
    const words: string[] = [];
    for (let i = 0; i < 8; i++) words.push(v.getUint16(8 + 2 * i, false).toString(16));
    return `[${words.join(":").replace(/(^|:)0(:0)+(:|$)/, "::")}]:${portOf(b)}`;
  }
  const end = b.indexOf(0, 2);
  return new TextDecoder().decode(b.subarray(2, end < 0 ? b.length : end));
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
