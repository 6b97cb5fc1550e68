/**
 * Raw-socket tests for what libnbd never sends: bad magics, unknown commands and flags, oversized
 * requests, garbage and odd client flags in the handshake, option errors. Each case asserts the
 * exact reply (type or errno, never qemu's message text) or a clean disconnect, and then that the
 * server is still up: a client that negotiated before the bad one can still read, and a fresh
 * client can connect and read.
 */

import assert from "node:assert/strict";
import {
  makeSparseImage,
  MiB,
  patternBytes,
  type Server,
  withServer,
  withTempDir,
} from "./_harness.ts";
import {
  ClosedError,
  CMD,
  CMD_FLAG,
  EINVAL,
  INFO,
  infoRequest,
  metaContextQuery,
  OPT,
  RawConn,
  rawConnect,
  REP,
  REPLY_TYPE,
  repName,
  view,
} from "./_nbd_raw.ts";

const SIZE = 4 * MiB;
/** Seeded data in the first MiB of the image; the rest is a hole. */
const HEAD = patternBytes(MiB, 42);

/**
 * Starts a server on a 4 MiB image, connects a "good" client that reads before and after `fn`
 * runs with a fresh "bad" connection, and checks a new client still works afterwards.
 */
async function guarded(
  fn: (bad: RawConn, server: Server) => Promise<void>,
  args: readonly string[] = [],
): Promise<void> {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, SIZE, [{ offset: 0, length: MiB, fill: "random", seed: 42 }]);
    await withServer(
      { dir, image, args: ["-f", "raw", "-t", "-e", "8", ...args] },
      async (server) => {
        const good = await rawConnect(server);
        try {
          const g = await good.negotiate();
          assert.equal(g.size, BigInt(SIZE));
          assert.deepEqual(await good.read(4096, 512), HEAD.subarray(4096, 4608));
          const bad = await rawConnect(server);
          try {
            await fn(bad, server);
          } finally {
            bad.close();
          }
          assert.ok(server.running, `server exited: ${server.stderr}`);
          assert.deepEqual(await good.read(8192, 1024, 99n), HEAD.subarray(8192, 9216));
        } finally {
          good.close();
        }
        const fresh = await rawConnect(server);
        try {
          await fresh.negotiate({ structured: true });
          assert.deepEqual(await fresh.read(0, 4096), HEAD.subarray(0, 4096));
        } finally {
          fresh.close();
        }
      },
    );
  });
}

/** Asserts one option reply of the given type (by name, for readable failures). */
async function expectOptReply(c: RawConn, option: number, type: number): Promise<void> {
  const r = await c.optReply();
  assert.equal(r.option, option, "option echoed");
  assert.equal(repName(r.type), repName(type));
}

/** Asserts the connection is usable: LIST answers SERVER… then ACK. */
async function expectListWorks(c: RawConn): Promise<void> {
  await c.sendOption(OPT.LIST);
  const rs = await c.optReplies();
  assert.deepEqual(rs.map((r) => repName(r.type)), ["SERVER", "ACK"]);
}

// ---- transmission phase

Deno.test("raw: bad request magic → the server closes the connection", async () => {
  await guarded(async (bad) => {
    await bad.negotiate();
    await bad.request({ type: CMD.READ, offset: 0, length: 512, magic: 0x12345678 });
    assert.equal(await bad.waitClosed(), true);
  });
});

Deno.test("raw: unknown command 42 → EINVAL, connection keeps working", async () => {
  await guarded(async (bad) => {
    await bad.negotiate();
    await bad.request({ type: 42, offset: 0, length: 512, cookie: 0xdeadbeefcafef00dn });
    const r = await bad.reply();
    assert.deepEqual(r, { kind: "simple", error: EINVAL, cookie: 0xdeadbeefcafef00dn });
    assert.deepEqual(await bad.read(0, 16), HEAD.subarray(0, 16));
  });
});

