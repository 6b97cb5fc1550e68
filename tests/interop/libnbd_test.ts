/**
 * Option negotiation and transmission corner cases driven through python libnbd: opt mode
 * (LIST, INFO, LIST_META_CONTEXT), unknown export names, structured replies on and off, block
 * status with REQ_ONE, DF reads, out-of-range requests and writes to a read-only export.
 *
 * libnbd 1.14 has no opt_set_meta_context; SET_META_CONTEXT is exercised through
 * add_meta_context + opt_go + can_meta_context.
 */

import assert from "node:assert/strict";
import {
  makeSparseImage,
  MiB,
  runPython,
  type Server,
  withServer,
  withTempDir,
} from "./_harness.ts";

/** Python prelude: URI in sys.argv[1]; `err(f)` returns the errno name f raised, or "ok". */
const PRELUDE = `
import json, sys, nbd
U = sys.argv[1]
def err(f):
    try:
        f()
        return "ok"
    except nbd.Error as e:
        return e.errno
def out(o):
    print(json.dumps(o))
`;

/** 4 MiB image: hole, 1 MiB of 0xaa at 1 MiB, hole. */
async function withImageServer(
  args: readonly string[],
  fn: (server: Server) => Promise<void>,
  exportName = "",
): Promise<void> {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, 4 * MiB, [{ offset: MiB, length: MiB, fill: 0xaa }]);
    await withServer({ dir, image, args: ["-f", "raw", "-t", ...args], exportName }, fn);
  });
}

function py<T>(server: Server, body: string, uri = server.uri): Promise<T> {
  return runPython<T>(PRELUDE + body, [uri]);
}

Deno.test("libnbd opt mode: opt_list, opt_info (name, description, size, block sizes)", async () => {
  await withImageServer(["-x", "exp", "-D", "the desc"], async (server) => {
    const r = await py<Record<string, unknown>>(
      server,
      `
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(U)
exports = []
n = h.opt_list(lambda name, desc: exports.append([name, desc]) or 0)
h.set_export_name("exp")
h.opt_info()
o = dict(n=n, exports=exports, size=h.get_size(), canonical=h.get_canonical_export_name(),
  desc=h.get_export_description(),
  bs=[h.get_block_size(x) for x in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)],
  ro=h.is_read_only(), multi=h.can_multi_conn(), flush=h.can_flush(), fua=h.can_fua(),
  trim=h.can_trim(), zero=h.can_zero(), fast_zero=h.can_fast_zero(), cache=h.can_cache(),
  df=h.can_df())
h.opt_abort()
out(o)
`,
      server.uriFor("exp"),
    );
    assert.deepEqual(r, {
      n: 1,
      exports: [["exp", "the desc"]],
      size: 4 * MiB,
      canonical: "exp",
      desc: "the desc",
      bs: [1, 4096, 32 * MiB],
      ro: false,
      multi: false,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      fast_zero: true,
      cache: true,
      df: true,
    });
  });
});

Deno.test("libnbd opt_list_meta_context: all, base: wildcard, unknown names", async () => {
  await withImageServer([], async (server) => {
    const r = await py<Record<string, unknown>>(
      server,
      `
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(U)
def lst():
    names = []
    n = h.opt_list_meta_context(lambda name: names.append(name) or 0)
    return [n, names]
o = {}
o["all"] = lst()
h.add_meta_context("base:")
o["base_wild"] = lst()
h.clear_meta_contexts()
h.add_meta_context("x-foo:bar")
h.add_meta_context("base:nosuch")
o["unknown"] = lst()
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
o["exact"] = lst()
h.opt_abort()
out(o)
`,
    );
    assert.deepEqual(r, {
      all: [1, ["base:allocation"]],
      base_wild: [1, ["base:allocation"]],
      unknown: [0, []],
      exact: [1, ["base:allocation"]],
    });
  });
});

Deno.test("libnbd SET_META_CONTEXT via opt_go selects known contexts and ignores unknown ones", async () => {
  await withImageServer([], async (server) => {
    const r = await py<Record<string, unknown>>(
      server,
      `
h = nbd.NBD()
h.add_meta_context("x-foo:bar")
h.add_meta_context("base:allocation")
h.add_meta_context("base:")
h.connect_uri(U)
out(dict(alloc=h.can_meta_context("base:allocation"), foo=h.can_meta_context("x-foo:bar"),
  wild=h.can_meta_context("base:"), sr=h.get_structured_replies_negotiated()))
`,
    );
    assert.deepEqual(r, { alloc: true, foo: false, wild: false, sr: true });
  });
});

Deno.test("libnbd unknown export name: opt_info and opt_go fail with ENOENT, then the right name works", async () => {
  await withImageServer(["-x", "exp"], async (server) => {
    const r = await py<Record<string, unknown>>(
      server,
      `
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(U)
h.set_export_name("nope")
o = dict(info=err(h.opt_info), go=err(h.opt_go))
h.set_export_name("")
o["empty"] = err(h.opt_info)
h.set_export_name("exp")
o["go_exp"] = err(h.opt_go)
o["read"] = h.pread(4, MiB).hex()
out(o)
`.replace("MiB", String(MiB)),
    );
    assert.deepEqual(r, {
      info: "ENOENT",
      go: "ENOENT",
      empty: "ENOENT",
      go_exp: "ok",
      read: "aaaaaaaa",
    });
  });
});

