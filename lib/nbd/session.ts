/**
 * One client connection: greeting, the handshake machine driven from the buffered reader, then
 * the transmission loop. One reader decodes requests, validates them apart from dispatch, runs
 * many at once against the block device, and replies go out whole through the ReplyWriter.
 *
 * Request validation follows qemu-nbd 7.2 (nbd_co_receive_request): every invalid request is
 * answered EINVAL; a WRITE whose payload was not consumed (over 32 MiB) also ends the connection.
 *
 * @module
 */

import {
  type BlockBitmap,
  type BlockDevice,
  ExtentList,
  type FileRange,
  STATE_ZERO,
} from "../block/types.ts";
import {
  commandName,
  META_ID_ALLOCATION_DEPTH,
  META_ID_BASE_ALLOCATION,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_FLAG_READ_ONLY,
  NBD_MAX_BLOCK_STATUS_EXTENTS,
  NBD_MAX_BUFFER_SIZE,
  NBD_OPT_EXPORT_NAME,
  NBD_REQUEST_SIZE,
  nbdErrno,
} from "./constants.ts";
import { BufferedReader, type ByteConn, ReplyWriter, TRANSMISSION_BUFFER } from "./conn_io.ts";
import { bufferPool } from "./buffer_pool.ts";
import {
  type ExportDescriptor,
  type HandshakeState,
  initialState,
  type Negotiated,
  step,
} from "./handshake.ts";
import { bitmapContextId } from "./meta_context.ts";
import {
  allocDataChunk,
  allocSimpleReply,
  CHUNK_DATA_OFFSET,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeDoneChunk,
  encodeErrorChunk,
  encodeGreeting,
  HOLE_CHUNK_SIZE,
  putDataChunkHeader,
  putHoleChunk,
  type Request,
  requestMagicOk,
  SIMPLE_DATA_OFFSET,
} from "./wire.ts";
import { BlockError } from "../block/types.ts";
import * as ev from "../trace/events.ts";
import { handleOf, nbdErrName } from "../trace/events.ts";
import { negotiationTraced, traceNegotiationStep } from "../trace/negotiate_trace.ts";
import { TlsError } from "../tls/tls_conn.ts";
import { PageCacheShortcut } from "../io/page_cache.ts";

/**
 * Requests run at once on one connection (qemu allows 16). Measured 2026-12-01 with fio QD128,
 * 4 KiB random reads under --cache=none (the disk is the bound): 16 → ~27k IOPS, 64 → ~41k,
 * 128 → ~43k (within noise of 64). Page-cache hits complete inline, so there the limit hardly
 * matters; 64 keeps memory per connection bounded below.
 */
export const MAX_IN_FLIGHT = 64;
/** Payload bytes held by in-flight requests on one connection before reading pauses. */
export const MAX_IN_FLIGHT_BYTES = 96 * 1024 * 1024;
/**
 * Reads at least this long go out with sendfile(2) where the transport and the device allow it
 * (shared/prototypes/lean_nbd.ts measured 1.1–1.2 → 1.5–1.7 GB/s); below it one copy is cheaper
 * than the extra system call.
 */
export const ZERO_COPY_MIN = 64 * 1024;

export interface SessionOptions {
  readonly export: ExportDescriptor;
  readonly device: BlockDevice;
  /** -B: the bitmaps behind `export.bitmaps`, index for index (see resolveExportBitmaps). */
  readonly bitmaps?: readonly BlockBitmap[];
  /** Seconds allowed for the handshake; 0 = no limit. */
  readonly handshakeLimit: number;
  /**
   * What qemu-nbd reports with error_report() whatever -v says: a failed negotiation, a client
   * dropped for a bad request. The caller adds the program name. Everything else is a trace point.
   */
  readonly report: (msg: string) => void;
  /**
   * --tls-creds: every option but STARTTLS is refused until `upgrade` has run TLS over the
   * connection (lib/tls/); the encrypted stream then carries the rest of the session.
   */
  readonly tls?: TlsUpgrade;
}

/** Turns a plain connection into an encrypted one after STARTTLS's ACK (throws to refuse). */
export interface TlsUpgrade {
  upgrade(conn: ByteConn): Promise<ByteConn>;
}

/** How a session ended: whether it reached transmission (qemu counts only those for -t). */
export interface SessionEnd {
  readonly negotiated: boolean;
}

