/**
 * A small HTTP/1.1 client for the curl protocol driver: HEAD and `Range:` GETs over a pool of
 * keep-alive connections per origin, with bodies read straight into the caller's buffers (no
 * intermediate chunks, no copies beyond the one out of the socket).
 *
 * It behaves as libcurl does with the options qemu's curl driver sets: redirects followed
 * (FOLLOWLOCATION, http/https only), HTTP errors ≥ 400 fail the transfer (FAILONERROR), a
 * whole-transfer timeout including the connect (CURLOPT_TIMEOUT, 0 = none), a cookie string and
 * basic credentials sent as given, `Accept: *∕*` and no User-Agent. A request sent on a reused
 * connection that the server had closed is retried once on a new one, as curl does.
 *
 * @module
 */

import { connectTransport, CurlError, type Endpoint, type Transport } from "./http_transport.ts";

export { CurlError };

/** Read buffer per connection: response heads and the first body bytes land here. */
const CONN_BUFFER = 64 * 1024;
/** curl's own limit on redirects is off in 7.88; a loop must still end. */
const MAX_REDIRECTS = 30;

const encoder = new TextEncoder();
const latin1 = new TextDecoder("latin1");

/** Client settings (from the curl driver's options). */
export interface HttpClientOptions {
  readonly url: URL;
  /** Whole-transfer limit in milliseconds; 0 = none. */
  readonly timeoutMs: number;
  readonly sslVerify: boolean;
  readonly cookie?: string;
  readonly username?: string;
  readonly password?: string;
  /** Connections per origin, hence requests in flight. */
  readonly maxConnections: number;
}

/** A parsed status line and the headers the client acts on. */
export interface ResponseHead {
  readonly status: number;
  /** Header lines as received, name lowercased: [name, value]. */
  readonly headers: ReadonlyArray<readonly [string, string]>;
  /** -1 when absent. */
  readonly contentLength: number;
  readonly chunked: boolean;
  readonly keepAlive: boolean;
}

/** One open connection and its read buffer. */
class HttpConnection {
  readonly t: Transport;
  readonly buf = new Uint8Array(CONN_BUFFER);
  pos = 0;
  end = 0;
  /** Responses completed on it: a failure before the first response byte on a reused connection
   * means the server closed it while idle. */
  served = 0;
  constructor(t: Transport) {
    this.t = t;
  }

  /** Reads more into the buffer (compacting first). False at end of stream. */
  async fill(): Promise<boolean> {
    if (this.pos === this.end) {
      this.pos = this.end = 0;
    } else if (this.end === this.buf.length) {
      this.buf.copyWithin(0, this.pos, this.end);
      this.end -= this.pos;
      this.pos = 0;
    }
    if (this.end === this.buf.length) throw new CurlError("Response header too large");
    const n = await this.t.read(this.buf.subarray(this.end));
    if (n === null) return false;
    this.end += n;
    return true;
  }

  /** Index of the first CRLFCRLF at or after pos, or -1. */
  headEnd(): number {
    const b = this.buf;
    for (let i = this.pos; i + 3 < this.end; i++) {
      if (b[i] === 13 && b[i + 1] === 10 && b[i + 2] === 13 && b[i + 3] === 10) return i;
    }
    return -1;
  }

  /** One CRLF-terminated line (without the CRLF); throws at end of stream. */
  async line(): Promise<string> {
    for (;;) {
      for (let i = this.pos; i + 1 < this.end; i++) {
        if (this.buf[i] === 13 && this.buf[i + 1] === 10) {
          const s = latin1.decode(this.buf.subarray(this.pos, i));
          this.pos = i + 2;
          return s;
        }
      }
      if (!(await this.fill())) {
        throw new CurlError("transfer closed with outstanding read data remaining");
      }
    }
  }
}

