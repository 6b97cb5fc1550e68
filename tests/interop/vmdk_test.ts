/**
 * VMDK exports against qemu-nbd 7.2. Images are made at test time: by qemu-img (monolithicSparse
 * with and without zeroed grains, streamOptimized, monolithicFlat, twoGbMaxExtentSparse/Flat, a
 * child with a parent via `-b`), scribbled on by qemu-io, and by hand (a vmfs descriptor over a
 * raw extent with skipped ZERO and RDONLY lines, a vmfsSparse descriptor over a "COWD" extent
 * encoded here). denbd and qemu-nbd serve private copies of the same files side by side; compared:
 * `qemu-img compare`, `nbdinfo --size`, `--map`, `--map=qemu:allocation-depth`. Writes through
 * NBD (qemu-io) against the same commands run by qemu-io on a copy: same guest bytes, same
 * `qemu-img map`, `qemu-img check` clean, the same errors for streamOptimized. A kill -9 loop
 * during writes must leave images that check clean. Damaged images and descriptors must be
 * refused with qemu-nbd's message.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  MiB,
  run,
  runOk,
  type Server,
  Server as ServerClass,
  serverArgv,
  sleep,
  withServers,
  withTempDir,
} from "./_harness.ts";

async function qimg(...args: string[]): Promise<string> {
  return (await runOk(["qemu-img", ...args])).stdout;
}

async function qio(target: string, cmds: readonly string[], fmt: string, ro = false) {
  const r = ro ? ["-r"] : [];
  return await run(["qemu-io", ...r, "-f", fmt, ...cmds.flatMap((c) => ["-c", c]), target]);
}

/** An image: its top file and every file it is made of (copied together). */
interface Img {
  readonly name: string;
  readonly files: readonly string[];
  /** Version 3 and streamOptimized images are not written in the write test. */
  readonly writable: boolean;
}

/** "COWD" (ESX sparse) extent: 4 KiB grains, one 4096-entry table, grains `alloc` filled. */
function cowdExtent(sectors: number, alloc: readonly number[]): Uint8Array {
  const gran = 8;
  const gtSectors = 32;
  const dataStart = 2 + gtSectors;
  const out = new Uint8Array((dataStart + alloc.length * gran) * 512);
  const v = new DataView(out.buffer);
  out.set([0x43, 0x4f, 0x57, 0x44]); // COWD
  v.setUint32(4, 1, true);
  v.setUint32(8, 3, true);
  v.setUint32(12, sectors, true);
  v.setUint32(16, gran, true);
  v.setUint32(20, 1, true); // l1dir offset (sectors)
  v.setUint32(24, 1, true); // l1dir size
  v.setUint32(512, 2, true); // the grain table at sector 2
  alloc.forEach((g, i) => {
    const sector = dataStart + i * gran;
    v.setUint32(1024 + g * 4, sector, true);
    out.fill(0x30 + i, sector * 512, (sector + gran) * 512);
  });
  return out;
}

function descriptor(type: string, extents: readonly string[], extra = ""): string {
  return `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n${extra}` +
    `createType="${type}"\n\n# Extent description\n${extents.join("\n")}\n\n` +
    `ddb.virtualHWVersion = "4"\nddb.adapterType = "ide"\n`;
}

