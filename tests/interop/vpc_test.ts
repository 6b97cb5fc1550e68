/**
 * VHD (vpc) exports against qemu-nbd 7.2: images made at test time by qemu-img (dynamic, fixed,
 * force_size, converted from a raw pattern image) and scribbled on by qemu-io, dynamic images
 * with other block sizes from the test's own encoder, and copies with the footer patched
 * (creator application, current_size, differencing type) to exercise qemu's size rules. denbd
 * and qemu-nbd serve copies of the same image side by side; compared: the guest bytes
 * (`qemu-img compare`), `nbdinfo --size`, `--map`, `--map=qemu:allocation-depth` and the
 * advertised flags, with -f vpc, probed and through --image-opts (force_size_calc). Writes go
 * through NBD with qemu-io and, as the same commands, straight into a copy with qemu-io: the
 * two must compare identical and be byte-identical files. Damaged images must fail to open
 * with qemu-nbd's message; a kill -9 loop during writes must leave an image both open cleanly.
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
  sleep,
  withServer,
  withServers,
  withTempDir,
} from "./_harness.ts";
import { editDynamicFooters, editFooter, emptyDynamicVhd } from "./_vpc_images.ts";

const SRC_SIZE = 6 * MiB + 300 * 1024;

async function qimg(...args: string[]): Promise<void> {
  await runOk(["qemu-img", ...args]);
}

async function qio(target: string, cmds: readonly string[], fmt: string): Promise<void> {
  await runOk(["qemu-io", "-f", fmt, ...cmds.flatMap((c) => ["-c", c]), target]);
}

async function patched(src: string, out: string, fn: (b: Uint8Array) => void): Promise<void> {
  const b = await Deno.readFile(src);
  fn(b);
  await Deno.writeFile(out, b);
}

/** The corpus (all in `dir`); names ending in -fixed are fixed images (probed as raw). */
async function buildCorpus(dir: string): Promise<string[]> {
  const p = (n: string) => `${dir}/${n}`;
  await makeSparseImage(p("src.raw"), SRC_SIZE, [
    { offset: 0, length: MiB + 100 * 1024, fill: "random", seed: 3 },
    { offset: 3 * MiB, length: 64 * 1024, fill: 0x22 },
    { offset: 5 * MiB + 512, length: 4096, fill: "random", seed: 9 },
  ]);
  await Promise.all([
    (async () => {
      await qimg("convert", "-O", "vpc", p("src.raw"), p("dyn.vhd"));
      await qio(p("dyn.vhd"), ["write -P 0x44 4M 8k", "write -P 0x45 2047k 2k"], "vpc");
    })(),
    qimg("create", "-q", "-f", "vpc", p("empty.vhd"), "5M"),
    (async () => {
      await qimg("create", "-q", "-f", "vpc", "-o", "force_size=on", p("forced.vhd"), "7M");
      await qio(p("forced.vhd"), ["write -P 0x66 6M 1M", "write -P 0x67 100k 3k"], "vpc");
    })(),
    (async () => {
      await qimg("create", "-q", "-f", "vpc", "-o", "subformat=fixed", p("f-fixed.vhd"), "6M");
      await qio(p("f-fixed.vhd"), ["write -P 0x77 1028k 64k", "write -P 0x78 5M 512k"], "vpc");
    })(),
    qimg("convert", "-O", "vpc", "-o", "subformat=fixed", p("src.raw"), p("conv-fixed.vhd")),
    (async () => {
      // Other block sizes, then qemu-io writes into them.
      for (const bs of [4096, 64 * 1024, 512 * 1024]) {
        const name = p(`bs${bs}.vhd`);
        await Deno.writeFile(name, emptyDynamicVhd(5 * MiB + 4096, bs));
        await qio(name, ["write -P 0x31 0 5000", "write -P 0x32 2M 300k"], "vpc");
      }
    })(),
  ]);
  // The size rules: a qemu image (CHS size 5257216) whose current_size is larger.
  const big = (_b: Uint8Array) => ({ currentSize: BigInt(5 * MiB + 100 * 1024) });
  await qio(p("empty.vhd"), ["write -P 0x12 4M 1M"], "vpc");
  await patched(p("empty.vhd"), p("win.vhd"), (b) => {
    editDynamicFooters(b, { ...big(b), creatorApp: "win " });
  });
  await patched(p("empty.vhd"), p("vpc.vhd"), (b) => {
    editDynamicFooters(b, { ...big(b), creatorApp: "vpc " });
  });
  await patched(p("empty.vhd"), p("d2v.vhd"), (b) => {
    editDynamicFooters(b, { ...big(b), creatorApp: "d2v " });
  });
  await patched(p("dyn.vhd"), p("diff.vhd"), (b) => editDynamicFooters(b, { type: 4 }));
  await patched(p("f-fixed.vhd"), p("win-fixed.vhd"), (b) => {
    editFooter(b, b.length - 512, { creatorApp: "win ", currentSize: BigInt(6 * MiB + 4096) });
  });
  return [
    "dyn.vhd",
    "empty.vhd",
    "forced.vhd",
    "f-fixed.vhd",
    "conv-fixed.vhd",
    "bs4096.vhd",
    "bs65536.vhd",
    "bs524288.vhd",
    "win.vhd",
    "vpc.vhd",
    "d2v.vhd",
    "diff.vhd",
    "win-fixed.vhd",
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

/** The flags and limits nbdinfo prints, without the names that differ per server. */
function flags(info: string): string {
  return info.split("\n").filter((l) => /^\s*(can_|is_|block_size|content)/.test(l)).join("\n");
}

/** Everything a client sees of an export: compared between the two servers. */
async function compareViews(img: string, d: Server, q: Server) {
  await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, q.uri]);
  assert.equal(await nbdinfo("--size", d.uri), await nbdinfo("--size", q.uri), `size of ${img}`);
  assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri), `map of ${img}`);
  // Served only under -A (both fail the same way without it).
  const depth = async (s: Server) => {
    const r = await run(["nbdinfo", "--map=qemu:allocation-depth", s.uri]);
    return `${r.code} ${r.stdout}`;
  };
  assert.equal(await depth(d), await depth(q), `depth of ${img}`);
  assert.equal(flags(await nbdinfo(d.uri)), flags(await nbdinfo(q.uri)), `flags of ${img}`);
}

