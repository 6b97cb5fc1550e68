/**
 * The dmg, cloop and bochs decoders and devices over in-memory files: qemu's messages for bad
 * headers, glib's base64 rules, qemu's chunk dropping and binary search, the chunk cache, and
 * a seeded mutation fuzz of the three formats (every open and read either succeeds or throws a
 * BlockError, in bounded time).
 */

import assert from "node:assert/strict";
import type { FileEngine } from "../../lib/io/file_engine.ts";
import { type BlockDevice, BlockError, Errno, ExtentList } from "../../lib/block/types.ts";
import { base64Decode, findKoly, readDmgTable } from "../../lib/block/dmg/table.ts";
import { openDmg, probeDmg } from "../../lib/block/dmg/mod.ts";
import { ChunkCache } from "../../lib/block/dmg/chunk_cache.ts";
import {
  decodeCloopHeader,
  decodeCloopOffsets,
  openCloop,
  probeCloop,
} from "../../lib/block/cloop/mod.ts";
import { decodeBochsHeader, openBochs, probeBochs } from "../../lib/block/bochs/mod.ts";
import { probeFormat } from "../../lib/block/formats.ts";
import { makeBochs, makeCloop, makeDmg, sourceBytes } from "./_roformat_images.ts";

/** A read-only FileEngine over bytes in memory. */
function memFile(bytes: Uint8Array, path = "mem.img"): FileEngine & { closed: boolean } {
  const f = {
    path,
    fd: -1,
    closed: false,
    pread(b: Uint8Array, off: number) {
      const n = Math.max(0, Math.min(b.length, bytes.length - off));
      b.set(bytes.subarray(off, off + n));
      return Promise.resolve(n);
    },
    pwrite() {
      return Promise.reject(new Error("read-only"));
    },
    sync: () => Promise.resolve(),
    length: () => bytes.length,
    truncate() {},
    punchHole: () => Promise.resolve(),
    zeroRange: () => Promise.resolve(),
    seekData: (o: number) => o,
    seekHole: () => bytes.length,
    prefetch() {},
    close() {
      f.closed = true;
    },
  };
  return f;
}

const quiet = { writable: false, warn: () => {}, report: () => {} };

async function readAll(dev: BlockDevice): Promise<Uint8Array> {
  const out = new Uint8Array(dev.size);
  await dev.pread(out, 0);
  return out;
}

function throwsMsg(fn: () => unknown, errno: number, msg: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof BlockError, String(e));
    assert.equal(e.message, msg);
    assert.equal(e.errno, errno);
    return true;
  });
}

async function rejectsMsg(p: Promise<unknown>, errno: number, msg: string | RegExp) {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof BlockError, String(e));
    if (typeof msg === "string") assert.equal(e.message, msg);
    else assert.match(e.message, msg);
    assert.equal(e.errno, errno);
    return true;
  });
}

Deno.test("dmg: base64 as glib decodes it (junk skipped, '=' trims, tail dropped)", () => {
  const dec = (s: string) => new TextDecoder().decode(base64Decode(s));
  assert.equal(dec("aGVsbG8gd29ybGQ="), "hello world");
  assert.equal(dec("\n\taGVs\n  bG8g\td29y\nbGQ=\n"), "hello world");
  assert.equal(dec("QQ=="), "A");
  assert.equal(dec("QUI="), "AB");
  assert.equal(dec("QUJD" + "QU"), "ABC"); // an unfinished group is dropped
  assert.equal(dec("Q!U@J#D"), "ABC");
});

