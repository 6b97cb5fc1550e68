/** The VDI header decoder and encoder, the block map's checks and the driver over a fake file. */

import assert from "node:assert/strict";
import {
  decodeVdiHeader,
  encodeVdiHeader,
  hasVdiSignature,
  VDI_BLOCK_SIZE,
  VDI_TYPE_DYNAMIC,
  VDI_UNALLOCATED,
} from "../../lib/block/vdi/header.ts";
import { VdiBlockMap } from "../../lib/block/vdi/block_map.ts";
import { openVdi } from "../../lib/block/vdi/mod.ts";
import type { FileEngine } from "../../lib/io/file_engine.ts";
import { BlockError, Errno, ExtentList } from "../../lib/block/types.ts";

/** A header as qemu-img creates it: dynamic, `blocks` 1 MiB blocks, map at 0x200. */
function header(blocks = 4, edit?: (v: DataView, b: Uint8Array) => void): Uint8Array {
  const b = new Uint8Array(512);
  const v = new DataView(b.buffer);
  b.set(new TextEncoder().encode("<<< test VDI >>>\n"));
  v.setUint32(0x40, 0xbeda107f, true);
  v.setUint32(0x44, 0x00010001, true);
  v.setUint32(0x48, 0x180, true);
  v.setUint32(0x4c, VDI_TYPE_DYNAMIC, true);
  v.setUint32(0x154, 0x200, true);
  v.setUint32(0x158, 0x200 + Math.ceil((blocks * 4) / 512) * 512, true);
  v.setUint32(0x168, 512, true);
  v.setBigUint64(0x170, BigInt(blocks * VDI_BLOCK_SIZE), true);
  v.setUint32(0x178, VDI_BLOCK_SIZE, true);
  v.setUint32(0x180, blocks, true);
  b.fill(0x5a, 0x188, 0x1a8); // image and last-snapshot UUIDs
  edit?.(v, b);
  return b;
}

function rejects(b: Uint8Array, errno: number, msg: string): void {
  assert.throws(() => decodeVdiHeader(b), (e: unknown) => {
    assert.ok(e instanceof BlockError);
    assert.equal(e.errno, errno);
    assert.equal(e.message, msg);
    return true;
  });
}

Deno.test("vdi header: a qemu-img header decodes; odd sizes round up to 512", () => {
  const h = decodeVdiHeader(header(4));
  assert.equal(h.diskSize, 4 * VDI_BLOCK_SIZE);
  assert.equal(h.blocksInImage, 4);
  assert.equal(h.offsetData, 0x400);
  assert.equal(h.blocksAllocated, 0);
  const odd = decodeVdiHeader(header(4, (v) => v.setBigUint64(0x170, 1000n, true)));
  assert.equal(odd.diskSize, 1024);
  assert.ok(hasVdiSignature(header()));
  assert.ok(!hasVdiSignature(header().subarray(0, 100)));
  assert.ok(!hasVdiSignature(new Uint8Array(512)));
});

Deno.test("vdi header: encode keeps every byte but the count (and the rounded size)", () => {
  const raw = header(4, (v) => v.setBigUint64(0x170, 1000n, true));
  const h = decodeVdiHeader(raw);
  h.blocksAllocated = 3;
  const out = encodeVdiHeader(h);
  const v = new DataView(out.buffer);
  assert.equal(v.getUint32(0x184, true), 3);
  assert.equal(v.getBigUint64(0x170, true), 1024n);
  for (let i = 0; i < 512; i++) {
    if ((i >= 0x170 && i < 0x178) || (i >= 0x184 && i < 0x188)) continue;
    assert.equal(out[i], raw[i], `byte ${i}`);
  }
});

