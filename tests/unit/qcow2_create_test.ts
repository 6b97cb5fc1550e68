/**
 * Creating empty qcow2 images (lib/block/qcow2/create.ts), with qemu-img 7.2 as the oracle:
 * byte-identical output to `qemu-img create` across cluster sizes, refcount widths, extended L2
 * and backing files; `qemu-img check`/`info` on the result; qemu-io can write into it; reads
 * through an overlay return the backing data; the `-s` temp-file rule and the overlay qemu-nbd
 * itself creates; bad parameters.
 */

import assert from "node:assert/strict";
import { relative } from "node:path";
import {
  createQcow2,
  createTempOverlay,
  planQcow2,
  type Qcow2CreateOptions,
  tempOverlayDir,
  tempOverlayPath,
} from "../../lib/block/qcow2/create.ts";
import { parseHeader } from "../../lib/block/qcow2/header.ts";
import { BlockError, Errno } from "../../lib/block/types.ts";
import { openFileEngine } from "../../lib/io/engine_factory.ts";
import { firstDiff, qemuIo, run } from "./_qcow2_helpers.ts";

const dir = await Deno.makeTempDir({ prefix: "qcow2-create-" });
const GiB = 2 ** 30;
const MiB = 2 ** 20;

/** Run a command, returning its exit code and stdout (no throw). */
async function exec(cmd: string, args: string[]): Promise<{ code: number; out: string }> {
  const o = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  return { code: o.code, out: new TextDecoder().decode(o.stdout) };
}

/** `qemu-img create` with the same options; `-u` so the backing file need not exist. */
async function qemuCreate(path: string, o: Qcow2CreateOptions): Promise<void> {
  const opts = [
    `cluster_size=${o.clusterSize ?? 65536}`,
    `refcount_bits=${o.refcountBits ?? 16}`,
    `extended_l2=${o.extendedL2 ? "on" : "off"}`,
    `lazy_refcounts=${o.lazyRefcounts ? "on" : "off"}`,
  ];
  const backing = o.backingFile === undefined
    ? []
    : ["-u", "-b", o.backingFile, "-F", o.backingFormat ?? "raw"];
  await run("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    opts.join(","),
    ...backing,
    path,
    String(o.size),
  ]);
}

/** `qemu-img check`: must exit 0 and report no errors and no leaks. */
async function assertClean(path: string, what: string): Promise<void> {
  const r = await exec("qemu-img", ["check", "--output=json", path]);
  assert.equal(r.code, 0, `${what}: qemu-img check exit ${r.code}: ${r.out}`);
  const j = JSON.parse(r.out);
  assert.equal(j["check-errors"], 0, what);
  assert.equal(j.corruptions ?? 0, 0, what);
  assert.equal(j.leaks ?? 0, 0, what);
}

/** `qemu-img info` minus the fields that name or measure the particular file. */
async function info(path: string): Promise<Record<string, unknown>> {
  const j = JSON.parse(await run("qemu-img", ["info", "--output=json", "-U", path]));
  delete j.filename;
  delete j["actual-size"];
  return j;
}

function label(o: Qcow2CreateOptions): string {
  return JSON.stringify(o);
}

