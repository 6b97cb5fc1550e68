/**
 * qemu's curl protocol driver for http:// and https:// (read-only), as a block device.
 *
 * Behaviour matched with qemu 7.2 (block/curl.c with Debian's libcurl):
 * - options `url`, `readahead` (size, multiple of 512, default 256 KiB), `timeout` (seconds,
 *   ≤ 10000, default 5, 0 = none), `sslverify` (default on), `cookie`, `cookie-secret`,
 *   `username`, `password-secret`, `proxy-username`, `proxy-password-secret`, checked in
 *   qemu's order with qemu's messages; unknown options are refused only after a successful open,
 *   as qemu's generic layer does;
 * - a writable open fails first with "curl driver does not support writes";
 * - open = one HEAD: the size is its Content-Length (the device exposes it rounded up to 512
 *   bytes, as every qemu node is, and reads past the real end return zeroes), servers without
 *   `Accept-Ranges: bytes` are refused, failures read "CURL: Error opening file: <curl's text>";
 * - a read that no cached or in-flight buffer covers becomes `GET Range: bytes=off-(off+len+
 *   readahead-1)`, clamped to the file, kept in one of a few buffers; later reads inside a
 *   buffer are answered from it, waiting for in-flight data when needed (the same requests as
 *   qemu for the same reads);
 * - a failed transfer is reported once as `curl: <message>` through `warn` (the first 100, then
 *   "curl: further errors suppressed") and fails its reads with EIO; other reads go on.
 *
 * Differences, deliberate: up to {@link DEFAULT_CONNECTIONS} keep-alive connections carry
 * transfers in parallel (qemu: 8 curl handles); a read over 64 KiB is read straight into the
 * caller's buffer and only its readahead part is cached (qemu caches it whole); a server that answers a ranged GET
 * at a non-zero offset with the whole file (200) is an EIO instead of wrong data; a 206 body
 * shorter than the range is an EIO (qemu would wait forever); proxies (`http_proxy`) are not
 * used; secrets cannot be defined (no `--object`), so the `*-secret` options fail as qemu fails
 * for an unknown secret id.
 *
 * @module
 */

import { parseSize, parseU64 } from "../../cli/numbers.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  type ExtentList,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";
import { BodyReader, CurlError, header, HttpClient, type ResponseHead } from "./http_client.ts";
import { systemCaCerts } from "./http_transport.ts";

/** Keep-alive connections (hence transfers in flight) per device. */
export const DEFAULT_CONNECTIONS = 8;
/** qemu's CURL_BLOCK_OPT_READAHEAD_DEFAULT. */
const READAHEAD_DEFAULT = 256 * 1024;
/** qemu's CURL_BLOCK_OPT_TIMEOUT_DEFAULT and CURL_TIMEOUT_MAX, seconds. */
const TIMEOUT_DEFAULT = 5;
const TIMEOUT_MAX = 10000;
/** Readahead buffers are bounded by count and by total bytes. */
const MAX_SLOTS = 32;
/** Reads up to this size are kept in the cache with their readahead; larger ones only the latter. */
const CACHE_WHOLE_MAX = 64 * 1024;
const SLOT_BYTES_BUDGET = 64 * 1024 * 1024;
/** qemu reports the first 100 transfer errors. */
const ERROR_REPORTS = 100;

const KNOWN_OPTIONS = new Set([
  "url",
  "readahead",
  "sslverify",
  "timeout",
  "cookie",
  "cookie-secret",
  "username",
  "password-secret",
  "proxy-username",
  "proxy-password-secret",
]);

/** Context from the image opener. */
export interface HttpOpenContext {
  readonly writable: boolean;
  readonly warn: (m: string) => void;
  readonly driver: "http" | "https";
}

/** Knobs for measurements; the defaults are what denbd uses. */
export interface HttpTuning {
  /** Connections per origin (default {@link DEFAULT_CONNECTIONS}). */
  readonly connections?: number;
}

/** The curl driver's options after qemu's checks. */
export interface CurlOptions {
  readonly url: string;
  readonly readahead: number;
  readonly timeoutSeconds: number;
  readonly sslVerify: boolean;
  readonly cookie: string | undefined;
  readonly username: string | undefined;
  readonly proxyUsername: string | undefined;
  /** Keys qemu's curl driver does not know, refused after the open succeeds. */
  readonly unknown: readonly string[];
}

function invalid(message: string): BlockError {
  return new BlockError(Errno.EINVAL, message);
}

function noSecret(id: string): BlockError {
  return invalid(`No secret with id '${id}' (denbd does not support --object secrets yet)`);
}

