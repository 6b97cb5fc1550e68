/**
 * Byte transports under the HTTP client: plain TCP and verified TLS are Deno's own connections
 * (the fastest socket API measured here); TLS without certificate checks (`sslverify=off`) goes
 * through node:tls, the one Deno API that can skip chain verification, behind the same small
 * read/write/close shape.
 *
 * Connection failures become {@link CurlError}s worded as libcurl 7.88 (the library behind
 * Debian's qemu-block-extra) words them, since qemu prints curl's message verbatim.
 *
 * @module
 */

import * as nodeTls from "node:tls";
import { isIP } from "node:net";

/** An error whose message is what libcurl would have put in its error buffer. */
export class CurlError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CurlError";
  }
}

/** What the HTTP client needs from a connection. Deno.Conn and Deno.TlsConn have this shape. */
export interface Transport {
  /** Reads into `p`; resolves to the byte count, or null at end of stream. */
  read(p: Uint8Array): Promise<number | null>;
  /** Writes some of `p`; resolves to the byte count written. */
  write(p: Uint8Array): Promise<number>;
  /** Closes at once; pending reads and writes reject. */
  close(): void;
}

/** Where to connect and how. */
export interface Endpoint {
  readonly tls: boolean;
  /** Host name or IP literal without brackets. */
  readonly host: string;
  readonly port: number;
  /** Verify the peer certificate chain and name (curl's SSL_VERIFYPEER/VERIFYHOST). */
  readonly verify: boolean;
  /** Extra trusted roots in PEM (the system bundle, which curl trusts). */
  readonly caCerts?: readonly string[];
}

/** The system CA bundle curl-gnutls reads on Debian; Deno's built-in roots are added to it. */
const SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt";

let systemCaCache: string[] | undefined;

/** The system CA bundle (read once), or nothing when it is absent or unreadable. */
export function systemCaCerts(): string[] {
  if (systemCaCache === undefined) {
    try {
      systemCaCache = [Deno.readTextFileSync(SYSTEM_CA_BUNDLE)];
    } catch {
      systemCaCache = [];
    }
  }
  return systemCaCache;
}

/**
 * Opens a transport to `ep`. `signal` aborts the attempt (the request timeout). Errors are
 * CurlErrors in curl's words.
 */
export async function connectTransport(ep: Endpoint, signal: AbortSignal): Promise<Transport> {
  const started = performance.now();
  const failed = (why: string) =>
    new CurlError(
      `Failed to connect to ${ep.host} port ${ep.port} after ${
        Math.floor(performance.now() - started)
      } ms: ${why}`,
    );
  if (ep.tls && !ep.verify) return await connectNodeTls(ep, signal, failed);
  let conn: Deno.TcpConn;
  try {
    conn = await Deno.connect({ hostname: ep.host, port: ep.port, signal });
  } catch (e) {
    if (signal.aborted) throw e;
    const msg = e instanceof Error ? e.message : String(e);
    if (/lookup address|Name or service not known|No address associated/i.test(msg)) {
      throw new CurlError(`Could not resolve host: ${ep.host}`);
    }
    throw failed("Couldn't connect to server");
  }
  conn.setNoDelay(true);
  if (!ep.tls) return conn;
  let tls: Deno.TlsConn;
  try {
    tls = await Deno.startTls(conn, {
      hostname: ep.host,
      caCerts: ep.caCerts ? [...ep.caCerts] : undefined,
    });
    await tls.handshake();
  } catch (e) {
    try {
      conn.close();
    } catch { /* already closed by startTls */ }
    throw tlsError(e, ep.host);
  }
  return tls;
}

