/**
 * Differential tests for qcow2 exports: the server under test and qemu-nbd 7.2 serve the same
 * qcow2 image (read-only, same arguments) side by side; the export must read identical to the
 * image (`qemu-img compare`) and every client view of it (nbdinfo --map for both metadata
 * contexts, qemu-img map, nbdinfo --json) must match qemu-nbd's. With DENBD_TEST_SERVER=qemu-nbd
 * both sides are qemu-nbd, which validates the tests themselves.
 *
 * The corpus (a few MiB per image) is built once in one temp dir by qemu-img / qemu-io; each case
 * is a step of one test so the corpus is made and removed once. Also here: images with a bad L1/L2
 * entry (the server must stay up for other clients) and a write to a writable qcow2 export
 * (refused while qcow2 writes are not implemented).
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  MiB,
  run,
  runOk,
  type RunResult,
  Server,
  SERVER_KIND,
  withServer,
  withServers,
  withTempDir,
} from "./_harness.ts";

/** qemu-io on an image file, output discarded; throws on failure. */
async function qio(img: string, cmds: readonly string[], fmt = "qcow2"): Promise<void> {
  await runOk(["qemu-io", "-f", fmt, ...cmds.flatMap((c) => ["-c", c]), img]);
}

/** qemu-img with the given arguments; throws on failure. */
async function qimg(...args: string[]): Promise<void> {
  await runOk(["qemu-img", ...args]);
}

/**
 * Builds the corpus in `dir`. Independent groups run in parallel (each group is sequential).
 * Layout notes are in the comments; src.raw is the shared raw source/backing file.
 */
