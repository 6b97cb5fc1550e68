/**
 * qcow2 persistent dirty bitmaps (lib/block/qcow2/bitmap.ts): the extension / directory / table
 * decoders against malformed input (qemu's messages), the in-memory bitmap's block status
 * against a brute-force model, serialization round trips, loading images made by qemu-img, and
 * the store / in-use updates checked by qemu-img and qemu-nbd reading the result back.
 */

import assert from "node:assert/strict";
import {
  AUTOCLEAR_BITMAPS,
  BITMAP_FLAG_AUTO,
  BITMAP_FLAG_IN_USE,
  bitmapLength,
  type BitmapsExtensionFields,
  type BitmapStoreIo,
  bitmapTableSize,
  decodeBitmapsExtension,
  DirtyBitmap,
  encodeBitmapDirectory,
  encodeBitmapsExtension,
  encodeBitmapTable,
  loadImageBitmaps,
  markBitmapsInUse,
  parseBitmapDirectory,
  parseBitmapTable,
  serializeBitmap,
  storeBitmaps,
  TABLE_ONES,
  validateBitmapsExtension,
} from "../../lib/block/qcow2/bitmap.ts";
import { parseHeader } from "../../lib/block/qcow2/header.ts";
import type { Qcow2Device } from "../../lib/block/qcow2/mod.ts";
import { BlockError, ExtentList, STATE_DIRTY } from "../../lib/block/types.ts";
import { openImage, parseNbdinfoMap, qemuIo, run } from "./_qcow2_helpers.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** xorshift32, for reproducible random cases. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

/** A validator for assert.throws / assert.rejects: a BlockError whose message matches `re`. */
function blockError(re: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof BlockError, String(e));
    assert.match(e.message, re);
    return true;
  };
}

/** [start, length, flags] runs of an ExtentList starting at `offset`. */
function runs(out: ExtentList, offset: number): Array<[number, number, number]> {
  const res: Array<[number, number, number]> = [];
  let pos = offset;
  for (let i = 0; i < out.pairs.length; i += 2) {
    res.push([pos, out.pairs[i]!, out.pairs[i + 1]!]);
    pos += out.pairs[i]!;
  }
  return res;
}

/**
 * The model: qemu's bitmap_to_extents over a plain boolean array of granules, written from the
 * definition (dirty granules clipped to the request, clean gaps 0, at most `max` extents).
 */
function modelExtents(
  dirty: boolean[],
  gran: number,
  length: number,
  offset: number,
  len: number,
  max: number,
): Array<[number, number, number]> {
  const res: Array<[number, number, number]> = [];
  const end = offset + len;
  for (let pos = offset; pos < end;) {
    const g = Math.floor(pos / gran);
    const flag = pos < length && dirty[g] ? STATE_DIRTY : 0;
    const next = pos < length ? Math.min(end, (g + 1) * gran) : end;
    const last = res[res.length - 1];
    if (last && last[2] === flag) last[1] += next - pos;
    else {
      if (res.length >= max) break;
      res.push([pos, next - pos, flag]);
    }
    pos = next;
  }
  return res;
}

Deno.test("bitmap: extents match a brute-force model (random marks, queries, limits)", () => {
  const rand = rng(42);
  for (let round = 0; round < 60; round++) {
    const gbits = [9, 10, 12, 16][round % 4]!;
    const gran = 2 ** gbits;
    // Lengths that are not whole granules and bitmaps spanning several 65536-bit chunks.
    const length = (round % 3 === 0 ? 300_000 : 40) * gran + (round % 2) * 512;
    const bm = new DirtyBitmap({
      name: "m",
      granularityBits: gbits,
      length,
      enabled: true,
      inUse: false,
    });
    const dirty = new Array<boolean>(bm.bits).fill(false);
    const marks = Math.floor(rand() * 20);
    for (let m = 0; m < marks; m++) {
      const off = Math.floor(rand() * length);
      const len = 1 + Math.floor(rand() * (rand() < 0.2 ? length / 3 : 5 * gran));
      bm.mark(off, len);
      const lastG = Math.min(bm.bits, Math.ceil(Math.min(off + len, length) / gran));
      for (let g = Math.floor(off / gran); g < lastG; g++) dirty[g] = true;
    }
    assert.equal(bm.dirtyCount, dirty.filter((d) => d).length);
    for (let q = 0; q < 20; q++) {
      const off = Math.floor(rand() * length);
      const len = 1 + Math.floor(rand() * (length - off));
      const max = [1, 2, 3, 1 << 17][q % 4]!;
      const out = new ExtentList(max);
      bm.extents(off, len, out);
      assert.deepEqual(
        runs(out, off),
        modelExtents(dirty, gran, length, off, len, max),
        `round ${round} query ${off}+${len} max ${max}`,
      );
    }
  }
});

