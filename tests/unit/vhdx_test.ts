/**
 * The VHDX pieces on their own: CRC-32C, header choice, the log (encode, search, replay) and the
 * driver over an in-memory file holding an image built here, plus a seeded fuzz of the open
 * path (header section, region table, metadata, BAT, log) that must never crash or hang.
 */

import assert from "node:assert/strict";
import { crc32c, crc32cWithHole } from "../../lib/block/vhdx/crc32c.ts";
import { HeaderPair } from "../../lib/block/vhdx/headers.ts";
import {
  BAT_GUID,
  encodeHeader,
  FILE_PARAMETERS_GUID,
  HEADER_SIGNATURE,
  LOGICAL_SECTOR_SIZE_GUID,
  METADATA_GUID,
  PAGE83_GUID,
  PARENT_LOCATOR_GUID,
  PHYSICAL_SECTOR_SIZE_GUID,
  qemuBatEntries,
  randomGuid,
  VIRTUAL_DISK_SIZE_GUID,
} from "../../lib/block/vhdx/layout.ts";
import { encodeLogEntry } from "../../lib/block/vhdx/log.ts";
import { openVhdx } from "../../lib/block/vhdx/mod.ts";
import type { FileEngine } from "../../lib/io/file_engine.ts";
import { BlockError, Errno, ExtentList } from "../../lib/block/types.ts";

const MiB = 1024 * 1024;

/** A FileEngine over a growable in-memory buffer. */
function memFile(init: Uint8Array): FileEngine & { bytes(): Uint8Array } {
  let buf = new Uint8Array(init);
  const grow = (n: number) => {
    if (n > buf.length) {
      const g = new Uint8Array(n);
      g.set(buf);
      buf = g;
    }
  };
  return {
    path: "mem.vhdx",
    fd: -1,
    pread(b: Uint8Array, off: number) {
      const n = Math.max(0, Math.min(b.length, buf.length - off));
      b.set(buf.subarray(off, off + n));
      return Promise.resolve(n);
    },
    pwrite(b: Uint8Array, off: number) {
      grow(off + b.length);
      buf.set(b, off);
      return Promise.resolve();
    },
    sync: () => Promise.resolve(),
    length: () => buf.length,
    truncate(n: number) {
      if (n < buf.length) buf = buf.slice(0, n);
      else grow(n);
    },
    punchHole: () => Promise.resolve(),
    zeroRange: () => Promise.resolve(),
    seekData: (o: number) => o < buf.length ? o : -1,
    seekHole: () => buf.length,
    prefetch() {},
    close() {},
    bytes: () => buf,
  };
}