async function buildCorpus(dir: string): Promise<Img[]> {
  const p = (n: string) => `${dir}/${n}`;
  const src = p("src.raw");
  const pat = new Uint8Array(3 * MiB + 4096);
  for (let i = 0; i < pat.length; i++) pat[i] = (i * 7 + (i >> 9)) & 0xff;
  await Deno.writeFile(src, pat);
  await Deno.truncate(src, 7 * MiB);
  const scribble = ["write -P 0x44 4M 8k", "write -P 0x45 5100k 70k", "write -z 64k 64k"];
  await Promise.all([
    (async () => {
      await qimg("convert", "-O", "vmdk", src, p("sparse.vmdk"));
      await qio(p("sparse.vmdk"), scribble, "vmdk");
    })(),
    (async () => {
      await qimg("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", p("zg.vmdk"), "5M");
      await qio(p("zg.vmdk"), ["write -P 1 0 200k", "write -z 64k 64k", "write -z 1M 1M"], "vmdk");
    })(),
    qimg("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, p("so.vmdk")),
    (async () => {
      await qimg("convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", src, p("mf.vmdk"));
      await qio(p("mf.vmdk"), scribble, "vmdk");
    })(),
    qimg("convert", "-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", src, p("ts.vmdk")),
    qimg("convert", "-O", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", src, p("tf.vmdk")),
    (async () => {
      await qimg("create", "-q", "-f", "vmdk", "-o", "adapter_type=lsilogic", p("base.vmdk"), "6M");
      await qio(p("base.vmdk"), ["write -P 0x61 0 1M", "write -P 0x62 3M 64k"], "vmdk");
      await qimg("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", p("child.vmdk"));
      await qio(p("child.vmdk"), ["write -P 0x63 512k 100k", "write -P 0x64 5M 4k"], "vmdk");
    })(),
  ]);
  // A vmfs descriptor over a raw file; qemu skips ZERO and RDONLY lines.
  await Deno.writeFile(p("vmfs-flat.raw"), pat.subarray(0, 2 * MiB));
  await Deno.truncate(p("vmfs-flat.raw"), 3 * MiB);
  await Deno.writeFile(p("vmfs-flat2.raw"), pat.subarray(MiB, 2 * MiB));
  await Deno.writeTextFile(
    p("vmfs.vmdk"),
    descriptor("vmfs", [
      'RW 6144 VMFS "vmfs-flat.raw"',
      'RW 2048 ZERO "x"',
      'RDONLY 2048 FLAT "vmfs-flat.raw" 0',
      'RW 2048 FLAT "vmfs-flat2.raw" 100',
    ]),
  );
  // vmfsSparse over a COWD extent and a KDMV one.
  await Deno.writeFile(p("delta.cowd"), cowdExtent(4096, [0, 5, 6, 300]));
  await qimg("create", "-q", "-f", "vmdk", p("k.vmdk"), "1M");
  await qio(p("k.vmdk"), ["write -P 0x71 4k 8k"], "vmdk");
  await Deno.writeTextFile(
    p("vs.vmdk"),
    descriptor("vmfsSparse", ['RW 4096 VMFSSPARSE "delta.cowd"', 'RW 2048 SPARSE "k.vmdk"']),
  );
  // Version 3 (read-only in qemu).
  const v3 = await Deno.readFile(p("sparse.vmdk"));
  new DataView(v3.buffer).setUint32(4, 3, true);
  await Deno.writeFile(p("v3.vmdk"), v3);
  const ext = async (n: string) =>
    [...(await Deno.readTextFile(p(n))).matchAll(/^RW \d+ \w+ "([^"]+)"/gm)].map((m) => m[1]!);
  return [
    { name: "sparse.vmdk", files: ["sparse.vmdk"], writable: true },
    { name: "zg.vmdk", files: ["zg.vmdk"], writable: true },
    { name: "so.vmdk", files: ["so.vmdk"], writable: false },
    { name: "mf.vmdk", files: ["mf.vmdk", ...await ext("mf.vmdk")], writable: true },
    { name: "ts.vmdk", files: ["ts.vmdk", ...await ext("ts.vmdk")], writable: true },
    { name: "tf.vmdk", files: ["tf.vmdk", ...await ext("tf.vmdk")], writable: true },
    { name: "child.vmdk", files: ["child.vmdk", "base.vmdk"], writable: true },
    { name: "vmfs.vmdk", files: ["vmfs.vmdk", "vmfs-flat.raw", "vmfs-flat2.raw"], writable: true },
    { name: "vs.vmdk", files: ["vs.vmdk", "delta.cowd", "k.vmdk"], writable: true },
    { name: "v3.vmdk", files: ["v3.vmdk"], writable: false },
  ];
}

/** Copies an image's files into `to` (a new directory). */
async function copyImg(dir: string, img: Img, to: string): Promise<string> {
  await Deno.mkdir(to, { recursive: true });
  for (const f of new Set(img.files)) await Deno.copyFile(`${dir}/${f}`, `${to}/${f}`);
  return `${to}/${img.name}`;
}

async function nbdinfo(...args: string[]): Promise<string> {
  return (await runOk(["nbdinfo", ...args])).stdout;
}

async function compareViews(d: Server, q: Server, what: string) {
  await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, q.uri]);
  assert.equal(await nbdinfo("--size", d.uri), await nbdinfo("--size", q.uri), what);
  assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri), `map of ${what}`);
  assert.equal(
    await nbdinfo("--map=qemu:allocation-depth", d.uri),
    await nbdinfo("--map=qemu:allocation-depth", q.uri),
    `depth of ${what}`,
  );
}