/** A TLS handshake failure in curl-gnutls's words (what qemu-img prints on Debian). */
function tlsError(e: unknown, host: string): CurlError {
  const msg = e instanceof Error ? e.message : String(e);
  if (/NotValidForName|not valid for name/i.test(msg)) {
    return new CurlError(`SSL: certificate subject name does not match target host name '${host}'`);
  }
  if (/certificate|UnknownIssuer|BadSignature|Expired/i.test(msg)) {
    return new CurlError("server certificate verification failed. CAfile: none CRLfile: none");
  }
  return new CurlError(`gnutls_handshake() failed: ${msg}`);
}

function connectNodeTls(
  ep: Endpoint,
  signal: AbortSignal,
  failed: (why: string) => CurlError,
): Promise<Transport> {
  return new Promise((resolve, reject) => {
    const sock = nodeTls.connect({
      host: ep.host,
      port: ep.port,
      rejectUnauthorized: false,
      servername: isIP(ep.host) === 0 ? ep.host : undefined,
    });
    const onAbort = () => {
      sock.destroy();
      reject(new CurlError("aborted"));
    };
    const onError = (e: Error & { code?: string }) => {
      signal.removeEventListener("abort", onAbort);
      if (e.code === "ECONNREFUSED") reject(failed("Couldn't connect to server"));
      else if (e.code === "ENOTFOUND") reject(new CurlError(`Could not resolve host: ${ep.host}`));
      else reject(new CurlError(`gnutls_handshake() failed: ${e.message}`));
    };
    signal.addEventListener("abort", onAbort, { once: true });
    sock.once("error", onError);
    sock.once("secureConnect", () => {
      signal.removeEventListener("abort", onAbort);
      sock.off("error", onError);
      sock.setNoDelay(true);
      resolve(new NodeSocketTransport(sock));
    });
  });
}

/** Pause the node socket when this much is queued unread (backpressure). */
const NODE_HIGH_WATER = 4 * 1024 * 1024;

/** A node:tls socket behind the {@link Transport} shape (used only with sslverify=off). */
class NodeSocketTransport implements Transport {
  readonly #sock: nodeTls.TLSSocket;
  readonly #queue: Uint8Array[] = [];
  #queued = 0;
  #paused = false;
  #ended = false;
  #error: Error | undefined;
  #wake: (() => void) | undefined;

  constructor(sock: nodeTls.TLSSocket) {
    this.#sock = sock;
    sock.on("data", (d: Uint8Array) => {
      this.#queue.push(d);
      this.#queued += d.length;
      if (this.#queued > NODE_HIGH_WATER && !this.#paused) {
        this.#paused = true;
        sock.pause();
      }
      this.#notify();
    });
    sock.on("end", () => this.#finish(undefined));
    sock.on("close", () => this.#finish(undefined));
    sock.on("error", (e: Error) => this.#finish(e));
  }

  #finish(e: Error | undefined): void {
    this.#error ??= e;
    this.#ended = true;
    this.#notify();
  }

  #notify(): void {
    const w = this.#wake;
    this.#wake = undefined;
    w?.();
  }

  async read(p: Uint8Array): Promise<number | null> {
    while (this.#queue.length === 0) {
      if (this.#error !== undefined) throw this.#error;
      if (this.#ended) return null;
      await new Promise<void>((r) => this.#wake = r);
    }
    let n = 0;
    while (n < p.length && this.#queue.length > 0) {
      const head = this.#queue[0]!;
      const take = Math.min(head.length, p.length - n);
      p.set(take === head.length ? head : head.subarray(0, take), n);
      n += take;
      if (take === head.length) this.#queue.shift();
      else this.#queue[0] = head.subarray(take);
    }
    this.#queued -= n;
    if (this.#paused && this.#queued < NODE_HIGH_WATER / 4) {
      this.#paused = false;
      this.#sock.resume();
    }
    return n;
  }

  write(p: Uint8Array): Promise<number> {
    return new Promise((resolve, reject) => {
      this.#sock.write(p, (err?: Error | null) => err ? reject(err) : resolve(p.length));
    });
  }

  close(): void {
    this.#sock.destroy();
    this.#finish(undefined);
  }
}
