/**
 * QED exports against qemu-nbd 7.2: images made at test time by qemu-img (several cluster and
 * table sizes, converted from a raw pattern image, empty, over a raw backing file, a
 * qed → qed → qcow2 chain) and scribbled on by qemu-io (data, zero clusters); denbd and
 * qemu-nbd serve copies of the same image side by side. Compared: the guest bytes
 * (`qemu-img compare`), `nbdinfo --size`, `--map`, `--map=qemu:allocation-depth` and the
 * advertised flags and block sizes, with -f qed and probed. Writes (partial clusters, across L2
 * tables, into zero clusters, over the backing file, zero writes aligned and not) go through NBD
 * with qemu-io to denbd and, as the same commands, straight into a copy with qemu-io: the files
 * must read the same, `qemu-img check` clean and be byte-identical (qemu's allocation order).
 * The need-check bit: set by allocating writes until close; a dirty image opened read-write is
 * repaired as qemu-nbd repairs it (byte-identical files). Damaged images fail with
 * qemu-nbd's message; kill -9 during writes leaves images `qemu-img check` accepts.
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
  sha256File,
  sleep,
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

/** The corpus in `dir`: image names (backing files stay in `dir` under other names). */
async function buildCorpus(dir: string): Promise<string[]> {
  const p = (n: string) => `${dir}/${n}`;
  await makeSparseImage(p("src.raw"), SRC_SIZE, [
    { offset: 0, length: MiB + 100 * 1024, fill: "random", seed: 3 },
    { offset: 3 * MiB, length: 64 * 1024, fill: 0x22 },
    { offset: 5 * MiB + 512, length: 4096, fill: "random", seed: 9 },
  ]);
  await Promise.all([
    (async () => {
      await qimg("convert", "-O", "qed", p("src.raw"), p("conv.qed"));
      await qio(p("conv.qed"), ["write -P 0x44 4M 8k", "write -z 3M 128k"], "qed");
    })(),
    (async () => {
      // 4 KiB clusters, 2-cluster tables: an L2 table maps 4 MiB, so several tables.
      const o = "cluster_size=4096,table_size=2";
      await qimg("convert", "-O", "qed", "-o", o, p("src.raw"), p("small.qed"));
      await qio(p("small.qed"), ["write -P 0x45 4092k 8k", "write -z 8k 8k"], "qed");
    })(),
    qimg("create", "-q", "-f", "qed", p("empty.qed"), "5M"),
    (async () => {
      await qimg(
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=1M,table_size=16",
        p("big.qed"),
        "9M",
      );
      await qio(
        p("big.qed"),
        ["write -P 0x46 1536k 4k", "write -z 4M 2M", "write -P 1 8M 1M"],
        "qed",
      );
    })(),
    (async () => {
      // Over a raw backing file smaller than the image (no probing: QED_F_BACKING_FORMAT_NO_PROBE).
      await qimg(
        ..."create -q -f qed -o cluster_size=16k -b src.raw -F raw".split(" "),
        p("over-raw.qed"),
        "8M",
      );
      await qio(p("over-raw.qed"), [
        "write -P 0x47 100k 5k",
        "write -z 3M 64k",
        "write -P 0x48 7M 4k",
      ], "qed");
    })(),
    (async () => {
      await qimg("convert", "-O", "qcow2", p("src.raw"), p("base.qcow2"));
      await qimg(...("create -q -f qed -b base.qcow2 -F qcow2".split(" ")), p("mid.qed"), "7M");
      await qio(p("mid.qed"), ["write -P 0x49 512k 64k", "write -z 3M 64k"], "qed");
      await qimg(...("create -q -f qed -b mid.qed -F qed".split(" ")), p("top.qed"), "7M");
      await qio(p("top.qed"), ["write -P 0x4a 540k 4k", "write -P 0x4b 6M 64k"], "qed");
    })(),
  ]);
  return ["conv.qed", "small.qed", "empty.qed", "big.qed", "over-raw.qed", "top.qed"];
}

/** Serves a private copy of `img` on denbd and on qemu-nbd with `args`, then runs `fn`. */
async function sideBySide(
  dir: string,
  img: string,
  args: string[],
  fn: (denbd: Server, qemu: Server, copies: string[]) => Promise<void>,
): Promise<void> {
  const copies = [`${img}.denbd`, `${img}.qemu`];
  for (const c of copies) await Deno.copyFile(img, c);
  await withServers([
    { dir, kind: SERVER_KIND, args, image: copies[0] },
    { dir, kind: "qemu-nbd", args, image: copies[1] },
  ], async ([d, q]) => await fn(d!, q!, copies));
  for (const c of copies) await Deno.remove(c);
}

