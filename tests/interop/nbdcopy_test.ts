/**
 * nbdcopy round trips through the server: export → file and file → export, compared by SHA-256,
 * over a unix socket and over TCP.
 */

import assert from "node:assert/strict";
import {
  makeDenseImage,
  makeSparseImage,
  MiB,
  runOk,
  sha256File,
  withServer,
  withTempDir,
} from "./_harness.ts";

for (const transport of ["unix", "tcp"] as const) {
  Deno.test(`nbdcopy export → file → export round trip keeps the bytes (${transport})`, async () => {
    await withTempDir(async (dir) => {
      // The source has data, holes and a run of zeroes, so sparse detection is exercised too.
      const image = `${dir}/src.img`;
      await makeSparseImage(image, 6 * MiB, [
        { offset: 0, length: MiB, fill: "random", seed: 3 },
        { offset: 2 * MiB, length: MiB, fill: 0 },
        { offset: 4 * MiB + 512, length: 300_000, fill: "random", seed: 5 },
      ]);
      const want = await sha256File(image);
      const copy = `${dir}/copy.img`;
      await withServer({ dir, image, transport, args: ["-f", "raw", "-t"] }, async (server) => {
        await runOk(["nbdcopy", server.uri, copy]);
      });
      assert.equal(await sha256File(copy), want, "export → file");

      // Now write different data into a fresh export and read the target file directly.
      const other = `${dir}/other.img`;
      await makeDenseImage(other, 6 * MiB, 11);
      const target = `${dir}/target.img`;
      await makeSparseImage(target, 6 * MiB, [{ offset: 0, length: 6 * MiB, fill: 0x55 }]);
      await withServer(
        { dir, image: target, transport, args: ["-f", "raw", "-t"] },
        async (server) => {
          await runOk(["nbdcopy", other, server.uri]);
          const back = `${dir}/back.img`;
          await runOk(["nbdcopy", server.uri, back]);
          assert.equal(await sha256File(back), await sha256File(other), "file → export → file");
        },
      );
      assert.equal(await sha256File(target), await sha256File(other), "file → export (on disk)");
    });
  });
}

Deno.test("nbdcopy with 4 connections to a multi-conn export (-e 0) copies exactly", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/src.img`;
    await makeDenseImage(image, 8 * MiB, 21);
    const target = `${dir}/dst.img`;
    await makeSparseImage(target, 8 * MiB);
    await withServer(
      { dir, image: target, args: ["-f", "raw", "-t", "-e", "0"] },
      async (server) => {
        await runOk(["nbdcopy", "-C", "4", "--request-size=262144", image, server.uri]);
      },
    );
    assert.equal(await sha256File(target), await sha256File(image));
  });
});