Deno.test("dmg: probing is by file name only; cloop and bochs by their magic", () => {
  assert.equal(probeDmg("a.dmg"), 2);
  assert.equal(probeDmg(".dmg"), 0);
  assert.equal(probeDmg("a.DMG"), 0);
  assert.equal(probeDmg("a.dmg.raw"), 0);
  const src = sourceBytes(64 * 1024, 1);
  const cloop = makeCloop(src, 4096);
  assert.equal(probeCloop(cloop.subarray(0, 2048)), 2);
  assert.equal(probeCloop(cloop.subarray(0, 10)), 2); // qemu compares what the buffer holds
  assert.equal(probeCloop(new Uint8Array(2048)), 0);
  const bochs = makeBochs(src, { extentSize: 4096 });
  assert.equal(probeBochs(bochs.subarray(0, 2048)), 100);
  assert.equal(probeBochs(bochs.subarray(0, 511)), 0);
  const head = (b: Uint8Array) => {
    const h = new Uint8Array(2048);
    h.set(b.subarray(0, 2048));
    return h;
  };
  assert.equal(probeFormat(head(cloop), "x.img"), "cloop");
  assert.equal(probeFormat(head(bochs), "x.dmg"), "bochs");
  assert.equal(probeFormat(new Uint8Array(2048), "x.dmg"), "dmg");
  assert.equal(probeFormat(new Uint8Array(2048), "x.img"), "raw");
});

Deno.test("cloop: header and offsets checks with qemu's messages", () => {
  const h = (bs: number, n: number) => {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setUint32(0, bs);
    new DataView(b.buffer).setUint32(4, n);
    return b;
  };
  assert.deepEqual(decodeCloopHeader(h(65536, 10)), { blockSize: 65536, blocks: 10 });
  throwsMsg(
    () => decodeCloopHeader(h(1000, 1)),
    Errno.EINVAL,
    "block_size 1000 must be a multiple of 512",
  );
  throwsMsg(() => decodeCloopHeader(h(0, 1)), Errno.EINVAL, "block_size cannot be zero");
  throwsMsg(
    () => decodeCloopHeader(h(128 << 20, 1)),
    Errno.EINVAL,
    "block_size 134217728 must be 64 MB or less",
  );
  throwsMsg(
    () => decodeCloopHeader(h(512, 0x20000000)),
    Errno.EINVAL,
    "n_blocks 536870912 must be 536870911 or less",
  );
  throwsMsg(
    () => decodeCloopHeader(h(512, 0x4000000)),
    Errno.EINVAL,
    "image requires too many offsets, try increasing block size",
  );
  throwsMsg(
    () => decodeCloopHeader(h(512, 0x1fffffff)),
    Errno.ENOMEM,
    "Could not allocate offsets table",
  );
  const offs = (vals: bigint[]) => {
    const b = new Uint8Array(vals.length * 8);
    vals.forEach((v, i) => new DataView(b.buffer).setBigUint64(i * 8, v));
    return b;
  };
  assert.deepEqual([...decodeCloopOffsets(offs([100n, 200n, 200n, 300n]), 3)], [
    100,
    200,
    200,
    300,
  ]);
  throwsMsg(
    () => decodeCloopOffsets(offs([100n, 200n, 150n]), 2),
    Errno.EINVAL,
    "offsets not monotonically increasing at index 2, image file is corrupt",
  );
  throwsMsg(
    () => decodeCloopOffsets(offs([0n, 128n << 20n, (128n << 20n) * 2n + 1n]), 2),
    Errno.EINVAL,
    "invalid compressed block size at index 2, image file is corrupt",
  );
  // A table cut short by the end of the file: the missing entries are zeroes.
  assert.equal(decodeCloopOffsets(offs([0n, 0n]), 1000).length, 2);
  throwsMsg(
    () => decodeCloopOffsets(offs([0n, 10n]), 1000),
    Errno.EINVAL,
    "offsets not monotonically increasing at index 2, image file is corrupt",
  );
});