/** qapi's bool syntax (case-sensitive, as qemu 7.2). */
function parseBool(key: string, text: string): boolean {
  if (text === "on" || text === "yes" || text === "true" || text === "y") return true;
  if (text === "off" || text === "no" || text === "false" || text === "n") return false;
  throw invalid(`Parameter '${key}' expects 'on' or 'off'`);
}

/**
 * Validates the curl driver's options in the order qemu 7.2's curl_open does, with its messages.
 * Throws BlockError (EACCES for a writable open, EINVAL otherwise).
 */
export function parseCurlOptions(
  opts: Readonly<Record<string, string>>,
  ctx: Pick<HttpOpenContext, "writable" | "driver">,
): CurlOptions {
  if (ctx.writable) throw new BlockError(Errno.EACCES, "curl driver does not support writes");
  const unknown = Object.keys(opts).filter((k) => !KNOWN_OPTIONS.has(k) && k !== "driver");

  // Typed values are parsed while the options are absorbed, before any semantic check.
  let readahead = READAHEAD_DEFAULT;
  const ra = opts["readahead"];
  if (ra !== undefined) {
    const v = parseSize(ra);
    if (v === "range") throw invalid(`Value '${ra}' is out of range for parameter 'readahead'`);
    if (v === "invalid") {
      throw invalid(
        "Parameter 'readahead' expects a non-negative number below 2^64\n" +
          "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
          "and exabytes, respectively.",
      );
    }
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw invalid(`HTTP_READAHEAD_SIZE ${v} is larger than denbd supports`);
    }
    readahead = Number(v);
  }
  const sslText = opts["sslverify"];
  const sslVerify = sslText === undefined ? true : parseBool("sslverify", sslText);
  let timeout = BigInt(TIMEOUT_DEFAULT);
  const to = opts["timeout"];
  if (to !== undefined) {
    const v = parseU64(to, 0);
    if (v === "range") throw invalid(`Value '${to}' is too large for parameter 'timeout'`);
    if (v === "invalid") throw invalid("Parameter 'timeout' expects a number");
    timeout = v;
  }

  if (readahead % 512 !== 0) {
    throw invalid(`HTTP_READAHEAD_SIZE ${readahead} is not a multiple of 512`);
  }
  if (timeout > BigInt(TIMEOUT_MAX)) throw invalid("timeout parameter is too large or negative");
  const cookie = opts["cookie"];
  const cookieSecret = opts["cookie-secret"];
  if (cookie !== undefined && cookieSecret !== undefined) {
    throw invalid("curl driver cannot handle both cookie and cookie secret");
  }
  if (cookieSecret !== undefined) throw noSecret(cookieSecret);
  const url = opts["url"];
  if (url === undefined) throw invalid("curl block driver requires an 'url' option");
  if (!url.startsWith(`${ctx.driver}://`)) {
    throw invalid(
      `${ctx.driver} curl driver cannot handle the URL '${url}' (does not start with '${ctx.driver}://')`,
    );
  }
  const passwordSecret = opts["password-secret"];
  if (passwordSecret !== undefined) throw noSecret(passwordSecret);
  const proxySecret = opts["proxy-password-secret"];
  if (proxySecret !== undefined) throw noSecret(proxySecret);
  return {
    url,
    readahead,
    timeoutSeconds: Number(timeout),
    sslVerify,
    cookie,
    username: opts["username"],
    proxyUsername: opts["proxy-username"],
    unknown,
  };
}

/** True when an `Accept-Ranges` header offers byte ranges (qemu 7.2: name any case, "bytes"). */
function acceptsRanges(head: ResponseHead): boolean {
  for (const [name, value] of head.headers) {
    if (name === "accept-ranges" && value === "bytes") return true;
  }
  return false;
}

/**
 * Opens `opts.url` as qemu's http/https protocol driver does (see the module doc). Throws
 * BlockError with qemu's message when qemu would refuse the open.
 */
export async function openHttpProtocol(
  opts: Readonly<Record<string, string>>,
  ctx: HttpOpenContext,
  tuning: HttpTuning = {},
): Promise<BlockDevice> {
  const o = parseCurlOptions(opts, ctx);
  const opening = (msg: string) => invalid(`CURL: Error opening file: ${msg}`);
  let url: URL;
  try {
    url = new URL(o.url);
  } catch {
    throw opening("URL using bad/illegal format or missing URL");
  }
  const client = new HttpClient(
    {
      url,
      timeoutMs: o.timeoutSeconds * 1000,
      sslVerify: o.sslVerify,
      cookie: o.cookie,
      username: o.username,
      maxConnections: tuning.connections ?? DEFAULT_CONNECTIONS,
    },
    url.protocol === "https:" && o.sslVerify ? systemCaCerts() : undefined,
  );
  let contentLength: number;
  try {
    const head = await client.request("HEAD", undefined, (h) => Promise.resolve(h));
    if (head.contentLength < 0) throw new CurlError("Server didn't report file size.");
    if (!acceptsRanges(head)) {
      throw new CurlError("Server does not support 'range' (byte ranges).");
    }
    contentLength = head.contentLength;
  } catch (e) {
    client.close();
    throw opening(e instanceof Error ? e.message : String(e));
  }
  if (o.unknown.length > 0) {
    client.close();
    throw invalid(`Block protocol '${ctx.driver}' doesn't support the option '${o.unknown[0]}'`);
  }
  return new HttpDevice(client, o, contentLength, ctx.warn);
}