async function buildCorpus(dir: string): Promise<void> {
  const p = (n: string) => `${dir}/${n}`;
  // 4 MiB raw source: [0,1M) 0x11, [2M,2M+64K) 0x22, one sector 0x33 at 3M+512, rest zeros.
  await qimg("create", "-q", "-f", "raw", p("src.raw"), "4M");
  await qio(p("src.raw"), [
    "write -P 0x11 0 1M",
    "write -P 0x22 2M 64k",
    "write -P 0x33 3146240 512",
  ], "raw");
  await Deno.mkdir(p("chain"));
  await Promise.all([
    (async () => {
      // v3 default (64 KiB clusters): data, zero clusters (plain and preallocated), discard,
      // a sub-cluster write.
      await qimg("create", "-q", "-f", "qcow2", p("v3.qcow2"), "4M");
      await qio(p("v3.qcow2"), [
        "write -P 0xaa 0 256k",
        "write -z 0 64k",
        "write -z -u 64k 64k",
        "discard 128k 64k",
        "write -z 1M 128k",
        "write -P 0xbb 2M 512",
        "write -P 0xcc 3M 64k",
        "discard 3M 32k",
      ]);
      // extended L2 over a qcow2 backing file (v3.qcow2): partial-cluster writes and
      // sub-cluster zeroes/discards in the overlay.
      await qimg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "v3.qcow2",
        "-F",
        "qcow2",
        p("extl2.qcow2"),
        "4M",
      );
      await qio(p("extl2.qcow2"), [
        "write -P 0x61 4k 2k",
        "write -z 8k 2k",
        "write -P 0x62 130k 6k",
        "discard 2M 64k",
        "write -P 0x63 1M 1k",
        "write -z 3M 4k",
      ]);
    })(),
    (async () => {
      // v2 (compat=0.10): write -z without backing becomes a discard.
      await qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", p("v2.qcow2"), "4M");
      await qio(p("v2.qcow2"), ["write -P 0xaa 0 192k", "write -z 64k 64k", "write -P 0xbb 1M 4k"]);
    })(),
    ...["512", "2M"].map(async (cs) => {
      const img = p(`cs-${cs}.qcow2`);
      await qimg("create", "-q", "-f", "qcow2", "-o", `cluster_size=${cs}`, img, "5M");
      await qio(img, [
        "write -P 0x5a 0 4k",
        "write -P 0x5b 1M 1",
        "write -z 2M 1M",
        "write -P 0x5c 4194816 1536",
      ]);
    }),
    qimg("convert", "-c", "-O", "qcow2", p("src.raw"), p("comp-zlib.qcow2")),
    qimg(
      "convert",
      "-c",
      "-O",
      "qcow2",
      "-o",
      "compression_type=zstd",
      p("src.raw"),
      p("comp-zstd.qcow2"),
    ),
    (async () => {
      // 3-deep chain in a subdirectory with relative backing names.
      const c = (n: string) => p(`chain/${n}`);
      await qimg("create", "-q", "-f", "qcow2", c("base.qcow2"), "4M");
      await qio(c("base.qcow2"), ["write -P 0xb0 0 1M", "write -P 0xb4 2M 128k"]);
      await qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", c("mid.qcow2"));
      await qio(c("mid.qcow2"), ["write -P 0xb1 512k 512k", "write -z 64k 64k"]);
      await qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", c("top.qcow2"));
      await qio(c("top.qcow2"), [
        "write -P 0xb2 768k 4k",
        "discard 0 64k",
        "write -P 0xb3 3M 64k",
        "write -z 2M 64k",
      ]);
    })(),
    (async () => {
      // raw backing file.
      await qimg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "src.raw",
        "-F",
        "raw",
        p("raw-backed.qcow2"),
      );
      await qio(p("raw-backed.qcow2"), ["write -P 0xcc 64k 4k", "write -z 2M 32k"]);
    })(),
    (async () => {
      // backing file shorter than the overlay: reads past its end are zeros.
      await qimg("create", "-q", "-f", "qcow2", p("short-base.qcow2"), "1M");
      await qio(p("short-base.qcow2"), ["write -P 0x5b 0 1M"]);
      await qimg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "short-base.qcow2",
        "-F",
        "qcow2",
        p("short-top.qcow2"),
        "4M",
      );
      await qio(p("short-top.qcow2"), ["write -P 0x5d 960k 128k"]);
    })(),
    (async () => {
      // external data files (plain and data_file_raw=on).
      await qimg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=extdata.data",
        p("extdata.qcow2"),
        "4M",
      );
      await qio(p("extdata.qcow2"), [
        "write -P 0xd1 0 64k",
        "write -z 1M 64k",
        "write -P 0xd3 2M 4k",
      ]);
      await qimg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=extraw.data,data_file_raw=on",
        p("extraw.qcow2"),
        "4M",
      );
      await qio(p("extraw.qcow2"), ["write -P 0xd2 64k 64k", "write -z 1M 64k"]);
    })(),
    (async () => {
      // internal snapshots s1 (ID 1) and s2 (ID 2), then more changes to the active layer.
      const img = p("snap.qcow2");
      await qimg("create", "-q", "-f", "qcow2", img, "4M");
      await qio(img, ["write -P 0x01 0 128k"]);
      await qimg("snapshot", "-c", "s1", img);
      await qio(img, ["write -P 0x02 64k 128k", "write -z 1M 64k"]);
      await qimg("snapshot", "-c", "s2", img);
      await qio(img, ["write -z 0 64k", "discard 128k 64k"]);
      await Promise.all([
        qimg("convert", "-l", "snapshot.name=s1", "-O", "raw", img, p("snap-s1.raw")),
        qimg("convert", "-l", "snapshot.id=2", "-O", "raw", img, p("snap-s2.raw")),
      ]);
    })(),
  ]);
}

/** One corpus export: the image, the server arguments and what it must read identical to. */
interface Case {
  readonly name: string;
  readonly image: string;
  readonly args: readonly string[];
  /** What `qemu-img compare` checks the export against (default: the image as qcow2). */
  readonly ref?: { readonly path: string; readonly fmt: "raw" | "qcow2" };
}

const RO = ["-r", "-A", "-t"];
const QC = [...RO, "-f", "qcow2"];

