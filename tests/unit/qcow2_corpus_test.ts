/**
 * The qcow2 driver against qemu on a corpus built with qemu-img/qemu-io (the recipes of
 * shared/reference/qcow2-corpus.sh): every image is read whole and compared byte for byte with
 * `qemu-img convert -O raw`, and its base:allocation and qemu:allocation-depth maps are compared
 * with what `qemu-nbd -r -A` reports through `nbdinfo --map`.
 */

import assert from "node:assert/strict";
import {
  collect,
  firstDiff,
  merge,
  openImage,
  qemuIo,
  qemuNbdMaps,
  qemuRaw,
  readAll,
  run,
} from "./_qcow2_helpers.ts";

interface Recipe {
  name: string;
  build: (dir: string) => Promise<void>;
}

const img = (dir: string, n: string) => `${dir}/${n}.qcow2`;
const create = (dir: string, n: string, opts: string[], size = "4M") =>
  run(
    "qemu-img",
    ["create", "-q", "-f", "qcow2", ...opts, img(dir, n), ...(size ? [size] : [])],
    dir,
  );

const RECIPES: Recipe[] = [
  {
    name: "v2",
    build: async (d) => {
      await create(d, "v2", ["-o", "compat=0.10"]);
      await qemuIo(img(d, "v2"), [
        "write -P 0xaa 0 192k",
        "write -z 64k 64k",
        "write -P 0xbb 1M 4k",
      ]);
    },
  },
  {
    name: "v3",
    build: async (d) => {
      await create(d, "v3", ["-o", "compat=1.1"]);
      await qemuIo(img(d, "v3"), [
        "write -P 0xaa 0 256k",
        "write -z 0 64k",
        "write -z -u 64k 64k",
        "discard 128k 64k",
        "write -z 1M 128k",
        "write -P 0xbb 2M 512",
      ]);
    },
  },
  ...["512", "64k", "2M"].map((cs) => ({
    name: `cs-${cs}`,
    build: async (d: string) => {
      await create(d, `cs-${cs}`, ["-o", `cluster_size=${cs}`]);
      await qemuIo(img(d, `cs-${cs}`), [
        "write -P 0x5a 0 4k",
        "write -P 0x5b 1M 1",
        "write -z 2M 1M",
      ]);
    },
  })),
  ...["1", "64"].map((rb) => ({
    name: `rc-${rb}`,
    build: async (d: string) => {
      await create(d, `rc-${rb}`, ["-o", `refcount_bits=${rb}`]);
      await qemuIo(img(d, `rc-${rb}`), ["write -P 0x44 0 128k", "write -P 0x45 3M 100k"]);
    },
  })),
  {
    name: "extl2",
    build: async (d) => {
      await create(d, "extl2", ["-o", "extended_l2=on,cluster_size=64k"]);
      await qemuIo(img(d, "extl2"), [
        "write -P 0x61 0 2k",
        "write -P 0x62 6k 4k",
        "write -z 16k 2k",
        "write -P 0x63 1M 64k",
        "write -z 1M 8k",
        "discard 2M 64k",
        "write -P 0x64 3M 200k",
      ]);
    },
  },
  {
    name: "extl2-backed",
    build: async (d) => {
      await create(d, "extl2-backed", ["-o", "extended_l2=on", "-b", "src.raw", "-F", "raw"]);
      await qemuIo(img(d, "extl2-backed"), [
        "write -P 0x64 4k 2k",
        "write -z 8k 2k",
        "write -P 0x65 2160640 4k",
      ]);
    },
  },
  {
    name: "comp-zlib",
    build: (d) =>
      run("qemu-img", ["convert", "-c", "-O", "qcow2", "src.raw", img(d, "comp-zlib")], d).then(
        () => {},
      ),
  },
  {
    name: "comp-zstd",
    build: (d) =>
      run("qemu-img", [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "src.raw",
        img(d, "comp-zstd"),
      ], d)
        .then(() => {}),
  },
  {
    name: "comp-512",
    build: (d) =>
      run("qemu-img", [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=512",
        "src.raw",
        img(d, "comp-512"),
      ], d)
        .then(() => {}),
  },
  {
    name: "comp-2M-zstd",
    build: (d) =>
      run("qemu-img", [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=2M,compression_type=zstd",
        "src.raw",
        img(d, "comp-2M-zstd"),
      ], d).then(() => {}),
  },
  {
    name: "comp-io",
    build: async (d) => {
      await create(d, "comp-io", []);
      await qemuIo(img(d, "comp-io"), [
        "write -c -P 0x12 0 64k",
        "write -c -P 0x13 64k 64k",
        "write -P 0x14 70k 1k",
      ]);
    },
  },
  {
    name: "chain-top",
    build: async (d) => {
      // Relative backing names, three deep, in a subdirectory opened from elsewhere.
      await Deno.mkdir(`${d}/sub`, { recursive: true });
      await create(d, "sub/chain-base", []);
      await qemuIo(img(d, "sub/chain-base"), ["write -P 0xb0 0 1M"]);
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "chain-base.qcow2",
        "-F",
        "qcow2",
        "chain-mid.qcow2",
      ], `${d}/sub`);
      await qemuIo(img(d, "sub/chain-mid"), ["write -P 0xb1 512k 512k", "write -z 64k 64k"]);
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "sub/chain-mid.qcow2",
        "-F",
        "qcow2",
        "chain-top.qcow2",
      ], d);
      await qemuIo(img(d, "chain-top"), [
        "write -P 0xb2 768k 4k",
        "discard 0 64k",
        "write -P 0xb3 3M 64k",
      ]);
    },
  },
  {
    name: "short-top",
    build: async (d) => {
      await create(d, "short-base", [], "1M");
      await qemuIo(img(d, "short-base"), ["write -P 0x5b 0 1M"]);
      await create(d, "short-top", ["-b", "short-base.qcow2", "-F", "qcow2"], "4M");
      await qemuIo(img(d, "short-top"), ["write -P 0x5c 512k 8k"]);
    },
  },
  {
    name: "raw-backed",
    build: async (d) => {
      await create(d, "raw-backed", ["-b", "src.raw", "-F", "raw"], "");
      await qemuIo(img(d, "raw-backed"), ["write -P 0xcc 64k 4k"]);
    },
  },
  {
    name: "snap",
    build: async (d) => {
      await create(d, "snap", []);
      await qemuIo(img(d, "snap"), ["write -P 0x01 0 128k"]);
      await run("qemu-img", ["snapshot", "-c", "s1", img(d, "snap")]);
      await qemuIo(img(d, "snap"), ["write -P 0x02 64k 128k"]);
      await run("qemu-img", ["snapshot", "-c", "s2", img(d, "snap")]);
      await qemuIo(img(d, "snap"), ["write -z 0 64k", "discard 128k 64k"]);
    },
  },
  {
    name: "extdata",
    build: async (d) => {
      await create(d, "extdata", ["-o", `data_file=${d}/extdata.data`]);
      await qemuIo(img(d, "extdata"), ["write -P 0xd1 0 64k", "write -z 1M 64k"]);
    },
  },
  {
    name: "extraw",
    build: async (d) => {
      await create(d, "extraw", ["-o", `data_file=${d}/extraw.data,data_file_raw=on`]);
      await qemuIo(img(d, "extraw"), ["write -P 0xd2 64k 64k", "write -z 1M 64k"]);
    },
  },
  {
    name: "prealloc-metadata",
    build: async (d) => {
      await create(d, "prealloc-metadata", ["-o", "preallocation=metadata"]);
      await qemuIo(img(d, "prealloc-metadata"), ["write -P 0x99 0 4k"]);
    },
  },
];

