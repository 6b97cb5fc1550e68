/**
 * With --discard=unmap, host clusters that a TRIM or an unmapping WRITE_ZEROES frees are punched
 * out of the qcow2 file, as qemu-nbd does (qcow2's pass-discard-request); with the default
 * --discard=ignore nothing is. Compared with qemu-nbd 7.2 on copies of the same image: the host
 * file's data/hole layout (`qemu-img map -f raw` of the .qcow2 file itself), the guest data and a
 * clean `qemu-img check`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { run, runOk, type ServerKind, withServer, withTempDir } from "./_harness.ts";

async function makeImage(path: string): Promise<void> {
  await runOk(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"]);
  await runOk(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", path]);
}

/** Data/hole runs of the host file, as qemu-img sees the file itself. */
async function hostLayout(path: string): Promise<string> {
  const r = await runOk(["qemu-img", "map", "-f", "raw", "--output=json", path]);
  return JSON.stringify(
    (JSON.parse(r.stdout) as { start: number; length: number; data: boolean }[]).map((
      e,
    ) => [e.start, e.length, e.data]),
  );
}

async function serveAndDiscard(
  kind: ServerKind,
  dir: string,
  img: string,
  discard: string,
): Promise<void> {
  await withServer(
    { kind, dir, image: img, args: ["-t", "-f", "qcow2", `--discard=${discard}`] },
    async (s) => {
      const r = await run([
        "qemu-io",
        "-f",
        "raw",
        s.uri,
        ...["discard 1M 2M", "write -z -u 5M 1M", "flush"].flatMap((c) => ["-c", c]),
      ]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.doesNotMatch(r.stdout + r.stderr, /fail/i);
    },
  );
}

for (const discard of ["unmap", "ignore"]) {
  Deno.test(`qcow2 --discard=${discard}: freed clusters in the file as qemu-nbd leaves them`, async () => {
    await withTempDir(async (dir) => {
      const ours = `${dir}/ours.qcow2`, theirs = `${dir}/theirs.qcow2`;
      // Made the same way rather than copied: a copy may fill or keep the holes qemu-img leaves
      // inside metadata clusters, and the layouts would differ before any server ran.
      await makeImage(ours);
      await makeImage(theirs);
      assert.equal(await hostLayout(ours), await hostLayout(theirs));
      const before = await hostLayout(ours);
      await serveAndDiscard("denbd", dir, ours, discard);
      await serveAndDiscard("qemu-nbd", dir, theirs, discard);

      const layout = await hostLayout(ours);
      assert.equal(layout, await hostLayout(theirs), "host file layout differs from qemu-nbd's");
      // The comparison is only meaningful if unmap really punched something and ignore did not.
      if (discard === "unmap") assert.notEqual(layout, before, "nothing was punched");
      else assert.equal(layout, before);

      for (const img of [ours, theirs]) {
        const check = await run(["qemu-img", "check", img]);
        assert.equal(check.code, 0, check.stdout + check.stderr);
      }
      const cmp = await run(["qemu-img", "compare", ours, theirs]);
      assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    });
  });
}
