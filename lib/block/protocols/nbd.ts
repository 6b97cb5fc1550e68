/**
 * qemu's `nbd` protocol driver: an export of another NBD server as a block device, so denbd can
 * re-export it (`denbd nbd://HOST:PORT/EXPORT`, `-f qcow2 nbd+unix:///x?socket=S`).
 *
 * Options are qemu's flat keys of the `nbd` node (see nbd_filename.ts for the filename forms):
 * `server.type` (inet | unix), `server.host`/`server.port` or `server.path`, the legacy
 * `host`/`port`/`path`, `export`, `x-dirty-bitmap` (that meta context replaces base:allocation
 * as the source of block status, as in qemu), `open-timeout` (retry connecting for that many
 * seconds) and `reconnect-delay` (after a lost connection, requests wait up to that many seconds
 * for a reconnect and are then sent again). As in qemu 7.2, a request issued after the
 * connection was lost tries one reconnect and fails with EIO if that fails.
 *
 * Capabilities follow the server's transmission flags; requests larger than the server's
 * maximum block size (at most 32 MiB, qemu's cap) are split; NBD errors become BlockErrors with
 * the errno qemu maps them to. Unlike qemu, connecting and negotiating are bounded in time
 * even without `open-timeout` (a server that accepts and then says nothing cannot hang the open).
 *
 * @module
 */

import {
  type ExportInfo,
  NbdClient,
  NbdHandshakeError,
  negotiate,
  OptionClient,
} from "../../nbd/client.ts";
import {
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_MAX_BUFFER_SIZE,
  NBD_MAX_STRING_SIZE,
} from "../../nbd/constants.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  type ExtentList,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";
import { NBD_DEFAULT_PORT } from "./nbd_filename.ts";

/** What the opener passes besides the options. */
export interface NbdOpenContext {
  /** Open read-write (false: read-only, whatever the server allows). */
  readonly writable: boolean;
  /** Prints a warning the way the program prints them. */
  readonly warn: (m: string) => void;
  /** Bound on connect + negotiation when `open-timeout` is 0 (default 30 s). */
  readonly handshakeTimeoutMs?: number;
}

/** Where the server is. */
export type NbdAddress =
  | { readonly type: "inet"; readonly host: string; readonly port: string }
  | { readonly type: "unix"; readonly path: string };

/** The options after validation. */
export interface NbdOptions {
  readonly server: NbdAddress;
  readonly exportName: string;
  /** x-dirty-bitmap: the meta context used for block status instead of base:allocation. */
  readonly dirtyBitmap: string | undefined;
  readonly openTimeoutS: number;
  readonly reconnectDelayS: number;
}

const TOP_KEYS = new Set([
  "host",
  "port",
  "path",
  "export",
  "tls-creds",
  "tls-hostname",
  "x-dirty-bitmap",
  "reconnect-delay",
  "open-timeout",
]);
const INET_KEYS = ["host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"];
const UNIX_KEYS = ["path", "abstract", "tight"];
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;
/** Longest a single reconnect attempt may take (connect + negotiation). */
const RECONNECT_ATTEMPT_MS = 5_000;
/** Pause between connection attempts under open-timeout / reconnect-delay. */
const RETRY_PAUSE_MS = 200;
/** Length bound for requests without payload (qemu: INT_MAX aligned down to the block size). */
const MAX_NO_PAYLOAD = 0x7fffffff;
const ZERO_CHUNK = 1024 * 1024;
const ETIMEDOUT = 110;

/**
 * Validate the flat options in qemu's order and with its messages (unknown keys: "Block protocol
 * 'nbd' doesn't support the option 'KEY'").
 */