/** Serve one connection until it closes. Never throws. */
export async function serveConnection(
  conn: ByteConn,
  options: SessionOptions,
): Promise<SessionEnd> {
  const io: ConnIo = {
    conn,
    reader: new BufferedReader(conn),
    writer: new ReplyWriter(conn),
    closed: false,
  };
  const closeConn = () => {
    if (io.closed) return;
    io.closed = true;
    try {
      io.conn.close();
    } catch { /* already closed */ }
  };
  let negotiated: Negotiated | undefined;
  try {
    negotiated = await handshake(io, options, closeConn);
    if (negotiated === undefined) return { negotiated: false };
    io.reader.reserve(TRANSMISSION_BUFFER);
    await new Transmission(io.reader, io.writer, options, negotiated).run();
    return { negotiated: true };
  } catch (e) {
    options.report(
      `Disconnect client, due to: ${
        isSocketError(e) ? socketError(e, "read from") : e instanceof Error ? e.message : String(e)
      }`,
    );
    if (ev.denbd_internal_error.on) ev.denbd_internal_error.emit(describeException(e));
    return { negotiated: negotiated !== undefined };
  } finally {
    await io.writer.drain();
    closeConn();
  }
}

/** The connection and its reader and writer: replaced once, when STARTTLS encrypts it. */
interface ConnIo {
  conn: ByteConn;
  reader: BufferedReader;
  writer: ReplyWriter;
  closed: boolean;
}

async function handshake(
  io: ConnIo,
  options: SessionOptions,
  closeConn: () => void,
): Promise<Negotiated | undefined> {
  let timedOut = false;
  const timer = options.handshakeLimit > 0
    ? setTimeout(() => {
      timedOut = true;
      if (ev.nbd_handshake_timer_cb.on) ev.nbd_handshake_timer_cb.emit();
      // As qemu's shutdown of the socket: the pending read ends and is reported as EOF.
      closeConn();
    }, options.handshakeLimit * 1000)
    : undefined;
  const traced = negotiationTraced();
  try {
    if (ev.nbd_negotiate_begin.on) ev.nbd_negotiate_begin.emit();
    io.writer.send(encodeGreeting());
    let state = initialState(options.export, options.tls !== undefined);
    for (;;) {
      const reader = io.reader;
      const input = reader.peek();
      const res = step(state, input);
      if (traced) traceNegotiationStep(state, input, res);
      reader.skip(res.consumed);
      for (const r of res.replies) io.writer.send(r);
      state = res.state;
      switch (res.effect.kind) {
        case "continue":
          continue;
        case "more": {
          let cause = EOF_DATA;
          try {
            if (await reader.fillMore()) continue;
          } catch (e) {
            if (!timedOut) cause = socketError(e, "read from");
          }
          options.report(
            `option negotiation failed: ${readingWhat(state, reader.available)}${cause}`,
          );
          return undefined;
        }
        case "starttls": {
          const failure = await startTls(io, options.tls!);
          if (failure === undefined) continue;
          options.report(`option negotiation failed: ${failure}`);
          return undefined;
        }
        case "go":
          return res.effect.negotiated;
        case "close":
          if (!res.effect.clean) options.report(`option negotiation failed: ${res.effect.reason}`);
          return undefined;
      }
    }
  } finally {
    if (timer !== undefined) clearTimeout(timer);
  }
}

/**
 * After STARTTLS's ACK: run the TLS handshake and carry on over the encrypted stream. Returns
 * why it failed, or undefined. Bytes the client sent after STARTTLS before the handshake are a
 * protocol error (the handshake must start on a clean stream).
 */
