/**
 * Parallels exports against qemu-nbd 7.2: images made at test time by qemu-img (empty, converted
 * from a raw pattern image with several cluster sizes, scribbled on by qemu-io) and one with the
 * old "WithoutFreeSpace" magic made from a converted one; denbd and qemu-nbd serve copies side
 * by side. Compared: bytes, size, flags and block sizes, base:allocation and
 * qemu:allocation-depth maps, with -f parallels, probed and --image-opts. Writes go the same
 * way through both servers and with qemu-io into a copy: maps equal while served, the files
 * byte-identical afterwards and `qemu-img check` clean. The inuse flag: a killed server leaves
 * it set, and both servers then refuse a read-write open. A kill -9 loop checks what survives.
 * Damaged images fail to open with qemu-nbd's message.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  makeSparseImage,
  MiB,
  run,
  runOk,
  sha256File,
  withServer,
  withTempDir,
} from "./_harness.ts";
import {
  compareViews,
  crashLoop,
  patched,
  qimg,
  qio,
  refusedLikeQemu,
  sideBySide,
  virtualSize,
  writeScript,
  writeThreeWays,
} from "./_prl_qcow.ts";

const SRC_SIZE = 3 * MiB + 300 * 1024;

/** Rewrites a converted image to the old magic: BAT entries become sector numbers. */
async function toOldMagic(img: string, out: string): Promise<void> {
  const b = await Deno.readFile(img);
  const v = new DataView(b.buffer);
  b.set(new TextEncoder().encode("WithoutFreeSpace"), 0);
  const tracks = v.getUint32(28, true);
  const entries = v.getUint32(32, true);
  for (let i = 0; i < entries; i++) {
    v.setUint32(64 + 4 * i, v.getUint32(64 + 4 * i, true) * tracks, true);
  }
  await Deno.writeFile(out, b);
}

async function buildCorpus(
  dir: string,
): Promise<{ name: string; cluster: number; src?: string }[]> {
  const p = (n: string) => `${dir}/${n}`;
  await makeSparseImage(p("src.raw"), SRC_SIZE, [
    { offset: 0, length: 100 * 1024, fill: "random", seed: 3 },
    { offset: MiB + 4096, length: 64 * 1024, fill: 0x22 },
    { offset: 3 * MiB + 512, length: 4096, fill: "random", seed: 9 },
  ]);
  await Promise.all([
    qimg("convert", "-O", "parallels", "-o", "cluster_size=4k", p("src.raw"), p("c4k.prl")),
    (async () => {
      await qimg(
        "convert",
        "-O",
        "parallels",
        "-o",
        "cluster_size=64k",
        p("src.raw"),
        p("c64k.prl"),
      );
      await qio(p("c64k.prl"), ["write -P 0x44 2M 8k", "write -P 0x45 127k 2k"], "parallels");
    })(),
    qimg("convert", "-O", "parallels", p("src.raw"), p("c1m.prl")),
    qimg("create", "-q", "-f", "parallels", "-o", "cluster_size=32k", p("empty.prl"), "5M"),
  ]);
  await toOldMagic(p("c64k.prl"), p("old.prl"));
  return [
    { name: "c4k.prl", cluster: 4096, src: p("src.raw") },
    { name: "c64k.prl", cluster: 65536 },
    { name: "c1m.prl", cluster: MiB, src: p("src.raw") },
    { name: "empty.prl", cluster: 32768 },
    { name: "old.prl", cluster: 65536 },
  ];
}