Deno.test("libnbd without structured replies: no DF, no meta contexts, simple reads still work", async () => {
  await withImageServer([], async (server) => {
    const r = await py<Record<string, unknown>>(
      server,
      `
h = nbd.NBD()
h.set_request_structured_replies(False)
h.add_meta_context("base:allocation")
h.connect_uri(U)
o = dict(sr=h.get_structured_replies_negotiated(), df=h.can_df(),
  meta=h.can_meta_context("base:allocation"), data=h.pread(8, ${MiB - 4}).hex(),
  proto=h.get_protocol())
h.set_strict_mode(0)
o["past_end"] = err(lambda: h.pread(512, ${4 * MiB}))
o["after"] = h.pread(2, ${2 * MiB - 1}).hex()
out(o)
`,
    );
    assert.deepEqual(r, {
      sr: false,
      df: false,
      meta: false,
      data: "00000000aaaaaaaa",
      proto: "newstyle-fixed",
      past_end: "EINVAL",
      after: "aa00",
    });
  });
});

Deno.test("libnbd block status: full map and REQ_ONE returns exactly one extent", async () => {
  await withImageServer([], async (server) => {
    const r = await py<Record<string, unknown>>(
      server,
      `
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(U)
def bs(length, offset, flags=0):
    got = []
    h.block_status(length, offset, lambda ctx, off, ents, e: got.append([ctx, off, list(ents)]) or 0, flags)
    return got
out(dict(full=bs(${4 * MiB}, 0), one=bs(${4 * MiB}, 0, nbd.CMD_FLAG_REQ_ONE),
  one_data=bs(${3 * MiB}, ${MiB}, nbd.CMD_FLAG_REQ_ONE), mid=bs(4096, ${MiB + 8192})))
`,
    );
    assert.deepEqual(r, {
      full: [["base:allocation", 0, [MiB, 3, MiB, 0, 2 * MiB, 3]]],
      one: [["base:allocation", 0, [MiB, 3]]],
      one_data: [["base:allocation", MiB, [MiB, 0]]],
      // Without REQ_ONE the last extent may run past the request (the spec allows it), so only
      // its start and status are pinned here.
      mid: r.mid,
    });
    const mid = r.mid as [string, number, number[]][];
    assert.equal(mid.length, 1);
    assert.equal(mid[0]![1], MiB + 8192);
    assert.ok(mid[0]![2][0]! >= 4096);
    assert.equal(mid[0]![2][1], 0);
  });
});

Deno.test("libnbd structured reads: DF gives one data chunk, plain read of data+hole is sparse", async () => {
  await withImageServer([], async (server) => {
    const r = await py<Record<string, unknown>>(
      server,
      `
h = nbd.NBD()
h.connect_uri(U)
def chunks(flags):
    got = []
    def cb(buf, off, status, e):
        got.append([off, len(buf), "data" if status == nbd.READ_DATA else "hole",
          buf[:1].hex(), buf[-1:].hex()])
        return 0
    h.pread_structured(${2 * MiB}, 0, cb, flags)
    return got
out(dict(df=chunks(nbd.CMD_FLAG_DF), plain=chunks(0)))
`,
    );
    assert.deepEqual(r.df, [[0, 2 * MiB, "data", "00", "aa"]]);
    // qemu-nbd sends the hole as OFFSET_HOLE; libnbd hands it over as zeroes with READ_HOLE.
    assert.deepEqual(r.plain, [[0, MiB, "hole", "00", "00"], [MiB, MiB, "data", "aa", "aa"]]);
  });
});

Deno.test("libnbd requests past the end or oversized fail with EINVAL; the connection survives", async () => {
  await withImageServer([], async (server) => {
    const r = await py<Record<string, unknown>>(
      server,
      `
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(U)
h.set_strict_mode(0)
E = ${4 * MiB}
o = dict(
  read=err(lambda: h.pread(512, E)),
  straddle=err(lambda: h.pread(1024, E - 512)),
  write=err(lambda: h.pwrite(b"x" * 512, E)),
  zero=err(lambda: h.zero(512, E)),
  trim=err(lambda: h.trim(512, E)),
  cache=err(lambda: h.cache(512, E)),
  block_status=err(lambda: h.block_status(512, E, lambda *a: 0)),
  big_read=err(lambda: h.pread(${32 * MiB + 512}, 0)),
  bad_flag=err(lambda: h.pread(512, 0, 0x40)),
  zero_len_read=err(lambda: h.pread(0, 0)),
)
o["after"] = h.pread(4, ${MiB}).hex()
out(o)
`,
    );
    assert.deepEqual(r, {
      read: "EINVAL",
      straddle: "EINVAL",
      write: "EINVAL",
      zero: "EINVAL",
      trim: "EINVAL",
      cache: "EINVAL",
      block_status: "EINVAL",
      big_read: "EINVAL",
      bad_flag: "EINVAL",
      zero_len_read: "ok",
      after: "aaaaaaaa",
    });
  });
});

Deno.test("libnbd writes to a -r export fail (EINVAL from the server, EPERM client-side)", async () => {
  await withImageServer(["-r"], async (server) => {
    const r = await py<Record<string, unknown>>(
      server,
      `
h = nbd.NBD()
h.connect_uri(U)
o = dict(ro=h.is_read_only(), strict_write=err(lambda: h.pwrite(b"x" * 512, 0)))
h.set_strict_mode(0)
o.update(write=err(lambda: h.pwrite(b"x" * 512, 0)), zero=err(lambda: h.zero(512, 0)),
  trim=err(lambda: h.trim(512, 0)), flush=err(h.flush), read=h.pread(1, ${MiB}).hex())
out(o)
`,
    );
    assert.deepEqual(r, {
      ro: true,
      strict_write: "EPERM",
      write: "EINVAL",
      zero: "EINVAL",
      trim: "EINVAL",
      flush: "ok",
      read: "aa",
    });
  });
});
