/**
 * qcow (version 1) exports against qemu-nbd 7.2: images made at test time by qemu-img (empty,
 * converted, compressed, overlays on raw and qcow backing files) and by a small encoder here
 * for the cluster and L2 sizes qemu-img cannot choose (512-byte and 64 KiB clusters, 64 and
 * 8192 L2 entries); denbd and qemu-nbd serve copies side by side. Compared: bytes, size, flags
 * and block sizes, base:allocation and qemu:allocation-depth maps, -f qcow and probed. Writes
 * go the same way through both servers and with qemu-io into a copy: maps equal while served,
 * the files byte-identical afterwards (qemu-img has no check for qcow). A kill -9 loop checks
 * what survives; damaged images fail to open with qemu-nbd's message or fail reads with EIO.
 *
 * @module
 */

import assert from "node:assert/strict";
import { makeSparseImage, MiB, run, runOk, withServers, withTempDir } from "./_harness.ts";
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

/**
 * A qcow image of `raw` with 2^cb-byte clusters and 2^lb-entry L2 tables, laid out as qemu's
 * driver lays out what it writes: L1 after the header, then tables and clusters at the end of
 * the file rounded up to a cluster. All-zero clusters stay unallocated.
 */
function encodeQcow(raw: Uint8Array, cb: number, lb: number): Uint8Array {
  const cs = 1 << cb;
  const per = cs << lb;
  const l1Size = Math.ceil(raw.length / per);
  const parts: { at: number; bytes: Uint8Array }[] = [];
  let end = 48 + l1Size * 8;
  const header = new Uint8Array(48 + l1Size * 8);
  const hv = new DataView(header.buffer);
  hv.setUint32(0, 0x514649fb);
  hv.setUint32(4, 1);
  hv.setBigUint64(24, BigInt(raw.length));
  header[32] = cb;
  header[33] = lb;
  hv.setBigUint64(40, 48n);
  parts.push({ at: 0, bytes: header });
  const align = () => end = Math.ceil(end / cs) * cs;
  for (let i = 0; i < l1Size; i++) {
    let table: DataView | undefined;
    let tableAt = 0;
    for (let j = 0; j < 1 << lb; j++) {
      const g = i * per + j * cs;
      if (g >= raw.length) break;
      const c = new Uint8Array(cs);
      c.set(raw.subarray(g, Math.min(g + cs, raw.length)));
      if (c.every((x) => x === 0)) continue;
      if (table === undefined) {
        align();
        tableAt = end;
        table = new DataView(new ArrayBuffer(8 << lb));
        parts.push({ at: end, bytes: new Uint8Array(table.buffer) });
        end += 8 << lb;
        hv.setBigUint64(48 + i * 8, BigInt(tableAt));
      }
      align();
      table.setBigUint64(j * 8, BigInt(end));
      parts.push({ at: end, bytes: c });
      end += cs;
    }
  }
  const out = new Uint8Array(end);
  for (const p of parts) out.set(p.bytes, p.at);
  return out;
}

/** Compressed writes of whole 4 KiB clusters (the last cluster of the image included). */
function compressedWrites(): string[] {
  const cmds: string[] = [];
  for (const c of [0, 1, 2, 3, 100, 255, 256, 257, 600, 842]) {
    cmds.push(`write -c -P ${0x10 + (c & 0x3f)} ${c * 4096} 4096`);
  }
  return cmds;
}

interface Item {
  name: string;
  cluster: number;
  src?: string;
}

async function buildCorpus(dir: string): Promise<Item[]> {
  const p = (n: string) => `${dir}/${n}`;
  await makeSparseImage(p("src.raw"), SRC_SIZE, [
    { offset: 0, length: 100 * 1024, fill: "random", seed: 3 },
    { offset: MiB + 4096, length: 64 * 1024, fill: 0x22 },
    { offset: 3 * MiB + 512, length: 4096, fill: "random", seed: 9 },
  ]);
  await makeSparseImage(p("base.raw"), SRC_SIZE, [
    { offset: 0, length: 2 * MiB, fill: "random", seed: 5 },
  ]);
  const src = await Deno.readFile(p("src.raw"));
  await Promise.all([
    qimg("convert", "-O", "qcow", p("src.raw"), p("conv.qcow")),
    // qemu-img 7.2 cannot convert -c to qcow (it fails without a message); qemu-io can
    // write compressed clusters.
    (async () => {
      await qimg("create", "-q", "-f", "qcow", p("z.qcow"), String(SRC_SIZE));
      await qio(p("z.qcow"), compressedWrites(), "qcow");
    })(),
    qimg("create", "-q", "-f", "qcow", p("empty.qcow"), "5M"),
    (async () => {
      await qimg("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", p("ov.qcow"));
      await qio(p("ov.qcow"), ["write -P 0x70 512k 8k", "write -P 0x71 2100k 512"], "qcow");
    })(),
    (async () => {
      // A chain of three: top.qcow -> mid.qcow -> base.qcow (converted from base.raw).
      await qimg("convert", "-O", "qcow", p("base.raw"), p("base.qcow"));
      await qimg("create", "-q", "-f", "qcow", "-b", "base.qcow", "-F", "qcow", p("mid.qcow"));
      await qio(p("mid.qcow"), ["write -P 0x72 1M 64k", "write -P 0x73 2500k 4k"], "qcow");
      await qimg("create", "-q", "-f", "qcow", "-b", "mid.qcow", "-F", "qcow", p("top.qcow"));
      await qio(p("top.qcow"), ["write -P 0x74 1M 4k", "write -P 0x75 3M 8k"], "qcow");
    })(),
    Deno.writeFile(p("c512.qcow"), encodeQcow(src, 9, 6)),
    Deno.writeFile(p("c64k.qcow"), encodeQcow(src, 16, 13)),
  ]);
  return [
    { name: "conv.qcow", cluster: 4096, src: p("src.raw") },
    { name: "z.qcow", cluster: 4096 },
    { name: "empty.qcow", cluster: 4096 },
    { name: "ov.qcow", cluster: 4096 },
    { name: "top.qcow", cluster: 4096 },
    { name: "c512.qcow", cluster: 512, src: p("src.raw") },
    { name: "c64k.qcow", cluster: 65536, src: p("src.raw") },
  ];
}