// Small images in every geometry, the refcount-table growth path (512 B clusters with wide
// refcounts need hundreds of refcount blocks and a bigger table), sizes that need rounding.
const MATRIX: Qcow2CreateOptions[] = [];
for (const clusterSize of [512, 4096, 65536, 2 * MiB]) {
  for (const refcountBits of [1, 16, 64]) {
    for (const size of [0, 1000, 3 * GiB]) MATRIX.push({ size, clusterSize, refcountBits });
  }
}
MATRIX.push(
  // Also pins the refcount table's 50% headroom (other factors change the layout). qemu-img
  // itself needs ~2.5 s here: its allocator retries once per new refcount block.
  { size: 16 * GiB, clusterSize: 512, refcountBits: 64 },
  { size: 100 * GiB, clusterSize: 1024, refcountBits: 32 },
  { size: GiB, clusterSize: 2048, refcountBits: 8 },
  { size: GiB, clusterSize: 16384, extendedL2: true },
  { size: 2 ** 50, clusterSize: 2 * MiB, extendedL2: true, refcountBits: 2 },
  { size: 10 * MiB, lazyRefcounts: true },
  { size: 10 * MiB, backingFile: "base.raw", backingFormat: "raw" },
  { size: 10 * MiB, clusterSize: 512, backingFile: "/abs/base.qcow2", backingFormat: "qcow2" },
  { size: 10 * MiB, clusterSize: 4096, backingFile: "x".repeat(1023), backingFormat: "raw" },
);

Deno.test("qcow2 create: byte-identical to qemu-img create across the option matrix", async () => {
  for (const o of MATRIX) {
    const mine = `${dir}/mine.qcow2`, ref = `${dir}/ref.qcow2`;
    const plan = await createQcow2(mine, o);
    await qemuCreate(ref, o);
    const a = await Deno.readFile(mine), b = await Deno.readFile(ref);
    assert.equal(a.length, b.length, `${label(o)}: file length`);
    assert.equal(firstDiff(a, b), -1, `${label(o)}: first differing byte`);
    assert.equal(plan.fileLength, a.length, label(o));

    // Read back with the driver's own decoder.
    const h = parseHeader(a.subarray(0, plan.clusterSize));
    assert.equal(h.version, 3);
    assert.equal(h.clusterSize, o.clusterSize ?? 65536, label(o));
    assert.equal(h.size, Math.ceil(o.size / 512) * 512, label(o));
    assert.equal(h.refcountOrder, Math.log2(o.refcountBits ?? 16), label(o));
    assert.equal(h.extendedL2, o.extendedL2 ?? false, label(o));
    assert.equal(h.compatible, o.lazyRefcounts ? 1n : 0n, label(o));
    assert.equal(h.backingFile, o.backingFile, label(o));
    assert.equal(h.backingFormat, o.backingFormat, label(o));
    assert.equal(h.l1Size, h.l1NeededEntries, label(o));
    assert.equal(h.l1TableOffset, plan.l1TableOffset, label(o));
    assert.equal(h.refcountTableOffset, plan.refcountTableOffset, label(o));
    assert.equal(h.refcountTableClusters, plan.refcountTableClusters, label(o));
    // qemu drops the feature name table from clusters of 4 KiB and less.
    assert.equal(h.featureNames.length, plan.clusterSize > 4096 ? 8 : 0, label(o));
  }
});

Deno.test("qcow2 create: qemu-img check/info agree, qemu-io writes into it", async () => {
  const cases: Qcow2CreateOptions[] = [
    { size: 64 * MiB },
    { size: 1000, clusterSize: 512, refcountBits: 1 },
    { size: 8 * GiB, clusterSize: 512, refcountBits: 64 },
    { size: GiB, clusterSize: 2 * MiB, refcountBits: 64, extendedL2: true },
    { size: 5 * MiB, clusterSize: 16384, extendedL2: true, lazyRefcounts: true },
  ];
  for (const o of cases) {
    const mine = `${dir}/io.qcow2`, ref = `${dir}/io-ref.qcow2`;
    await createQcow2(mine, o);
    await qemuCreate(ref, o);
    await assertClean(mine, label(o));
    const got = await info(mine);
    assert.deepEqual(got, await info(ref), label(o));
    assert.equal(got["virtual-size"], Math.ceil(o.size / 512) * 512, label(o));
    assert.equal(got["cluster-size"], o.clusterSize ?? 65536, label(o));

    const len = Math.min(65536, Math.ceil(o.size / 512) * 512);
    await qemuIo(mine, [`write -P 0x5a 0 ${len}`, `read -P 0x5a 0 ${len}`]);
    await assertClean(mine, `${label(o)} after a write`);
    const map = JSON.parse(await run("qemu-img", ["map", "--output=json", mine]));
    assert.equal(map[0].data, true, `${label(o)}: the written range is allocated`);
  }
});

