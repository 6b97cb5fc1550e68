/**
 * Differential tests: the same client commands against the server under test and against
 * qemu-nbd 7.2, each started with the same arguments on its own copy of the same image; the
 * outputs must match (minus fields that name the socket). With DENBD_TEST_SERVER=qemu-nbd both
 * sides are qemu-nbd, which validates the tests themselves.
 */

import assert from "node:assert/strict";
import {
  type Extent,
  makeSparseImage,
  MiB,
  run,
  runOk,
  runPython,
  type Server,
  SERVER_KIND,
  serverArgv,
  type ServerKind,
  sha256File,
  withServers,
  withTempDir,
} from "./_harness.ts";
import { INFO, infoRequest, metaContextQuery, OPT, rawConnect, repName, view } from "./_nbd_raw.ts";

const SIZE = 6 * MiB;
const EXTENTS: Extent[] = [
  { offset: 0, length: 4096, fill: "random", seed: 1 },
  { offset: MiB, length: MiB, fill: 0xaa },
  { offset: 3 * MiB + 512, length: 70_000, fill: "random", seed: 2 },
  { offset: 5 * MiB, length: 64 * 1024, fill: 0 }, // allocated zeroes
];

/**
 * Starts the server under test and qemu-nbd on two copies of one image with the same args, runs
 * `probe` against each (in parallel) and asserts equal results. Returns both image paths.
 */
async function differential<T>(
  opts: { args: readonly string[]; exportName?: string; size?: number },
  probe: (server: Server, image: string) => Promise<T>,
): Promise<void> {
  await withTempDir(async (dir) => {
    const images = [`${dir}/test.img`, `${dir}/ref.img`];
    for (const img of images) await makeSparseImage(img, opts.size ?? SIZE, EXTENTS);
    const args = opts.args;
    await withServers(
      [
        { dir, image: images[0], args, exportName: opts.exportName, kind: SERVER_KIND },
        { dir, image: images[1], args, exportName: opts.exportName, kind: "qemu-nbd" },
      ],
      async ([test, ref]) => {
        const [got, want] = await Promise.all([probe(test!, images[0]!), probe(ref!, images[1]!)]);
        // DENBD_DIFF_DUMP=1 prints what was compared, to eyeball that a probe sees something.
        if (Deno.env.get("DENBD_DIFF_DUMP")) console.log(JSON.stringify({ got, want }, bigints));
        assert.deepEqual(got, want, `${SERVER_KIND} (actual) differs from qemu-nbd (expected)`);
      },
    );
  });
}

function bigints(_k: string, v: unknown): unknown {
  return typeof v === "bigint" ? v.toString() : v;
}

/** nbdinfo --json with the URI dropped (it names the socket). */
async function nbdinfoJson(server: Server, extra: readonly string[] = []): Promise<unknown> {
  const j = JSON.parse((await runOk(["nbdinfo", "--json", ...extra, server.uri])).stdout);
  for (const e of j.exports ?? []) delete e.uri;
  return j;
}

for (
  const [label, args, exportName] of [
    ["default", ["-f", "raw", "-t"], ""],
    ["-r -e 2 -x -D", ["-f", "raw", "-t", "-r", "-e", "2", "-x", "exp", "-D", "some text"], "exp"],
    ["-e 0 --discard=unmap", ["-f", "raw", "-t", "-e", "0", "--discard=unmap"], ""],
    ["probed format", ["-t"], ""],
  ] as const
) {
  Deno.test(`differential: nbdinfo --json (${label})`, async () => {
    await differential({ args, exportName }, (s) => nbdinfoJson(s));
  });
}

Deno.test("differential: nbdinfo --list --json", async () => {
  await differential(
    { args: ["-f", "raw", "-t", "-x", "exp", "-D", "desc"], exportName: "exp" },
    async (s) => {
      const j = JSON.parse((await runOk(["nbdinfo", "--list", "--json", s.uriFor("")])).stdout);
      for (const e of j.exports ?? []) delete e.uri;
      return j;
    },
  );
});

