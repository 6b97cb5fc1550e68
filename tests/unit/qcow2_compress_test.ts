/**
 * qcow2 compressed writes (Qcow2Device.pwriteCompressed): qemu's alignment rules, bytewise
 * allocation (several compressed clusters share one host cluster), zlib and zstd images read
 * back by qemu-io, and refcounts qemu-img check accepts.
 */

import assert from "node:assert/strict";
import { openQcow2, type Qcow2Device } from "../../lib/block/qcow2/mod.ts";
import { BlockError } from "../../lib/block/types.ts";
import { openFileEngine } from "../../lib/io/engine_factory.ts";
import { openImage, run } from "./_qcow2_helpers.ts";

const C = 64 * 1024;

async function openWritable(path: string): Promise<Qcow2Device> {
  return await openQcow2(openFileEngine(path, { writable: true }), {
    openBacking: (p, f, c) => openImage(p, f, {}, c),
    writable: true,
  }) as Qcow2Device;
}

for (const type of ["zlib", "zstd"]) {
  Deno.test(`qcow2 compressed writes (${type}): shared host clusters, clean check, qemu-io reads`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "denbd-compress-" });
    try {
      const img = `${dir}/c.qcow2`;
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        `compression_type=${type}`,
        img,
        "1M",
      ]);
      const dev = await openWritable(img);
      try {
        const buf = new Uint8Array(8 * C);
        for (let c = 0; c < 8; c++) buf.fill(0x61 + c, c * C, (c + 1) * C);
        await dev.pwriteCompressed(buf, 0);
        await assert.rejects(
          () => dev.pwriteCompressed(buf.subarray(0, C), 512),
          (e) => e instanceof BlockError && e.errno === 22,
        );
        await assert.rejects(
          () => dev.pwriteCompressed(buf.subarray(0, 4096), 8 * C),
          (e) => e instanceof BlockError && e.errno === 22,
        );
        await assert.rejects(
          () => dev.pwriteCompressed(buf.subarray(0, C), 0),
          (e) => e instanceof BlockError && e.errno === 5,
        );
        const back = new Uint8Array(8 * C);
        await dev.pread(back, 0);
        assert.deepEqual(back, buf);
      } finally {
        await dev.close();
      }
      const check = JSON.parse(await run("qemu-img", ["check", "--output=json", img]));
      assert.equal(check["compressed-clusters"], 8);
      // Eight tiny streams share one host cluster: header, L1, refcount table and block, L2,
      // and one data cluster.
      assert.ok(check["image-end-offset"] <= 6 * C, `end ${check["image-end-offset"]}`);
      const io = await run("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        `read -P 0x61 0 ${C}`,
        "-c",
        `read -P 0x68 ${7 * C} ${C}`,
        img,
      ]);
      assert.doesNotMatch(io, /Pattern verification failed/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}