Deno.test("parallels: reads, flags and maps as qemu-nbd (-f, probed, --image-opts)", async (t) => {
  await withTempDir(async (dir) => {
    const corpus = await buildCorpus(dir);
    for (const { name, src } of corpus) {
      const img = `${dir}/${name}`;
      await t.step(`${name}, -f parallels -r -A`, async () => {
        await sideBySide(
          dir,
          img,
          (c) => ({ args: ["-f", "parallels", "-t", "-r", "-A"], image: c }),
          (d, q) => compareViews(d, q, { src, depth: true, what: name }),
        );
      });
      // Probing (and the writable flags) on a few of them; the rest only read-only.
      if (!["c64k.prl", "old.prl"].includes(name)) continue;
      await t.step(`${name}, probed, writable`, async () => {
        await sideBySide(dir, img, (c) => ({ args: ["-t"], image: c }), async (d, q) => {
          await compareViews(d, q, { src, what: name });
          assert.doesNotMatch(d.stderr, /probing guessed raw/);
        });
      });
    }
    await t.step("--image-opts with prealloc options", async () => {
      const img = `${dir}/c64k.prl`;
      await sideBySide(
        dir,
        img,
        (c) => ({
          args: [
            "-t",
            "--image-opts",
            `driver=parallels,prealloc-mode=truncate,prealloc-size=1M,file.filename=${c}`,
          ],
        }),
        (d, q) => compareViews(d, q, { what: "image-opts" }),
      );
    });
  });
});

Deno.test("parallels: writes match qemu-nbd and qemu-io, byte for byte, check clean", async (t) => {
  await withTempDir(async (dir) => {
    const corpus = await buildCorpus(dir);
    const modes: string[][] = [
      ["-f", "parallels"],
      ["--image-opts"], // prealloc-mode=truncate, below
    ];
    for (const [i, { name, cluster }] of corpus.entries()) {
      for (const [m, mode] of modes.entries()) {
        if (m === 1 && name !== "c4k.prl" && name !== "empty.prl") continue;
        await t.step(`${name}${m === 1 ? ", prealloc-mode=truncate" : ""}`, async () => {
          const img = `${dir}/${name}`;
          const size = await virtualSize(img);
          const cmds = writeScript(size, cluster, 100 + i);
          const viaNbd = m === 0
            ? await writeThreeWays(dir, img, "parallels", [...mode, "-t"], cmds)
            : await writeTruncateMode(dir, img, cmds);
          const check = await run(["qemu-img", "check", "-f", "parallels", viaNbd]);
          assert.equal(check.code, 0, check.stdout + check.stderr);
          assert.match(check.stdout, /No errors were found on the image/);
          // inuse is clear again after a clean stop.
          assert.equal(new DataView((await Deno.readFile(viaNbd)).buffer).getUint32(44, true), 0);
        });
      }
    }
  });
});

/** Writes through both servers with prealloc-mode=truncate; files must be identical. */
async function writeTruncateMode(dir: string, img: string, cmds: string[]): Promise<string> {
  const [d, q] = await sideBySide(
    dir,
    img,
    (c) => ({
      args: [
        "-t",
        "--image-opts",
        `driver=parallels,prealloc-mode=truncate,prealloc-size=300k,file.filename=${c}`,
      ],
    }),
    async (ds, qs) => {
      await Promise.all([qio(ds.uri, cmds, "raw"), qio(qs.uri, cmds, "raw")]);
      await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", ds.uri, qs.uri]);
    },
  );
  assert.equal(await sha256File(d), await sha256File(q));
  return d;
}

Deno.test("parallels: an image left in use opens read-only only, as in qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/a.prl`;
    await qimg("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", img, "2M");
    await withServer(
      { dir, kind: "denbd", image: img, args: ["-f", "parallels", "-t"] },
      async (s) => {
        await qio(s.uri, ["write -P 0x61 0 64k", "flush"], "raw");
        // In use while served: the header says so on disk.
        assert.equal(
          new DataView((await Deno.readFile(img)).buffer).getUint32(44, true),
          0x746f6e59,
        );
        Deno.kill(s.pid, "SIGKILL");
      },
    );
    await refusedLikeQemu(
      dir,
      img,
      ["-f", "parallels"],
      /parallels: Image was not closed correctly; cannot be opened read\/write/,
      true,
      "inuse",
    );
    const check = await run(["qemu-img", "check", "-f", "parallels", img]);
    assert.equal(check.code, 2);
    assert.match(check.stderr + check.stdout, /image was not closed correctly/);
    // Read-only it serves, and the flushed write is there.
    await withServer(
      { dir, kind: "denbd", image: img, args: ["-f", "parallels", "-r"] },
      async (s) => {
        await qio(s.uri, ["read -P 0x61 0 64k"], "raw", true);
      },
    );
    await runOk(["qemu-img", "check", "-r", "all", "-f", "parallels", img]);
    await withServer({ dir, kind: "denbd", image: img, args: ["-f", "parallels"] }, async (s) => {
      await qio(s.uri, ["read -P 0x61 0 64k"], "raw", true);
    });
  });
});