Deno.test("differential: nbdinfo --map and qemu-img map --output=json", async () => {
  await differential({ args: ["-f", "raw", "-t"] }, async (s) => ({
    map: (await runOk(["nbdinfo", "--map", s.uri])).stdout,
    totals: (await runOk(["nbdinfo", "--map", "--totals", s.uri])).stdout,
    qemuImg: JSON.parse(
      (await runOk(["qemu-img", "map", "--output=json", "-f", "raw", s.uri])).stdout,
    ),
  }));
});

Deno.test("differential: the same qemu-io writes give the same file and map", async () => {
  await differential({ args: ["-f", "raw", "-t", "--discard=unmap"] }, async (s, image) => {
    const r = await runOk([
      "qemu-io",
      "-f",
      "raw",
      ...[
        "write -P 0x31 100 5000",
        "write -f -P 0x32 2M 128k",
        "write -z 1M 64k",
        "write -z -u 1088k 64k",
        "discard 1536k 128k",
        "write -z 4M 4k",
      ].flatMap((c) => ["-c", c]),
      s.uri,
    ]);
    const map = JSON.parse(
      (await runOk(["qemu-img", "map", "--output=json", "-f", "raw", s.uri])).stdout,
    );
    return {
      // Keep the "wrote N/N bytes at offset X" lines, not the timing lines.
      out: r.stdout.split("\n").filter((l) => /^(wrote|discard|read) /.test(l)),
      map,
      sha: await sha256File(image),
      size: (await Deno.stat(image)).size,
    };
  });
});

const PY_OPTIONS = `
import json, sys, nbd
U = sys.argv[1]
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(U)
o = {}
ex = []
h.opt_list(lambda n, d: ex.append([n, d]) or 0)
o["list"] = ex
def info(name):
    h.set_export_name(name)
    try:
        h.opt_info()
    except nbd.Error as e:
        return e.errno
    return dict(size=h.get_size(), name=h.get_canonical_export_name(),
      desc=h.get_export_description() if h.get_export_description is not None else None,
      bs=[h.get_block_size(x) for x in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)],
      flags=[h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(),
        h.can_fast_zero(), h.can_df(), h.can_multi_conn(), h.can_cache(), h.is_rotational()])
for n in ["", "exp", "nope", "EXP", "exp "]:
    o["info:" + repr(n)] = info(n)
def lmc(queries):
    h.clear_meta_contexts()
    for q in queries:
        h.add_meta_context(q)
    names = []
    try:
        n = h.opt_list_meta_context(lambda c: names.append(c) or 0)
    except nbd.Error as e:
        return e.errno
    return [n, sorted(names)]
h.set_export_name("exp")
for qs in [[], ["base:"], ["base:allocation"], ["qemu:"], ["qemu:allocation-depth"],
           ["x-foo:bar"], ["base:nosuch", "base:allocation"], ["nocolon"]]:
    o["lmc:" + ",".join(qs)] = lmc(qs)
h.set_export_name("nope")
o["lmc:nope"] = lmc([])
h.opt_abort()
print(json.dumps(o))
`;

Deno.test("differential: option replies seen by libnbd (opt_list, opt_info, list_meta_context)", async () => {
  await differential(
    { args: ["-f", "raw", "-t", "-x", "exp", "-D", "described"], exportName: "exp" },
    (s) => runPython(PY_OPTIONS, [s.uri]),
  );
});

