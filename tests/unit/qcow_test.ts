/** The qcow header decoder, the driver over an in-memory file, and a fuzz of header and tables. */

import assert from "node:assert/strict";
import { deflateRawSync } from "node:zlib";
import { decodeQcowHeader, probeQcow } from "../../lib/block/qcow/header.ts";
import { openQcow } from "../../lib/block/qcow/mod.ts";
import { type BlockDevice, BlockError, Errno, ExtentList } from "../../lib/block/types.ts";
import { memFile, rng } from "./_mem_file.ts";

/** A header: `size` bytes, 2^cb clusters, 2^lb L2 entries, L1 right after it. */
function header(size: number, cb = 12, lb = 9, edit?: (v: DataView, b: Uint8Array) => void) {
  const l1 = Math.ceil(size / ((1 << cb) << lb));
  const b = new Uint8Array(48 + l1 * 8);
  const v = new DataView(b.buffer);
  v.setUint32(0, 0x514649fb);
  v.setUint32(4, 1);
  v.setBigUint64(24, BigInt(size));
  b[32] = cb;
  b[33] = lb;
  v.setBigUint64(40, 48n);
  edit?.(v, b);
  return b;
}

function rejects(b: Uint8Array, errno: number, msg: string): void {
  assert.throws(() => decodeQcowHeader(b), (e: unknown) => {
    assert.ok(e instanceof BlockError);
    assert.equal(e.errno, errno);
    assert.equal(e.message, msg);
    return true;
  });
}

const noBacking = {
  writable: true,
  chain: { paths: [] },
  openBacking: () => Promise.reject(new Error("no backing expected")),
};

Deno.test("qcow header: decodes; qemu's messages for bad ones", () => {
  const h = decodeQcowHeader(header(1000));
  assert.equal(h.size, 512); // whole sectors
  assert.equal(h.l1Size, 1);
  assert.equal(probeQcow(header(1 << 20)), 100);
  assert.equal(probeQcow(header(1 << 20, 12, 9, (v) => v.setUint32(4, 2))), 0);
  rejects(header(4096, 12, 9, (v) => v.setUint32(0, 1)), Errno.EINVAL, "Image not in qcow format");
  rejects(
    header(4096, 12, 9, (v) => v.setUint32(4, 3)),
    Errno.ENOTSUP,
    "qcow (v1) does not support qcow version 3\nTry the 'qcow2' driver instead.",
  );
  rejects(header(1), Errno.EINVAL, "Image size is too small (must be at least 2 bytes)");
  rejects(header(4096, 17), Errno.EINVAL, "Cluster size must be between 512 and 64k");
  rejects(header(4096, 12, 14), Errno.EINVAL, "L2 table size must be between 512 and 64k");
  rejects(
    header(4096, 12, 9, (v) => v.setUint32(36, 5)),
    Errno.EINVAL,
    "invalid encryption method in qcow header",
  );
  rejects(
    header(4096, 9, 6, (v) => v.setBigUint64(24, 1n << 62n)),
    Errno.EINVAL,
    "Image too large",
  );
  rejects(
    header(4096, 12, 9, (v) => {
      v.setBigUint64(8, 48n);
      v.setUint32(16, 1024);
    }),
    Errno.EINVAL,
    "Backing file name too long",
  );
});

Deno.test("qcow driver: L2 and cluster allocation at the end, compressed rewrite", async () => {
  // 64 KiB image, 4 KiB clusters; cluster 1 compressed (at offset 0x3000, after an L2 table).
  const cs = 4096;
  const plain = new Uint8Array(cs).fill(0x5c);
  const z = deflateRawSync(plain, { windowBits: 12 });
  const img = new Uint8Array(0x3000 + z.length);
  img.set(header(65536));
  const v = new DataView(img.buffer);
  v.setBigUint64(48, 0x1000n);
  v.setBigUint64(0x1000 + 8, (1n << 63n) | (BigInt(z.length) << 51n) | 0x3000n);
  img.set(z, 0x3000);
  const file = memFile(img);
  const dev = await openQcow(file, noBacking);
  assert.equal(dev.caps.minBlock, 512);
  const buf = new Uint8Array(2 * cs);
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(0, cs).every((b) => b === 0));
  assert.ok(buf.subarray(cs).every((b) => b === 0x5c));
  // A partial write into the compressed cluster: the whole cluster moves to the end first.
  await dev.pwrite(new Uint8Array(512).fill(1), cs + 512, {});
  const at = Number(new DataView(file.bytes().buffer).getBigUint64(0x1000 + 8));
  assert.equal(at, 0x4000);
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(cs, cs + 512).every((b) => b === 0x5c));
  assert.ok(buf.subarray(cs + 512, cs + 1024).every((b) => b === 1));
  assert.ok(buf.subarray(cs + 1024).every((b) => b === 0x5c));
  // Concurrent writes into one new cluster allocate it once; a write far out needs no new L2.
  await Promise.all([
    dev.pwrite(new Uint8Array(512).fill(2), 5 * cs, {}),
    dev.pwrite(new Uint8Array(512).fill(3), 5 * cs + 1024, {}),
  ]);
  assert.equal(Number(new DataView(file.bytes().buffer).getBigUint64(0x1000 + 40)), 0x5000);
  assert.equal(file.length(), 0x6000);
  const out = new ExtentList(16);
  await dev.extents(0, 65536, out);
  assert.deepEqual(out.pairs, [cs, 3, cs, 0, 3 * cs, 3, cs, 0, 10 * cs, 3]);
  const depth = new ExtentList(16);
  await dev.allocationDepth!(0, 65536, depth);
  assert.deepEqual(depth.pairs, [cs, 0, cs, 1, 3 * cs, 0, cs, 1, 10 * cs, 0]);
  await dev.close();
  // No L2 table yet: one is made at the end of the file, cluster-aligned, then the cluster.
  const empty = memFile(header(1 << 22));
  const d2 = await openQcow(empty, noBacking);
  await d2.pwrite(new Uint8Array(512).fill(9), (1 << 21) + 4096, {});
  const ev = new DataView(empty.bytes().buffer);
  assert.equal(Number(ev.getBigUint64(48 + 8)), 4096);
  assert.equal(Number(ev.getBigUint64(4096 + 8)), 8192);
  await d2.close();
});