Deno.test("vmdk: reads, sizes, maps and depths as qemu-nbd (-f vmdk and probed)", async (t) => {
  await withTempDir(async (dir) => {
    const imgs = await buildCorpus(dir);
    for (const img of imgs) {
      for (const probed of [false, true]) {
        await t.step(`${img.name}${probed ? ", probed" : ""}`, async () => {
          const sub = `${dir}/${img.name}-${probed}`;
          const d = await copyImg(dir, img, `${sub}/d`);
          const q = await copyImg(dir, img, `${sub}/q`);
          const args = ["-t", "-r", "-A", ...(probed ? [] : ["-f", "vmdk"])];
          await withServers([
            { dir, kind: "denbd", args, image: d },
            { dir, kind: "qemu-nbd", args, image: q },
          ], async ([ds, qs]) => {
            await compareViews(ds!, qs!, img.name);
            if (probed) assert.doesNotMatch(ds!.stderr, /probing guessed raw/);
          });
        });
      }
    }
    await t.step("the raw source reads back from the converted images", async () => {
      for (const n of ["sparse.vmdk", "so.vmdk", "mf.vmdk", "ts.vmdk", "tf.vmdk"]) {
        if (n === "sparse.vmdk" || n === "mf.vmdk") continue; // scribbled on
        const img = imgs.find((i) => i.name === n)!;
        const d = await copyImg(dir, img, `${dir}/src-${n}`);
        await withServers([{ dir, kind: "denbd", args: ["-r"], image: d }], async ([s]) => {
          await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", `${dir}/src.raw`, s!.uri]);
        });
      }
    });
  });
});

/** A small seeded generator (xorshift32) for the write scripts. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

function writeScript(size: number, seed: number): string[] {
  const r = rng(seed);
  const cmds = [
    `write -P 0x91 ${64 * 1024 - 2048} 4096`, // across a grain boundary
    `write -P 0x92 ${size - 70000} 777`, // near the end, unaligned
    `write -z ${MiB} ${256 * 1024}`, // grain-aligned zeroes (zeroed grains where enabled)
    `write -z ${2 * MiB + 512} 65536`, // unaligned zeroes: written as zero data
    `write -P 0x94 ${MiB / 2} ${MiB}`,
  ];
  for (let i = 0; i < 8; i++) {
    const len = 1 + Math.floor(r() * 150_000);
    const off = Math.floor(r() * (size - len));
    cmds.push(
      r() < 0.2 ? `write -z ${off} ${len}` : `write -P ${1 + Math.floor(r() * 254)} ${off} ${len}`,
    );
  }
  return cmds;
}

async function guestSize(img: string): Promise<number> {
  const info = await qimg("info", "--output=json", img);
  return Number(info.match(/"virtual-size": *(\d+)/)![1]);
}

/** `qemu-img map` without file names (the two copies live in different directories). */
async function layout(img: string): Promise<string> {
  return (await qimg("map", "--output=json", "-f", "vmdk", img)).replaceAll(
    /"filename": "[^"]*"/g,
    "",
  );
}

async function checkClean(img: string): Promise<void> {
  const c = await run(["qemu-img", "check", "-f", "vmdk", img]);
  assert.equal(c.code, 0, c.stdout + c.stderr);
  assert.match(c.stdout, /No errors were found on the image/);
}

