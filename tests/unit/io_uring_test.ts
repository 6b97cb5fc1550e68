// The io_uring ring (ffi/io_uring.ts) and engine (lib/io/uring_engine.ts) against temp files:
// every operation, many more operations in flight than the ring holds, errors carried by CQEs,
// and closing with operations or a completion wait parked.
import assert from "node:assert/strict";
import { type CompletionWait, Ring } from "../../ffi/io_uring.ts";
import {
  EFD_CLOEXEC,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  libc,
  O_DIRECT,
  O_RDONLY,
  O_RDWR,
  openFile,
} from "../../ffi/libc.ts";
import { BlockError } from "../../lib/block/types.ts";
import { DirectFileEngine, probeDirectAlignment } from "../../lib/io/direct_engine.ts";
import { ThreadFileEngine } from "../../lib/io/file_engine.ts";
import { openFileEngine } from "../../lib/io/engine_factory.ts";
import { sharedRingClosed, UringFileEngine } from "../../lib/io/uring_engine.ts";
import { InlineWriteBackoff } from "../../lib/io/page_cache.ts";

const EBADF = 9;
const EINVAL = 22;
const ECANCELED = 125;
const WAITS: readonly CompletionWait[] = ["enter", "eventfd"];

/**
 * A temp file of `size` bytes: a hole, or written data with `dense` (ext4 lets misaligned
 * O_DIRECT reads of a hole through, so the EINVAL tests need data).
 */
async function withFile(
  size: number,
  fn: (path: string) => Promise<void>,
  dense = false,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "denbd-uring-" });
  const path = `${dir}/f.img`;
  if (dense) {
    await Deno.writeFile(path, new Uint8Array(size).fill(0x5a));
  } else {
    const f = await Deno.create(path);
    await f.truncate(size);
    f.close();
  }
  try {
    await fn(path);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Runs `fn` with a ring and always closes it; the close itself must finish within 3 s. */
async function withRing(
  options: { entries?: number; wait: CompletionWait },
  fn: (ring: Ring) => Promise<void>,
): Promise<void> {
  const ring = new Ring(options);
  try {
    await fn(ring);
  } finally {
    await bounded(ring.close(), 3000, "ring.close()");
  }
}

async function bounded<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) =>
    timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms)
  );
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Whether this process can set up a ring at all: a container's seccomp policy may refuse
 * io_uring_setup even where the sysctl allows it. Without one these tests are ignored (the
 * fallback to threads is tested in tests/interop/aio_test.ts).
 */
const RING_OK = await (async () => {
  try {
    await new Ring({ entries: 4 }).close();
    return true;
  } catch {
    return false;
  }
})();

/** A test whose whole body is bounded: a ring that loses a completion fails it, never hangs it. */
function test(name: string, fn: () => Promise<void>): void {
  Deno.test({
    name: RING_OK ? name : `${name} [io_uring unavailable here]`,
    ignore: !RING_OK,
    fn: () => bounded(fn(), 20_000, name),
  });
}