async function nbdinfo(...args: string[]): Promise<string> {
  return (await runOk(["nbdinfo", ...args])).stdout;
}

/** nbdinfo's description of an export without its URI (flags, sizes, contexts). */
async function describe(uri: string): Promise<string> {
  return (await nbdinfo(uri)).split("\n").filter((l) => !/^\s*uri:/.test(l)).join("\n");
}

/** Everything a client sees of a view: compared between the two servers. */
async function compareViews(img: string | undefined, d: Server, q: Server): Promise<void> {
  for (const s of img === undefined ? [] : [d, q]) {
    await runOk(["qemu-img", "compare", "-f", "qed", "-F", "raw", img!, s.uri]);
  }
  await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, q.uri]);
  assert.equal(await nbdinfo("--size", d.uri), await nbdinfo("--size", q.uri));
  assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri), `map of ${img}`);
  assert.equal(
    await nbdinfo("--map=qemu:allocation-depth", d.uri),
    await nbdinfo("--map=qemu:allocation-depth", q.uri),
    `allocation depth of ${img}`,
  );
  assert.equal(await describe(d.uri), await describe(q.uri), `flags of ${img}`);
}

Deno.test("qed: reads, sizes, maps, depth and flags as qemu-nbd (-f qed, probed)", async (t) => {
  await withTempDir(async (dir) => {
    const names = await buildCorpus(dir);
    for (const name of names) {
      const img = `${dir}/${name}`;
      await t.step(`${name}, -f qed -r`, async () => {
        await sideBySide(
          dir,
          img,
          ["-f", "qed", "-t", "-r", "-A"],
          (d, q) => compareViews(img, d, q),
        );
      });
      await t.step(`${name}, probed, writable`, async () => {
        await sideBySide(dir, img, ["-t", "-A"], async (d, q) => {
          await compareViews(img, d, q);
          assert.doesNotMatch(d.stderr, /probing guessed raw/);
        });
      });
    }
    await t.step("--image-opts driver=qed,file.filename=... (top.qed, its chain)", async () => {
      const img = `${dir}/top.qed`;
      const copies = [`${img}.denbd`, `${img}.qemu`];
      for (const c of copies) await Deno.copyFile(img, c);
      await withServers(
        copies.map((c, i) => ({
          dir,
          kind: i === 0 ? SERVER_KIND : "qemu-nbd" as const,
          args: ["-t", "-r", "-A", "--image-opts", `driver=qed,file.filename=${c}`],
        })),
        ([d, q]) => compareViews(img, d!, q!),
      );
    });
    await t.step("over-raw.qed reads as its backing file where it was not written", async () => {
      await withServer({ dir, image: `${dir}/over-raw.qed`, args: ["-r", "-t"] }, async (s) => {
        const raw = await Deno.readFile(`${dir}/src.raw`);
        const part = `${dir}/part.raw`;
        await Deno.writeFile(part, raw.subarray(MiB, 3 * MiB));
        await runOk([
          "qemu-img",
          "compare",
          "--image-opts",
          `driver=raw,file.filename=${part}`,
          `driver=raw,offset=${MiB},size=${2 * MiB},file.driver=nbd,file.path=${s.socketPath}`,
        ]);
      });
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

/** qemu-io writes: fixed ones (partial clusters, L2 boundaries, zeroes), then random ones. */
function writeScript(size: number, seed: number): string[] {
  const r = rng(seed);
  const cmds = [
    `write -P 0x91 ${4 * MiB - 2048} 4096`, // across an L2 table boundary of small.qed
    `write -P 0x92 ${size - 12345 - 777} 777`, // near the end, unaligned
    `write -P 0x93 ${2 * MiB + 4096} 8192`,
    `write -z ${3 * MiB + 512} 65536`, // zero write, unaligned head and tail
    `write -z ${MiB} ${MiB}`, // aligned zero write
    `write -P 0x94 ${3 * MiB + 8192} 4096`, // into zero clusters
    `write -P 0x95 ${MiB / 2} ${2 * MiB}`,
  ];
  for (let i = 0; i < 12; i++) {
    const len = 1 + Math.floor(r() * 200_000);
    const off = Math.floor(r() * (size - len));
    const pat = 1 + Math.floor(r() * 254);
    cmds.push(r() < 0.2 ? `write -z ${off} ${len}` : `write -P ${pat} ${off} ${len}`);
  }
  return cmds;
}

async function virtualSize(img: string): Promise<number> {
  const info = (await runOk(["qemu-img", "info", "--output=json", img])).stdout;
  return Number(info.match(/"virtual-size": *(\d+)/)![1]);
}

async function checkClean(img: string): Promise<void> {
  const check = await run(["qemu-img", "check", "-f", "qed", img]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  assert.match(check.stdout, /No errors were found on the image/);
}

Deno.test("qed: writes through NBD match qemu-io on the image, check clean", async (t) => {
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
        await withServer({ dir, image: viaNbd, args: ["-f", "qed"] }, async (s) => {
          await qio(s.uri, cmds, "raw");
        });
        await qio(direct, cmds, "qed");
        await runOk(["qemu-img", "compare", "-f", "qed", "-F", "qed", viaNbd, direct]);
        await checkClean(viaNbd);
        // Same allocation order, tables and header as qemu's driver wrote them.
        assert.equal(await sha256File(viaNbd), await sha256File(direct), name);
      });
    }
  });
});

const FEATURES = 16;
const NEED_CHECK = 2;

async function features(img: string): Promise<number> {
  const b = await Deno.readFile(img);
  return Number(new DataView(b.buffer).getBigUint64(FEATURES, true));
}

interface Patch {
  readonly at: number;
  readonly u32?: number;
  readonly u64?: bigint;
  readonly text?: string;
}

/** Patches little-endian fields (or text) of a copy of `img`. */
async function patch(
  img: string,
  out: string,
  patches: readonly Patch[],
): Promise<void> {
  const b = await Deno.readFile(img);
  const v = new DataView(b.buffer);
  for (const p of patches) {
    if (p.text !== undefined) b.set(new TextEncoder().encode(p.text), p.at);
    if (p.u32 !== undefined) v.setUint32(p.at, p.u32, true);
    if (p.u64 !== undefined) v.setBigUint64(p.at, p.u64, true);
  }
  await Deno.writeFile(out, b);
}

/** The file offset of the first L2 table of a default (64 KiB, 4-cluster tables) image. */
async function firstL2(img: string): Promise<number> {
  const b = await Deno.readFile(img);
  const v = new DataView(b.buffer);
  const l1 = Number(v.getBigUint64(40, true));
  return Number(v.getBigUint64(l1, true));
}

Deno.test("qed: the need-check bit, set by allocating writes until close as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/a.qed`;
    await qimg("create", "-q", "-f", "qed", img, "8M");
    await sideBySide(dir, img, ["-f", "qed", "-t"], async (d, q, copies) => {
      for (const c of copies) assert.equal(await features(c) & NEED_CHECK, 0, c);
      for (const s of [d, q]) await qio(s.uri, ["write -P 0x33 64k 4k"], "raw");
      // Set by the allocation, on both servers, and still set after qed's 5 s timer: it runs
      // on qemu's virtual clock, which qemu-nbd never starts.
      for (const c of copies) assert.equal(await features(c) & NEED_CHECK, NEED_CHECK, c);
      await sleep(5500);
      for (const c of copies) assert.equal(await features(c) & NEED_CHECK, NEED_CHECK, c);
      await d.stop();
      await q.stop();
      // Cleared at close; the files are the same.
      for (const c of copies) assert.equal(await features(c) & NEED_CHECK, 0, c);
      assert.equal(await sha256File(copies[0]!), await sha256File(copies[1]!));
    });
  });
});