Deno.test("qcow2 create: reads through an overlay return the backing data", async () => {
  const raw = `${dir}/base.raw`, q = `${dir}/base.qcow2`;
  const data = new Uint8Array(3 * MiB + 512);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 12)) & 0xff;
  await Deno.writeFile(raw, data);
  await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, q]);
  for (const [backing, fmt] of [[raw, "raw"], [q, "qcow2"]] as const) {
    for (const clusterSize of [512, 65536]) {
      const top = `${dir}/top.qcow2`;
      await createQcow2(top, {
        size: data.length,
        clusterSize,
        backingFile: backing,
        backingFormat: fmt,
      });
      await assertClean(top, `${fmt} ${clusterSize}`);
      const r = await exec("qemu-img", ["compare", "-f", "qcow2", "-F", fmt, top, backing]);
      assert.equal(r.code, 0, `overlay over ${fmt} (${clusterSize}): ${r.out}`);
      const j = JSON.parse(await run("qemu-img", ["info", "--output=json", top]));
      assert.equal(j["backing-filename"], backing);
      assert.equal(j["backing-filename-format"], fmt);
      // A write lands in the overlay only.
      await qemuIo(top, ["write -P 0x11 1M 4k"]);
      const after = await exec("qemu-img", ["compare", "-f", "qcow2", "-F", fmt, top, backing]);
      assert.equal(after.code, 1, after.out);
      assert.equal(firstDiff(await Deno.readFile(raw), data), -1, "backing untouched");
    }
  }
});

Deno.test("qcow2 create: a FileEngine target is truncated and rewritten", async () => {
  const p = `${dir}/engine.qcow2`, ref = `${dir}/engine-ref.qcow2`;
  await Deno.writeFile(p, new Uint8Array(3 * MiB).fill(0xee));
  const o: Qcow2CreateOptions = { size: 20 * MiB, clusterSize: 4096, refcountBits: 4 };
  const file = openFileEngine(p, { writable: true });
  try {
    await createQcow2(file, o);
  } finally {
    file.close();
  }
  await qemuCreate(ref, o);
  const a = await Deno.readFile(p), b = await Deno.readFile(ref);
  assert.equal(a.length, b.length);
  assert.equal(firstDiff(a, b), -1);
  await assertClean(p, "engine");
});

