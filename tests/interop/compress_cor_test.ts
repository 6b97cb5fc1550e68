/**
 * qemu's `compress` and `copy-on-read` filters in denbd, driven directly (the qcow2 device opened
 * as lib/block/stack.ts opens it, wrapped in the filter) and checked against qemu-img / qemu-io,
 * and against qemu-nbd serving the same `--image-opts` to libnbd on a copy of the same images.
 *
 * @module
 */

import assert from "node:assert/strict";
import { CompressFilter } from "../../lib/block/filters/compress.ts";
import { CopyOnReadFilter } from "../../lib/block/filters/copy_on_read.ts";
import { openQcow2, type Qcow2Device } from "../../lib/block/qcow2/mod.ts";
import { RawDevice } from "../../lib/block/raw.ts";
import { type BlockDevice, BlockError, ExtentList, STATE_ZERO } from "../../lib/block/types.ts";
import { openFileEngine } from "../../lib/io/engine_factory.ts";
import { openImage } from "../unit/_qcow2_helpers.ts";
import { patternBytes, PYTHON, run, runOk, withTempDir } from "./_harness.ts";

const KiB = 1024, MiB = 1024 * 1024, C = 64 * KiB;

/** Open `path` as a writable qcow2 device (backing files read-only), as the stack does. */
async function openWritable(path: string): Promise<Qcow2Device> {
  const file = openFileEngine(path, { writable: true });
  return await openQcow2(file, {
    openBacking: (p, f, c) => openImage(p, f, {}, c),
    writable: true,
  }) as Qcow2Device;
}

async function qemuImg(...args: string[]): Promise<string> {
  return (await runOk(["qemu-img", ...args])).stdout;
}

interface CheckJson {
  "allocated-clusters"?: number;
  "compressed-clusters"?: number;
  corruptions?: number;
  leaks?: number;
}

async function checkJson(path: string): Promise<CheckJson> {
  const r = await run(["qemu-img", "check", "--output=json", path]);
  assert.equal(r.code, 0, `qemu-img check ${path}: ${r.stdout}${r.stderr}`);
  return JSON.parse(r.stdout) as CheckJson;
}

/**
 * `qemu-img map --output=json` without host offsets (they depend on allocation order), with
 * neighbours that differ only in offset merged again.
 */
