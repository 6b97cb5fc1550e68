// The raw driver and the filters on real sparse files (FFI file engine), without the protocol.
import assert from "node:assert/strict";
import { RawDevice } from "../../lib/block/raw.ts";
import { openFileEngine } from "../../lib/io/engine_factory.ts";
import { BlockError, ExtentList, STATE_HOLE, STATE_ZERO } from "../../lib/block/types.ts";
import { DetectZeroesFilter, isZero } from "../../lib/block/filters/detect_zeroes.ts";
import { DiscardIgnoreFilter } from "../../lib/block/filters/discard.ts";
import { ProbeGuardFilter } from "../../lib/block/filters/probe_guard.ts";
import { ReadOnlyFilter } from "../../lib/block/filters/read_only.ts";

const MiB = 1024 * 1024;

async function withImage(size: number, fn: (path: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "denbd-block-" });
  const path = `${dir}/disk.img`;
  const f = await Deno.create(path);
  await f.truncate(size);
  f.close();
  try {
    await fn(path);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function allocatedBytes(path: string): number {
  return (Deno.statSync(path).blocks ?? 0) * 512;
}

Deno.test("raw: size rounds up to 512, reads past the end of file are zeroes", async () => {
  await withImage(1000, async (path) => {
    const dev = new RawDevice(openFileEngine(path, { writable: true }), {
      writable: true,
      offset: 0,
      size: undefined,
      minBlock: 1,
    });
    assert.equal(dev.size, 1024);
    await dev.pwrite(new Uint8Array(10).fill(0xab), 995, {});
    const buf = new Uint8Array(30).fill(0xff);
    await dev.pread(buf, 994);
    assert.deepEqual([...buf.subarray(0, 12)], [0, ...new Array(10).fill(0xab), 0]);
    await dev.close();
  });
});

Deno.test("raw: offset and size window; bad windows are refused with the numbers", async () => {
  await withImage(4 * MiB, async (path) => {
    const file = openFileEngine(path, { writable: true });
    await file.pwrite(new Uint8Array([1, 2, 3, 4]), MiB);
    const dev = new RawDevice(file, { writable: true, offset: MiB, size: MiB, minBlock: 1 });
    assert.equal(dev.size, MiB);
    const buf = new Uint8Array(4);
    await dev.pread(buf, 0);
    assert.deepEqual([...buf], [1, 2, 3, 4]);
    assert.throws(
      () => new RawDevice(file, { writable: true, offset: 3 * MiB, size: 2 * MiB, minBlock: 1 }),
      /has to be smaller or equal/,
    );
    assert.throws(
      () => new RawDevice(file, { writable: true, offset: 0, size: 1000, minBlock: 1 }),
      /multiple of 512/,
    );
    await dev.close();
  });
});

Deno.test("raw: extents from SEEK_DATA/SEEK_HOLE, trim punches, zero with noHole keeps data allocated", async () => {
  await withImage(8 * MiB, async (path) => {
    const dev = new RawDevice(openFileEngine(path, { writable: true }), {
      writable: true,
      offset: 0,
      size: undefined,
      minBlock: 1,
    });
    await dev.pwrite(new Uint8Array(MiB).fill(1), 2 * MiB, {});
    let ext = new ExtentList(100);
    await dev.extents(0, 8 * MiB, ext);
    assert.deepEqual(ext.pairs, [
      2 * MiB,
      STATE_HOLE | STATE_ZERO,
      MiB,
      0,
      5 * MiB,
      STATE_HOLE | STATE_ZERO,
    ]);
    // REQ_ONE style: one extent only.
    ext = new ExtentList(1);
    await dev.extents(0, 8 * MiB, ext);
    assert.equal(ext.count, 1);

    await dev.zero(2 * MiB, MiB, { noHole: true });
    const zeroed = new Uint8Array(MiB).fill(7);
    await dev.pread(zeroed, 2 * MiB);
    assert.ok(isZero(zeroed));
    await dev.pwrite(new Uint8Array(MiB).fill(1), 2 * MiB, {});
    const before = allocatedBytes(path);
    await dev.trim(2 * MiB, MiB, {});
    assert.ok(allocatedBytes(path) < before, "trim deallocated");
    await dev.close();
  });
});

Deno.test("discard=ignore: trim is a no-op and zero never deallocates", async () => {
  await withImage(4 * MiB, async (path) => {
    const raw = new RawDevice(openFileEngine(path, { writable: true }), {
      writable: true,
      offset: 0,
      size: undefined,
      minBlock: 1,
    });
    const dev = new DiscardIgnoreFilter(raw);
    await dev.pwrite(new Uint8Array(MiB).fill(3), 0, {});
    const before = allocatedBytes(path);
    await dev.trim(0, MiB, {});
    const buf = new Uint8Array(16);
    await dev.pread(buf, 0);
    assert.ok(buf.every((b) => b === 3), "data kept after ignored trim");
    await dev.zero(0, MiB, {});
    assert.equal(allocatedBytes(path), before, "zero without unmap keeps the blocks");
    await dev.pread(buf, 0);
    assert.ok(isZero(buf));
    await dev.close();
  });
});

Deno.test("detect-zeroes turns a zero write into a zero request", async () => {
  const calls: string[] = [];
  const fake = {
    size: MiB,
    caps: {
      writable: true,
      flush: true,
      trim: true,
      zero: true,
      fastZero: true,
      extents: true,
      minBlock: 1,
    },
    pread: () => Promise.resolve(),
    pwrite: () => (calls.push("write"), Promise.resolve()),
    zero: (
      _o: number,
      _l: number,
      f: { noHole?: boolean },
    ) => (calls.push(`zero noHole=${f.noHole}`), Promise.resolve()),
    flush: () => Promise.resolve(),
    trim: () => Promise.resolve(),
    cache: () => Promise.resolve(),
    extents: () => Promise.resolve(),
    close: () => Promise.resolve(),
  };
  await new DetectZeroesFilter(fake, false).pwrite(new Uint8Array(4096), 0, {});
  await new DetectZeroesFilter(fake, true).pwrite(new Uint8Array(4096), 0, {});
  const data = new Uint8Array(4096);
  data[4095] = 1;
  await new DetectZeroesFilter(fake, true).pwrite(data, 0, {});
  assert.deepEqual(calls, ["zero noHole=true", "zero noHole=false", "write"]);
  assert.ok(isZero(new Uint8Array(13).subarray(3)));
  const odd = new Uint8Array(21);
  odd[20] = 5;
  assert.ok(!isZero(odd.subarray(1)));
});

Deno.test("read-only filter and block-0 guard refuse with EPERM", async () => {
  await withImage(MiB, async (path) => {
    const raw = new RawDevice(openFileEngine(path, { writable: true }), {
      writable: true,
      offset: 0,
      size: undefined,
      minBlock: 512,
    });
    const ro = new ReadOnlyFilter(raw);
    assert.equal(ro.caps.writable, false);
    await assert.rejects(ro.pwrite(), (e) => e instanceof BlockError && e.errno === 1);
    const guard = new ProbeGuardFilter(raw);
    // A qcow2 v3 header start probes as qcow2; the magic with version 0 probes as nothing.
    await assert.rejects(
      guard.pwrite(new Uint8Array([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]), 0, {}),
      (e) => e instanceof BlockError && e.errno === 1,
    );
    await guard.pwrite(new Uint8Array([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 0]), 0, {});
    await guard.pwrite(new Uint8Array([1, 2, 3, 4]), 0, {}); // harmless data is fine
    await guard.pwrite(new Uint8Array([0x51, 0x46, 0x49, 0xfb]), 4096, {}); // elsewhere too
    await raw.close();
  });
});

Deno.test("ExtentList merges equal neighbours and is full only once a run is refused", () => {
  const l = new ExtentList(2);
  l.add(10, 0);
  l.add(5, 0);
  assert.deepEqual(l.pairs, [15, 0]);
  l.add(7, 3);
  assert.ok(!l.full, "at its maximum, but equal runs may still merge (qemu's REQ_ONE)");
  assert.equal(l.add(1, 3), true, "a merge still fits");
  assert.ok(!l.full);
  assert.equal(l.add(1, 0), false);
  assert.ok(l.full);
  assert.equal(l.total, 23);
});

Deno.test("O_DIRECT engine: unaligned reads and writes, concurrent overlapping writes keep every byte", async () => {
  const { DirectFileEngine } = await import("../../lib/io/direct_engine.ts");
  await withImage(4 * MiB, async (path) => {
    const e = new DirectFileEngine(path, true);
    assert.ok(e.alignment === 512 || e.alignment === 4096);
    // Many small writes into the same blocks at once: each is a read-modify-write.
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 200; i++) writes.push(e.pwrite(new Uint8Array([i + 1]), 3 + i * 7));
    await Promise.all(writes);
    const back = new Uint8Array(1500);
    assert.equal(await e.pread(back, 0), 1500);
    for (let i = 0; i < 200; i++) assert.equal(back[3 + i * 7], i + 1, `byte ${3 + i * 7}`);
    // A write spanning a block boundary, read back at an odd offset.
    const data = new Uint8Array(10000).map((_, i) => (i * 31) & 0xff);
    await e.pwrite(data, MiB - 1234);
    const got = new Uint8Array(10000);
    await e.pread(got, MiB - 1234);
    assert.deepEqual(got, data);
    e.close();
  });
});

