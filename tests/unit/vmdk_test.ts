/**
 * The vmdk driver's decoders and device over in-memory images encoded here: qemu's probe, the
 * extent-line scanner with sscanf's quirks, CID reads and rewrites, grain allocation (once for
 * two concurrent writes into one new grain, grain table and redundant table both updated), and a
 * seeded fuzz of headers, tables and descriptors: opening and reading a damaged image either
 * works or fails with a BlockError, never anything else, never a hang.
 *
 * @module
 */

import assert from "node:assert/strict";
import type { FormatContext } from "../../lib/block/formats.ts";
import { BlockError, Errno, ExtentList } from "../../lib/block/types.ts";
import { parseExtentLines, probeVmdk, readCid, withCid } from "../../lib/block/vmdk/header.ts";
import { openVmdk } from "../../lib/block/vmdk/mod.ts";
import type { FileEngine } from "../../lib/io/file_engine.ts";

const enc = (s: string) => new TextEncoder().encode(s);

/** A FileEngine over a growable in-memory buffer. */
function memFile(init: Uint8Array, path = "/mem/a.vmdk"): FileEngine & { bytes(): Uint8Array } {
  let buf = new Uint8Array(init);
  return {
    path,
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

function ctx(writable: boolean, files: Record<string, Uint8Array> = {}): FormatContext {
  return {
    writable,
    options: {},
    warn: () => {},
    chain: { paths: [] },
    openBacking: () => Promise.reject(new BlockError(Errno.ENOENT, "no parent here")),
    openFile: (path) => {
      const f = files[path];
      if (f === undefined) throw new BlockError(Errno.ENOENT, `Could not open '${path}'`);
      return memFile(f, path);
    },
  };
}

const DESC = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n" +
  'createType="monolithicSparse"\nRW 2048 SPARSE "a.vmdk"\n';

/**
 * A monolithicSparse image as qemu-img lays it out: 1 MiB, 64 KiB grains, 512-entry tables,
 * descriptor at sector 1, redundant directory and table at 21/22, the primary ones at 26/27,
 * grains from sector 128. `grains` lists guest grains allocated (filled with their index + 1).
 */
function sparseImage(grains: readonly number[] = [], zeroGrain = false): Uint8Array {
  const img = new Uint8Array((128 + grains.length * 128) * 512);
  const v = new DataView(img.buffer);
  img.set(enc("KDMV"));
  v.setUint32(4, zeroGrain ? 2 : 1, true);
  v.setUint32(8, 3 | (zeroGrain ? 4 : 0), true);
  v.setBigUint64(12, 2048n, true); // capacity
  v.setBigUint64(20, 128n, true); // granularity
  v.setBigUint64(28, 1n, true); // descriptor
  v.setBigUint64(36, 20n, true);
  v.setUint32(44, 512, true);
  v.setBigUint64(48, 21n, true); // redundant directory
  v.setBigUint64(56, 26n, true); // directory
  v.setBigUint64(64, 128n, true); // grains
  img.set(enc(DESC), 512);
  v.setUint32(21 * 512, 22, true);
  v.setUint32(26 * 512, 27, true);
  grains.forEach((g, i) => {
    const sector = 128 + i * 128;
    v.setUint32(22 * 512 + g * 4, sector, true);
    v.setUint32(27 * 512 + g * 4, sector, true);
    img.fill(g + 1, sector * 512, (sector + 128) * 512);
  });
  return img;
}

Deno.test("vmdk probe: magics and version lines, as qemu's vmdk_probe", () => {
  assert.equal(probeVmdk(enc("KDMV....")), 100);
  assert.equal(probeVmdk(enc("COWD")), 100);
  assert.equal(probeVmdk(enc("# Disk\n  \nversion=1\n")), 100);
  assert.equal(probeVmdk(enc("version=3\r\nCID=1")), 100);
  assert.equal(probeVmdk(enc("version=4\n")), 0);
  assert.equal(probeVmdk(enc("\nversion=1\n")), 0); // an empty line is not skipped
  assert.equal(probeVmdk(enc("  x\nversion=1\n")), 0);
  assert.equal(probeVmdk(enc("KD")), 0);
  assert.equal(probeVmdk(new Uint8Array(2048)), 0);
});

Deno.test("vmdk descriptor: extent lines, skipped lines, invalid ones, CID rewrite", () => {
  const lines = parseExtentLines(
    'RW 100 FLAT "a b.raw" 7\nRDONLY 5 FLAT "x" 0\nRW 9 ZERO\nRW 0 SPARSE "z"\n' +
      'RW 8 VMFS "v"\nRW 3 SPARSE "s"\n',
  );
  assert.deepEqual(lines, [
    { sectors: 100, type: "FLAT", fileName: "a b.raw", flatOffset: 7 },
    { sectors: 8, type: "VMFS", fileName: "v", flatOffset: 0 },
    { sectors: 3, type: "SPARSE", fileName: "s", flatOffset: -1 },
  ]);
  // sscanf skips newlines too: an empty line reads the next one (qemu adds it twice).
  assert.equal(parseExtentLines('\nRW 4 VMFS "v"\n').length, 2);
  assert.throws(() => parseExtentLines('RW 4 FLAT "f"\n'), /Invalid extent line: RW 4 FLAT "f"$/);
  assert.throws(() => parseExtentLines('RW 4 SPARSE "f" 9\n'), /Invalid extent line/);
  assert.equal(readCid("CID=1a2b\nparentCID=ffffffff\n", false), 0x1a2b);
  assert.equal(readCid("CID=1a2b\nparentCID=ffffffff\n", true), 0xffffffff);
  assert.equal(readCid("CID=zz\n", false), undefined);
  assert.equal(
    withCid("v\nCID=1\nparentCID=2\nx\n", 0xabc),
    "v\nCID=abc\nparentCID=2\nx\n",
  );
  assert.equal(withCid("CID=1\n", 5), undefined);
});

Deno.test("vmdk driver: reads, extents, allocation once, both grain tables, new CID", async () => {
  const file = memFile(sparseImage([1]));
  const dev = await openVmdk(file, ctx(true));
  assert.equal(dev.size, MiB);
  const buf = new Uint8Array(128 * 1024).fill(9);
  await dev.pread(buf, 0);
  assert.ok(buf.subarray(0, 65536).every((b) => b === 0));
  assert.ok(buf.subarray(65536).every((b) => b === 2));
  await Promise.all([
    dev.pwrite(new Uint8Array(4096).fill(0xaa), 3 * 65536 + 4096, {}),
    dev.pwrite(new Uint8Array(4096).fill(0xbb), 3 * 65536 + 8192, {}),
  ]);
  const bytes = file.bytes();
  const v = new DataView(bytes.buffer);
  assert.equal(bytes.length, (128 + 2 * 128) * 512);
  assert.equal(v.getUint32(27 * 512 + 12, true), 256);
  assert.equal(v.getUint32(22 * 512 + 12, true), 256);
  const back = new Uint8Array(65536);
  await dev.pread(back, 3 * 65536);
  assert.ok(back.subarray(0, 4096).every((b) => b === 0));
  assert.ok(back.subarray(4096, 8192).every((b) => b === 0xaa));
  assert.ok(back.subarray(8192, 12288).every((b) => b === 0xbb));
  const out = new ExtentList(16);
  await dev.extents(0, MiB, out);
  assert.deepEqual(out.pairs, [65536, 3, 65536, 0, 65536, 3, 65536, 0, 12 * 65536, 3]);
  // No zeroed grains here: zeroing needs zero data, so fast zero fails.
  await assert.rejects(
    dev.zero(0, 65536, { fastZero: true }),
    (e: unknown) => e instanceof BlockError && e.errno === Errno.ENOTSUP,
  );
  const desc = new TextDecoder().decode(bytes.subarray(512, 1024));
  assert.doesNotMatch(desc, /CID=fffffffe/);
  assert.match(desc, /CID=[0-9a-f]+\nparentCID=ffffffff/);
  await dev.close();
});

Deno.test("vmdk driver: zeroed grains; version 3 read-only; a descriptor over FLAT extents", async () => {
  const z = memFile(sparseImage([0, 1], true));
  const dev = await openVmdk(z, ctx(true));
  await dev.zero(0, 2 * 65536, { fastZero: true });
  assert.equal(new DataView(z.bytes().buffer).getUint32(27 * 512, true), 1);
  const out = new ExtentList(8);
  await dev.extents(0, MiB, out);
  assert.deepEqual(out.pairs, [MiB, 3]);
  const depth = new ExtentList(8);
  await dev.allocationDepth(0, MiB, depth);
  assert.deepEqual(depth.pairs, [2 * 65536, 1, MiB - 2 * 65536, 0]);
  await dev.close();

  const v3 = sparseImage();
  new DataView(v3.buffer).setUint32(4, 3, true);
  await assert.rejects(openVmdk(memFile(v3), ctx(true)), /VMDK version 3 must be read only/);
  await (await openVmdk(memFile(v3), ctx(false))).close();

  const raw = new Uint8Array(4096).fill(5);
  const d = enc(
    'version=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n' +
      'RW 4 FLAT "f.raw" 2\nRW 8 FLAT "/abs/g.raw" 0\n',
  );
  const flat = await openVmdk(
    memFile(d, "/dir/x.vmdk"),
    ctx(false, {
      "/dir/f.raw": raw,
      "/abs/g.raw": new Uint8Array(1024).fill(6),
    }),
  );
  assert.equal(flat.size, 12 * 512);
  const all = new Uint8Array(12 * 512);
  await flat.pread(all, 0);
  assert.ok(all.subarray(0, 2048).every((b) => b === 5));
  assert.ok(all.subarray(2048, 3072).every((b) => b === 6));
  assert.ok(all.subarray(3072).every((b) => b === 0)); // past the end of g.raw
  await flat.close();
  await assert.rejects(
    openVmdk(memFile(d, "/dir/x.vmdk"), ctx(false)),
    /Could not open '\/dir\/f.raw'/,
  );
});

const MiB = 1024 * 1024;

/** xorshift32, seeded: the fuzz is the same on every run. */
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

/** Opens, reads everything and maps everything; only BlockErrors may come out. */
async function survive(file: FileEngine, c: FormatContext): Promise<void> {
  let dev;
  try {
    dev = await openVmdk(file, c);
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    return;
  }
  try {
    const size = Math.min(dev.size, 4 * MiB);
    const buf = new Uint8Array(64 * 1024);
    for (let off = 0; off < size; off += buf.length) {
      await dev.pread(buf.subarray(0, Math.min(buf.length, size - off)), off);
    }
    await dev.extents(0, size, new ExtentList(1000));
    if (c.writable && size > 0) await dev.pwrite(new Uint8Array(4096).fill(1), 0, {});
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
  } finally {
    await dev.close();
  }
}

Deno.test("vmdk fuzz: damaged headers and tables open, read and map or fail cleanly", async () => {
  const r = rng(20261203);
  const base = sparseImage([0, 2, 5]);
  // Header fields, the descriptor, both directories and tables, a grain's start.
  const hot = [[0, 80], [512, 700], [21 * 512, 16], [22 * 512, 64], [26 * 512, 16], [27 * 512, 64]];
  for (let i = 0; i < 300; i++) {
    const img = new Uint8Array(base);
    const edits = 1 + Math.floor(r() * 4);
    for (let k = 0; k < edits; k++) {
      const [at, len] = hot[Math.floor(r() * hot.length)]!;
      const pos = at! + Math.floor(r() * len!);
      img[pos] = r() < 0.3 ? 0xff : Math.floor(r() * 256);
    }
    const cut = r() < 0.1 ? Math.floor(r() * img.length) : img.length;
    await survive(memFile(img.subarray(0, cut)), ctx(r() < 0.5));
  }
});

Deno.test("vmdk fuzz: random descriptors open or fail cleanly", async () => {
  const r = rng(77);
  const words = [
    "RW",
    "RDONLY",
    "FLAT",
    "SPARSE",
    "VMFS",
    "VMFSSPARSE",
    "ZERO",
    "SESPARSE",
    '"f.raw"',
    '"s.vmdk"',
    "0",
    "8",
    "-1",
    "99999999999999999999",
    "\n",
    " ",
    '"',
    "createType=",
    '"monolithicFlat"',
    '"vmfs"',
    "CID=",
    "parentCID=",
    "1f",
    "parentFileNameHint=",
    "#",
    "\r\n",
  ];
  const files = { "/d/f.raw": new Uint8Array(8192).fill(3), "/d/s.vmdk": sparseImage([1]) };
  for (let i = 0; i < 300; i++) {
    let text = 'version=1\ncreateType="twoGbMaxExtentFlat"\nCID=1\nparentCID=ffffffff\n';
    const n = Math.floor(r() * 40);
    for (let k = 0; k < n; k++) text += words[Math.floor(r() * words.length)]! + " ";
    await survive(memFile(enc(text), "/d/x.vmdk"), ctx(r() < 0.3, files));
  }
});