const CASES: readonly Case[] = [
  { name: "v3 64k data/zero/discard", image: "v3.qcow2", args: QC },
  { name: "v3 probed (no -f)", image: "v3.qcow2", args: RO },
  { name: "v2 compat=0.10", image: "v2.qcow2", args: QC },
  { name: "cluster_size=512", image: "cs-512.qcow2", args: QC },
  { name: "cluster_size=2M", image: "cs-2M.qcow2", args: QC },
  { name: "extended_l2 over qcow2 backing", image: "extl2.qcow2", args: QC },
  { name: "zlib compressed", image: "comp-zlib.qcow2", args: QC },
  { name: "zstd compressed", image: "comp-zstd.qcow2", args: QC },
  { name: "3-deep chain, relative names in subdir", image: "chain/top.qcow2", args: QC },
  { name: "3-deep chain probed (no -f)", image: "chain/top.qcow2", args: RO },
  { name: "raw backing file", image: "raw-backed.qcow2", args: QC },
  { name: "backing shorter than overlay", image: "short-top.qcow2", args: QC },
  { name: "external data file", image: "extdata.qcow2", args: QC },
  { name: "external data file, data_file_raw=on", image: "extraw.qcow2", args: QC },
  {
    name: "snapshot -l snapshot.name=s1",
    image: "snap.qcow2",
    args: [...QC, "-l", "snapshot.name=s1"],
    ref: { path: "snap-s1.raw", fmt: "raw" },
  },
  {
    name: "snapshot -l 2 (ID)",
    image: "snap.qcow2",
    args: [...QC, "-l", "2"],
    ref: { path: "snap-s2.raw", fmt: "raw" },
  },
  {
    name: "snapshot -l s1 (bare name)",
    image: "snap.qcow2",
    args: [...QC, "-l", "s1"],
    ref: { path: "snap-s1.raw", fmt: "raw" },
  },
  { name: "active layer of snapshotted image", image: "snap.qcow2", args: QC },
];

/** Everything compared between the two servers, as text. */
interface Views {
  readonly map: string;
  readonly depth: string;
  readonly qemuImgMap: string;
  readonly json: string;
}

/** Output of a client that must succeed, else a marker with its error (so it still diffs). */
function out(r: RunResult): string {
  return r.code === 0 ? r.stdout : `EXIT ${r.code}: ${r.stderr.trim()}`;
}

async function views(server: Server): Promise<Views> {
  const uri = server.uri;
  const [map, depth, qemuImgMap, info] = await Promise.all([
    run(["nbdinfo", "--map", uri]),
    run(["nbdinfo", "--map=qemu:allocation-depth", uri]),
    run(["qemu-img", "map", "--output=json", "-f", "raw", uri]),
    run(["nbdinfo", "--json", uri]),
  ]);
  let json = out(info);
  if (info.code === 0) {
    const j = JSON.parse(info.stdout);
    for (const e of j.exports ?? []) delete e.uri;
    json = JSON.stringify(j, null, 1);
  }
  return { map: out(map), depth: out(depth), qemuImgMap: out(qemuImgMap), json };
}

/** `qemu-img compare` of the export against the reference; "" when identical. */
async function compare(server: Server, ref: { path: string; fmt: string }): Promise<string> {
  const r = await run(["qemu-img", "compare", "-f", "raw", "-F", ref.fmt, server.uri, ref.path]);
  return r.code === 0 ? "" : `qemu-img compare exit ${r.code}: ${r.stdout.trim()} ${r.stderr}`;
}

