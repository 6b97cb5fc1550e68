/**
 * Every NBD encoding and decoding in one place: DataView over Uint8Array, big-endian. Replies are
 * built as one buffer (header and payload together) so each goes out in one write.
 *
 * @module
 */

import {
  IHAVEOPT,
  NBD_CHUNK_HEADER_SIZE,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_OPT_REPLY_MAGIC,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBDMAGIC,
} from "./constants.ts";

const encoder = new TextEncoder();

function newBuffer(size: number): Uint8Array {
  return new Uint8Array(size);
}
const decoder = new TextDecoder("utf-8", { fatal: true });

/** A DataView over exactly the bytes of `b`. */
export function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** UTF-8 encode. */
export function utf8(s: string): Uint8Array {
  return encoder.encode(s);
}

/** Strict UTF-8 decode; undefined for invalid UTF-8. */
export function fromUtf8(b: Uint8Array): string | undefined {
  try {
    return decoder.decode(b);
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// Handshake

/** The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags. */
export function encodeGreeting(): Uint8Array {
  const b = new Uint8Array(18);
  const v = view(b);
  v.setBigUint64(0, NBDMAGIC);
  v.setBigUint64(8, IHAVEOPT);
  v.setUint16(16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  return b;
}

/** Header of a client option: IHAVEOPT, option, length (16 bytes). */
export interface OptionHeader {
  readonly magicOk: boolean;
  readonly option: number;
  readonly length: number;
}

export const OPTION_HEADER_SIZE = 16;

/** Decode an option header from the first 16 bytes of `b`. */
export function decodeOptionHeader(b: Uint8Array): OptionHeader {
  const v = view(b);
  return {
    magicOk: v.getBigUint64(0) === IHAVEOPT,
    option: v.getUint32(8),
    length: v.getUint32(12),
  };
}

/** An option reply: magic, option, type, length, payload. */
export function encodeOptionReply(option: number, type: number, payload?: Uint8Array): Uint8Array {
  const len = payload?.length ?? 0;
  const b = new Uint8Array(20 + len);
  const v = view(b);
  v.setBigUint64(0, NBD_OPT_REPLY_MAGIC);
  v.setUint32(8, option);
  v.setUint32(12, type);
  v.setUint32(16, len);
  if (payload) b.set(payload, 20);
  return b;
}

/** NBD_REP_INFO payload: u16 info type followed by `body`. */
export function encodeInfo(infoType: number, body: Uint8Array): Uint8Array {
  const b = new Uint8Array(2 + body.length);
  view(b).setUint16(0, infoType);
  b.set(body, 2);
  return b;
}

/** INFO_EXPORT body: u64 size, u16 flags. */
export function encodeExportBody(size: number, flags: number): Uint8Array {
  const b = new Uint8Array(10);
  const v = view(b);
  v.setBigUint64(0, BigInt(size));
  v.setUint16(8, flags);
  return b;
}

/** INFO_BLOCK_SIZE body: u32 min, preferred, max. */
export function encodeBlockSizeBody(min: number, preferred: number, max: number): Uint8Array {
  const b = new Uint8Array(12);
  const v = view(b);
  v.setUint32(0, min);
  v.setUint32(4, preferred);
  v.setUint32(8, max);
  return b;
}

/** NBD_REP_SERVER payload: u32 name length, name, description. */
export function encodeServerEntry(name: string, description: string | undefined): Uint8Array {
  const n = utf8(name);
  const d = utf8(description ?? "");
  const b = new Uint8Array(4 + n.length + d.length);
  view(b).setUint32(0, n.length);
  b.set(n, 4);
  b.set(d, 4 + n.length);
  return b;
}

/** NBD_REP_META_CONTEXT payload: u32 id, name. */
export function encodeMetaContext(id: number, name: string): Uint8Array {
  const n = utf8(name);
  const b = new Uint8Array(4 + n.length);
  view(b).setUint32(0, id);
  b.set(n, 4);
  return b;
}

/** Reply to EXPORT_NAME: u64 size, u16 flags, then 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Uint8Array {
  const b = new Uint8Array(noZeroes ? 10 : 134);
  b.set(encodeExportBody(size, flags));
  return b;
}

// ---------------------------------------------------------------------------------------------
// Transmission

/**
 * A decoded request header. One object per connection is reused by the reader (no per-request
 * allocation); handlers copy what they keep.
 */
export interface Request {
  magic: number;
  flags: number;
  type: number;
  /** The client's 64-bit cookie as two halves: echoed untouched, never interpreted. */
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
}

/** Decode a 28-byte request header at `b[at..]` into `out`. */
export function decodeRequest(v: DataView, at: number, out: Request): void {
  out.magic = v.getUint32(at);
  out.flags = v.getUint16(at + 4);
  out.type = v.getUint16(at + 6);
  out.cookieHi = v.getUint32(at + 8);
  out.cookieLo = v.getUint32(at + 12);
  // Offsets are u64; beyond 2^53 precision is lost, but such offsets are past any export size
  // and fail the bounds check either way.
  out.offset = v.getUint32(at + 16) * 0x100000000 + v.getUint32(at + 20);
  out.length = v.getUint32(at + 24);
}

/** Whether a request header carries the request magic. */
export function requestMagicOk(r: Request): boolean {
  return r.magic === NBD_REQUEST_MAGIC;
}

/**
 * A simple reply with room for `dataLength` bytes of READ data after the 16-byte header. Fill
 * the data at `SIMPLE_DATA_OFFSET`.
 */
export function allocSimpleReply(
  cookieHi: number,
  cookieLo: number,
  error: number,
  dataLength: number,
  alloc: (size: number) => Uint8Array = newBuffer,
): Uint8Array {
  const b = alloc(NBD_SIMPLE_REPLY_SIZE + dataLength);
  const v = view(b);
  v.setUint32(0, NBD_SIMPLE_REPLY_MAGIC);
  v.setUint32(4, error);
  v.setUint32(8, cookieHi);
  v.setUint32(12, cookieLo);
  return b;
}

export const SIMPLE_DATA_OFFSET = NBD_SIMPLE_REPLY_SIZE;

function setChunkHeader(
  v: DataView,
  at: number,
  flags: number,
  type: number,
  cookieHi: number,
  cookieLo: number,
  length: number,
): void {
  v.setUint32(at, NBD_STRUCTURED_REPLY_MAGIC);
  v.setUint16(at + 4, flags);
  v.setUint16(at + 6, type);
  v.setUint32(at + 8, cookieHi);
  v.setUint32(at + 12, cookieLo);
  v.setUint32(at + 16, length);
}

function setU64(v: DataView, at: number, n: number): void {
  v.setUint32(at, Math.floor(n / 0x100000000));
  v.setUint32(at + 4, n >>> 0);
}

/** Offset of the data inside a buffer from {@link allocDataChunk}. */
export const CHUNK_DATA_OFFSET = NBD_CHUNK_HEADER_SIZE + 8;

/** An OFFSET_DATA chunk with room for `dataLength` bytes at `CHUNK_DATA_OFFSET`. */
export function allocDataChunk(
  cookieHi: number,
  cookieLo: number,
  offset: number,
  dataLength: number,
  done: boolean,
  alloc: (size: number) => Uint8Array = newBuffer,
): Uint8Array {
  const b = alloc(CHUNK_DATA_OFFSET + dataLength);
  putDataChunkHeader(b, 0, cookieHi, cookieLo, offset, dataLength, done);
  return b;
}

/** Write the header of an OFFSET_DATA chunk at `b[at..]` (for several chunks in one buffer). */
export function putDataChunkHeader(
  b: Uint8Array,
  at: number,
  cookieHi: number,
  cookieLo: number,
  offset: number,
  dataLength: number,
  done: boolean,
): void {
  const v = view(b);
  setChunkHeader(
    v,
    at,
    done ? NBD_REPLY_FLAG_DONE : 0,
    NBD_REPLY_TYPE_OFFSET_DATA,
    cookieHi,
    cookieLo,
    8 + dataLength,
  );
  setU64(v, at + NBD_CHUNK_HEADER_SIZE, offset);
}

export const HOLE_CHUNK_SIZE = NBD_CHUNK_HEADER_SIZE + 12;

/** Write an OFFSET_HOLE chunk at `b[at..]`. */
export function putHoleChunk(
  b: Uint8Array,
  at: number,
  cookieHi: number,
  cookieLo: number,
  offset: number,
  length: number,
  done: boolean,
): void {
  const v = view(b);
  setChunkHeader(
    v,
    at,
    done ? NBD_REPLY_FLAG_DONE : 0,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    cookieHi,
    cookieLo,
    12,
  );
  setU64(v, at + NBD_CHUNK_HEADER_SIZE, offset);
  v.setUint32(at + NBD_CHUNK_HEADER_SIZE + 8, length);
}

/** A NONE chunk with the DONE flag (structured reply to a zero-length READ). */
export function encodeDoneChunk(cookieHi: number, cookieLo: number): Uint8Array {
  const b = new Uint8Array(NBD_CHUNK_HEADER_SIZE);
  setChunkHeader(view(b), 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookieHi, cookieLo, 0);
  return b;
}

/** An ERROR chunk (always final): u32 error, u16 message length, message. */
export function encodeErrorChunk(
  cookieHi: number,
  cookieLo: number,
  error: number,
  message: string,
): Uint8Array {
  // Messages are for humans; cap them so a reply never approaches protocol limits.
  const msg = utf8(message.length > 1024 ? message.slice(0, 1024) : message);
  const b = new Uint8Array(NBD_CHUNK_HEADER_SIZE + 6 + msg.length);
  const v = view(b);
  setChunkHeader(
    v,
    0,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_ERROR,
    cookieHi,
    cookieLo,
    6 + msg.length,
  );
  v.setUint32(NBD_CHUNK_HEADER_SIZE, error);
  v.setUint16(NBD_CHUNK_HEADER_SIZE + 4, msg.length);
  b.set(msg, NBD_CHUNK_HEADER_SIZE + 6);
  return b;
}

/** A BLOCK_STATUS chunk from flat (length, flags) pairs. */
export function encodeBlockStatusChunk(
  cookieHi: number,
  cookieLo: number,
  contextId: number,
  pairs: readonly number[],
  done: boolean,
): Uint8Array {
  const n = pairs.length >> 1;
  const b = new Uint8Array(NBD_CHUNK_HEADER_SIZE + 4 + 8 * n);
  const v = view(b);
  setChunkHeader(
    v,
    0,
    done ? NBD_REPLY_FLAG_DONE : 0,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    cookieHi,
    cookieLo,
    4 + 8 * n,
  );
  v.setUint32(NBD_CHUNK_HEADER_SIZE, contextId);
  let at = NBD_CHUNK_HEADER_SIZE + 4;
  for (let i = 0; i < pairs.length; i += 2) {
    v.setUint32(at, pairs[i]!);
    v.setUint32(at + 4, pairs[i + 1]!);
    at += 8;
  }
  return b;
}