Deno.test("parallels: kill -9 during writes, qemu-img check, repair, contents", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/crash.prl`;
    await qimg("create", "-q", "-f", "parallels", "-o", "cluster_size=16k", img, "2M");
    await crashLoop(dir, img, "parallels", 3, async (p, it) => {
      const check = await run(["qemu-img", "check", "-f", "parallels", p]);
      const out = check.stdout + check.stderr;
      // The unclean close and leaked preallocation are what qemu itself leaves; nothing else.
      for (const line of out.split("\n").filter((l) => l.startsWith("ERROR"))) {
        assert.match(
          line,
          /^ERROR (image was not closed correctly|space leaked at the end of the image \d+)$/,
          `iteration ${it}: ${out}`,
        );
      }
      assert.match(out, /image was not closed correctly/, `iteration ${it}`);
      await runOk(["qemu-img", "check", "-r", "all", "-f", "parallels", p]);
      const again = await run(["qemu-img", "check", "-f", "parallels", p]);
      assert.equal(again.code, 0, again.stdout + again.stderr);
    });
  });
});

/** A format extension cluster as docs/interop/parallels.txt lays it out. */
function extension(clusterSize: number, features: Uint8Array, goodSum: boolean): Uint8Array {
  const b = new Uint8Array(clusterSize);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, 0xab234cef23dcea87n, true);
  b.set(features, 24);
  const sum = createHash("md5").update(b.subarray(24)).digest();
  b.set(goodSum ? sum : sum.map((x: number) => x ^ 1), 8);
  return b;
}

Deno.test("parallels: damaged images fail to open as in qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.prl`;
    await qimg("create", "-q", "-f", "parallels", "-o", "cluster_size=4k", base, "1M");
    await qio(base, ["write -P 0x5a 8k 4k"], "parallels");
    const bytes = await Deno.readFile(base);
    const ext = bytes.length; // sector of an extension cluster appended at the end
    const unknown = new Uint8Array(24);
    new DataView(unknown.buffer).setBigUint64(0, 0x1234n, true);
    const cases: {
      name: string;
      patches: { at: number; u32?: number; u64?: bigint; bytes?: Uint8Array }[];
      args?: string[];
      qemuSame: boolean;
      msg: RegExp;
    }[] = [
      {
        name: "version",
        patches: [{ at: 16, u32: 3 }],
        qemuSame: true,
        msg: /Image not in Parallels format/,
      },
      {
        name: "magic",
        patches: [{ at: 0, u32: 0 }],
        qemuSame: true,
        msg: /Image not in Parallels format/,
      },
      {
        name: "zero tracks",
        patches: [{ at: 28, u32: 0 }],
        qemuSame: true,
        msg: /Zero sectors per track/,
      },
      {
        name: "huge tracks",
        patches: [{ at: 28, u32: 0x7fffffff }],
        qemuSame: true,
        msg: /Too big cluster/,
      },
      {
        name: "huge catalog",
        patches: [{ at: 32, u32: 0x7fffffff }],
        qemuSame: true,
        msg: /Catalog too large/,
      },
      {
        name: "bat too large for denbd",
        patches: [{ at: 32, u32: 0x10000000 }],
        qemuSame: false,
        msg: /BAT of 268435456 entries is larger than denbd supports \(16777216\)/,
      },
      {
        name: "bad prealloc-mode",
        patches: [],
        args: ["--image-opts", "driver=parallels,prealloc-mode=xyz,file.filename="],
        qemuSame: true,
        msg: /invalid parameter value: xyz/,
      },
      {
        name: "bad prealloc-size",
        patches: [],
        args: ["--image-opts", "driver=parallels,prealloc-size=abc,file.filename="],
        qemuSame: true,
        msg: /Parameter 'prealloc-size' expects a non-negative number below 2\^64/,
      },
      {
        // BAT entry 2 (the written cluster) as sector 1 under the old magic: inside the BAT.
        name: "entry into the BAT",
        patches: [{ at: 0, bytes: new TextEncoder().encode("WithoutFreeSpace") }, {
          at: 64 + 8,
          u32: 1,
        }],
        qemuSame: false,
        msg: /BAT entry 2 points at offset 512, inside the header and BAT/,
      },
      {
        name: "extension magic",
        patches: [{ at: 56, u64: BigInt(ext / 512) }, { at: ext, bytes: new Uint8Array(4096) }],
        args: ["-r", "-f", "parallels"],
        qemuSame: true,
        msg: /Wrong parallels Format Extension magic: 0x0, expected: 0xab234cef23dcea87/,
      },
      {
        name: "extension checksum",
        patches: [{ at: 56, u64: BigInt(ext / 512) }, {
          at: ext,
          bytes: extension(4096, new Uint8Array(24), false),
        }],
        args: ["-r", "-f", "parallels"],
        qemuSame: true,
        msg: /Wrong checksum in Format Extension header/,
      },
      {
        name: "extension unknown feature",
        patches: [{ at: 56, u64: BigInt(ext / 512) }, {
          at: ext,
          bytes: extension(4096, unknown, true),
        }],
        args: ["-r", "-f", "parallels"],
        qemuSame: true,
        msg: /Unknown feature: 0x1234/,
      },
    ];
    for (const c of cases) {
      const bad = `${dir}/bad-${c.name.replaceAll(" ", "-")}.prl`;
      await patched(base, bad, c.patches, true);
      let args = c.args ?? ["-f", "parallels"];
      let file = bad;
      if (args[0] === "--image-opts") {
        args = ["--image-opts"];
        file = `${c.args![1]}${bad}`;
      }
      if (file !== bad) {
        await refusedOpts(dir, file, c.msg, c.qemuSame, c.name);
      } else {
        await refusedLikeQemu(dir, bad, args, c.msg, c.qemuSame, c.name);
      }
    }
  });
});