/** A dynamic image as qemu-img lays it out: log at 1 MiB, BAT at 2 MiB, metadata at 3 MiB. */
function buildImage(opts: {
  size: number;
  blockSize?: number;
  state?: number;
  parentLocator?: boolean;
}): Uint8Array {
  const bs = opts.blockSize ?? MiB;
  const img = new Uint8Array(4 * MiB);
  const v = new DataView(img.buffer);
  img.set(new TextEncoder().encode("vhdxfile"));
  for (const [i, at] of [0x10000, 0x20000].entries()) {
    const block = img.subarray(at, at + 4096);
    encodeHeader({
      signature: HEADER_SIGNATURE,
      checksum: 0,
      sequence: BigInt(10 + i),
      fileWriteGuid: randomGuid(),
      dataWriteGuid: randomGuid(),
      logGuid: new Uint8Array(16),
      logVersion: 0,
      version: 1,
      logLength: MiB,
      logOffset: MiB,
    }, block);
  }
  const rt = 0x30000;
  v.setUint32(rt, 0x69676572, true);
  v.setUint32(rt + 8, 2, true);
  img.set(BAT_GUID, rt + 16);
  v.setBigUint64(rt + 32, BigInt(2 * MiB), true);
  v.setUint32(rt + 40, MiB, true);
  v.setUint32(rt + 44, 1, true);
  img.set(METADATA_GUID, rt + 48);
  v.setBigUint64(rt + 64, BigInt(3 * MiB), true);
  v.setUint32(rt + 72, MiB, true);
  v.setUint32(rt + 76, 1, true);
  v.setUint32(rt + 4, crc32cWithHole(img.subarray(rt, rt + 0x10000), 4), true);
  const md = 3 * MiB;
  img.set(new TextEncoder().encode("metadata"), md);
  const items: [Uint8Array, number][] = [
    [FILE_PARAMETERS_GUID, 8],
    [VIRTUAL_DISK_SIZE_GUID, 8],
    [PAGE83_GUID, 16],
    [LOGICAL_SECTOR_SIZE_GUID, 4],
    [PHYSICAL_SECTOR_SIZE_GUID, 4],
  ];
  if (opts.parentLocator) items.push([PARENT_LOCATOR_GUID, 16]);
  v.setUint16(md + 10, items.length, true);
  let off = 0x10000;
  items.forEach(([g, len], i) => {
    const e = md + 32 + 32 * i;
    img.set(g, e);
    v.setUint32(e + 16, off, true);
    v.setUint32(e + 20, len, true);
    v.setUint32(e + 24, 4, true);
    off += len;
  });
  v.setUint32(md + 0x10000, bs, true);
  v.setBigUint64(md + 0x10008, BigInt(opts.size), true);
  v.setUint32(md + 0x10020, 512, true);
  v.setUint32(md + 0x10024, 4096, true);
  const n = qemuBatEntries(opts.size, bs, 2 ** 32 / bs);
  for (let i = 0; i < n; i++) v.setUint32(2 * MiB + 8 * i, opts.state ?? 2, true);
  return img;
}

Deno.test("vhdx crc32c: the standard check value, chaining, the zeroed field", () => {
  assert.equal(crc32c(0, new TextEncoder().encode("123456789")), 0xe3069283);
  const data = crypto.getRandomValues(new Uint8Array(1000));
  assert.equal(crc32c(crc32c(0, data.subarray(0, 333)), data.subarray(333)), crc32c(0, data));
  const copy = data.slice();
  copy.fill(0, 8, 12);
  assert.equal(crc32cWithHole(data, 8), crc32c(0, copy));
});

Deno.test("vhdx headers: the valid one, the higher sequence, identical twins", () => {
  const img = buildImage({ size: 4 * MiB });
  const h1 = img.slice(0x10000, 0x11000);
  const h2 = img.slice(0x20000, 0x21000);
  assert.equal(HeaderPair.choose(h1, h2)?.current, 1);
  const bad = h2.slice();
  bad[100] = bad[100]! ^ 1;
  assert.equal(HeaderPair.choose(h1, bad)?.current, 0);
  assert.equal(HeaderPair.choose(bad, bad), undefined);
  assert.equal(HeaderPair.choose(h1, h1)?.current, 0);
  // Equal sequence numbers, different contents: no valid header.
  const same = h1.slice();
  same[20] = same[20]! ^ 1;
  same.set(h1.subarray(4, 8), 4);
  new DataView(same.buffer).setUint32(4, crc32cWithHole(same, 4), true);
  assert.equal(HeaderPair.choose(h1, same), undefined);
});