const enum SlotState {
  Free,
  Pending,
  Done,
}

/** A read waiting for in-flight readahead data. */
interface Waiter {
  readonly dst: Uint8Array;
  /** Offset of dst's first byte inside the slot. */
  readonly from: number;
  readonly resolve: () => void;
  readonly reject: (e: Error) => void;
}

/** One readahead buffer: the bytes `[start, start+length)` of the file, `filled` of them so far. */
class Slot {
  state = SlotState.Free;
  start = 0;
  length = 0;
  filled = 0;
  lastUse = 0;
  buf: Uint8Array = new Uint8Array(0);
  waiters: Waiter[] = [];
}

/** The http/https block device (read-only). */
export class HttpDevice implements BlockDevice {
  /** Content-Length rounded up to 512 bytes, as qemu sizes every node. */
  readonly size: number;
  /** The size the server reported. */
  readonly contentLength: number;
  readonly caps: Capabilities = {
    writable: false,
    flush: true,
    trim: false,
    zero: false,
    fastZero: false,
    extents: false,
    minBlock: 1,
  };
  readonly #client: HttpClient;
  readonly #readahead: number;
  readonly #warn: (m: string) => void;
  readonly #url: string;
  readonly #slots: Slot[] = [];
  readonly #transfers = new Set<Promise<void>>();
  #tick = 0;
  #errors = 0;
  #closed = false;

  constructor(
    client: HttpClient,
    o: CurlOptions,
    contentLength: number,
    warn: (m: string) => void,
  ) {
    this.#client = client;
    this.#readahead = o.readahead;
    this.#warn = warn;
    this.#url = o.url;
    this.contentLength = contentLength;
    this.size = Math.ceil(contentLength / 512) * 512;
    const slotBytes = o.readahead + CACHE_WHOLE_MAX;
    const slots = Math.max(2, Math.min(MAX_SLOTS, Math.floor(SLOT_BYTES_BUDGET / slotBytes)));
    for (let i = 0; i < slots; i++) this.#slots.push(new Slot());
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    if (this.#closed) return Promise.reject(new BlockError(Errno.EIO, "HTTP device is closed"));
    const end = Math.min(offset + buf.length, this.contentLength);
    if (end <= offset) {
      buf.fill(0);
      return Promise.resolve();
    }
    const need = end - offset;
    // Past the real end (the 512-byte rounding): zeroes, as qemu's curl_find_buf fills them.
    if (need < buf.length) buf.fill(0, need);
    const dst = need < buf.length ? buf.subarray(0, need) : buf;
    for (const s of this.#slots) {
      if (s.state === SlotState.Free || offset < s.start || end > s.start + s.length) continue;
      s.lastUse = ++this.#tick;
      const from = offset - s.start;
      if (s.filled >= from + need) {
        dst.set(s.buf.subarray(from, from + need));
        return Promise.resolve();
      }
      return new Promise((resolve, reject) => s.waiters.push({ dst, from, resolve, reject }));
    }
    return this.#miss(dst, offset);
  }

  /** Starts a transfer for `dst` at `offset` plus readahead; resolves once `dst` is filled. */
  #miss(dst: Uint8Array, offset: number): Promise<void> {
    const primaryEnd = offset + dst.length;
    const tail = Math.min(this.#readahead, this.contentLength - primaryEnd);
    // Small reads are cached whole, as qemu caches them (probes and metadata are read again);
    // a large read goes straight into the caller's buffer and only its readahead is kept.
    const whole = dst.length <= CACHE_WHOLE_MAX;
    const slot = whole || tail > 0
      ? this.#claim(whole ? offset : primaryEnd, (whole ? dst.length : 0) + tail)
      : undefined;
    const done = Promise.withResolvers<void>();
    const t = this.#transfer(dst, offset, slot, done);
    this.#transfers.add(t);
    t.finally(() => this.#transfers.delete(t));
    return done.promise;
  }

  /** The least recently used slot that is not being filled, set up for `[start, start+len)`. */
  #claim(start: number, length: number): Slot | undefined {
    let best: Slot | undefined;
    for (const s of this.#slots) {
      if (s.state === SlotState.Pending) continue;
      if (best === undefined || s.lastUse < best.lastUse) best = s;
    }
    if (best === undefined) return undefined;
    if (best.buf.length < length) best.buf = new Uint8Array(this.#readahead + CACHE_WHOLE_MAX);
    best.state = SlotState.Pending;
    best.start = start;
    best.length = length;
    best.filled = 0;
    best.lastUse = ++this.#tick;
    return best;
  }

  async #transfer(
    dst: Uint8Array,
    offset: number,
    slot: Slot | undefined,
    done: PromiseWithResolvers<void>,
  ): Promise<void> {
    const inSlot = slot !== undefined && slot.start === offset;
    const last = inSlot ? offset + slot.length - 1 : offset + dst.length + (slot?.length ?? 0) - 1;
    let primaryDone = false;
    try {
      await this.#client.request("GET", [offset, last], async (head, body) => {
        checkRange(head, offset);
        if (!inSlot) {
          await readExact(body, dst);
          primaryDone = true;
          done.resolve();
        }
        if (slot === undefined) return;
        await readExact(body, slot.buf.subarray(0, slot.length), (n) => {
          if (inSlot && !primaryDone && n >= dst.length) {
            dst.set(slot.buf.subarray(0, dst.length));
            primaryDone = true;
            done.resolve();
          }
          this.#progress(slot, n);
        });
        slot.state = SlotState.Done;
      });
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      // Transfers cut short by close() are not failures anyone needs to hear about.
      if (!this.#closed) this.#report(msg);
      const err = new BlockError(
        Errno.EIO,
        `HTTP read of ${this.#url} bytes ${offset}-${last} failed: ${msg}`,
      );
      if (!primaryDone) done.reject(err);
      if (slot !== undefined) {
        slot.state = SlotState.Free;
        slot.lastUse = 0;
        for (const w of slot.waiters.splice(0)) w.reject(err);
      }
    }
  }