async function startTls(io: ConnIo, tls: TlsUpgrade): Promise<string | undefined> {
  if (ev.nbd_negotiate_handle_starttls.on) ev.nbd_negotiate_handle_starttls.emit();
  await io.writer.drain();
  if (io.writer.failed !== undefined) return socketError(io.writer.failed, "write to");
  if (io.reader.available > 0) return "client sent data after NBD_OPT_STARTTLS before TLS";
  if (ev.nbd_negotiate_handle_starttls_handshake.on) {
    ev.nbd_negotiate_handle_starttls_handshake.emit();
  }
  try {
    const secure = await tls.upgrade(io.conn);
    io.conn = secure;
    io.reader = new BufferedReader(secure);
    io.writer = new ReplyWriter(secure);
    return undefined;
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
}

/** The transmission phase of one connection. */
class Transmission {
  readonly #reader: BufferedReader;
  readonly #writer: ReplyWriter;
  readonly #dev: BlockDevice;
  readonly #bitmaps: readonly BlockBitmap[];
  readonly #size: number;
  readonly #readOnly: boolean;
  readonly #structured: boolean;
  readonly #neg: Negotiated;
  readonly #report: (msg: string) => void;
  #inFlight = 0;
  #inFlightBytes = 0;
  #slotFree: (() => void) | undefined;
  #fatal = false;

  constructor(
    reader: BufferedReader,
    writer: ReplyWriter,
    options: SessionOptions,
    neg: Negotiated,
  ) {
    this.#reader = reader;
    this.#writer = writer;
    this.#dev = options.device;
    this.#bitmaps = options.bitmaps ?? [];
    this.#size = neg.export.size;
    this.#readOnly = (neg.flags & NBD_FLAG_READ_ONLY) !== 0;
    this.#structured = neg.structured;
    this.#neg = neg;
    this.#report = options.report;
  }

  async run(): Promise<void> {
    const reader = this.#reader;
    const req: Request = {
      magic: 0,
      flags: 0,
      type: 0,
      cookieHi: 0,
      cookieLo: 0,
      offset: 0,
      length: 0,
    };
    try {
      while (!this.#fatal && this.#writer.failed === undefined) {
        if (this.#inFlight >= MAX_IN_FLIGHT || this.#inFlightBytes >= MAX_IN_FLIGHT_BYTES) {
          await new Promise<void>((resolve) => this.#slotFree = resolve);
          continue;
        }
        if (ev.nbd_trip.on) ev.nbd_trip.emit();
        let whole: boolean;
        try {
          whole = await reader.fill(NBD_REQUEST_SIZE);
        } catch (e) {
          this.#disconnect(socketError(e, "read from"));
          break;
        }
        if (!whole) {
          // The client went away; between requests that is no error for qemu.
          if (reader.available > 0) this.#disconnect(EOF_BYTES);
          break;
        }
        decodeRequest(reader.dataView, reader.position, req);
        reader.skip(NBD_REQUEST_SIZE);
        if (ev.nbd_receive_request.on) {
          ev.nbd_receive_request.emit(req.magic, req.flags, req.type, req.offset, req.length);
        }
        if (!requestMagicOk(req)) {
          this.#disconnect(INTERMEDIATE);
          this.#replyError(
            req.cookieHi,
            req.cookieLo,
            NBD_EINVAL,
            `invalid magic (got 0x${req.magic.toString(16)})`,
          );
          break;
        }
        if (ev.nbd_co_receive_request_decode_type.on) {
          ev.nbd_co_receive_request_decode_type.emit(
            handleOf(req.cookieHi, req.cookieLo),
            req.type,
            commandName(req.type),
          );
        }
        if (req.type === NBD_CMD_DISC) {
          if (ev.nbd_trip.on) ev.nbd_trip.emit(); // qemu starts the next read before it stops
          break;
        }

        let payload: Uint8Array | undefined;
        if (req.type === NBD_CMD_WRITE) {
          if (req.length > NBD_MAX_BUFFER_SIZE) {
            // The payload cannot be consumed safely: answer, then drop the connection.
            this.#disconnect(INTERMEDIATE);
            this.#replyError(
              req.cookieHi,
              req.cookieLo,
              NBD_EINVAL,
              `len (${req.length}) is larger than max len (${NBD_MAX_BUFFER_SIZE})`,
            );
            break;
          }
          const data = bufferPool.get(req.length);
          payload = data;
          let got = false;
          let cause = EOF_DATA;
          try {
            got = await reader.readInto(data, 0, req.length);
          } catch (e) {
            cause = socketError(e, "read from");
          }
          if (!got) {
            bufferPool.put(data);
            this.#disconnect(`Failed to read CMD_WRITE data: ${cause}`);
            break;
          }
          if (ev.nbd_co_receive_request_payload_received.on) {
            ev.nbd_co_receive_request_payload_received.emit(
              handleOf(req.cookieHi, req.cookieLo),
              req.length,
            );
          }
        }
        const invalid = this.#validate(req);
        if (invalid !== undefined) {
          if (payload) bufferPool.put(payload);
          this.#replyError(req.cookieHi, req.cookieLo, NBD_EINVAL, invalid);
          continue;
        }
        if (req.type === NBD_CMD_READ && this.#fastRead(req)) continue;
        if (payload !== undefined && this.#fastWrite(req, payload)) {
          bufferPool.put(payload);
          continue;
        }
        this.#start(
          req.type,
          req.flags,
          req.cookieHi,
          req.cookieLo,
          req.offset,
          req.length,
          payload,
        );
      }
    } finally {
      // Outstanding requests finish and are answered before the connection closes (DISC rule).
      while (this.#inFlight > 0) await new Promise<void>((resolve) => this.#slotFree = resolve);
    }
    await this.#writer.drain();
    const failed = this.#writer.failed;
    if (failed !== undefined) {
      this.#disconnect(`Failed to send reply: ${socketError(failed, "write to")}`);
    }
  }

  /** qemu's "Disconnect client, due to: ..." (said once per connection). */
  #disconnect(why: string): void {
    if (this.#fatal) return;
    this.#fatal = true;
    this.#report(`Disconnect client, due to: ${why}`);
  }

  /** qemu 7.2's checks, in its order; returns the error message or undefined. */
  #validate(r: Request): string | undefined {
    const t = r.type;
    let validFlags = NBD_CMD_FLAG_FUA;
    switch (t) {
      case NBD_CMD_READ:
        if (this.#structured) validFlags |= NBD_CMD_FLAG_DF;
        if (r.length > NBD_MAX_BUFFER_SIZE) {
          return `len (${r.length}) is larger than max len (${NBD_MAX_BUFFER_SIZE})`;
        }
        break;
      case NBD_CMD_CACHE:
        if (r.length > NBD_MAX_BUFFER_SIZE) {
          return `len (${r.length}) is larger than max len (${NBD_MAX_BUFFER_SIZE})`;
        }
        break;
      case NBD_CMD_WRITE_ZEROES:
        validFlags |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
        break;
      case NBD_CMD_BLOCK_STATUS:
        validFlags |= NBD_CMD_FLAG_REQ_ONE;
        break;
    }
    if (
      this.#readOnly && (t === NBD_CMD_WRITE || t === NBD_CMD_TRIM || t === NBD_CMD_WRITE_ZEROES)
    ) {
      return "Export is read-only";
    }
    if (r.offset > this.#size || r.length > this.#size - r.offset) {
      return `operation past EOF; From: ${r.offset}, Len: ${r.length}, Size: ${this.#size}`;
    }
    if (r.flags & ~validFlags) {
      return `unsupported flags for command ${commandName(t)} (got 0x${r.flags.toString(16)})`;
    }
    if (t > NBD_CMD_BLOCK_STATUS) return `invalid request type (${t}) received`;
    return undefined;
  }

  #start(
    type: number,
    flags: number,
    cookieHi: number,
    cookieLo: number,
    offset: number,
    length: number,
    payload: Uint8Array | undefined,
  ): void {
    const bytes = type === NBD_CMD_READ || type === NBD_CMD_WRITE ? length : 0;
    this.#inFlight++;
    this.#inFlightBytes += bytes;
    this.#dispatch(type, flags, cookieHi, cookieLo, offset, length, payload)
      .catch((e) => this.#failed(type, cookieHi, cookieLo, e))
      .finally(() => {
        if (payload) bufferPool.put(payload);
        this.#inFlight--;
        this.#inFlightBytes -= bytes;
        const wake = this.#slotFree;
        this.#slotFree = undefined;
        wake?.();
      });
  }

  async #dispatch(
    type: number,
    flags: number,
    cookieHi: number,
    cookieLo: number,
    offset: number,
    length: number,
    payload: Uint8Array | undefined,
  ): Promise<void> {
    const dev = this.#dev;
    const fua = (flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (type) {
      case NBD_CMD_READ:
        if (fua) await dev.flush(); // qemu flushes before a FUA read
        return await this.#read(flags, cookieHi, cookieLo, offset, length);
      case NBD_CMD_WRITE:
        await dev.pwrite(payload!, offset, { fua });
        return this.#replyOk(cookieHi, cookieLo);
      case NBD_CMD_FLUSH:
        await dev.flush();
        return this.#replyOk(cookieHi, cookieLo);
      case NBD_CMD_TRIM:
        await dev.trim(offset, length, { fua });
        if (fua) await dev.flush();
        return this.#replyOk(cookieHi, cookieLo);
      case NBD_CMD_WRITE_ZEROES:
        await dev.zero(offset, length, {
          fua,
          noHole: (flags & NBD_CMD_FLAG_NO_HOLE) !== 0,
          fastZero: (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
        });
        return this.#replyOk(cookieHi, cookieLo);
      case NBD_CMD_CACHE:
        await dev.cache(offset, length);
        return this.#replyOk(cookieHi, cookieLo);
      case NBD_CMD_BLOCK_STATUS:
        return await this.#blockStatus(flags, cookieHi, cookieLo, offset, length);
    }
  }

  async #read(
    flags: number,
    cookieHi: number,
    cookieLo: number,
    offset: number,
    length: number,
  ): Promise<void> {
    const dev = this.#dev;
    if (!this.#structured) {
      if (this.#zeroCopy(length)) {
        const range = dev.fileRange!(offset, length);
        if (range !== undefined) {
          if (ev.nbd_co_send_simple_reply.on) {
            ev.nbd_co_send_simple_reply.emit(handleOf(cookieHi, cookieLo), 0, "success", length);
          }
          return this.#sendFromFile(cookieHi, cookieLo, offset, length, range);
        }
      }
      const reply = allocSimpleReply(cookieHi, cookieLo, 0, length, POOL_GET);
      await readOrRelease(dev, reply.subarray(SIMPLE_DATA_OFFSET), offset, reply);
      if (ev.nbd_co_send_simple_reply.on) {
        ev.nbd_co_send_simple_reply.emit(handleOf(cookieHi, cookieLo), 0, "success", length);
      }
      return this.#writer.send(reply, POOL_PUT);
    }
    if (length === 0) {
      if (ev.nbd_co_send_structured_done.on) {
        ev.nbd_co_send_structured_done.emit(handleOf(cookieHi, cookieLo));
      }
      return this.#writer.send(encodeDoneChunk(cookieHi, cookieLo));
    }
    if (flags & NBD_CMD_FLAG_DF) return await this.#readWhole(cookieHi, cookieLo, offset, length);
    // Sparse read as qemu does it: one chunk per extent, zero extents as OFFSET_HOLE.
    const pairs = await this.#collect(offset, length, 1024, (o, l, out) => dev.extents(o, l, out));
    if (!hasZero(pairs)) return await this.#readWhole(cookieHi, cookieLo, offset, length);
    // Lay out every chunk in one buffer, then fill the data chunks concurrently.
    let total = 0;
    let pos = 0;
    const runs: number[] = []; // start, length, isHole
    for (let i = 0; i < pairs.length && pos < length; i += 2) {
      const len = Math.min(pairs[i]!, length - pos);
      const hole = (pairs[i + 1]! & STATE_ZERO) !== 0;
      runs.push(pos, len, hole ? 1 : 0);
      total += hole ? HOLE_CHUNK_SIZE : CHUNK_DATA_OFFSET + len;
      pos += len;
    }
    if (pos < length) {
      runs.push(pos, length - pos, 0);
      total += CHUNK_DATA_OFFSET + length - pos;
    }
    const buf = bufferPool.get(total);
    const reads: Promise<void>[] = [];
    let at = 0;
    for (let i = 0; i < runs.length; i += 3) {
      const start = runs[i]!;
      const len = runs[i + 1]!;
      const last = i + 3 >= runs.length;
      if (runs[i + 2]) {
        putHoleChunk(buf, at, cookieHi, cookieLo, offset + start, len, last);
        at += HOLE_CHUNK_SIZE;
      } else {
        putDataChunkHeader(buf, at, cookieHi, cookieLo, offset + start, len, last);
        reads.push(
          dev.pread(
            buf.subarray(at + CHUNK_DATA_OFFSET, at + CHUNK_DATA_OFFSET + len),
            offset + start,
          ),
        );
        at += CHUNK_DATA_OFFSET + len;
      }
    }
    try {
      await Promise.all(reads);
    } catch (e) {
      bufferPool.put(buf);
      throw e;
    }
    if (ev.nbd_co_send_structured_read.on || ev.nbd_co_send_structured_read_hole.on) {
      traceSparseRead(handleOf(cookieHi, cookieLo), offset, runs);
    }
    this.#writer.send(buf, POOL_PUT);
  }

  /** One OFFSET_DATA chunk covering the whole request. */
  async #readWhole(
    cookieHi: number,
    cookieLo: number,
    offset: number,
    length: number,
  ): Promise<void> {
    if (this.#zeroCopy(length)) {
      const range = this.#dev.fileRange!(offset, length);
      if (range !== undefined) {
        if (ev.nbd_co_send_structured_read.on) {
          ev.nbd_co_send_structured_read.emit(handleOf(cookieHi, cookieLo), offset, length);
        }
        return this.#sendFromFile(cookieHi, cookieLo, offset, length, range);
      }
    }
    const reply = allocDataChunk(cookieHi, cookieLo, offset, length, true, POOL_GET);
    await readOrRelease(this.#dev, reply.subarray(CHUNK_DATA_OFFSET), offset, reply);
    if (ev.nbd_co_send_structured_read.on) {
      ev.nbd_co_send_structured_read.emit(handleOf(cookieHi, cookieLo), offset, length);
    }
    this.#writer.send(reply, POOL_PUT);
  }

  /**
   * A READ answered at once, without a promise: the device says the range lies unchanged in a
   * file (and, for a sparse-capable structured read, that it is all data), and the page cache
   * holds it (preadv2 RWF_NOWAIT), or it is long enough for sendfile. Anything else -- FUA, a
   * page-cache miss, a range not known to be data, tracing -- takes the general path. This is the
   * shape of the prototype's synchronous loop (shared/prototypes/lean_nbd.ts) for the common case.
   */
  #fastRead(r: Request): boolean {
    const dev = this.#dev;
    if (dev.fileRange === undefined || r.length === 0 || (r.flags & NBD_CMD_FLAG_FUA) !== 0) {
      return false;
    }
    if (ev.nbd_co_send_structured_read.on || ev.nbd_co_send_simple_reply.on) return false;
    const range = dev.fileRange(r.offset, r.length);
    const structured = this.#structured;
    if (range === undefined) return false;
    if (structured && !range.data && (r.flags & NBD_CMD_FLAG_DF) === 0) return false;
    if (r.length >= ZERO_COPY_MIN && this.#writer.zeroCopy) {
      this.#sendFromFile(r.cookieHi, r.cookieLo, r.offset, r.length, range);
      return true;
    }
    const reply = structured
      ? allocDataChunk(r.cookieHi, r.cookieLo, r.offset, r.length, true, POOL_GET)
      : allocSimpleReply(r.cookieHi, r.cookieLo, 0, r.length, POOL_GET);
    const at = structured ? CHUNK_DATA_OFFSET : SIMPLE_DATA_OFFSET;
    const cache = this.#cacheFor(range.fd);
    if (cache.read(reply.subarray(at), range.offset) !== r.length) {
      bufferPool.put(reply);
      return false;
    }
    this.#writer.send(reply, POOL_PUT);
    return true;
  }

  /**
   * A plain WRITE done at once: the device lets it go straight into the file, and the inline
   * page-cache write (pwritev2, with its back-off when writes stall) takes it. Otherwise the
   * general path runs it.
   */
  #fastWrite(r: Request, payload: Uint8Array): boolean {
    const dev = this.#dev;
    if (dev.writeRange === undefined || (r.flags & NBD_CMD_FLAG_FUA) !== 0) return false;
    if (ev.nbd_co_send_simple_reply.on) return false;
    const range = dev.writeRange(r.offset, r.length);
    if (range === undefined) return false;
    if (this.#cacheFor(range.fd).write(payload, range.offset) !== r.length) return false;
    this.#writer.send(allocSimpleReply(r.cookieHi, r.cookieLo, 0, 0));
    return true;
  }

  #cache: PageCacheShortcut | undefined;
  #cacheFd = -1;

  #cacheFor(fd: number): PageCacheShortcut {
    if (this.#cacheFd !== fd || this.#cache === undefined) {
      this.#cache = new PageCacheShortcut(fd, true);
      this.#cacheFd = fd;
    }
    return this.#cache;
  }

  /**
   * A whole read reply -- a simple reply, or one OFFSET_DATA chunk -- whose data goes out with
   * sendfile from `range`.
   */
  #sendFromFile(
    cookieHi: number,
    cookieLo: number,
    offset: number,
    length: number,
    range: FileRange,
  ): void {
    let header: Uint8Array;
    if (this.#structured) {
      header = new Uint8Array(CHUNK_DATA_OFFSET);
      putDataChunkHeader(header, 0, cookieHi, cookieLo, offset, length, true);
    } else {
      header = allocSimpleReply(cookieHi, cookieLo, 0, 0);
    }
    this.#writer.sendFile(header, range.fd, range.offset, length);
  }

  /** Whether a read of `length` may go out with sendfile (the device must still agree). */
  #zeroCopy(length: number): boolean {
    return length >= ZERO_COPY_MIN && this.#writer.zeroCopy && this.#dev.fileRange !== undefined;
  }

  async #blockStatus(
    flags: number,
    cookieHi: number,
    cookieLo: number,
    offset: number,
    length: number,
  ): Promise<void> {
    if (length === 0) {
      return this.#replyError(cookieHi, cookieLo, NBD_EINVAL, "need non-zero length");
    }
    const meta = this.#neg.meta;
    if (meta.count === 0) {
      return this.#replyError(cookieHi, cookieLo, NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated");
    }
    const reqOne = (flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    const max = reqOne ? 1 : NBD_MAX_BLOCK_STATUS_EXTENTS;
    const chunks: Uint8Array[] = [];
    let remaining = meta.count;
    if (meta.baseAllocation) {
      const ext = await this.#collect(
        offset,
        length,
        max,
        (o, l, out) => this.#dev.extents(o, l, out),
      );
      chunks.push(
        this.#extentsChunk(cookieHi, cookieLo, META_ID_BASE_ALLOCATION, ext, --remaining === 0),
      );
    }
    if (meta.allocationDepth) {
      const dev = this.#dev;
      const ext = await this.#collect(
        offset,
        length,
        max,
        (o, l, out) =>
          dev.allocationDepth
            ? dev.allocationDepth(o, l, out)
            : Promise.resolve(void out.add(l, 1)),
      );
      chunks.push(
        this.#extentsChunk(cookieHi, cookieLo, META_ID_ALLOCATION_DEPTH, ext, --remaining === 0),
      );
    }
    // qemu:dirty-bitmap:NAME, in export order (qemu's nbd_co_send_bitmap).
    for (const i of meta.bitmaps) {
      const ext = new ExtentList(max);
      const bitmap = this.#bitmaps[i];
      if (bitmap !== undefined) bitmap.extents(offset, length, ext);
      else ext.add(length, 0);
      chunks.push(
        this.#extentsChunk(cookieHi, cookieLo, bitmapContextId(i), ext.pairs, --remaining === 0),
      );
    }
    for (const c of chunks) this.#writer.send(c);
  }

  /** Gather extents over `[offset, offset+length)`, clamped to the request. */
  async #collect(
    offset: number,
    length: number,
    max: number,
    fetch: (offset: number, length: number, out: ExtentList) => Promise<void>,
  ): Promise<number[]> {
    const ext = new ExtentList(max);
    while (ext.total < length && !ext.full) {
      const before = ext.total;
      await fetch(offset + ext.total, length - ext.total, ext);
      if (ext.total === before) {
        ext.add(length - ext.total, 0);
        break;
      }
    }
    // With several extents the last may not overrun; clamp it so replies stay inside the request.
    const pairs = ext.pairs;
    let sum = 0;
    for (let i = 0; i < pairs.length; i += 2) {
      if (sum + pairs[i]! >= length) {
        pairs[i] = length - sum;
        pairs.length = i + 2;
        break;
      }
      sum += pairs[i]!;
    }
    return pairs;
  }

  /** One block-status chunk: `pairs` are (length, flags) pairs. */
  #extentsChunk(
    cookieHi: number,
    cookieLo: number,
    id: number,
    pairs: readonly number[],
    last: boolean,
  ): Uint8Array {
    if (ev.nbd_co_send_extents.on) {
      let covered = 0;
      for (let i = 0; i < pairs.length; i += 2) covered += pairs[i]!;
      ev.nbd_co_send_extents.emit(
        handleOf(cookieHi, cookieLo),
        pairs.length / 2,
        id,
        covered,
        last,
      );
    }
    return encodeBlockStatusChunk(cookieHi, cookieLo, id, pairs, last);
  }

  #replyOk(cookieHi: number, cookieLo: number): void {
    if (ev.nbd_co_send_simple_reply.on) {
      ev.nbd_co_send_simple_reply.emit(handleOf(cookieHi, cookieLo), 0, "success", 0);
    }
    this.#writer.send(allocSimpleReply(cookieHi, cookieLo, 0, 0));
  }

  #replyError(cookieHi: number, cookieLo: number, error: number, message: string): void {
    if (this.#structured) {
      if (ev.nbd_co_send_structured_error.on) {
        ev.nbd_co_send_structured_error.emit(
          handleOf(cookieHi, cookieLo),
          error,
          nbdErrName(error),
          message,
        );
      }
      this.#writer.send(encodeErrorChunk(cookieHi, cookieLo, error, message));
    } else {
      if (ev.nbd_co_send_simple_reply.on) {
        ev.nbd_co_send_simple_reply.emit(handleOf(cookieHi, cookieLo), error, nbdErrName(error), 0);
      }
      this.#writer.send(allocSimpleReply(cookieHi, cookieLo, error, 0));
    }
  }

  #failed(type: number, cookieHi: number, cookieLo: number, e: unknown): void {
    const errno = e instanceof BlockError ? e.errno : 5;
    const msg = e instanceof Error ? e.message : String(e);
    // qemu-nbd sends the error to the client and prints nothing: trace points only.
    if (ev.denbd_request_failed.on) {
      ev.denbd_request_failed.emit(handleOf(cookieHi, cookieLo), commandName(type), msg);
    }
    if (!(e instanceof BlockError) && ev.denbd_internal_error.on) {
      // A bug rather than an I/O error: answered EIO, and the stack is there for whoever traces.
      ev.denbd_internal_error.emit(describeException(e));
    }
    this.#replyError(cookieHi, cookieLo, nbdErrno(errno), msg);
  }
}