Deno.test("parallels: a format extension is ignored read-write with qemu's warning", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.prl`;
    await qimg("create", "-q", "-f", "parallels", "-o", "cluster_size=4k", base, "1M");
    const at = (await Deno.readFile(base)).length;
    const img = `${dir}/ext.prl`;
    await patched(base, img, [{ at: 56, u64: BigInt(at / 512) }, {
      at,
      bytes: extension(4096, new Uint8Array(24), true),
    }], true);
    await sideBySide(
      dir,
      img,
      (c) => ({ args: ["-f", "parallels", "-t"], image: c }),
      async (d, q) => {
        await qio(d.uri, ["write -P 0x11 0 4k"], "raw");
        await qio(q.uri, ["write -P 0x11 0 4k"], "raw");
        assert.match(d.stderr, /^denbd: warning: Format Extension ignored in RW mode$/m);
        assert.match(q.stderr, /^qemu-nbd: warning: Format Extension ignored in RW mode$/m);
      },
    );
    // Read-only, the (valid) extension is read and the image opens on both.
    await sideBySide(
      dir,
      img,
      (c) => ({ args: ["-f", "parallels", "-t", "-r"], image: c }),
      (d, q) => compareViews(d, q, { what: "ext.prl" }),
    );
  });
});

/** Like refusedLikeQemu for an --image-opts string (qemu names the whole string). */
async function refusedOpts(
  dir: string,
  opts: string,
  msg: RegExp,
  qemuSame: boolean,
  what: string,
) {
  await refusedLikeQemu(dir, opts, ["--image-opts"], msg, qemuSame, what);
}