Deno.test("bochs: header checks with qemu's messages, v1 and v2 disk size", () => {
  const src = sourceBytes(1024 * 1024 + 700, 2);
  const head = (patch?: (v: DataView) => void, version: 1 | 2 = 2) =>
    makeBochs(src, { extentSize: 4096, version, patch }).subarray(0, 512);
  const h = decodeBochsHeader(head());
  assert.equal(h.diskSize, 1024 * 1024 + 512);
  assert.equal(h.catalogEntries, 257);
  assert.equal(h.dataOffset, 512 + 257 * 4);
  assert.equal(h.bitmapSectors, 1);
  assert.equal(h.extentSectors, 8);
  assert.equal(decodeBochsHeader(head(undefined, 1)).diskSize, 1024 * 1024 + 512);
  throwsMsg(
    () => decodeBochsHeader(head((v) => v.setUint8(33, 0))),
    Errno.EINVAL,
    "Image not in Bochs format",
  );
  throwsMsg(
    () => decodeBochsHeader(head((v) => v.setUint32(64, 0x30000, true))),
    Errno.EINVAL,
    "Image not in Bochs format",
  );
  throwsMsg(
    () => decodeBochsHeader(head((v) => v.setUint32(72, 0x100001, true))),
    Errno.EFBIG,
    "Catalog size is too large",
  );
  throwsMsg(
    () => decodeBochsHeader(head((v) => v.setUint32(80, 100, true))),
    Errno.EINVAL,
    "Extent size must be at least 512",
  );
  throwsMsg(
    () => decodeBochsHeader(head((v) => v.setUint32(80, 4097, true))),
    Errno.EINVAL,
    "Extent size 4097 is not a power of two",
  );
  throwsMsg(
    () => decodeBochsHeader(head((v) => v.setUint32(80, 1 << 24, true))),
    Errno.EINVAL,
    "Extent size 16777216 is too large",
  );
  throwsMsg(
    () => decodeBochsHeader(head((v) => v.setUint32(72, 256, true))),
    Errno.EINVAL,
    "Catalog size is too small for this disk size",
  );
  // A bitmap size of 0 wraps to 2^23 sectors in qemu's 32-bit arithmetic.
  assert.equal(decodeBochsHeader(head((v) => v.setUint32(76, 0, true))).bitmapSectors, 8388608);
});

Deno.test("bochs: unallocated extents and clear bits read as zeroes; refuses read-write", async () => {
  const src = sourceBytes(256 * 1024, 3);
  const img = makeBochs(src, { extentSize: 8192, stored: (s) => s % 3 !== 1 });
  const dev = await openBochs(memFile(img), { writable: false });
  const want = new Uint8Array(src);
  for (let s = 1; s < 512; s += 3) want.fill(0, s * 512, (s + 1) * 512);
  assert.deepEqual(await readAll(dev), want);
  // Unaligned reads across sectors and extents.
  const part = new Uint8Array(20000);
  await dev.pread(part, 8192 - 777);
  assert.deepEqual(part, want.subarray(8192 - 777, 8192 - 777 + 20000));
  const ext = new ExtentList(10);
  await dev.extents(0, dev.size, ext);
  assert.deepEqual(ext.pairs, [dev.size, 0]);
  await rejectsMsg(dev.pwrite(new Uint8Array(512), 0, {}), Errno.EPERM, "Image is read-only");
  await dev.close();
  const f = memFile(img);
  await rejectsMsg(openBochs(f, { writable: true }), Errno.EACCES, "Image is read-only");
  assert.ok(f.closed);
});

Deno.test("cloop: blocks inflate exactly; a corrupt block is EIO, others still read", async () => {
  const src = sourceBytes(5 * 4096, 4);
  const img = makeCloop(src, 4096, { stored: { 2: new Uint8Array([0x78, 0x9c, 1, 2, 3]) } });
  const dev = await openCloop(memFile(img), { writable: false });
  assert.equal(dev.size, 5 * 4096);
  const b = new Uint8Array(4096 * 2);
  await dev.pread(b, 0);
  assert.deepEqual(b, src.subarray(0, 8192));
  await rejectsMsg(dev.pread(new Uint8Array(512), 2 * 4096 + 512), Errno.EIO, /block 2/);
  await dev.pread(b, 3 * 4096);
  assert.deepEqual(b, src.subarray(3 * 4096, 5 * 4096));
  await dev.close();
});

