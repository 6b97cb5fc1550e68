/**
 * A qcow2 image left dirty by a crash with lazy_refcounts=on: a read-write export repairs the
 * refcounts before writing (as qemu-nbd does), a read-only one leaves the file alone; either way
 * the data reads back as qemu-nbd serves it.
 *
 * @module
 */

import assert from "node:assert/strict";
import { run, runOk, type ServerKind, sha256File, withServer, withTempDir } from "./_harness.ts";

/** A lazy-refcount image with writes whose refcounts never reached the disk. */
async function makeDirty(path: string): Promise<void> {
  await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "16M"]);
  // qemu-io's `abort` kills it without closing: the dirty bit stays and refcounts are stale.
  await run([
    "qemu-io",
    "-f",
    "qcow2",
    "-c",
    "write -P 1 0 3M",
    "-c",
    "write -P 2 8M 64k",
    "-c",
    "abort",
    path,
  ]);
  const check = await run(["qemu-img", "check", path]);
  assert.equal(check.code, 2, `the image should be corrupt before repair: ${check.stdout}`);
}

async function serveAndWrite(kind: ServerKind, dir: string, img: string): Promise<string> {
  return await withServer({ kind, dir, image: img, args: ["-t", "-f", "qcow2"] }, async (s) => {
    const w = await run([
      "qemu-io",
      "-f",
      "raw",
      s.uri,
      ...["write -P 3 5M 100k", "read -P 1 0 3M", "read -P 2 8M 64k"].flatMap((c) => ["-c", c]),
    ]);
    assert.equal(w.code, 0, w.stdout + w.stderr);
    assert.doesNotMatch(w.stdout, /fail|mismatch/i);
    return s.stderr;
  });
}

Deno.test("qcow2 dirty image: read-write export repairs refcounts like qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const ours = `${dir}/ours.qcow2`, theirs = `${dir}/theirs.qcow2`;
    await makeDirty(ours);
    await makeDirty(theirs);
    const log = await serveAndWrite("denbd", dir, ours);
    await serveAndWrite("qemu-nbd", dir, theirs);
    const check = await run(["qemu-img", "check", ours]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    const info = JSON.parse((await runOk(["qemu-img", "info", "--output=json", ours])).stdout);
    // qemu-img reports the flag only while it is set.
    assert.notEqual(info["format-specific"].data["dirty-flag"], true);
    const cmp = await run(["qemu-img", "compare", ours, theirs]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    assert.match(log, /Repaired \d+ refcount/);
  });
});

Deno.test("qcow2 dirty image: a read-only export reads it and changes nothing", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/ro.qcow2`;
    await makeDirty(img);
    const before = await sha256File(img);
    await withServer({ dir, image: img, args: ["-r", "-t", "-f", "qcow2"] }, async (s) => {
      const r = await runOk(["qemu-io", "-r", "-f", "raw", s.uri, "-c", "read -P 1 0 3M"]);
      assert.doesNotMatch(r.stdout, /fail|mismatch/i);
    });
    assert.equal(await sha256File(img), before);
  });
});