Deno.test("raw: unknown command flags on READ → EINVAL without data (simple replies)", async () => {
  await guarded(async (bad) => {
    await bad.negotiate();
    await bad.request({ type: CMD.READ, flags: 0x40, offset: 0, length: 512, cookie: 5n });
    assert.deepEqual(await bad.reply(), { kind: "simple", error: EINVAL, cookie: 5n });
    // No READ payload followed the error: the next reply parses.
    assert.deepEqual(await bad.read(512, 8), HEAD.subarray(512, 520));
  });
});

Deno.test("raw: unknown command flags on READ with structured replies → one ERROR chunk, DONE", async () => {
  await guarded(async (bad) => {
    await bad.negotiate({ structured: true });
    await bad.request({ type: CMD.READ, flags: 0x40, offset: 0, length: 512, cookie: 6n });
    const r = await bad.reply();
    assert.equal(r.kind, "chunk");
    if (r.kind !== "chunk") return;
    assert.equal(r.type, REPLY_TYPE.ERROR);
    assert.equal(r.flags & 1, 1, "DONE");
    assert.equal(r.cookie, 6n);
    assert.equal(view(r.payload).getUint32(0), EINVAL);
    assert.equal(view(r.payload).getUint16(4), r.payload.length - 6, "message length");
  });
});

Deno.test("raw: truncated request header then close → server keeps serving others", async () => {
  await guarded(async (bad) => {
    await bad.negotiate();
    const h = new Uint8Array(28);
    view(h).setUint32(0, 0x25609513);
    await bad.write(h.subarray(0, 13));
    bad.close();
  });
});

Deno.test("raw: READ of 32 MiB + 512 → EINVAL, connection keeps working", async () => {
  await guarded(async (bad) => {
    await bad.negotiate();
    await bad.request({ type: CMD.READ, offset: 0, length: 32 * MiB + 512, cookie: 8n });
    assert.deepEqual(await bad.reply(), { kind: "simple", error: EINVAL, cookie: 8n });
    assert.deepEqual(await bad.read(0, 8), HEAD.subarray(0, 8));
  });
});

Deno.test("raw: WRITE header claiming 32 MiB + 512 → EINVAL, then the server disconnects", async () => {
  await guarded(async (bad) => {
    await bad.negotiate();
    await bad.request({ type: CMD.WRITE, offset: 0, length: 32 * MiB + 512, cookie: 9n });
    assert.deepEqual(await bad.reply(), { kind: "simple", error: EINVAL, cookie: 9n });
    assert.equal(await bad.waitClosed(), true);
  });
});

Deno.test("raw: READ of length 0 → simple success without data, or NONE chunk with SR", async () => {
  await guarded(async (bad) => {
    await bad.negotiate({ structured: true });
    await bad.request({ type: CMD.READ, offset: 4096, length: 0, cookie: 10n });
    const r = await bad.reply();
    assert.deepEqual(
      r.kind === "chunk" ? { type: r.type, flags: r.flags, len: r.payload.length } : r,
      { type: REPLY_TYPE.NONE, flags: 1, len: 0 },
    );
    assert.deepEqual(await bad.read(0, 8), HEAD.subarray(0, 8));
  });
});

Deno.test("raw: structured READ over data and hole → OFFSET_DATA then OFFSET_HOLE; DF → one chunk", async () => {
  await guarded(async (bad) => {
    await bad.negotiate({ structured: true });
    await bad.request({ type: CMD.READ, offset: MiB - 4096, length: 8192, cookie: 11n });
    const plain = await bad.fullReply();
    assert.equal(plain.error, 0);
    const shape = (chunks: typeof plain.chunks) =>
      chunks.map((c) =>
        c.kind === "chunk"
          ? [
            c.type,
            c.flags,
            Number(view(c.payload).getBigUint64(0)),
            c.type === REPLY_TYPE.OFFSET_HOLE ? view(c.payload).getUint32(8) : c.payload.length - 8,
          ]
          : ["simple"]
      );
    assert.deepEqual(shape(plain.chunks), [
      [REPLY_TYPE.OFFSET_DATA, 0, MiB - 4096, 4096],
      [REPLY_TYPE.OFFSET_HOLE, 1, MiB, 4096],
    ]);
    const first = plain.chunks[0];
    assert.ok(first?.kind === "chunk");
    assert.deepEqual(first.payload.subarray(8), HEAD.subarray(MiB - 4096));

    await bad.request({ type: CMD.READ, flags: CMD_FLAG.DF, offset: MiB - 4096, length: 8192 });
    const df = await bad.fullReply();
    assert.deepEqual(shape(df.chunks), [[REPLY_TYPE.OFFSET_DATA, 1, MiB - 4096, 8192]]);
  });
});

