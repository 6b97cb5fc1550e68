/**
 * denbd's one NBD client: the option-phase pieces (greeting, options, replies) shared by `-L`
 * (list_client.ts) and the `nbd` protocol driver, qemu's negotiation order for opening an export
 * (nbd/client.c `nbd_receive_negotiate`: STRUCTURED_REPLY, SET_META_CONTEXT, GO with
 * INFO_BLOCK_SIZE, EXPORT_NAME for servers without GO, oldstyle servers), and the transmission
 * phase: many requests in flight on one connection, told apart by cookie, answered by simple or
 * structured replies that one reader loop decodes straight into the callers' buffers.
 *
 * Errors: negotiation fails with {@link NbdHandshakeError} (qemu's wording); a request the server
 * refuses rejects with a BlockError carrying the errno the NBD error maps to; a broken or closed
 * connection rejects every request in flight, and every later one, with EIO.
 *
 * @module
 */

import {
  IHAVEOPT,
  NBD_CHUNK_HEADER_SIZE,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_MAX_STRING_SIZE,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_REPLY_MAGIC,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBDMAGIC,
  optionName,
} from "./constants.ts";
import { BufferedReader, type ByteConn, ReplyWriter, writeAll } from "./conn_io.ts";
import { bufferPool } from "./buffer_pool.ts";
import { fromUtf8, utf8, view } from "./wire.ts";
import { BlockError, Errno } from "../block/types.ts";

// ---------------------------------------------------------------------------------------------
// Option phase

/** Negotiation failed; the message is qemu's (a "server reported" line may follow). */
export class NbdHandshakeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "NbdHandshakeError";
  }
}

/** What the server's greeting said. */
export type Greeting =
  | { readonly style: "newstyle"; readonly fixed: boolean; readonly noZeroes: boolean }
  | { readonly style: "oldstyle"; readonly size: number; readonly flags: number };

/** The oldstyle greeting's second magic ("cliserv" magic). */
const NBD_CLISERV_MAGIC = 0x00420281861253n;
/** Option replies larger than this are refused (the spec's largest sane reply is far smaller). */
const MAX_OPTION_REPLY = 64 * 1024 * 1024;

/** One option reply. */
export interface OptionReply {
  readonly type: number;
  readonly data: Uint8Array;
}

/**
 * The option phase over one connection: greeting, options out, replies in. Keeps its buffered
 * reader so the transmission phase can take over the bytes that are already buffered.
 */
export class OptionClient {
  readonly #conn: ByteConn;
  readonly #reader: BufferedReader;

  constructor(conn: ByteConn) {
    this.#conn = conn;
    this.#reader = new BufferedReader(conn);
  }

  /** The connection's buffered reader (hand it to {@link NbdClient} after negotiation). */
  get reader(): BufferedReader {
    return this.#reader;
  }