Deno.test("vmdk: writes through NBD match qemu-io on the image, check clean", async (t) => {
  await withTempDir(async (dir) => {
    const imgs = (await buildCorpus(dir)).filter((i) => i.writable);
    for (const [i, img] of imgs.entries()) {
      await t.step(img.name, async () => {
        const viaNbd = await copyImg(dir, img, `${dir}/w${i}/nbd`);
        const direct = await copyImg(dir, img, `${dir}/w${i}/direct`);
        const cmds = writeScript(await guestSize(viaNbd), 100 + i);
        await withServers(
          [{ dir, kind: "denbd", args: ["-f", "vmdk"], image: viaNbd }],
          async ([s]) => {
            const r = await qio(s!.uri, cmds, "raw");
            assert.equal(r.code, 0, r.stdout + r.stderr);
            assert.doesNotMatch(r.stdout + r.stderr, /failed/);
          },
        );
        assert.equal((await qio(direct, cmds, "vmdk")).code, 0);
        await runOk(["qemu-img", "compare", "-f", "vmdk", "-F", "vmdk", viaNbd, direct]);
        await checkClean(viaNbd);
        // Same grains allocated in the same order as qemu's driver allocates them.
        assert.equal(await layout(viaNbd), await layout(direct));
        // The first write gave the image a new CID, as qemu does.
        const cidOf = async (f: string) => {
          const b = await Deno.readFile(f);
          return new TextDecoder("latin1").decode(b.subarray(0, 16384)).match(/\nCID=(\w+)/)?.[1];
        };
        const before = await cidOf(`${dir}/${img.name}`);
        if (before !== undefined) assert.notEqual(await cidOf(viaNbd), before);
      });
    }
    await t.step("streamOptimized: whole new grains only, as qemu", async () => {
      const so = { name: "s2.vmdk", files: ["s2.vmdk"], writable: true };
      await qimg(
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        `${dir}/s2.vmdk`,
        "4M",
      );
      await qio(`${dir}/s2.vmdk`, ["write -c -P 0x10 0 64k"], "vmdk");
      const viaNbd = await copyImg(dir, so, `${dir}/so/nbd`);
      const direct = await copyImg(dir, so, `${dir}/so/direct`);
      const cmds = [
        "write -P 0x91 1M 64k",
        "write -P 0x92 2M 4k",
        "write -P 3 0 64k",
        "write -P 4 3M 64k",
      ];
      const outcome = (s: string) =>
        s.split("\n").filter((l) => /wrote|failed/.test(l)).map((l) => l.replace(/ at .*/, ""));
      let nbdOut = "";
      await withServers(
        [{ dir, kind: "denbd", args: ["-f", "vmdk"], image: viaNbd }],
        async ([s]) => {
          const r = await qio(s!.uri, cmds, "raw");
          nbdOut = r.stdout + r.stderr;
        },
      );
      const d = await qio(direct, cmds, "vmdk");
      const dOut = (d.stdout + d.stderr).replace(/Input\/output error/g, "Input/output error");
      assert.deepEqual(outcome(nbdOut), outcome(dOut));
      assert.match(nbdOut, /Invalid argument/);
      assert.match(nbdOut, /Input\/output error/);
      await runOk(["qemu-img", "compare", "-f", "vmdk", "-F", "vmdk", viaNbd, direct]);
      await checkClean(viaNbd);
    });
    await t.step("advertised flags and sizes match qemu-nbd, writable and read-only", async () => {
      const img = imgs.find((i) => i.name === "ts.vmdk")!;
      for (const ro of [false, true]) {
        const d = await copyImg(dir, img, `${dir}/flags${ro}/d`);
        const q = await copyImg(dir, img, `${dir}/flags${ro}/q`);
        const args = ["-t", "-f", "vmdk", ...(ro ? ["-r"] : [])];
        await withServers([
          { dir, kind: "denbd", args, image: d },
          { dir, kind: "qemu-nbd", args, image: q },
        ], async ([ds, qs]) => {
          const info = async (s: Server) =>
            (await nbdinfo("--json", s.uri)).split("\n").filter((l) =>
              !/"(export-name|uri|description)"/.test(l)
            ).join("\n");
          assert.equal(await info(ds!), await info(qs!), `flags, read-only ${ro}`);
        });
      }
    });
    await t.step("version 3 images are refused read-write, as qemu", async () => {
      const res = await run([...serverArgv("denbd"), "-k", `${dir}/v3.sock`, `${dir}/v3.vmdk`]);
      assert.equal(res.code, 1);
      assert.match(res.stderr, /VMDK version 3 must be read only/);
    });
    await t.step("a parent whose CID changed: reads of its grains fail with EINVAL", async () => {
      await qimg("create", "-q", "-f", "vmdk", `${dir}/p.vmdk`, "1M");
      await qimg("create", "-q", "-f", "vmdk", "-b", "p.vmdk", "-F", "vmdk", `${dir}/c.vmdk`);
      await qio(`${dir}/c.vmdk`, ["write -P 1 0 64k"], "vmdk");
      await qio(`${dir}/p.vmdk`, ["write -P 2 512k 64k"], "vmdk"); // a new CID in the parent
      const qe = await qio(`${dir}/c.vmdk`, ["read 512k 4k"], "vmdk");
      await withServers(
        [{ dir, kind: "denbd", args: ["-r", "-t"], image: `${dir}/c.vmdk` }],
        async ([s]) => {
          const ok = await qio(s!.uri, ["read -P 1 0 4k"], "raw", true);
          assert.match(ok.stdout, /^read 4096\/4096 bytes/m, ok.stdout + ok.stderr);
          const bad = await qio(s!.uri, ["read 512k 4k"], "raw", true);
          assert.match(bad.stdout + bad.stderr, /read failed: Invalid argument/);
          assert.match(qe.stdout + qe.stderr, /read failed: Invalid argument/);
        },
      );
    });
  });
});