/** Parses the head in `c.buf[c.pos, end)` and consumes it with its CRLFCRLF. */
function parseHead(c: HttpConnection, end: number, isHead: boolean): ResponseHead {
  const text = latin1.decode(c.buf.subarray(c.pos, end));
  c.pos = end + 4;
  const lines = text.split("\r\n");
  const m = /^HTTP\/(\d)\.(\d) (\d{3})/.exec(lines[0] ?? "");
  if (m === null) throw new CurlError("Received HTTP/0.9 when not allowed");
  const http10 = m[1] === "1" && m[2] === "0";
  const headers: [string, string][] = [];
  let contentLength = -1;
  let chunked = false;
  let keepAlive = !http10;
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i]!;
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const name = line.slice(0, colon).toLowerCase();
    const value = line.slice(colon + 1).trim();
    headers.push([name, value]);
    if (name === "content-length") {
      const n = Number(value);
      if (!Number.isSafeInteger(n) || n < 0 || !/^\d+$/.test(value)) {
        throw new CurlError("Invalid Content-Length: value");
      }
      contentLength = n;
    } else if (name === "transfer-encoding") {
      chunked = /(^|,)\s*chunked\s*$/i.test(value);
    } else if (name === "connection") {
      if (/\bclose\b/i.test(value)) keepAlive = false;
      else if (/\bkeep-alive\b/i.test(value)) keepAlive = true;
    }
  }
  const status = Number(m[3]);
  if (isHead || status === 204 || status === 304 || (status >= 100 && status < 200)) {
    // No body follows whatever the length headers say.
    return { status, headers, contentLength, chunked: false, keepAlive };
  }
  return { status, headers, contentLength, chunked, keepAlive };
}

/** The value of the first header `name` (lowercase), if any. */
export function header(head: ResponseHead, name: string): string | undefined {
  for (const [n, v] of head.headers) if (n === name) return v;
  return undefined;
}

const enum BodyMode {
  Length,
  Chunked,
  UntilClose,
}

/** Reads one response body, into buffers the caller provides. */
export class BodyReader {
  readonly #c: HttpConnection;
  readonly #mode: BodyMode;
  /** Length mode: bytes left. Chunked: bytes left in the current chunk (-1 before the first). */
  #left: number;
  #done = false;
  /** Body bytes delivered so far (for curl's timeout message). */
  received = 0;
  /** The Content-Length, -1 when unknown. */
  readonly expected: number;

  constructor(c: HttpConnection, head: ResponseHead, isHead: boolean) {
    this.#c = c;
    this.expected = head.contentLength;
    if (isHead || head.status === 204 || head.status === 304) {
      this.#mode = BodyMode.Length;
      this.#left = 0;
      this.#done = true;
    } else if (head.chunked) {
      this.#mode = BodyMode.Chunked;
      this.#left = -1;
    } else if (head.contentLength >= 0) {
      this.#mode = BodyMode.Length;
      this.#left = head.contentLength;
      this.#done = this.#left === 0;
    } else {
      this.#mode = BodyMode.UntilClose;
      this.#left = Number.MAX_SAFE_INTEGER;
    }
  }

  /** The whole body has been read (the connection can carry the next request). */
  get complete(): boolean {
    return this.#done && this.#mode !== BodyMode.UntilClose;
  }

