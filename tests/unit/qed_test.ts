/**
 * The QED header decoder and encoder, tables, the driver over an in-memory file (allocation
 * order, concurrent allocations, zero writes, the need-check bit, repair at open) and a seeded
 * fuzz of damaged images: opening and every request end in data or a BlockError, never a crash
 * or a hang.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  decodeQedHeader,
  encodeQedHeader,
  QED_F_NEED_CHECK,
  QED_MAGIC,
  qedMaxImageSize,
  qedProbe,
} from "../../lib/block/qed/header.ts";
import { HUGE_OFFSET, L2Cache, QedTable } from "../../lib/block/qed/table.ts";
import { openQed, type QedDevice } from "../../lib/block/qed/mod.ts";
import type { FormatContext } from "../../lib/block/formats.ts";
import type { FileEngine } from "../../lib/io/file_engine.ts";
import { BlockError, Errno, ExtentList } from "../../lib/block/types.ts";

const CS = 4096;

/** A header as qemu-img creates it: `cs` clusters, `ts`-cluster tables, L1 at cluster 1. */
function header(size: number, edit?: (v: DataView) => void, cs = CS, ts = 2): Uint8Array {
  const b = new Uint8Array(64);
  const v = new DataView(b.buffer);
  v.setUint32(0, QED_MAGIC, true);
  v.setUint32(4, cs, true);
  v.setUint32(8, ts, true);
  v.setUint32(12, 1, true);
  v.setBigUint64(40, BigInt(cs), true);
  v.setBigUint64(48, BigInt(size), true);
  edit?.(v);
  return b;
}

/** A whole new image file: header cluster and an empty L1 table. */
function image(size: number, edit?: (v: DataView) => void, cs = CS, ts = 2): Uint8Array {
  const b = new Uint8Array(cs * (1 + ts));
  b.set(header(size, edit, cs, ts));
  return b;
}

function rejects(b: Uint8Array, fileLength: number, errno: number, msg: string): void {
  assert.throws(() => decodeQedHeader(b, fileLength), (e: unknown) => {
    assert.ok(e instanceof BlockError);
    assert.equal(e.errno, errno);
    assert.equal(e.message, msg);
    return true;
  });
}

Deno.test("qed header: a qemu-img header decodes; probe scores the magic", () => {
  const h = decodeQedHeader(header(1 << 20), 3 * CS);
  assert.equal(h.clusterSize, CS);
  assert.equal(h.tableSize, 2);
  assert.equal(h.l1TableOffset, CS);
  assert.equal(h.imageSize, 1 << 20);
  assert.equal(qedProbe(header(1)), 100);
  assert.equal(qedProbe(header(1).subarray(0, 63)), 0);
  assert.equal(qedProbe(new Uint8Array(64)), 0);
});

Deno.test("qed header: damaged headers get qemu's messages, in qemu's order", () => {
  const len = 3 * CS;
  rejects(
    header(512, (v) => v.setUint32(0, 1, true)),
    len,
    Errno.EINVAL,
    "Image not in QED format",
  );
  rejects(
    header(512, (v) => v.setBigUint64(16, 0x1f0n, true)),
    len,
    Errno.ENOTSUP,
    "Unsupported QED features: 1f0",
  );
  rejects(
    header(512, (v) => v.setUint32(4, 3000, true)),
    len,
    Errno.EINVAL,
    "QED cluster size is invalid",
  );
  rejects(
    header(512, (v) => v.setUint32(8, 32, true)),
    len,
    Errno.EINVAL,
    "QED table size is invalid",
  );
  rejects(header(100), len, Errno.EINVAL, "QED image size is invalid");
  // One-cluster tables fail qemu's table offset test (its overflow check).
  rejects(
    header(512, (v) => v.setUint32(8, 1, true)),
    len,
    Errno.EINVAL,
    "QED table offset is invalid",
  );
  // The L1 table must fit in the file (rounded down to whole clusters).
  rejects(header(512), 3 * CS - 1, Errno.EINVAL, "QED table offset is invalid");
  rejects(
    header(512, (v) => v.setUint32(12, 1 << 20, true)),
    len,
    Errno.EINVAL,
    "QED table offset is invalid",
  );
  rejects(
    header(512, (v) => {
      v.setUint32(4, 1 << 16, true);
      v.setUint32(12, 0x10000, true);
      v.setBigUint64(40, 1n << 32n, true);
    }, 1 << 16),
    2 ** 33,
    Errno.EINVAL,
    "QED header size is too large",
  );
  rejects(
    header(512, (v) => {
      v.setBigUint64(16, 1n, true);
      v.setUint32(56, 4000, true);
      v.setUint32(60, 100, true);
    }),
    len,
    Errno.EINVAL,
    "QED backing filename offset is invalid",
  );
});

Deno.test("qed header: qemu's largest image size wraps at 2^64", () => {
  assert.equal(qedMaxImageSize(65536, 4), 64n << 40n);
  // 64 MiB clusters, 16-cluster tables: 2^80, which is 0 modulo 2^64.
  assert.equal(qedMaxImageSize(64 << 20, 16), 0n);
  rejects(
    header(512, (v) => {
      v.setUint32(4, 64 << 20, true);
      v.setUint32(8, 16, true);
      v.setBigUint64(40, BigInt(64 << 20), true);
    }),
    1 << 40,
    Errno.EINVAL,
    "QED image size is invalid",
  );
});