Deno.test("vdi header: corrupted headers get qemu's messages", () => {
  rejects(
    header(4, (v) => v.setUint32(0x40, 0xdeadbeef, true)),
    Errno.EINVAL,
    "Image not in VDI format (bad signature deadbeef)",
  );
  rejects(
    header(4, (v) => v.setUint32(0x44, 0x00020000, true)),
    Errno.ENOTSUP,
    "unsupported VDI image (version 2.0)",
  );
  rejects(
    header(4, (v) => v.setUint32(0x154, 0x201, true)),
    Errno.ENOTSUP,
    "unsupported VDI image (unaligned block map offset 0x201)",
  );
  rejects(
    header(4, (v) => v.setUint32(0x178, 65536, true)),
    Errno.ENOTSUP,
    "unsupported VDI image (block size 65536 is not 1048576)",
  );
  rejects(
    header(4, (v) => v.setUint32(0x168, 4096, true)),
    Errno.ENOTSUP,
    "unsupported VDI image (sector size 4096 is not 512)",
  );
  rejects(
    header(4, (v) => v.setBigUint64(0x170, 0xffffffffffffffffn, true)),
    Errno.ENOTSUP,
    "Unsupported VDI image size (size is 0xffffffffffffffff, max supported is 0x1fffff8000000)",
  );
  rejects(
    header(4, (v) => v.setUint32(0x180, 3, true)),
    Errno.ENOTSUP,
    "unsupported VDI image (disk size 4194304, image bitmap has room for 3145728)",
  );
  rejects(
    header(4, (_v, b) => b[0x1b0] = 1),
    Errno.ENOTSUP,
    "unsupported VDI image (non-NULL link UUID)",
  );
  rejects(
    header(4, (_v, b) => b[0x1c0] = 1),
    Errno.ENOTSUP,
    "unsupported VDI image (non-NULL parent UUID)",
  );
  rejects(
    header(4, (v) => v.setUint32(0x180, 0xffffffff, true)),
    Errno.ENOTSUP,
    "unsupported VDI image (too many blocks 4294967295, max is 536870784)",
  );
  // Beyond qemu: layouts whose first allocation would overwrite metadata.
  rejects(
    header(4, (v) => v.setUint32(0x154, 0, true)),
    Errno.EINVAL,
    "Corrupt VDI image: block map offset 0x0 overlaps the header",
  );
  rejects(
    header(200, (v) => v.setUint32(0x158, 0x400, true)),
    Errno.EINVAL,
    "Corrupt VDI image: data offset 0x400 overlaps the block map (0x200, 200 entries)",
  );
  // A short file reads as zero-padded: the signature is missing.
  rejects(
    header().subarray(0, 0x40),
    Errno.EINVAL,
    "Image not in VDI format (bad signature 00000000)",
  );
});

Deno.test("vdi block map: entries beyond the image or the file are refused", () => {
  const map = new VdiBlockMap(new Uint8Array(512).fill(0xff), 4);
  assert.equal(map.get(0), VDI_UNALLOCATED);
  map.set(1, 0);
  const limits = {
    blocks: 4,
    offsetData: 0x400,
    blockSize: VDI_BLOCK_SIZE,
    fileLength: 0x400 + VDI_BLOCK_SIZE,
  };
  assert.equal(map.validate(limits), 1);
  map.set(2, 9);
  assert.throws(() => map.validate(limits), /block map entry 2 is 9, beyond the image's 4 blocks/);
  map.set(2, 1);
  assert.throws(
    () => map.validate(limits),
    /block map entry 2 points at offset 1049600, past the end/,
  );
  assert.equal(map.sectorOf(130).offset, 512);
});

/** A FileEngine over a growable in-memory buffer. */
function memFile(init: Uint8Array): FileEngine & { bytes(): Uint8Array } {
  let buf = new Uint8Array(init);
  return {
    path: "mem.vdi",
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

Deno.test("vdi driver: unallocated reads zero, writes allocate at the end as qemu", async () => {
  const img = new Uint8Array(0x400);
  img.set(header(4));
  img.fill(0xff, 0x200, 0x210);
  const file = memFile(img);
  const dev = await openVdi(file, { writable: true });
  const buf = new Uint8Array(8192).fill(7);
  await dev.pread(buf, 0);
  assert.ok(buf.every((b) => b === 0));
  // Two concurrent writes into the same new block allocate it once.
  await Promise.all([
    dev.pwrite(new Uint8Array(4096).fill(0xaa), 2 * VDI_BLOCK_SIZE + 4096, {}),
    dev.pwrite(new Uint8Array(4096).fill(0xbb), 2 * VDI_BLOCK_SIZE + 8192, {}),
  ]);
  const bytes = file.bytes();
  const v = new DataView(bytes.buffer);
  assert.equal(bytes.length, 0x400 + VDI_BLOCK_SIZE);
  assert.equal(v.getUint32(0x184, true), 1);
  assert.equal(v.getUint32(0x200 + 8, true), 0);
  assert.equal(v.getUint32(0x200 + 4, true), VDI_UNALLOCATED);
  const back = new Uint8Array(8192);
  await dev.pread(back, 2 * VDI_BLOCK_SIZE + 4096);
  assert.ok(back.subarray(0, 4096).every((b) => b === 0xaa));
  assert.ok(back.subarray(4096).every((b) => b === 0xbb));
  const out = new ExtentList(16);
  await dev.extents(0, 4 * VDI_BLOCK_SIZE, out);
  assert.deepEqual(out.pairs, [2 * VDI_BLOCK_SIZE, 3, VDI_BLOCK_SIZE, 0, VDI_BLOCK_SIZE, 3]);
  await assert.rejects(
    dev.zero(0, 512, { fastZero: true }),
    (e: unknown) => e instanceof BlockError && e.errno === Errno.ENOTSUP,
  );
  await dev.close();
});
