/**
 * A full filesystem: writes that do not fit are answered ENOSPC (qemu-io prints "No space left on
 * device", not a generic I/O error), the server keeps serving this and other clients, what was
 * written before reads back, and a qcow2 image stays consistent (`qemu-img check`: no corruption;
 * leaked clusters allowed, as qemu leaves them).
 *
 * The small filesystem is a tmpfs mounted for the test, which needs root; elsewhere the tests are
 * ignored (and say so in their names).
 *
 * @module
 */

import assert from "node:assert/strict";
import { run, runOk, withServer, withTempDir } from "./_harness.ts";

/** Mount a `sizeMiB` tmpfs at `dir`; false when this process may not. */
async function mountTmpfs(dir: string, sizeMiB: number): Promise<boolean> {
  await Deno.mkdir(dir, { recursive: true });
  const r = await run(["mount", "-t", "tmpfs", "-o", `size=${sizeMiB}M`, "tmpfs", dir]);
  return r.code === 0;
}

const CAN_MOUNT = await (async () => {
  const probe = await Deno.makeTempDir({ prefix: "denbd-mount-probe-" });
  try {
    if (!await mountTmpfs(probe, 1)) return false;
    await run(["umount", probe]);
    return true;
  } finally {
    await Deno.remove(probe, { recursive: true }).catch(() => {});
  }
})();

async function withSmallFs(sizeMiB: number, fn: (fs: string, dir: string) => Promise<void>) {
  await withTempDir(async (dir) => {
    const fs = `${dir}/fs`;
    assert.ok(await mountTmpfs(fs, sizeMiB), "mounting the tmpfs failed");
    try {
      await fn(fs, dir);
    } finally {
      await run(["umount", "-l", fs]);
    }
  });
}

function qio(uri: string, ...cmds: string[]) {
  return run(["qemu-io", "-f", "raw", uri, ...cmds.flatMap((c) => ["-c", c])], {
    timeoutMs: 60_000,
  });
}

for (const format of ["raw", "qcow2"] as const) {
  Deno.test({
    name: `ENOSPC on a full filesystem (${format})${CAN_MOUNT ? "" : " [needs root to mount]"}`,
    ignore: !CAN_MOUNT,
    async fn() {
      await withSmallFs(6, async (fs, dir) => {
        const img = `${fs}/img.${format}`;
        await runOk(["qemu-img", "create", "-q", "-f", format, img, "64M"]);
        await withServer({ dir, image: img, args: ["-t", "-e", "2", "-f", format] }, async (s) => {
          const ok = await qio(s.uri, "write -P 0x11 0 2M", "flush");
          assert.equal(ok.code, 0, ok.stdout + ok.stderr);
          assert.doesNotMatch(ok.stdout + ok.stderr, /failed/);

          // 8 MiB more cannot fit in what is left of the 6 MiB filesystem.
          const full = await qio(s.uri, "write -P 0x22 16M 8M", "flush");
          assert.match(full.stdout + full.stderr, /No space left on device/);
          assert.doesNotMatch(full.stdout + full.stderr, /Input\/output error/);

          // The server is still up, earlier data is intact, and overwriting allocated space
          // (which needs no new blocks) still works.
          const after = await qio(s.uri, "read -P 0x11 0 2M", "write -P 0x33 1M 4k", "flush");
          assert.equal(after.code, 0, after.stdout + after.stderr);
          assert.doesNotMatch(after.stdout + after.stderr, /fail|mismatch/i);
        });
        if (format === "qcow2") {
          const check = await run(["qemu-img", "check", img]);
          assert.ok(
            check.code === 0 || check.code === 3,
            `qemu-img check exit ${check.code}: ${check.stdout}${check.stderr}`,
          );
          assert.doesNotMatch(check.stdout, /^ERROR|corruptions? (were )?found/m);
        }
        const back = await run([
          "qemu-io",
          "-r",
          "-f",
          format,
          img,
          ...["read -P 0x11 0 1M", "read -P 0x33 1M 4k", "read -P 0x11 1028k 1020k"].flatMap((
            c,
          ) => ["-c", c]),
        ]);
        assert.equal(back.code, 0, back.stdout + back.stderr);
        assert.doesNotMatch(back.stdout, /fail|mismatch/i);
      });
    },
  });
}