const PY_ERRNOS = `
import json, sys, nbd
U = sys.argv[1]
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(U)
h.set_strict_mode(0)
E = h.get_size()
def err(f):
    try:
        r = f()
        return ["ok", r.hex() if isinstance(r, (bytes, bytearray)) else r]
    except nbd.Error as e:
        return e.errno
cases = dict(
  read_past=lambda: h.pread(512, E),
  read_straddle=lambda: h.pread(1024, E - 512),
  read_big=lambda: h.pread(32 * 1024 * 1024 + 1, 0),
  read_max=lambda: len(h.pread(32 * 1024 * 1024, 0)),
  read_flag=lambda: h.pread(512, 0, 0x40),
  read_unaligned=lambda: h.pread(3, 1),
  read_zero_len=lambda: h.pread(0, 0),
  write_past=lambda: h.pwrite(b"x" * 512, E),
  write_flag=lambda: h.pwrite(b"x", 0, 0x40),
  zero_past=lambda: h.zero(512, E),
  zero_fast=lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO),
  zero_nohole=lambda: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE),
  zero_big=lambda: h.zero(E, 0),
  trim_past=lambda: h.trim(512, E),
  trim_zero_len=lambda: h.trim(0, 0),
  cache_past=lambda: h.cache(512, E),
  cache_ok=lambda: h.cache(4096, 0),
  flush=lambda: h.flush(),
  flush_fua=lambda: h.flush(nbd.CMD_FLAG_FUA),
  bs_past=lambda: h.block_status(512, E, lambda *a: 0),
  bs_zero_len=lambda: h.block_status(0, 0, lambda *a: 0),
)
print(json.dumps({k: err(f) for k, f in cases.items()}))
`;

Deno.test("differential: errno of failing and edge-case requests (libnbd, strict mode off)", async () => {
  await differential({ args: ["-f", "raw", "-t"] }, (s) => runPython(PY_ERRNOS, [s.uri]));
});

Deno.test("differential: errno of writes to a read-only export", async () => {
  await differential({ args: ["-f", "raw", "-t", "-r"] }, (s) =>
    runPython(
      `
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.set_strict_mode(0)
def err(f):
    try:
        f()
        return "ok"
    except nbd.Error as e:
        return e.errno
print(json.dumps(dict(write=err(lambda: h.pwrite(b"x" * 512, 0)), zero=err(lambda: h.zero(512, 0)),
  trim=err(lambda: h.trim(512, 0)), flush=err(h.flush), cache=err(lambda: h.cache(512, 0)))))
`,
      [s.uri],
    ));
});

/** Raw option exchange: the reply types (and INFO types) in order, for a list of options. */
async function rawOptionTranscript(s: Server): Promise<unknown[]> {
  const c = await rawConnect(s);
  const out: unknown[] = [];
  try {
    out.push({ handshakeFlags: await c.handshake() });
    const steps: [string, number, Uint8Array][] = [
      ["LIST", OPT.LIST, new Uint8Array(0)],
      ["INFO none", OPT.INFO, infoRequest("exp", [])],
      ["INFO all", OPT.INFO, infoRequest("exp", [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE])],
      ["INFO dup+unknown", OPT.INFO, infoRequest("exp", [INFO.NAME, INFO.NAME, 77])],
      ["INFO empty name", OPT.INFO, infoRequest("", [])],
      ["INFO nope", OPT.INFO, infoRequest("nope", [])],
      ["INFO short", OPT.INFO, new Uint8Array([0, 0])],
      ["LIST_META all", OPT.LIST_META_CONTEXT, metaContextQuery("exp", [])],
      ["SET_META before SR", OPT.SET_META_CONTEXT, metaContextQuery("exp", ["base:allocation"])],
      ["EXTENDED_HEADERS", OPT.EXTENDED_HEADERS, new Uint8Array(0)],
      ["opt 0", 0, new Uint8Array(0)],
      ["PEEK_EXPORT", 4, new Uint8Array(0)],
      ["STRUCTURED_REPLY", OPT.STRUCTURED_REPLY, new Uint8Array(0)],
      ["SET_META bad length", OPT.SET_META_CONTEXT, new Uint8Array([0, 0, 0, 9, 1])],
      ["SET_META nope", OPT.SET_META_CONTEXT, metaContextQuery("nope", ["base:allocation"])],
      ["SET_META 2", OPT.SET_META_CONTEXT, metaContextQuery("exp", ["base:allocation", "base:"])],
      ["GO", OPT.GO, infoRequest("exp", [INFO.BLOCK_SIZE])],
    ];
    for (const [label, opt, data] of steps) {
      await c.sendOption(opt, data);
      const rs = await c.optReplies();
      out.push({
        label,
        replies: rs.map((r) => {
          if (r.type === 3) {
            const t = view(r.data).getUint16(0);
            return `INFO:${t}:${Array.from(r.data.subarray(2)).join(",")}`;
          }
          const dec = new TextDecoder();
          if (r.type === 2) {
            const n = view(r.data).getUint32(0);
            const name = dec.decode(r.data.subarray(4, 4 + n));
            return `SERVER:${name}|${dec.decode(r.data.subarray(4 + n))}`;
          }
          if (r.type === 4) return `META_CONTEXT:${dec.decode(r.data.subarray(4))}`;
          return `${repName(r.type)}${r.option === opt ? "" : ` (echoed option ${r.option})`}`;
        }),
      });
    }
    await c.request({ type: 7, offset: 0, length: SIZE, cookie: 1n });
    const bs = await c.fullReply();
    out.push({
      blockStatus: bs.chunks.map((ch) =>
        ch.kind === "chunk" ? [ch.type, ch.flags, Array.from(ch.payload).join(",")] : ch
      ),
    });
  } finally {
    c.close();
  }
  return out;
}