export function parseNbdOptions(opts: Readonly<Record<string, string>>): NbdOptions {
  const openTimeoutS = numberOption(opts, "open-timeout");
  const reconnectDelayS = numberOption(opts, "reconnect-delay");
  const server = serverAddress(opts);
  const exportName = opts["export"] ?? "";
  if (new TextEncoder().encode(exportName).length > NBD_MAX_STRING_SIZE) {
    throw new BlockError(Errno.EINVAL, "export name too long to send to server");
  }
  if (opts["tls-creds"] !== undefined) {
    throw new BlockError(
      Errno.ENOTSUP,
      "TLS for the nbd protocol (tls-creds) is not supported yet",
    );
  }
  const dirtyBitmap = opts["x-dirty-bitmap"];
  if (
    dirtyBitmap !== undefined && new TextEncoder().encode(dirtyBitmap).length > NBD_MAX_STRING_SIZE
  ) {
    throw new BlockError(Errno.EINVAL, "x-dirty-bitmap query too long to send to server");
  }
  for (const k of Object.keys(opts)) {
    if (!TOP_KEYS.has(k) && !k.startsWith("server.")) {
      throw new BlockError(Errno.EINVAL, `Block protocol 'nbd' doesn't support the option '${k}'`);
    }
  }
  return { server, exportName, dirtyBitmap, openTimeoutS, reconnectDelayS };
}

/** QEMU_OPT_NUMBER: an unsigned integer (decimal, 0x hex or 0 octal); qemu wraps negatives. */
function numberOption(opts: Readonly<Record<string, string>>, key: string): number {
  const v = opts[key];
  if (v === undefined) return 0;
  const m = /^\s*(-?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9]\d*))$/.exec(v);
  if (!m) throw new BlockError(Errno.EINVAL, `Parameter '${key}' expects a number`);
  const n = m[2] !== undefined
    ? parseInt(m[2], 16)
    : m[3] !== undefined
    ? parseInt(m[3], 8)
    : Number(m[4]);
  return m[1] === "-" && n !== 0 ? Infinity : n;
}

function serverAddress(opts: Readonly<Record<string, string>>): NbdAddress {
  const legacy = { path: opts["path"], host: opts["host"], port: opts["port"] };
  const sub = new Map<string, string>();
  for (const [k, v] of Object.entries(opts)) if (k.startsWith("server.")) sub.set(k.slice(7), v);
  if (legacy.path !== undefined || legacy.host !== undefined || legacy.port !== undefined) {
    if (sub.size > 0) {
      throw new BlockError(Errno.EINVAL, "Cannot use 'server' and path/host/port at the same time");
    }
    if (legacy.path !== undefined && legacy.host !== undefined) {
      throw new BlockError(Errno.EINVAL, "path and host may not be used at the same time");
    }
    if (legacy.path !== undefined) {
      if (legacy.port !== undefined) {
        throw new BlockError(Errno.EINVAL, "port may not be used without host");
      }
      sub.set("type", "unix").set("path", legacy.path);
    } else if (legacy.host !== undefined) {
      sub.set("type", "inet").set("host", legacy.host).set(
        "port",
        legacy.port ?? String(NBD_DEFAULT_PORT),
      );
    } else {
      // port alone: qemu ignores it and then finds no server
    }
  }
  if (sub.size === 0) throw new BlockError(Errno.EINVAL, "NBD server address missing");
  const type = sub.get("type");
  if (type === undefined) throw new BlockError(Errno.EINVAL, "Parameter 'type' is missing");
  const need = (k: string): string => {
    const v = sub.get(k);
    if (v === undefined) throw new BlockError(Errno.EINVAL, `Parameter '${k}' is missing`);
    return v;
  };
  const only = (allowed: readonly string[]) => {
    for (const k of sub.keys()) {
      if (k !== "type" && !allowed.includes(k)) {
        throw new BlockError(Errno.EINVAL, `Parameter '${k}' is unexpected`);
      }
    }
  };
  switch (type) {
    case "inet": {
      const host = need("host");
      const port = need("port");
      only(INET_KEYS);
      return { type: "inet", host, port };
    }
    case "unix": {
      const path = need("path");
      only(UNIX_KEYS);
      if (isOn(sub.get("abstract"))) {
        throw new BlockError(
          Errno.ENOTSUP,
          "Abstract unix sockets (server.abstract) are not supported yet",
        );
      }
      return { type: "unix", path };
    }
    case "fd":
    case "vsock":
      throw new BlockError(Errno.ENOTSUP, `NBD server address type '${type}' is not supported yet`);
    default:
      throw new BlockError(Errno.EINVAL, `Parameter 'type' does not accept value '${type}'`);
  }
}

function isOn(v: string | undefined): boolean {
  return v === "on" || v === "yes" || v === "true" || v === "y";
}

/** The address as qemu's messages show it (`host:port`, IPv6 without brackets, or the path). */
export function describeAddress(a: NbdAddress): string {
  return a.type === "unix" ? a.path : `${a.host}:${a.port}`;
}

