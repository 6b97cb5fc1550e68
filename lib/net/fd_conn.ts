/**
 * One connection as a non-blocking socket descriptor: the byte stream the NBD session reads and
 * writes (lib/nbd/conn_io.ts's ByteConn), plus `sendFile` for zero-copy read replies. Every call
 * first tries the socket without waiting and only then waits in the thread's readiness loop, so
 * a request whose bytes are already there costs one recv(2).
 *
 * @module
 */

import {
  closeSocket,
  IPPROTO_TCP,
  setIntOption,
  TCP_NODELAY,
  tryRecv,
  trySend,
  trySendfile,
} from "../../ffi/socket.ts";
import type { ByteConn } from "../nbd/conn_io.ts";
import { POLLIN, POLLOUT, type ReadinessLoop } from "./readiness.ts";

/** A connected socket owned by this thread. */
export class FdConn implements ByteConn {
  readonly fd: number;
  readonly #loop: ReadinessLoop;
  #closed = false;

  constructor(fd: number, loop: ReadinessLoop, options: { readonly tcp?: boolean } = {}) {
    this.fd = fd;
    this.#loop = loop;
    if (options.tcp) {
      try {
        setIntOption(fd, IPPROTO_TCP, TCP_NODELAY, 1);
      } catch { /* not TCP after all */ }
    }
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Bytes read into `p`, or null at end of stream (or once closed). */
  async read(p: Uint8Array): Promise<number | null> {
    for (;;) {
      if (this.#closed) return null;
      const n = tryRecv(this.fd, p);
      if (n > 0) return n;
      if (n === 0) return null;
      await this.#loop.wait(this.fd, POLLIN);
    }
  }

  /** Bytes written from `p` (at least one). */
  async write(p: Uint8Array): Promise<number> {
    for (;;) {
      if (this.#closed) throw new Deno.errors.BrokenPipe("connection closed");
      const n = trySend(this.fd, p);
      if (n > 0) return n;
      await this.#loop.wait(this.fd, POLLOUT);
    }
  }

  /**
   * Send `header` and then `length` bytes of `fileFd` at `offset` straight from the page cache
   * (sendfile(2)); bytes past the end of the file go out as zeroes, as a read of them returns.
   */
  async sendFile(
    header: Uint8Array,
    fileFd: number,
    offset: number,
    length: number,
  ): Promise<void> {
    let done = 0;
    while (done < header.length) {
      if (this.#closed) throw new Deno.errors.BrokenPipe("connection closed");
      const n = trySend(this.fd, done === 0 ? header : header.subarray(done), true);
      if (n > 0) done += n;
      else await this.#loop.wait(this.fd, POLLOUT);
    }
    let sent = 0;
    while (sent < length) {
      if (this.#closed) throw new Deno.errors.BrokenPipe("connection closed");
      const n = trySendfile(this.fd, fileFd, offset + sent, length - sent);
      if (n > 0) sent += n;
      else if (n === 0) break; // end of file
      else await this.#loop.wait(this.fd, POLLOUT);
    }
    if (sent < length) await writeZeroes(this, length - sent);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#loop.forget(this.fd);
    closeSocket(this.fd);
  }
}

const ZEROES = new Uint8Array(64 * 1024);

async function writeZeroes(conn: FdConn, n: number): Promise<void> {
  while (n > 0) {
    n -= await conn.write(ZEROES.subarray(0, Math.min(n, ZEROES.length)));
  }
}