/** Runs one case: both servers in parallel, all probes in parallel, all diffs in one failure. */
async function runCase(dir: string, c: Case): Promise<void> {
  const image = `${dir}/${c.image}`;
  const ref = c.ref === undefined
    ? { path: image, fmt: "qcow2" }
    : { path: `${dir}/${c.ref.path}`, fmt: c.ref.fmt };
  await withServers(
    [
      { dir, image, args: c.args, kind: SERVER_KIND },
      { dir, image, args: c.args, kind: "qemu-nbd" },
    ],
    async ([test, want]) => {
      const [cmpTest, cmpWant, got, exp] = await Promise.all([
        compare(test!, ref),
        compare(want!, ref),
        views(test!),
        views(want!),
      ]);
      // The reference side validates the corpus and the comparison itself.
      assert.equal(cmpWant, "", `qemu-nbd export differs from ${ref.path}`);
      const problems: string[] = [];
      if (cmpTest !== "") problems.push(`compare with ${ref.path}: ${cmpTest}`);
      for (const k of Object.keys(exp) as (keyof Views)[]) {
        if (got[k] !== exp[k]) {
          problems.push(`${k} differs\n--- ${SERVER_KIND}:\n${got[k]}\n--- qemu-nbd:\n${exp[k]}`);
        }
      }
      if (Deno.env.get("DENBD_DIFF_DUMP")) console.log(c.name, JSON.stringify(got));
      // Guard against probes that see nothing (e.g. an empty map would compare equal).
      assert.match(exp.map, /\d+\s+\d+\s+\d/, "nbdinfo --map printed no extents");
      assert.match(exp.depth, /\d+\s+\d+\s+\d/, "allocation-depth map printed no extents");
      assert.equal(
        problems.length,
        0,
        `${c.name} (${c.args.join(" ")}):\n${problems.join("\n")}\n${SERVER_KIND} stderr: ${
          test!.stderr
        }`,
      );
    },
  );
}