Deno.test("bitmap: disabled bitmaps ignore mark; the reference example, two granularities", () => {
  const disabled = new DirtyBitmap({
    name: "d",
    granularityBits: 16,
    length: 4 * MiB,
    enabled: false,
    inUse: false,
  });
  disabled.mark(0, 4 * MiB);
  assert.equal(disabled.dirtyCount, 0);
  // 4 KiB @1M, 64 KiB @2M, 64 KiB @0, 512 B @3M (qcow2.md 3.3, verified with qemu-nbd).
  const expect: Record<number, Array<[number, number]>> = {
    16: [[0, 64 * KiB], [MiB, 64 * KiB], [2 * MiB, 64 * KiB], [3 * MiB, 64 * KiB]],
    9: [[0, 64 * KiB], [MiB, 4 * KiB], [2 * MiB, 64 * KiB], [3 * MiB, 512]],
  };
  for (const gbits of [16, 9]) {
    const bm = new DirtyBitmap({
      name: "b",
      granularityBits: gbits,
      length: 4 * MiB,
      enabled: true,
      inUse: false,
    });
    for (const [o, l] of [[MiB, 4 * KiB], [2 * MiB, 64 * KiB], [0, 64 * KiB], [3 * MiB, 512]]) {
      bm.mark(o!, l!);
    }
    const out = new ExtentList(1000);
    bm.extents(0, 4 * MiB, out);
    const dirty = runs(out, 0).filter((r) => r[2] === STATE_DIRTY).map((r) => [r[0], r[1]]);
    assert.deepEqual(dirty, expect[gbits]);
    // Unaligned request inside a dirty granule: clipped to the request.
    const one = new ExtentList(1);
    bm.extents(MiB + 100, 10, one);
    assert.deepEqual(one.pairs, [10, STATE_DIRTY]);
  }
});

Deno.test("bitmap: serialization is LSB first, round-trips, omits clean clusters", () => {
  const cs = 512; // 4096 bits per cluster
  const gbits = 9;
  const length = 8 * MiB; // 16384 bits = 2048 bytes = 4 clusters
  const bm = new DirtyBitmap({
    name: "s",
    granularityBits: gbits,
    length,
    enabled: true,
    inUse: false,
  });
  bm.mark(0, 512); // bit 0
  bm.mark(9 * 512, 1); // bit 9
  bm.mark(3 * 4096 * 512 + 5 * 512, 3 * 512); // bits 12293..12295 (cluster 3)
  const ser = serializeBitmap(bm, cs);
  assert.equal(ser.tableSize, 4);
  assert.equal(ser.tableSize, bitmapTableSize(length, gbits, cs));
  assert.deepEqual(ser.clusters.map((c) => c.index), [0, 3]);
  const c0 = ser.clusters[0]!.data;
  assert.equal(c0.length, cs);
  assert.equal(c0[0], 0x01);
  assert.equal(c0[1], 0x02);
  assert.equal(ser.clusters[1]!.data[0], 0xe0);
  // Round trip through deserialize.
  const back = new DirtyBitmap({
    name: "s",
    granularityBits: gbits,
    length,
    enabled: true,
    inUse: false,
  });
  for (const c of ser.clusters) back.deserialize(c.index * cs * 8, c.data);
  assert.equal(back.dirtyCount, 5);
  const a = new ExtentList(100), b = new ExtentList(100);
  bm.extents(0, length, a);
  back.extents(0, length, b);
  assert.deepEqual(a.pairs, b.pairs);
  // Bits past the bitmap's end in loaded data are dropped (qemu never reports them).
  const short = new DirtyBitmap({
    name: "x",
    granularityBits: 9,
    length: 40 * 512,
    enabled: true,
    inUse: false,
  });
  short.deserialize(0, new Uint8Array(cs).fill(0xff));
  assert.equal(short.dirtyCount, 40);
  // A clean bitmap has no data clusters.
  const clean = new DirtyBitmap({
    name: "c",
    granularityBits: 16,
    length,
    enabled: true,
    inUse: false,
  });
  assert.deepEqual(serializeBitmap(clean, 65536), { tableSize: 1, clusters: [] });
});