async function mapShape(path: string): Promise<unknown[]> {
  const map = JSON.parse(await qemuImg("map", "--output=json", path)) as Array<
    Record<string, unknown> & { start: number; length: number }
  >;
  const out: Array<Record<string, unknown> & { start: number; length: number }> = [];
  for (const { offset: _o, ...e } of map) {
    const last = out[out.length - 1];
    const same = last !== undefined &&
      ["depth", "present", "zero", "data"].every((k) => last[k] === e[k]);
    if (same) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

/** Serve `opts` with qemu-nbd on a unix socket in `dir`, run a python libnbd script, stop. */
async function withQemuNbd(dir: string, opts: string, script: string): Promise<string> {
  const sock = `${dir}/q.sock`;
  const child = new Deno.Command("qemu-nbd", {
    args: ["-k", sock, "-t", "--image-opts", opts],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  try {
    for (let i = 0; i < 100; i++) {
      try {
        await Deno.stat(sock);
        break;
      } catch {
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    return (await runOk([PYTHON, "-c", script, sock])).stdout;
  } finally {
    child.kill("SIGTERM");
    await child.status;
    await child.stderr.cancel();
  }
}

/** qemu-nbd's error text when it refuses `opts` at open. */
async function qemuNbdOpenError(dir: string, opts: string): Promise<string> {
  const r = await run(["qemu-nbd", "-k", `${dir}/e.sock`, "--image-opts", opts], {
    timeoutMs: 5000,
  });
  assert.notEqual(r.code, 0);
  return r.stderr.trim();
}

// ---------------------------------------------------------------------------------------------
// compress

/**
 * 4 MiB source in 256 KiB groups of one kind each: random (incompressible), repetitive,
 * text-like and zero groups, so a copy sends data writes and zero requests.
 */
function sourceImage(): Uint8Array {
  const src = new Uint8Array(4 * MiB);
  for (let c = 0; c < src.length / C; c++) {
    const kind = (c >> 2) % 4;
    const at = c * C;
    if (kind === 0) src.set(patternBytes(C, c + 1), at);
    else if (kind === 1) src.fill(0x41 + (c % 26), at, at + C);
    else if (kind === 2) {
      for (let i = 0; i < C; i++) src[at + i] = 0x20 + ((i * 7 + (i >> 6) + c) % 90);
    } // kind 3: zeroes
  }
  return src;
}

/** Write `src` as a sparse raw file (zero groups are holes, as nbdcopy would see them). */
async function writeSparse(path: string, src: Uint8Array): Promise<void> {
  const f = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    await f.truncate(src.length);
    for (let off = 0; off < src.length; off += 4 * C) {
      const part = src.subarray(off, off + 4 * C);
      if (part.every((b) => b === 0)) continue;
      await f.seek(off, Deno.SeekMode.Start);
      for (let done = 0; done < part.length;) done += await f.write(part.subarray(done));
    }
  } finally {
    f.close();
  }
}

Deno.test("compress filter: a copied image is compressed, clean, identical, and as qemu-nbd makes it", async () => {
  await withTempDir(async (dir) => {
    const src = sourceImage();
    await writeSparse(`${dir}/src.raw`, src);
    await qemuImg("create", "-q", "-f", "qcow2", `${dir}/out.qcow2`, "4M");
    await Deno.copyFile(`${dir}/out.qcow2`, `${dir}/ref.qcow2`);

    // denbd: what nbdcopy sends (256 KiB writes, zero extents as zero requests), 4 in flight.
    const dev = new CompressFilter(await openWritable(`${dir}/out.qcow2`), "qcow2");
    try {
      assert.equal(dev.caps.minBlock, C);
      const chunk = 256 * KiB;
      for (let base = 0; base < src.length; base += 4 * chunk) {
        const jobs: Promise<void>[] = [];
        for (let off = base; off < Math.min(src.length, base + 4 * chunk); off += chunk) {
          const part = src.subarray(off, off + chunk);
          jobs.push(
            part.every((b) => b === 0)
              ? dev.zero(off, chunk, {})
              : dev.pwrite(part.slice(), off, {}),
          );
        }
        await Promise.all(jobs);
      }
      await dev.flush();
    } finally {
      await dev.close();
    }

    // qemu-nbd with the same image-opts, written by nbdcopy from the same source.
    const sock = `${dir}/ref.sock`;
    const child = new Deno.Command("qemu-nbd", {
      args: [
        "-k",
        sock,
        "--image-opts",
        `driver=compress,file.driver=qcow2,file.file.filename=${dir}/ref.qcow2`,
      ],
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      for (let i = 0; i < 100; i++) {
        if (await Deno.stat(sock).then(() => true, () => false)) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      await runOk(["nbdcopy", `${dir}/src.raw`, `nbd+unix:///?socket=${sock}`]);
    } finally {
      await child.status; // exits when nbdcopy disconnects (no -t)
    }

    const ours = await checkJson(`${dir}/out.qcow2`);
    const ref = await checkJson(`${dir}/ref.qcow2`);
    assert.equal(ours.corruptions ?? 0, 0);
    assert.equal(ours.leaks ?? 0, 0);
    // Random clusters stay normal, the rest are compressed; zero clusters are not allocated.
    const clusters = src.length / C;
    assert.equal(ours["allocated-clusters"], (clusters / 4) * 3);
    assert.equal(ours["compressed-clusters"], (clusters / 4) * 2);
    assert.equal(ours["allocated-clusters"], ref["allocated-clusters"]);
    assert.equal(ours["compressed-clusters"], ref["compressed-clusters"]);
    assert.deepEqual(await mapShape(`${dir}/out.qcow2`), await mapShape(`${dir}/ref.qcow2`));
    await qemuImg("compare", "-f", "raw", "-F", "qcow2", `${dir}/src.raw`, `${dir}/out.qcow2`);

    const size = (await Deno.stat(`${dir}/out.qcow2`)).size;
    const refSize = (await Deno.stat(`${dir}/ref.qcow2`)).size;
    // About the random quarter plus metadata; within a few clusters of what qemu writes.
    assert.ok(size < src.length / 4 + 8 * C, `compressed image is ${size} bytes`);
    assert.ok(Math.abs(size - refSize) <= 4 * C, `${size} vs qemu's ${refSize}`);

    // qemu-io decompresses what we wrote.
    const io = await runOk([
      "qemu-io",
      "-f",
      "qcow2",
      "-c",
      `read -P 0x${(0x41 + 5).toString(16)} ${5 * C} ${C}`,
      "-c",
      `read -P 0 ${12 * C} ${4 * C}`,
      `${dir}/out.qcow2`,
    ]);
    assert.doesNotMatch(io.stdout, /Pattern verification failed/);
  });
});

/** One request of the error-semantics scenario, applied to qemu-nbd and to the filter. */
type Op = ["write" | "zero" | "fastzero" | "trim", number, number, number | "random"];

const OPS: Op[] = [
  ["write", 0, 4 * KiB, 0x41], // unaligned into an empty cluster: padded, compressed
  ["write", 4 * KiB, 4 * KiB, 0x42], // again into the same (now compressed) cluster: EIO
  ["write", C, C, 0x43], // aligned, compressed
  ["write", C, C, 0x44], // over a compressed cluster: EIO
  ["write", 2 * C, C, "random"], // incompressible: a normal cluster
  ["write", 2 * C, C, "random"], // normal again: in place, no error
  ["write", 2 * C, C, 0x45], // compressible over a normal cluster: EIO
  ["write", 3 * C, 2 * C, 0x46], // two clusters
  ["zero", 6 * C + 4 * KiB, 4 * KiB, 0], // partial zero: a padded compressed write
  ["zero", 7 * C, C, 0], // aligned zero: a zero cluster
  ["fastzero", 8 * C + 4 * KiB, 4 * KiB, 0], // partial fast zero: ENOTSUP
  ["trim", C, C, 0], // --discard=ignore in qemu-nbd; a no-op for the filter alone
  ["zero", C, C, 0], // zeroing a compressed cluster frees it...
  ["write", C, C, 0x47], // ...so it takes a compressed write again
  ["zero", 3 * C + 4 * KiB, 4 * KiB, 0], // partial zero of a compressed cluster: EIO
  ["write", 15 * C + 1000, C - 1000, 0x48], // the last cluster, unaligned start
];

function opData(op: Op): Uint8Array {
  return op[3] === "random"
    ? patternBytes(op[2], 1000 + op[1] / C)
    : new Uint8Array(op[2]).fill(op[3]);
}

const OPS_PY = `
import nbd, sys, json
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_unix(sys.argv[1])
ops = json.load(open(sys.argv[2]))
out = []
for kind, off, ln, data in ops:
    try:
        if kind == "write": h.pwrite(bytes.fromhex(data), off)
        elif kind == "zero": h.zero(ln, off)
        elif kind == "fastzero": h.zero(ln, off, nbd.CMD_FLAG_FAST_ZERO)
        else: h.trim(ln, off)
        out.append(0)
    except nbd.Error as e:
        out.append(e.errno)
h.flush()
h.shutdown()
print(json.dumps(out))
`;

const ERRNO_NAMES: Record<number, string> = { 5: "EIO", 22: "EINVAL", 95: "ENOTSUP" };

Deno.test("compress filter: errors and allocation for every request kind match qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    await qemuImg("create", "-q", "-f", "qcow2", `${dir}/out.qcow2`, "1M");
    await Deno.copyFile(`${dir}/out.qcow2`, `${dir}/ref.qcow2`);
    const ops = OPS.map((op) => [op[0], op[1], op[2], toHex(opData(op))]);
    await Deno.writeTextFile(`${dir}/ops.json`, JSON.stringify(ops));
    const ref = JSON.parse(
      (await withQemuNbd(
        dir,
        `driver=compress,file.driver=qcow2,file.file.filename=${dir}/ref.qcow2`,
        `import sys\nsys.argv.append(${JSON.stringify(`${dir}/ops.json`)})\n${OPS_PY}`,
      )).trim().split("\n").pop()!,
    ) as number[];

    const dev = new CompressFilter(await openWritable(`${dir}/out.qcow2`), "qcow2");
    const ours: number[] = [];
    try {
      for (const op of OPS) {
        const [kind, off, len] = op;
        try {
          if (kind === "write") await dev.pwrite(opData(op), off, {});
          else if (kind === "zero") await dev.zero(off, len, {});
          else if (kind === "fastzero") await dev.zero(off, len, { fastZero: true });
          // qemu-nbd's default --discard=ignore drops TRIM before the filter.
          ours.push(0);
        } catch (e) {
          if (!(e instanceof BlockError)) throw e;
          ours.push(e.errno);
        }
      }
      await dev.flush();
    } finally {
      await dev.close();
    }
    const names = (v: number[]) =>
      v.map((e, i) => `${OPS[i]![0]}@${OPS[i]![1]}:${ERRNO_NAMES[e] ?? e}`);
    assert.deepEqual(names(ours), names(ref));
    assert.deepEqual(ours.slice(0, 4), [0, 5, 0, 5]); // the cases the filter exists for
    const a = await checkJson(`${dir}/out.qcow2`), b = await checkJson(`${dir}/ref.qcow2`);
    assert.equal(a.corruptions ?? 0, 0);
    assert.equal(a["allocated-clusters"], b["allocated-clusters"]);
    assert.equal(a["compressed-clusters"], b["compressed-clusters"]);
    assert.deepEqual(await mapShape(`${dir}/out.qcow2`), await mapShape(`${dir}/ref.qcow2`));
    await qemuImg("compare", `${dir}/out.qcow2`, `${dir}/ref.qcow2`);
  });
});

function toHex(b: Uint8Array): string {
  let s = "";
  for (const x of b) s += x.toString(16).padStart(2, "0");
  return s;
}

Deno.test("compress filter: refused where qemu refuses it, with qemu's messages", async () => {
  await withTempDir(async (dir) => {
    await qemuImg("create", "-q", "-f", "qcow2", `${dir}/odd.qcow2`, "1000448");
    await qemuImg("create", "-q", "-f", "raw", `${dir}/r.img`, "1M");
    const odd = await openWritable(`${dir}/odd.qcow2`);
    try {
      const msg = (e: unknown) => (e as Error).message;
      let ours = "";
      try {
        new CompressFilter(odd, "qcow2");
      } catch (e) {
        ours = msg(e);
      }
      const theirs = await qemuNbdOpenError(
        dir,
        `driver=compress,file.driver=qcow2,file.file.filename=${dir}/odd.qcow2`,
      );
      assert.ok(ours !== "" && theirs.endsWith(ours), `${ours} / ${theirs}`);
    } finally {
      await odd.close();
    }
    const raw = new RawDevice(openFileEngine(`${dir}/r.img`, { writable: true }), {
      writable: true,
      offset: 0,
      size: undefined,
      minBlock: 1,
    });
    try {
      let ours = "";
      try {
        new CompressFilter(raw, "raw");
      } catch (e) {
        ours = (e as Error).message;
      }
      const theirs = await qemuNbdOpenError(
        dir,
        `driver=compress,file.driver=raw,file.file.filename=${dir}/r.img`,
      );
      assert.ok(ours !== "" && theirs.endsWith(ours), `${ours} / ${theirs}`);
    } finally {
      await raw.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// copy-on-read

/** base (data, a zero cluster, a data cluster of zero bytes, a partial run) under top. */
async function makeChain(dir: string, topOpts: string[] = []): Promise<void> {
  await qemuImg("create", "-q", "-f", "qcow2", `${dir}/base.qcow2`, "4M");
  await runOk([
    "qemu-io",
    "-f",
    "qcow2",
    ...["-c", "write -P 0x11 0 192k", "-c", "write -z 192k 64k", "-c", "write -P 0 256k 64k"],
    ...["-c", "write -P 0x22 1M 100k", "-c", "write -P 0x55 3M 1M"],
    `${dir}/base.qcow2`,
  ]);
  await qemuImg(
    "create",
    "-q",
    "-f",
    "qcow2",
    ...topOpts,
    "-b",
    "base.qcow2",
    "-F",
    "qcow2",
    `${dir}/top.qcow2`,
    "4M",
  );
  await runOk([
    "qemu-io",
    "-f",
    "qcow2",
    ...["-c", "write -P 0x33 64k 4k", "-c", "write -P 0x44 2M 64k"],
    `${dir}/top.qcow2`,
  ]);
}

/** Reads as the test issues them: [offset, length]. */
const READS: Array<[number, number]> = [
  [1000, 5000],
  [60000, 200000],
  [MiB + 50000, 70000],
  [2 * MiB - 4 * KiB, 8 * KiB],
  [3 * MiB + 5, 10],
  [3 * MiB + 200 * KiB, 300 * KiB],
];

/**
 * A structured NBD read as qemu-nbd and denbd's session answer it: block status first, zero
 * extents become holes (never read), data extents are read.
 */
async function sparseRead(dev: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  const ext = new ExtentList(1024);
  await dev.extents(offset, length, ext);
  let pos = 0;
  for (let i = 0; i < ext.pairs.length && pos < length; i += 2) {
    const n = Math.min(ext.pairs[i]!, length - pos);
    if ((ext.pairs[i + 1]! & STATE_ZERO) === 0) {
      await dev.pread(out.subarray(pos, pos + n), offset + pos);
    }
    pos += n;
  }
  if (pos < length) await dev.pread(out.subarray(pos), offset + pos);
  return out;
}

const READS_PY = `
import nbd, sys, json, hashlib
h = nbd.NBD()
h.connect_unix(sys.argv[1])
out = []
for off, ln in json.loads(sys.argv[2]):
    out.append(hashlib.sha256(h.pread(ln, off)).hexdigest())
if len(sys.argv) > 3:
    for off, ln in json.loads(sys.argv[3]):
        h.cache(ln, off)
h.shutdown()
print(json.dumps(out))
`;

async function sha(b: Uint8Array): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", b as Uint8Array<ArrayBuffer>));
  return toHex(d);
}

/** Reads the flattened chain gives for READS (what every read must return). */
async function flatHashes(path: string): Promise<string[]> {
  const flat = await Deno.readFile(path);
  return await Promise.all(READS.map(([off, len]) => sha(flat.subarray(off, off + len))));
}

const COR_CASES: Array<{ opts: string[]; qemuReference: boolean }> = [
  { opts: [], qemuReference: true },
  { opts: ["-o", "compat=0.10"], qemuReference: true },
  // qemu-nbd 7.2 aborts here (io.c: assertion 'skip_bytes < pnum' in bdrv_co_do_copy_on_readv
  // once a read meets a partly allocated cluster), so there is no reference to compare with.
  { opts: ["-o", "extended_l2=on"], qemuReference: false },
];

for (const { opts, qemuReference } of COR_CASES) {
  Deno.test(
    `copy-on-read filter: reads pull clusters up as qemu-nbd does (${opts.join(" ") || "default"})`,
    async () => {
      await withTempDir(async (dir) => {
        await Deno.mkdir(`${dir}/ref`);
        await makeChain(dir, opts);
        await makeChain(`${dir}/ref`, opts);
        await qemuImg("convert", "-O", "raw", `${dir}/top.qcow2`, `${dir}/flat.raw`);
        const caches: Array<[number, number]> = [[2 * MiB + C, 2 * C]];
        const before = await mapShape(`${dir}/top.qcow2`);

        const top = await openWritable(`${dir}/top.qcow2`);
        const dev = new CopyOnReadFilter(top, { clusterSize: top.clusterSize });
        const hashes: string[] = [];
        try {
          for (const [off, len] of READS) hashes.push(await sha(await sparseRead(dev, off, len)));
          for (const [off, len] of caches) await dev.cache(off, len);
          await dev.flush();
        } finally {
          await dev.close();
        }
        assert.deepEqual(hashes, await flatHashes(`${dir}/flat.raw`));
        const check = await checkJson(`${dir}/top.qcow2`);
        assert.equal(check.corruptions ?? 0, 0);
        assert.equal(check.leaks ?? 0, 0);
        const ours = await mapShape(`${dir}/top.qcow2`);
        assert.notDeepEqual(ours, before);
        // The chain still reads as before.
        await qemuImg("compare", "-f", "raw", "-F", "qcow2", `${dir}/flat.raw`, `${dir}/top.qcow2`);
        // The first cluster (read at 1000) now lives in the top image itself: read it with the
        // backing file dropped.
        const alone = `json:${
          JSON.stringify({
            driver: "qcow2",
            backing: null,
            file: { driver: "file", filename: `${dir}/top.qcow2` },
          })
        }`;
        const io = await runOk(["qemu-io", "-r", "-c", "read -P 0x11 0 64k", alone]);
        assert.doesNotMatch(io.stdout, /Pattern verification failed/);

        if (!qemuReference) return;
        const refHashes = JSON.parse(
          (await withQemuNbd(
            `${dir}/ref`,
            `driver=copy-on-read,file.driver=qcow2,file.file.filename=${dir}/ref/top.qcow2`,
            `import sys\nsys.argv += [${JSON.stringify(JSON.stringify(READS))}, ${
              JSON.stringify(JSON.stringify(caches))
            }]\n${READS_PY}`,
          )).trim().split("\n").pop()!,
        ) as string[];
        assert.deepEqual(hashes, refHashes);
        assert.deepEqual(ours, await mapShape(`${dir}/ref/top.qcow2`));
      });
    },
  );
}

Deno.test("copy-on-read filter: bottom limits the copy to the images above it", async () => {
  await withTempDir(async (dir) => {
    await Deno.mkdir(`${dir}/ref`);
    for (const d of [dir, `${dir}/ref`]) {
      await makeChain(d);
      await qemuImg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "top.qcow2",
        "-F",
        "qcow2",
        `${d}/t3.qcow2`,
      );
    }
    await withQemuNbd(
      `${dir}/ref`,
      `driver=copy-on-read,bottom=mid,file.driver=qcow2,file.file.filename=${dir}/ref/t3.qcow2,file.backing.node-name=mid`,
      `import sys\nsys.argv.append(${JSON.stringify(JSON.stringify(READS))})\n${READS_PY}`,
    );
    const t3 = await openWritable(`${dir}/t3.qcow2`);
    // t3 is depth 1, top (node "mid") depth 2, base depth 3.
    const dev = new CopyOnReadFilter(t3, { clusterSize: t3.clusterSize, bottom: 2 });
    try {
      for (const [off, len] of READS) await sparseRead(dev, off, len);
      await dev.flush();
    } finally {
      await dev.close();
    }
    assert.deepEqual(await mapShape(`${dir}/t3.qcow2`), await mapShape(`${dir}/ref/t3.qcow2`));
    await checkJson(`${dir}/t3.qcow2`);
  });
});

Deno.test("copy-on-read filter: a read-only node is refused with qemu's message", async () => {
  await withTempDir(async (dir) => {
    await makeChain(dir);
    const ro = await openImage(`${dir}/top.qcow2`);
    try {
      assert.throws(
        () => new CopyOnReadFilter(ro, { clusterSize: C }),
        (e: unknown) => e instanceof BlockError && e.message === "Block node is read-only",
      );
    } finally {
      await ro.close();
    }
    const r = await run([
      "qemu-nbd",
      "-r",
      "-k",
      `${dir}/ro.sock`,
      "--image-opts",
      `driver=copy-on-read,file.driver=qcow2,file.file.filename=${dir}/top.qcow2`,
    ], { timeoutMs: 5000 });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /: Block node is read-only$/m);
  });
});
