/** The Parallels header and extension decoders, the driver over an in-memory file, and a fuzz. */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { decodeParallelsHeader, probeParallels } from "../../lib/block/parallels/header.ts";
import { parseParallelsExtension } from "../../lib/block/parallels/extension.ts";
import { openParallels } from "../../lib/block/parallels/mod.ts";
import { BlockError, Errno, ExtentList } from "../../lib/block/types.ts";
import { memFile, rng } from "./_mem_file.ts";

/** An image as qemu-img creates it: `entries` clusters of `tracks` sectors, data after the BAT. */
function image(entries: number, tracks: number, edit?: (v: DataView, b: Uint8Array) => void) {
  const dataOff = Math.ceil((64 + 4 * entries) / (tracks * 512)) * tracks;
  const b = new Uint8Array(dataOff * 512);
  const v = new DataView(b.buffer);
  b.set(new TextEncoder().encode("WithouFreSpacExt"));
  v.setUint32(16, 2, true);
  v.setUint32(20, 16, true);
  v.setUint32(28, tracks, true);
  v.setUint32(32, entries, true);
  v.setBigUint64(36, BigInt(entries * tracks), true);
  v.setUint32(48, dataOff, true);
  edit?.(v, b);
  return b;
}

function rejects(b: Uint8Array, errno: number, msg: string): void {
  assert.throws(() => decodeParallelsHeader(b), (e: unknown) => {
    assert.ok(e instanceof BlockError);
    assert.equal(e.errno, errno);
    assert.equal(e.message, msg);
    return true;
  });
}

Deno.test("parallels header: decodes both magics; qemu's messages for bad ones", () => {
  const h = decodeParallelsHeader(image(16, 8));
  assert.equal(h.size, 16 * 8 * 512);
  assert.equal(h.offMultiplier, 8);
  assert.equal(h.dataOff, 8);
  const old = decodeParallelsHeader(image(16, 8, (v, b) => {
    b.set(new TextEncoder().encode("WithoutFreeSpace"));
    v.setBigUint64(36, (1n << 32n) + 5n, true); // only 32 bits of sectors count
  }));
  assert.equal(old.offMultiplier, 1);
  assert.equal(old.size, 5 * 512);
  assert.equal(probeParallels(image(1, 1)), 100);
  assert.equal(probeParallels(image(1, 1).subarray(0, 63)), 0);
  assert.equal(probeParallels(image(1, 1, (v) => v.setUint32(16, 3, true))), 0);
  rejects(
    image(1, 1, (v) => v.setUint32(16, 1, true)),
    Errno.EINVAL,
    "Image not in Parallels format",
  );
  rejects(image(1, 1, (_v, b) => b[3] = 0), Errno.EINVAL, "Image not in Parallels format");
  rejects(
    image(1, 1, (v) => v.setUint32(28, 0, true)),
    Errno.EINVAL,
    "Invalid image: Zero sectors per track",
  );
  rejects(
    image(1, 1, (v) => v.setUint32(28, 4186129, true)),
    Errno.EFBIG,
    "Invalid image: Too big cluster",
  );
  rejects(image(1, 1, (v) => v.setUint32(32, 0x20000000, true)), Errno.EFBIG, "Catalog too large");
});

function extension(clusterSize: number, features: Uint8Array): Uint8Array {
  const b = new Uint8Array(clusterSize);
  new DataView(b.buffer).setBigUint64(0, 0xab234cef23dcea87n, true);
  b.set(features, 24);
  b.set(createHash("md5").update(b.subarray(24)).digest(), 8);
  return b;
}

Deno.test("parallels extension: end of features, bitmap geometry, qemu's messages", () => {
  assert.deepEqual(parseParallelsExtension(extension(4096, new Uint8Array(24)), 4096, 2048), []);
  // One bitmap of a 1 MiB disk, 64 KiB granularity: 16 bits, one 8-byte word, one table entry.
  const f = new Uint8Array(24 + 32 + 8 + 24);
  const v = new DataView(f.buffer);
  v.setBigUint64(0, 0x20385fae252cb34an, true);
  v.setUint32(16, 40, true);
  v.setBigUint64(24, 2048n, true);
  f.fill(0xab, 32, 48);
  v.setUint32(48, 128, true);
  v.setUint32(52, 1, true);
  const found = parseParallelsExtension(extension(4096, f), 4096, 2048);
  assert.equal(found.length, 1);
  assert.equal(found[0]!.granularity, 65536);
  assert.equal(found[0]!.id, "abababab-abab-abab-abab-abababababab");
  const bad = extension(4096, f);
  bad[100] = bad[100]! ^ 1;
  assert.throws(() => parseParallelsExtension(bad, 4096, 2048), /Wrong checksum/);
  assert.throws(() => parseParallelsExtension(extension(4096, f), 4096, 4096), /Bitmap size/);
  v.setUint32(52, 2, true);
  assert.throws(() => parseParallelsExtension(extension(4096, f), 4096, 2048), /l1 table exceeds/);
});