Deno.test("qed: a dirty image is checked and repaired at a read-write open as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.qed`;
    await qimg("create", "-q", "-f", "qed", base, "16M");
    await qio(base, ["write -P 0x5a 0 200k", "write -P 0x5b 8M 64k", "write -z 4M 128k"], "qed");
    const l2 = await firstL2(base);
    // Dirty, with L2 entry 1 past the end of the file and L1 entry 7 not aligned: fixable.
    const fixable = `${dir}/fixable.qed`;
    await patch(base, fixable, [
      { at: FEATURES, u64: BigInt(NEED_CHECK) },
      { at: l2 + 8, u64: 1n << 40n },
      { at: 64 * 1024 + 7 * 8, u64: 12345n },
    ]);
    // Dirty, with two L2 entries pointing at one cluster: not fixable, opened, the bit cleared
    // all the same (qemu-nbd's open-time drain fires qed's need-check timer).
    const dup = `${dir}/dup.qed`;
    const v = new DataView((await Deno.readFile(base)).buffer);
    await patch(base, dup, [
      { at: FEATURES, u64: BigInt(NEED_CHECK) },
      { at: l2 + 8, u64: v.getBigUint64(l2, true) },
    ]);
    for (const img of [fixable, dup]) {
      await sideBySide(dir, img, ["-f", "qed", "-t", "-A"], async (d, q, copies) => {
        await compareViews(undefined, d, q);
        for (const c of copies) assert.equal(await features(c) & NEED_CHECK, 0, c);
        await d.stop();
        await q.stop();
        assert.equal(await sha256File(copies[0]!), await sha256File(copies[1]!), img);
        // The cluster behind the cleared entry is leaked (exit 3), nothing else.
        const check = await run(["qemu-img", "check", "-f", "qed", copies[0]!]);
        assert.equal(check.code, img === fixable ? 3 : 2, check.stdout + check.stderr);
      });
    }
    // Read-only: nothing is checked or written.
    await sideBySide(dir, fixable, ["-f", "qed", "-r", "-t"], async (d, q, copies) => {
      const before = await sha256File(fixable);
      for (const s of [d, q]) {
        const r = await run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", s.uri]);
        assert.match(r.stdout, /read 65536\/65536/, s.kind);
      }
      await d.stop();
      assert.equal(await sha256File(copies[0]!), before);
    });
  });
});