  /**
   * Read the greeting. For a newstyle server, answer with our client flags (FIXED_NEWSTYLE and
   * NO_ZEROES where the server offers them, as qemu does); oldstyle servers get nothing.
   */
  async greet(): Promise<Greeting> {
    const hello = await this.take(16);
    const v = view(hello);
    if (v.getBigUint64(0) !== NBDMAGIC) {
      throw new NbdHandshakeError(`Bad initial magic received: 0x${hex(v.getBigUint64(0))}`);
    }
    const magic = v.getBigUint64(8);
    if (magic === NBD_CLISERV_MAGIC) {
      const rest = view(await this.take(8 + 4 + 124));
      return { style: "oldstyle", size: Number(rest.getBigUint64(0)), flags: rest.getUint32(8) };
    }
    if (magic !== IHAVEOPT) {
      throw new NbdHandshakeError(`Bad server magic received: 0x${hex(magic)}`);
    }
    const flags = view(await this.take(2)).getUint16(0);
    const fixed = (flags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (flags & NBD_FLAG_NO_ZEROES) !== 0;
    const reply = new Uint8Array(4);
    view(reply).setUint32(
      0,
      (fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0),
    );
    await writeAll(this.#conn, reply);
    return { style: "newstyle", fixed, noZeroes };
  }

  /** Send one option with its payload. */
  async send(option: number, data: Uint8Array = new Uint8Array()): Promise<void> {
    const b = new Uint8Array(16 + data.length);
    const v = view(b);
    v.setBigUint64(0, IHAVEOPT);
    v.setUint32(8, option);
    v.setUint32(12, data.length);
    b.set(data, 16);
    await writeAll(this.#conn, b);
  }

  /** Next option reply: its type and payload. */
  async reply(option: number): Promise<OptionReply> {
    const h = view(await this.take(20));
    if (h.getBigUint64(0) !== NBD_OPT_REPLY_MAGIC || h.getUint32(8) !== option) {
      throw new Error("Unexpected option reply from server");
    }
    const len = h.getUint32(16);
    if (len > MAX_OPTION_REPLY) throw new Error("Option reply too large");
    return { type: h.getUint32(12), data: await this.take(len) };
  }

  /** The next `n` bytes (a copy). */
  async take(n: number): Promise<Uint8Array> {
    if (!(await this.#reader.fill(n))) throw new Error("Server closed the connection");
    const out = this.#reader.peek().slice(0, n);
    this.#reader.skip(n);
    return out;
  }
}

function hex(n: bigint): string {
  return n.toString(16);
}

/** `u32 length, name` followed by `extra` (the start of INFO/GO/LIST_META_CONTEXT payloads). */
export function nameQuery(name: string, extra: Uint8Array = new Uint8Array()): Uint8Array {
  const n = utf8(name);
  const b = new Uint8Array(4 + n.length + extra.length);
  view(b).setUint32(0, n.length);
  b.set(n, 4);
  b.set(extra, 4 + n.length);
  return b;
}

/**
 * The error for an option reply of an error type, in qemu's words (nbd/client.c
 * `nbd_handle_reply_err`); the server's message goes on a "server reported:" line.
 */
export function optionReplyError(option: number, reply: OptionReply): NbdHandshakeError {
  const o = `option ${option} (${optionName(option)})`;
  let msg: string;
  switch (reply.type) {
    case NBD_REP_ERR_POLICY:
      msg = `Denied by server for ${o}`;
      break;
    case NBD_REP_ERR_INVALID:
      msg = `Invalid parameters for ${o}`;
      break;
    case NBD_REP_ERR_PLATFORM:
      msg = `Server lacks support for ${o}`;
      break;
    case NBD_REP_ERR_TLS_REQD:
      msg = `TLS negotiation required before ${o}\nDid you forget a valid tls-creds?`;
      break;
    case NBD_REP_ERR_UNKNOWN:
      msg = "Requested export not available";
      break;
    case NBD_REP_ERR_SHUTDOWN:
      msg = `Server shutting down before ${o}`;
      break;
    case NBD_REP_ERR_BLOCK_SIZE_REQD:
      msg = `Server requires INFO_BLOCK_SIZE for ${o}`;
      break;
    default:
      msg = `Unknown error code when asking for ${o}`;
  }
  const text = reply.data.length > 0 ? fromUtf8(reply.data) : undefined;
  return new NbdHandshakeError(text ? `${msg}\nserver reported: ${text}` : msg);
}

function isErrorReply(type: number): boolean {
  return type >= 0x80000000;
}

/** What to ask for when opening an export. */
export interface NegotiateOptions {
  /** Export name (default ""). */
  readonly exportName?: string;
  /** Ask for structured replies (default true). */
  readonly structuredReply?: boolean;
  /**
   * The one meta context to select: "base:allocation" for block status, or qemu's
   * `x-dirty-bitmap` name in its place; undefined selects none. Needs structured replies.
   */
  readonly metaContext?: string;
  /**
   * Ask for INFO_BLOCK_SIZE in NBD_OPT_GO (default true). qemu-nbd -c's client does not: the
   * kernel is told 512-byte sectors unless the server insists on more.
   */
  readonly requestBlockSize?: boolean;
}

/** The export as negotiated. */
export interface ExportInfo {
  readonly size: number;
  /** Transmission flags (NBD_FLAG_*). */
  readonly flags: number;
  /** INFO_BLOCK_SIZE; 0 when the server sent none. */
  readonly minBlock: number;
  readonly optBlock: number;
  readonly maxBlock: number;
  /** Structured replies are in use. */
  readonly structured: boolean;
  /** Id of the selected meta context, undefined when the server did not select it. */
  readonly metaContextId: number | undefined;
}

/**
 * Negotiate an export the way qemu's client does. On failure after the greeting, NBD_OPT_ABORT
 * is sent as a courtesy before the error is thrown (the caller closes the connection).
 */
export async function negotiate(
  oc: OptionClient,
  opts: NegotiateOptions = {},
): Promise<ExportInfo> {
  const name = opts.exportName ?? "";
  if (utf8(name).length > NBD_MAX_STRING_SIZE) {
    throw new NbdHandshakeError("export name too long to send to server");
  }
  const g = await oc.greet();
  if (g.style === "oldstyle") {
    if (name !== "") throw new NbdHandshakeError("Server does not support non-empty export names");
    return {
      size: g.size,
      flags: g.flags & 0xffff,
      minBlock: 0,
      optBlock: 0,
      maxBlock: 0,
      structured: false,
      metaContextId: undefined,
    };
  }
  if (!g.fixed) return await exportName(oc, name, g.noZeroes, false, undefined);
  try {
    let structured = false;
    if (opts.structuredReply ?? true) {
      await oc.send(NBD_OPT_STRUCTURED_REPLY);
      const r = await oc.reply(NBD_OPT_STRUCTURED_REPLY);
      if (r.type === NBD_REP_ACK) structured = true;
      else if (r.type !== NBD_REP_ERR_UNSUP) throw optionReplyError(NBD_OPT_STRUCTURED_REPLY, r);
    }
    let contextId: number | undefined;
    if (structured && opts.metaContext !== undefined) {
      contextId = await setMetaContext(oc, name, opts.metaContext);
    }
    const go = await optGo(oc, name, opts.requestBlockSize ?? true);
    if (go === undefined) return await exportName(oc, name, g.noZeroes, structured, contextId);
    return { ...go, structured, metaContextId: contextId };
  } catch (e) {
    if (e instanceof NbdHandshakeError) await oc.send(NBD_OPT_ABORT).catch(() => {});
    throw e;
  }
}

/** SET_META_CONTEXT with one query; the id the server gave it, or undefined. */
async function setMetaContext(
  oc: OptionClient,
  exportName: string,
  context: string,
): Promise<number | undefined> {
  const q = utf8(context);
  const extra = new Uint8Array(8 + q.length);
  view(extra).setUint32(0, 1);
  view(extra).setUint32(4, q.length);
  extra.set(q, 8);
  await oc.send(NBD_OPT_SET_META_CONTEXT, nameQuery(exportName, extra));
  let id: number | undefined;
  for (let i = 0; i < 1024; i++) {
    const r = await oc.reply(NBD_OPT_SET_META_CONTEXT);
    if (r.type === NBD_REP_ACK) return id;
    if (r.type === NBD_REP_ERR_UNSUP) return undefined;
    if (isErrorReply(r.type)) throw optionReplyError(NBD_OPT_SET_META_CONTEXT, r);
    if (r.type !== NBD_REP_META_CONTEXT || r.data.length < 4) {
      throw new NbdHandshakeError("Unexpected reply type for NBD_OPT_SET_META_CONTEXT");
    }
    if (id !== undefined) {
      throw new NbdHandshakeError("Server replied with more than one context");
    }
    if (fromUtf8(r.data.subarray(4)) !== context) {
      throw new NbdHandshakeError(
        `Server replied with unexpected meta context ${
          JSON.stringify(fromUtf8(r.data.subarray(4)) ?? "")
        }`,
      );
    }
    id = view(r.data).getUint32(0);
  }
  throw new NbdHandshakeError("Too many replies to NBD_OPT_SET_META_CONTEXT");
}

type GoResult = Omit<ExportInfo, "structured" | "metaContextId">;

/** NBD_OPT_GO asking for INFO_BLOCK_SIZE; undefined when the server does not know GO. */
async function optGo(
  oc: OptionClient,
  exportName: string,
  requestBlockSize: boolean,
): Promise<GoResult | undefined> {
  const req = new Uint8Array(requestBlockSize ? 4 : 2);
  view(req).setUint16(0, requestBlockSize ? 1 : 0);
  if (requestBlockSize) view(req).setUint16(2, NBD_INFO_BLOCK_SIZE);
  await oc.send(NBD_OPT_GO, nameQuery(exportName, req));
  let size = -1;
  let flags = 0;
  let minBlock = 0;
  let optBlock = 0;
  let maxBlock = 0;
  for (let i = 0; i < 1024; i++) {
    const r = await oc.reply(NBD_OPT_GO);
    if (r.type === NBD_REP_ERR_UNSUP) return undefined;
    if (isErrorReply(r.type)) throw optionReplyError(NBD_OPT_GO, r);
    if (r.type === NBD_REP_ACK) {
      if (size < 0) throw new NbdHandshakeError("broken server omitted NBD_INFO_EXPORT");
      return { size, flags, minBlock, optBlock, maxBlock };
    }
    if (r.type !== NBD_REP_INFO || r.data.length < 2) {
      throw new NbdHandshakeError(`unexpected reply type ${r.type} to NBD_OPT_GO`);
    }
    const v = view(r.data);
    const t = v.getUint16(0);
    if (t === NBD_INFO_EXPORT) {
      if (r.data.length !== 12) throw new NbdHandshakeError("remaining export info len is wrong");
      size = Number(v.getBigUint64(2));
      flags = v.getUint16(10);
    } else if (t === NBD_INFO_BLOCK_SIZE) {
      if (r.data.length !== 14) throw new NbdHandshakeError("remaining export info len is wrong");
      minBlock = v.getUint32(2);
      optBlock = v.getUint32(6);
      maxBlock = v.getUint32(10);
      checkBlockSizes(minBlock, optBlock, maxBlock);
    } // NAME, DESCRIPTION and unknown infos are not needed here
  }
  throw new NbdHandshakeError("Too many replies to NBD_OPT_GO");
}

/** The sanity checks qemu applies to INFO_BLOCK_SIZE. */
function checkBlockSizes(min: number, opt: number, max: number): void {
  const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
  if (!pow2(min)) {
    throw new NbdHandshakeError(`server minimum block size ${min} is not a power of two`);
  }
  if (!pow2(opt)) {
    throw new NbdHandshakeError(`server preferred block size ${opt} is not a power of two`);
  }
  if (max < Math.min(opt, 32 * 1024 * 1024) || max % min !== 0) {
    throw new NbdHandshakeError(`server maximum block size ${max} is not valid`);
  }
}

/** NBD_OPT_EXPORT_NAME: the old way in, which has no error reply (the server just hangs up). */
async function exportName(
  oc: OptionClient,
  name: string,
  noZeroes: boolean,
  structured: boolean,
  metaContextId: number | undefined,
): Promise<ExportInfo> {
  await oc.send(NBD_OPT_EXPORT_NAME, utf8(name));
  let b: Uint8Array;
  try {
    b = await oc.take(noZeroes ? 10 : 134);
  } catch {
    throw new NbdHandshakeError("Requested export not available");
  }
  const v = view(b);
  return {
    size: Number(v.getBigUint64(0)),
    flags: v.getUint16(8),
    minBlock: 0,
    optBlock: 0,
    maxBlock: 0,
    structured,
    metaContextId,
  };
}

// ---------------------------------------------------------------------------------------------
// Transmission

/** Command flags for {@link NbdClient} requests, as NBD_CMD_FLAG_* wire bits. */
export type CommandFlags = number;

/** How many requests go out at once by default (more wait for a free slot). */
const DEFAULT_MAX_IN_FLIGHT = 64;
/** Non-data chunk payloads (errors, block status) larger than this break the connection. */
const MAX_CHUNK_PAYLOAD = 64 * 1024 * 1024;

/** One request in flight. Slots are reused; `seq` (the cookie's high half) tells uses apart. */
class Slot {
  readonly index: number;
  seq = 0;
  busy = false;
  type = 0;
  offset = 0;
  length = 0;
  /** READ: the caller's buffer. */
  buf: Uint8Array | undefined = undefined;
  /** BLOCK_STATUS: extents of the selected context are appended here as (length, flags). */
  extents: number[] | undefined = undefined;
  /** First error a chunk reported (NBD error number), 0 if none. */
  error = 0;
  message = "";
  resolve: () => void = noop;
  reject: (e: unknown) => void = noop;
  constructor(index: number) {
    this.index = index;
  }
}

function noop(): void {}

/** NBD error number → errno (qemu's `nbd_errno_to_system_errno`; unknown values become EINVAL). */
export function systemErrno(nbdError: number): number {
  switch (nbdError) {
    case NBD_EPERM:
      return Errno.EPERM;
    case NBD_EIO:
      return Errno.EIO;
    case NBD_ENOMEM:
      return Errno.ENOMEM;
    case NBD_ENOSPC:
      return Errno.ENOSPC;
    case NBD_EOVERFLOW:
      return Errno.EOVERFLOW;
    case NBD_ENOTSUP:
      return Errno.ENOTSUP;
    case NBD_ESHUTDOWN:
      return Errno.ESHUTDOWN;
    case NBD_EINVAL:
    default:
      return Errno.EINVAL;
  }
}

const ERRNO_TEXT: Record<number, string> = {
  [Errno.EPERM]: "Operation not permitted",
  [Errno.EIO]: "Input/output error",
  [Errno.ENOMEM]: "Cannot allocate memory",
  [Errno.EINVAL]: "Invalid argument",
  [Errno.ENOSPC]: "No space left on device",
  [Errno.EOVERFLOW]: "Value too large for defined data type",
  [Errno.ENOTSUP]: "Operation not supported",
  [Errno.ESHUTDOWN]: "Cannot send after transport endpoint shutdown",
};

/** Options for {@link NbdClient}. */
export interface NbdClientOptions {
  /** Requests sent at once at most (default 64); further requests wait for a reply. */
  readonly maxInFlight?: number;
}

/**
 * The transmission phase on one negotiated connection. Requests may be issued concurrently;
 * each promise settles when its reply (all chunks, for structured replies) has arrived.
 */
export class NbdClient {
  readonly info: ExportInfo;
  readonly #conn: ByteConn;
  readonly #reader: BufferedReader;
  readonly #writer: ReplyWriter;
  readonly #slots: Slot[] = [];
  readonly #free: number[] = [];
  readonly #waiters: (() => void)[] = [];
  readonly #loop: Promise<void>;
  /** Set once the connection is unusable: the error every request gets from then on. */
  #dead: BlockError | undefined;
  #closing = false;
  #watchingWrites = false;
  /** Requests without payload waiting for the end of this turn (see `#flushBatch`). */
  readonly #batch: Uint8Array[] = [];
  #batchBytes = 0;
  #batchScheduled = false;

  constructor(
    conn: ByteConn,
    reader: BufferedReader,
    info: ExportInfo,
    opts: NbdClientOptions = {},
  ) {
    this.#conn = conn;
    this.#reader = reader;
    this.#writer = new ReplyWriter(conn);
    this.info = info;
    const n = Math.max(1, opts.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT);
    for (let i = 0; i < n; i++) {
      this.#slots.push(new Slot(i));
      this.#free.push(n - 1 - i);
    }
    this.#loop = this.#readLoop();
  }

  /**
   * The error that ended the connection, if it has ended: requests in flight then were rejected
   * with this very object; later ones get a copy.
   */
  get error(): BlockError | undefined {
    return this.#dead;
  }

  /** Requests waiting for their reply. */
  get inFlight(): number {
    return this.#slots.length - this.#free.length;
  }

  /** NBD_CMD_READ into all of `buf`. */
  read(buf: Uint8Array, offset: number, flags: CommandFlags = 0): Promise<void> {
    return this.#request(NBD_CMD_READ, flags, offset, buf.length, undefined, buf, undefined);
  }

  /** NBD_CMD_WRITE of `buf` (header and payload go out in one write). */
  write(buf: Uint8Array, offset: number, flags: CommandFlags = 0): Promise<void> {
    return this.#request(NBD_CMD_WRITE, flags, offset, buf.length, buf, undefined, undefined);
  }

  /** NBD_CMD_FLUSH. */
  flush(): Promise<void> {
    return this.#request(NBD_CMD_FLUSH, 0, 0, 0, undefined, undefined, undefined);
  }

  /** NBD_CMD_TRIM. */
  trim(offset: number, length: number, flags: CommandFlags = 0): Promise<void> {
    return this.#request(NBD_CMD_TRIM, flags, offset, length, undefined, undefined, undefined);
  }

  /** NBD_CMD_WRITE_ZEROES. */
  writeZeroes(offset: number, length: number, flags: CommandFlags = 0): Promise<void> {
    return this.#request(
      NBD_CMD_WRITE_ZEROES,
      flags,
      offset,
      length,
      undefined,
      undefined,
      undefined,
    );
  }

  /** NBD_CMD_CACHE. */
  cache(offset: number, length: number): Promise<void> {
    return this.#request(NBD_CMD_CACHE, 0, offset, length, undefined, undefined, undefined);
  }

  /**
   * NBD_CMD_BLOCK_STATUS for the negotiated meta context: its extents, clipped to the request,
   * are appended to `out` as flat (length, flags) pairs. The server may cover less than asked.
   */
  blockStatus(
    offset: number,
    length: number,
    out: number[],
    flags: CommandFlags = 0,
  ): Promise<void> {
    if (this.info.metaContextId === undefined) {
      return Promise.reject(new BlockError(Errno.ENOTSUP, "No meta context was negotiated"));
    }
    return this.#request(NBD_CMD_BLOCK_STATUS, flags, offset, length, undefined, undefined, out);
  }

  /**
   * Send NBD_CMD_DISC and close the connection. Requests still in flight fail with EIO. Safe to
   * call more than once and after the connection broke.
   */
  async disconnect(): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      if (this.#dead === undefined) {
        const b = new Uint8Array(NBD_REQUEST_SIZE);
        putRequest(view(b), NBD_CMD_DISC, 0, 0, 0, 0, 0);
        this.#flushBatch(); // requests issued just before still go first
        this.#writer.send(b);
        await this.#writer.drain();
      }
      this.#fail(new BlockError(Errno.EIO, "NBD connection closed"));
    }
    await this.#loop;
  }

  async #request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: Uint8Array | undefined,
    buf: Uint8Array | undefined,
    extents: number[] | undefined,
  ): Promise<void> {
    // A fresh error for requests issued after the loss, so callers can tell them from the ones
    // that were in flight when it happened (those get `error` itself).
    if (this.#dead) throw new BlockError(Errno.EIO, this.#dead.message);
    if (length > 0xffffffff || offset + length > Number.MAX_SAFE_INTEGER) {
      throw new BlockError(Errno.EINVAL, `NBD request too large (${length} bytes at ${offset})`);
    }
    while (this.#free.length === 0) {
      await new Promise<void>((r) => this.#waiters.push(r));
      const dead = this.error; // may have changed while waiting
      if (dead) throw new BlockError(Errno.EIO, dead.message);
    }
    const slot = this.#slots[this.#free.pop()!]!;
    slot.busy = true;
    slot.seq = (slot.seq + 1) >>> 0;
    slot.type = type;
    slot.offset = offset;
    slot.length = length;
    slot.buf = buf;
    slot.extents = extents;
    slot.error = 0;
    slot.message = "";
    const done = new Promise<void>((resolve, reject) => {
      slot.resolve = resolve;
      slot.reject = reject;
    });
    const size = NBD_REQUEST_SIZE + (payload?.length ?? 0);
    const b = bufferPool.get(size);
    putRequest(view(b), type, flags, slot.seq, slot.index, offset, length);
    if (payload) b.set(payload, NBD_REQUEST_SIZE);
    if (payload) {
      this.#flushBatch(); // keep the order: batched requests first
      this.#writer.send(b, releaseToPool);
    } else {
      // Requests issued in the same turn of the event loop go out in one write: one wake-up of
      // the server instead of one per request.
      this.#batch.push(b);
      this.#batchBytes += b.length;
      if (!this.#batchScheduled) {
        this.#batchScheduled = true;
        queueMicrotask(this.#flushBatchTask);
      }
    }
    this.#watchWrites();
    return await done;
  }

  readonly #flushBatchTask = (): void => this.#flushBatch();

  /** Send the batched requests as one buffer (a single request as it is). */
  #flushBatch(): void {
    this.#batchScheduled = false;
    const n = this.#batch.length;
    if (n === 0) return;
    if (n === 1) {
      this.#writer.send(this.#batch[0]!, releaseToPool);
    } else {
      const all = bufferPool.get(this.#batchBytes);
      let at = 0;
      for (const b of this.#batch) {
        all.set(b, at);
        at += b.length;
        bufferPool.put(b);
      }
      this.#writer.send(all, releaseToPool);
    }
    this.#batch.length = 0;
    this.#batchBytes = 0;
  }

  /** Notice a failed socket write even when the reader never sees the connection end. */
  #watchWrites(): void {
    if (this.#watchingWrites) return;
    this.#watchingWrites = true;
    void this.#writer.drain().then(() => {
      this.#watchingWrites = false;
      const e = this.#writer.failed;
      if (e !== undefined) this.#fail(connectionError("sending request", e));
    });
  }

  /** Reject everything in flight and all later requests with `e`; close the connection. */
  #fail(e: BlockError): void {
    if (this.#dead) return;
    this.#dead = e;
    try {
      this.#conn.close();
    } catch { /* already closed */ }
    for (const s of this.#slots) {
      if (s.busy) this.#finish(s, e);
    }
    const w = this.#waiters.splice(0);
    for (const r of w) r();
  }

  #finish(s: Slot, e: unknown): void {
    const { resolve, reject } = s;
    s.busy = false;
    s.buf = undefined;
    s.extents = undefined;
    s.resolve = s.reject = noop;
    this.#free.push(s.index);
    if (e === undefined) resolve();
    else reject(e);
    this.#waiters.shift()?.();
  }

  #complete(s: Slot): void {
    if (s.error === 0) {
      this.#finish(s, undefined);
      return;
    }
    const errno = systemErrno(s.error);
    const text = ERRNO_TEXT[errno] ?? `error ${errno}`;
    this.#finish(s, new BlockError(errno, s.message !== "" ? `${text}: ${s.message}` : text));
  }

