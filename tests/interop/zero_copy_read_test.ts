/**
 * Large reads (64 KiB to 32 MiB), byte for byte, from the server under test and from qemu-nbd on
 * copies of the same raw image (tests/interop/_large_reads.py): aligned and unaligned offsets,
 * ranges across hole/data edges of a sparse image, ranges ending exactly at the export's end
 * where the file's size is a multiple of neither 4096 nor 512 (the export is padded with zeros
 * to 512, as qemu-nbd does), with and without structured replies, with and without DF; the
 * structured chunk lists must match qemu-nbd's, and a DF reply must be one chunk. Also with
 * `-o OFFSET` and `-r`, and a whole-image nbdcopy compared with `cmp`. The safety net of the
 * zero-copy (sendfile) read path.
 */

import assert from "node:assert/strict";
import {
  type Extent,
  makeSparseImage,
  MiB,
  run,
  runOk,
  runPython,
  Server,
  SERVER_KIND,
  withTempDir,
} from "./_harness.ts";

const KiB = 1024;
const SCRIPT = decodeURIComponent(new URL("./_large_reads.py", import.meta.url).pathname);

const MODES = [
  { structured: true, df: false },
  { structured: true, df: true },
  { structured: false, df: false },
];

interface Summary {
  sizes: number[][];
  reads: number;
  bytes: number;
  mismatches: unknown[];
  chunkDiffs: unknown[];
  dfMultiChunk: unknown[];
  structuredSeen: boolean[][];
  dfSeen: boolean[][];
}

interface ImageDef {
  readonly name: string;
  readonly size: number;
  readonly extents: readonly Extent[];
}

/** 41 MiB + 1234 bytes (a multiple of neither 512 nor 4096), holes between data extents. */
const SPARSE: ImageDef = {
  name: "sparse",
  size: 41 * MiB + 1234,
  extents: [
    { offset: 0, length: 300 * KiB, fill: "random", seed: 1 },
    { offset: 5 * MiB + 777, length: MiB + 3, fill: "random", seed: 2 },
    { offset: 20 * MiB, length: MiB, fill: "random", seed: 3 },
    { offset: 33 * MiB + 4096, length: 64 * KiB, fill: 0x7e },
    // Data up to the file's last byte.
    { offset: 41 * MiB - 70_000, length: 70_000 + 1234, fill: "random", seed: 4 },
  ],
};

/** 3 MiB + 1536 bytes (a multiple of 512, not of 4096), all data. */
const DENSE512: ImageDef = {
  name: "dense512",
  size: 3 * MiB + 1536,
  extents: [{ offset: 0, length: 3 * MiB + 1536, fill: "random", seed: 5 }],
};

/** Exported size as qemu-nbd computes it for a raw file: rounded up to 512. */
function exportSize(img: ImageDef, offset: number): number {
  return Math.ceil((img.size - offset) / 512) * 512;
}