Deno.test("raw: BLOCK_STATUS without a negotiated meta context → EINVAL", async () => {
  await guarded(async (bad) => {
    await bad.negotiate({ structured: true });
    await bad.request({ type: CMD.BLOCK_STATUS, offset: 0, length: 4096, cookie: 12n });
    const r = await bad.fullReply();
    assert.equal(r.error, EINVAL);
    assert.deepEqual(await bad.read(0, 8), HEAD.subarray(0, 8));
  });
});

Deno.test("raw: BLOCK_STATUS with base:allocation → one BLOCK_STATUS chunk with the context id", async () => {
  await guarded(async (bad) => {
    const n = await bad.negotiate({ structured: true, contexts: ["base:allocation"] });
    const id = n.contextIds.get("base:allocation");
    assert.notEqual(id, undefined);
    await bad.request({ type: CMD.BLOCK_STATUS, offset: 0, length: SIZE, cookie: 13n });
    const r = await bad.fullReply();
    assert.equal(r.error, 0);
    assert.equal(r.chunks.length, 1);
    const c = r.chunks[0]!;
    assert.ok(c.kind === "chunk");
    assert.equal(c.type, REPLY_TYPE.BLOCK_STATUS);
    assert.equal(c.flags & 1, 1);
    const v = view(c.payload);
    assert.equal(v.getUint32(0), id);
    const ext: number[] = [];
    for (let o = 4; o < c.payload.length; o += 4) ext.push(v.getUint32(o));
    assert.deepEqual(ext, [MiB, 0, 3 * MiB, 3]);
  });
});

Deno.test("raw: NBD_CMD_DISC → the server closes without a reply", async () => {
  await guarded(async (bad) => {
    await bad.negotiate();
    await bad.request({ type: CMD.DISC, length: 0 });
    assert.equal(await bad.waitClosed(), true);
  });
});

Deno.test("raw: pipelined READs are all answered with their cookies", async () => {
  await guarded(async (bad) => {
    await bad.negotiate();
    const n = 12;
    for (let i = 0; i < n; i++) {
      await bad.request({
        type: CMD.READ,
        offset: i * 4096,
        length: 4096,
        cookie: BigInt(1000 + i),
      });
    }
    const seen = new Set<bigint>();
    for (let i = 0; i < n; i++) {
      const r = await bad.reply();
      assert.ok(r.kind === "simple" && r.error === 0);
      const idx = Number(r.cookie) - 1000;
      assert.deepEqual(await bad.readExact(4096), HEAD.subarray(idx * 4096, (idx + 1) * 4096));
      seen.add(r.cookie);
    }
    assert.equal(seen.size, n);
  });
});

// ---- handshake phase

