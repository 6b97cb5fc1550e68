/**
 * VDI exports against qemu-nbd 7.2: images made at test time by qemu-img (dynamic, static,
 * converted from a raw pattern image) and scribbled on by qemu-io; denbd and qemu-nbd serve
 * copies of the same image side by side. Compared: the guest bytes (`qemu-img compare` with the
 * image and the raw source), `nbdinfo --size`, `nbdinfo --map`, with -f vdi, probed and through
 * --image-opts. Writes (random ones, into unallocated blocks, across block boundaries, zero
 * writes) go through NBD with qemu-io to the server under test and, as the same commands,
 * straight into a copy with qemu-io: the two files must read the same, `qemu-img check` clean,
 * and be byte-identical (same allocation order as qemu's driver). Damaged images must fail to
 * open with a message naming the file.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  makeSparseImage,
  MiB,
  run,
  runOk,
  type Server,
  SERVER_KIND,
  serverArgv,
  sha256File,
  withServer,
  withServers,
  withTempDir,
} from "./_harness.ts";

const SRC_SIZE = 6 * MiB + 300 * 1024;

async function qimg(...args: string[]): Promise<void> {
  await runOk(["qemu-img", ...args]);
}

async function qio(target: string, cmds: readonly string[], fmt: string): Promise<void> {
  await runOk(["qemu-io", "-f", fmt, ...cmds.flatMap((c) => ["-c", c]), target]);
}

/** The corpus: name → how it was made (all in `dir`). */
async function buildCorpus(dir: string): Promise<string[]> {
  const p = (n: string) => `${dir}/${n}`;
  await makeSparseImage(p("src.raw"), SRC_SIZE, [
    { offset: 0, length: MiB + 100 * 1024, fill: "random", seed: 3 },
    { offset: 3 * MiB, length: 64 * 1024, fill: 0x22 },
    { offset: 5 * MiB + 512, length: 4096, fill: "random", seed: 9 },
  ]);
  await Promise.all([
    (async () => {
      // Converted, then a block allocated by qemu-io after the converted ones.
      await qimg("convert", "-O", "vdi", p("src.raw"), p("dyn.vdi"));
      await qio(p("dyn.vdi"), ["write -P 0x44 4M 8k", "write -P 0x45 2047k 2k"], "vdi");
    })(),
    qimg("create", "-q", "-f", "vdi", p("empty.vdi"), "5M"),
    (async () => {
      await qimg("create", "-q", "-f", "vdi", "-o", "static=on", p("static.vdi"), "6M");
      await qio(p("static.vdi"), ["write -P 0x77 1028k 64k", "write -P 0x78 5M 1M"], "vdi");
    })(),
    qimg("convert", "-O", "vdi", "-o", "static=on", p("src.raw"), p("static-conv.vdi")),
  ]);
  return ["dyn.vdi", "empty.vdi", "static.vdi", "static-conv.vdi"];
}

/** Serves a private copy of `img` on denbd and on qemu-nbd with `args`, then runs `fn`. */
async function sideBySide(
  dir: string,
  img: string,
  args: (copy: string) => { args: string[]; image?: string },
  fn: (denbd: Server, qemu: Server) => Promise<void>,
): Promise<void> {
  const copies = [`${img}.denbd`, `${img}.qemu`];
  for (const c of copies) await Deno.copyFile(img, c);
  const [a, b] = copies.map(args);
  await withServers([
    { dir, kind: SERVER_KIND, ...a! },
    { dir, kind: "qemu-nbd", ...b! },
  ], async ([d, q]) => await fn(d!, q!));
  for (const c of copies) await Deno.remove(c);
}

async function nbdinfo(...args: string[]): Promise<string> {
  return (await runOk(["nbdinfo", ...args])).stdout;
}

/** Everything a client sees of a read-only view: compared between the two servers. */
async function compareViews(img: string, src: string | undefined, d: Server, q: Server) {
  for (const s of [d, q]) {
    await runOk(["qemu-img", "compare", "-f", "vdi", "-F", "raw", img, s.uri]);
    if (src !== undefined) {
      await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri]);
    }
  }
  assert.equal(await nbdinfo("--size", d.uri), await nbdinfo("--size", q.uri));
  assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri), `map of ${img}`);
  assert.equal(
    await nbdinfo("--map", "--totals", d.uri),
    await nbdinfo("--map", "--totals", q.uri),
  );
}