Deno.test("dmg: unknown chunk types are dropped with one warning each; search as qemu", async () => {
  const src = sourceBytes(512 * 1024, 5);
  const warns: string[] = [];
  const img = makeDmg(src, [
    { kind: "raw", sectors: 100 },
    { kind: "lzfse", sectors: 100 },
    { kind: "lzfse", sectors: 100 },
    { kind: "adc", sectors: 100 },
    { kind: "comment", sectors: 0 },
    { kind: "zlib", sectors: 100 },
    { kind: "bzip2", sectors: 100 },
    { kind: "zero", sectors: 424 },
  ]);
  const dev = await openDmg(memFile(img), {
    ...quiet,
    warn: (m) => warns.push(m),
    noBzip2: true,
  });
  assert.deepEqual(warns, [
    "dmg-lzfse module is missing, accessing lzfse compressed blocks will result in I/O errors",
    "Image contains chunks of unknown type 80000004, accessing them will result in I/O errors",
    "dmg-bzip2 module is missing, accessing bzip2 compressed blocks will result in I/O errors",
  ]);
  assert.equal(dev.chunkOf(0), 0);
  assert.equal(dev.chunkOf(150), -1);
  assert.equal(dev.chunkOf(450), 1);
  assert.equal(dev.chunkOf(550), -1);
  assert.equal(dev.chunkOf(700), 2);
  assert.equal(dev.chunkOf(2000), -1);
  const b = new Uint8Array(100 * 512);
  await dev.pread(b, 400 * 512);
  assert.deepEqual(b, src.subarray(400 * 512, 500 * 512));
  await rejectsMsg(
    dev.pread(new Uint8Array(101 * 512), 0),
    Errno.EIO,
    /sector 100 is in no readable chunk/,
  );
  // A raw chunk is offered for zero-copy, a compressed one is not.
  assert.ok(dev.fileRange(512, 4096) !== undefined);
  assert.equal(dev.fileRange(99 * 512, 1024), undefined);
  assert.equal(dev.fileRange(400 * 512, 512), undefined);
  await dev.close();
  // With libbz2 the bzip2 chunk is in the table and reads.
  const dev2 = await openDmg(memFile(img), quiet);
  await dev2.pread(b, 500 * 512);
  assert.deepEqual(b, src.subarray(500 * 512, 600 * 512));
  await dev2.close();
});

Deno.test("dmg: trailer search, odd lengths and table errors", async () => {
  const src = sourceBytes(64 * 1024, 6);
  const img = makeDmg(src, [{ kind: "raw", sectors: 128 }]);
  const read = (b: Uint8Array) => (o: number, l: number) => {
    const x = new Uint8Array(l);
    x.set(b.subarray(o, o + l));
    return Promise.resolve(x);
  };
  assert.equal(await findKoly(read(img), img.length), img.length - 512);
  // Odd lengths: the trailer found in the second-last sector of the rounded-up length.
  const odd = new Uint8Array(img.length + 300);
  odd.set(img.subarray(0, img.length - 512));
  odd.set(img.subarray(img.length - 512), img.length - 512 + 300);
  assert.equal(await findKoly(read(odd), odd.length), img.length - 212);
  await rejectsMsg(
    findKoly(read(new Uint8Array(0)), 0),
    Errno.EINVAL,
    "dmg file must be at least 512 bytes long",
  );
  await rejectsMsg(
    findKoly(read(src), src.length),
    Errno.EINVAL,
    "Could not locate UDIF trailer in dmg file",
  );
  const reports: string[] = [];
  const big = makeDmg(src, [{ kind: "zlib", sectors: 128, declaredSectors: 200000 }]);
  await assert.rejects(
    readDmgTable(read(big), big.length, {
      bzip2: true,
      warn: () => {},
      report: (m) => reports.push(m),
    }),
  );
  assert.deepEqual(reports, ["sector count 200000 for chunk 0 is larger than max (131072)"]);
  const bad = makeDmg(src, [{ kind: "raw", sectors: 128 }], {
    trailerPatch: (k) => k.setBigUint64(0xe0, 0n),
  });
  await rejectsMsg(
    openDmg(memFile(bad, "x.dmg"), quiet),
    Errno.EINVAL,
    "Could not open 'x.dmg': Invalid argument",
  );
});

