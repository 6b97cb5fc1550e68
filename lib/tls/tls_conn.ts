/**
 * One TLS connection over a non-blocking socket descriptor: the byte stream (ByteConn) the NBD
 * session and client read and write once STARTTLS succeeded, so neither knows whether it is
 * encrypted. GnuTLS reads and writes the descriptor itself; when it would block, the thread's
 * readiness loop waits for the direction GnuTLS asks for.
 *
 * Closing does not send TLS's close_notify: qemu 7.2 just closes the socket, and what its
 * clients print after a refusal ("Software caused connection abort") depends on that.
 *
 * @module
 */

import {
  allocate,
  cstr,
  gnutls,
  GNUTLS_CERT_REQUEST,
  GNUTLS_CLIENT,
  GNUTLS_CRD_CERTIFICATE,
  GNUTLS_E_AGAIN,
  GNUTLS_E_INTERRUPTED,
  GNUTLS_E_PREMATURE_TERMINATION,
  GNUTLS_NO_SIGNAL,
  GNUTLS_NONBLOCK,
  GNUTLS_SERVER,
  gnutlsError,
} from "../../ffi/gnutls.ts";
import type { ByteConn } from "../nbd/conn_io.ts";
import { tryRecv } from "../../ffi/socket.ts";
import { POLLIN, POLLOUT, type ReadinessLoop } from "../net/readiness.ts";
import type { TlsCredentials } from "./creds.ts";
import { checkPeerCertificate, TlsCheckError } from "./x509_check.ts";

/** The descriptor-level connection TLS runs over (lib/net/fd_conn.ts's FdConn). */
export interface FdStream extends ByteConn {
  readonly fd: number;
  readonly closed: boolean;
}

/** A TLS failure with qemu's words for it (handshake, peer check or channel I/O). */
export class TlsError extends Error {
  override name = "TlsError";
}

/** What a TLS session is set up with. */
export interface TlsSetup {
  readonly creds: TlsCredentials;
  /** Client side: the name the server's certificate must carry (qemu's tls-hostname). */
  readonly hostname?: string;
  /** Server side: called with the client certificate's DN; throws TlsError to refuse. */
  readonly authorize?: (dn: string) => void;
}

/** Plaintext bytes written per call before control returns to the caller's loop. */
const WRITE_BURST = 1024 * 1024;

export class TlsConn implements ByteConn {
  readonly #under: FdStream;
  readonly #loop: ReadinessLoop;
  readonly #fd: number;
  #session: Deno.PointerValue;
  #closed = false;
  /** The client certificate's DN when the peer was checked. */
  peerName: string | undefined;

  private constructor(under: FdStream, loop: ReadinessLoop, session: Deno.PointerValue) {
    this.#under = under;
    this.#loop = loop;
    this.#fd = under.fd;
    this.#session = session;
  }

  /**
   * Start TLS on `under` as `role` and run the handshake and the peer checks. On failure the
   * session is released and a TlsError says why; `under` stays open for the caller to close.
   */
  static async start(
    under: FdStream,
    loop: ReadinessLoop,
    role: "server" | "client",
    setup: TlsSetup,
  ): Promise<TlsConn> {
    const g = gnutls();
    const creds = setup.creds;
    const flags = (role === "server" ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NONBLOCK |
      GNUTLS_NO_SIGNAL;
    const session = allocate((out) => g.gnutls_init(out, flags));
    if (typeof session === "number") {
      throw new TlsError(`Cannot initialize TLS session: ${gnutlsError(session)}`);
    }
    const conn = new TlsConn(under, loop, session);
    try {
      let r = g.gnutls_priority_set_direct(session, cstr(creds.priority), null);
      if (r < 0) {
        throw new TlsError(
          `Unable to set TLS session priority ${creds.priority}: ${gnutlsError(r)}`,
        );
      }
      r = g.gnutls_credentials_set(session, creds.credType, creds.handle);
      if (r < 0) throw new TlsError(`Cannot set session credentials: ${gnutlsError(r)}`);
      if (role === "server" && creds.credType === GNUTLS_CRD_CERTIFICATE) {
        // Asked for, not enforced: the peer check below enforces it.
        g.gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUEST);
      }
      g.gnutls_transport_set_int2(session, under.fd, under.fd);
      await conn.#handshake();
      if (creds.credType === GNUTLS_CRD_CERTIFICATE && creds.spec.verifyPeer) {
        try {
          conn.peerName = checkPeerCertificate(
            session,
            setup.hostname,
            role === "client",
            setup.authorize ?? (() => {}),
          ).dn;
        } catch (e) {
          // The client sends its first option as soon as its side of the handshake is done:
          // let it arrive (briefly) and read it away, so closing ends the stream (what qemu's
          // clients report as an aborted connection) instead of resetting it under a write.
          await settle(loop, under, REFUSAL_SETTLE_MS);
          discardPending(under.fd);
          if (e instanceof TlsCheckError) throw new TlsError(e.message);
          throw e;
        }
      }
      return conn;
    } catch (e) {
      conn.#release();
      throw e;
    }
  }