Deno.test("qcow driver: unallocated clusters read the backing file, clipped to its size", async () => {
  const backing: BlockDevice = {
    size: 6000,
    caps: {
      writable: false,
      flush: false,
      trim: false,
      zero: false,
      fastZero: false,
      extents: true,
      minBlock: 1,
    },
    pread: (b) => Promise.resolve(void b.fill(0x42)),
    pwrite: () => Promise.reject(new Error("read-only")),
    flush: () => Promise.resolve(),
    trim: () => Promise.resolve(),
    zero: () => Promise.resolve(),
    cache: () => Promise.resolve(),
    extents: (_o, l, out) => Promise.resolve(void out.add(l, 0)),
    close: () => Promise.resolve(),
  };
  const img = header(16384, 12, 9, (v, b) => {
    v.setBigUint64(8, BigInt(b.length));
    v.setUint32(16, 4);
  });
  const withName = new Uint8Array(img.length + 5); // the name field counts 4 of its 5 bytes
  withName.set(img);
  withName.set(new TextEncoder().encode("b.img"), img.length);
  let asked = "";
  const dev = await openQcow(memFile(withName, "/x/top.qcow"), {
    writable: false,
    chain: { paths: [] },
    openBacking: (p) => {
      asked = p;
      return Promise.resolve(backing);
    },
  });
  assert.equal(asked, "/x/b.im");
  const buf = new Uint8Array(8192);
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(0, 6000).every((b) => b === 0x42));
  assert.ok(buf.subarray(6000).every((b) => b === 0));
  const depth = new ExtentList(8);
  await dev.allocationDepth!(0, 16384, depth);
  assert.deepEqual(depth.pairs, [16384, 2]);
  const out = new ExtentList(8);
  await dev.extents(0, 16384, out);
  assert.deepEqual(out.pairs, [6000, 0, 16384 - 6000, 3]);
  await dev.close();
});

Deno.test("qcow fuzz: damaged headers and tables fail cleanly or read in bounds", async () => {
  const r = rng(777);
  const cs = 512;
  // 64 KiB, 512-byte clusters, 64-entry L2 tables: two L1 entries, one L2 table, some data.
  const img = new Uint8Array(0x4000);
  img.set(header(65536, 9, 6));
  const v = new DataView(img.buffer);
  v.setBigUint64(48, 0x400n);
  for (let j = 0; j < 64; j += 5) v.setBigUint64(0x400 + 8 * j, BigInt(0x800 + j * cs));
  const z = deflateRawSync(new Uint8Array(cs).fill(7), { windowBits: 12 });
  v.setBigUint64(0x400 + 8, (1n << 63n) | (BigInt(z.length) << 54n) | 0x3f00n);
  img.set(z, 0x3f00);
  for (let iter = 0; iter < 400; iter++) {
    const b = new Uint8Array(img);
    const n = 1 + Math.floor(r() * 6);
    for (let k = 0; k < n; k++) {
      const at = r() < 0.4
        ? Math.floor(r() * 64)
        : r() < 0.8
        ? 0x400 + Math.floor(r() * 512)
        : 0x3f00 + Math.floor(r() * 64);
      b[at] = Math.floor(r() * 256);
    }
    const writable = r() < 0.5;
    let dev;
    try {
      dev = await openQcow(memFile(b), { ...noBacking, writable });
    } catch (e) {
      assert.ok(e instanceof BlockError, `iteration ${iter}: ${e}`);
      continue;
    }
    const size = Math.min(dev.size, 1 << 20);
    const buf = new Uint8Array(4096);
    for (let k = 0; k < 4 && size >= 4096; k++) {
      const off = Math.floor(r() * (size - 4096) / 512) * 512;
      try {
        await dev.pread(buf, off);
        if (writable) await dev.pwrite(buf.fill(k), off, {});
      } catch (e) {
        assert.ok(e instanceof BlockError, `iteration ${iter}: ${e}`);
      }
    }
    try {
      await dev.extents(0, size, new ExtentList(64));
    } catch (e) {
      assert.ok(e instanceof BlockError, `iteration ${iter}: ${e}`);
    }
    await dev.close();
  }
});