Deno.test("raw: garbage instead of client flags and options → disconnect", async () => {
  await guarded(async (bad) => {
    await bad.greeting();
    await bad.clientFlags(1);
    await bad.write(new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert.equal(await bad.waitClosed(), true);
  });
});

Deno.test("raw: unknown client flags → disconnect", async () => {
  await guarded(async (bad) => {
    const hs = await bad.greeting();
    assert.equal(hs, 3, "FIXED_NEWSTYLE | NO_ZEROES");
    await bad.clientFlags(0x1 | 0x4);
    assert.equal(await bad.waitClosed(), true);
  });
});

Deno.test("raw: non-fixed newstyle client + EXPORT_NAME → size, flags, 124 zero bytes", async () => {
  await guarded(async (bad) => {
    await bad.greeting();
    await bad.clientFlags(0);
    await bad.sendOption(OPT.EXPORT_NAME);
    const b = await bad.readExact(10 + 124);
    assert.equal(view(b).getBigUint64(0), BigInt(SIZE));
    const flags = view(b).getUint16(8);
    assert.equal(flags & 1, 1, "HAS_FLAGS");
    assert.equal(flags & 0x80, 0, "no DF without structured replies");
    assert.deepEqual(b.subarray(10), new Uint8Array(124));
    assert.deepEqual(await bad.read(100, 4), HEAD.subarray(100, 104));
  });
});

Deno.test("raw: EXPORT_NAME with NO_ZEROES → size and flags only", async () => {
  await guarded(async (bad) => {
    await bad.handshake(3);
    await bad.sendOption(OPT.EXPORT_NAME);
    const b = await bad.readExact(10);
    assert.equal(view(b).getBigUint64(0), BigInt(SIZE));
    // The very next bytes are the reply to our READ, not padding.
    assert.deepEqual(await bad.read(0, 4), HEAD.subarray(0, 4));
  });
});

Deno.test("raw: EXPORT_NAME of an unknown export → disconnect", async () => {
  await guarded(async (bad) => {
    await bad.handshake(3);
    await bad.sendOption(OPT.EXPORT_NAME, new TextEncoder().encode("nope"));
    assert.equal(await bad.waitClosed(), true);
  });
});

Deno.test("raw: LIST with data → ERR_INVALID, then LIST works", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    await bad.sendOption(OPT.LIST, new Uint8Array([0, 0, 0, 0]));
    await expectOptReply(bad, OPT.LIST, REP.ERR_INVALID);
    await expectListWorks(bad);
  });
});

Deno.test("raw: unknown option 99 → ERR_UNSUP, then negotiation continues", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    await bad.sendOption(99, new Uint8Array([1, 2, 3]));
    await expectOptReply(bad, 99, REP.ERR_UNSUP);
    await expectListWorks(bad);
    await bad.sendOption(OPT.GO, infoRequest("", []));
    const rs = await bad.optReplies();
    assert.equal(repName(rs[rs.length - 1]!.type), "ACK");
    assert.deepEqual(await bad.read(0, 4), HEAD.subarray(0, 4));
  });
});

Deno.test("raw: STARTTLS without TLS configured → ERR_POLICY", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    await bad.sendOption(OPT.STARTTLS);
    await expectOptReply(bad, OPT.STARTTLS, REP.ERR_POLICY);
    await expectListWorks(bad);
  });
});

Deno.test("raw: SET_META_CONTEXT before STRUCTURED_REPLY → ERR_INVALID", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    await bad.sendOption(OPT.SET_META_CONTEXT, metaContextQuery("", ["base:allocation"]));
    await expectOptReply(bad, OPT.SET_META_CONTEXT, REP.ERR_INVALID);
    await expectListWorks(bad);
  });
});

Deno.test("raw: LIST_META_CONTEXT before STRUCTURED_REPLY is allowed (qemu) and lists base:allocation", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    await bad.sendOption(OPT.LIST_META_CONTEXT, metaContextQuery("", []));
    const rs = await bad.optReplies();
    assert.deepEqual(
      rs.map((r) =>
        r.type === REP.META_CONTEXT ? new TextDecoder().decode(r.data.subarray(4)) : repName(r.type)
      ),
      ["base:allocation", "ACK"],
    );
  });
});

