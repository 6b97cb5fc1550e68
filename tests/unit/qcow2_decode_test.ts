/** Pure decoders of the qcow2 driver: header, L2 entries, compressed descriptors, snapshots, refcounts, L2 cache, decompression. */

import assert from "node:assert/strict";
import { deflateRawSync, zstdCompressSync } from "node:zlib";
import { decompressCluster } from "../../lib/block/qcow2/compressed.ts";
import {
  compressedDescriptor,
  entryOffset,
  extendedKind,
  Kind,
  standardKind,
} from "../../lib/block/qcow2/entry.ts";
import { parseHeader, unsupportedFeaturesMessage } from "../../lib/block/qcow2/header.ts";
import { L2Cache } from "../../lib/block/qcow2/l2_cache.ts";
import { resolveBackingPath } from "../../lib/block/qcow2/mod.ts";
import { refcountNonZero } from "../../lib/block/qcow2/refcount.ts";
import {
  parseSnapshotOptions,
  parseSnapshotTable,
  selectSnapshot,
} from "../../lib/block/qcow2/snapshot.ts";
import { BlockError } from "../../lib/block/types.ts";

/** A minimal valid v3 header in a 64 KiB cluster 0. */
function header(edit?: (v: DataView, b: Uint8Array) => void): Uint8Array {
  const b = new Uint8Array(65536);
  const v = new DataView(b.buffer);
  v.setUint32(0, 0x514649fb);
  v.setUint32(4, 3);
  v.setUint32(20, 16);
  v.setBigUint64(24, 4n << 20n);
  v.setUint32(36, 1);
  v.setBigUint64(40, 0x30000n);
  v.setBigUint64(48, 0x10000n);
  v.setUint32(56, 1);
  v.setUint32(96, 4);
  v.setUint32(100, 112);
  edit?.(v, b);
  return b;
}

function ext(b: Uint8Array, at: number, type: number, data: Uint8Array): number {
  const v = new DataView(b.buffer);
  v.setUint32(at, type);
  v.setUint32(at + 4, data.length);
  b.set(data, at + 8);
  return at + 8 + ((data.length + 7) & ~7);
}

const enc = new TextEncoder();

Deno.test("qcow2 header: valid v3 with extensions and backing name", () => {
  const h = parseHeader(header((v, b) => {
    let at = 112;
    at = ext(b, at, 0xe2792aca, enc.encode("qcow2"));
    const table = new Uint8Array(48);
    table[0] = 0;
    table[1] = 5;
    table.set(enc.encode("future feature"), 2);
    at = ext(b, at, 0x6803f857, table);
    at = ext(b, at, 0x44415441, enc.encode("d.data"));
    at = ext(b, at, 0, new Uint8Array(0));
    v.setBigUint64(8, BigInt(at));
    v.setUint32(16, 6);
    b.set(enc.encode("b.qcow"), at);
    v.setBigUint64(72, 4n); // external data file
  }));
  assert.equal(h.version, 3);
  assert.equal(h.clusterSize, 65536);
  assert.equal(h.backingFile, "b.qcow");
  assert.equal(h.backingFormat, "qcow2");
  assert.equal(h.dataFile, "d.data");
  assert.deepEqual(h.featureNames, [{ type: 0, bit: 5, name: "future feature" }]);
  assert.equal(h.l1NeededEntries, 1);
  assert.equal(h.compressionType, 0);
});

Deno.test("qcow2 header: v2 defaults", () => {
  const h = parseHeader(header((v, b) => {
    v.setUint32(4, 2);
    b.fill(0, 72, 112);
  }));
  assert.equal(h.version, 2);
  assert.equal(h.refcountOrder, 4);
  assert.equal(h.headerLength, 72);
  assert.equal(h.incompatible, 0n);
});