Deno.test("chunk cache: one decode for concurrent gets, LRU eviction, failures not kept", async () => {
  const cache = new ChunkCache(3000);
  let decodes = 0;
  const dec = (n: number) => () => {
    decodes++;
    return Promise.resolve(new Uint8Array(n));
  };
  await Promise.all([cache.get(1, dec(1000)), cache.get(1, dec(1000)), cache.get(1, dec(1000))]);
  assert.equal(decodes, 1);
  await cache.get(2, dec(1000));
  await cache.get(3, dec(1000));
  await cache.get(1, dec(1000)); // hit: 1 becomes the most recent
  await cache.get(4, dec(1000)); // evicts 2
  assert.equal(decodes, 4);
  await cache.get(1, dec(1000));
  assert.equal(decodes, 4);
  await cache.get(2, dec(1000));
  assert.equal(decodes, 5);
  // One chunk larger than the budget is still kept (the last one).
  await cache.get(9, dec(10000));
  await cache.get(9, dec(10000));
  assert.equal(decodes, 6);
  await assert.rejects(cache.get(7, () => Promise.reject(new Error("bad"))));
  await cache.get(7, dec(10));
  assert.equal(decodes, 7);
});

// ---- fuzz ----

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

const MUTATIONS = Number(Deno.env.get("ROFORMATS_FUZZ_MUTATIONS") ?? 300);
const TIME_BUDGET_MS = Number(Deno.env.get("ROFORMATS_FUZZ_MS") ?? 20_000);
const READ_LIMIT = 4 << 20;
const OP_TIMEOUT_MS = 5_000;

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32;
}