Deno.test("qcow2 create: bad parameters fail with qemu's wording and write nothing", async () => {
  const cases: Array<[Qcow2CreateOptions, number, RegExp]> = [
    [
      { size: MiB, clusterSize: 1000 },
      Errno.EINVAL,
      /^Cluster size must be a power of two between 512 and 2048k/,
    ],
    [{ size: MiB, clusterSize: 256 }, Errno.EINVAL, /^Cluster size must be a power of two/],
    [{ size: MiB, clusterSize: 4 * MiB }, Errno.EINVAL, /^Cluster size must be a power of two/],
    [
      { size: MiB, refcountBits: 3 },
      Errno.EINVAL,
      /^Refcount width must be a power of two and may not exceed 64 bits/,
    ],
    [{ size: MiB, refcountBits: 128 }, Errno.EINVAL, /^Refcount width must be/],
    [{ size: MiB, refcountBits: 0 }, Errno.EINVAL, /^Refcount width must be/],
    [
      { size: MiB, clusterSize: 8192, extendedL2: true },
      Errno.EINVAL,
      /^Extended L2 entries are only supported with cluster sizes of at least 16384 bytes$/,
    ],
    [
      { size: MiB, backingFormat: "raw" },
      Errno.EINVAL,
      /^Backing format cannot be used without backing file$/,
    ],
    [
      { size: MiB, backingFile: "b.img" },
      Errno.EINVAL,
      /^Backing file specified without backing format$/,
    ],
    [
      { size: MiB, backingFile: "x".repeat(1024), backingFormat: "raw" },
      Errno.EINVAL,
      /^Could not assign backing file/,
    ],
    [
      { size: MiB, clusterSize: 512, backingFile: "x".repeat(400), backingFormat: "raw" },
      Errno.ENOSPC,
      /^Could not assign backing file/,
    ],
    [
      { size: MiB, backingFile: "b", backingFormat: "a-format-name-too-long" },
      Errno.EINVAL,
      /^Backing format/,
    ],
    [
      { size: 200 * GiB, clusterSize: 512 },
      Errno.EFBIG,
      /^The image size is too large for file format 'qcow2' \(try using a larger cluster size\)$/,
    ],
    [{ size: 2 ** 62 }, Errno.EFBIG, /^The image size is too large for file format 'qcow2'$/],
    [{ size: -1 }, Errno.EINVAL, /^Invalid image size -1/],
    [{ size: 1.5 }, Errno.EINVAL, /^Invalid image size 1.5/],
  ];
  for (const [i, [o, errno, re]] of cases.entries()) {
    const p = `${dir}/bad-${i}.qcow2`;
    await assert.rejects(createQcow2(p, o), (e: unknown) => {
      assert.ok(e instanceof BlockError, label(o));
      assert.equal(e.errno, errno, `${label(o)}: ${e.message}`);
      assert.match(e.message, re, label(o));
      return true;
    });
    await assert.rejects(Deno.stat(p), Deno.errors.NotFound, `${label(o)}: no file left behind`);
  }
  // qemu-img agrees these are errors, and that the limits just inside are fine.
  const r = await exec("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "cluster_size=512",
    `${dir}/x.qcow2`,
    "200G",
  ]);
  assert.notEqual(r.code, 0);
  assert.equal(planQcow2({ size: 128 * GiB, clusterSize: 512 }).l1Size, 4 * 1024 * 1024);
  assert.equal(planQcow2({ size: 1000 }).size, 1024);
  // 512 B clusters with a backing format: 112 + 16 + 8 header bytes leave 376 for the name.
  const fits = planQcow2({
    size: MiB,
    clusterSize: 512,
    backingFile: "y".repeat(376),
    backingFormat: "raw",
  });
  assert.equal(fits.chunks[0]!.data.subarray(136, 512).every((b) => b === 0x79), true);
  assert.throws(
    () =>
      planQcow2({
        size: MiB,
        clusterSize: 512,
        backingFile: "y".repeat(377),
        backingFormat: "raw",
      }),
    (e: unknown) => e instanceof BlockError && e.errno === Errno.ENOSPC,
  );
});

Deno.test("qcow2 create: -s temp directory rule (qemu 7.2 create_tmp_file)", () => {
  const env = (v: string | undefined) => (n: string) => n === "TMPDIR" ? v : undefined;
  assert.equal(tempOverlayDir(env(undefined)), "/var/tmp");
  assert.equal(tempOverlayDir(env("")), "/var/tmp");
  assert.equal(tempOverlayDir(env("/tmp")), "/var/tmp");
  assert.equal(tempOverlayDir(env("/tmp/")), "/tmp/");
  assert.equal(tempOverlayDir(env("/scratch")), "/scratch");
});

Deno.test("qcow2 create: tempOverlayPath reserves a private vl.XXXXXX file", async () => {
  const env = (n: string) => n === "TMPDIR" ? dir : undefined;
  const a = await tempOverlayPath(env), b = await tempOverlayPath(env);
  try {
    assert.notEqual(a, b);
    for (const p of [a, b]) {
      assert.match(p, new RegExp(`^${dir}/vl\\.[A-Z0-9]{6}$`));
      const st = await Deno.stat(p);
      assert.equal(st.size, 0);
      assert.equal(st.mode! & 0o777, 0o600);
    }
  } finally {
    await Deno.remove(a);
    await Deno.remove(b);
  }
  await assert.rejects(
    tempOverlayPath((n) => n === "TMPDIR" ? `${dir}/missing` : undefined),
    (e: unknown) =>
      e instanceof BlockError && e.errno === Errno.ENOENT &&
      e.message.startsWith(`Could not open temporary file '${dir}/missing/vl.`),
  );
});