Deno.test("parallels driver: allocation at the end, BAT sector, inuse, close truncates", async () => {
  const file = memFile(image(16, 8));
  const dev = await openParallels(file, { writable: true, options: { "prealloc-size": "16k" } });
  assert.equal(new DataView(file.bytes().buffer).getUint32(44, true), 0x746f6e59);
  assert.equal(dev.caps.minBlock, 512);
  // Two concurrent writes into one new cluster allocate it once.
  await Promise.all([
    dev.pwrite(new Uint8Array(512).fill(0xaa), 3 * 4096, {}),
    dev.pwrite(new Uint8Array(512).fill(0xbb), 3 * 4096 + 1024, {}),
    dev.pwrite(new Uint8Array(512).fill(0xcc), 5 * 4096, {}),
  ]);
  const v = new DataView(file.bytes().buffer);
  assert.equal(v.getUint32(64 + 12, true), 1); // cluster 1 of the file (data_off 8 sectors)
  assert.equal(v.getUint32(64 + 20, true), 2);
  // Grown by the cluster and the preallocation.
  assert.equal(file.length(), 4096 + 4096 + 16384);
  const back = new Uint8Array(4096);
  await dev.pread(back, 3 * 4096);
  assert.ok(back.subarray(0, 512).every((b) => b === 0xaa));
  assert.ok(back.subarray(512, 1024).every((b) => b === 0));
  assert.ok(back.subarray(1024, 1536).every((b) => b === 0xbb));
  const out = new ExtentList(16);
  await dev.extents(0, 16 * 4096, out);
  assert.deepEqual(out.pairs, [3 * 4096, 3, 4096, 0, 4096, 3, 4096, 0, 10 * 4096, 3]);
  const depth = new ExtentList(16);
  await dev.allocationDepth!(0, 16 * 4096, depth);
  assert.deepEqual(depth.pairs, [3 * 4096, 0, 4096, 1, 4096, 0, 4096, 1, 10 * 4096, 0]);
  await assert.rejects(
    dev.zero(0, 512, { fastZero: true }),
    (e: unknown) => e instanceof BlockError && e.errno === Errno.ENOTSUP,
  );
  await dev.close();
  assert.equal(file.length(), 3 * 4096);
  assert.equal(new DataView(file.bytes().buffer).getUint32(44, true), 0);
  // Marked in use: read-only only.
  const used = memFile(image(4, 8, (v) => v.setUint32(44, 0x746f6e59, true)));
  await assert.rejects(openParallels(used, { writable: true }), /not closed correctly/);
  await (await openParallels(used, { writable: false })).close();
  await assert.rejects(
    openParallels(memFile(image(4, 8)), { writable: false, options: { "prealloc-mode": "x" } }),
    /invalid parameter value: x/,
  );
});

Deno.test("parallels fuzz: damaged headers and BATs fail cleanly or read in bounds", async () => {
  const r = rng(4242);
  const base = image(64, 2, (v) => {
    for (let i = 0; i < 64; i += 3) v.setUint32(64 + 4 * i, 1 + i / 3, true);
  });
  const full = new Uint8Array(base.length + 40 * 1024);
  full.set(base);
  for (let iter = 0; iter < 400; iter++) {
    const b = new Uint8Array(full);
    const n = 1 + Math.floor(r() * 6);
    for (let k = 0; k < n; k++) {
      const at = r() < 0.6 ? Math.floor(r() * 64) : 64 + Math.floor(r() * 256);
      b[at] = Math.floor(r() * 256);
    }
    const cut = r() < 0.2 ? Math.floor(r() * b.length) : b.length;
    const writable = r() < 0.5;
    let dev;
    try {
      dev = await openParallels(memFile(b.subarray(0, cut)), { writable });
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
    const out = new ExtentList(64);
    await dev.extents(0, size, out);
    await dev.close();
  }
});