Deno.test("vpc: reads, sizes, maps and flags as qemu-nbd (-f vpc, probed, --image-opts)", async (t) => {
  await withTempDir(async (dir) => {
    const names = await buildCorpus(dir);
    for (const name of names) {
      const img = `${dir}/${name}`;
      await t.step(`${name}, -f vpc`, async () => {
        await sideBySide(
          dir,
          img,
          (c) => ({ args: ["-f", "vpc", "-t", "-A"], image: c }),
          (d, q) => compareViews(img, d, q),
        );
      });
      if (!name.endsWith("-fixed.vhd")) {
        await t.step(`${name}, probed, read-only`, async () => {
          await sideBySide(
            dir,
            img,
            (c) => ({ args: ["-t", "-r"], image: c }),
            (d, q) => compareViews(img, d, q),
          );
        });
      }
    }
    await t.step("the sizes follow qemu's rule", async () => {
      const size = async (n: string) =>
        Number(
          (await runOk(["qemu-img", "info", "--output=json", "-f", "vpc", `${dir}/${n}`])).stdout
            .match(/"virtual-size": *(\d+)/)![1],
        );
      // A test that cannot fail is a defect: the patched sizes really differ.
      assert.equal(await size("win.vhd"), 5 * MiB + 100 * 1024);
      assert.equal(await size("vpc.vhd"), 5257216);
    });
    for (const calc of ["chs", "current_size"]) {
      for (const name of ["win.vhd", "vpc.vhd", "f-fixed.vhd", "win-fixed.vhd"]) {
        await t.step(`--image-opts force_size_calc=${calc}, ${name}`, async () => {
          const img = `${dir}/${name}`;
          await sideBySide(
            dir,
            img,
            (c) => ({
              args: ["-t", "--image-opts", `driver=vpc,force_size_calc=${calc},file.filename=${c}`],
            }),
            (d, q) => compareViews(img, d, q),
          );
        });
      }
    }
    await t.step("the converted images read as their raw source", async () => {
      for (const name of ["conv-fixed.vhd"]) {
        await withServer(
          { dir, image: `${dir}/${name}`, args: ["-f", "vpc", "-r"] },
          async (s) => {
            // The export is larger (the CHS rounding): compare accepts a zero tail.
            await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", `${dir}/src.raw`, s.uri]);
          },
        );
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

/** qemu-io writes: fixed ones (new blocks, block boundaries, zeroes), then random ones. */
function writeScript(size: number, seed: number): string[] {
  const r = rng(seed);
  const cmds = [
    `write -P 0x91 ${2 * MiB - 2048} 4096`, // across the 2 MiB block 0/1 boundary
    `write -P 0x92 ${size - 4096 + 123} 777`, // the last block, unaligned
    `write -z ${3 * MiB + 512} 65536`, // zero write (qemu writes zero data)
    `write -P 0x94 ${MiB / 2} ${2 * MiB + 4096}`, // spans blocks
  ];
  for (let i = 0; i < 10; i++) {
    const len = 1 + Math.floor(r() * 200_000);
    const off = Math.floor(r() * (size - len));
    const pat = 1 + Math.floor(r() * 254);
    cmds.push(r() < 0.15 ? `write -z ${off} ${len}` : `write -P ${pat} ${off} ${len}`);
  }
  return cmds;
}

async function virtualSize(img: string): Promise<number> {
  return Number(
    (await runOk(["qemu-img", "info", "--output=json", "-f", "vpc", img])).stdout
      .match(/"virtual-size": *(\d+)/)![1],
  );
}

Deno.test("vpc: writes through NBD match qemu-io on the image, byte for byte", async (t) => {
  await withTempDir(async (dir) => {
    const names = await buildCorpus(dir);
    for (const [i, name] of names.entries()) {
      await t.step(name, async () => {
        const img = `${dir}/${name}`;
        const viaNbd = `${img}.nbd`;
        const direct = `${img}.direct`;
        await Deno.copyFile(img, viaNbd);
        await Deno.copyFile(img, direct);
        const cmds = writeScript(await virtualSize(img), 100 + i);
        await withServer({ dir, image: viaNbd, args: ["-f", "vpc"] }, async (s) => {
          await qio(s.uri, cmds, "raw");
        });
        await qio(direct, cmds, "vpc");
        await runOk(["qemu-img", "compare", "-f", "vpc", "-F", "vpc", viaNbd, direct]);
        assert.equal(await sha256File(viaNbd), await sha256File(direct), name);
      });
    }
  });
});

Deno.test("vpc: damaged images fail to open with qemu-nbd's message", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.vhd`;
    await qimg("create", "-q", "-f", "vpc", base, "4M");
    await qio(base, ["write -P 0x5a 1M 4k"], "vpc");
    const fixed = `${dir}/base-fixed.vhd`;
    await qimg("create", "-q", "-f", "vpc", "-o", "subformat=fixed", fixed, "1M");
    const u32 = (at: number, x: number) => (b: Uint8Array) =>
      new DataView(b.buffer).setUint32(at, x);
    const u64 = (at: number, x: bigint) => (b: Uint8Array) =>
      new DataView(b.buffer).setBigUint64(at, x);
    const cases: {
      name: string;
      src?: string;
      edit: (b: Uint8Array) => void;
      /** qemu-nbd prints the same message (else denbd's own, beyond qemu's checks). */
      qemuSame: boolean;
      msg: RegExp;
    }[] = [
      {
        name: "checksum",
        edit: (b) => b[30]! ^= 1,
        qemuSame: true,
        msg: /Incorrect header checksum/,
      },
      {
        name: "fixed footer",
        src: fixed,
        edit: (b) => b[b.length - 512]! ^= 1,
        qemuSame: true,
        msg: /invalid VPC image/,
      },
      {
        name: "too large",
        edit: (b) => editFooter(b, 0, { currentSize: 1n << 42n, chs: [65535, 16, 255] }),
        qemuSame: true,
        msg: /Could not open '.*': File too large/,
      },
      {
        name: "header offset",
        edit: (b) => editFooter(b, 0, { dataOffset: 0x7fffffffffffffffn }),
        qemuSame: true,
        msg: /Error reading dynamic VHD header/,
      },
      {
        name: "header magic",
        edit: (b) => editFooter(b, 0, { dataOffset: 1n << 32n }),
        qemuSame: true,
        msg: /Invalid header magic/,
      },
      {
        name: "block size",
        edit: u32(512 + 32, 1000),
        qemuSame: true,
        msg: /Invalid block size 1000/,
      },
      { name: "table small", edit: u32(512 + 28, 1), qemuSame: true, msg: /Page table too small/ },
      {
        name: "table huge",
        edit: u32(512 + 28, 0x80000000),
        qemuSame: true,
        msg: /Max Table Entries too large \(-2147483648\)/,
      },
      {
        name: "table offset",
        edit: u64(512 + 16, 0x7fffffffffffffffn),
        qemuSame: true,
        msg: /Error reading pagetable/,
      },
      {
        name: "truncated",
        edit: u64(512 + 16, 1n << 24n),
        qemuSame: true,
        msg: /The image has been truncated/,
      },
      {
        name: "entry past the end",
        edit: u32(1536, 0x10000),
        qemuSame: true,
        msg: /The image has been truncated/,
      },
      {
        // Block 1 (unused; block 0 is at sector 4) pointed at the dynamic header.
        name: "entry on the header",
        edit: u32(1536 + 4, 1),
        qemuSame: false,
        msg: /block 1 .*overlaps the dynamic disk header/,
      },
      {
        name: "entries overlap",
        edit: u32(1536 + 4, 5),
        qemuSame: false,
        msg: /blocks 0 and 1 overlap/,
      },
      {
        name: "size calc",
        edit: () => {},
        qemuSame: true,
        msg: /Invalid size calculation mode: 'x'/,
      },
    ];
    for (const c of cases) {
      const bad = `${dir}/bad-${c.name.replaceAll(" ", "-")}.vhd`;
      await patched(c.src ?? base, bad, c.edit);
      const target = c.name === "size calc"
        ? ["--image-opts", `driver=vpc,force_size_calc=x,file.filename=${bad}`]
        : ["-f", "vpc", bad];
      const sock = `${dir}/bad.sock`;
      const res = await run([...serverArgv("denbd"), "-k", sock, ...target], { timeoutMs: 15_000 });
      assert.equal(res.code, 1, `${c.name}: ${res.stderr}`);
      assert.ok(res.stderr.includes("Failed to blk_new_open '"), res.stderr);
      assert.match(res.stderr, c.msg, c.name);
      if (c.qemuSame) {
        const q = await run(["qemu-nbd", "-k", sock, ...target], { timeoutMs: 15_000 });
        // The message after "Failed to blk_new_open 'NAME': " (for --image-opts denbd's opener
        // names the file where qemu-nbd repeats the option string).
        const msg = (s: string) => s.trim().split("': ").slice(1).join("': ");
        assert.equal(msg(res.stderr), msg(q.stderr), c.name);
      }
    }
  });
});

Deno.test("vpc: kill -9 during writes leaves an image qemu and denbd open and read", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/crash.vhd`;
    await qimg("create", "-q", "-f", "vpc", img, "64M");
    const deadline = Date.now() + 20_000;
    for (let iter = 0; iter < 4 && Date.now() < deadline; iter++) {
      const sock = `${dir}/crash.sock`;
      const server = new Deno.Command(serverArgv("denbd")[0]!, {
        args: [...serverArgv("denbd").slice(1), "-t", "-k", sock, "-f", "vpc", img],
        stdout: "null",
        stderr: "null",
      }).spawn();
      for (let i = 0; i < 100; i++) {
        try {
          await Deno.stat(sock);
          break;
        } catch {
          await sleep(50);
        }
      }
      const cmds: string[] = [];
      const r = rng(7 + iter);
      for (let i = 0; i < 3000; i++) {
        const off = Math.floor(r() * 63 * MiB);
        cmds.push(`write -P ${1 + (i % 250)} ${off} ${4096 + Math.floor(r() * 65536)}`);
      }
      const client = new Deno.Command("qemu-io", {
        args: ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), `nbd+unix:///?socket=${sock}`],
        stdout: "null",
        stderr: "null",
      }).spawn();
      await sleep(200 + iter * 200);
      // The writes must still be running when the server dies (else nothing is tested).
      const done = await Promise.race([client.status.then(() => true), sleep(0).then(() => false)]);
      assert.ok(!done, "qemu-io finished before the kill");
      server.kill("SIGKILL");
      await server.status;
      await client.status;
      await Deno.remove(sock).catch(() => {});
      // Both open it and read all of it the same way.
      await runOk(["qemu-img", "info", "-f", "vpc", img]);
      await withServer({ dir, image: img, args: ["-f", "vpc", "-r"] }, async (s) => {
        await runOk(["qemu-img", "compare", "-f", "vpc", "-F", "raw", img, s.uri]);
      });
    }
  });
});