  /**
   * Fills `dst` from the body; returns the bytes written, fewer than `dst.length` only when the
   * body ended. `progress(n)` is called with the running count after every socket read.
   */
  async readInto(dst: Uint8Array, progress?: (filled: number) => void): Promise<number> {
    const c = this.#c;
    let got = 0;
    while (got < dst.length && !this.#done) {
      if (this.#mode === BodyMode.Chunked && this.#left <= 0) {
        await this.#nextChunk();
        continue;
      }
      const want = Math.min(dst.length - got, this.#left);
      let n: number;
      if (c.pos < c.end) {
        n = Math.min(want, c.end - c.pos);
        dst.set(c.buf.subarray(c.pos, c.pos + n), got);
        c.pos += n;
      } else {
        // Straight from the socket into the destination, never past this body's end.
        const r = await c.t.read(dst.subarray(got, got + want));
        if (r === null) {
          if (this.#mode === BodyMode.UntilClose) {
            this.#done = true;
            break;
          }
          throw new CurlError(
            this.#mode === BodyMode.Length
              ? `transfer closed with ${this.#left} bytes remaining to read`
              : "transfer closed with outstanding read data remaining",
          );
        }
        n = r;
      }
      got += n;
      this.received += n;
      this.#left -= n;
      if (this.#mode === BodyMode.Length && this.#left === 0) this.#done = true;
      progress?.(got);
    }
    return got;
  }

  async #nextChunk(): Promise<void> {
    if (this.#left === 0) await this.#c.line(); // CRLF after the previous chunk's data
    const sizeLine = await this.#c.line();
    const size = parseInt(sizeLine, 16);
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new CurlError("Received invalid chunk size in chunked response");
    }
    if (size === 0) {
      while ((await this.#c.line()) !== "") { /* trailers */ }
      this.#done = true;
      return;
    }
    this.#left = size;
  }
}

/** Connections to one origin; a permit is needed for each request in flight. */
class OriginPool {
  readonly endpoint: Endpoint;
  readonly #max: number;
  #active = 0;
  readonly #waiters: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];
  readonly idle: HttpConnection[] = [];
  readonly busy = new Set<HttpConnection>();
  closed = false;

  constructor(endpoint: Endpoint, max: number) {
    this.endpoint = endpoint;
    this.#max = max;
  }

  permit(): Promise<void> {
    if (this.closed) return Promise.reject(new CurlError("Client closed"));
    if (this.#active < this.#max) {
      this.#active++;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  /** Hands the permit to the next waiter, or returns it. */
  release(): void {
    const w = this.#waiters.shift();
    if (w !== undefined) w.resolve();
    else this.#active--;
  }

  close(): void {
    this.closed = true;
    for (const w of this.#waiters.splice(0)) w.reject(new CurlError("Client closed"));
    for (const c of this.idle.splice(0)) c.t.close();
    for (const c of this.busy) c.t.close();
  }
}

/** What a transfer receives: the response head and a reader for its body. */
export type BodySink<T> = (head: ResponseHead, body: BodyReader) => Promise<T>;

/** State of one transfer, for the timeout. */
interface Transfer {
  readonly started: number;
  timedOut: boolean;
  conn: HttpConnection | undefined;
  body: BodyReader | undefined;
  connected: boolean;
  readonly abort: AbortController;
}

/** The HTTP client of one curl block device. */
export class HttpClient {
  readonly #opts: HttpClientOptions;
  readonly #pools = new Map<string, OriginPool>();
  readonly #authHeader: string;
  readonly #caCerts: readonly string[] | undefined;
  #closed = false;

  constructor(opts: HttpClientOptions, caCerts?: readonly string[]) {
    this.#opts = opts;
    this.#caCerts = caCerts;
    const user = opts.username ?? (opts.url.username ? decodeURIComponent(opts.url.username) : "");
    const pass = opts.password ??
      (opts.url.password ? decodeURIComponent(opts.url.password) : "");
    this.#authHeader = user !== "" || pass !== ""
      ? `Authorization: Basic ${base64(encoder.encode(`${user}:${pass}`))}\r\n`
      : "";
  }

  /**
   * Runs one request from the configured URL (following redirects) and hands a successful
   * response to `sink`. The timeout covers connecting, the exchange and the sink's reads.
   */
  async request<T>(
    method: "HEAD" | "GET",
    range: readonly [number, number] | undefined,
    sink: BodySink<T>,
  ): Promise<T> {
    if (this.#closed) throw new CurlError("Client closed");
    let url = this.#opts.url;
    for (let redirects = 0;; redirects++) {
      const pool = this.#pool(url);
      await pool.permit();
      const tr: Transfer = {
        started: performance.now(),
        timedOut: false,
        conn: undefined,
        body: undefined,
        connected: false,
        abort: new AbortController(),
      };
      const timer = this.#opts.timeoutMs > 0
        ? setTimeout(() => {
          tr.timedOut = true;
          tr.abort.abort();
          tr.conn?.t.close();
        }, this.#opts.timeoutMs)
        : undefined;
      let location: string | undefined;
      try {
        const r = await this.#exchange(pool, url, method, range, tr, sink);
        if (r.kind === "done") return r.value;
        location = r.location;
      } catch (e) {
        if (tr.timedOut) throw this.#timeoutError(tr);
        if (e instanceof CurlError) throw e;
        throw mapIoError(e);
      } finally {
        clearTimeout(timer);
        pool.release();
      }
      if (redirects >= MAX_REDIRECTS) {
        throw new CurlError(`Maximum (${MAX_REDIRECTS}) redirects followed`);
      }
      try {
        url = new URL(location, url);
      } catch {
        throw new CurlError("URL using bad/illegal format or missing URL");
      }
      if (url.protocol !== "http:" && url.protocol !== "https:") {
        throw new CurlError(
          `Protocol "${url.protocol.slice(0, -1)}" not supported or disabled in libcurl`,
        );
      }
    }
  }

  #timeoutError(tr: Transfer): CurlError {
    const ms = Math.floor(performance.now() - tr.started);
    if (!tr.connected) return new CurlError(`Connection timed out after ${ms} milliseconds`);
    const got = tr.body?.received ?? 0;
    const total = tr.body?.expected ?? -1;
    return new CurlError(
      total >= 0
        ? `Operation timed out after ${ms} milliseconds with ${got} out of ${total} bytes received`
        : `Operation timed out after ${ms} milliseconds with ${got} bytes received`,
    );
  }

  async #exchange<T>(
    pool: OriginPool,
    url: URL,
    method: "HEAD" | "GET",
    range: readonly [number, number] | undefined,
    tr: Transfer,
    sink: BodySink<T>,
  ): Promise<{ kind: "done"; value: T } | { kind: "redirect"; location: string }> {
    const reqHead = encoder.encode(this.#requestHead(url, method, range));
    for (let attempt = 0;; attempt++) {
      // The retry takes a fresh connection: the other idle ones are as old as the one the server
      // just turned out to have closed, and likely closed too (keepalive_timeout, a restart).
      const conn = (attempt === 0 ? pool.idle.pop() : undefined) ?? await this.#connect(pool, tr);
      tr.conn = conn;
      tr.connected = true;
      pool.busy.add(conn);
      let keep = false;
      let responded = false;
      try {
        await writeAll(conn.t, reqHead);
        let head: ResponseHead;
        for (;;) {
          let end = conn.headEnd();
          while (end < 0) {
            if (!(await conn.fill())) {
              throw new CurlError("Empty reply from server");
            }
            end = conn.headEnd();
          }
          responded = true;
          head = parseHead(conn, end, method === "HEAD");
          if (head.status >= 200 || head.status < 100) break; // skip 1xx interim responses
        }
        const location = header(head, "location");
        if (head.status >= 300 && head.status < 400 && location !== undefined) {
          return { kind: "redirect", location };
        }
        if (head.status >= 400) {
          throw new CurlError(`The requested URL returned error: ${head.status}`);
        }
        const body = new BodyReader(conn, head, method === "HEAD");
        tr.body = body;
        const value = await sink(head, body);
        conn.served++;
        keep = head.keepAlive && body.complete;
        return { kind: "done", value };
      } catch (e) {
        // A kept-alive connection the server closed while idle: once more on a fresh one, and
        // drop the idle ones opened before it, which the server has most likely closed as well.
        if (!responded && conn.served > 0 && attempt === 0 && !tr.timedOut && !pool.closed) {
          for (const c of pool.idle.splice(0)) c.t.close();
          continue;
        }
        throw e;
      } finally {
        pool.busy.delete(conn);
        tr.conn = undefined;
        if (keep && !pool.closed) pool.idle.push(conn);
        else conn.t.close();
      }
    }
  }

  async #connect(pool: OriginPool, tr: Transfer): Promise<HttpConnection> {
    return new HttpConnection(await connectTransport(pool.endpoint, tr.abort.signal));
  }

  #requestHead(url: URL, method: string, range: readonly [number, number] | undefined): string {
    const sameOrigin = url.origin === this.#opts.url.origin;
    let s = `${method} ${url.pathname}${url.search} HTTP/1.1\r\nHost: ${url.host}\r\n`;
    if (range !== undefined) s += `Range: bytes=${range[0]}-${range[1]}\r\n`;
    // curl sends credentials only to the host they were given for.
    if (sameOrigin) s += this.#authHeader;
    s += "Accept: */*\r\n";
    if (this.#opts.cookie !== undefined) s += `Cookie: ${this.#opts.cookie}\r\n`;
    return s + "\r\n";
  }

  #pool(url: URL): OriginPool {
    const key = url.origin;
    let p = this.#pools.get(key);
    if (p === undefined) {
      const tls = url.protocol === "https:";
      const host = url.hostname.startsWith("[") ? url.hostname.slice(1, -1) : url.hostname;
      const port = url.port !== "" ? Number(url.port) : tls ? 443 : 80;
      p = new OriginPool(
        { tls, host, port, verify: this.#opts.sslVerify, caCerts: this.#caCerts },
        this.#opts.maxConnections,
      );
      this.#pools.set(key, p);
    }
    return p;
  }

  /** Closes every connection; requests in flight and waiting fail. */
  close(): void {
    this.#closed = true;
    for (const p of this.#pools.values()) p.close();
  }
}

async function writeAll(t: Transport, p: Uint8Array): Promise<void> {
  let off = 0;
  while (off < p.length) off += await t.write(p.subarray(off));
}

/** A socket error in curl's words. */
function mapIoError(e: unknown): CurlError {
  if (e instanceof Deno.errors.ConnectionReset) {
    return new CurlError("Recv failure: Connection reset by peer");
  }
  if (e instanceof Deno.errors.BrokenPipe) return new CurlError("Send failure: Broken pipe");
  const msg = e instanceof Error ? e.message : String(e);
  return new CurlError(`Recv failure: ${msg}`);
}

const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

function base64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 3) {
    const a = bytes[i]!, b = bytes[i + 1], c = bytes[i + 2];
    s += B64[a >> 2]! + B64[((a & 3) << 4) | ((b ?? 0) >> 4)]! +
      (b === undefined ? "=" : B64[((b & 15) << 2) | ((c ?? 0) >> 6)]!) +
      (c === undefined ? "=" : B64[c & 63]!);
  }
  return s;
}