async function compareLargeReads(
  img: ImageDef,
  args: readonly string[],
  lengths: readonly number[],
  structuredTailGuard = false,
): Promise<void> {
  await withTempDir(async (dir) => {
    const file = `${dir}/${img.name}.img`;
    await makeSparseImage(file, img.size, img.extents);
    const copy = `${dir}/${img.name}-ref.img`;
    await runOk(["cp", "--sparse=always", file, copy]);
    const oIdx = args.indexOf("-o");
    const offset = oIdx < 0 ? 0 : Number(args[oIdx + 1]);
    const boundaries = [
      ...img.extents.flatMap((e) => [e.offset, e.offset + e.length]),
      img.size,
    ].map((b) => b - offset).filter((b) => b > 0);
    const common = ["-f", "raw", "-t", "-e", "0", ...args];
    const ref = await Server.start({ dir, image: copy, args: common, kind: "qemu-nbd" });
    try {
      const got = await Server.start({ dir, image: file, args: common });
      try {
        const summary = await runPython<Summary>(
          await Deno.readTextFile(SCRIPT),
          [JSON.stringify({
            ref: ref.uri,
            got: got.uri,
            file,
            fileOffset: offset,
            lengths,
            boundaries,
            modes: MODES,
            structuredTailGuard: structuredTailGuard
              ? (got.kind === "qemu-nbd" ? "skip" : "got")
              : null,
          })],
          { timeoutMs: 120_000 },
        );
        const label = `${SERVER_KIND} ${img.name} ${args.join(" ")}`;
        console.log(`${label}: ${summary.reads} reads, ${Math.round(summary.bytes / MiB)} MiB`);
        const size = exportSize(img, offset);
        assert.deepEqual(summary.sizes, MODES.map(() => [size, size]));
        assert.deepEqual(summary.structuredSeen, MODES.map((m) => [m.structured, m.structured]));
        assert.deepEqual(summary.dfSeen, MODES.map((m) => [m.structured, m.structured]));
        assert.deepEqual(summary.mismatches, []);
        assert.deepEqual(summary.dfMultiChunk, []);
        assert.deepEqual(summary.chunkDiffs, []);
        assert.ok(summary.reads >= 20 * MODES.length, `only ${summary.reads} reads`);

        // The whole export through nbdcopy, from both servers, against the file's bytes.
        const want = `${dir}/want.raw`;
        const bytes = new Uint8Array(size);
        bytes.set((await Deno.readFile(file)).subarray(offset));
        await Deno.writeFile(want, bytes);
        for (const [name, s] of [["ref", ref], ["got", got]] as const) {
          // nbdcopy reads with structured replies: qemu-nbd aborts on the tail (see below).
          if (structuredTailGuard && s.kind === "qemu-nbd") continue;
          const out = `${dir}/copy-${name}.raw`;
          await runOk(["nbdcopy", s.uri, out], { timeoutMs: 60_000 });
          const cmp = await run(["cmp", want, out]);
          assert.equal(cmp.code, 0, `nbdcopy from ${name} (${s.kind}): ${cmp.stdout}${cmp.stderr}`);
        }
      } finally {
        await got.stop();
      }
    } finally {
      await ref.stop();
    }
  });
}

const SMALLER = [64 * KiB, 100_000, 256 * KiB, MiB];
const ALL = [...SMALLER, 32 * MiB];

Deno.test("zero-copy reads: sparse image, 64K..32M, structured or not, DF or not", () =>
  compareLargeReads(SPARSE, [], ALL));

Deno.test("zero-copy reads: sparse image, -r", () =>
  compareLargeReads(SPARSE, ["-r"], [...SMALLER, 8 * MiB]));

// qemu-nbd 7.2 aborts on a structured read of the last bytes of an export whose -o is not a
// multiple of 512 (assertion `pnum && pnum <= size - progress` in nbd_co_send_sparse_read), so
// with -o 4097 structured reads of the tail go to denbd alone, compared with the file only (and
// nbdcopy copies from denbd only); -o 1536 reads the tail from both in every mode.
Deno.test("zero-copy reads: sparse image, -o 4097 (unaligned offset)", () =>
  compareLargeReads(SPARSE, ["-o", "4097"], SMALLER, true));

Deno.test("zero-copy reads: sparse image, -o 1536 (512- but not 4096-aligned)", () =>
  compareLargeReads(SPARSE, ["-o", "1536"], SMALLER));

Deno.test("zero-copy reads: sparse image, -o 1M -r", () =>
  compareLargeReads(SPARSE, ["-o", String(MiB), "-r"], SMALLER));

Deno.test("zero-copy reads: dense image of 3M + 1536 bytes, ending at its end", () =>
  compareLargeReads(DENSE512, [], SMALLER));

Deno.test("zero-copy reads: dense image of 3M + 1536 bytes, -o 512 -r", () =>
  compareLargeReads(DENSE512, ["-o", "512", "-r"], SMALLER));