  /** New readahead bytes arrived: wake every waiter whose range is now complete. */
  #progress(slot: Slot, filled: number): void {
    slot.filled = filled;
    const ws = slot.waiters;
    let keep = 0;
    for (let i = 0; i < ws.length; i++) {
      const w = ws[i]!;
      if (w.from + w.dst.length <= filled) {
        // Copied now, before the slot could be reused for another range.
        w.dst.set(slot.buf.subarray(w.from, w.from + w.dst.length));
        w.resolve();
      } else {
        ws[keep++] = w;
      }
    }
    ws.length = keep;
  }

  /** qemu's error_report for failed transfers: the first 100, then one notice. */
  #report(msg: string): void {
    if (this.#errors >= ERROR_REPORTS) return;
    this.#warn(`curl: ${msg}`);
    if (++this.#errors === ERROR_REPORTS) this.#warn("curl: further errors suppressed");
  }

  pwrite(_buf: Uint8Array, _offset: number, _flags: WriteFlags): Promise<void> {
    return Promise.reject(new BlockError(Errno.EACCES, "curl driver does not support writes"));
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.reject(new BlockError(Errno.EACCES, "curl driver does not support writes"));
  }

  zero(_offset: number, _length: number, _flags: ZeroFlags): Promise<void> {
    return Promise.reject(new BlockError(Errno.EACCES, "curl driver does not support writes"));
  }

  /** A prefetch of a node that is all data reads nothing in qemu (BDRV_REQ_PREFETCH). */
  cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  /** Everything is data: curl has no block status. */
  extents(_offset: number, length: number, out: ExtentList): Promise<void> {
    out.add(length, 0);
    return Promise.resolve();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#client.close();
    await Promise.allSettled([...this.#transfers]);
  }
}

/** A 206 must be for the range asked; a 200 (range ignored) is usable only from offset 0. */
function checkRange(head: ResponseHead, offset: number): void {
  if (head.status === 206) {
    const cr = header(head, "content-range");
    const m = cr === undefined ? null : /^bytes\s+(\d+)-/.exec(cr);
    if (m !== null && Number(m[1]) !== offset) {
      throw new CurlError(`Server answered range ${cr} for a request at offset ${offset}`);
    }
    return;
  }
  if (head.status !== 200 || offset !== 0) {
    throw new CurlError(
      `Server ignored the byte range request (HTTP ${head.status} instead of 206)`,
    );
  }
}

async function readExact(
  body: BodyReader,
  dst: Uint8Array,
  progress?: (filled: number) => void,
): Promise<void> {
  const n = await body.readInto(dst, progress);
  if (n < dst.length) {
    throw new CurlError(`Short response: the server sent ${n} bytes where ${dst.length} were due`);
  }
}
