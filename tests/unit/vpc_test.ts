/** The VHD footer and dynamic header decoders, the size rule, the driver over a fake file, fuzz. */

import assert from "node:assert/strict";
import {
  decodeDynHeader,
  decodeFooter,
  diskSectors,
  footerChecksum,
  hasVhdCookie,
  parseSizeCalc,
  VHD_MAX_SECTORS,
} from "../../lib/block/vpc/footer.ts";
import { openVpc } from "../../lib/block/vpc/mod.ts";
import type { FileEngine } from "../../lib/io/file_engine.ts";
import { BlockError, Errno, ExtentList } from "../../lib/block/types.ts";
import { editDynamicFooters, editFooter, emptyDynamicVhd } from "../interop/_vpc_images.ts";

const MiB = 1024 * 1024;

/** A FileEngine over a growable in-memory buffer. */
function memFile(init: Uint8Array): FileEngine & { bytes(): Uint8Array } {
  let buf = new Uint8Array(init);
  return {
    path: "mem.vhd",
    fd: -1,
    pread(b: Uint8Array, off: number) {
      const n = Math.max(0, Math.min(b.length, buf.length - off));
      b.set(buf.subarray(off, off + n));
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

function blockError(errno: number, msg: RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof BlockError, String(e));
    assert.equal(e.errno, errno);
    assert.match(e.message, msg);
    return true;
  };
}

Deno.test("vpc footer: checksum, cookie, qemu's size rule", () => {
  const img = emptyDynamicVhd(10 * MiB, 2 * MiB);
  assert.ok(hasVhdCookie(img));
  assert.ok(!hasVhdCookie(img.subarray(512)));
  const f = decodeFooter(img.subarray(0, 512));
  assert.equal(footerChecksum(img.subarray(0, 512)), new DataView(img.buffer).getUint32(64));
  // Maximum geometry: current_size, whatever the creator.
  assert.equal(diskSectors(f, undefined, "x"), 10 * MiB / 512);
  const edit = (e: Parameters<typeof editFooter>[2]) => {
    const b = img.slice(0, 512);
    editFooter(b, 0, e);
    return decodeFooter(b);
  };
  const chs: [number, number, number] = [100, 4, 17];
  for (const app of ["vpc ", "qemu", "xyz\0"]) {
    assert.equal(diskSectors(edit({ creatorApp: app, chs }), undefined, "x"), 6800, app);
  }
  for (const app of ["win ", "qem2", "d2v ", "CTXS", "tap\0"]) {
    assert.equal(diskSectors(edit({ creatorApp: app, chs }), undefined, "x"), 20480, app);
  }
  assert.equal(diskSectors(edit({ creatorApp: "win ", chs }), "chs", "x"), 6800);
  assert.equal(diskSectors(edit({ creatorApp: "vpc ", chs }), "current_size", "x"), 20480);
  // current_size is rounded down to whole sectors.
  assert.equal(diskSectors(edit({ currentSize: 1000n }), undefined, "x"), 1);
  assert.throws(
    () => diskSectors(edit({ currentSize: BigInt(VHD_MAX_SECTORS + 1) * 512n }), undefined, "f"),
    blockError(Errno.EFBIG, /^Could not open 'f': File too large$/),
  );
  assert.equal(parseSizeCalc("chs"), "chs");
  assert.throws(
    () => parseSizeCalc("CHS"),
    blockError(Errno.EINVAL, /^Invalid size calculation mode: 'CHS'$/),
  );
  const bad = img.slice(0, 512);
  bad[100] = 1;
  assert.throws(() => decodeFooter(bad), blockError(Errno.EINVAL, /^Incorrect header checksum$/));
});

Deno.test("vpc dynamic header: qemu's checks in its order", () => {
  const img = emptyDynamicVhd(10 * MiB, 2 * MiB);
  const dyn = (edit: (v: DataView) => void) => {
    const b = img.slice(512, 1536);
    edit(new DataView(b.buffer));
    return b;
  };
  const h = decodeDynHeader(dyn(() => {}), 20480);
  assert.equal(h.blockSize, 2 * MiB);
  assert.equal(h.bitmapSize, 512);
  assert.equal(h.maxTableEntries, 5);
  assert.equal(decodeDynHeader(dyn((v) => v.setUint32(32, 512)), 1).bitmapSize, 0);
  assert.equal(decodeDynHeader(dyn((v) => v.setUint32(32, 8 * MiB)), 1).bitmapSize, 2048);
  const cases: [(v: DataView) => void, RegExp][] = [
    [(v) => v.setUint8(0, 0), /^Invalid header magic$/],
    [(v) => v.setUint32(32, 3000), /^Invalid block size 3000$/],
    [(v) => v.setUint32(32, 256), /^Invalid block size 256$/],
    [(v) => v.setUint32(28, 4), /^Page table too small$/],
    [(v) => v.setUint32(28, 0x20000000), /^Max Table Entries too large \(536870912\)$/],
    [(v) => v.setUint32(28, 0xffffffff), /^Max Table Entries too large \(-1\)$/],
  ];
  for (const [edit, msg] of cases) {
    assert.throws(() => decodeDynHeader(dyn(edit), 20480), blockError(Errno.EINVAL, msg));
  }
});

Deno.test("vpc driver: writes allocate at the end as qemu lays blocks out", async () => {
  const img = emptyDynamicVhd(10 * MiB, 2 * MiB);
  const file = memFile(img);
  const dev = await openVpc(file, { writable: true });
  assert.equal(dev.size, 10 * MiB);
  const buf = new Uint8Array(8192).fill(7);
  await dev.pread(buf, 0);
  assert.ok(buf.every((b) => b === 0));
  // Two concurrent writes into the same new block allocate it once.
  await Promise.all([
    dev.pwrite(new Uint8Array(4096).fill(0xaa), 4 * MiB + 4096, {}),
    dev.pwrite(new Uint8Array(4096).fill(0xbb), 4 * MiB + 8192, {}),
  ]);
  const bytes = file.bytes();
  const v = new DataView(bytes.buffer);
  const first = 1536 + 512; // the old footer's place
  assert.equal(bytes.length, first + 512 + 2 * MiB + 512);
  assert.equal(v.getUint32(1536 + 8), first / 512);
  assert.equal(v.getUint32(1536 + 4), 0xffffffff);
  assert.ok(bytes.subarray(first, first + 512).every((b) => b === 0xff));
  assert.deepEqual(bytes.subarray(bytes.length - 512), img.subarray(0, 512));
  const back = new Uint8Array(8192);
  await dev.pread(back, 4 * MiB + 4096);
  assert.ok(back.subarray(0, 4096).every((b) => b === 0xaa));
  assert.ok(back.subarray(4096).every((b) => b === 0xbb));
  // A read across blocks: the unused half reads zero.
  const across = new Uint8Array(8192).fill(1);
  await dev.pread(across, 4 * MiB - 4096);
  assert.ok(across.subarray(0, 4096).every((b) => b === 0));
  const out = new ExtentList(16);
  await dev.extents(0, 10 * MiB, out);
  assert.deepEqual(out.pairs, [4 * MiB, 3, 2 * MiB, 0, 4 * MiB, 3]);
  await assert.rejects(dev.zero(0, 512, { fastZero: true }), blockError(Errno.ENOTSUP, /zero/));
  await dev.close();
  // Reopened: the block is where it was; a partial bitmap is set to all ones on the next write.
  bytes[first + 3] = 0;
  const f2 = memFile(bytes);
  const dev2 = await openVpc(f2, { writable: true });
  await dev2.pwrite(new Uint8Array(10).fill(3), 4 * MiB, {});
  assert.ok(f2.bytes().subarray(first, first + 512).every((b) => b === 0xff));
  await dev2.close();
});

Deno.test("vpc driver: fixed images refuse writes that reach the footer", async () => {
  const img = new Uint8Array(MiB + 512);
  const footer = emptyDynamicVhd(MiB, 2 * MiB).slice(0, 512);
  img.set(footer, MiB);
  editFooter(img, MiB, { type: 2, dataOffset: 0xffffffffffffffffn });
  const dev = await openVpc(memFile(img), { writable: true });
  assert.equal(dev.size, MiB);
  await dev.pwrite(new Uint8Array(512).fill(9), MiB - 512, {});
  await assert.rejects(
    dev.pwrite(new Uint8Array(513), MiB - 512, {}),
    blockError(Errno.EIO, /reaches the footer/),
  );
  await dev.close();
  await assert.rejects(
    openVpc(memFile(new Uint8Array(100)), { writable: false }),
    blockError(Errno.EINVAL, /^File too small for a VHD header$/),
  );
  await assert.rejects(
    openVpc(memFile(new Uint8Array(4096)), { writable: false }),
    blockError(Errno.EINVAL, /^invalid VPC image$/),
  );
});

/** xorshift32. */
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

Deno.test("vpc fuzz: damaged footers, headers and tables fail cleanly or read in bounds", async () => {
  // A small image with two allocated 4 KiB blocks.
  const base = memFile(emptyDynamicVhd(64 * 1024, 4096));
  const dev = await openVpc(base, { writable: true });
  await dev.pwrite(new Uint8Array(5000).fill(0x42), 3000, {});
  await dev.close();
  const seedImage = base.bytes();
  const r = rng(2026);
  let opened = 0;
  for (let iter = 0; iter < 400; iter++) {
    const b = seedImage.slice();
    const flips = 1 + Math.floor(r() * 4);
    for (let i = 0; i < flips; i++) {
      // Mostly the metadata (footer, header, BAT), sometimes anywhere.
      const at = r() < 0.85 ? Math.floor(r() * 2048) : Math.floor(r() * b.length);
      b[at] = r() < 0.3 ? 0xff : Math.floor(r() * 256);
    }
    if (r() < 0.7) editDynamicFooters(b, {}); // a valid checksum, so the rest gets checked
    let d;
    try {
      d = await openVpc(memFile(b), { writable: r() < 0.5, sizeCalc: undefined });
    } catch (e) {
      assert.ok(e instanceof BlockError, `iteration ${iter}: ${e}`);
      continue;
    }
    opened++;
    const probe = new Uint8Array(4096);
    for (let k = 0; k < 8; k++) {
      const at = Math.floor(r() * Math.max(0, d.size - probe.length));
      if (d.size >= probe.length) await d.pread(probe, at);
    }
    const out = new ExtentList(64);
    await d.extents(0, Math.min(d.size, 1 << 20), out);
    if (d.caps.writable && d.size >= 4096) {
      await d.pwrite(new Uint8Array(4096).fill(1), 0, {}).catch((e) => {
        assert.ok(e instanceof BlockError, `iteration ${iter}: ${e}`);
      });
    }
    await d.close();
  }
  assert.ok(opened > 10, `only ${opened} images opened: the fuzz tests little`);
});