Deno.test("qed: damaged images fail to open with qemu-nbd's message", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.qed`;
    await qimg("create", "-q", "-f", "qed", base, "4M");
    await qio(base, ["write -P 0x5a 1M 4k"], "qed");
    const cases: { name: string; patches: Patch[] }[] = [
      { name: "magic", patches: [{ at: 0, u32: 0x12345678 }] },
      { name: "features", patches: [{ at: FEATURES, u64: 0x300n }] },
      { name: "cluster size", patches: [{ at: 4, u32: 1000 }] },
      { name: "cluster size big", patches: [{ at: 4, u32: 1 << 27 }] },
      { name: "table size", patches: [{ at: 8, u32: 3 }] },
      { name: "table size 1", patches: [{ at: 8, u32: 1 }] },
      { name: "image size", patches: [{ at: 48, u64: 1000n }] },
      { name: "image size huge", patches: [{ at: 48, u64: 1n << 62n }] },
      { name: "l1 offset", patches: [{ at: 40, u64: 1n << 40n }] },
      { name: "l1 unaligned", patches: [{ at: 40, u64: 65536n + 512n }] },
      { name: "l1 in header", patches: [{ at: 12, u32: 2 }] },
      { name: "header size", patches: [{ at: 12, u32: 0x10000 }] },
      {
        name: "backing offset",
        patches: [{ at: FEATURES, u64: 1n }, { at: 56, u32: 65530 }, { at: 60, u32: 10 }],
      },
      {
        name: "backing name long",
        patches: [{ at: FEATURES, u64: 1n }, { at: 56, u32: 64 }, { at: 60, u32: 5000 }],
      },
      {
        name: "backing missing",
        patches: [
          { at: FEATURES, u64: 1n },
          { at: 56, u32: 64 },
          { at: 60, u32: 11 },
          { at: 64, text: "missing.raw" },
        ],
      },
    ];
    for (const c of cases) {
      const bad = `${dir}/bad-${c.name.replaceAll(" ", "-")}.qed`;
      await patch(base, bad, c.patches);
      const sock = `${dir}/bad.sock`;
      const res = await run([...serverArgv("denbd"), "-k", sock, "-f", "qed", bad], {
        timeoutMs: 15_000,
      });
      const q = await run(["qemu-nbd", "-k", sock, "-f", "qed", bad], { timeoutMs: 15_000 });
      assert.equal(res.code, 1, `${c.name}: ${res.stderr}`);
      assert.equal(q.code, 1, `${c.name}: ${q.stderr}`);
      assert.ok(res.stderr.includes(`Failed to blk_new_open '${bad}': `), res.stderr);
      const line = (s: string) => s.trim().replace(/^[^:]*: /, "");
      assert.equal(line(res.stderr), line(q.stderr), c.name);
    }
  });
});

Deno.test("qed: bad table entries fail reads with EINVAL as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.qed`;
    await qimg("create", "-q", "-f", "qed", base, "4M");
    await qio(base, ["write -P 0x5a 0 128k"], "qed");
    const l2 = await firstL2(base);
    const bad = `${dir}/bad.qed`;
    await patch(base, bad, [{ at: l2 + 8, u64: 1n << 40n }]);
    await sideBySide(dir, bad, ["-f", "qed", "-r", "-t"], async (d, q) => {
      for (const s of [d, q]) {
        const good = await run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", s.uri]);
        assert.match(good.stdout, /read 65536\/65536/);
        const r = await run(["qemu-io", "-r", "-f", "raw", "-c", "read 64k 4k", s.uri]);
        assert.match(r.stdout + r.stderr, /Invalid argument/, `${s.kind}: ${r.stdout}${r.stderr}`);
      }
    });
  });
});

