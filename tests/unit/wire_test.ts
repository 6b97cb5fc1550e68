// Encoding and decoding of transmission messages, and the connection reader/writer over a fake
// connection that splits reads and writes.
import assert from "node:assert/strict";
import * as C from "../../lib/nbd/constants.ts";
import {
  allocDataChunk,
  allocSimpleReply,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  putHoleChunk,
  type Request,
  requestMagicOk,
} from "../../lib/nbd/wire.ts";
import { BufferedReader, type ByteConn, ReplyWriter } from "../../lib/nbd/conn_io.ts";

function request(
  type: number,
  flags: number,
  cookie: bigint,
  offset: bigint,
  length: number,
): Uint8Array {
  const b = new Uint8Array(28);
  const v = new DataView(b.buffer);
  v.setUint32(0, C.NBD_REQUEST_MAGIC);
  v.setUint16(4, flags);
  v.setUint16(6, type);
  v.setBigUint64(8, cookie);
  v.setBigUint64(16, offset);
  v.setUint32(24, length);
  return b;
}

Deno.test("request header decodes every field, cookie halves echo the 64-bit cookie", () => {
  const b = request(C.NBD_CMD_WRITE, C.NBD_CMD_FLAG_FUA, 0xdeadbeef01020304n, 0x123456789an, 4096);
  const r: Request = {
    magic: 0,
    flags: 0,
    type: 0,
    cookieHi: 0,
    cookieLo: 0,
    offset: 0,
    length: 0,
  };
  decodeRequest(new DataView(b.buffer), 0, r);
  assert.ok(requestMagicOk(r));
  assert.deepEqual(
    { type: r.type, flags: r.flags, offset: r.offset, length: r.length },
    { type: C.NBD_CMD_WRITE, flags: C.NBD_CMD_FLAG_FUA, offset: 0x123456789a, length: 4096 },
  );
  const reply = allocSimpleReply(r.cookieHi, r.cookieLo, C.NBD_EINVAL, 0);
  const v = new DataView(reply.buffer);
  assert.equal(v.getUint32(0), C.NBD_SIMPLE_REPLY_MAGIC);
  assert.equal(v.getUint32(4), C.NBD_EINVAL);
  assert.equal(v.getBigUint64(8), 0xdeadbeef01020304n);
  b[0] = 0;
  decodeRequest(new DataView(b.buffer), 0, r);
  assert.ok(!requestMagicOk(r));
});

Deno.test("structured chunks: data, hole, error, block status layouts", () => {
  const d = allocDataChunk(1, 2, 2 ** 40, 5, true);
  let v = new DataView(d.buffer);
  assert.equal(v.getUint32(0), C.NBD_STRUCTURED_REPLY_MAGIC);
  assert.equal(v.getUint16(4), C.NBD_REPLY_FLAG_DONE);
  assert.equal(v.getUint16(6), C.NBD_REPLY_TYPE_OFFSET_DATA);
  assert.equal(v.getUint32(16), 8 + 5);
  assert.equal(v.getBigUint64(20), 2n ** 40n);
  assert.equal(d.length, 28 + 5);

  const h = new Uint8Array(32);
  putHoleChunk(h, 0, 1, 2, 4096, 65536, false);
  v = new DataView(h.buffer);
  assert.equal(v.getUint16(4), 0);
  assert.equal(v.getUint16(6), C.NBD_REPLY_TYPE_OFFSET_HOLE);
  assert.equal(v.getUint32(16), 12);
  assert.equal(v.getUint32(28), 65536);

  const e = encodeErrorChunk(1, 2, C.NBD_EIO, "x".repeat(5000));
  v = new DataView(e.buffer);
  assert.equal(v.getUint16(6), C.NBD_REPLY_TYPE_ERROR);
  assert.equal(v.getUint32(20), C.NBD_EIO);
  assert.ok(v.getUint16(24) <= 1024, "messages are capped");
  assert.equal(v.getUint32(16), 6 + v.getUint16(24));

  const s = encodeBlockStatusChunk(1, 2, 7, [4096, 0, 8192, 3], true);
  v = new DataView(s.buffer);
  assert.equal(v.getUint32(16), 4 + 16);
  assert.deepEqual([
    v.getUint32(20),
    v.getUint32(24),
    v.getUint32(28),
    v.getUint32(32),
    v.getUint32(36),
  ], [7, 4096, 0, 8192, 3]);
});