const POOL_GET = (size: number) => bufferPool.get(size);
const POOL_PUT = (buf: Uint8Array) => bufferPool.put(buf);

/** Read into a pooled reply buffer, returning the buffer to the pool if the read fails. */
async function readOrRelease(
  dev: BlockDevice,
  dest: Uint8Array,
  offset: number,
  whole: Uint8Array,
): Promise<void> {
  try {
    await dev.pread(dest, offset);
  } catch (e) {
    bufferPool.put(whole);
    throw e;
  }
}

/** The chunks of a sparse read, as qemu traces them (data and hole chunks in order). */
function traceSparseRead(handle: bigint, offset: number, runs: readonly number[]): void {
  for (let i = 0; i < runs.length; i += 3) {
    if (runs[i + 2]) {
      if (ev.nbd_co_send_structured_read_hole.on) {
        ev.nbd_co_send_structured_read_hole.emit(handle, offset + runs[i]!, runs[i + 1]!);
      }
    } else if (ev.nbd_co_send_structured_read.on) {
      ev.nbd_co_send_structured_read.emit(handle, offset + runs[i]!, runs[i + 1]!);
    }
  }
}

/** qemu's wording for an end of file in the middle of a message. */
const EOF_DATA = "Unexpected end-of-file before all data were read";
/** ... and for one in the middle of a request header (nbd_read_eof's variant). */
const EOF_BYTES = "Unexpected end-of-file before all bytes were read";
/** What qemu 7.2 says when it drops a client for a request it could not take in. */
const INTERMEDIATE = "Request handling failed in intermediate state";