/** Deno's error text without its " (os error N)" suffix: glibc's strerror wording. */
function osText(e: unknown): string {
  const m = e instanceof Error ? e.message : String(e);
  return m.replace(/ \(os error \d+\)$/, "");
}

/** Open a socket to the server; failures carry qemu's wording. */
async function connectSocket(a: NbdAddress): Promise<Deno.Conn> {
  if (a.type === "unix") {
    // An empty path: connect(2) on a zero-length sun_path is refused.
    if (a.path === "") {
      throw new BlockError(Errno.EIO, "Failed to connect to '': Connection refused");
    }
    try {
      return await Deno.connect({ transport: "unix", path: a.path });
    } catch (e) {
      throw new BlockError(Errno.EIO, `Failed to connect to '${a.path}': ${osText(e)}`);
    }
  }
  const port = /^\d+$/.test(a.port) ? Number(a.port) : NaN;
  if (!(port <= 65535)) {
    throw new BlockError(
      Errno.EIO,
      `address resolution failed for ${a.host}:${a.port}: Servname not supported for ai_socktype`,
    );
  }
  try {
    const c = await Deno.connect({ transport: "tcp", hostname: a.host, port });
    c.setNoDelay(true);
    return c;
  } catch (e) {
    const text = osText(e);
    const lookup = /^failed to lookup address information: (.*)$/.exec(text);
    if (lookup) {
      throw new BlockError(
        Errno.EIO,
        `address resolution failed for ${a.host}:${a.port}: ${lookup[1]}`,
      );
    }
    throw new BlockError(Errno.EIO, `Failed to connect to '${a.host}:${a.port}': ${text}`);
  }
}

/**
 * One connection: connect, negotiate (bounded by `timeoutMs`), hand over to the transmission
 * client. Handshake errors become BlockError(EIO) with qemu's message.
 */
async function connectOnce(o: NbdOptions, timeoutMs: number): Promise<NbdClient> {
  let conn: Deno.Conn | undefined;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      conn?.close();
    } catch { /* closed */ }
  }, timeoutMs);
  try {
    const connecting = connectSocket(o.server);
    conn = await connecting;
    if (timedOut) {
      conn.close();
      throw new Error("timed out");
    }
    const oc = new OptionClient(conn);
    const info = await negotiate(oc, {
      exportName: o.exportName,
      metaContext: o.dirtyBitmap ?? "base:allocation",
    });
    return new NbdClient(conn, oc.reader, info);
  } catch (e) {
    try {
      conn?.close();
    } catch { /* closed */ }
    if (timedOut) {
      throw new BlockError(
        ETIMEDOUT,
        `Failed to connect to '${describeAddress(o.server)}': Connection timed out`,
      );
    }
    if (e instanceof BlockError) throw e;
    if (e instanceof NbdHandshakeError) throw new BlockError(Errno.EIO, e.message);
    throw new BlockError(Errno.EIO, `Failed to read initial magic: ${osText(e)}`);
  } finally {
    clearTimeout(timer);
  }
}

/** Connect, retrying connection failures until `deadline` (ms since epoch) when it is set. */
async function connectRetrying(
  o: NbdOptions,
  deadline: number,
  attemptMs: number,
): Promise<NbdClient> {
  for (let i = 0;; i++) {
    const left = deadline - Date.now();
    try {
      return await connectOnce(o, Math.max(1, Math.min(attemptMs, left)));
    } catch (e) {
      // Only a failed connect is retried; a server that answered and refused is final.
      const retriable = e instanceof BlockError &&
        (e.message.startsWith("Failed to connect") || e.message.startsWith("address resolution"));
      if (!retriable || Date.now() + RETRY_PAUSE_MS >= deadline || i > 100_000) throw e;
      await new Promise((r) => setTimeout(r, RETRY_PAUSE_MS));
    }
  }
}