Deno.test("differential: raw option replies in order (types, INFO payloads, meta contexts)", async () => {
  await differential(
    { args: ["-f", "raw", "-t", "-x", "exp", "-D", "d"], exportName: "exp" },
    rawOptionTranscript,
  );
});

Deno.test("differential: structured read chunks (sparse read, DF, unaligned)", async () => {
  await differential({ args: ["-f", "raw", "-t"] }, async (s) => {
    const c = await rawConnect(s);
    const out: unknown[] = [];
    try {
      await c.negotiate({ structured: true });
      const reads: [number, number, number][] = [
        [0, 2 * MiB, 0],
        [0, 2 * MiB, 4],
        [MiB - 100, 300, 0],
        [3 * MiB, MiB, 0],
        [5 * MiB - 4096, 128 * 1024, 0],
        [SIZE - 512, 512, 0],
      ];
      for (const [offset, length, flags] of reads) {
        await c.request({ type: 0, flags, offset, length, cookie: 3n });
        const r = await c.fullReply();
        out.push(r.chunks.map((ch) =>
          ch.kind === "chunk"
            ? [
              ch.type,
              ch.flags,
              ch.payload.length,
              ch.type === 1 || ch.type === 2 ? Number(view(ch.payload).getBigUint64(0)) : -1,
            ]
            : ch
        ));
      }
    } finally {
      c.close();
    }
    return out;
  });
});

Deno.test("differential: qemu-nbd -L (list mode) prints the same export listing", async () => {
  await differential(
    { args: ["-f", "raw", "-t", "-x", "exp", "-D", "listed"], exportName: "exp" },
    async (s) => {
      const argv = [...serverArgv(s.kind), "-L", "-k", s.socketPath!];
      const r = await run(argv, { timeoutMs: 10_000 });
      return { code: r.code, stdout: r.stdout };
    },
  );
});

Deno.test("differential: exit codes of bad command lines", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, MiB);
    const bad = [
      ["-e", "-1"],
      ["--discard=bogus"],
      ["--bogus-option"],
      ["-f", "qcow9"],
      ["-o", "12x"],
      ["--detect-zeroes=unmap"],
      ["--cache=bogus"],
      ["-f", "raw", `${dir}/missing.img`],
      ["-x"],
    ];
    const codes = async (kind: ServerKind) => {
      const out: number[] = [];
      for (const [i, args] of bad.entries()) {
        const positional = args.some((a) => a.endsWith(".img")) || args[0] === "-x" ? [] : [image];
        const r = await run(
          [...serverArgv(kind), "-k", `${dir}/${kind}-${i}.sock`, ...args, ...positional],
          { timeoutMs: 10_000 },
        );
        out.push(r.code);
      }
      return out;
    };
    const [got, want] = await Promise.all([codes(SERVER_KIND), codes("qemu-nbd")]);
    assert.ok(want.every((c) => c !== 0), `qemu-nbd accepted a bad command line: ${want}`);
    assert.deepEqual(got, want);
  });
});