Deno.test("vmdk crash: kill -9 during writes leaves images that check clean", async () => {
  await withTempDir(async (dir) => {
    await qimg("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", `${dir}/img.vmdk`, "16M");
    const r = rng(7);
    for (let run_ = 0; run_ < 3; run_++) {
      const cmds: string[] = [];
      for (let i = 0; i < 3000; i++) {
        const len = 512 * (1 + Math.floor(r() * 256));
        const off = 512 * Math.floor(r() * ((16 * MiB - len) / 512));
        cmds.push(i % 7 === 0 ? `write -z ${off} ${len}` : `write -P ${i & 0xff} ${off} ${len}`);
        if (i % 50 === 0) cmds.push("flush");
      }
      const s = await ServerClass.start({
        dir,
        kind: "denbd",
        args: ["-f", "vmdk"],
        image: `${dir}/img.vmdk`,
      });
      const writer = qio(s.uri, cmds, "raw");
      await sleep(300 + Math.floor(r() * 700));
      assert.ok(s.running, "the writes ended before the kill");
      Deno.kill(s.pid, "SIGKILL");
      await s.stop();
      await writer;
      await checkClean(`${dir}/img.vmdk`);
      const rd = await qio(`${dir}/img.vmdk`, ["read 0 16M"], "vmdk");
      assert.equal(rd.code, 0, rd.stderr);
    }
  });
});

/** Writes `bytes` at `at` of a copy of `img`. */
async function patched(img: string, out: string, edits: readonly [number, number[]][]) {
  const b = await Deno.readFile(img);
  for (const [at, bytes] of edits) b.set(bytes, at);
  await Deno.writeFile(out, b);
}
const u32 = (n: number) => [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, n >>> 24];
const u64 = (n: bigint) => [...u32(Number(n & 0xffffffffn)), ...u32(Number(n >> 32n))];