Deno.test("raw: STRUCTURED_REPLY twice → ACK then ERR_INVALID", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    await bad.sendOption(OPT.STRUCTURED_REPLY);
    await expectOptReply(bad, OPT.STRUCTURED_REPLY, REP.ACK);
    await bad.sendOption(OPT.STRUCTURED_REPLY);
    await expectOptReply(bad, OPT.STRUCTURED_REPLY, REP.ERR_INVALID);
    await bad.sendOption(OPT.STRUCTURED_REPLY, new Uint8Array(1));
    await expectOptReply(bad, OPT.STRUCTURED_REPLY, REP.ERR_INVALID);
  });
});

Deno.test("raw: INFO for the default export sends INFO_EXPORT with size, and an unknown name ERR_UNKNOWN", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    await bad.sendOption(OPT.INFO, infoRequest("", [INFO.BLOCK_SIZE]));
    const rs = await bad.optReplies();
    assert.equal(repName(rs[rs.length - 1]!.type), "ACK");
    const infos = new Map(
      rs.filter((r) => r.type === REP.INFO).map((r) => [view(r.data).getUint16(0), r.data]),
    );
    const exp = infos.get(INFO.EXPORT);
    assert.ok(exp, "INFO_EXPORT present");
    assert.equal(exp.length, 12);
    assert.equal(view(exp).getBigUint64(2), BigInt(SIZE));
    const bs = infos.get(INFO.BLOCK_SIZE);
    assert.ok(bs, "INFO_BLOCK_SIZE present when requested");
    assert.deepEqual([view(bs).getUint32(2), view(bs).getUint32(6), view(bs).getUint32(10)], [
      1,
      4096,
      32 * MiB,
    ]);
    await bad.sendOption(OPT.INFO, infoRequest("nope", []));
    const unk = await bad.optReplies();
    assert.deepEqual(unk.map((r) => repName(r.type)), ["ERR_UNKNOWN"]);
  });
});

Deno.test("raw: INFO with a name length past the option data → ERR_INVALID", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    const d = infoRequest("", []);
    view(d).setUint32(0, 100);
    await bad.sendOption(OPT.INFO, d);
    await expectOptReply(bad, OPT.INFO, REP.ERR_INVALID);
    await expectListWorks(bad);
  });
});

Deno.test("raw: option length over 32 MiB → disconnect", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    const h = new Uint8Array(16);
    view(h).setBigUint64(0, 0x49484156454f5054n);
    view(h).setUint32(8, OPT.LIST);
    view(h).setUint32(12, 0x7fffffff);
    await bad.write(h);
    assert.equal(await bad.waitClosed(), true);
  });
});

Deno.test("raw: ABORT → ACK (or close), then the server drops the connection", async () => {
  await guarded(async (bad) => {
    await bad.handshake();
    await bad.sendOption(OPT.ABORT);
    try {
      await expectOptReply(bad, OPT.ABORT, REP.ACK);
    } catch (e) {
      // The spec lets a client not wait for the ACK; qemu sends it, so require it here.
      if (e instanceof ClosedError) assert.fail("server closed without ACK to ABORT");
      throw e;
    }
    assert.equal(await bad.waitClosed(), true);
  });
});

Deno.test("raw: write then read back through a raw connection with FUA and FLUSH", async () => {
  await guarded(async (bad) => {
    const n = await bad.negotiate();
    assert.equal(n.flags & 0x0c, 0x0c, "SEND_FLUSH | SEND_FUA");
    const data = patternBytes(3000, 77);
    await bad.request({
      type: CMD.WRITE,
      flags: CMD_FLAG.FUA,
      offset: 2 * MiB + 7,
      length: 3000,
      payload: data,
      cookie: 20n,
    });
    assert.deepEqual(await bad.reply(), { kind: "simple", error: 0, cookie: 20n });
    await bad.request({ type: CMD.FLUSH, length: 0, cookie: 21n });
    assert.deepEqual(await bad.reply(), { kind: "simple", error: 0, cookie: 21n });
    assert.deepEqual(await bad.read(2 * MiB + 7, 3000), data);
  });
});