async function buildCorpus(dir: string): Promise<void> {
  await run("qemu-img", ["create", "-q", "-f", "raw", `${dir}/src.raw`, "4M"]);
  await qemuIo(`${dir}/src.raw`, [
    "write -P 0x11 0 1M",
    "write -P 0x22 2M 64k",
    "write -P 0x33 3146240 512",
  ], "raw");
  for (const r of RECIPES) await r.build(dir);
}

const dir = await Deno.makeTempDir({ prefix: "qcow2-corpus-" });
let built: Promise<void> | undefined;
const ready = () => built ??= buildCorpus(dir);

const PATHS: Record<string, string> = { "chain-top": "chain-top", "short-top": "short-top" };

for (const r of RECIPES) {
  Deno.test(`qcow2 corpus ${r.name}: content, base:allocation and allocation-depth match qemu`, async () => {
    await ready();
    const path = img(dir, PATHS[r.name] ?? r.name);
    const dev = await openImage(path);
    try {
      const ours = await readAll(dev, 192 * 1024);
      const oracle = await qemuRaw(path, dir);
      assert.equal(ours.length, oracle.length);
      assert.equal(firstDiff(ours, oracle), -1, `content differs from qemu-img convert`);
      // The same again with small, sequential reads (L2 slices and decompressed clusters reused).
      const small = await readAll(dev, 4096 + 512, false);
      assert.equal(firstDiff(small, oracle), -1, "content differs with small reads");
      const maps = await qemuNbdMaps(path, dir);
      assert.deepEqual(merge(await collect(dev, "extents")), merge(maps.base), "base:allocation");
      assert.deepEqual(merge(await collect(dev, "depth")), merge(maps.depth), "allocation-depth");
    } finally {
      await dev.close();
    }
  });
}