Deno.test("vhdx driver: zero states read zero, writes allocate at the end, data before BAT", async () => {
  const file = memFile(buildImage({ size: 6 * MiB }));
  const dev = await openVhdx(file, { writable: true });
  assert.equal(dev.size, 6 * MiB);
  assert.equal(dev.caps.minBlock, 512);
  const buf = new Uint8Array(8192).fill(7);
  await dev.pread(buf, 3 * MiB - 4096);
  assert.ok(buf.every((b) => b === 0));
  const before = file.bytes().slice(0x10000, 0x21000);
  // Two concurrent writes into the same new block allocate it once.
  await Promise.all([
    dev.pwrite(new Uint8Array(4096).fill(0xaa), 2 * MiB + 4096, {}),
    dev.pwrite(new Uint8Array(4096).fill(0xbb), 2 * MiB + 8192, {}),
  ]);
  const bytes = file.bytes();
  assert.equal(bytes.length, 5 * MiB);
  const v = new DataView(bytes.buffer);
  assert.equal(v.getUint32(2 * MiB + 16, true), 4 * MiB | 6);
  assert.equal(v.getUint32(2 * MiB + 8, true), 2);
  // The first write rewrote both headers (sequence 12 and 13, new data write GUID).
  const pair = HeaderPair.choose(bytes.slice(0x10000, 0x11000), bytes.slice(0x20000, 0x21000))!;
  assert.equal(pair.active.sequence, 13n);
  assert.notDeepEqual(pair.active.dataWriteGuid, before.slice(32, 48));
  const back = new Uint8Array(12288);
  await dev.pread(back, 2 * MiB);
  assert.ok(back.subarray(0, 4096).every((b) => b === 0));
  assert.ok(back.subarray(4096, 8192).every((b) => b === 0xaa));
  assert.ok(back.subarray(8192).every((b) => b === 0xbb));
  // Everything is data, as qemu's vhdx (no block status) reports it.
  const out = new ExtentList(16);
  await dev.extents(0, 6 * MiB, out);
  assert.deepEqual(out.pairs, [6 * MiB, 0]);
  // Zeroing an unallocated block leaves it unallocated; fast zero is refused.
  await dev.zero(0, MiB, {});
  assert.equal(v.getUint32(2 * MiB, true), 2);
  await assert.rejects(
    dev.zero(0, 512, { fastZero: true }),
    (e: unknown) => e instanceof BlockError && e.errno === Errno.ENOTSUP,
  );
  await dev.close();
  // Reopened, the data is there.
  const again = await openVhdx(memFile(bytes), { writable: false });
  await again.pread(back, 2 * MiB);
  assert.ok(back.subarray(4096, 8192).every((b) => b === 0xaa));
  await assert.rejects(again.pwrite(back, 0, {}), /read-only/);
});

Deno.test("vhdx driver: partially present blocks fail with EIO, parents are refused", async () => {
  const dev = await openVhdx(memFile(buildImage({ size: 2 * MiB, state: 7 })), {
    writable: true,
  });
  await assert.rejects(
    dev.pread(new Uint8Array(512), 0),
    (e: unknown) => e instanceof BlockError && e.errno === Errno.EIO,
  );
  await assert.rejects(
    openVhdx(memFile(buildImage({ size: 2 * MiB, parentLocator: true })), { writable: false }),
    /Could not open 'mem.vhdx': Operation not supported/,
  );
});

/** Puts a log entry at 1 MiB and its GUID in the current header (header 2). */
function dirty(img: Uint8Array, entry: (guid: Uint8Array) => Uint8Array): Uint8Array {
  const guid = randomGuid();
  img.set(entry(guid), MiB);
  img.set(guid, 0x20000 + 48);
  const v = new DataView(img.buffer);
  v.setUint32(0x20004, crc32cWithHole(img.subarray(0x20000, 0x21000), 4), true);
  return img;
}

