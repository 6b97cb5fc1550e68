/**
 * Differential tests for `-B NAME` (qemu:dirty-bitmap:NAME) on read-only qcow2 exports: the
 * server under test and qemu-nbd 7.2 serve the same images with the same arguments, and every
 * client view of the bitmap contexts must match — `nbdinfo --map`, `qemu-img map` with
 * `x-dirty-bitmap`, and libnbd block status at unaligned offsets with and without REQ_ONE. The
 * refusals (in_use bitmap, unknown name, raw image, broken directory, bitmaps invalidated by a
 * program that cleared the autoclear bit, any name under -o) must exit with qemu-nbd's code and
 * message.
 *
 * Images (4 MiB) are made with `qemu-img bitmap` and qemu-io writes: granularities 512, 64K and
 * 1M, a disabled bitmap, a merged one, 512-byte clusters (two-entry tables, an all-ones entry),
 * and a bitmap found through the backing chain.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  PYTHON,
  run,
  runOk,
  type Server,
  SERVER_KIND,
  serverArgv,
  withServers,
  withTempDir,
} from "./_harness.ts";
import { parseHeader } from "../../lib/block/qcow2/header.ts";

async function qimg(...args: string[]): Promise<void> {
  await runOk(["qemu-img", ...args]);
}

async function qio(img: string, cmds: readonly string[]): Promise<void> {
  await runOk(["qemu-io", "-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), img]);
}

/** The bitmap directory's file offset and the table offset of entry `index`. */
async function bitmapLayout(path: string, index: number): Promise<{ dir: number; table: number }> {
  const b = await Deno.readFile(path);
  const h = parseHeader(b.subarray(0, 65536));
  const v = new DataView(b.buffer);
  let at = h.bitmaps!.directoryOffset;
  for (let i = 0; i < index; i++) {
    at += (24 + v.getUint16(at + 18) + v.getUint32(at + 20) + 7) & ~7;
  }
  return { dir: h.bitmaps!.directoryOffset, table: Number(v.getBigUint64(at)) };
}

async function poke(path: string, edit: (v: DataView) => void): Promise<void> {
  const b = await Deno.readFile(path);
  edit(new DataView(b.buffer));
  await Deno.writeFile(path, b);
}

/** Builds the images; see the module comment. */
async function buildCorpus(dir: string): Promise<void> {
  const p = (n: string) => `${dir}/${n}`;
  await Promise.all([
    (async () => {
      const a = p("a.qcow2");
      await qimg("create", "-q", "-f", "qcow2", a, "4M");
      await qimg("bitmap", "--add", a, "b64k");
      await qimg("bitmap", "--add", "-g", "512", a, "b512");
      await qimg("bitmap", "--add", "-g", "1M", a, "b1m");
      await qimg("bitmap", "--add", "-g", "4k", a, "dis");
      await qio(a, [
        "write -P 0x11 1M 4k",
        "write -z 2M 64k",
        "discard 0 64k",
        "write 3M 512",
        "write 5000 1000",
      ]);
      await qimg("bitmap", "--disable", a, "dis");
      await qimg("bitmap", "--add", a, "merged");
      await qimg("bitmap", "--merge", "dis", a, "merged");
      await qio(a, ["write 3500k 100k", "write -z 1536k 1k"]);
      // A crash while open read-write leaves every bitmap in_use.
      await Deno.copyFile(a, p("inuse.qcow2"));
      const r = await run([
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write 0 4k",
        "-c",
        "abort",
        p("inuse.qcow2"),
      ]);
      assert.notEqual(r.code, 0, "qemu-io abort did not abort");
      // A program unaware of bitmaps cleared autoclear bit 0.
      await Deno.copyFile(a, p("autoclear.qcow2"));
      await poke(p("autoclear.qcow2"), (v) => v.setBigUint64(88, v.getBigUint64(88) & ~1n));
      // A directory entry of an unknown type breaks every open, with or without -B.
      await Deno.copyFile(a, p("broken.qcow2"));
      const { dir: d } = await bitmapLayout(p("broken.qcow2"), 0);
      await poke(p("broken.qcow2"), (v) => v.setUint8(d + 16, 2));
    })(),
    (async () => {
      // 512-byte clusters: a 4 MiB bitmap at 512 bytes needs a two-entry table.
      const c = p("c512.qcow2");
      await qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", c, "4M");
      await qimg("bitmap", "--add", "-g", "512", c, "fine");
      await qimg("bitmap", "--add", "-g", "512", c, "ones");
      await qio(c, ["write 2304k 1k", "write 4000k 3"]);
      // Entry 0 of "ones": all ones without a data cluster.
      const { table } = await bitmapLayout(c, 1);
      await poke(c, (v) => v.setBigUint64(table, 1n));
    })(),
    (async () => {
      const base = p("base.qcow2"), top = p("top.qcow2");
      await qimg("create", "-q", "-f", "qcow2", base, "4M");
      await qimg("bitmap", "--add", "-g", "16k", base, "bb");
      await qio(base, ["write 64k 64k", "write 3M 10k"]);
      await qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "4M");
      await qimg("bitmap", "--add", top, "tb");
      await qio(top, ["write 1M 1k"]);
    })(),
    qimg("create", "-q", "-f", "raw", p("plain.raw"), "1M"),
  ]);
}

