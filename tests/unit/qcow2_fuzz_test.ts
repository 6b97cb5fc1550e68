/**
 * Seeded mutation fuzzing of small qcow2 images: header, L1, L2 and compressed bytes are
 * corrupted, then the image is opened and read (data, base:allocation, allocation-depth).
 * Every operation must either succeed or throw a BlockError, within a time limit.
 */

import assert from "node:assert/strict";
import { type BlockDevice, BlockError, ExtentList } from "../../lib/block/types.ts";
import { openImage, qemuIo, run } from "./_qcow2_helpers.ts";

const MUTATIONS = Number(Deno.env.get("QCOW2_FUZZ_MUTATIONS") ?? 500);
const TIME_BUDGET_MS = Number(Deno.env.get("QCOW2_FUZZ_MS") ?? 40_000);
const OP_TIMEOUT_MS = 5_000;
const READ_LIMIT = 8 << 20;

/** Small deterministic PRNG (LCG), so a failure names a reproducible seed. */
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

/** Run `op`; a BlockError is an accepted outcome, anything else fails the test. */
async function tolerate(what: string, op: () => Promise<unknown>): Promise<boolean> {
  try {
    await withTimeout(what, op());
    return true;
  } catch (e) {
    if (e instanceof BlockError) return false;
    throw new Error(`${what}: ${e instanceof Error ? e.stack : String(e)}`);
  }
}

async function exercise(dev: BlockDevice, r: () => number, what: string): Promise<void> {
  const size = Math.min(dev.size, READ_LIMIT);
  const buf = new Uint8Array(256 * 1024);
  for (let off = 0; off < size; off += buf.length) {
    const n = Math.min(buf.length, size - off);
    await tolerate(`${what} pread ${off}`, () => dev.pread(buf.subarray(0, n), off));
  }
  // A few reads anywhere in a (possibly mutated, huge) virtual size.
  for (let i = 0; i < 4 && dev.size > 0; i++) {
    const off = Math.floor(r() * Math.max(0, dev.size - 4096));
    await tolerate(
      `${what} pread ${off}`,
      () => dev.pread(new Uint8Array(Math.min(4096, dev.size)), off),
    );
  }
  await tolerate(`${what} extents`, () => dev.extents(0, size, new ExtentList(1 << 16)));
  await tolerate(`${what} depth`, () => dev.allocationDepth!(0, size, new ExtentList(1 << 16)));
}

Deno.test("qcow2 fuzz: mutated images never crash, hang or throw non-BlockErrors", async () => {
  const dir = await Deno.makeTempDir({ prefix: "qcow2-fuzz-" });
  try {
    const seeds: Array<{ name: string; regions: Array<[number, number]> }> = [];
    const mk = async (name: string, opts: string[], io: string[]) => {
      await run("qemu-img", ["create", "-q", "-f", "qcow2", ...opts, `${dir}/${name}`, "2M"]);
      if (io.length) await qemuIo(`${dir}/${name}`, io);
    };
    await run("qemu-img", ["create", "-q", "-f", "raw", `${dir}/src.raw`, "2M"]);
    await qemuIo(`${dir}/src.raw`, ["write -P 0x11 0 512k", "write -P 0x22 1M 64k"], "raw");
    await mk("v3.qcow2", [], ["write -P 1 0 100k", "write -z 256k 64k", "write -P 2 1M 4k"]);
    await mk("v2.qcow2", ["-o", "compat=0.10,cluster_size=4k"], ["write -P 3 0 20k"]);
    await mk("extl2.qcow2", ["-o", "extended_l2=on,cluster_size=16k"], [
      "write -P 4 0 3k",
      "write -z 8k 2k",
    ]);
    await mk("backed.qcow2", ["-b", "src.raw", "-F", "raw"], ["write -P 5 64k 4k"]);
    await mk("snap.qcow2", [], ["write -P 6 0 64k"]);
    await run("qemu-img", ["snapshot", "-c", "s1", `${dir}/snap.qcow2`]);
    await run("qemu-img", ["convert", "-c", "-O", "qcow2", `${dir}/src.raw`, `${dir}/zlib.qcow2`]);
    await run("qemu-img", [
      "convert",
      "-c",
      "-O",
      "qcow2",
      "-o",
      "compression_type=zstd,cluster_size=4k",
      `${dir}/src.raw`,
      `${dir}/zstd.qcow2`,
    ]);
    for (const name of ["v3", "v2", "extl2", "backed", "snap", "zlib", "zstd"]) {
      const b = await Deno.readFile(`${dir}/${name}.qcow2`);
      const v = new DataView(b.buffer);
      const cs = 1 << v.getUint32(20);
      const l1 = Number(v.getBigUint64(40));
      const l2 = Number(v.getBigUint64(l1) & 0x00fffffffffffe00n);
      const regions: Array<[number, number]> = [[0, 512], [l1, 64]];
      if (l2 > 0) regions.push([l2, 512]);
      regions.push([
        Math.min(b.length - 1, l2 + cs),
        Math.max(1, Math.min(4096, b.length - l2 - cs)),
      ]);
      const snaps = Number(v.getBigUint64(64));
      if (snaps > 0) regions.push([snaps, 64]);
      seeds.push({ name, regions });
    }

    const start = Date.now();
    let opened = 0, done = 0;
    for (let i = 0; i < MUTATIONS && Date.now() - start < TIME_BUDGET_MS; i++) {
      const r = rng(1000 + i);
      const seed = seeds[i % seeds.length]!;
      const orig = await Deno.readFile(`${dir}/${seed.name}.qcow2`);
      const b = orig.slice();
      const edits = 1 + Math.floor(r() * 4);
      for (let k = 0; k < edits; k++) {
        const [at, len] = seed.regions[Math.floor(r() * seed.regions.length)]!;
        const pos = Math.min(b.length - 1, at + Math.floor(r() * len));
        const how = r();
        if (how < 0.4) b[pos] = b[pos]! ^ (1 << Math.floor(r() * 8));
        else if (how < 0.8) b[pos] = Math.floor(r() * 256);
        else for (let j = 0; j < 8 && pos + j < b.length; j++) b[pos + j] = Math.floor(r() * 256);
      }
      const path = `${dir}/m-${seed.name}.qcow2`;
      await Deno.writeFile(path, b);
      const what = `mutation ${i} of ${seed.name}`;
      let dev: BlockDevice | undefined;
      await tolerate(`${what} open`, async () => {
        dev = await openImage(path, "qcow2");
      });
      if (dev !== undefined) {
        opened++;
        await exercise(dev, r, what);
        await tolerate(`${what} close`, () => dev!.close());
      }
      done++;
    }
    console.log(`fuzz: ${done} mutations, ${opened} opened`);
    assert.ok(done >= 50, `only ${done} mutations ran`);
    assert.ok(opened > 0, "no mutated image opened at all");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