Deno.test("qcow2 header: malformed input is refused with qemu's wording", () => {
  const cases: Array<[(v: DataView, b: Uint8Array) => void, RegExp]> = [
    [(v) => v.setUint32(0, 0), /not in qcow2 format/],
    [(v) => v.setUint32(4, 1), /Unsupported qcow2 version 1/],
    [(v) => v.setUint32(20, 8), /Unsupported cluster size: 2\^8/],
    [(v) => v.setUint32(100, 100), /header too short/],
    [(v) => v.setUint32(100, 70000), /exceeds cluster size/],
    [(v) => v.setUint32(96, 7), /64 bits/],
    [(v) => v.setBigUint64(72, 1n << 63n), /Unknown incompatible feature: 8000000000000000/],
    // Extended L2 is refused below 16 KiB clusters (checked with 8 KiB clusters below).
    [(v) => v.setBigUint64(72, 16n), /Extended L2 entries are only supported/],
    [(v) => v.setUint8(104, 1), /bit must be set/],
    [(v) => v.setUint8(104, 2), /unknown compression type: 2/],
    [(v) => v.setUint32(32, 3), /Unsupported encryption method: 3/],
    [(v) => v.setUint32(36, 5_000_000), /Active L1 table too large/],
    [(v) => v.setBigUint64(40, 0x30008n), /Active L1 table offset invalid/],
    [(v) => v.setBigUint64(48, 0x10001n), /Reference count table offset invalid/],
    [(v) => v.setUint32(56, 1 << 20), /Reference count table too large/],
    [(v) => v.setUint32(60, 70000), /Snapshot table too large/],
    [(v) => {
      v.setBigUint64(8, 200n);
      v.setUint32(16, 2000);
    }, /Backing file name too long/],
    [(v) => v.setBigUint64(8, 1n << 40n), /Invalid backing file offset/],
    [(_v, b) => ext(b, 112, 0xe2792aca, new Uint8Array(20)), /ext_backing_format/],
    [(v) => {
      v.setUint32(112, 0x1234);
      v.setUint32(116, 0xffffff);
    }, /extension: too large/],
  ];
  for (const [edit, re] of cases) {
    if (re.source.includes("Extended L2")) {
      // 64 KiB clusters allow extended L2; 8 KiB ones do not.
      assert.throws(() =>
        parseHeader(
          header((v, b) => {
            edit(v, b);
            v.setUint32(20, 13);
            v.setUint32(36, 1);
          }).subarray(0, 8192),
        ), re);
      continue;
    }
    assert.throws(
      () => parseHeader(header(edit)),
      (e: unknown) => e instanceof BlockError && re.test(e.message),
      String(re),
    );
  }
  assert.throws(() => parseHeader(new Uint8Array(10)), /not in qcow2 format/);
});

Deno.test("qcow2 header: unsupported features message uses the feature table", () => {
  const table = [{ type: 0, bit: 7, name: "shiny" }, { type: 1, bit: 8, name: "compat" }];
  assert.equal(unsupportedFeaturesMessage(1n << 7n, table), "Unsupported qcow2 feature(s): shiny");
  assert.equal(
    unsupportedFeaturesMessage((1n << 7n) | (1n << 8n), table),
    "Unsupported qcow2 feature(s): shiny, Unknown incompatible feature: 100",
  );
});

Deno.test("qcow2 entries: standard L2 classification", () => {
  assert.equal(standardKind(0, 0, false), Kind.Unalloc);
  assert.equal(standardKind(0x80000000, 0x50000, false), Kind.Data);
  assert.equal(standardKind(0, 1, false), Kind.Zero); // ZERO_PLAIN
  assert.equal(standardKind(0x80000000, 0x50001, false), Kind.Zero); // ZERO_ALLOC
  assert.equal(standardKind(0x40000000, 0x1234, false), Kind.Compressed);
  // Offset 0 with COPIED: data only with an external data file.
  assert.equal(standardKind(0x80000000, 0, false), Kind.Unalloc);
  assert.equal(standardKind(0x80000000, 0, true), Kind.Data);
  assert.equal(entryOffset(0x80ffffff, 0xfffffe00), 0xfffffffffffe00);
  assert.equal(entryOffset(0x7f000000, 0x1ff), 0); // reserved/flag bits are not offset
});

Deno.test("qcow2 entries: extended L2 subcluster classification", () => {
  const off = [0x80000000, 0x50000] as const;
  assert.equal(extendedKind(...off, 0b1, 0, 0, false), Kind.Data);
  assert.equal(extendedKind(...off, 0b1, 0, 1, false), Kind.Unalloc); // UNALLOCATED_ALLOC
  assert.equal(extendedKind(...off, 0b1, 0b10, 1, false), Kind.Zero); // ZERO_ALLOC
  assert.equal(extendedKind(...off, 0b11, 0b10, 1, false), Kind.Invalid); // both bits
  assert.equal(extendedKind(0, 0, 0, 1 << 31, 31, false), Kind.Zero); // ZERO_PLAIN
  assert.equal(extendedKind(0, 0, 0, 0, 3, false), Kind.Unalloc);
  assert.equal(extendedKind(0, 0, 1, 0, 3, false), Kind.Invalid); // alloc bit without offset
  assert.equal(extendedKind(0x40000000, 5, 0, 0, 0, false), Kind.Compressed);
  // The standard zero flag is not used with extended L2.
  assert.equal(extendedKind(0x80000000, 0x50001, 1, 0, 0, false), Kind.Data);
});

