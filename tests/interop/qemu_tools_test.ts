/**
 * qemu-img (compare, convert, map) and qemu-io (write, read -P, write -z, write -z -u, write -f,
 * discard) against the server under test, over nbd URIs.
 */

import assert from "node:assert/strict";
import {
  makeDenseImage,
  makeSparseImage,
  MiB,
  run,
  runOk,
  sha256File,
  withServer,
  withTempDir,
} from "./_harness.ts";

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

async function qemuImgMap(uri: string): Promise<MapEntry[]> {
  return JSON.parse((await runOk(["qemu-img", "map", "--output=json", "-f", "raw", uri])).stdout);
}

/** The map entry that covers `offset`. */
function entryAt(map: readonly MapEntry[], offset: number): MapEntry {
  const e = map.find((m) => m.start <= offset && offset < m.start + m.length);
  assert.ok(e, `no map entry covers ${offset}: ${JSON.stringify(map)}`);
  return e;
}

/** Runs qemu-io commands against a URI; returns the result (exit code 1 on a failed verify). */
function qemuIo(uri: string, cmds: readonly string[]) {
  return run(["qemu-io", "-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri]);
}

for (const transport of ["unix", "tcp"] as const) {
  Deno.test(`qemu-img compare and convert -O raw over the export (${transport})`, async () => {
    await withTempDir(async (dir) => {
      const image = `${dir}/a.img`;
      await makeSparseImage(image, 4 * MiB, [
        { offset: 512 * 1024, length: 700_000, fill: "random", seed: 9 },
        { offset: 3 * MiB, length: 4096, fill: 0x7f },
      ]);
      const reference = `${dir}/ref.img`;
      await Deno.copyFile(image, reference);
      const different = `${dir}/diff.img`;
      await Deno.copyFile(image, different);
      await runOk(["qemu-io", "-f", "raw", "-c", "write -P 0x01 3M 512", different]);

      await withServer(
        { dir, image, transport, args: ["-f", "raw", "-t", "-e", "0"] },
        async (server) => {
          const same = await run([
            "qemu-img",
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            reference,
            server.uri,
          ]);
          assert.equal(same.code, 0, same.stdout + same.stderr);
          assert.match(same.stdout, /Images are identical/);
          const diff = await run([
            "qemu-img",
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            different,
            server.uri,
          ]);
          assert.equal(diff.code, 1, diff.stdout + diff.stderr);
          assert.match(diff.stdout, /Content mismatch at offset 3145728!/);

          const out = `${dir}/out.img`;
          await runOk(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, out]);
          assert.equal(await sha256File(out), await sha256File(reference));
        },
      );
    });
  });
}

Deno.test("qemu-img map --output=json reports data and zero ranges", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, 4 * MiB, [{ offset: MiB, length: MiB, fill: 0xaa }]);
    await withServer({ dir, image, args: ["-f", "raw", "-t"] }, async (server) => {
      const map = await qemuImgMap(server.uri);
      assert.deepEqual(
        map.map((m) => [m.start, m.length, m.zero, m.data]),
        [[0, MiB, true, false], [MiB, MiB, false, true], [2 * MiB, 2 * MiB, true, false]],
      );
    });
  });
});

Deno.test("qemu-img convert into the export (file → export) then compare", async () => {
  await withTempDir(async (dir) => {
    const src = `${dir}/src.img`;
    await makeDenseImage(src, 3 * MiB, 5);
    const image = `${dir}/dst.img`;
    await makeSparseImage(image, 3 * MiB);
    await withServer({ dir, image, args: ["-f", "raw", "-t"] }, async (server) => {
      await runOk(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri]);
      const cmp = await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri]);
      assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    });
    assert.equal(await sha256File(image), await sha256File(src));
  });
});

