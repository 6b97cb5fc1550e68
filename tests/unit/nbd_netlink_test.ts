// --connections: the generic-netlink messages of NBD_CMD_CONNECT, checked by decoding them the
// way the kernel's parser does, against a fake kernel that answers the family lookup and the
// connect (or fails it).
import assert from "node:assert/strict";
import {
  NBD_ATTR_BLOCK_SIZE_BYTES,
  NBD_ATTR_DEAD_CONN_TIMEOUT,
  NBD_ATTR_INDEX,
  NBD_ATTR_SERVER_FLAGS,
  NBD_ATTR_SIZE_BYTES,
  NBD_ATTR_SOCKETS,
  NBD_CMD_CONNECT,
  NBD_SOCK_FD,
  NBD_SOCK_ITEM,
  type NetlinkChannel,
  netlinkConnect,
  NetlinkError,
  parseAttrs,
} from "../../ffi/nbd_netlink.ts";

const FAMILY = 0x1f;

/** A nested attribute's payload as a message body parseAttrs can read. */
function nested(payload: Uint8Array): Map<number, Uint8Array> {
  const m = new Uint8Array(4 + payload.length);
  new DataView(m.buffer).setUint32(0, m.length, true);
  m.set(payload, 4);
  return parseAttrs(m, 4);
}

function u32(b: Uint8Array | undefined): number {
  return new DataView(b!.buffer, b!.byteOffset).getUint32(0, true);
}

function u64(b: Uint8Array | undefined): number {
  return Number(new DataView(b!.buffer, b!.byteOffset).getBigUint64(0, true));
}

function reply(seq: number, type: number, body: Uint8Array): Uint8Array {
  const m = new Uint8Array(16 + body.length);
  const v = new DataView(m.buffer);
  v.setUint32(0, m.length, true);
  v.setUint16(4, type, true);
  v.setUint32(8, seq, true);
  m.set(body, 16);
  return m;
}

function ack(seq: number, err: number): Uint8Array {
  const b = new Uint8Array(20);
  new DataView(b.buffer).setInt32(0, -err, true);
  return reply(seq, 2, b);
}

/** Answers CTRL_CMD_GETFAMILY with FAMILY and NBD_CMD_CONNECT with `connectErr`. */
class FakeKernel implements NetlinkChannel {
  readonly sent: Uint8Array[] = [];
  #queue: Uint8Array[] = [];
  closed = false;
  constructor(readonly connectErr = 0, readonly family = true) {}
  send(msg: Uint8Array): void {
    this.sent.push(msg.slice());
    const v = new DataView(msg.buffer, msg.byteOffset);
    const type = v.getUint16(4, true);
    const seq = v.getUint32(8, true);
    if (type === 0x10) {
      if (!this.family) {
        this.#queue.push(ack(seq, 2));
        return;
      }
      // genl header (CTRL_CMD_NEWFAMILY) + CTRL_ATTR_FAMILY_ID u16 + CTRL_ATTR_FAMILY_NAME.
      const body = new Uint8Array(4 + 8 + 8);
      const b = new DataView(body.buffer);
      body[0] = 1;
      b.setUint16(4, 6, true);
      b.setUint16(6, 1, true);
      b.setUint16(8, FAMILY, true);
      b.setUint16(12, 8, true);
      b.setUint16(14, 2, true);
      body.set(new TextEncoder().encode("nbd\0"), 16);
      const m = reply(seq, 0x10, body);
      this.#queue.push(new Uint8Array([...m, ...ack(seq, 0)]));
    } else {
      this.#queue.push(ack(seq, this.connectErr));
    }
  }
  recv(): Uint8Array | undefined {
    return this.#queue.shift();
  }
  close(): void {
    this.closed = true;
  }
}

const CONNECT = {
  index: 3,
  sockets: [11, 12, 13],
  size: 64 << 20,
  blockSize: 512,
  flags: 0x1 | 0x4 | 0x100,
  deadConnTimeout: 30,
};

Deno.test("netlink: NBD_CMD_CONNECT carries the index, size, block size, flags and every socket", () => {
  const k = new FakeKernel();
  netlinkConnect(k, CONNECT);
  assert.equal(k.sent.length, 2);
  const msg = k.sent[1]!;
  const v = new DataView(msg.buffer);
  assert.equal(v.getUint16(4, true), FAMILY, "sent to the family the kernel named");
  assert.equal(v.getUint16(6, true), 1 | 4, "NLM_F_REQUEST | NLM_F_ACK");
  assert.equal(msg[16], NBD_CMD_CONNECT);
  assert.equal(msg[17], 1, "NBD_GENL_VERSION");
  const attrs = parseAttrs(msg);
  assert.equal(u32(attrs.get(NBD_ATTR_INDEX)), 3);
  assert.equal(u64(attrs.get(NBD_ATTR_SIZE_BYTES)), 64 << 20);
  assert.equal(u64(attrs.get(NBD_ATTR_BLOCK_SIZE_BYTES)), 512);
  assert.equal(u64(attrs.get(NBD_ATTR_SERVER_FLAGS)), CONNECT.flags);
  assert.equal(u64(attrs.get(NBD_ATTR_DEAD_CONN_TIMEOUT)), 30);
  const items = nested(attrs.get(NBD_ATTR_SOCKETS)!);
  // Same-type items collapse in a Map: walk them by hand.
  const raw = attrs.get(NBD_ATTR_SOCKETS)!;
  const fds: number[] = [];
  for (let at = 0; at < raw.length;) {
    const len = new DataView(raw.buffer, raw.byteOffset + at).getUint16(0, true);
    const type = new DataView(raw.buffer, raw.byteOffset + at).getUint16(2, true) & 0x7fff;
    assert.equal(type, NBD_SOCK_ITEM);
    fds.push(u32(nested(raw.subarray(at + 4, at + len)).get(NBD_SOCK_FD)));
    at += (len + 3) & ~3;
  }
  assert.ok(items.has(NBD_SOCK_ITEM));
  assert.deepEqual(fds, [11, 12, 13]);
});

Deno.test("netlink: no dead-connection timeout attribute unless asked for", () => {
  const k = new FakeKernel();
  netlinkConnect(k, { ...CONNECT, deadConnTimeout: undefined });
  assert.equal(parseAttrs(k.sent[1]!).has(NBD_ATTR_DEAD_CONN_TIMEOUT), false);
});

Deno.test("netlink: the kernel's error comes back as its errno; a missing module as ENOENT", () => {
  assert.throws(() => netlinkConnect(new FakeKernel(16), CONNECT), (e) => {
    assert.ok(e instanceof NetlinkError);
    assert.equal(e.errno, 16);
    return true;
  });
  assert.throws(() => netlinkConnect(new FakeKernel(0, false), CONNECT), (e) => {
    assert.ok(e instanceof NetlinkError);
    assert.equal(e.errno, 2);
    return true;
  });
  const silent: NetlinkChannel = { send() {}, recv: () => undefined, close() {} };
  assert.throws(() => netlinkConnect(silent, CONNECT), /no reply from the kernel/);
});