Deno.test("qed header: encode writes the fields and keeps the bytes around them", () => {
  const raw = new Uint8Array(512).fill(0xab);
  raw.set(header(1 << 20));
  const h = decodeQedHeader(raw, 3 * CS);
  h.features |= QED_F_NEED_CHECK;
  const out = encodeQedHeader(h, raw);
  assert.equal(new DataView(out.buffer).getBigUint64(16, true), 2n);
  for (let i = 64; i < 512; i++) assert.equal(out[i], 0xab);
  assert.equal(decodeQedHeader(out, 3 * CS).features, 2n);
});

Deno.test("qed table: entries, huge values, sectors; the cache keeps its bound", () => {
  const t = new QedTable(new Uint8Array(4096));
  t.set(3, 2 ** 40 + 4096);
  assert.equal(t.get(3), 2 ** 40 + 4096);
  new DataView(t.bytes.buffer).setBigUint64(8 * 5, 1n << 60n, true);
  assert.equal(t.get(5), HUGE_OFFSET);
  const s = t.sectors(70, 60);
  assert.equal(s.offset, 512);
  assert.equal(s.bytes.length, 1024);
  const c = new L2Cache(2);
  c.set(1, t);
  c.set(2, t);
  c.get(1);
  c.set(3, t);
  assert.ok(c.get(1) !== undefined && c.get(3) !== undefined && c.get(2) === undefined);
});

/** A FileEngine over a growable in-memory buffer. */
function memFile(init: Uint8Array): FileEngine & { bytes(): Uint8Array } {
  let buf = new Uint8Array(init);
  return {
    path: "mem.qed",
    fd: -1,
    pread(b: Uint8Array, off: number) {
      const n = Math.max(0, Math.min(b.length, buf.length - off));
      if (n > 0) b.set(buf.subarray(off, off + n));
      return Promise.resolve(n);
    },
    pwrite(b: Uint8Array, off: number) {
      if (off + b.length > buf.length) {
        const g = new Uint8Array(off + b.length);
        g.set(buf);
        buf = g;
      }
      buf.set(b, off);
      return Promise.resolve();
    },
    sync: () => Promise.resolve(),
    length: () => buf.length,
    truncate() {},
    punchHole: () => Promise.resolve(),
    zeroRange: () => Promise.resolve(),
    seekData: (o: number) => o < buf.length ? o : -1,
    seekHole: () => buf.length,
    prefetch() {},
    close() {},
    bytes: () => buf,
  };
}

function ctx(writable: boolean): FormatContext {
  return {
    writable,
    options: {},
    warn: () => {},
    chain: { paths: [] },
    openBacking: () => Promise.reject(new BlockError(Errno.ENOENT, "no backing files here")),
    openFile: () => {
      throw new Error("not used");
    },
  };
}

function features(b: Uint8Array): bigint {
  return new DataView(b.buffer).getBigUint64(16, true);
}

function l2Entry(b: Uint8Array, i: number): number {
  const v = new DataView(b.buffer);
  const l2 = Number(v.getBigUint64(CS, true));
  return Number(v.getBigUint64(l2 + 8 * i, true));
}

Deno.test("qed driver: allocation at the end of the file, data before tables, dirty bit", async () => {
  const file = memFile(image(8 << 20));
  const dev = await openQed(file, ctx(true));
  const buf = new Uint8Array(8192).fill(7);
  await dev.pread(buf, 0);
  assert.ok(buf.every((b) => b === 0));
  // Two concurrent writes into one new cluster allocate it once.
  await Promise.all([
    dev.pwrite(new Uint8Array(100).fill(0xaa), 5 * CS + 10, {}),
    dev.pwrite(new Uint8Array(100).fill(0xbb), 5 * CS + 1000, {}),
  ]);
  const bytes = file.bytes();
  // Data cluster at 3 clusters (after header and L1), then the new L2 table (2 clusters).
  assert.equal(bytes.length, 6 * CS);
  assert.equal(l2Entry(bytes, 5), 3 * CS);
  assert.equal(features(bytes) & QED_F_NEED_CHECK, QED_F_NEED_CHECK);
  const back = new Uint8Array(CS);
  await dev.pread(back, 5 * CS);
  assert.ok(back.subarray(10, 110).every((b) => b === 0xaa));
  assert.ok(back.subarray(1000, 1100).every((b) => b === 0xbb));
  assert.equal(back[0], 0);
  // A whole-cluster zero write makes zero clusters; a partial one writes zero data.
  await dev.zero(8 * CS, 2 * CS, {});
  assert.equal(l2Entry(file.bytes(), 8), 1);
  assert.equal(l2Entry(file.bytes(), 9), 1);
  await assert.rejects(dev.zero(12 * CS + 512, CS, { fastZero: true }), (e: unknown) => {
    return e instanceof BlockError && e.errno === Errno.ENOTSUP;
  });
  const out = new ExtentList(16);
  await dev.extents(0, 16 * CS, out);
  assert.deepEqual(out.pairs, [5 * CS, 3, CS, 0, 10 * CS, 3]);
  const depth = new ExtentList(16);
  await dev.allocationDepth(0, 16 * CS, depth);
  assert.deepEqual(depth.pairs, [5 * CS, 0, CS, 1, 2 * CS, 0, 2 * CS, 1, 6 * CS, 0]);
  await dev.close();
  assert.equal(features(file.bytes()) & QED_F_NEED_CHECK, 0n);
});

