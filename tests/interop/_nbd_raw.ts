/**
 * A minimal NBD client over a raw socket, for the tests that send what libnbd never would (bad
 * magic, unknown commands, garbage in the handshake). Constants are spelled out here on purpose,
 * independent of lib/nbd, so a wrong constant in the server cannot hide in the test.
 *
 * Every read has a deadline; on timeout the connection is closed and the read settles, so tests
 * stay sanitizer-clean.
 *
 * @module
 */

import { closeQuietly } from "./_harness.ts";

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const ERR = 0x80000000;
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERR + 1,
  ERR_POLICY: ERR + 2,
  ERR_INVALID: ERR + 3,
  ERR_PLATFORM: ERR + 4,
  ERR_TLS_REQD: ERR + 5,
  ERR_UNKNOWN: ERR + 6,
  ERR_SHUTDOWN: ERR + 7,
  ERR_BLOCK_SIZE_REQD: ERR + 8,
  ERR_TOO_BIG: ERR + 9,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CMD_FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 } as const;

export const REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

export const EINVAL = 22;
export const EPERM = 1;

/** One option reply. */
export interface OptReply {
  readonly option: number;
  readonly type: number;
  readonly data: Uint8Array;
}

/** A simple reply, or one structured reply chunk. */
export type Reply =
  | { kind: "simple"; error: number; cookie: bigint }
  | {
    kind: "chunk";
    flags: number;
    type: number;
    cookie: bigint;
    payload: Uint8Array;
  };

/** Thrown when the peer closed the connection while a read was expected. */
export class ClosedError extends Error {}

const enc = new TextEncoder();

/** Buffered NBD connection with deadline-bounded reads. */
export class RawConn {
  readonly conn: Deno.Conn;
  #buf = new Uint8Array(0);
  #closed = false;
  /** Default deadline for one read, ms. */
  timeoutMs = 5000;

  constructor(conn: Deno.Conn) {
    this.conn = conn;
  }

  /** Closes the socket (idempotent). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    closeQuietly(this.conn);
  }

  /** Writes all of `data`; a write to a peer that hung up throws. */
  async write(data: Uint8Array): Promise<void> {
    let off = 0;
    while (off < data.length) off += await this.conn.write(data.subarray(off));
  }

  /** Reads exactly `n` bytes or throws ClosedError on EOF, Error on timeout. */
  async readExact(n: number, timeoutMs = this.timeoutMs): Promise<Uint8Array> {
    const r = await this.#fill(n, timeoutMs);
    if (r === "eof") throw new ClosedError(`connection closed while reading ${n} bytes`);
    const out = this.#buf.slice(0, n);
    this.#buf = this.#buf.slice(n);
    return out;
  }

  /**
   * Waits until the server closes the connection (EOF or reset), discarding any bytes it still
   * sends. Returns false if it is still open after `timeoutMs`.
   */
  async waitClosed(timeoutMs = 3000): Promise<boolean> {
    const r = await this.#fill(Number.MAX_SAFE_INTEGER, timeoutMs).catch(() => "timeout" as const);
    return r === "eof";
  }