Deno.test("vdi: reads, sizes and maps as qemu-nbd (-f vdi, probed, --image-opts)", async (t) => {
  await withTempDir(async (dir) => {
    const names = await buildCorpus(dir);
    const src = `${dir}/src.raw`;
    for (const name of names) {
      const img = `${dir}/${name}`;
      await t.step(`${name}, -f vdi`, async () => {
        await sideBySide(
          dir,
          img,
          (c) => ({ args: ["-f", "vdi", "-t", "-r"], image: c }),
          (d, q) => compareViews(img, undefined, d, q),
        );
      });
      await t.step(`${name}, probed`, async () => {
        await sideBySide(dir, img, (c) => ({ args: ["-t"], image: c }), async (d, q) => {
          await compareViews(img, undefined, d, q);
          // A probed vdi gets no raw warning and no 512-byte minimum block.
          assert.doesNotMatch(d.stderr, /probing guessed raw/);
          assert.equal(
            (await nbdinfo("--json", d.uri)).match(/"block_size_minimum": *\d+/)?.[0],
            (await nbdinfo("--json", q.uri)).match(/"block_size_minimum": *\d+/)?.[0],
          );
        });
      });
    }
    await t.step("static-conv.vdi reads as its raw source", async () => {
      const img = `${dir}/static-conv.vdi`;
      await sideBySide(
        dir,
        img,
        (c) => ({ args: ["-t", "-r"], image: c }),
        (d, q) => compareViews(img, src, d, q),
      );
    });
    await t.step("--image-opts driver=vdi,file.filename=...", async () => {
      const img = `${dir}/dyn.vdi`;
      await sideBySide(
        dir,
        img,
        (c) => ({ args: ["-t", "--image-opts", `driver=vdi,file.filename=${c}`] }),
        (d, q) => compareViews(img, undefined, d, q),
      );
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

/** qemu-io writes: fixed ones (unallocated blocks, block boundaries, zeroes), then random ones. */
function writeScript(size: number, seed: number): string[] {
  const r = rng(seed);
  const cmds = [
    `write -P 0x91 ${MiB - 2048} 4096`, // across the block 0/1 boundary
    `write -P 0x92 ${size - MiB + 12345} 777`, // last block, unaligned
    `write -P 0x93 ${2 * MiB + 4096} 8192`, // inside block 2
    `write -z ${3 * MiB + 512} 65536`, // zero write (qemu writes zero data)
    `write -P 0x94 ${MiB / 2} ${2 * MiB}`, // spans three blocks
  ];
  for (let i = 0; i < 10; i++) {
    const len = 1 + Math.floor(r() * 200_000);
    const off = Math.floor(r() * (size - len));
    const pat = 1 + Math.floor(r() * 254);
    cmds.push(r() < 0.15 ? `write -z ${off} ${len}` : `write -P ${pat} ${off} ${len}`);
  }
  return cmds;
}

Deno.test("vdi: writes through NBD match qemu-io on the image, check clean", async (t) => {
  await withTempDir(async (dir) => {
    const names = await buildCorpus(dir);
    for (const [i, name] of names.entries()) {
      await t.step(name, async () => {
        const img = `${dir}/${name}`;
        const viaNbd = `${img}.nbd`;
        const direct = `${img}.direct`;
        await Deno.copyFile(img, viaNbd);
        await Deno.copyFile(img, direct);
        const size = Number(
          (await runOk(["qemu-img", "info", "--output=json", img])).stdout
            .match(/"virtual-size": *(\d+)/)![1],
        );
        const cmds = writeScript(size, 100 + i);
        await withServer({ dir, image: viaNbd, args: ["-f", "vdi"] }, async (s) => {
          await qio(s.uri, cmds, "raw");
        });
        await qio(direct, cmds, "vdi");
        await runOk(["qemu-img", "compare", "-f", "vdi", "-F", "vdi", viaNbd, direct]);
        const check = await run(["qemu-img", "check", "-f", "vdi", viaNbd]);
        assert.equal(check.code, 0, check.stdout + check.stderr);
        assert.match(check.stdout, /No errors were found on the image/);
        // Same allocation order, same header and map as qemu's driver wrote them.
        assert.equal(await sha256File(viaNbd), await sha256File(direct));
      });
    }
  });
});

/** Patches little-endian fields of a copy of `img`. */
async function corrupt(
  img: string,
  out: string,
  patches: readonly { at: number; u32?: number; u64?: bigint }[],
): Promise<void> {
  const b = await Deno.readFile(img);
  const v = new DataView(b.buffer);
  for (const p of patches) {
    if (p.u32 !== undefined) v.setUint32(p.at, p.u32, true);
    if (p.u64 !== undefined) v.setBigUint64(p.at, p.u64, true);
  }
  await Deno.writeFile(out, b);
}

Deno.test("vdi: damaged images fail to open, naming the file", async () => {
  await withTempDir(async (dir) => {
    await qimg("create", "-q", "-f", "vdi", `${dir}/base.vdi`, "4M");
    await qio(`${dir}/base.vdi`, ["write -P 0x5a 1M 4k"], "vdi");
    const cases: {
      name: string;
      patches: { at: number; u32?: number; u64?: bigint }[];
      qemuSame: boolean;
      msg: RegExp;
    }[] = [
      {
        name: "signature",
        patches: [{ at: 0x40, u32: 0x12345678 }],
        qemuSame: true,
        msg: /bad signature 12345678/,
      },
      {
        name: "version",
        patches: [{ at: 0x44, u32: 0x00010002 }],
        qemuSame: true,
        msg: /version 1\.2/,
      },
      {
        name: "block size",
        patches: [{ at: 0x178, u32: 4096 }],
        qemuSame: true,
        msg: /block size/,
      },
      {
        name: "disk size",
        patches: [{ at: 0x170, u64: 1n << 60n }],
        qemuSame: true,
        msg: /Unsupported VDI image size/,
      },
      {
        name: "room",
        patches: [{ at: 0x170, u64: 64n * 1024n * 1024n }],
        qemuSame: true,
        msg: /image bitmap has room/,
      },
      {
        name: "bmap offset",
        patches: [{ at: 0x154, u32: 0x7fff0000 }],
        qemuSame: false,
        msg: /block map/,
      },
      {
        name: "huge block count",
        patches: [{ at: 0x180, u32: 0x3ffffff0 }, { at: 0x158, u32: 0xfffffe00 }],
        qemuSame: true,
        msg: /too many blocks/,
      },
      {
        name: "data over map",
        patches: [{ at: 0x180, u32: 0x1000 }, { at: 0x158, u32: 0x1000 }],
        qemuSame: false,
        msg: /overlaps the block map/,
      },
      {
        // A million-entry block map in a file of 1 MiB.
        name: "map past the end",
        patches: [{ at: 0x180, u32: 1_000_000 }, { at: 0x158, u32: 4000768 }],
        qemuSame: false,
        msg: /ends past the end of the file/,
      },
      {
        // Block map entry 2 points at block 3, past the single allocated block at the end.
        name: "entry past the end",
        patches: [{ at: 0x200 + 8, u32: 3 }],
        qemuSame: false,
        msg: /block map entry 2/,
      },
      {
        name: "entry too large",
        patches: [{ at: 0x200 + 8, u32: 1000 }],
        qemuSame: false,
        msg: /block map entry 2 is 1000/,
      },
    ];
    for (const c of cases) {
      const bad = `${dir}/bad-${c.name.replaceAll(" ", "-")}.vdi`;
      await corrupt(`${dir}/base.vdi`, bad, c.patches);
      const sock = `${dir}/bad.sock`;
      const res = await run([...serverArgv("denbd"), "-k", sock, "-f", "vdi", bad], {
        timeoutMs: 15_000,
      });
      assert.equal(res.code, 1, `${c.name}: ${res.stderr}`);
      assert.ok(res.stderr.includes(`Failed to blk_new_open '${bad}': `), res.stderr);
      assert.match(res.stderr, c.msg, c.name);
      if (c.qemuSame) {
        const q = await run(["qemu-nbd", "-k", sock, "-f", "vdi", bad], { timeoutMs: 15_000 });
        const line = (s: string) => s.trim().replace(/^[^:]*: /, "");
        assert.equal(line(res.stderr), line(q.stderr), c.name);
      }
    }
  });
});

Deno.test("vdi: -l fails after opening, in qemu-nbd's words", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/a.vdi`;
    await qimg("create", "-q", "-f", "vdi", img, "1M");
    const d = await run([...serverArgv("denbd"), "-k", `${dir}/d.sock`, "-l", "s1", img]);
    const q = await run(["qemu-nbd", "-k", `${dir}/q.sock`, "-l", "s1", img]);
    assert.equal(d.code, 1);
    assert.equal(q.code, 1);
    const line = (s: string) => s.trim().replace(/^[^:]*: /, "");
    assert.equal(line(d.stderr), line(q.stderr));
  });
});