Deno.test("vhdx log: refused read-only, replayed read-write, cleared after", async () => {
  const data = new Uint8Array(4096).map((_, i) => i & 0xff);
  const batSector = new Uint8Array(4096);
  new DataView(batSector.buffer).setUint32(0, 4 * MiB | 6, true);
  for (let i = 1; i < 3; i++) new DataView(batSector.buffer).setUint32(8 * i, 2, true);
  const img = dirty(buildImage({ size: 3 * MiB }), (logGuid) =>
    encodeLogEntry({
      sequence: 7n,
      logGuid,
      flushedFileOffset: 4 * MiB,
      lastFileOffset: 4 * MiB + 4096,
      writes: [{ fileOffset: 4 * MiB, data }, { fileOffset: 2 * MiB, data: batSector }],
    }));
  await assert.rejects(
    openVhdx(memFile(img), { writable: false }),
    (e: unknown) =>
      e instanceof BlockError && e.errno === Errno.EPERM &&
      e.message.startsWith(
        "VHDX image file 'mem.vhdx' opened read-only, but contains a log that needs to be replayed",
      ),
  );
  const file = memFile(img);
  const dev = await openVhdx(file, { writable: true });
  // last_file_offset not a whole MiB: the file grows to the next MiB.
  assert.equal(file.bytes().length, 5 * MiB);
  const back = new Uint8Array(4096);
  await dev.pread(back, 0);
  assert.deepEqual(back, data);
  await dev.close();
  // No log left: a read-only open works.
  await openVhdx(memFile(file.bytes()), { writable: false });
  // A damaged checksum: the entry is not valid, nothing is replayed, read-only opens.
  const broken = dirty(buildImage({ size: 3 * MiB }), (logGuid) => {
    const e = encodeLogEntry({
      sequence: 7n,
      logGuid,
      flushedFileOffset: 4 * MiB,
      lastFileOffset: 4 * MiB,
      writes: [{ fileOffset: 4 * MiB, data }],
    });
    e[5000] = e[5000]! ^ 1;
    return e;
  });
  await openVhdx(memFile(broken), { writable: false });
  // A valid header with a descriptor of another sequence: qemu fails the open.
  const badDesc = dirty(buildImage({ size: 3 * MiB }), (logGuid) => {
    const e = encodeLogEntry({
      sequence: 7n,
      logGuid,
      flushedFileOffset: 4 * MiB,
      lastFileOffset: 4 * MiB,
      writes: [{ fileOffset: 4 * MiB, data }],
    });
    new DataView(e.buffer).setBigUint64(64 + 24, 8n, true);
    return e;
  });
  await assert.rejects(openVhdx(memFile(badDesc), { writable: true }), /Invalid argument/);
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

Deno.test("vhdx fuzz: damaged images open or fail with a BlockError, never crash", async () => {
  const r = rng(2024);
  const data = new Uint8Array(4096).fill(0x5a);
  const base = dirty(buildImage({ size: 5 * MiB }), (logGuid) =>
    encodeLogEntry({
      sequence: 3n,
      logGuid,
      flushedFileOffset: 4 * MiB,
      lastFileOffset: 4 * MiB,
      writes: [{ fileOffset: 3 * MiB + 0x20000, data }, { fileOffset: 3 * MiB, zeroLength: 0 }],
    }));
  // Where the structures are: flips land there, and some get their checksums fixed.
  const areas: [number, number][] = [
    [0, 16],
    [0x10000, 80],
    [0x20000, 80],
    [0x30000, 80],
    [MiB, 256],
    [2 * MiB, 64],
    [3 * MiB, 256],
    [3 * MiB + 0x10000, 48],
  ];
  let opened = 0;
  for (let iter = 0; iter < 120; iter++) {
    const img = base.slice();
    const flips = 1 + Math.floor(r() * 4);
    for (let k = 0; k < flips; k++) {
      const [at, len] = areas[Math.floor(r() * areas.length)]!;
      const p = at + Math.floor(r() * len);
      img[p] = r() < 0.3 ? 0xff : img[p]! ^ (1 << Math.floor(r() * 8));
    }
    if (r() < 0.7) {
      const v = new DataView(img.buffer);
      for (const h of [0x10000, 0x20000]) {
        v.setUint32(h + 4, crc32cWithHole(img.subarray(h, h + 4096), 4), true);
      }
      v.setUint32(0x30004, crc32cWithHole(img.subarray(0x30000, 0x40000), 4), true);
    }
    const cut = r() < 0.1 ? Math.floor(r() * img.length) : img.length;
    try {
      const dev = await openVhdx(memFile(img.subarray(0, cut)), {
        writable: r() < 0.5,
        warn: () => {},
      });
      opened++;
      const buf = new Uint8Array(Math.min(dev.size, MiB));
      for (let off = 0; off < Math.min(dev.size, 2 * MiB); off += buf.length) {
        try {
          await dev.pread(buf.subarray(0, Math.min(buf.length, dev.size - off)), off);
        } catch (e) {
          assert.ok(e instanceof BlockError, String(e));
        }
      }
      await dev.close();
    } catch (e) {
      assert.ok(e instanceof BlockError, `iteration ${iter}: ${e}`);
    }
  }
  assert.ok(opened > 10, `only ${opened} fuzzed images opened`);
});