Deno.test("qcow: reads, flags and maps as qemu-nbd (-f qcow, probed, chains)", async (t) => {
  await withTempDir(async (dir) => {
    const corpus = await buildCorpus(dir);
    for (const { name, src } of corpus) {
      const img = `${dir}/${name}`;
      await t.step(`${name}, -f qcow -r -A`, async () => {
        await sideBySide(
          dir,
          img,
          (c) => ({ args: ["-f", "qcow", "-t", "-r", "-A"], image: c }),
          (d, q) => compareViews(d, q, { src, depth: true, what: name }),
        );
      });
      // Probing (and the writable flags) on a few of them; the rest only read-only.
      if (!["conv.qcow", "z.qcow", "top.qcow"].includes(name)) continue;
      await t.step(`${name}, probed, writable`, async () => {
        await sideBySide(dir, img, (c) => ({ args: ["-t"], image: c }), async (d, q) => {
          await compareViews(d, q, { src, what: name });
          assert.doesNotMatch(d.stderr, /probing guessed raw/);
        });
      });
    }
    await t.step("--image-opts driver=qcow", async () => {
      const img = `${dir}/top.qcow`;
      await sideBySide(
        dir,
        img,
        (c) => ({ args: ["-t", "-r", "--image-opts", `driver=qcow,file.filename=${c}`] }),
        (d, q) => compareViews(d, q, { what: "image-opts" }),
      );
    });
  });
});

Deno.test("qcow: writes match qemu-nbd and qemu-io, byte for byte", async (t) => {
  await withTempDir(async (dir) => {
    const corpus = await buildCorpus(dir);
    for (const [i, { name, cluster }] of corpus.entries()) {
      await t.step(name, async () => {
        const img = `${dir}/${name}`;
        const size = await virtualSize(img);
        const cmds = writeScript(size, cluster, 200 + i);
        // Partial writes into compressed clusters, and a whole-cluster one.
        if (name === "z.qcow") cmds.unshift("write -P 0x31 4096 512", "write -P 0x32 0 4096");
        await writeThreeWays(dir, img, "qcow", ["-f", "qcow", "-t"], cmds);
      });
    }
  });
});