Deno.test("qcow2 differential: corpus exports match qemu-nbd", async (t) => {
  await withTempDir(async (dir) => {
    await buildCorpus(dir);
    for (const c of CASES) {
      await t.step(c.name, () => runCase(dir, c));
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Bad images

/** Reads a big-endian u64 as a number (the offsets here are far below 2^53). */
function u64(b: Uint8Array, off: number): number {
  return Number(new DataView(b.buffer, b.byteOffset).getBigUint64(off));
}

function setU64(b: Uint8Array, off: number, v: bigint): void {
  new DataView(b.buffer, b.byteOffset).setBigUint64(off, v);
}

const OFLAG_COPIED = 1n << 63n;
const ENTRY_OFFSET_MASK = 0x00ff_ffff_ffff_fe00;

type Corruption = "l2-misaligned" | "l2-past-eof" | "l1-past-eof";

/**
 * Makes a 1 GiB qcow2 (64 KiB clusters, so L1[0] covers [0,512M), L1[1] the rest) with data at 0,
 * 1M and 600M, then breaks the mapping of the first cluster (or all of L1[0]).
 * Returns an offset whose read is unaffected, with its pattern byte.
 */
async function makeBadImage(path: string, kind: Corruption): Promise<[number, number]> {
  await qimg("create", "-q", "-f", "qcow2", path, "1G");
  await qio(path, ["write -P 0xaa 0 64k", "write -P 0xbb 1M 64k", "write -P 0xcc 600M 64k"]);
  const f = await Deno.readFile(path);
  const clusterBits = new DataView(f.buffer).getUint32(20);
  assert.equal(clusterBits, 16);
  const l1 = u64(f, 40);
  const farAway = BigInt(Math.ceil(f.length / 65536) * 65536 + 256 * MiB);
  if (kind === "l1-past-eof") {
    setU64(f, l1, OFLAG_COPIED | farAway);
  } else {
    const l2 = u64(f, l1) & ENTRY_OFFSET_MASK;
    assert.ok(l2 > 0 && l2 % 65536 === 0, `L1[0] = ${l2}`);
    const host = BigInt(u64(f, l2) & ENTRY_OFFSET_MASK);
    assert.ok(host > 0n);
    setU64(f, l2, OFLAG_COPIED | (kind === "l2-misaligned" ? host + 512n : farAway));
  }
  await Deno.writeFile(path, f);
  return kind === "l1-past-eof" ? [600 * MiB, 0xcc] : [MiB, 0xbb];
}

/** What happened to a server serving a bad image. */
interface BadOutcome {
  readonly started: boolean;
  readonly startError?: string;
  readonly badRead?: string;
  readonly healthyReads?: boolean;
  readonly aliveAfter?: boolean;
}

async function badImageOutcome(
  dir: string,
  image: string,
  kind: "denbd" | "qemu-nbd",
  healthy: [number, number],
): Promise<BadOutcome> {
  let server: Server | undefined;
  try {
    server = await Server.start({
      dir,
      image,
      args: ["-r", "-f", "qcow2", "-t"],
      kind,
    });
  } catch (e) {
    return { started: false, startError: (e as Error).message };
  }
  try {
    const uri = server.uri;
    const [off, pat] = healthy;
    // Client A holds its connection across the bad read of client B.
    const a = run([
      "qemu-io",
      "-r",
      "-f",
      "raw",
      uri,
      "-c",
      `read -P ${pat} ${off} 64k`,
      "-c",
      "sleep 600",
      "-c",
      `read -P ${pat} ${off} 64k`,
    ]);
    await new Promise((r) => setTimeout(r, 150));
    const b = await run(["qemu-io", "-r", "-f", "raw", uri, "-c", "read 0 64k"]);
    const ra = await a;
    const aText = ra.stdout + ra.stderr;
    const healthyReads = ra.code === 0 && !/fail|error|mismatch/i.test(aText) &&
      (aText.match(/read 65536\/65536 bytes/g) ?? []).length === 2;
    const bText = (b.stdout + b.stderr).trim();
    const badRead = /read failed|error/i.test(bText) || b.code !== 0
      ? `fails: ${bText.split("\n").find((l) => /fail|error/i.test(l)) ?? `exit ${b.code}`}`
      : "returns data";
    const info = await run(["nbdinfo", "--size", uri]);
    const aliveAfter = server.running && info.code === 0 && info.stdout.trim() === String(1 << 30);
    return { started: true, badRead, healthyReads, aliveAfter };
  } finally {
    await server.stop();
  }
}

for (const kind of ["l2-misaligned", "l2-past-eof", "l1-past-eof"] as const) {
  Deno.test(`qcow2 bad image (${kind}): server stays up for other clients`, async () => {
    await withTempDir(async (dir) => {
      const [testImg, refImg] = [`${dir}/test.qcow2`, `${dir}/ref.qcow2`];
      const healthy = await makeBadImage(testImg, kind);
      await Deno.copyFile(testImg, refImg);
      const [got, want] = await Promise.all([
        badImageOutcome(dir, testImg, SERVER_KIND, healthy),
        badImageOutcome(dir, refImg, "qemu-nbd", healthy),
      ]);
      if (Deno.env.get("DENBD_DIFF_DUMP")) console.log(kind, JSON.stringify({ got, want }));
      if (!got.started) {
        // Refusing the image is acceptable, but only with a message naming the problem.
        assert.match(got.startError ?? "", /L[12]|offset|cluster|corrupt|align|end of file/i);
        return;
      }
      assert.equal(got.healthyReads, true, `healthy reads failed: ${JSON.stringify(got)}`);
      assert.equal(
        got.aliveAfter,
        true,
        `server not serving after bad read: ${JSON.stringify(got)}`,
      );
      // Same outcome as qemu-nbd for the damaged range: a misaligned entry is EIO, an entry
      // past the end of the file reads as zeros (the file layer pads short reads).
      assert.equal(got.badRead, want.badRead, `bad read: ${JSON.stringify({ got, want })}`);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Writes to a writable qcow2 export

Deno.test({
  name: "qcow2 writable export: writes land and the image stays consistent",
  fn: async () => {
    await withTempDir(async (dir) => {
      const img = `${dir}/w.qcow2`;
      const ref = `${dir}/ref.qcow2`;
      await qimg("create", "-q", "-f", "qcow2", img, "4M");
      await qio(img, ["write -P 0xaa 0 256k", "write -z 64k 64k"]);
      await Deno.copyFile(img, ref);
      const ops = ["write -P 0x55 1000 5000", "write -P 0x66 3M 100k", "write -z 128k 4k"];
      await withServer({ dir, image: img, args: ["-f", "qcow2"] }, async (server) => {
        const w = await run(["qemu-io", "-f", "raw", server.uri, ...ops.flatMap((c) => ["-c", c])]);
        assert.equal(w.code, 0, w.stdout + w.stderr);
        assert.doesNotMatch(w.stdout + w.stderr, /fail/i);
      });
      await qio(ref, ops);
      const cmp = await run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", img, ref]);
      assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
      const check = await run(["qemu-img", "check", img]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
    });
  },
});
