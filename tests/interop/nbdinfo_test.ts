/**
 * nbdinfo against the server under test: export metadata (--json), listing (--list) and the
 * allocation map (--map) of a sparse raw image.
 */

import assert from "node:assert/strict";
import { makeSparseImage, MiB, runOk, withServer, withTempDir } from "./_harness.ts";

interface NbdinfoExport {
  "export-name": string;
  description?: string;
  uri: string;
  contexts: string[];
  is_read_only: boolean;
  is_rotational: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
  "export-size": number;
}

interface NbdinfoJson {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: NbdinfoExport[];
}

/** 4 MiB: hole, 1 MiB of 0xaa at 1 MiB, hole, 64 KiB of random data at 3 MiB, hole. */
async function sparseImage(dir: string): Promise<string> {
  const img = `${dir}/sparse.img`;
  await makeSparseImage(img, 4 * MiB, [
    { offset: 1 * MiB, length: 1 * MiB, fill: 0xaa },
    { offset: 3 * MiB, length: 64 * 1024, fill: "random" },
  ]);
  return img;
}

Deno.test("nbdinfo --json reports size, flags, block sizes, contexts, name and description", async () => {
  await withTempDir(async (dir) => {
    const image = await sparseImage(dir);
    await withServer(
      {
        dir,
        image,
        args: ["-f", "raw", "-t", "-x", "disk0", "-D", "test export"],
        exportName: "disk0",
      },
      async (server) => {
        const r = await runOk(["nbdinfo", "--json", server.uri]);
        const info = JSON.parse(r.stdout) as NbdinfoJson;
        assert.equal(info.protocol, "newstyle-fixed");
        assert.equal(info.TLS, false);
        assert.equal(info.structured, true);
        assert.equal(info.exports.length, 1);
        const e = info.exports[0]!;
        assert.equal(e["export-name"], "disk0");
        assert.equal(e.description, "test export");
        assert.equal(e["export-size"], 4 * MiB);
        assert.deepEqual(e.contexts, ["base:allocation"]);
        assert.deepEqual(
          {
            ro: e.is_read_only,
            rot: e.is_rotational,
            cache: e.can_cache,
            df: e.can_df,
            fastZero: e.can_fast_zero,
            flush: e.can_flush,
            fua: e.can_fua,
            multiConn: e.can_multi_conn,
            trim: e.can_trim,
            zero: e.can_zero,
          },
          {
            ro: false,
            rot: false,
            cache: true,
            df: true,
            fastZero: true,
            flush: true,
            fua: true,
            multiConn: false,
            trim: true,
            zero: true,
          },
        );
        assert.equal(e.block_size_minimum, 1);
        assert.equal(e.block_size_preferred, 4096);
        assert.equal(e.block_size_maximum, 32 * MiB);
      },
    );
  });
});

Deno.test("nbdinfo --json on a read-only export with -e 2: read-only, multi-conn, no write flags", async () => {
  await withTempDir(async (dir) => {
    const image = await sparseImage(dir);
    await withServer({ dir, image, args: ["-f", "raw", "-t", "-r", "-e", "2"] }, async (server) => {
      const e = (JSON.parse((await runOk(["nbdinfo", "--json", server.uri])).stdout) as NbdinfoJson)
        .exports[0]!;
      assert.equal(e.is_read_only, true);
      assert.equal(e.can_multi_conn, true);
      assert.equal(e.can_trim, false);
      assert.equal(e.can_zero, false);
      assert.equal(e.can_fast_zero, false);
      assert.equal(e.can_flush, true);
      assert.equal(e.can_fua, true);
      assert.equal(e.can_df, true);
      assert.equal(e.can_cache, true);
    });
  });
});

Deno.test("nbdinfo --list shows the one export with its name and description", async () => {
  await withTempDir(async (dir) => {
    const image = await sparseImage(dir);
    await withServer(
      { dir, image, args: ["-f", "raw", "-t", "-x", "listed", "-D", "a described export"] },
      async (server) => {
        const text = (await runOk(["nbdinfo", "--list", server.uriFor("")])).stdout;
        assert.match(text, /export="listed":/);
        assert.match(text, /description: a described export/);
        assert.match(text, /export-size: 4194304/);
        const json = JSON.parse(
          (await runOk(["nbdinfo", "--list", "--json", server.uriFor("")])).stdout,
        ) as NbdinfoJson;
        assert.deepEqual(
          json.exports.map((e) => [e["export-name"], e.description]),
          [["listed", "a described export"]],
        );
      },
    );
  });
});

Deno.test("nbdinfo --map shows holes and data of a sparse image", async () => {
  await withTempDir(async (dir) => {
    const image = await sparseImage(dir);
    await withServer({ dir, image, args: ["-f", "raw", "-t"] }, async (server) => {
      const text = (await runOk(["nbdinfo", "--map", server.uri])).stdout;
      const rows = text.trim().split("\n").map((l) => l.trim().split(/\s+/));
      assert.deepEqual(rows, [
        ["0", String(1 * MiB), "3", "hole,zero"],
        [String(1 * MiB), String(1 * MiB), "0", "data"],
        [String(2 * MiB), String(1 * MiB), "3", "hole,zero"],
        [String(3 * MiB), "65536", "0", "data"],
        [String(3 * MiB + 65536), String(MiB - 65536), "3", "hole,zero"],
      ]);
      const totals = (await runOk(["nbdinfo", "--map", "--totals", server.uri])).stdout;
      assert.match(totals, /^\s*1114112\s+26\.6%\s+0\s+data$/m);
    });
  });
});
