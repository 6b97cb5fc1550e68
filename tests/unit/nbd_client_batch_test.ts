/**
 * NbdClient request batching (lib/nbd/client.ts): requests without payload issued in the same
 * turn of the event loop leave in one socket write, in issue order; a WRITE flushes the batch
 * first so the order on the wire is the order of the calls.
 */
import assert from "node:assert/strict";
import { type ExportInfo, NbdClient } from "../../lib/nbd/client.ts";
import { BufferedReader, type ByteConn } from "../../lib/nbd/conn_io.ts";

const INFO: ExportInfo = {
  size: 1 << 20,
  flags: 0,
  minBlock: 1,
  optBlock: 4096,
  maxBlock: 1 << 25,
  structured: true,
  metaContextId: undefined,
};

/** A connection that records writes and whose reads wait until it is closed. */
function fakeConn(): ByteConn & { writes: Uint8Array[] } {
  const writes: Uint8Array[] = [];
  let closed: () => void = () => {};
  const closing = new Promise<void>((r) => closed = r);
  return {
    writes,
    read: () => closing.then(() => null),
    write: (p) => {
      writes.push(p.slice());
      return Promise.resolve(p.length);
    },
    close: () => closed(),
  };
}

/** (type, offset) of every request in the written bytes. */
function requests(writes: Uint8Array[]): [number, number][] {
  const out: [number, number][] = [];
  for (const w of writes) {
    const v = new DataView(w.buffer, w.byteOffset, w.byteLength);
    for (let p = 0; p + 28 <= w.length;) {
      assert.equal(v.getUint32(p), 0x25609513, "request magic");
      const type = v.getUint16(p + 6);
      out.push([type, v.getUint32(p + 20)]);
      p += 28 + (type === 1 ? v.getUint32(p + 24) : 0);
    }
  }
  return out;
}

Deno.test("NbdClient: requests of one turn go out in one write, in order", async () => {
  const conn = fakeConn();
  const c = new NbdClient(conn, new BufferedReader(conn), INFO);
  const pending = [];
  for (let i = 0; i < 10; i++) pending.push(c.read(new Uint8Array(512), i * 4096));
  pending.push(c.write(new Uint8Array(100).fill(1), 99 * 4096)); // flushes the batch first
  pending.push(c.flush(), c.read(new Uint8Array(512), 7));
  for (const p of pending) p.catch(() => {}); // rejected by the disconnect below
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(conn.writes.length <= 3, true, `${conn.writes.length} writes`);
  assert.equal(conn.writes[0]!.length, 10 * 28, "the 10 reads in one write");
  assert.deepEqual(requests(conn.writes), [
    ...Array.from({ length: 10 }, (_, i): [number, number] => [0, i * 4096]),
    [1, 99 * 4096],
    [3, 0],
    [0, 7],
  ]);
  const before = conn.writes.length;
  await c.disconnect();
  assert.deepEqual(requests(conn.writes.slice(before)), [[2, 0]], "NBD_CMD_DISC last");
  assert.equal((await Promise.allSettled(pending)).every((r) => r.status === "rejected"), true);
});