  async #handshake(): Promise<void> {
    const g = gnutls();
    for (;;) {
      // Closed under it (the handshake time limit): what GnuTLS says of a stream that ends.
      if (this.#under.closed) {
        throw new TlsError(`TLS handshake failed: ${gnutlsError(GNUTLS_E_PREMATURE_TERMINATION)}`);
      }
      const r = g.gnutls_handshake(this.#session);
      if (r === 0) return;
      if (r !== GNUTLS_E_AGAIN && r !== GNUTLS_E_INTERRUPTED) {
        throw new TlsError(`TLS handshake failed: ${gnutlsError(r)}`);
      }
      await this.#waitDirection();
    }
  }

  /** Wait for what GnuTLS is blocked on: readable (0) or writable (1). */
  async #waitDirection(): Promise<void> {
    const dir = gnutls().gnutls_record_get_direction(this.#session);
    await this.#loop.wait(this.#fd, dir === 0 ? POLLIN : POLLOUT);
  }

  get closed(): boolean {
    return this.#closed || this.#under.closed;
  }

  /** Plaintext read into `p`; null at the end of the stream. */
  async read(p: Uint8Array): Promise<number | null> {
    const g = gnutls();
    for (;;) {
      if (this.closed) return null;
      let n = Number(g.gnutls_record_recv(this.#session, p, BigInt(p.length)));
      if (n > 0) {
        // Records GnuTLS already holds decrypted: hand them over in the same call.
        while (n < p.length && g.gnutls_record_check_pending(this.#session) > 0n) {
          const more = Number(
            g.gnutls_record_recv(this.#session, p.subarray(n), BigInt(p.length - n)),
          );
          if (more <= 0) break;
          n += more;
        }
        return n;
      }
      if (n === 0) return null;
      if (n === GNUTLS_E_AGAIN || n === GNUTLS_E_INTERRUPTED) {
        await this.#waitDirection();
        continue;
      }
      throw new TlsError(`Cannot read from TLS channel: ${ioReason(n)}`);
    }
  }

  /**
   * Plaintext written from `p` (at least one byte): one record per GnuTLS call, each sent at
   * once, up to WRITE_BURST. Not corked: GnuTLS's cork copies the payload into one buffer and
   * then still sends it a record at a time.
   */
  async write(p: Uint8Array): Promise<number> {
    const g = gnutls();
    const limit = Math.min(p.length, WRITE_BURST);
    let done = 0;
    for (;;) {
      if (this.closed) throw new Deno.errors.BrokenPipe("connection closed");
      const rest = p.subarray(done, limit);
      const n = Number(g.gnutls_record_send(this.#session, rest, BigInt(rest.length)));
      if (n > 0) {
        done += n;
        if (done >= limit) return done;
        continue;
      }
      if (n !== GNUTLS_E_AGAIN && n !== GNUTLS_E_INTERRUPTED) {
        throw new TlsError(`Cannot write to TLS channel: ${ioReason(n)}`);
      }
      // GnuTLS holds the record it began; the next call must offer the same bytes first, which
      // the caller's write of the rest does.
      if (done > 0) return done;
      await this.#waitDirection();
    }
  }

  #release(): void {
    if (this.#session !== null) {
      gnutls().gnutls_deinit(this.#session);
      this.#session = null;
    }
  }

  /** Release the TLS session and close the socket (no close_notify, as qemu 7.2). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#release();
    this.#under.close();
  }
}

const SCRATCH = new Uint8Array(64 * 1024);
/** How long a refused client gets to finish sending before the connection closes. */
const REFUSAL_SETTLE_MS = 200;

/** Wait until `conn` is readable, at most `ms`. */
async function settle(loop: ReadinessLoop, conn: FdStream, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    loop.wait(conn.fd, POLLIN),
    new Promise<void>((resolve) => timer = setTimeout(resolve, ms)),
  ]);
  clearTimeout(timer);
}

/** Read and drop what the socket holds now (bounded). */
function discardPending(fd: number): void {
  for (let i = 0; i < 64; i++) {
    try {
      if (tryRecv(fd, SCRATCH) <= 0) return;
    } catch {
      return;
    }
  }
}

/** The errno text qemu's TLS channel reports for a GnuTLS I/O failure. */
function ioReason(code: number): string {
  return code === GNUTLS_E_PREMATURE_TERMINATION
    ? "Software caused connection abort"
    : "Input/output error";
}
