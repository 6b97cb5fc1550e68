/**
 * -s/--snapshot compared with qemu-nbd 7.2: writes land in a temporary overlay that is unlinked
 * at once (nothing left in TMPDIR), the exported data and both block-status contexts match
 * qemu-nbd's after the same writes, and the image file is never modified.
 *
 * @module
 */

import assert from "node:assert/strict";
import { run, runOk, type ServerKind, sha256File, withServer, withTempDir } from "./_harness.ts";

/** What a client sees through a `-s` export after a fixed set of writes. */
async function observe(
  kind: ServerKind,
  dir: string,
  image: string,
  args: readonly string[],
): Promise<{ map: string; depth: string; data: string; tmpFiles: string[] }> {
  const tmp = `${dir}/tmp-${kind}`;
  await Deno.mkdir(tmp);
  return await withServer(
    { kind, dir, image, args: ["-t", "-s", "-A", ...args], env: { TMPDIR: tmp } },
    async (server) => {
      const w = await run([
        "qemu-io",
        "-f",
        "raw",
        server.uri,
        ...["write -P 0x99 512k 1M", "write -z -u 0 64k", "write -z 6M 8k", "flush"].flatMap(
          (c) => ["-c", c],
        ),
      ]);
      assert.equal(w.code, 0, w.stdout + w.stderr);
      assert.doesNotMatch(w.stdout + w.stderr, /fail/i);
      // qemu unlinks its vl.XXXXXX right after opening it; so must we.
      const tmpFiles: string[] = [];
      for await (const e of Deno.readDir(tmp)) tmpFiles.push(e.name);
      const map = (await runOk(["nbdinfo", "--map", server.uri])).stdout;
      const depth = (await runOk(["nbdinfo", "--map=qemu:allocation-depth", server.uri])).stdout;
      const raw = `${dir}/${kind}.raw`;
      await runOk(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, raw]);
      return { map, depth, data: await sha256File(raw), tmpFiles };
    },
  );
}

for (const format of ["qcow2", "raw"] as const) {
  Deno.test(`-s on a ${format} image: same data and maps as qemu-nbd, image untouched`, async () => {
    await withTempDir(async (dir) => {
      const image = `${dir}/img.${format}`;
      await runOk(["qemu-img", "create", "-q", "-f", format, image, "8M"]);
      await runOk([
        "qemu-io",
        "-f",
        format,
        "-c",
        "write -P 1 0 1M",
        "-c",
        "write -z 2M 1M",
        "-c",
        "write -P 2 5M 64k",
        image,
      ]);
      const before = await sha256File(image);
      const args = ["-f", format];
      const ours = await observe("denbd", dir, image, args);
      const theirs = await observe("qemu-nbd", dir, image, args);
      assert.deepEqual(ours.tmpFiles, [], "the overlay must be unlinked while the server runs");
      assert.deepEqual(theirs.tmpFiles, []);
      assert.equal(ours.map, theirs.map);
      assert.equal(ours.depth, theirs.depth);
      assert.equal(ours.data, theirs.data);
      assert.match(ours.depth, /backing depth 2/, "the image sits below the overlay");
      assert.equal(await sha256File(image), before, "-s must never modify the image");
    });
  });
}