Deno.test("bitmap: extension validation follows qemu's checks and texts", () => {
  const ok: BitmapsExtensionFields = { nbBitmaps: 2, directorySize: 64, directoryOffset: 0x30000 };
  validateBitmapsExtension(ok, 65536);
  assert.deepEqual(decodeBitmapsExtension(encodeBitmapsExtension(ok)), { ...ok, reserved: 0 });
  const bad: Array<[Partial<BitmapsExtensionFields>, RegExp]> = [
    [{ reserved: 1 }, /^bitmaps_ext: Reserved field is not zero$/],
    [
      { nbBitmaps: 65536 },
      /^bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535$/,
    ],
    [{ nbBitmaps: 0 }, /^found bitmaps extension with zero bitmaps$/],
    [{ directoryOffset: 0x30001 }, /^bitmaps_ext: invalid bitmap directory offset \(0x30001/],
    [
      { directorySize: 67107841 },
      new RegExp(
        "^bitmaps_ext: bitmap directory size \\(67107841\\) " +
          "exceeds the maximum supported size \\(67107840\\)$",
      ),
    ],
  ];
  for (const [patch, re] of bad) {
    assert.throws(() => validateBitmapsExtension({ ...ok, ...patch }, 65536), blockError(re));
  }
  assert.throws(() => decodeBitmapsExtension(new Uint8Array(16)), /Invalid extension length/);
});

/** A directory entry as bytes, with every field settable (for malformed cases). */
function entry(f: {
  off?: number;
  tsize?: number;
  flags?: number;
  type?: number;
  gbits?: number;
  name?: string;
  nsize?: number;
  esize?: number;
}): Uint8Array {
  const name = new TextEncoder().encode(f.name ?? "b0");
  const nsize = f.nsize ?? name.length;
  const esize = f.esize ?? 0;
  const out = new Uint8Array((24 + Math.max(nsize, name.length) + esize + 7) & ~7);
  const v = new DataView(out.buffer);
  v.setBigUint64(0, BigInt(f.off ?? 0x50000));
  v.setUint32(8, f.tsize ?? 1);
  v.setUint32(12, f.flags ?? BITMAP_FLAG_AUTO);
  v.setUint8(16, f.type ?? 1);
  v.setUint8(17, f.gbits ?? 16);
  v.setUint16(18, nsize);
  v.setUint32(20, esize);
  out.set(name, 24 + esize);
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

Deno.test("bitmap: directory decoder accepts qemu's layout and refuses malformed entries", () => {
  const ctx = { clusterSize: 65536, length: 4 * MiB, directoryOffset: 0x130000 };
  const good = concat(
    entry({ name: "b0" }),
    entry({ name: "b512", gbits: 9, off: 0x60000 }),
    entry({ name: "off", flags: 0, off: 0x70000 }),
  );
  const list = parseBitmapDirectory(good, 3, ctx);
  assert.deepEqual(list.map((e) => [e.name, e.granularityBits, e.flags, e.tableOffset]), [
    ["b0", 16, 2, 0x50000],
    ["b512", 9, 2, 0x60000],
    ["off", 16, 0, 0x70000],
  ]);
  // Re-encoding gives the same bytes (this is what the store writes).
  assert.deepEqual(encodeBitmapDirectory(list), good);
  // A name padded with NULs reads as the C string (qemu's g_strndup).
  assert.equal(parseBitmapDirectory(entry({ name: "b0\0" }), 1, ctx)[0]!.name, "b0");

  const constraints = /^Bitmap 'b0' doesn't satisfy the constraints \(entry at 0x130000: /;
  const cases: Array<[Uint8Array, number, RegExp, number?]> = [
    [good, 2, /^More bitmaps found than specified in header extension$/],
    [good, 4, /^Less bitmaps found than specified in header extension/],
    [good.subarray(0, 20), 1, /^Broken bitmap directory \(entry at 0x130000/],
    [good.subarray(0, 40), 2, /^Broken bitmap directory \(entry at 0x130020/],
    [entry({ nsize: 40 }).subarray(0, 32), 1, /^Broken bitmap directory/],
    [entry({ esize: 8 }), 1, /^Bitmap extra data is not supported/],
    [entry({ tsize: 0 }), 1, constraints],
    [entry({ off: 0 }), 1, constraints],
    [entry({ off: 0x50200 }), 1, /not cluster aligned/],
    [entry({ gbits: 8 }), 1, /granularity bits 8 outside 9\.\.31/],
    [entry({ gbits: 32 }), 1, constraints],
    [entry({ flags: 4 }), 1, /reserved flags set \(0x4\)/],
    [entry({ type: 2 }), 1, /type 2 is not 1/],
    [entry({ tsize: 0x8000001 }), 1, constraints],
    [entry({ tsize: 0x2001 }), 1, /bitmap data size/],
    [entry({ name: "x".repeat(1024) }), 1, /^Bitmap 'x+' doesn't satisfy .*name size 1024/],
    // 4 MiB at 512-byte granularity needs 1024 bytes of bitmap: a 512-byte cluster is too small.
    [entry({ gbits: 9 }), 1, /^Bitmap 'b0' doesn't satisfy.*cannot cover 4194304 bytes/, 512],
  ];
  for (const [dir, nb, re, cs] of cases) {
    const useCtx = { ...ctx, clusterSize: cs ?? ctx.clusterSize };
    assert.throws(() => parseBitmapDirectory(dir, nb, useCtx), blockError(re));
  }
  // The size check does not apply to in_use bitmaps (stale after a resize is allowed).
  parseBitmapDirectory(entry({ gbits: 9, flags: 3 }), 1, { ...ctx, clusterSize: 512 });
  assert.throws(() => parseBitmapDirectory(new Uint8Array(0), 1, ctx), /size is zero/);
});

Deno.test("bitmap: table decoder checks reserved bits, alignment and the all-ones flag", () => {
  const fail = (d: string) => new Error(d);
  const t = encodeBitmapTable([0x50000, 0, TABLE_ONES, 0x70000]);
  assert.deepEqual(parseBitmapTable(t, 65536, fail), [0x50000, 0, TABLE_ONES, 0x70000]);
  const one = (hi: number, lo: number) => {
    const b = new Uint8Array(8);
    const v = new DataView(b.buffer);
    v.setUint32(0, hi);
    v.setUint32(4, lo);
    return b;
  };
  assert.throws(() => parseBitmapTable(one(0x01000000, 0), 65536, fail), /reserved bits/);
  assert.throws(() => parseBitmapTable(one(0, 0x50100), 65536, fail), /reserved bits/);
  assert.throws(() => parseBitmapTable(one(0, 0x50001), 65536, fail), /both an offset and bit 0/);
  assert.throws(() => parseBitmapTable(one(0, 0x50200), 65536, fail), /not cluster aligned/);
  // Offsets up to bit 55 are valid (past any real file: they read as zeroes).
  assert.deepEqual(parseBitmapTable(one(0x00010000, 0), 65536, fail), [2 ** 48]);
});

// ---------------------------------------------------------------------------------------------
// Real images

const dir = await Deno.makeTempDir({ prefix: "qcow2-bitmap-" });
globalThis.addEventListener("unload", () => {
  try {
    Deno.removeSync(dir, { recursive: true });
  } catch { /* gone */ }
});

async function qemuImg(...args: string[]): Promise<string> {
  return await run("qemu-img", args);
}

/** The 4 MiB image of the reference: bitmaps at 64K, 512 and 1M granularity, one disabled. */
async function referenceImage(name: string): Promise<string> {
  const p = `${dir}/${name}`;
  await qemuImg("create", "-q", "-f", "qcow2", p, "4M");
  await qemuImg("bitmap", "--add", p, "b0");
  await qemuImg("bitmap", "--add", "-g", "512", p, "b512");
  await qemuImg("bitmap", "--add", "-g", "1M", p, "b1m");
  await qemuImg("bitmap", "--add", "--disable", p, "dis");
  await qemuIo(p, ["write 1M 4k", "write -z 2M 64k", "discard 0 64k", "write 3M 512"]);
  return p;
}

async function headerOf(path: string) {
  const f = await Deno.open(path);
  try {
    const b = new Uint8Array(65536);
    await f.read(b);
    return parseHeader(b);
  } finally {
    f.close();
  }
}

/** Positional reads of a file with zeroes past its end. */
function reader(path: string) {
  return async (buf: Uint8Array, off: number) => {
    const f = await Deno.open(path);
    try {
      await f.seek(off, Deno.SeekMode.Start);
      let got = 0;
      while (got < buf.length) {
        const n = await f.read(buf.subarray(got));
        if (n === null) break;
        got += n;
      }
      buf.fill(0, got);
    } finally {
      f.close();
    }
  };
}

Deno.test("bitmap: loads qemu-img's bitmaps with the bits qemu-io's writes set", async () => {
  const p = await referenceImage("ref.qcow2");
  const h = await headerOf(p);
  const image = await loadImageBitmaps(h, { read: reader(p) });
  assert.deepEqual(image.list.map((b) => [b.name, b.granularity, b.isEnabled, b.inUse]), [
    ["b0", 65536, true, false],
    ["b512", 512, true, false],
    ["b1m", MiB, true, false],
    ["dis", 65536, false, false],
  ]);
  // 128 + 8 + 128 + 1 granules at 512 bytes; 4 at 64 KiB; 4 at 1 MiB (every MiB touched).
  assert.equal(image.find("b512")!.dirtyCount, 265);
  assert.equal(image.find("b0")!.dirtyCount, 4);
  assert.equal(image.find("b1m")!.dirtyCount, 4);
  assert.equal(image.find("dis")!.dirtyCount, 0);
  assert.equal(image.find("nope"), undefined);
  // Through the driver: the device finds them; a backing chain is searched below the top.
  const top = `${dir}/ref-top.qcow2`;
  await qemuImg("create", "-q", "-f", "qcow2", "-b", "ref.qcow2", "-F", "qcow2", top, "4M");
  await qemuImg("bitmap", "--add", top, "topbm");
  const dev = await openImage(top) as Qcow2Device;
  try {
    assert.equal(dev.dirtyBitmap("topbm")!.name, "topbm");
    assert.equal(dev.dirtyBitmap("b512")!.granularity, 512);
    assert.equal(dev.dirtyBitmap("missing"), undefined);
  } finally {
    await dev.close();
  }
});

/** Byte offset of the bitmaps extension's data in the header cluster. */
function bitmapsExtAt(b: Uint8Array): number {
  const v = new DataView(b.buffer, b.byteOffset);
  for (let pos = v.getUint32(100), i = 0; pos + 8 <= 65536 && i < 100; i++) {
    const type = v.getUint32(pos), len = v.getUint32(pos + 4);
    if (type === 0x23852875) return pos + 8;
    if (type === 0) break;
    pos += 8 + ((len + 7) & ~7);
  }
  throw new Error("no bitmaps extension");
}

async function poke(path: string, edit: (b: Uint8Array) => void): Promise<void> {
  const b = await Deno.readFile(path);
  edit(b);
  await Deno.writeFile(path, b);
}

Deno.test("bitmap: open-time failures and warnings match qemu's", async () => {
  const p = await referenceImage("bad.qcow2");
  const pristine = await Deno.readFile(p);
  const h0 = await headerOf(p);
  const dirAt = h0.bitmaps!.directoryOffset;
  const v0 = new DataView(pristine.buffer);
  const b0Table = v0.getUint32(dirAt + 4);

  const cases: Array<[string, (b: Uint8Array) => void, RegExp]> = [
    ["type 2", (b) => b[dirAt + 16] = 2, /^Bitmap 'b0' doesn't satisfy the constraints/],
    [
      "reserved table bit",
      (b) => new DataView(b.buffer).setUint32(b0Table + 4, 0x2),
      /^Could not read bitmap_table table from image for bitmap 'b0': Invalid argument/,
    ],
    [
      "table too long",
      (b) => new DataView(b.buffer).setUint32(dirAt + 8, 2),
      /^Could not read bitmap(_table table)? .*'b0'.*Invalid argument/,
    ],
    [
      "duplicate name",
      // Rename the third entry "b1m" (after two 32-byte entries) to "b0\0": same entry size,
      // and the name reads up to the NUL.
      (b) => b.set([0x62, 0x30, 0], dirAt + 64 + 24),
      /^Bitmap already exists: b0$/,
    ],
  ];
  for (const [what, edit, re] of cases) {
    await Deno.writeFile(p, pristine);
    await poke(p, edit);
    const h = await headerOf(p);
    await assert.rejects(loadImageBitmaps(h, { read: reader(p) }), blockError(re), what);
    // The driver refuses the open too, with or without -B (qemu loads every bitmap at open).
    await assert.rejects(openImage(p), blockError(re), what);
  }
  // An in_use bitmap loads as inconsistent without reading its (here broken) table.
  await Deno.writeFile(p, pristine);
  await poke(p, (b) => {
    b[dirAt + 15]! |= BITMAP_FLAG_IN_USE;
    new DataView(b.buffer).setUint32(b0Table + 4, 0x2);
  });
  const image = await loadImageBitmaps(await headerOf(p), { read: reader(p) });
  assert.equal(image.find("b0")!.inUse, true);
  assert.equal(image.find("b512")!.inUse, false);
  // Autoclear bit cleared by another program: a warning, and no bitmaps at all.
  await Deno.writeFile(p, pristine);
  await poke(p, (b) => new DataView(b.buffer).setBigUint64(88, 0n));
  const warnings: string[] = [];
  const none = await loadImageBitmaps(await headerOf(p), {
    read: reader(p),
    warn: (m) => warnings.push(m),
  });
  assert.equal(none.list.length, 0);
  const qemu = await new Deno.Command("qemu-img", { args: ["info", p], stderr: "piped" }).output();
  const qmsg = new TextDecoder().decode(qemu.stderr);
  assert.equal(warnings.length, 1);
  for (const line of warnings[0]!.split("\n")) assert.ok(qmsg.includes(line), `${line} / ${qmsg}`);
});

/**
 * A BitmapStoreIo over a plain file: allocation appends whole clusters at the end (refcounts are
 * not maintained: enough for qemu-img info and qemu-nbd -r to read the result), the header
 * update patches the extension and autoclear bit in place. Records the call order.
 */
function fileIo(path: string, cs: number, log: string[]): BitmapStoreIo {
  return {
    clusterSize: cs,
    async allocate(bytes) {
      const size = (await Deno.stat(path)).size;
      const at = Math.ceil(size / cs) * cs;
      const n = Math.ceil(bytes / cs) * cs;
      const f = await Deno.open(path, { write: true });
      try {
        await f.truncate(at + n);
      } finally {
        f.close();
      }
      log.push(`alloc ${n}`);
      return at;
    },
    async write(offset, data) {
      const f = await Deno.open(path, { write: true });
      try {
        await f.seek(offset, Deno.SeekMode.Start);
        await f.write(data);
      } finally {
        f.close();
      }
      log.push(`write ${data.length}`);
    },
    flushCaches() {
      log.push("flush");
      return Promise.resolve();
    },
    async updateHeader(ext, autoclear) {
      await poke(path, (b) => {
        b.set(encodeBitmapsExtension(ext), bitmapsExtAt(b));
        const v = new DataView(b.buffer);
        const ac = v.getBigUint64(88);
        v.setBigUint64(88, autoclear ? ac | AUTOCLEAR_BITMAPS : ac & ~AUTOCLEAR_BITMAPS);
      });
      log.push(`header ${autoclear ? "ac" : "no-ac"}`);
    },
    free(offset, bytes) {
      log.push(`free ${bytes}`);
      assert.ok(offset > 0 && offset % cs === 0);
      return Promise.resolve();
    },
  };
}

async function qemuNbdBitmapMap(img: string, name: string): Promise<string> {
  const sock = `${dir}/q-${crypto.randomUUID().slice(0, 8)}.sock`;
  const child = new Deno.Command("qemu-nbd", {
    args: ["-r", "-t", "-k", sock, "-f", "qcow2", "-B", name, img],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  try {
    for (let i = 0; i < 500; i++) {
      try {
        await Deno.stat(sock);
        break;
      } catch {
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    return await run("nbdinfo", [`--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///?socket=${sock}`]);
  } finally {
    child.kill("SIGTERM");
    await child.status;
    await child.stderr.cancel().catch(() => {});
  }
}

Deno.test("bitmap: in-use marking and store-on-close produce what qemu reads back", async () => {
  const p = `${dir}/store.qcow2`;
  await qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "4M");
  await qemuImg("bitmap", "--add", "-g", "512", p, "fine");
  await qemuImg("bitmap", "--add", "-g", "64k", p, "coarse");
  await qemuImg("bitmap", "--add", "--disable", p, "off");
  await qemuIo(p, ["write 0 1k"]);
  const cs = 512;
  const h = await headerOf(p);
  const image = await loadImageBitmaps(h, { read: reader(p) });
  const log: string[] = [];
  const io = fileIo(p, cs, log);

  await markBitmapsInUse(image, io);
  assert.deepEqual(log, [
    "header no-ac",
    `write ${h.bitmaps!.directorySize}`,
    "header no-ac",
    "header ac",
  ]);
  const info = JSON.parse(await qemuImg("info", "--output=json", p));
  const flags = info["format-specific"].data.bitmaps.map((b: { flags: string[] }) => b.flags);
  assert.deepEqual(flags, [["in-use", "auto"], ["in-use", "auto"], ["in-use"]]);

  // Writes reach the enabled bitmaps only; then store and let qemu read the result.
  image.mark(3 * MiB + 100, 1000);
  image.mark(2 * MiB, 64 * KiB);
  log.length = 0;
  await storeBitmaps(image, io);
  const fine = image.find("fine")!;
  // fine: table of 2 clusters, data only in the second (bits from 2M onwards) -> 1 data cluster.
  assert.equal(bitmapTableSize(bitmapLength(4 * MiB), 9, cs), 2);
  assert.deepEqual(log.slice(0, 3), ["alloc 512", "write 512", "alloc 512"]);
  assert.ok(log.indexOf("flush") < log.indexOf("header ac"));
  assert.ok(log.indexOf("header ac") < log.findIndex((l) => l.startsWith("free")));
  const info2 = JSON.parse(await qemuImg("info", "--output=json", p));
  assert.deepEqual(
    info2["format-specific"].data.bitmaps.map((
      b: { name: string; flags: string[] },
    ) => [b.name, b.flags]),
    [["fine", ["auto"]], ["coarse", ["auto"]], ["off", []]],
  );
  for (const bm of image.list) {
    const out = new ExtentList(1 << 20);
    bm.extents(0, 4 * MiB, out);
    const qemuMap = parseNbdinfoMap(await qemuNbdBitmapMap(p, bm.name));
    assert.deepEqual(runs(out, 0), qemuMap, bm.name);
  }
  assert.equal(fine.dirtyCount, 2 + 3 + 128);
  // And our own loader agrees with what was stored.
  const again = await loadImageBitmaps(await headerOf(p), { read: reader(p) });
  assert.deepEqual(again.list.map((b) => b.dirtyCount), image.list.map((b) => b.dirtyCount));
});