Deno.test("vmdk: damaged images and descriptors are refused with qemu-nbd's message", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.vmdk`;
    await qimg("create", "-q", "-f", "vmdk", base, "4M");
    const p = (n: string) => `${dir}/${n}`;
    const cases: { name: string; make: () => Promise<void>; msg: RegExp; readOnly?: boolean }[] = [
      {
        name: "version",
        make: () => patched(base, p("version"), [[4, u32(4)]]),
        msg: /Unsupported VMDK version 4/,
      },
      {
        name: "gtes",
        make: () => patched(base, p("gtes"), [[44, u32(1024)]]),
        msg: /L2 table size too big/,
      },
      {
        name: "gran0",
        make: () => patched(base, p("gran0"), [[20, u32(0)]]),
        msg: /L1 entry size is invalid/,
      },
      {
        name: "granbig",
        make: () => patched(base, p("granbig"), [[20, u32(0x400000)]]),
        msg: /Invalid granularity/,
      },
      {
        name: "grainoff",
        make: () => patched(base, p("grainoff"), [[64, u64(1n << 30n)]]),
        msg: /File truncated, expecting at least/,
      },
      {
        name: "capacity",
        make: () =>
          patched(base, p("capacity"), [[12, u64(1n << 26n)], [20, u64(1n)], [44, u32(1)]]),
        msg: /L1 size too big/,
      },
      {
        name: "footer",
        make: () => patched(base, p("footer"), [[56, u64(0xffffffffffffffffn)]]),
        msg: /Invalid footer/,
      },
      {
        name: "tiny",
        make: () => Deno.writeFile(p("tiny"), new Uint8Array([1, 2])),
        msg: /invalid VMDK image descriptor/,
      },
      {
        name: "empty",
        make: () => Deno.writeFile(p("empty"), new Uint8Array(0)),
        msg: /File is too small/,
      },
      {
        name: "no extent file",
        make: () =>
          Deno.writeTextFile(
            p("no extent file"),
            descriptor("monolithicFlat", ['RW 2048 FLAT "missing.raw" 0']),
          ),
        msg: /missing\.raw/,
      },
      {
        name: "huge extent",
        make: () =>
          Deno.writeTextFile(
            p("huge extent"),
            descriptor("monolithicFlat", ['RW 99999999999999999 FLAT "base.vmdk" 0']),
          ),
        msg: /Could not refresh total sector count: File too large/,
      },
      {
        name: "bad type",
        make: () => Deno.writeTextFile(p("bad type"), descriptor("fancy", [])),
        msg: /Unsupported image type 'fancy'/,
      },
      {
        name: "no type",
        make: () => Deno.writeTextFile(p("no type"), "version=1\nCID=1\nparentCID=ffffffff\n"),
        msg: /invalid VMDK image descriptor/,
      },
      {
        name: "flat without offset",
        make: () =>
          Deno.writeTextFile(
            p("flat without offset"),
            descriptor("monolithicFlat", ['RW 2048 FLAT "base.vmdk"']),
          ),
        msg: /Invalid extent line: RW 2048 FLAT "base.vmdk"/,
      },
      {
        // The CID lines past the 10 KiB qemu reads of a descriptor.
        name: "big descriptor",
        make: () =>
          Deno.writeTextFile(
            p("big descriptor"),
            "version=1\n" + "# padding\n".repeat(1200) +
              'createType="monolithicFlat"\nCID=1\nparentCID=ffffffff\nRW 8 FLAT "base.vmdk" 0\n',
          ),
        msg: /Could not open '.*big descriptor': Invalid argument/,
      },
      {
        name: "parent loop",
        make: async () => {
          await Deno.writeTextFile(
            p("loop-b.vmdk"),
            descriptor(
              "monolithicFlat",
              ['RW 8192 FLAT "base.vmdk" 0'],
              'parentFileNameHint="parent loop"\n',
            ),
          );
          await Deno.writeTextFile(
            p("parent loop"),
            descriptor(
              "monolithicFlat",
              ['RW 8192 FLAT "base.vmdk" 0'],
              'parentFileNameHint="loop-b.vmdk"\n',
            ),
          );
        },
        msg: /loop/i,
      },
      {
        name: "missing parent",
        make: () =>
          Deno.writeTextFile(
            p("missing parent"),
            descriptor(
              "monolithicFlat",
              ['RW 8192 FLAT "base.vmdk" 0'],
              'parentFileNameHint="nope.vmdk"\n',
            ),
          ),
        msg: /nope\.vmdk/,
      },
    ];
    const line = (s: string) => s.trim().split("\n").at(-1)!.replace(/^[^:]*: /, "");
    for (const c of cases) {
      await c.make();
      const img = p(c.name);
      const d = await run([...serverArgv("denbd"), "-k", p("d.sock"), "-r", "-f", "vmdk", img], {
        timeoutMs: 15_000,
      });
      assert.equal(d.code, 1, `${c.name}: ${d.stderr}`);
      assert.ok(d.stderr.includes(`Failed to blk_new_open '${img}': `), d.stderr);
      assert.match(d.stderr, c.msg, c.name);
      // qemu-nbd 7.2 does not detect a loop of parent links: it keeps opening (a hang).
      if (c.name === "parent loop") continue;
      const q = await run(["qemu-nbd", "-k", p("q.sock"), "-r", "-f", "vmdk", img], {
        timeoutMs: 15_000,
      });
      assert.equal(d.code, 1, `${c.name}: ${d.stderr}`);
      assert.equal(q.code, 1, `${c.name}: qemu-nbd opened it`);
      assert.equal(line(d.stderr), line(q.stderr), c.name);
    }
  });
});