Deno.test("raw: a known data run answers extents without lseek until a hole is punched", async () => {
  await withImage(8 * MiB, async (path) => {
    const file = openFileEngine(path, { writable: true });
    let seeks = 0;
    // Every call goes to the real engine; the two lseeks are counted on the way.
    const counted = new Proxy(file, {
      get(target, key) {
        if (key === "seekData" || key === "seekHole") seeks++;
        const v = Reflect.get(target, key, target);
        return typeof v === "function" ? v.bind(target) : v;
      },
    });
    const dev = new RawDevice(counted, { writable: true, offset: 0, size: undefined, minBlock: 1 });
    await dev.pwrite(new Uint8Array(2 * MiB).fill(7), 2 * MiB, {});
    const map = async (offset: number, length: number) => {
      const ext = new ExtentList(64);
      await dev.extents(offset, length, ext);
      return ext.pairs;
    };
    assert.deepEqual(await map(2 * MiB, 4096), [4096, 0]);
    const first = seeks;
    assert.ok(first > 0);
    for (let i = 0; i < 100; i++) assert.deepEqual(await map(2 * MiB + i * 4096, 4096), [4096, 0]);
    assert.equal(seeks, first, "reads inside the known run must not seek");
    // Punching a hole in the middle forgets the run: the hole is reported at once.
    await dev.trim(3 * MiB, MiB, {});
    assert.deepEqual(await map(3 * MiB, 4096), [4096, STATE_HOLE | STATE_ZERO]);
    assert.deepEqual(await map(2 * MiB, 2 * MiB), [MiB, 0, MiB, STATE_HOLE | STATE_ZERO]);
    await dev.close();
  });
});