  #slotFor(cookieHi: number, cookieLo: number): Slot {
    const s = this.#slots[cookieLo];
    if (s === undefined || !s.busy || s.seq !== cookieHi) {
      throw protocolError("unexpected cookie value");
    }
    return s;
  }

  async #readLoop(): Promise<void> {
    const r = this.#reader;
    try {
      for (;;) {
        if (!(await r.fill(4))) throw eof();
        const magic = r.dataView.getUint32(r.position);
        if (magic === NBD_SIMPLE_REPLY_MAGIC) {
          if (!(await r.fill(NBD_SIMPLE_REPLY_SIZE))) throw eof();
          const v = r.dataView;
          const p = r.position;
          const error = v.getUint32(p + 4);
          const s = this.#slotFor(v.getUint32(p + 8), v.getUint32(p + 12));
          r.skip(NBD_SIMPLE_REPLY_SIZE);
          if (s.type === NBD_CMD_BLOCK_STATUS && error === 0) {
            throw protocolError("simple reply to NBD_CMD_BLOCK_STATUS");
          }
          if (error === 0 && s.type === NBD_CMD_READ && s.length > 0) {
            if (!(await r.readInto(s.buf!, 0, s.length))) throw eof();
          }
          s.error = error;
          this.#complete(s);
        } else if (magic === NBD_STRUCTURED_REPLY_MAGIC && this.info.structured) {
          await this.#chunk();
        } else {
          throw protocolError(`invalid reply magic 0x${magic.toString(16)}`);
        }
      }
    } catch (e) {
      this.#fail(e instanceof BlockError ? e : connectionError("receiving reply", e));
    }
  }

  /** One structured reply chunk (the magic is buffered, not consumed). */
  async #chunk(): Promise<void> {
    const r = this.#reader;
    if (!(await r.fill(NBD_CHUNK_HEADER_SIZE))) throw eof();
    let v = r.dataView;
    let p = r.position;
    const flags = v.getUint16(p + 4);
    const type = v.getUint16(p + 6);
    const s = this.#slotFor(v.getUint32(p + 8), v.getUint32(p + 12));
    const len = v.getUint32(p + 16);
    r.skip(NBD_CHUNK_HEADER_SIZE);
    if (type === NBD_REPLY_TYPE_OFFSET_DATA) {
      if (s.type !== NBD_CMD_READ || len <= 8) throw protocolError("unexpected OFFSET_DATA chunk");
      if (!(await r.fill(8))) throw eof();
      const at = readU64(r.dataView, r.position) - s.offset;
      const n = len - 8;
      if (at < 0 || at + n > s.length) throw protocolError("OFFSET_DATA chunk outside the request");
      r.skip(8);
      if (!(await r.readInto(s.buf!, at, n))) throw eof();
    } else {
      if (len > MAX_CHUNK_PAYLOAD) throw protocolError(`chunk of ${len} bytes`);
      if (!(await r.fill(len))) throw eof();
      v = r.dataView;
      p = r.position;
      this.#smallChunk(s, type, flags, v, p, len);
      r.skip(len);
    }
    if (flags & NBD_REPLY_FLAG_DONE) this.#complete(s);
  }

  /** A chunk whose payload is buffered at `v[p..p+len)`. */
  #smallChunk(s: Slot, type: number, flags: number, v: DataView, p: number, len: number): void {
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (len !== 0 || !(flags & NBD_REPLY_FLAG_DONE)) throw protocolError("invalid NONE chunk");
        return;
      case NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (s.type !== NBD_CMD_READ || len !== 12) throw protocolError("invalid OFFSET_HOLE chunk");
        const at = readU64(v, p) - s.offset;
        const n = v.getUint32(p + 8);
        if (at < 0 || n === 0 || at + n > s.length) {
          throw protocolError("OFFSET_HOLE chunk outside the request");
        }
        s.buf!.fill(0, at, at + n);
        return;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (s.type !== NBD_CMD_BLOCK_STATUS || len < 12 || (len - 4) % 8 !== 0) {
          throw protocolError("invalid BLOCK_STATUS chunk");
        }
        // Only the context we selected; a server may not send others, but ignore them if it does.
        if (v.getUint32(p) !== this.info.metaContextId || s.extents === undefined) return;
        const out = s.extents;
        let covered = 0;
        for (let q = p + 4; q < p + len && covered < s.length; q += 8) {
          const n = Math.min(v.getUint32(q), s.length - covered);
          if (n === 0) throw protocolError("zero-length extent");
          out.push(n, v.getUint32(q + 4));
          covered += n;
        }
        s.extents = undefined; // one chunk per context
        return;
      }
      default: {
        if (!(type & 0x8000)) throw protocolError(`unexpected reply type ${type}`);
        if (len < 4) throw protocolError("error chunk too short");
        const error = v.getUint32(p) || NBD_EINVAL;
        let message = "";
        if (len >= 6) {
          const ml = v.getUint16(p + 4);
          const extra = type === NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
          if (6 + ml + extra > len) throw protocolError("invalid error chunk");
          const bytes = new Uint8Array(v.buffer, v.byteOffset + p + 6, ml);
          message = fromUtf8(bytes) ?? "";
        } else if (type === NBD_REPLY_TYPE_ERROR || type === NBD_REPLY_TYPE_ERROR_OFFSET) {
          throw protocolError("error chunk too short");
        }
        if (s.error === 0) {
          s.error = error;
          s.message = message;
        }
      }
    }
  }
}

function releaseToPool(b: Uint8Array): void {
  bufferPool.put(b);
}

function putRequest(
  v: DataView,
  type: number,
  flags: number,
  cookieHi: number,
  cookieLo: number,
  offset: number,
  length: number,
): void {
  v.setUint32(0, NBD_REQUEST_MAGIC);
  v.setUint16(4, flags);
  v.setUint16(6, type);
  v.setUint32(8, cookieHi);
  v.setUint32(12, cookieLo);
  v.setUint32(16, Math.floor(offset / 0x100000000));
  v.setUint32(20, offset >>> 0);
  v.setUint32(24, length);
}

function readU64(v: DataView, at: number): number {
  return v.getUint32(at) * 0x100000000 + v.getUint32(at + 4);
}

function eof(): BlockError {
  return new BlockError(Errno.EIO, "NBD server dropped the connection");
}

function protocolError(what: string): BlockError {
  return new BlockError(Errno.EIO, `NBD protocol error: ${what}`);
}

function connectionError(what: string, e: unknown): BlockError {
  return new BlockError(
    Errno.EIO,
    `NBD connection failed while ${what}: ${e instanceof Error ? e.message : String(e)}`,
  );
}
