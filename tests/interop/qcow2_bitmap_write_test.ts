/**
 * -B on writable qcow2 exports, compared with qemu-nbd 7.2: bitmaps are flagged in use while
 * the server runs, writes / write-zeroes / discards mark enabled bitmaps (the export shows it),
 * and on clean exit they are stored back: in_use cleared, `qemu-img check` clean, and a later
 * read-only export shows the same dirty extents as qemu's.
 *
 * @module
 */

import assert from "node:assert/strict";
import { run, runOk, type ServerKind, withServer, withTempDir } from "./_harness.ts";

interface BitmapInfo {
  name: string;
  flags: string[];
}

async function bitmapsOf(img: string): Promise<BitmapInfo[]> {
  const r = await runOk(["qemu-img", "info", "-U", "--output=json", img]);
  const info = JSON.parse(r.stdout);
  return (info["format-specific"]?.data?.bitmaps ?? []).map((b: BitmapInfo) => ({
    name: b.name,
    flags: b.flags,
  }));
}

async function dirtyMap(uri: string, name: string): Promise<string> {
  return (await runOk(["nbdinfo", `--map=qemu:dirty-bitmap:${name}`, uri])).stdout;
}

/** One server's whole story on its own copy of the image. */
async function story(kind: ServerKind, dir: string): Promise<Record<string, unknown>> {
  const img = `${dir}/${kind}.qcow2`;
  await runOk(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"]);
  await runOk(["qemu-img", "bitmap", "--add", "-g", "65536", img, "b0"]);
  await runOk(["qemu-img", "bitmap", "--add", "-g", "512", img, "b1"]);
  await runOk(["qemu-img", "bitmap", "--add", img, "off"]);
  await runOk(["qemu-img", "bitmap", "--disable", img, "off"]);
  await runOk(["qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 4k", img]);
  const out: Record<string, unknown> = {};
  const args = ["-t", "-f", "qcow2", "--discard=unmap", "-B", "b0", "-B", "b1", "-B", "off"];
  await withServer({ kind, dir, image: img, args }, async (server) => {
    out.whileOpen = await bitmapsOf(img);
    const w = await run([
      "qemu-io",
      "-f",
      "raw",
      server.uri,
      ...["write -P 9 2M 3000", "write -z 3M 64k", "discard 5M 128k", "write -P 3 7000 1"]
        .flatMap((c) => ["-c", c]),
    ]);
    assert.equal(w.code, 0, w.stdout + w.stderr);
    for (const b of ["b0", "b1", "off"]) out[`live ${b}`] = await dirtyMap(server.uri, b);
  });
  const check = await run(["qemu-img", "check", img]);
  assert.equal(check.code, 0, `${kind}: ${check.stdout}${check.stderr}`);
  out.afterClose = await bitmapsOf(img);
  for (const b of ["b0", "b1", "off"]) {
    await withServer({
      kind: "qemu-nbd",
      dir,
      image: img,
      args: ["-r", "-t", "-f", "qcow2", "-B", b],
    }, async (s) => {
      out[`stored ${b}`] = await dirtyMap(s.uri, b);
    });
  }
  return out;
}

Deno.test("qcow2 -B on a writable export: marking, in_use and store on close as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const ours = await story("denbd", dir);
    const theirs = await story("qemu-nbd", dir);
    assert.deepEqual(ours, theirs);
    // The comparison would be empty if nothing were marked: make sure something was.
    assert.match(String(ours["stored b1"]), /dirty/);
    assert.deepEqual((ours.whileOpen as BitmapInfo[]).map((b) => b.flags.includes("in-use")), [
      true,
      true,
      true,
    ]);
  });
});
