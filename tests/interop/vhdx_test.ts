/**
 * VHDX exports against qemu-nbd 7.2: images made at test time by qemu-img (dynamic with
 * block_state_zero on and off, several block and log sizes, fixed, converted from a raw pattern,
 * empty) and scribbled on by qemu-io; denbd and qemu-nbd serve copies of the same image side by
 * side. Compared: the guest bytes (`qemu-img compare`), `nbdinfo --size`, `--map`,
 * `--map=qemu:allocation-depth` (-A), the advertised flags and block sizes (`nbdinfo --json`).
 * Writes go through NBD with qemu-io to denbd and, as the same commands, straight into a copy
 * with qemu-io: the two must read the same and `qemu-img check` clean. A dirty log (written with
 * the test's own log encoder) must be refused read-only with qemu's message and replayed
 * read-write to the same guest bytes as qemu-nbd's replay. Damaged images fail to open with
 * qemu-nbd's messages (errors and error_report lines alike); every BAT state reads as in
 * qemu-nbd (zeroes, data, EIO for partially present); kill -9 during writes leaves an image
 * qemu-img check accepts, with no torn 4 KiB write.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  makeSparseImage,
  MiB,
  run,
  runOk,
  Server,
  SERVER_KIND,
  serverArgv,
  sleep,
  withServer,
  withServers,
  withTempDir,
} from "./_harness.ts";
import { encodeLogEntry } from "../../lib/block/vhdx/log.ts";
import { crc32cWithHole } from "../../lib/block/vhdx/crc32c.ts";

const SRC_SIZE = 20 * MiB + 300 * 1024;

async function qimg(...args: string[]): Promise<void> {
  await runOk(["qemu-img", ...args]);
}

async function qio(target: string, cmds: readonly string[], fmt: string): Promise<void> {
  await runOk(["qemu-io", "-f", fmt, ...cmds.flatMap((c) => ["-c", c]), target]);
}

/** The corpus: image names in `dir`, with the raw source they must read as (when there is one). */
async function buildCorpus(dir: string): Promise<{ name: string; src?: string }[]> {
  const p = (n: string) => `${dir}/${n}`;
  await makeSparseImage(p("src.raw"), SRC_SIZE, [
    { offset: 0, length: MiB + 100 * 1024, fill: "random", seed: 3 },
    { offset: 9 * MiB, length: 64 * 1024, fill: 0x22 },
    { offset: 17 * MiB + 512, length: 4096, fill: "random", seed: 9 },
  ]);
  const scribble = ["write -P 0x44 4M 8k", "write -P 0x45 1023k 2k", "write -z 9M 4k"];
  await Promise.all([
    (async () => {
      await qimg("convert", "-O", "vhdx", "-o", "block_size=1M", p("src.raw"), p("conv1m.vhdx"));
    })(),
    (async () => {
      await qimg("create", "-q", "-f", "vhdx", p("dyn.vhdx"), "24M");
      await qio(p("dyn.vhdx"), scribble, "vhdx");
    })(),
    (async () => {
      await qimg(
        "create",
        ..."-q -f vhdx -o block_state_zero=off,block_size=2M,log_size=2M".split(" "),
        p("nozero.vhdx"),
        "13M",
      );
      await qio(p("nozero.vhdx"), scribble, "vhdx");
    })(),
    (async () => {
      await qimg(
        "create",
        ..."-q -f vhdx -o block_size=32M".split(" "),
        p("big32m.vhdx"),
        "100M",
      );
      await qio(p("big32m.vhdx"), ["write -P 0x46 40M 64k", "write -P 0x47 99M 1M"], "vhdx");
    })(),
    (async () => {
      await qimg(
        "create",
        ..."-q -f vhdx -o subformat=fixed,block_size=1M".split(" "),
        p("fixed.vhdx"),
        "6M",
      );
      await qio(p("fixed.vhdx"), ["write -P 0x48 1M 64k", "write -P 0x49 5M 1M"], "vhdx");
    })(),
    qimg("create", "-q", "-f", "vhdx", p("empty.vhdx"), "0"),
  ]);
  return [
    { name: "conv1m.vhdx", src: p("src.raw") },
    { name: "dyn.vhdx" },
    { name: "nozero.vhdx" },
    { name: "big32m.vhdx" },
    { name: "fixed.vhdx" },
    { name: "empty.vhdx" },
  ];
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

/** nbdinfo --json without the uri lines (sockets differ). */
async function flags(uri: string): Promise<string> {
  return (await nbdinfo("--json", uri)).split("\n").filter((l) => !/"uri"|"url"/.test(l)).join(
    "\n",
  );
}

/** Everything a client sees: compared between the two servers. */
async function compareViews(
  img: string,
  src: string | undefined,
  d: Server,
  q: Server,
  depth = true,
) {
  for (const s of [d, q]) {
    await runOk(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", img, s.uri]);
    if (src !== undefined) {
      await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri]);
    }
  }
  assert.equal(await nbdinfo("--size", d.uri), await nbdinfo("--size", q.uri));
  assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri), `map of ${img}`);
  if (depth) {
    assert.equal(
      await nbdinfo("--map=qemu:allocation-depth", d.uri),
      await nbdinfo("--map=qemu:allocation-depth", q.uri),
    );
  }
  assert.equal(await flags(d.uri), await flags(q.uri), `flags of ${img}`);
}