/** Open an NBD export as a block device. */
export async function openNbdProtocol(
  opts: Readonly<Record<string, string>>,
  ctx: NbdOpenContext,
): Promise<BlockDevice> {
  const o = parseNbdOptions(opts);
  const bound = ctx.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
  const client = o.openTimeoutS > 0
    ? await connectRetrying(o, Date.now() + Math.min(o.openTimeoutS * 1000, 2 ** 31), bound)
    : await connectOnce(o, bound);
  const info = client.info;
  if (o.dirtyBitmap !== undefined && info.metaContextId === undefined) {
    await client.disconnect();
    // qemu 7.2 loses its own message here ("requested x-dirty-bitmap ... not found").
    throw new BlockError(Errno.EINVAL, "Could not open image: Invalid argument");
  }
  if (ctx.writable && (info.flags & NBD_FLAG_READ_ONLY)) {
    await client.disconnect();
    throw new BlockError(Errno.EACCES, "Could not open image: Permission denied");
  }
  return new NbdDevice(client, o, ctx.writable, bound);
}

/** Request flags as the device passes them to the client. */
function fuaBit(flags: WriteFlags, info: ExportInfo): number {
  return flags.fua && (info.flags & NBD_FLAG_SEND_FUA) ? NBD_CMD_FLAG_FUA : 0;
}

class NbdDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  #client: NbdClient;
  readonly #opts: NbdOptions;
  readonly #info: ExportInfo;
  readonly #maxIo: number;
  readonly #maxLen: number;
  readonly #attemptMs: number;
  #reconnecting: Promise<boolean> | undefined;
  #closed = false;
  #zeroes: Uint8Array | undefined;
  /** The cached data region `[#dataStart, #dataEnd)` of base:allocation; empty when equal. */
  #dataStart = 0;
  #dataEnd = 0;
  /** Bumped whenever the cache is dropped: answers to queries sent before are not cached. */
  #dataGen = 0;
  /** TRIM / WRITE_ZEROES requests in progress (nothing is cached meanwhile). */
  #unmaps = 0;

  constructor(client: NbdClient, opts: NbdOptions, writable: boolean, attemptMs: number) {
    this.#client = client;
    this.#opts = opts;
    this.#attemptMs = Math.min(attemptMs, RECONNECT_ATTEMPT_MS);
    const info = client.info;
    this.#info = info;
    this.size = info.size;
    const f = info.flags;
    // qemu's nbd_refresh_limits: without INFO_BLOCK_SIZE, byte access is safe when the size is
    // not sector-aligned or block status is in use; otherwise assume an old server and sectors.
    const minBlock = info.minBlock ||
      (info.size % 512 !== 0 || info.metaContextId !== undefined ? 1 : 512);
    this.#maxIo = Math.min(info.maxBlock || NBD_MAX_BUFFER_SIZE, NBD_MAX_BUFFER_SIZE);
    this.#maxLen = Math.floor(MAX_NO_PAYLOAD / minBlock) * minBlock;
    const canWrite = writable && !(f & NBD_FLAG_READ_ONLY);
    this.caps = {
      writable: canWrite,
      flush: (f & NBD_FLAG_SEND_FLUSH) !== 0,
      trim: canWrite && (f & NBD_FLAG_SEND_TRIM) !== 0,
      zero: canWrite && (f & NBD_FLAG_SEND_WRITE_ZEROES) !== 0,
      fastZero: canWrite && (f & NBD_FLAG_SEND_WRITE_ZEROES) !== 0 &&
        (f & NBD_FLAG_SEND_FAST_ZERO) !== 0,
      extents: info.metaContextId !== undefined,
      minBlock,
    };
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    for (let i = 0;; i++) {
      try {
        if (buf.length <= this.#maxIo) return await this.#client.read(buf, offset);
        return await this.#split(buf, offset, 0, false);
      } catch (e) {
        if (i > 100 || !(await this.#recover(e))) throw e;
      }
    }
  }

  async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    this.#checkWritable();
    const fua = fuaBit(flags, this.#info);
    for (let i = 0;; i++) {
      try {
        if (buf.length <= this.#maxIo) await this.#client.write(buf, offset, fua);
        else await this.#split(buf, offset, fua, true);
        break;
      } catch (e) {
        if (i > 100 || !(await this.#recover(e))) throw e;
      }
    }
    if (flags.fua && !fua) await this.flush();
  }

  #split(buf: Uint8Array, offset: number, flags: number, write: boolean): Promise<void> {
    const parts: Promise<void>[] = [];
    for (let at = 0; at < buf.length; at += this.#maxIo) {
      const part = buf.subarray(at, Math.min(buf.length, at + this.#maxIo));
      parts.push(
        write ? this.#client.write(part, offset + at, flags) : this.#client.read(part, offset + at),
      );
    }
    return settleAll(parts);
  }

  async flush(): Promise<void> {
    if (!(this.#info.flags & NBD_FLAG_SEND_FLUSH)) return;
    await this.#retry(() => this.#client.flush());
  }

  async trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    this.#checkWritable();
    if (!(this.#info.flags & NBD_FLAG_SEND_TRIM)) return;
    const fua = fuaBit(flags, this.#info);
    await this.#unmapping(() =>
      this.#ranges(offset, length, (o, n) => this.#client.trim(o, n, fua))
    );
    if (flags.fua && !fua) await this.flush();
  }

  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.#checkWritable();
    await this.#unmapping(() => this.#zero(offset, length, flags));
  }

  async #zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const f = this.#info.flags;
    if (!(f & NBD_FLAG_SEND_WRITE_ZEROES)) {
      if (flags.fastZero) throw new BlockError(Errno.ENOTSUP, "Fast zeroing is not supported");
      await this.#writeZeroes(offset, length, flags);
      return;
    }
    if (flags.fastZero && !(f & NBD_FLAG_SEND_FAST_ZERO)) {
      throw new BlockError(Errno.ENOTSUP, "Fast zeroing is not supported");
    }
    const bits = fuaBit(flags, this.#info) | (flags.noHole ? NBD_CMD_FLAG_NO_HOLE : 0) |
      (flags.fastZero ? NBD_CMD_FLAG_FAST_ZERO : 0);
    await this.#ranges(offset, length, (o, n) => this.#client.writeZeroes(o, n, bits));
    if (flags.fua && !(bits & NBD_CMD_FLAG_FUA)) await this.flush();
  }

  /** WRITE_ZEROES emulated with writes, for servers that lack it. */
  async #writeZeroes(offset: number, length: number, flags: WriteFlags): Promise<void> {
    const chunk = Math.min(ZERO_CHUNK, this.#maxIo);
    this.#zeroes ??= new Uint8Array(chunk);
    for (let at = 0; at < length; at += chunk) {
      const n = Math.min(chunk, length - at);
      await this.pwrite(this.#zeroes.subarray(0, n), offset + at, {});
    }
    if (flags.fua) await this.flush();
  }

  async cache(offset: number, length: number): Promise<void> {
    if (!(this.#info.flags & NBD_FLAG_SEND_CACHE)) return;
    await this.#ranges(offset, length, (o, n) => this.#client.cache(o, n));
  }

  async extents(offset: number, length: number, out: ExtentList): Promise<void> {
    if (this.#info.metaContextId === undefined) {
      out.add(length, 0);
      return;
    }
    const end = offset + length;
    const pairs: number[] = [];
    let pos = offset;
    if (this.#opts.dirtyBitmap === undefined) {
      // base:allocation: answer from the cached data region, else look ahead for a longer one.
      // The sparse read path asks before every READ, so this halves the origin round trips.
      if (pos >= this.#dataStart && pos < this.#dataEnd) {
        const n = Math.min(end, this.#dataEnd) - pos;
        out.add(n, 0);
        pos += n;
      }
      if (pos < end && !out.full) {
        const ahead = Math.min(this.size - pos, this.#maxLen);
        if (ahead > end - pos) {
          const gen = this.#dataGen;
          await this.#retry(() =>
            this.#client.blockStatus(pos, ahead, pairs, NBD_CMD_FLAG_REQ_ONE)
          );
          if (pairs.length === 0) {
            throw new BlockError(
              Errno.EIO,
              "NBD protocol error: block status reply without extents",
            );
          }
          const n = pairs[0]!;
          const flags = pairs[1]!;
          if (flags === 0 && gen === this.#dataGen && this.#unmaps === 0) {
            this.#cacheData(pos, pos + n);
          }
          out.add(Math.min(n, end - pos), flags);
          pos += Math.min(n, end - pos);
        }
      }
    }
    for (let i = 0; pos < end && !out.full && i < 1_000_000; i++) {
      pairs.length = 0;
      const n = Math.min(end - pos, this.#maxLen);
      await this.#retry(() => this.#client.blockStatus(pos, n, pairs));
      if (pairs.length === 0) {
        throw new BlockError(Errno.EIO, "NBD protocol error: block status reply without extents");
      }
      for (let k = 0; k < pairs.length && !out.full; k += 2) {
        out.add(pairs[k]!, pairs[k + 1]!);
        pos += pairs[k]!;
      }
    }
  }

  /**
   * Remember `[start, end)` as data (qemu's block-status cache for protocol nodes: only data
   * regions, one region, merged with the cached one when they touch). Stale entries are
   * harmless: a region written with zeroes by another client still reads correctly as data.
   */
  #cacheData(start: number, end: number): void {
    if (start <= this.#dataEnd && end >= this.#dataStart) {
      this.#dataStart = Math.min(start, this.#dataStart);
      this.#dataEnd = Math.max(end, this.#dataEnd);
    } else {
      this.#dataStart = start;
      this.#dataEnd = end;
    }
  }

  /** Forget the cached data region (after a reconnect; see {@link #unmapping}). */
  #dropDataCache(): void {
    this.#dataStart = this.#dataEnd = 0;
    this.#dataGen++;
  }

  /**
   * Runs a TRIM or WRITE_ZEROES: the cache is dropped before and after, and no block status
   * answer that arrives meanwhile (it may predate the change) is cached.
   */
  async #unmapping(op: () => Promise<void>): Promise<void> {
    this.#dropDataCache();
    this.#unmaps++;
    try {
      await op();
    } finally {
      this.#unmaps--;
      this.#dropDataCache();
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#reconnecting;
    await this.#client.disconnect();
  }

  #checkWritable(): void {
    if (!this.caps.writable) throw new BlockError(Errno.EPERM, "NBD export is read-only");
  }

  /** Split a payload-less request at the length bound and run the parts concurrently. */
  #ranges(
    offset: number,
    length: number,
    op: (o: number, n: number) => Promise<void>,
  ): Promise<void> {
    if (length <= this.#maxLen) return this.#retry(() => op(offset, length));
    return this.#retry(() => {
      const parts: Promise<void>[] = [];
      for (let at = 0; at < length; at += this.#maxLen) {
        parts.push(op(offset + at, Math.min(this.#maxLen, length - at)));
      }
      return settleAll(parts);
    });
  }

  async #retry(op: () => Promise<void>): Promise<void> {
    for (let i = 0;; i++) {
      try {
        return await op();
      } catch (e) {
        if (i > 100 || !(await this.#recover(e))) throw e;
      }
    }
  }

  /**
   * After a failure: true when the connection had been lost and is back (the caller sends the
   * request again). qemu's rules: requests in flight when the connection dropped wait for a
   * reconnect only under reconnect-delay; a request that finds the connection already lost
   * gets one attempt.
   */
  async #recover(e: unknown): Promise<boolean> {
    if (this.#closed || !(e instanceof BlockError) || e.errno !== Errno.EIO) return false;
    const broken = this.#client;
    if (broken.error === undefined) return false; // the server's answer, not a lost connection
    const delayMs = this.#opts.reconnectDelayS * 1000;
    // In flight when the connection dropped: only reconnect-delay makes such a request wait.
    if (e === broken.error && delayMs === 0) return false;
    if (this.#reconnecting === undefined) {
      this.#reconnecting = this.#reconnect(delayMs).finally(() => this.#reconnecting = undefined);
    }
    return await this.#reconnecting;
  }

  async #reconnect(windowMs: number): Promise<boolean> {
    const old = this.#client;
    await old.disconnect();
    try {
      const c = windowMs > 0
        ? await connectRetrying(
          this.#opts,
          Date.now() + Math.min(windowMs, 2 ** 31),
          this.#attemptMs,
        )
        : await connectOnce(this.#opts, this.#attemptMs);
      if (c.info.size !== this.size || c.info.flags !== this.#info.flags || this.#closed) {
        await c.disconnect();
        return false;
      }
      this.#client = c;
      this.#dropDataCache();
      return true;
    } catch {
      return false;
    }
  }
}

/** Await every part (so none is left unobserved), then throw the first failure. */
async function settleAll(parts: Promise<void>[]): Promise<void> {
  const r = await Promise.allSettled(parts);
  for (const x of r) if (x.status === "rejected") throw x.reason;
}