Deno.test("qemu-io write, FUA write, write -z, write -z -u and read -P over the export", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, 4 * MiB, [{ offset: 0, length: MiB, fill: 0x11 }]);
    await withServer({ dir, image, args: ["-f", "raw", "-t"] }, async (server) => {
      const w = await qemuIo(server.uri, [
        "write -P 0x22 1M 64k",
        "write -f -P 0x33 1088k 64k",
        "write -P 0x44 5 1000", // unaligned
        "write -z 64k 64k",
        "write -z -u 256k 64k",
      ]);
      assert.equal(w.code, 0, w.stdout + w.stderr);
      const r = await qemuIo(server.uri, [
        "read -P 0x11 0 5",
        "read -P 0x44 5 1000",
        "read -P 0x11 1005 64531",
        "read -P 0 64k 64k",
        "read -P 0x11 128k 128k",
        "read -P 0 256k 64k",
        "read -P 0x11 320k 704k",
        "read -P 0x22 1M 64k",
        "read -P 0x33 1088k 64k",
        "read -P 0 1152k 2944k",
      ]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.doesNotMatch(r.stdout, /Pattern verification failed/);
      // A wrong pattern must fail, or the checks above prove nothing.
      const bad = await qemuIo(server.uri, ["read -P 0x22 0 512"]);
      assert.match(bad.stdout, /Pattern verification failed/);
      // Zeroed ranges read back as zero in the map too.
      const map = await qemuImgMap(server.uri);
      assert.equal(entryAt(map, 64 * 1024).zero, true);
      assert.equal(entryAt(map, 256 * 1024).zero, true);
      assert.equal(entryAt(map, 1024 * 1024).data, true);
    });
    // The data reached the file itself.
    const f = await Deno.readFile(image);
    assert.equal(f[MiB], 0x22);
    assert.equal(f[1088 * 1024 + 100], 0x33);
    assert.equal(f[5], 0x44);
    assert.equal(f[64 * 1024], 0);
  });
});

Deno.test("qemu-io discard with the default --discard=ignore leaves the data in place", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, 2 * MiB, [{ offset: 0, length: MiB, fill: 0x11 }]);
    await withServer({ dir, image, args: ["-f", "raw", "-t"] }, async (server) => {
      const d = await qemuIo(server.uri, ["discard 512k 64k"]);
      assert.equal(d.code, 0, d.stdout + d.stderr);
      assert.match(d.stdout, /discard 65536\/65536 bytes at offset 524288/);
      const r = await qemuIo(server.uri, ["read -P 0x11 512k 64k"]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.equal(entryAt(await qemuImgMap(server.uri), 512 * 1024).data, true);
    });
  });
});

Deno.test("qemu-io discard with --discard=unmap punches a hole", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, 2 * MiB, [{ offset: 0, length: MiB, fill: 0x11 }]);
    await withServer(
      { dir, image, args: ["-f", "raw", "-t", "--discard=unmap"] },
      async (server) => {
        const d = await qemuIo(server.uri, ["discard 512k 64k"]);
        assert.equal(d.code, 0, d.stdout + d.stderr);
        const map = await qemuImgMap(server.uri);
        const e = entryAt(map, 512 * 1024);
        assert.deepEqual([e.start, e.length, e.zero, e.data], [512 * 1024, 64 * 1024, true, false]);
        const r = await qemuIo(server.uri, ["read -P 0 512k 64k", "read -P 0x11 576k 448k"]);
        assert.equal(r.code, 0, r.stdout + r.stderr);
      },
    );
    // The file itself now has a hole there (fewer blocks than before the discard).
    const st = await Deno.stat(image);
    assert.ok(st.blocks !== null && st.blocks * 512 <= MiB - 64 * 1024, `blocks ${st.blocks}`);
  });
});

Deno.test("qemu-io writes to a read-only export fail and leave the file unchanged", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, MiB, [{ offset: 0, length: MiB, fill: 0x11 }]);
    const before = await sha256File(image);
    await withServer({ dir, image, args: ["-f", "raw", "-t", "-r"] }, async (server) => {
      // qemu-io opens read-write by default; -r makes it open read-only so it can connect at all.
      const r = await run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 4k", server.uri]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      const w = await qemuIo(server.uri, ["write -P 0x22 0 4k"]);
      assert.notEqual(w.code, 0, w.stdout + w.stderr);
    });
    assert.equal(await sha256File(image), before);
  });
});