Deno.test("qcow: kill -9 during writes keeps flushed data and whole writes", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/crash.qcow`;
    await qimg("create", "-q", "-f", "qcow", img, "2M");
    // qemu-img has no check for qcow: the contents are the check.
    await crashLoop(dir, img, "qcow", 3, () => Promise.resolve());
  });
});

Deno.test("qcow: damaged images fail as in qemu-nbd", async (t) => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.qcow`;
    await qimg("create", "-q", "-f", "qcow", base, "1M");
    await qio(base, ["write -P 0x5a 8k 4k"], "qcow");
    await t.step("header checks", async () => {
      const cases: {
        name: string;
        patches: { at: number; u32?: number; u64?: bigint; u8?: number }[];
        qemuSame: boolean;
        msg: RegExp;
      }[] = [
        {
          name: "magic",
          patches: [{ at: 0, u32: 0x514649fa }],
          qemuSame: true,
          msg: /Image not in qcow format/,
        },
        {
          name: "version 2",
          patches: [{ at: 4, u32: 2 }],
          qemuSame: true,
          msg: /Try the 'qcow2' driver instead/,
        },
        {
          name: "version 7",
          patches: [{ at: 4, u32: 7 }],
          qemuSame: true,
          msg: /does not support qcow version 7/,
        },
        {
          name: "size 1",
          patches: [{ at: 24, u64: 1n }],
          qemuSame: true,
          msg: /Image size is too small/,
        },
        {
          name: "cluster bits 8",
          patches: [{ at: 32, u8: 8 }],
          qemuSame: true,
          msg: /Cluster size must be between 512 and 64k/,
        },
        {
          name: "cluster bits 17",
          patches: [{ at: 32, u8: 17 }],
          qemuSame: true,
          msg: /Cluster size must be between/,
        },
        {
          name: "l2 bits 5",
          patches: [{ at: 33, u8: 5 }],
          qemuSame: true,
          msg: /L2 table size must be between 512 and 64k/,
        },
        {
          name: "crypt 2",
          patches: [{ at: 36, u32: 2 }],
          qemuSame: true,
          msg: /invalid encryption method in qcow header/,
        },
        {
          name: "image too large",
          patches: [{ at: 24, u64: 1n << 62n }, { at: 32, u8: 9 }, { at: 33, u8: 6 }],
          qemuSame: true,
          msg: /Image too large/,
        },
        {
          name: "backing name too long",
          patches: [{ at: 8, u64: 48n }, { at: 16, u32: 2000 }],
          qemuSame: true,
          msg: /Backing file name too long/,
        },
        {
          name: "L1 too large for denbd",
          patches: [{ at: 24, u64: 1n << 39n }, { at: 32, u8: 9 }, { at: 33, u8: 6 }],
          qemuSame: false,
          msg: /L1 table of 16777216 entries is larger than denbd supports/,
        },
      ];
      for (const c of cases) {
        const bad = `${dir}/bad-${c.name.replaceAll(" ", "-")}.qcow`;
        await patched(base, bad, c.patches, false);
        await refusedLikeQemu(dir, bad, ["-f", "qcow"], c.msg, c.qemuSame, c.name);
      }
    });
    await t.step("AES encryption is refused", async () => {
      const img = `${dir}/aes.qcow`;
      await runOk([
        "qemu-img",
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=abc",
        "-f",
        "qcow",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        img,
        "1M",
      ]);
      await refusedLikeQemu(
        dir,
        img,
        ["-f", "qcow"],
        /AES-encrypted qcow images are not supported/,
        false,
        "aes",
      );
    });
    await t.step("backing files: missing, a loop", async () => {
      await qimg("create", "-q", "-f", "raw", `${dir}/gone.raw`, "1M");
      await qimg("create", "-q", "-f", "qcow", "-b", "gone.raw", "-F", "raw", `${dir}/miss.qcow`);
      await Deno.remove(`${dir}/gone.raw`);
      await refusedLikeQemu(
        dir,
        `${dir}/miss.qcow`,
        ["-f", "qcow"],
        /Could not open backing file: Could not open '.*gone\.raw': No such file or directory/,
        true,
        "missing backing file",
      );
      // loop.qcow names itself as its backing file.
      await qimg("create", "-q", "-f", "raw", `${dir}/loop.qcow`, "1M");
      await qimg("create", "-q", "-f", "qcow", "-b", "loop.qcow", "-F", "raw", `${dir}/top.qcow`);
      await Deno.rename(`${dir}/top.qcow`, `${dir}/loop.qcow`);
      await refusedLikeQemu(
        dir,
        `${dir}/loop.qcow`,
        ["-f", "qcow"],
        /Backing file loop detected/,
        false,
        "loop",
      );
    });
    await t.step("unaligned cluster and corrupt compressed data: EIO on read", async () => {
      // Find the L2 entry of cluster 2 (guest 8k) and the compressed data of a -c image.
      const b = await Deno.readFile(base);
      const v = new DataView(b.buffer);
      const l2 = Number(v.getBigUint64(Number(v.getBigUint64(40))));
      const unaligned = `${dir}/unaligned.qcow`;
      await patched(base, unaligned, [{ at: l2 + 16, u64: v.getBigUint64(l2 + 16) + 8n }], false);
      await qimg("create", "-q", "-f", "qcow", `${dir}/z.qcow`, "1M");
      await qio(`${dir}/z.qcow`, ["write -c -P 0x33 8k 4k"], "qcow");
      const z = await Deno.readFile(`${dir}/z.qcow`);
      const zv = new DataView(z.buffer);
      const zl2 = Number(zv.getBigUint64(Number(zv.getBigUint64(40))));
      const entry = zv.getBigUint64(zl2 + 16);
      assert.ok(entry >> 63n === 1n, "cluster 2 of z.qcow is compressed");
      const at = Number(entry & ((1n << 51n) - 1n));
      const junk = new Uint8Array(64).fill(0xff);
      await patched(`${dir}/z.qcow`, `${dir}/zbad.qcow`, [{ at, bytes: junk }], false);
      for (const img of [unaligned, `${dir}/zbad.qcow`]) {
        await sideBySide(
          dir,
          img,
          (c) => ({ args: ["-f", "qcow", "-t", "-r"], image: c }),
          async (d, q) => {
            for (const s of [d, q]) {
              const r = await run(["qemu-io", "-r", "-f", "raw", "-c", "read 8k 4k", s.uri]);
              assert.match(r.stdout + r.stderr, /Input\/output error/, `${img} on ${s.kind}`);
              // The rest of the image still reads.
              await qio(s.uri, ["read 0 4k"], "raw", true);
            }
          },
        );
      }
    });
  });
});

void withServers;