Deno.test("qcow2 entries: compressed descriptors for 512 B, 64 KiB and 2 MiB clusters", () => {
  // 64 KiB: x = 54; offset 0x12345 (bits 0..53), 3 additional sectors in bits 54..61.
  const v64 = (3n << 54n) | 0x12345n | (1n << 62n);
  let d = compressedDescriptor(Number(v64 >> 32n), Number(v64 & 0xffffffffn), 16);
  assert.deepEqual(d, { offset: 0x12345, length: 4 * 512 - (0x12345 % 512) });
  // 512 B: x = 61, one size bit.
  const v512 = (1n << 61n) | 0x200n | (1n << 62n);
  d = compressedDescriptor(Number(v512 >> 32n), Number(v512 & 0xffffffffn), 9);
  assert.deepEqual(d, { offset: 0x200, length: 1024 });
  // 2 MiB: x = 49, 13 size bits, all set.
  const v2m = (0x1fffn << 49n) | 0x1ffffffffffffn | (1n << 62n);
  d = compressedDescriptor(Number(v2m >> 32n), Number(v2m & 0xffffffffn), 21);
  assert.equal(d.offset, 0x1ffffffffffff);
  assert.equal(d.length, 0x2000 * 512 - 511);
});

Deno.test("qcow2 snapshots: table parsing, selection and -l forms", () => {
  const entries = [
    { id: "1", name: "s1", l1: 0x30000, extra: 24 },
    { id: "2", name: "1", l1: 0x70000, extra: 0 },
  ];
  const buf = new Uint8Array(512);
  const v = new DataView(buf.buffer);
  let at = 0;
  for (const e of entries) {
    v.setBigUint64(at, BigInt(e.l1));
    v.setUint32(at + 8, 1);
    v.setUint16(at + 12, e.id.length);
    v.setUint16(at + 14, e.name.length);
    v.setUint32(at + 36, e.extra);
    if (e.extra >= 16) v.setBigUint64(at + 48, 4n << 20n);
    buf.set(enc.encode(e.id + e.name), at + 40 + e.extra);
    at = (at + 40 + e.extra + e.id.length + e.name.length + 7) & ~7;
  }
  const t = parseSnapshotTable(buf, 2)!;
  assert.deepEqual(t.map((s) => [s.id, s.name, s.l1TableOffset, s.diskSize]), [
    ["1", "s1", 0x30000, 4 << 20],
    ["2", "1", 0x70000, undefined],
  ]);
  // A plain argument matches an ID first: "1" is snapshot 1, not the one named "1".
  assert.equal(selectSnapshot(t, "1"), 0);
  assert.equal(selectSnapshot(t, "s1"), 0);
  assert.equal(selectSnapshot(t, "2"), 1);
  assert.equal(selectSnapshot(t, "snapshot.name=1"), 1);
  assert.equal(selectSnapshot(t, "snapshot.id=2,snapshot.name=s1"), -1);
  assert.equal(selectSnapshot(t, { name: "nope" }), -1);
  assert.deepEqual(parseSnapshotOptions("snapshot.name=a,,b"), { name: "a,b" });
  assert.throws(() => parseSnapshotOptions("snapshot.id=1,bogus=2"), /Invalid parameter 'bogus'/);
  // Truncated tables: "need more" when incomplete, an error when complete.
  assert.equal(parseSnapshotTable(buf.subarray(0, 50), 2, false), undefined);
  assert.throws(() => parseSnapshotTable(buf.subarray(0, 50), 2, true), /exceeds the maximum size/);
  v.setUint32(36, 5000);
  assert.throws(() => parseSnapshotTable(buf, 2), /Too much extra metadata/);
});