Deno.test("vhdx: reads, sizes, maps and flags as qemu-nbd", async (t) => {
  await withTempDir(async (dir) => {
    const corpus = await buildCorpus(dir);
    for (const { name, src } of corpus) {
      const img = `${dir}/${name}`;
      await t.step(`${name}, -f vhdx -r`, async () => {
        await sideBySide(
          dir,
          img,
          (c) => ({ args: ["-f", "vhdx", "-t", "-r", "-A"], image: c }),
          (d, q) => compareViews(img, src, d, q),
        );
      });
    }
    for (const name of ["dyn.vhdx", "fixed.vhdx"]) {
      const img = `${dir}/${name}`;
      await t.step(`${name}, probed, writable`, async () => {
        await sideBySide(dir, img, (c) => ({ args: ["-t", "-A"], image: c }), async (d, q) => {
          await compareViews(img, undefined, d, q);
          assert.doesNotMatch(d.stderr, /probing guessed raw/);
        });
      });
    }
    await t.step("--image-opts driver=vhdx,file.filename=...", async () => {
      const img = `${dir}/conv1m.vhdx`;
      await sideBySide(
        dir,
        img,
        (c) => ({ args: ["-t", "--image-opts", `driver=vhdx,file.filename=${c}`] }),
        (d, q) => compareViews(img, `${dir}/src.raw`, d, q, false),
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

/** qemu-io writes in 512-byte units (qemu's vhdx alignment): fixed ones, then random ones. */
function writeScript(size: number, block: number, seed: number): string[] {
  const r = rng(seed);
  const cmds = [
    `write -P 0x91 0 4096`, // block 0 first (its BAT sector is shared by the others)
    `write -P 0x92 ${block - 2048} 4096`, // across the block 0/1 boundary
    `write -P 0x93 ${size - 512 * 7} 3584`, // the last sectors
    `write -z ${2 * 4096} 65536`, // zero write into an allocated block
    `write -P 0x94 ${block / 2} ${Math.min(2 * block, size - block / 2)}`, // spans blocks
  ];
  for (let i = 0; i < 12; i++) {
    const len = 512 * (1 + Math.floor(r() * 300));
    const off = 512 * Math.floor(r() * ((size - len) / 512));
    const pat = 1 + Math.floor(r() * 254);
    cmds.push(r() < 0.2 ? `write -z ${off} ${len}` : `write -P ${pat} ${off} ${len}`);
  }
  cmds.push("flush");
  return cmds;
}

async function virtualSize(img: string): Promise<number> {
  const info = (await runOk(["qemu-img", "info", "--output=json", img])).stdout;
  return Number(info.match(/"virtual-size": *(\d+)/)![1]);
}

async function checkClean(img: string): Promise<void> {
  const check = await run(["qemu-img", "check", "-f", "vhdx", img]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  assert.match(check.stdout, /No errors were found on the image/);
}

Deno.test("vhdx: writes through NBD match qemu-io on the image, check clean", async (t) => {
  await withTempDir(async (dir) => {
    const corpus = (await buildCorpus(dir)).filter((c) => c.name !== "empty.vhdx");
    const blocks: Record<string, number> = {
      "conv1m.vhdx": MiB,
      "dyn.vhdx": 8 * MiB,
      "nozero.vhdx": 2 * MiB,
      "big32m.vhdx": 32 * MiB,
      "fixed.vhdx": MiB,
    };
    for (const [i, { name }] of corpus.entries()) {
      await t.step(name, async () => {
        const img = `${dir}/${name}`;
        const viaNbd = `${img}.nbd`;
        const direct = `${img}.direct`;
        await Deno.copyFile(img, viaNbd);
        await Deno.copyFile(img, direct);
        const cmds = writeScript(await virtualSize(img), blocks[name]!, 100 + i);
        await withServer({ dir, image: viaNbd, args: ["-f", "vhdx"] }, async (s) => {
          await qio(s.uri, cmds, "raw");
        });
        await qio(direct, cmds, "vhdx");
        await runOk(["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", viaNbd, direct]);
        await checkClean(viaNbd);
        // The data write GUID changed (the first write rewrote both headers).
        const before = await Deno.readFile(img);
        const after = await Deno.readFile(viaNbd);
        assert.notDeepEqual(activeHeader(after).dataGuid, activeHeader(before).dataGuid);
        assert.ok(activeHeader(after).seq > activeHeader(before).seq);
        // And the image reads the same in qemu-nbd.
        await withServer({ dir, kind: "qemu-nbd", image: viaNbd, args: ["-r"] }, async (q) => {
          await runOk(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", direct, q.uri]);
        });
      });
    }
  });
});

/** The current header of an image (higher sequence number of the two), a few fields. */
function activeHeader(b: Uint8Array): {
  at: number;
  seq: bigint;
  dataGuid: Uint8Array;
  logOffset: number;
} {
  const v = new DataView(b.buffer, b.byteOffset);
  const s1 = v.getBigUint64(0x10000 + 8, true);
  const s2 = v.getBigUint64(0x20000 + 8, true);
  const at = s1 > s2 ? 0x10000 : 0x20000;
  return {
    at,
    seq: s1 > s2 ? s1 : s2,
    dataGuid: b.slice(at + 32, at + 48),
    logOffset: Number(v.getBigUint64(at + 72, true)),
  };
}

/** BAT region offset from the region table. */
function batOffset(b: Uint8Array): number {
  const v = new DataView(b.buffer, b.byteOffset);
  const n = v.getUint32(0x30000 + 8, true);
  for (let i = 0; i < n; i++) {
    const at = 0x30000 + 16 + 32 * i;
    if (v.getUint32(at, true) === 0x2dc27766) return Number(v.getBigUint64(at + 16, true));
  }
  throw new Error("no BAT region");
}

/**
 * Makes `img` (a 1 MiB-block dynamic image with block 0 allocated) dirty: a log entry that
 * allocates block 2 at the end of the file (four data sectors and its BAT entry) and zeroes
 * 8 KiB of block 0, with a last file offset that is not a whole MiB (qemu rounds it up).
 */
async function makeDirty(img: string): Promise<void> {
  const b = await Deno.readFile(img);
  const v = new DataView(b.buffer);
  const h = activeHeader(b);
  const bat = batOffset(b);
  const end = Math.ceil(b.length / MiB) * MiB;
  const batSector = b.slice(bat, bat + 4096);
  new DataView(batSector.buffer).setBigUint64(2 * 8, BigInt(end) | 6n, true);
  const data = (seed: number) => {
    const d = new Uint8Array(4096);
    for (let i = 0; i < d.length; i++) d[i] = (i * 7 + seed) & 0xff;
    return d;
  };
  const logGuid = crypto.getRandomValues(new Uint8Array(16));
  const entry = encodeLogEntry({
    sequence: 0x100000005n,
    logGuid,
    flushedFileOffset: b.length,
    lastFileOffset: end + 4 * 4096,
    writes: [
      { fileOffset: end, data: data(1) },
      { fileOffset: end + 4096, data: data(2) },
      { fileOffset: end + 8192, data: data(3) },
      { fileOffset: end + 12288, data: data(4) },
      { fileOffset: bat, data: batSector },
      { fileOffset: (Number(v.getBigUint64(bat, true)) & ~0xfffff) + 4096, zeroLength: 8192 },
    ],
  });
  b.set(entry, h.logOffset);
  b.set(logGuid, h.at + 48);
  v.setUint32(h.at + 4, crc32cWithHole(b.subarray(h.at, h.at + 4096), 4), true);
  await Deno.writeFile(img, b);
}

Deno.test("vhdx: a dirty log is refused read-only and replayed read-write as qemu", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/dirty.vhdx`;
    await qimg("create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "5M");
    await qio(img, ["write -P 0x61 0 64k", "write -P 0x62 3M 4k"], "vhdx");
    await makeDirty(img);
    // Read-only: qemu's message and hint.
    const d = await run([...serverArgv("denbd"), "-r", "-k", `${dir}/d.sock`, img]);
    const q = await run(["qemu-nbd", "-r", "-k", `${dir}/q.sock`, img]);
    assert.equal(d.code, 1);
    assert.equal(q.code, 1);
    const strip = (s: string) => s.trim().replace(/^[^:]*: /, "");
    assert.match(d.stderr, /contains a log that needs to be replayed/);
    assert.equal(strip(d.stderr), strip(q.stderr));
    // Read-write: both replay; the guest sees the entry's writes.
    await sideBySide(
      dir,
      img,
      (c) => ({ args: ["-f", "vhdx", "-t"], image: c }),
      async (ds, qs) => {
        await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", ds.uri, qs.uri]);
        assert.equal(await nbdinfo("--size", ds.uri), await nbdinfo("--size", qs.uri));
        // Block 2 holds the four data sectors, block 0 lost 8 KiB to the zero descriptor.
        await runOk(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0 4k 8k", ds.uri]);
        await runOk(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x61 12k 52k", ds.uri]);
        const r = await runOk(["qemu-io", "-f", "raw", "-r", "-c", "read -v 2M 16", ds.uri]);
        assert.match(r.stdout, /00200000:\s+01 08 0f 16/);
        // The replayed copy: clean for qemu, no log left (a read-only open works).
        await checkClean(`${img}.denbd`);
        await runOk(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", `${img}.denbd`, qs.uri]);
      },
    );
  });
});

/** Patches a copy of `img`: little-endian fields, then optionally the header checksums. */
async function corrupt(
  img: string,
  out: string,
  patch: (v: DataView, b: Uint8Array) => void,
  fixHeaders = false,
  cut = 0,
): Promise<void> {
  const b = (await Deno.readFile(img)).slice(0);
  const v = new DataView(b.buffer);
  patch(v, b);
  if (fixHeaders) {
    for (const at of [0x10000, 0x20000]) {
      v.setUint32(at + 4, crc32cWithHole(b.subarray(at, at + 4096), 4), true);
    }
  }
  await Deno.writeFile(out, b.subarray(0, b.length - cut));
}

Deno.test("vhdx: damaged images fail to open with qemu-nbd's messages", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.vhdx`;
    await qimg("create", "-q", "-f", "vhdx", "-o", "block_size=1M", base, "4M");
    await qio(base, ["write -P 0x5a 1M 4k"], "vhdx");
    const b = await Deno.readFile(base);
    const bat = batOffset(b);
    const fileLen = b.length;
    const cases: {
      name: string;
      patch: (v: DataView, b: Uint8Array) => void;
      fix?: boolean;
      cut?: number;
    }[] = [
      { name: "file signature", patch: (_v, b) => b[0] = 0x56 },
      {
        name: "both header checksums",
        patch: (_v, b) => (b[0x10000 + 100] = 1, b[0x20000 + 100] = 1),
      },
      {
        name: "equal sequence numbers",
        patch: (v) => v.setBigUint64(0x20008, v.getBigUint64(0x10008, true), true),
        fix: true,
      },
      {
        name: "log version",
        patch: (v) => (v.setUint16(0x10040, 1, true), v.setUint16(0x20040, 1, true)),
        fix: true,
      },
      {
        name: "log offset",
        patch: (v) => (v.setBigUint64(0x10048, 4096n, true), v.setBigUint64(0x20048, 4096n, true)),
        fix: true,
      },
      { name: "region table checksum", patch: (_v, b) => b[0x30000 + 200] = 1 },
      { name: "metadata signature", patch: (_v, b) => b[0x300000] = 0 },
      {
        // A differencing image: qemu 7.2 refuses a parent locator.
        name: "parent locator",
        patch: (v, b) => {
          const md = 3 * MiB;
          v.setUint16(md + 10, 6, true);
          b.set(
            [
              0x2d,
              0x5f,
              0xd3,
              0xa8,
              0x0b,
              0xb3,
              0x4d,
              0x45,
              0xab,
              0xf7,
              0xd3,
              0xd8,
              0x48,
              0x34,
              0xab,
              0x0c,
            ],
            md + 32 + 32 * 5,
          );
          v.setUint32(md + 32 + 32 * 5 + 16, 0x10100, true);
          v.setUint32(md + 32 + 32 * 5 + 20, 64, true);
          v.setUint32(md + 32 + 32 * 5 + 24, 4, true);
        },
      },
      {
        name: "unknown required metadata",
        patch: (v, b) => {
          const md = 3 * MiB;
          v.setUint16(md + 10, 6, true);
          b.fill(0x77, md + 32 + 32 * 5, md + 32 + 32 * 5 + 16);
          v.setUint32(md + 32 + 32 * 5 + 24, 4, true);
        },
      },
      {
        // The logical sector size item (the fourth, after 8 + 8 + 16 bytes of items).
        name: "logical sector 4096",
        patch: (v) => v.setUint32(3 * MiB + 0x10000 + 32, 4096, true),
      },
      {
        name: "block size 512k",
        patch: (v) => v.setUint32(3 * MiB + 0x10000, 512 * 1024, true),
      },
      {
        name: "unknown required region",
        patch: (v, b) => {
          const rt = 0x30000;
          v.setUint32(rt + 8, 3, true);
          b.fill(0x66, rt + 16 + 64, rt + 16 + 80);
          v.setBigUint64(rt + 16 + 80, BigInt(8 * MiB), true);
          v.setUint32(rt + 16 + 88, MiB, true);
          v.setUint32(rt + 16 + 92, 1, true);
          v.setUint32(rt + 4, crc32cWithHole(b.subarray(rt, rt + 0x10000), 4), true);
        },
      },
      {
        name: "BAT entry past the end",
        patch: (v) => v.setBigUint64(bat + 8, BigInt(fileLen + 16 * MiB) | 6n, true),
      },
      {
        name: "BAT entry end past the end",
        patch: (v) => v.setBigUint64(bat + 8, BigInt(fileLen - MiB) | 6n, true),
        cut: 4096,
      },
      {
        name: "BAT entry over the log",
        patch: (v) => v.setBigUint64(bat + 8, BigInt(MiB) | 6n, true),
      },
    ];
    for (const c of cases) {
      const bad = `${dir}/bad-${c.name.replaceAll(" ", "-")}.vhdx`;
      await corrupt(base, bad, c.patch, c.fix, c.cut);
      const res = await run([...serverArgv("denbd"), "-k", `${dir}/d.sock`, "-f", "vhdx", bad], {
        timeoutMs: 15_000,
      });
      const q = await run(["qemu-nbd", "-k", `${dir}/q.sock`, "-f", "vhdx", bad], {
        timeoutMs: 15_000,
      });
      assert.equal(res.code, 1, `${c.name}: ${res.stderr}`);
      assert.equal(q.code, 1, `${c.name}: qemu-nbd opened it`);
      assert.ok(res.stderr.includes(`Failed to blk_new_open '${bad}': `), res.stderr);
      const lines = (s: string) => s.trim().split("\n").map((l) => l.replace(/^[^:]*: /, ""));
      assert.deepEqual(lines(res.stderr), lines(q.stderr), c.name);
    }
  });
});

Deno.test("vhdx: -l fails after opening, in qemu-nbd's words", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/a.vhdx`;
    await qimg("create", "-q", "-f", "vhdx", img, "1M");
    const d = await run([...serverArgv("denbd"), "-k", `${dir}/d.sock`, "-l", "s1", img]);
    const q = await run(["qemu-nbd", "-k", `${dir}/q.sock`, "-l", "s1", img]);
    assert.equal(d.code, 1);
    assert.equal(q.code, 1);
    const line = (s: string) => s.trim().replace(/^[^:]*: /, "");
    assert.equal(line(d.stderr), line(q.stderr));
  });
});

Deno.test("vhdx: kill -9 during allocating writes leaves a clean image", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/crash.vhdx`;
    await qimg("create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "256M");
    const r = rng(7);
    let landed = 0;
    for (let run_ = 0; run_ < 4; run_++) {
      // 4 KiB writes of pattern k at distinct offsets, mostly into new blocks, with flushes.
      const cmds: string[] = [];
      const written: { off: number; pat: number }[] = [];
      for (let k = 0; k < 2000; k++) {
        const off = 4096 * Math.floor(r() * (256 * MiB / 4096));
        if (written.some((w) => w.off === off)) continue;
        const pat = 1 + ((run_ * 2000 + k) % 250);
        written.push({ off, pat });
        cmds.push(`write -P ${pat} ${off} 4k`);
        if (k % 50 === 49) cmds.push("flush");
      }
      const server = await Server.start({ dir, image: img, args: ["-f", "vhdx", "-t"] });
      try {
        const client = run(
          ["qemu-io", "-f", "raw", ...cmds.flatMap((c) => ["-c", c]), server.uri],
          {
            timeoutMs: 20_000,
          },
        );
        await sleep(100 + Math.floor(r() * 300));
        assert.ok(server.running, `run ${run_}: the server ended before the kill`);
        Deno.kill(server.pid, "SIGKILL");
        const res = await client;
        // qemu-io lost its connection when the kill landed mid-workload.
        if (res.code !== 0) landed++;
      } finally {
        await server.stop();
      }
      await checkClean(img);
      // Every 4 KiB the workload touched reads as zeroes or as its whole pattern (or a later one).
      const raw = `${dir}/crash.raw`;
      await qimg("convert", "-O", "raw", img, raw);
      const g = await Deno.readFile(raw);
      for (const w of written) {
        const s = g.subarray(w.off, w.off + 4096);
        const first = s[0]!;
        assert.ok(s.every((x) => x === first), `run ${run_}: torn 4 KiB at ${w.off}`);
      }
    }
    assert.ok(landed >= 2, `only ${landed} of 4 kills landed during the workload`);
  });
});

Deno.test("vhdx: every BAT state reads as qemu-nbd reads it", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/states.vhdx`;
    await qimg("create", "-q", "-f", "vhdx", "-o", "block_size=1M", base, "8M");
    await qio(base, ["write -P 0x31 0 1M", "write -P 0x32 7M 4k"], "vhdx");
    const img = `${dir}/states-patched.vhdx`;
    // Blocks 1..5: not present, undefined, zero, unmapped, unmapped (v0.95); block 6 partially
    // present (differencing, an I/O error in qemu).
    await corrupt(base, img, (v, b) => {
      const bat = batOffset(b);
      [0, 1, 2, 3, 5].forEach((st, i) => v.setBigUint64(bat + 8 * (i + 1), BigInt(st), true));
      v.setBigUint64(bat + 8 * 6, 7n, true);
    });
    await sideBySide(
      dir,
      img,
      (c) => ({ args: ["-f", "vhdx", "-t", "-r"], image: c }),
      async (d, q) => {
        for (const s of [d, q]) {
          await runOk(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x31 0 1M", s.uri]);
          await runOk(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0 1M 5M", s.uri]);
          await runOk(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x32 7M 4k", s.uri]);
        }
        const bad = async (s: Server) =>
          (await run(["qemu-io", "-f", "raw", "-r", "-c", "read 6M 4k", s.uri])).stdout +
          (await run(["qemu-io", "-f", "raw", "-r", "-c", "read 6M 4k", s.uri])).stderr;
        const [bd, bq] = [await bad(d), await bad(q)];
        assert.match(bq, /Input\/output error/);
        assert.equal(bd.replace(/[0-9.]+ sec.*$/gm, ""), bq.replace(/[0-9.]+ sec.*$/gm, ""));
        assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri));
      },
    );
  });
});