/** Block status over every context at a few unaligned ranges, with and without REQ_ONE. */
const BLOCK_STATUS_PY = `
import json, sys, nbd
uri = sys.argv[1]
names = sys.argv[2:]
h = nbd.NBD()
for n in names:
    h.add_meta_context(n)
h.connect_uri(uri)
size = h.get_size()
out = []
queries = [(0, size), (100, 70000), (1048576 + 100, 5000), (5000, 2097152), (size - 777, 777),
           (2000000, 1234567), (1536 * 1024 + 10, 100)]
for (off, cnt) in queries:
    for flags in (0, nbd.CMD_FLAG_REQ_ONE):
        got = {}
        def cb(meta, o, entries, err):
            # base:allocation is here to mix contexts in one reply; its REQ_ONE answers are
            # left out (denbd stops at the first run instead of merging equal ones: a known
            # base:allocation difference, outside this test).
            if not (flags and meta == "base:allocation"):
                got[meta] = list(entries)
            return 0
        h.block_status(cnt, off, cb, flags=flags)
        out.append([off, cnt, flags, {k: got[k] for k in sorted(got)}])
h.shutdown()
print(json.dumps(out))
`;

interface Case {
  readonly name: string;
  readonly image: string;
  readonly bitmaps: readonly string[];
  readonly args?: readonly string[];
}

const CASES: readonly Case[] = [
  {
    name: "granularities 64K, 512, 1M, 4K disabled, merged",
    image: "a.qcow2",
    bitmaps: ["b64k", "b512", "b1m", "dis", "merged"],
    args: ["-A"],
  },
  {
    name: "512-byte clusters, two-entry tables, all-ones entry",
    image: "c512.qcow2",
    bitmaps: ["fine", "ones"],
  },
  {
    name: "bitmaps of the top image and of its backing file",
    image: "top.qcow2",
    bitmaps: ["bb", "tb"],
  },
];

async function views(server: Server, c: Case): Promise<Record<string, string>> {
  const uri = server.uri;
  const v: Record<string, string> = {};
  const contexts = c.bitmaps.map((b) => `qemu:dirty-bitmap:${b}`);
  await Promise.all([
    ...contexts.map(async (ctx) => {
      const r = await run(["nbdinfo", `--map=${ctx}`, uri]);
      v[`nbdinfo ${ctx}`] = r.code === 0 ? r.stdout : `EXIT ${r.code}: ${r.stderr}`;
    }),
    (async () => {
      const sock = server.socketPath!;
      const r = await run([
        "qemu-img",
        "map",
        "--output=json",
        "--image-opts",
        `driver=nbd,server.type=unix,server.path=${sock},x-dirty-bitmap=${contexts[0]}`,
      ]);
      v["qemu-img map x-dirty-bitmap"] = r.code === 0 ? r.stdout : `EXIT ${r.code}: ${r.stderr}`;
    })(),
    (async () => {
      const r = await run([PYTHON, "-c", BLOCK_STATUS_PY, uri, "base:allocation", ...contexts]);
      v["block status"] = r.code === 0 ? r.stdout : `EXIT ${r.code}: ${r.stderr}`;
    })(),
  ]);
  return v;
}