  async #fill(n: number, timeoutMs: number): Promise<"ok" | "eof"> {
    if (this.#buf.length >= n) return "ok";
    let timer: ReturnType<typeof setTimeout> | undefined;
    let timedOut = false;
    const deadline = new Promise<"timeout">((r) =>
      timer = setTimeout(() => {
        timedOut = true;
        r("timeout");
      }, timeoutMs)
    );
    const reading = (async (): Promise<"ok" | "eof"> => {
      const chunk = new Uint8Array(64 * 1024);
      while (this.#buf.length < n) {
        let got: number | null;
        try {
          got = await this.conn.read(chunk);
        } catch (e) {
          if (timedOut) return "eof";
          // A reset by the peer is a disconnect too.
          if (e instanceof Deno.errors.ConnectionReset || e instanceof Deno.errors.BrokenPipe) {
            return "eof";
          }
          throw e;
        }
        if (got === null) return "eof";
        const b = new Uint8Array(this.#buf.length + got);
        b.set(this.#buf);
        b.set(chunk.subarray(0, got), this.#buf.length);
        this.#buf = b;
      }
      return "ok";
    })();
    try {
      const r = await Promise.race([reading, deadline]);
      if (r !== "timeout") return r;
      this.close();
      await reading.catch(() => {});
      throw new Error(`read of ${n} bytes timed out after ${timeoutMs} ms`);
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- handshake

  /** Reads the 18-byte newstyle greeting and returns the handshake flags. */
  async greeting(): Promise<number> {
    const b = await this.readExact(18);
    const v = view(b);
    if (v.getBigUint64(0) !== NBDMAGIC) throw new Error("bad NBDMAGIC in greeting");
    if (v.getBigUint64(8) !== IHAVEOPT) throw new Error("bad IHAVEOPT in greeting");
    return v.getUint16(16);
  }

  /** Sends the 32-bit client flags. */
  clientFlags(flags: number): Promise<void> {
    const b = new Uint8Array(4);
    view(b).setUint32(0, flags >>> 0);
    return this.write(b);
  }

  /** Sends one option request. */
  sendOption(option: number, data: Uint8Array = new Uint8Array(0)): Promise<void> {
    const b = new Uint8Array(16 + data.length);
    const v = view(b);
    v.setBigUint64(0, IHAVEOPT);
    v.setUint32(8, option >>> 0);
    v.setUint32(12, data.length);
    b.set(data, 16);
    return this.write(b);
  }

  /** Reads one option reply. */
  async optReply(): Promise<OptReply> {
    const h = view(await this.readExact(20));
    if (h.getBigUint64(0) !== OPT_REPLY_MAGIC) throw new Error("bad option reply magic");
    const option = h.getUint32(8);
    const type = h.getUint32(12);
    const len = h.getUint32(16);
    if (len > 1 << 20) throw new Error(`option reply too long: ${len}`);
    const data = await this.readExact(len);
    return { option, type, data };
  }

  /** Reads replies until ACK or an error type; returns all of them (the final one last). */
  async optReplies(max = 1000): Promise<OptReply[]> {
    const out: OptReply[] = [];
    for (let i = 0; i < max; i++) {
      const r = await this.optReply();
      out.push(r);
      if (r.type === REP.ACK || (r.type & ERR) !== 0) return out;
    }
    throw new Error(`more than ${max} option replies`);
  }

  /** Greeting + fixed-newstyle client flags (FIXED_NEWSTYLE | NO_ZEROES by default). */
  async handshake(flags = 3): Promise<number> {
    const hs = await this.greeting();
    await this.clientFlags(flags);
    return hs;
  }

  /**
   * Full negotiation into transmission: optional STRUCTURED_REPLY and SET_META_CONTEXT, then GO.
   * Returns the export size and transmission flags.
   */
  async negotiate(
    opts: { name?: string; structured?: boolean; contexts?: readonly string[] } = {},
  ): Promise<{ size: bigint; flags: number; contextIds: Map<string, number> }> {
    await this.handshake();
    const name = opts.name ?? "";
    if (opts.structured) {
      await this.sendOption(OPT.STRUCTURED_REPLY);
      const r = await this.optReply();
      if (r.type !== REP.ACK) {
        throw new Error(`STRUCTURED_REPLY: reply type ${r.type.toString(16)}`);
      }
    }
    const contextIds = new Map<string, number>();
    if (opts.contexts !== undefined) {
      await this.sendOption(OPT.SET_META_CONTEXT, metaContextQuery(name, opts.contexts));
      for (const r of await this.optReplies()) {
        if (r.type === REP.META_CONTEXT) {
          contextIds.set(new TextDecoder().decode(r.data.subarray(4)), view(r.data).getUint32(0));
        } else if (r.type !== REP.ACK) {
          throw new Error(`SET_META_CONTEXT: reply type ${r.type.toString(16)}`);
        }
      }
    }
    await this.sendOption(OPT.GO, infoRequest(name, []));
    let size = -1n;
    let flags = -1;
    for (const r of await this.optReplies()) {
      if (r.type === REP.INFO && view(r.data).getUint16(0) === INFO.EXPORT) {
        size = view(r.data).getBigUint64(2);
        flags = view(r.data).getUint16(10);
      } else if (r.type !== REP.INFO && r.type !== REP.ACK) {
        throw new Error(`GO: reply type ${r.type.toString(16)}`);
      }
    }
    if (flags < 0) throw new Error("GO: no INFO_EXPORT before ACK");
    return { size, flags, contextIds };
  }

  // ---- transmission

  /** Sends one compact request header (and payload, if any). */
  request(
    r: {
      type: number;
      flags?: number;
      cookie?: bigint;
      offset?: bigint | number;
      length: number;
      magic?: number;
      payload?: Uint8Array;
    },
  ): Promise<void> {
    const p = r.payload ?? new Uint8Array(0);
    const b = new Uint8Array(28 + p.length);
    const v = view(b);
    v.setUint32(0, r.magic ?? REQUEST_MAGIC);
    v.setUint16(4, r.flags ?? 0);
    v.setUint16(6, r.type);
    v.setBigUint64(8, r.cookie ?? 1n);
    v.setBigUint64(16, BigInt(r.offset ?? 0));
    v.setUint32(24, r.length >>> 0);
    b.set(p, 28);
    return this.write(b);
  }

  /**
   * Reads one reply: a simple reply header (READ data, if any, is left for the caller to read
   * with readExact) or a whole structured chunk.
   */
  async reply(): Promise<Reply> {
    const m = view(await this.readExact(4)).getUint32(0);
    if (m === SIMPLE_REPLY_MAGIC) {
      const v = view(await this.readExact(12));
      return { kind: "simple", error: v.getUint32(0), cookie: v.getBigUint64(4) };
    }
    if (m === STRUCTURED_REPLY_MAGIC) {
      const v = view(await this.readExact(16));
      const len = v.getUint32(12);
      if (len > 64 << 20) throw new Error(`structured chunk too long: ${len}`);
      return {
        kind: "chunk",
        flags: v.getUint16(0),
        type: v.getUint16(2),
        cookie: v.getBigUint64(4),
        payload: await this.readExact(len),
      };
    }
    throw new Error(`bad reply magic 0x${m.toString(16)}`);
  }

  /**
   * Reads a whole reply to one request (simple, or chunks until DONE). For a successful simple
   * READ pass `readLength` to consume its data. Returns the NBD error (0 on success), the data
   * read (simple or OFFSET_DATA/HOLE assembled), and the chunks seen.
   */
  async fullReply(readLength = 0): Promise<{ error: number; chunks: Reply[]; data?: Uint8Array }> {
    const first = await this.reply();
    if (first.kind === "simple") {
      if (first.error === 0 && readLength > 0) {
        return { error: 0, chunks: [first], data: await this.readExact(readLength) };
      }
      return { error: first.error, chunks: [first] };
    }
    const chunks: Reply[] = [first];
    let c: Reply = first;
    for (let i = 0; i < 10000 && c.kind === "chunk" && (c.flags & 1) === 0; i++) {
      c = await this.reply();
      chunks.push(c);
    }
    let error = 0;
    for (const ch of chunks) {
      if (ch.kind === "chunk" && (ch.type & 0x8000) !== 0) error = view(ch.payload).getUint32(0);
    }
    return { error, chunks };
  }

  /** Sends READ and returns the data (simple replies only) or throws on error. */
  async read(offset: number, length: number, cookie = 7n): Promise<Uint8Array> {
    await this.request({ type: CMD.READ, offset, length, cookie });
    const r = await this.fullReply(length);
    if (r.error !== 0) throw new Error(`READ ${offset}+${length}: error ${r.error}`);
    if (r.data !== undefined) return r.data;
    // Structured: assemble.
    const out = new Uint8Array(length);
    for (const c of r.chunks) {
      if (c.kind !== "chunk") continue;
      if (c.type === REPLY_TYPE.OFFSET_DATA) {
        const off = Number(view(c.payload).getBigUint64(0)) - offset;
        out.set(c.payload.subarray(8), off);
      }
    }
    return out;
  }
}

/** Connects a RawConn to a server. */
export async function rawConnect(
  server: { connect(): Promise<Deno.Conn> },
): Promise<RawConn> {
  return new RawConn(await server.connect());
}

/** DataView over a Uint8Array's own bytes. */
export function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** INFO/GO request data: u32 name length, name, u16 count, u16 info types. */
export function infoRequest(name: string, infos: readonly number[]): Uint8Array {
  const n = enc.encode(name);
  const b = new Uint8Array(4 + n.length + 2 + 2 * infos.length);
  const v = view(b);
  v.setUint32(0, n.length);
  b.set(n, 4);
  v.setUint16(4 + n.length, infos.length);
  infos.forEach((t, i) => v.setUint16(6 + n.length + 2 * i, t));
  return b;
}

/** LIST/SET_META_CONTEXT request data: export name and queries. */
export function metaContextQuery(name: string, queries: readonly string[]): Uint8Array {
  const n = enc.encode(name);
  const qs = queries.map((q) => enc.encode(q));
  const total = 4 + n.length + 4 + qs.reduce((a, q) => a + 4 + q.length, 0);
  const b = new Uint8Array(total);
  const v = view(b);
  v.setUint32(0, n.length);
  b.set(n, 4);
  let off = 4 + n.length;
  v.setUint32(off, qs.length);
  off += 4;
  for (const q of qs) {
    v.setUint32(off, q.length);
    b.set(q, off + 4);
    off += 4 + q.length;
  }
  return b;
}

/** Names of option reply types, for readable assertion messages. */
export function repName(type: number): string {
  for (const [k, v] of Object.entries(REP)) if (v === type) return k;
  return `0x${type.toString(16)}`;
}