Deno.test("qed: kill -9 during writes leaves an image qemu-img check accepts", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/img.qed`;
    await qimg("create", "-q", "-f", "qed", "-o", "cluster_size=4096", img, "32M");
    await qio(img, ["write -P 0x11 0 1M"], "qed");
    await qimg("create", "-q", "-f", "qed", "-b", "img.qed", "-F", "qed", `${dir}/top.qed`, "32M");
    const r = rng(7);
    let interrupted = 0;
    for (let run_ = 0; run_ < 4; run_++) {
      const target = run_ % 2 === 0 ? img : `${dir}/top.qed`;
      // Completed and flushed writes (qemu-io flushes at exit) must survive the kill.
      const done = [`write -P ${0x20 + run_} ${run_ * 3 * MiB + 4096} 100k`];
      const s = await Server.start({ dir, image: target, args: ["-f", "qed", "-t"] });
      try {
        await qio(s.uri, done, "raw");
        const cmds: string[] = [];
        for (let i = 0; i < 1500; i++) {
          const len = 512 * (1 + Math.floor(r() * 64));
          const off = 512 * Math.floor(r() * (32 * MiB - len) / 512);
          cmds.push(r() < 0.2 ? `aio_write -z ${off} ${len}` : `aio_write -P 7 ${off} ${len}`);
          if (i % 50 === 49) cmds.push("aio_flush");
        }
        const bg = run(["qemu-io", "-f", "raw", ...cmds.flatMap((c) => ["-c", c]), s.uri], {
          timeoutMs: 20_000,
        });
        await sleep(150 + Math.floor(r() * 300));
        Deno.kill(s.pid, "SIGKILL");
        // qemu-io loses its server mid-workload (else the kill proved nothing).
        const res = await bg;
        if (/failed: Input\/output error/.test(res.stdout + res.stderr)) interrupted++;
      } finally {
        await s.stop();
      }
      const check = await run(["qemu-img", "check", "-f", "qed", target]);
      // 0: clean; 3: leaked clusters only (qemu leaves them too). 2 would be corruption.
      assert.ok(
        check.code === 0 || check.code === 3,
        `run ${run_}: ${check.stdout}${check.stderr}`,
      );
      const survived = await run([
        "qemu-io",
        "-f",
        "qed",
        "-r",
        "-c",
        `read -P ${0x20 + run_} ${run_ * 3 * MiB + 4096} 4k`,
        target,
      ]);
      assert.match(
        survived.stdout,
        /read 4096\/4096/,
        `run ${run_}: ${survived.stdout}${survived.stderr}`,
      );
    }
    assert.ok(interrupted > 0, "no kill landed during the workload");
    // The crashed image reopens read-write (check and repair if dirty) and writes as qemu-io.
    const copy = `${dir}/copy.qed`;
    await Deno.copyFile(img, copy);
    await withServer({ dir, image: img, args: ["-f", "qed"] }, async (s) => {
      await qio(s.uri, ["write -P 0x66 5M 70k"], "raw");
    });
    await qio(copy, ["write -P 0x66 5M 70k"], "qed");
    await runOk(["qemu-img", "compare", "-f", "qed", "-F", "qed", img, copy]);
    assert.equal(await features(img) & NEED_CHECK, 0);
  });
});