async function withTimeout<T>(what: string, p: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout: ${what}`)), OP_TIMEOUT_MS);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A BlockError is an accepted outcome; anything else (or a timeout) fails. */
async function tolerate<T>(what: string, op: () => Promise<T>): Promise<T | undefined> {
  try {
    return await withTimeout(what, op());
  } catch (e) {
    if (e instanceof BlockError) return undefined;
    throw new Error(`${what}: ${e instanceof Error ? e.stack : String(e)}`);
  }
}

/** Hostile values for fields: zero, all ones, sign bits, near-limits. */
const EXTREMES = [0, 1, 0xff, 0x7f, 0x80];

function mutate(img: Uint8Array, r: () => number, hot: readonly [number, number][]): Uint8Array {
  const out = new Uint8Array(img);
  const n = 1 + Math.floor(r() * 6);
  for (let i = 0; i < n; i++) {
    const [a, b] = r() < 0.7 ? hot[Math.floor(r() * hot.length)]! : [0, out.length];
    const at = a + Math.floor(r() * Math.max(1, Math.min(b, out.length) - a));
    if (at >= out.length) continue;
    const mode = r();
    if (mode < 0.5) out[at] = Math.floor(r() * 256);
    else if (mode < 0.8) {
      out.fill(EXTREMES[Math.floor(r() * EXTREMES.length)]!, at, at + 1 + Math.floor(r() * 8));
    } else out[at]! ^= 1 << Math.floor(r() * 8);
  }
  // Sometimes truncate.
  return r() < 0.1 ? out.subarray(0, Math.floor(r() * out.length)) : out;
}

async function exercise(dev: BlockDevice, r: () => number, what: string): Promise<void> {
  const size = Math.min(dev.size, READ_LIMIT);
  const buf = new Uint8Array(128 * 1024);
  for (let off = 0; off < size; off += buf.length) {
    const n = Math.min(buf.length, size - off);
    await tolerate(`${what} pread ${off}`, () => dev.pread(buf.subarray(0, n), off));
  }
  for (let i = 0; i < 8 && dev.size > 0; i++) {
    const off = Math.floor(r() * dev.size);
    const n = Math.max(1, Math.min(dev.size - off, Math.floor(r() * 70000)));
    await tolerate(`${what} pread ${off}+${n}`, () => dev.pread(new Uint8Array(n), off));
  }
}

Deno.test("roformats fuzz: mutated dmg, cloop and bochs images open and read or fail cleanly", async () => {
  const src = sourceBytes(256 * 1024, 7);
  const dmgChunks = [
    { kind: "zlib" as const, sectors: 128 },
    { kind: "raw" as const, sectors: 64 },
    { kind: "zero" as const, sectors: 64 },
    { kind: "bzip2" as const, sectors: 128 },
    { kind: "zlib" as const, sectors: 128 },
  ];
  const dmgXml = makeDmg(src, dmgChunks, { mishBlocks: 2 });
  const dmgRsrc = makeDmg(src, dmgChunks, { container: "rsrc", mishBlocks: 2 });
  const corpus: {
    name: string;
    img: Uint8Array;
    hot: [number, number][];
    open: (f: FileEngine) => Promise<BlockDevice>;
  }[] = [
    {
      name: "dmg-xml",
      img: dmgXml,
      hot: [[dmgXml.length - 512, dmgXml.length], [dmgXml.length - 4000, dmgXml.length - 512]],
      open: (f) => openDmg(f, quiet),
    },
    {
      name: "dmg-rsrc",
      img: dmgRsrc,
      hot: [[dmgRsrc.length - 512, dmgRsrc.length], [dmgRsrc.length - 1500, dmgRsrc.length - 512]],
      open: (f) => openDmg(f, quiet),
    },
    {
      name: "cloop",
      img: makeCloop(src, 16384),
      hot: [[128, 136 + 17 * 8]],
      open: (f) => openCloop(f, { writable: false }),
    },
    {
      name: "bochs",
      img: makeBochs(src, { extentSize: 4096 }),
      hot: [[64, 96], [512, 512 + 64 * 4], [512 + 256, 512 + 64 * 4 + 4096]],
      open: (f) => openBochs(f, { writable: false }),
    },
  ];
  // The unmutated images read back their source.
  for (const c of corpus) {
    if (Deno.env.get("ROFORMATS_FUZZ_LOG")) console.error(`clean ${c.name}`);
    const dev = await c.open(memFile(c.img));
    // The dmg zero chunk (sectors 192..256) reads as zeroes whatever the source holds there.
    const want = c.name.startsWith("dmg") ? new Uint8Array(src).fill(0, 192 * 512, 256 * 512) : src;
    assert.ok(sameBytes(await readAll(dev), want), c.name);
    await dev.close();
  }
  const start = Date.now();
  let done = 0;
  let opened = 0;
  for (let i = 0; i < MUTATIONS && Date.now() - start < TIME_BUDGET_MS; i++) {
    const c = corpus[i % corpus.length]!;
    const r = rng(1000 + i);
    const img = mutate(c.img, r, c.hot);
    const what = `${c.name} seed ${1000 + i}`;
    if (Deno.env.get("ROFORMATS_FUZZ_LOG")) console.error(what);
    const file = memFile(img);
    const dev = await tolerate(`${what} open`, () => c.open(file));
    if (dev === undefined) {
      assert.ok(file.closed, `${what}: file left open after a failed open`);
    } else {
      opened++;
      await exercise(dev, r, what);
      await dev.close();
    }
    done++;
  }
  assert.ok(done >= Math.min(MUTATIONS, 40), `only ${done} mutations ran`);
  assert.ok(opened > done / 4, `only ${opened} of ${done} mutated images opened`);
});