Deno.test("qcow2 create: createTempOverlay matches the overlay qemu-nbd -s creates", async () => {
  const sub = await Deno.makeTempDir({ dir, prefix: "tmpdir-" });
  const img = `${dir}/snap.raw`;
  await Deno.writeFile(img, new Uint8Array(10 * MiB + 1000).fill(0x42));
  const sock = `${sub}/nbd.sock`;
  const child = new Deno.Command("qemu-nbd", {
    args: ["-f", "raw", "-s", "-k", sock, img],
    env: { TMPDIR: sub },
    stdout: "null",
    stderr: "null",
  }).spawn();
  let theirs: Uint8Array | undefined;
  try {
    // The overlay is unlinked at once; read it through the server's fd (a shell does the
    // reading: Deno wants --allow-all for /proc).
    const script = `for f in /proc/${child.pid}/fd/*; do case "$(readlink "$f")" in ` +
      `"${sub}"/vl.*" (deleted)") cat "$f"; exit 0;; esac; done; exit 1`;
    for (let i = 0; i < 200 && theirs === undefined; i++) {
      if (await Deno.stat(sock).catch(() => null)) {
        const o = await new Deno.Command("sh", { args: ["-c", script], stdout: "piped" }).output();
        if (o.success && o.stdout.length > 0) theirs = o.stdout;
      }
      if (theirs === undefined) await new Promise((r) => setTimeout(r, 25));
    }
  } finally {
    child.kill("SIGTERM");
    await child.status;
  }
  assert.ok(theirs, "found qemu-nbd's overlay");

  const env = (n: string) => n === "TMPDIR" ? sub : undefined;
  // qemu's overlay has no backing name in its header (the image is attached in memory).
  const plain = await createTempOverlay({ size: 10 * MiB + 1000, getenv: env });
  try {
    assert.ok(plain.startsWith(`${sub}/vl.`));
    assert.equal((await Deno.stat(plain)).mode! & 0o777, 0o600);
    const mine = await Deno.readFile(plain);
    assert.equal(mine.length, theirs.length);
    assert.equal(firstDiff(mine, theirs), -1);
  } finally {
    await Deno.remove(plain);
  }

  // Recording the backing file makes a self-contained chain (relative names made absolute).
  const withBacking = await createTempOverlay({
    size: 10 * MiB + 1000,
    backingFile: relative(Deno.cwd(), img),
    backingFormat: "raw",
    getenv: env,
  });
  try {
    await assertClean(withBacking, "overlay with backing");
    const j = JSON.parse(await run("qemu-img", ["info", "--output=json", withBacking]));
    assert.equal(j["backing-filename"], img);
    assert.equal(j["virtual-size"], 10 * MiB + 1024);
    // qemu sees the raw image as 10 MiB + 1024 too (whole sectors).
    const r = await exec("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", withBacking, img]);
    assert.equal(r.code, 0, r.out);
  } finally {
    await Deno.remove(withBacking);
  }
  // Failure leaves nothing behind.
  await assert.rejects(
    createTempOverlay({
      size: MiB,
      backingFile: "x",
      backingFormat: "a-format-name-too-long",
      getenv: env,
    }),
  );
  assert.deepEqual(
    [...Deno.readDirSync(sub)].map((e) => e.name).filter((n) => n.startsWith("vl.")),
    [],
  );
});

Deno.test("qcow2 create: cleanup", async () => {
  await Deno.remove(dir, { recursive: true });
});