Deno.test("qed driver: read-only refuses writes; a dirty image is repaired at a writable open", async () => {
  const file = memFile(image(8 << 20));
  const dev = await openQed(file, ctx(true));
  await dev.pwrite(new Uint8Array(2 * CS).fill(1), 0, {});
  await dev.close();
  const bytes = new Uint8Array(file.bytes());
  const v = new DataView(bytes.buffer);
  v.setBigUint64(16, QED_F_NEED_CHECK, true);
  const l2 = Number(v.getBigUint64(CS, true));
  v.setBigUint64(l2 + 8, 1n << 40n, true); // entry 1 past the end of the file
  const ro = await openQed(memFile(bytes), ctx(false));
  await assert.rejects(ro.pwrite(new Uint8Array(1), 0, {}), (e: unknown) => {
    return e instanceof BlockError && e.errno === Errno.EPERM;
  });
  await assert.rejects(ro.pread(new Uint8Array(CS), CS), (e: unknown) => {
    return e instanceof BlockError && e.errno === Errno.EINVAL;
  });
  await ro.close();
  const f2 = memFile(bytes);
  const rw: QedDevice = await openQed(f2, ctx(true));
  assert.equal(features(f2.bytes()) & QED_F_NEED_CHECK, 0n);
  assert.equal(l2Entry(f2.bytes(), 1), 0);
  const got = new Uint8Array(2 * CS);
  await rw.pread(got, 0);
  assert.ok(got.subarray(0, CS).every((b) => b === 1));
  assert.ok(got.subarray(CS).every((b) => b === 0));
  await rw.close();
});

/** A small seeded generator (xorshift32). */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

Deno.test("qed fuzz: damaged images open or fail with a BlockError; requests end", async () => {
  // A valid image with data, zero clusters and two L2 tables (4 MiB per table).
  const file = memFile(image(9 << 20));
  const dev = await openQed(file, ctx(true));
  await dev.pwrite(new Uint8Array(3 * CS).fill(0x42), CS * 3 + 100, {});
  await dev.pwrite(new Uint8Array(CS).fill(0x43), (5 << 20) + 7, {});
  await dev.zero(CS * 20, CS * 4, {});
  await dev.close();
  const good = file.bytes();
  const r = rng(12345);
  let opened = 0;
  for (let iter = 0; iter < 300; iter++) {
    const bad = new Uint8Array(good);
    const v = new DataView(bad.buffer);
    const edits = 1 + Math.floor(r() * 4);
    for (let e = 0; e < edits; e++) {
      const kind = r();
      if (kind < 0.3) {
        bad[Math.floor(r() * 64)] = Math.floor(r() * 256); // header byte
      } else if (kind < 0.7) {
        // A table entry (L1 or an L2) set to something plausible or wild.
        const at = 8 * Math.floor(r() * (bad.length / 8));
        const choices = [
          0n,
          1n,
          BigInt(CS * Math.floor(r() * 12)),
          BigInt(Math.floor(r() * 2 ** 32)),
          1n << 62n,
        ];
        v.setBigUint64(at, choices[Math.floor(r() * choices.length)]!, true);
      } else {
        const at = Math.floor(r() * bad.length);
        bad[at] = Math.floor(r() * 256);
      }
    }
    const writable = r() < 0.5;
    let d: QedDevice;
    try {
      d = await openQed(memFile(bad), ctx(writable));
    } catch (e) {
      assert.ok(e instanceof BlockError, `iteration ${iter}: ${e}`);
      continue;
    }
    opened++;
    const ok = (e: unknown) => assert.ok(e instanceof BlockError, `iteration ${iter}: ${e}`);
    const size = Math.min(d.size, 16 << 20);
    const buf = new Uint8Array(64 * 1024);
    for (let pos = 0; pos < size; pos += buf.length) {
      await d.pread(buf.subarray(0, Math.min(buf.length, size - pos)), pos).catch(ok);
    }
    if (size > 0) {
      await d.extents(0, size, new ExtentList(1000)).catch(ok);
      await d.allocationDepth(0, size, new ExtentList(1000)).catch(ok);
      if (writable) {
        const at = Math.floor(r() * Math.max(1, size - 10000));
        await d.pwrite(new Uint8Array(9000).fill(9), at, {}).catch(ok);
        await d.zero(0, Math.min(size, 8 * CS), {}).catch(ok);
      }
    }
    await d.close().catch(ok);
  }
  assert.ok(opened > 50, `only ${opened} damaged images opened`);
});