/** A socket error in qemu's words ("Unable to read from socket: Connection reset by peer"). */
function isSocketError(e: unknown): boolean {
  return e instanceof Deno.errors.ConnectionReset || e instanceof Deno.errors.BrokenPipe ||
    e instanceof TlsError;
}

function socketError(e: unknown, op: "read from" | "write to"): string {
  // A TLS channel's errors carry qemu's own words ("Cannot read from TLS channel: ...").
  if (e instanceof TlsError) return e.message;
  let why: string;
  if (e instanceof Deno.errors.ConnectionReset) why = "Connection reset by peer";
  else if (e instanceof Deno.errors.BrokenPipe) why = "Broken pipe";
  else {
    const msg = e instanceof Error ? e.message : String(e);
    why = /^(.*?) \(os error \d+\)/.exec(msg)?.[1] ?? msg;
  }
  return `Unable to ${op} socket: ${why}`;
}

/**
 * What qemu was reading when negotiation hit an end of file: its message names the field (the
 * client flags, the three parts of an option header, an export name); option data has no name.
 */
function readingWhat(state: HandshakeState, buffered: number): string {
  switch (state.kind) {
    case "clientFlags":
      return "Failed to read flags: ";
    case "optionHeader":
      if (buffered < 8) return "Failed to read opts magic: ";
      return buffered < 12 ? "Failed to read option: " : "Failed to read option length: ";
    case "optionData":
      return state.option === NBD_OPT_EXPORT_NAME ? "Failed to read export name: " : "";
    case "skip":
    case "finished":
      return "";
  }
}

function describeException(e: unknown): string {
  return e instanceof Error ? (e.stack ?? e.message) : String(e);
}

function hasZero(pairs: readonly number[]): boolean {
  for (let i = 1; i < pairs.length; i += 2) if (pairs[i]! & STATE_ZERO) return true;
  return false;
}
