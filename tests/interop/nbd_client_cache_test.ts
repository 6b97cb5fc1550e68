/**
 * The nbd protocol driver's block-status cache (lib/block/protocols/nbd.ts): one data region
 * learned with a look-ahead REQ_ONE query, as qemu caches data regions of protocol nodes.
 *
 * What it shows, against a real qemu-nbd origin whose requests are traced: small extent queries
 * inside a dense region reach the origin a few times instead of once each; after TRIM or
 * WRITE_ZEROES through the device the next answer comes from the origin and shows the hole; and
 * under a random workload of writes, trims, zeroes and small queries every answer equals
 * `qemu-img map` of the origin image at that moment.
 */

import assert from "node:assert/strict";
import { openNbdProtocol } from "../../lib/block/protocols/nbd.ts";
import { type BlockDevice, ExtentList } from "../../lib/block/types.ts";
import { makeSparseImage, MiB, patternBytes, runOk, withTempDir } from "./_harness.ts";

const ctxRW = { writable: true, warn: (m: string) => console.error(m) };
const SIZE = 16 * MiB;

/** qemu-nbd on `image` with its request decoding traced to a file. */
async function startOrigin(dir: string, image: string) {
  const socket = `${dir}/origin.sock`;
  const trace = `${dir}/trace.log`;
  const child = new Deno.Command("qemu-nbd", {
    args: [
      ...["-k", socket, "-f", "raw", "-t", "--discard=unmap"],
      ...["-T", `nbd_co_receive_request_decode_type,file=${trace}`, image],
    ],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  for (let i = 0; i < 200; i++) {
    try {
      (await Deno.connect({ transport: "unix", path: socket })).close();
      break;
    } catch {
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  return {
    opts: { "server.type": "unix", "server.path": socket },
    /** BLOCK_STATUS requests the origin has decoded so far. */
    blockStatusCount: async () => {
      const text = await Deno.readTextFile(trace).catch(() => "");
      return text.split("\n").filter((l) => l.includes("(block status)")).length;
    },
    stop: async () => {
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

type Run = [number, boolean, boolean]; // length, data, zero

function merge(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    const last = out.at(-1);
    if (last && last[1] === r[1] && last[2] === r[2]) last[0] += r[0];
    else if (r[0] > 0) out.push([...r]);
  }
  return out;
}

async function deviceRuns(d: BlockDevice, offset: number, length: number): Promise<Run[]> {
  const el = new ExtentList(100_000);
  await d.extents(offset, length, el);
  const runs: Run[] = [];
  for (let i = 0; i < el.pairs.length; i += 2) {
    const f = el.pairs[i + 1]!;
    runs.push([el.pairs[i]!, (f & 1) === 0, (f & 2) !== 0]);
  }
  return merge(runs);
}

/** `qemu-img map` of the image, cut to `[offset, offset + length)`. */
async function mapRuns(image: string, offset: number, length: number): Promise<Run[]> {
  const r = await runOk(["qemu-img", "map", "-U", "-f", "raw", "--output=json", image]);
  const entries = JSON.parse(r.stdout) as {
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
  }[];
  const end = offset + length;
  return merge(entries.map((e): Run => {
    const a = Math.max(e.start, offset);
    const b = Math.min(e.start + e.length, end);
    return [Math.max(0, b - a), e.data, e.zero];
  }));
}

Deno.test("nbd client cache: small queries in a dense region reach the origin a few times", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/disk.raw`;
    await makeSparseImage(image, SIZE, [{ offset: MiB, length: 8 * MiB, fill: "random" }]);
    const origin = await startOrigin(dir, image);
    let dev: BlockDevice | undefined;
    try {
      dev = await openNbdProtocol(origin.opts, ctxRW);
      const d = dev;
      const before = await origin.blockStatusCount();
      for (let i = 0; i < 200; i++) {
        const off = MiB + ((i * 7919) % 2000) * 4096; // inside the data region
        assert.deepEqual(await deviceRuns(d, off, 4096), [[4096, true, false]], `at ${off}`);
      }
      const asked = (await origin.blockStatusCount()) - before;
      assert.ok(asked >= 1 && asked <= 4, `${asked} BLOCK_STATUS requests for 200 queries`);

      // TRIM through the device: the next query goes to the origin and shows the hole.
      await d.trim(4 * MiB, MiB, {});
      const t0 = await origin.blockStatusCount();
      assert.deepEqual(await deviceRuns(d, 4 * MiB, 4096), await mapRuns(image, 4 * MiB, 4096));
      assert.equal((await deviceRuns(d, 4 * MiB, 4096))[0]?.[1], false, "trimmed: no data");
      assert.ok((await origin.blockStatusCount()) > t0, "answered from a stale cache");

      // Same for WRITE_ZEROES (unmapping: --discard=unmap, no NO_HOLE).
      await d.pread(new Uint8Array(4096), 6 * MiB); // re-learn a data region first
      await deviceRuns(d, 6 * MiB, 4096);
      await d.zero(6 * MiB, MiB, {});
      assert.deepEqual(await deviceRuns(d, 6 * MiB, MiB), await mapRuns(image, 6 * MiB, MiB));
      // A region outside the cached one: holes are never cached.
      const h0 = await origin.blockStatusCount();
      await deviceRuns(d, 12 * MiB, 4096);
      await deviceRuns(d, 12 * MiB, 4096);
      assert.equal((await origin.blockStatusCount()) - h0, 2, "hole queries are not cached");
    } finally {
      await dev?.close();
      await origin.stop();
    }
  });
});

Deno.test("nbd client cache: answers equal qemu-img map under writes, trims and zeroes", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/disk.raw`;
    await makeSparseImage(image, SIZE, [
      { offset: 0, length: 3 * MiB, fill: "random", seed: 5 },
      { offset: 7 * MiB, length: 64 * 1024, fill: 0x33 },
      { offset: 10 * MiB, length: 4 * MiB, fill: "random", seed: 6 },
    ]);
    const origin = await startOrigin(dir, image);
    let dev: BlockDevice | undefined;
    try {
      dev = await openNbdProtocol(origin.opts, ctxRW);
      const d = dev;
      let x = 77;
      const rand = (n: number) => {
        x ^= x << 13;
        x >>>= 0;
        x ^= x >>> 17;
        x ^= x << 5;
        x >>>= 0;
        return x % n;
      };
      const counts = { query: 0, write: 0, trim: 0, zero: 0 };
      for (let i = 0; i < 120; i++) {
        const len = 4096 * (1 + rand(rand(3) === 0 ? 512 : 16));
        const off = 4096 * rand((SIZE - len) / 4096);
        const op = rand(8);
        if (op < 4) {
          const want = await mapRuns(image, off, len);
          assert.deepEqual(await deviceRuns(d, off, len), want, `step ${i}: ${len} at ${off}`);
          counts.query++;
        } else if (op < 6) {
          await d.pwrite(patternBytes(len, i + 1), off, {});
          await d.flush();
          counts.write++;
        } else if (op < 7) {
          await d.trim(off, len, {});
          counts.trim++;
        } else {
          await d.zero(off, len, {});
          counts.zero++;
        }
      }
      assert.ok(Object.values(counts).every((n) => n >= 5), JSON.stringify(counts));
      assert.deepEqual(await deviceRuns(d, 0, SIZE), await mapRuns(image, 0, SIZE));
    } finally {
      await dev?.close();
      await origin.stop();
    }
  });
});