Deno.test("qcow2 bitmaps: -B exports match qemu-nbd", async (t) => {
  await withTempDir(async (dir) => {
    await buildCorpus(dir);
    for (const c of CASES) {
      await t.step(c.name, async () => {
        const image = `${dir}/${c.image}`;
        const args = [
          "-r",
          "-t",
          "-f",
          "qcow2",
          ...(c.args ?? []),
          ...c.bitmaps.flatMap((b) => ["-B", b]),
        ];
        await withServers(
          [{ dir, image, args, kind: SERVER_KIND }, { dir, image, args, kind: "qemu-nbd" }],
          async ([test, want]) => {
            const [got, exp] = await Promise.all([views(test!, c), views(want!, c)]);
            // Every bitmap has dirty extents, or the comparison would prove little.
            for (const b of c.bitmaps) {
              const m = exp[`nbdinfo qemu:dirty-bitmap:${b}`]!;
              assert.match(m, /\d+\s+\d+\s+1\s+dirty/, `${b} has no dirty extent`);
            }
            assert.match(exp["block status"]!, /dirty-bitmap/);
            const problems = Object.keys(exp).filter((k) => got[k] !== exp[k]).map((k) =>
              `${k} differs\n--- ${SERVER_KIND}:\n${got[k]}\n--- qemu-nbd:\n${exp[k]}`
            );
            assert.equal(problems.length, 0, `${problems.join("\n")}\nstderr: ${test!.stderr}`);
          },
        );
      });
    }

    // Refusals: exit code and message as qemu-nbd's (denbd prints its name where qemu-nbd
    // does, and qemu-nbd prefixes open errors with "Failed to blk_new_open 'FILE': ").
    const refusals: Array<{ name: string; image: string; args: string[] }> = [
      { name: "in_use bitmap", image: "inuse.qcow2", args: ["-f", "qcow2", "-B", "b512"] },
      { name: "unknown bitmap", image: "a.qcow2", args: ["-f", "qcow2", "-B", "nope"] },
      { name: "raw image", image: "plain.raw", args: ["-f", "raw", "-B", "b0"] },
      {
        name: "-o hides the bitmaps",
        image: "a.qcow2",
        args: ["-f", "qcow2", "-o", "64k", "-B", "b64k"],
      },
      { name: "broken directory, no -B", image: "broken.qcow2", args: ["-f", "qcow2"] },
      {
        name: "autoclear bit cleared",
        image: "autoclear.qcow2",
        args: ["-f", "qcow2", "-B", "b64k"],
      },
    ];
    for (const r of refusals) {
      await t.step(r.name, async () => {
        const argv = (kind: "denbd" | "qemu-nbd") => [
          ...serverArgv(kind),
          "-r",
          "-k",
          `${dir}/refuse-${kind}.sock`,
          ...r.args,
          `${dir}/${r.image}`,
        ];
        const [got, exp] = await Promise.all([
          run(argv(SERVER_KIND), { timeoutMs: 15_000 }),
          run(argv("qemu-nbd"), { timeoutMs: 15_000 }),
        ]);
        assert.equal(exp.code, 1, `qemu-nbd: ${exp.stderr}`);
        assert.equal(got.code, exp.code, `${SERVER_KIND}: ${got.stderr}`);
        // The message core: the last line, after the program name (qemu-nbd's warning about
        // leaked clusters has no newline, so its name can come mid-line) and the open prefix.
        const core = (text: string) =>
          text.trim().split("\n").pop()!.replace(/^.*?(denbd|qemu-nbd): /, "").replace(
            /^Failed to blk_new_open '[^']*': /,
            "",
          );
        const want = core(exp.stderr);
        const have = core(got.stderr);
        assert.ok(want.length > 10, exp.stderr);
        assert.ok(have.startsWith(want), `${SERVER_KIND} said "${have}", qemu-nbd said "${want}"`);
      });
    }
  });
});