Deno.test("qcow2 corpus: -l loads internal snapshots by name, ID, and the snapshot.* form", async () => {
  await ready();
  const path = img(dir, "snap");
  const list = await run("qemu-img", ["snapshot", "-l", path]);
  assert.match(list, /s1/);
  const cases: Array<[string | { id?: string; name?: string }, string]> = [
    ["s1", "snapshot.name=s1"],
    ["2", "snapshot.id=2"],
    [{ name: "s2" }, "snapshot.name=s2"],
    ["snapshot.id=1,snapshot.name=s1", "snapshot.id=1,snapshot.name=s1"],
  ];
  for (const [sel, qarg] of cases) {
    const dev = await openImage(path, "qcow2", { snapshot: sel });
    try {
      const ours = await readAll(dev);
      const oracle = await qemuRaw(path, dir, ["-l", qarg]);
      assert.equal(firstDiff(ours, oracle), -1, `snapshot ${JSON.stringify(sel)}`);
      const maps = await qemuNbdMaps(path, dir, ["-l", typeof sel === "string" ? sel : qarg]);
      assert.deepEqual(merge(await collect(dev, "extents")), merge(maps.base));
      assert.deepEqual(merge(await collect(dev, "depth")), merge(maps.depth));
    } finally {
      await dev.close();
    }
  }
  await assert.rejects(
    openImage(path, "qcow2", { snapshot: "nope" }),
    /Failed to load snapshot: Can't find snapshot/,
  );
  // ID and name must both match in the snapshot.* form.
  await assert.rejects(
    openImage(path, "qcow2", { snapshot: { id: "1", name: "s2" } }),
    /Can't find snapshot/,
  );
});

Deno.test("qcow2 corpus: -l keeps the current virtual size when the image grew since", async () => {
  await ready();
  const path = img(dir, "grown");
  await run("qemu-img", ["create", "-q", "-f", "qcow2", path, "1M"]);
  await qemuIo(path, ["write -P 0x61 0 1M"]);
  await run("qemu-img", ["snapshot", "-c", "small", path]);
  await run("qemu-img", ["resize", "-q", path, "2M"]);
  await qemuIo(path, ["write -P 0x62 1M 64k"]);
  const dev = await openImage(path, "qcow2", { snapshot: "small" });
  try {
    const maps = await qemuNbdMaps(path, dir, ["-l", "small"]);
    assert.equal(dev.size, maps.size);
    assert.equal(dev.size, 2 << 20);
    const data = await readAll(dev);
    assert.ok(data.subarray(0, 1 << 20).every((x) => x === 0x61));
    assert.ok(data.subarray(1 << 20).every((x) => x === 0), "tail past the snapshot reads as zero");
    assert.deepEqual(merge(await collect(dev, "extents")), merge(maps.base));
    assert.deepEqual(merge(await collect(dev, "depth")), merge(maps.depth));
  } finally {
    await dev.close();
  }
});

Deno.test("qcow2 corpus: relative backing names resolve from the image's directory, not the cwd", async () => {
  await ready();
  const cwd = Deno.cwd();
  Deno.chdir("/");
  try {
    const dev = await openImage(img(dir, "chain-top"));
    const depth = merge(await collect(dev, "depth"));
    assert.ok(depth.some(([, , d]) => d === 3), "base layer reached");
    await dev.close();
  } finally {
    Deno.chdir(cwd);
  }
});

Deno.test({
  name: "qcow2 corpus: cleanup",
  fn: async () => {
    await built?.catch(() => {});
    await Deno.remove(dir, { recursive: true });
  },
});