Deno.test("errno mapping follows qemu's table", () => {
  assert.equal(C.nbdErrno(30), C.NBD_EPERM); // EROFS
  assert.equal(C.nbdErrno(122), C.NBD_ENOSPC); // EDQUOT
  assert.equal(C.nbdErrno(27), C.NBD_ENOSPC); // EFBIG
  assert.equal(C.nbdErrno(95), C.NBD_ENOTSUP);
  assert.equal(C.nbdErrno(2), C.NBD_EINVAL); // anything else
});

/** A connection that hands out input in small pieces and accepts at most 3 bytes per write. */
class SplitConn implements ByteConn {
  written: number[] = [];
  writes = 0;
  #input: Uint8Array;
  #at = 0;
  constructor(input: Uint8Array) {
    this.#input = input;
  }
  read(p: Uint8Array): Promise<number | null> {
    if (this.#at >= this.#input.length) return Promise.resolve(null);
    const n = Math.min(p.length, 5, this.#input.length - this.#at);
    p.set(this.#input.subarray(this.#at, this.#at + n));
    this.#at += n;
    return Promise.resolve(n);
  }
  write(p: Uint8Array): Promise<number> {
    this.writes++;
    const n = Math.min(3, p.length);
    this.written.push(...p.subarray(0, n));
    return Promise.resolve(n);
  }
  close(): void {}
}

Deno.test("BufferedReader: fill across split reads, readInto past the buffer, EOF", async () => {
  const input = new Uint8Array(1000).map((_, i) => i & 0xff);
  const r = new BufferedReader(new SplitConn(input));
  assert.ok(await r.fill(28));
  assert.deepEqual([...r.peek().subarray(0, 3)], [0, 1, 2]);
  r.skip(28);
  const dest = new Uint8Array(900);
  assert.ok(await r.readInto(dest, 0, 900));
  assert.equal(dest[0], 28);
  assert.equal(dest[899], (28 + 899) & 0xff);
  assert.ok(!(await r.fill(100)), "only 72 bytes remain");
  assert.ok(r.eof);
});

Deno.test("BufferedReader grows for a request larger than its buffer", async () => {
  const big = new Uint8Array(600 * 1024).fill(9);
  const conn: ByteConn = {
    at: 0,
    read(p: Uint8Array) {
      const self = this as unknown as { at: number };
      if (self.at >= big.length) return Promise.resolve(null);
      const n = Math.min(p.length, big.length - self.at);
      p.set(big.subarray(self.at, self.at + n));
      self.at += n;
      return Promise.resolve(n);
    },
    write: (p: Uint8Array) => Promise.resolve(p.length),
    close() {},
  } as ByteConn;
  const r = new BufferedReader(conn);
  assert.ok(await r.fill(big.length));
  assert.equal(r.available, big.length);
});

Deno.test("ReplyWriter keeps replies whole and ordered despite partial writes", async () => {
  const conn = new SplitConn(new Uint8Array());
  const w = new ReplyWriter(conn);
  const replies = [
    new Uint8Array([1, 2, 3, 4, 5]),
    new Uint8Array([6, 7]),
    new Uint8Array(100).fill(8),
  ];
  for (const r of replies) w.send(r);
  await w.drain();
  assert.deepEqual(conn.written, [1, 2, 3, 4, 5, 6, 7, ...new Array(100).fill(8)]);
  assert.equal(w.failed, undefined);
});

Deno.test("ReplyWriter reports a failed connection and drops later replies", async () => {
  let calls = 0;
  const conn: ByteConn = {
    read: () => Promise.resolve(null),
    write: () => {
      calls++;
      return Promise.reject(new Error("broken pipe"));
    },
    close() {},
  };
  const w = new ReplyWriter(conn);
  w.send(new Uint8Array(4));
  await w.drain();
  assert.ok(w.failed instanceof Error);
  w.send(new Uint8Array(4));
  await w.drain();
  assert.equal(calls, 1);
});