Deno.test("qcow2 refcounts: every width", () => {
  const b = new Uint8Array(64);
  b[0] = 0b0000_0101; // 1-bit: entries 0 and 2 set
  assert.deepEqual([0, 1, 2, 3].map((i) => refcountNonZero(b, i, 1)), [true, false, true, false]);
  assert.deepEqual([0, 1, 2].map((i) => refcountNonZero(b, i, 2)), [true, true, false]);
  assert.deepEqual([0, 1].map((i) => refcountNonZero(b, i, 4)), [true, false]);
  const w = new Uint8Array(64);
  w[15] = 1; // 64-bit entry 1, 16-bit entry 7, 8-bit entry 15
  assert.equal(refcountNonZero(w, 1, 64), true);
  assert.equal(refcountNonZero(w, 0, 64), false);
  assert.equal(refcountNonZero(w, 7, 16), true);
  assert.equal(refcountNonZero(w, 15, 8), true);
  assert.equal(refcountNonZero(w, 14, 8), false);
  assert.equal(refcountNonZero(w, 3, 32), true);
});

Deno.test("qcow2 L2 cache: LRU bound and single-flight loads", async () => {
  let loads = 0;
  const cache = new L2Cache(16, 48, async (buf, off) => {
    loads++;
    await new Promise((r) => setTimeout(r, 5));
    new DataView(buf.buffer).setUint32(0, off);
  });
  assert.equal(cache.capacity, 3);
  const all = await Promise.all(Array.from({ length: 10 }, () => cache.load(160)));
  assert.equal(loads, 1);
  assert.ok(all.every((w) => w === all[0] && w[0] === 160));
  for (const k of [0, 16, 32]) await cache.load(k);
  assert.equal(cache.size, 3);
  assert.equal(cache.get(160), undefined); // evicted, least recently used
  cache.get(0); // refresh 0
  await cache.load(48); // evicts 16
  assert.ok(cache.get(0) !== undefined && cache.get(16) === undefined);
  // A failed load is not cached and can be retried.
  const failing = new L2Cache(16, 32, () => Promise.reject(new Error("boom")));
  await assert.rejects(failing.load(0), /boom/);
  await assert.rejects(failing.load(0), /boom/);
  assert.equal(failing.size, 0);
});

Deno.test("qcow2 decompression: deflate and zstd, trailing bytes, corrupt and short input", () => {
  const cs = 65536;
  const data = new Uint8Array(cs).map((_, i) => (i * 31) % 251);
  for (const type of [0, 1]) {
    const c = type === 0 ? deflateRawSync(data, { windowBits: 12 }) : zstdCompressSync(data);
    const withTail = new Uint8Array(c.length + 700);
    withTail.set(c);
    withTail.fill(0x5a, c.length); // the next cluster's bytes
    const out = decompressCluster(type, withTail, cs);
    assert.deepEqual(out, data, `type ${type}`);
    assert.equal(out!.buffer.byteLength, cs, "the result owns its buffer (transferable)");
    assert.equal(decompressCluster(type, c.subarray(0, c.length >> 1), cs), null);
    assert.equal(decompressCluster(type, new Uint8Array(100).fill(0xff), cs), null);
    // Data for a smaller cluster than the output: too short.
    const small = type === 0
      ? deflateRawSync(data.subarray(0, 512))
      : zstdCompressSync(data.subarray(0, 512));
    assert.equal(decompressCluster(type, small, cs), null);
    // Deflate data for a larger cluster: refused (see decompressCluster).
    if (type === 0) {
      assert.equal(decompressCluster(0, deflateRawSync(new Uint8Array(2 * cs)), cs), null);
    }
  }
  // Small clusters come out of Node's shared buffer pool: the result must still own its memory.
  const tiny = decompressCluster(0, deflateRawSync(data.subarray(0, 512)), 512);
  assert.deepEqual(tiny, data.subarray(0, 512));
  assert.equal(tiny!.buffer.byteLength, 512);
  // zstd output larger than the cluster: qemu keeps the first cluster; so do we.
  const big = zstdCompressSync(new Uint8Array(2 * cs).fill(7));
  const out = decompressCluster(1, big, cs);
  assert.equal(out?.length, cs);
  assert.ok(out!.every((x) => x === 7));
});

Deno.test("qcow2 backing names resolve like qemu's path_combine", () => {
  assert.equal(resolveBackingPath("/a/b/top.qcow2", "base.qcow2"), "/a/b/base.qcow2");
  assert.equal(resolveBackingPath("/a/b/top.qcow2", "/abs/base"), "/abs/base");
  assert.equal(resolveBackingPath("top.qcow2", "base.qcow2"), "base.qcow2");
  assert.equal(resolveBackingPath("sub/top.qcow2", "../base.qcow2"), "sub/../base.qcow2");
});