/** xorshift32, so a failure reproduces. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

function allocatedBytes(path: string): number {
  return (Deno.statSync(path).blocks ?? 0) * 512;
}

for (const wait of WAITS) {
  test(`ring (${wait}): read, write, fdatasync, fallocate and NOP`, async () => {
    await withFile(0, async (path) => {
      const fd = openFile(path, O_RDWR);
      try {
        await withRing({ wait }, async (ring) => {
          const data = new Uint8Array(3 * 4096).map((_, i) => (i * 7 + 3) & 0xff);
          assert.equal(await ring.write(fd, data, 1000), data.length);
          assert.equal(Deno.statSync(path).size, 1000 + data.length);
          const back = new Uint8Array(data.length);
          assert.equal(await ring.read(fd, back, 1000), data.length);
          assert.deepEqual(back, data);
          assert.equal(await ring.fsync(fd), 0);
          assert.equal(await ring.fsync(fd, false), 0);
          assert.equal(await ring.nop(), 0);

          // Zero a range inside the data, keep the size.
          assert.equal(await ring.fallocate(fd, FALLOC_FL_ZERO_RANGE, 4096, 4096), 0);
          assert.equal(await ring.read(fd, back, 1000), data.length);
          const expect = data.slice();
          expect.fill(0, 4096 - 1000, 8192 - 1000);
          assert.deepEqual(back, expect);

          // Allocate past the end (mode 0 grows the file), then punch it out again.
          assert.equal(await ring.fallocate(fd, 0, 0, 1 << 20), 0);
          assert.equal(Deno.statSync(path).size, 1 << 20);
          const before = allocatedBytes(path);
          assert.ok(before >= 1 << 20, `allocated ${before}`);
          const punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
          assert.equal(await ring.fallocate(fd, punch, 512 * 1024, 512 * 1024), 0);
          assert.equal(Deno.statSync(path).size, 1 << 20);
          assert.ok(allocatedBytes(path) <= before - 512 * 1024, "hole punched");
        });
      } finally {
        libc().close(fd);
      }
    });
  });

  test(`ring (${wait}): short read at end of file, 0 past it`, async () => {
    await withFile(10_000, async (path) => {
      const fd = openFile(path, O_RDONLY);
      try {
        await withRing({ wait }, async (ring) => {
          assert.equal(await ring.read(fd, new Uint8Array(8192), 8192), 10_000 - 8192);
          assert.equal(await ring.read(fd, new Uint8Array(100), 10_000), 0);
          assert.equal(await ring.read(fd, new Uint8Array(100), 50_000), 0);
        });
      } finally {
        libc().close(fd);
      }
    });
  });

  test(`ring (${wait}): errors come back as -errno in the CQE`, async () => {
    await withFile(8192, async (path) => {
      const ro = openFile(path, O_RDONLY);
      const direct = openFile(path, O_RDONLY | O_DIRECT);
      try {
        await withRing({ wait }, async (ring) => {
          assert.equal(await ring.write(ro, new Uint8Array(16), 0), -EBADF);
          assert.equal(await ring.fsync(-1), -EBADF);
          // O_DIRECT needs an aligned offset: 1 is not.
          const buf = new Uint8Array(8192);
          assert.equal(await ring.read(direct, buf.subarray(0, 4096), 1), -EINVAL);
          // The ring still works after failures.
          assert.equal(await ring.read(ro, buf.subarray(0, 16), 0), 16);
          assert.ok(buf.subarray(0, 16).every((b) => b === 0x5a));
        });
      } finally {
        libc().close(ro);
        libc().close(direct);
      }
    }, true);
  });

  test(`ring (${wait}): thousands of random ops, far more in flight than the ring holds`, async () => {
    const blocks = 256;
    const size = blocks * 4096;
    await withFile(size, async (path) => {
      const fd = openFile(path, O_RDWR);
      try {
        await withRing({ entries: 8, wait }, async (ring) => {
          assert.ok(ring.sqEntries === 8 && ring.maxInFlight <= 16);
          const model = new Uint8Array(size);
          const next = rng(wait === "enter" ? 12345 : 54321);
          let ops = 0;
          let maxPending = 0;
          for (let round = 0; round < 25; round++) {
            // Each round touches distinct blocks, so all its ops may run in any order.
            const order = Array.from({ length: blocks }, (_, i) => i);
            for (let i = blocks - 1; i > 0; i--) {
              const j = next(i + 1);
              [order[i], order[j]] = [order[j]!, order[i]!];
            }
            const checks: Promise<void>[] = [];
            for (const b of order.slice(0, 200)) {
              const start = b * 4096 + next(4096);
              const len = 1 + next(b * 4096 + 4096 - start);
              if (next(2) === 0) {
                const data = new Uint8Array(len);
                for (let k = 0; k < len; k++) data[k] = next(256);
                model.set(data, start);
                checks.push(ring.write(fd, data, start).then((n) => assert.equal(n, len)));
              } else {
                const expect = model.slice(start, start + len);
                const buf = new Uint8Array(len);
                checks.push(
                  ring.read(fd, buf, start).then((n) => {
                    assert.equal(n, len);
                    assert.deepEqual(buf, expect, `read ${start}+${len}`);
                  }),
                );
              }
              ops++;
            }
            maxPending = Math.max(maxPending, ring.pending);
            await Promise.all(checks);
          }
          assert.equal(ops, 5000);
          assert.ok(maxPending > ring.maxInFlight, `only ${maxPending} pending at once`);
          assert.equal(ring.pending, 0);
          const whole = new Uint8Array(size);
          assert.equal(await ring.read(fd, whole, 0), size);
          assert.deepEqual(whole, model);
        });
      } finally {
        libc().close(fd);
      }
    });
  });

  test(`ring (${wait}): close cancels an op that would never finish and wakes the wait`, async () => {
    // A read of an empty eventfd blocks until someone writes to it: nobody will.
    const efd = libc().eventfd(0, EFD_CLOEXEC);
    assert.ok(efd >= 0);
    try {
      const ring = new Ring({ wait });
      const stuck = ring.read(efd, new Uint8Array(8), 0);
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(ring.pending, 1);
      assert.ok(ring.parked, "a completion wait is parked while the read is in flight");
      const t0 = performance.now();
      await bounded(ring.close(), 3000, "close with a stuck read");
      assert.equal(await stuck, -ECANCELED);
      assert.ok(performance.now() - t0 < 1500, `close took ${performance.now() - t0} ms`);
      // A closed ring refuses new work instead of hanging.
      assert.ok(await ring.nop() < 0);
    } finally {
      libc().close(efd);
    }
  });

  test(`ring (${wait}): close right after a burst returns promptly`, async () => {
    await withFile(1 << 20, async (path) => {
      const fd = openFile(path, O_RDWR);
      try {
        for (let i = 0; i < 20; i++) {
          const ring = new Ring({ wait, entries: 16 });
          const ops = Array.from(
            { length: 100 },
            (_, k) => ring.write(fd, new Uint8Array(512).fill(k), k * 4096),
          );
          if (i % 2 === 0) await Promise.all(ops); // else close with them still in flight
          const t0 = performance.now();
          await bounded(ring.close(), 3000, "close after a burst");
          for (const r of await Promise.all(ops)) assert.ok(r === 512 || r === -ECANCELED, `${r}`);
          assert.ok(performance.now() - t0 < 1500, `close took ${performance.now() - t0} ms`);
        }
      } finally {
        libc().close(fd);
      }
    });
  });
}

test("uring engine: pread/pwrite/sync/zero/punch with errors mapped like the thread engine", async () => {
  await withFile(64 * 1024, async (path) => {
    const ring = new Ring({ entries: 4 });
    try {
      for (const shortcuts of [true, false]) {
        const e = new UringFileEngine(path, { writable: true, ring, shortcuts });
        try {
          const data = new Uint8Array(200_000).map((_, i) => (i * 13) & 0xff);
          await e.pwrite(data, 5000);
          assert.equal(e.length(), 205_000);
          const back = new Uint8Array(data.length + 1000);
          assert.equal(await e.pread(back, 5000), data.length, "short read at end of file");
          assert.deepEqual(back.subarray(0, data.length), data);
          await e.sync();
          await e.zeroRange(8192, 4096);
          await e.punchHole(65536, 65536);
          const part = new Uint8Array(4096);
          assert.equal(await e.pread(part, 8192), 4096);
          assert.ok(part.every((b) => b === 0));
          assert.equal(await e.pread(part, 65536), 4096);
          assert.ok(part.every((b) => b === 0));
          assert.equal(e.seekData(65536), 131072);
          assert.equal(e.seekHole(65536), 65536);
          e.truncate(100_000);
          assert.equal(e.length(), 100_000);
          assert.equal(await e.pread(new Uint8Array(10), 200_000), 0);
        } finally {
          e.close();
        }
      }
      const ro = new UringFileEngine(path, { writable: false, ring, shortcuts: false });
      try {
        const err = await ro.pwrite(new Uint8Array(10), 4096).then(() => undefined, (x) => x);
        assert.ok(err instanceof BlockError, String(err));
        assert.equal(err.errno, EBADF);
        assert.match(
          err.message,
          new RegExp(`^pwrite '${path}' at 4096\\+10: Bad file descriptor`),
        );
        const e2 = await ro.sync().then(() => undefined, (x) => x);
        assert.equal(e2, undefined, "fdatasync of a read-only fd is allowed");
      } finally {
        ro.close();
      }
    } finally {
      await bounded(ring.close(), 3000, "ring.close()");
    }
  });
});

test("uring engine: O_DIRECT without the bounce layer rejects a misaligned buffer with EINVAL", async () => {
  await withFile(1 << 20, async (path) => {
    const ring = new Ring();
    const e = new UringFileEngine(path, { writable: true, direct: true, ring });
    try {
      const raw = new Uint8Array(3 * 4096);
      const addr = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(raw)));
      const pad = (4096 - (addr % 4096)) % 4096;
      const misaligned = raw.subarray(pad + 1, pad + 4096);
      const err = await e.pread(misaligned, 0).then(() => undefined, (x) => x);
      assert.ok(err instanceof BlockError, String(err));
      assert.equal(err.errno, EINVAL);
      assert.match(err.message, /^pread '.*' at 0\+4095: Invalid argument/);
    } finally {
      e.close();
      await bounded(ring.close(), 3000, "ring.close()");
    }
  }, true);
});

test("O_DIRECT engine over io_uring: unaligned, concurrent, overlapping writes keep every byte", async () => {
  await withFile(4 << 20, async (path) => {
    const ring = new Ring({ entries: 8 });
    const e = new DirectFileEngine(path, true, {
      inner: (fd) => new UringFileEngine(path, { writable: true, direct: true, fd, ring }),
    });
    try {
      assert.equal(e.alignment, probeDirectAlignment(e.fd));
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 300; i++) writes.push(e.pwrite(new Uint8Array([i % 250 + 1]), 3 + i * 7));
      await Promise.all(writes);
      const back = new Uint8Array(2200);
      assert.equal(await e.pread(back, 0), 2200);
      for (let i = 0; i < 300; i++) assert.equal(back[3 + i * 7], i % 250 + 1, `byte ${3 + i * 7}`);
      const data = new Uint8Array(100_000).map((_, i) => (i * 31) & 0xff);
      await e.pwrite(data, (1 << 20) - 1234);
      await e.sync();
      const got = new Uint8Array(100_000);
      assert.equal(await e.pread(got, (1 << 20) - 1234), got.length);
      assert.deepEqual(got, data);
      // What went through O_DIRECT is what a buffered reader sees.
      const file = await Deno.readFile(path);
      assert.deepEqual(file.subarray((1 << 20) - 1234, (1 << 20) - 1234 + data.length), data);
    } finally {
      e.close();
      await bounded(ring.close(), 3000, "ring.close()");
    }
  });
});

test("openFileEngine: aio selects the engine; io_uring engines share one ring", async () => {
  await withFile(1 << 20, async (path) => {
    const threads = openFileEngine(path, { writable: true, aio: "threads" });
    assert.ok(threads instanceof ThreadFileEngine);
    threads.close();
    assert.ok(openFileEngine(path, { writable: true }) instanceof ThreadFileEngine, "default");

    const a = openFileEngine(path, { writable: true, aio: "io_uring" });
    const b = openFileEngine(path, { writable: false, aio: "auto" });
    const c = openFileEngine(path, { writable: true, aio: "io_uring", direct: true });
    try {
      assert.ok(a instanceof UringFileEngine);
      assert.ok(b instanceof UringFileEngine);
      assert.ok(c instanceof DirectFileEngine);
      await a.pwrite(new Uint8Array(5000).fill(9), 100);
      await a.sync();
      const got = new Uint8Array(5000);
      assert.equal(await b.pread(got, 100), 5000);
      assert.ok(got.every((x) => x === 9));
      assert.equal(await c.pread(got, 100), 5000);
      assert.ok(got.every((x) => x === 9));
      await c.pwrite(new Uint8Array(10).fill(7), 99);
      assert.equal(await b.pread(got.subarray(0, 12), 98), 12);
      assert.deepEqual([...got.subarray(0, 12)], [0, ...new Array(10).fill(7), 9]);
    } finally {
      a.close();
      b.close();
      c.close();
    }
    await bounded(sharedRingClosed(), 3000, "closing the shared ring");
  });
});

test("uring engine: close with a write still queued lets it land in its own file", async () => {
  await withFile(64 * 1024, async (path) => {
    const other = `${path}.other`;
    await Deno.writeFile(other, new Uint8Array(8192));
    const ring = new Ring();
    try {
      const e = new UringFileEngine(path, { writable: true, ring, shortcuts: false });
      const fd = e.fd;
      const data = new Uint8Array(8192).fill(0xc3);
      const write = e.pwrite(data, 0);
      e.close();
      // Were the descriptor closed now, this open would get its number and the write.
      const reuse = openFile(other, O_RDWR);
      try {
        await write;
        assert.notEqual(reuse, fd, "the engine's fd stayed open until its write completed");
      } finally {
        libc().close(reuse);
      }
      assert.ok((await Deno.readFile(path)).subarray(0, 8192).every((b) => b === 0xc3));
      assert.ok((await Deno.readFile(other)).every((b) => b === 0));
    } finally {
      await bounded(ring.close(), 3000, "ring.close()");
    }
  });
});

test("ring: offsets and lengths above 4 GiB reach the kernel whole", async () => {
  const G4 = 2 ** 32;
  await withFile(G4 + (1 << 20), async (path) => {
    const fd = openFile(path, O_RDWR);
    const check = new ThreadFileEngine(path, { writable: false });
    try {
      await withRing({ wait: "enter" }, async (ring) => {
        const data = new Uint8Array(4096).map((_, i) => i % 251);
        assert.equal(await ring.write(fd, data, G4 + 12345), 4096);
        const got = new Uint8Array(4096);
        assert.equal(await check.pread(got, G4 + 12345), 4096);
        assert.deepEqual(got, data);
        assert.equal(await check.pread(got, 12345), 4096);
        assert.ok(got.every((b) => b === 0), "nothing landed at the offset modulo 2^32");
        // fallocate carries its length in the address field: 4 GiB + 1 MiB of zero range.
        const zero = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        assert.equal(await ring.fallocate(fd, zero, 0, G4 + (1 << 20)), 0);
        assert.equal(await ring.read(fd, got, G4 + 12345), 4096);
        assert.ok(got.every((b) => b === 0), "zeroed past 4 GiB");
      });
    } finally {
      check.close();
      libc().close(fd);
    }
  });
});

Deno.test("inline writes back off 16 ms after an isolated slow write, up to 1 s while they recur", () => {
  const b = new InlineWriteBackoff();
  assert.ok(b.allows(0));
  b.record(0, 0.5); // fast: nothing changes
  assert.ok(b.allows(1));
  b.record(10, 12); // slow (2 ms): off for 16 ms
  assert.ok(!b.allows(27));
  assert.ok(b.allows(28));
  b.record(100, 102); // again within 2 s: 32 ms
  assert.ok(!b.allows(133));
  assert.ok(b.allows(134));
  let t = 200;
  for (let i = 0; i < 10; i++) {
    b.record(t, t + 2);
    t += 1500;
  }
  // Capped at 1 s.
  const last = t - 1500 + 2;
  assert.ok(!b.allows(last + 999));
  assert.ok(b.allows(last + 1000));
  // A slow write long after the last one starts over at 16 ms.
  b.record(last + 10_000, last + 10_002);
  assert.ok(b.allows(last + 10_002 + 16));
  assert.ok(!b.allows(last + 10_002 + 15));
});
