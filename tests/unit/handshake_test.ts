// The handshake state machine driven without sockets, one byte at a time and in whole blocks.
import assert from "node:assert/strict";
import * as C from "../../lib/nbd/constants.ts";
import {
  type Effect,
  type ExportDescriptor,
  initialState,
  MAX_OPTIONS,
  step,
} from "../../lib/nbd/handshake.ts";

const EXPORT: ExportDescriptor = {
  name: "disk0",
  description: "test export",
  size: 64 * 1024 * 1024,
  flags: C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_SEND_FUA |
    C.NBD_FLAG_SEND_CACHE |
    C.NBD_FLAG_SEND_TRIM | C.NBD_FLAG_SEND_WRITE_ZEROES | C.NBD_FLAG_SEND_FAST_ZERO,
  minBlock: 1,
  maxBlock: C.NBD_MAX_BUFFER_SIZE,
  allocationDepth: true,
  bitmaps: ["b0", "b1"],
};

const enc = new TextEncoder();

function u32(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
}
function u16(n: number): Uint8Array {
  const b = new Uint8Array(2);
  new DataView(b.buffer).setUint16(0, n);
  return b;
}
function cat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
function option(opt: number, data: Uint8Array = new Uint8Array()): Uint8Array {
  const h = new Uint8Array(16);
  const v = new DataView(h.buffer);
  v.setBigUint64(0, C.IHAVEOPT);
  v.setUint32(8, opt);
  v.setUint32(12, data.length);
  return cat(h, data);
}
function infoData(name: string, requests: number[]): Uint8Array {
  const n = enc.encode(name);
  return cat(u32(n.length), n, u16(requests.length), ...requests.map(u16));
}
function metaData(name: string, queries: string[]): Uint8Array {
  const n = enc.encode(name);
  return cat(
    u32(n.length),
    n,
    u32(queries.length),
    ...queries.map((q) => cat(u32(enc.encode(q).length), enc.encode(q))),
  );
}

interface Reply {
  option: number;
  type: number;
  data: Uint8Array;
}
function parseReplies(bytes: Uint8Array): Reply[] {
  const out: Reply[] = [];
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  while (at < bytes.length) {
    assert.equal(v.getBigUint64(at), C.NBD_OPT_REPLY_MAGIC);
    const len = v.getUint32(at + 16);
    out.push({
      option: v.getUint32(at + 8),
      type: v.getUint32(at + 12),
      data: bytes.slice(at + 20, at + 20 + len),
    });
    at += 20 + len;
  }
  return out;
}

interface Run {
  replies: Uint8Array;
  effect: Effect;
  consumed: number;
}

/** Feed `input` to a fresh machine, `chunk` bytes at a time, until it stops or input runs out. */
function drive(input: Uint8Array, chunk = 1, tls = false): Run {
  let state = initialState(EXPORT, tls);
  let buffered: Uint8Array = new Uint8Array();
  let fed = 0;
  let consumed = 0;
  const replies: Uint8Array[] = [];
  for (let guard = 0; guard < 1_000_000; guard++) {
    const r = step(state, buffered);
    state = r.state;
    buffered = buffered.subarray(r.consumed);
    consumed += r.consumed;
    replies.push(...r.replies);
    if (r.effect.kind === "go" || r.effect.kind === "close" || r.effect.kind === "starttls") {
      return { replies: cat(...replies), effect: r.effect, consumed };
    }
    if (r.effect.kind === "more") {
      if (fed >= input.length) return { replies: cat(...replies), effect: r.effect, consumed };
      buffered = cat(buffered, input.subarray(fed, fed + chunk));
      fed += chunk;
    }
  }
  throw new Error("machine did not settle");
}

const FIXED = u32(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES);

Deno.test("GO with the right name: INFO replies in qemu's order, then ACK and transmission", () => {
  for (const chunk of [1, 7, 1000]) {
    const run = drive(
      cat(FIXED, option(C.NBD_OPT_GO, infoData("disk0", [C.NBD_INFO_NAME, C.NBD_INFO_BLOCK_SIZE]))),
      chunk,
    );
    assert.equal(run.effect.kind, "go");
    const reps = parseReplies(run.replies);
    assert.deepEqual(reps.map((r) => r.type), [
      C.NBD_REP_INFO,
      C.NBD_REP_INFO,
      C.NBD_REP_INFO,
      C.NBD_REP_INFO,
      C.NBD_REP_ACK,
    ]);
    const infoTypes = reps.slice(0, 4).map((r) => new DataView(r.data.buffer).getUint16(0));
    assert.deepEqual(infoTypes, [
      C.NBD_INFO_NAME,
      C.NBD_INFO_DESCRIPTION,
      C.NBD_INFO_BLOCK_SIZE,
      C.NBD_INFO_EXPORT,
    ]);
    const exp = new DataView(reps[3]!.data.buffer);
    assert.equal(Number(exp.getBigUint64(2)), EXPORT.size);
    assert.equal(exp.getUint16(10), EXPORT.flags); // no DF without structured replies
  }
});

Deno.test("GO with an unknown name: ERR_UNKNOWN and negotiation continues", () => {
  const run = drive(
    cat(
      FIXED,
      option(C.NBD_OPT_GO, infoData("nope", [])),
      option(C.NBD_OPT_GO, infoData("disk0", [])),
    ),
  );
  const reps = parseReplies(run.replies);
  assert.equal(reps[0]!.type, C.NBD_REP_ERR_UNKNOWN);
  assert.equal(run.effect.kind, "go");
});

Deno.test("BLOCK_SIZE minimum: 1 on GO unless requested, real value on INFO", () => {
  const cfg = { ...EXPORT, minBlock: 512 };
  const go = (data: Uint8Array, opt: number) => {
    let s = initialState(cfg);
    const input = cat(FIXED, option(opt, data));
    let r = step(s, input);
    s = r.state;
    const all: Uint8Array[] = [];
    let off = r.consumed;
    for (let i = 0; i < 10 && r.effect.kind === "continue"; i++) {
      r = step(s, input.subarray(off));
      s = r.state;
      off += r.consumed;
      all.push(...r.replies);
    }
    return parseReplies(cat(...all));
  };
  const minOf = (reps: Reply[]) => {
    const bs = reps.find((r) =>
      r.type === C.NBD_REP_INFO &&
      new DataView(r.data.buffer).getUint16(0) === C.NBD_INFO_BLOCK_SIZE
    )!;
    return new DataView(bs.data.buffer).getUint32(2);
  };
  assert.equal(minOf(go(infoData("disk0", []), C.NBD_OPT_GO)), 1);
  assert.equal(minOf(go(infoData("disk0", [C.NBD_INFO_BLOCK_SIZE]), C.NBD_OPT_GO)), 512);
  const info = go(infoData("disk0", []), C.NBD_OPT_INFO);
  assert.equal(minOf(info), 512);
  // INFO without asking for block sizes on an aligned export ends in ERR_BLOCK_SIZE_REQD.
  assert.equal(info.at(-1)!.type, C.NBD_REP_ERR_BLOCK_SIZE_REQD);
});

Deno.test("STRUCTURED_REPLY: ACK, then DF in the flags; a second one is ERR_INVALID", () => {
  const run = drive(
    cat(
      FIXED,
      option(C.NBD_OPT_STRUCTURED_REPLY),
      option(C.NBD_OPT_STRUCTURED_REPLY),
      option(C.NBD_OPT_GO, infoData("disk0", [])),
    ),
  );
  const reps = parseReplies(run.replies);
  assert.equal(reps[0]!.type, C.NBD_REP_ACK);
  assert.equal(reps[1]!.type, C.NBD_REP_ERR_INVALID);
  assert.equal(run.effect.kind, "go");
  if (run.effect.kind === "go") {
    assert.equal(run.effect.negotiated.structured, true);
    assert.equal(run.effect.negotiated.flags & C.NBD_FLAG_SEND_DF, C.NBD_FLAG_SEND_DF);
  }
});

Deno.test("unknown options get ERR_UNSUP, their data is skipped, and the next option works", () => {
  const run = drive(
    cat(
      FIXED,
      option(99, new Uint8Array(5000).fill(7)),
      option(C.NBD_OPT_LIST),
      option(C.NBD_OPT_ABORT),
    ),
    3,
  );
  const reps = parseReplies(run.replies);
  assert.deepEqual(reps.map((r) => r.type), [
    C.NBD_REP_ERR_UNSUP,
    C.NBD_REP_SERVER,
    C.NBD_REP_ACK,
    C.NBD_REP_ACK,
  ]);
  const entry = new DataView(reps[1]!.data.buffer);
  assert.equal(
    new TextDecoder().decode(reps[1]!.data.subarray(4, 4 + entry.getUint32(0))),
    "disk0",
  );
  assert.equal(run.effect.kind, "close");
});

Deno.test("LIST and STARTTLS with data: ERR_INVALID; STARTTLS without TLS: ERR_POLICY", () => {
  const run = drive(
    cat(
      FIXED,
      option(C.NBD_OPT_LIST, u32(1)),
      option(C.NBD_OPT_STARTTLS, u32(1)),
      option(C.NBD_OPT_STARTTLS),
      option(C.NBD_OPT_ABORT),
    ),
  );
  const reps = parseReplies(run.replies);
  assert.deepEqual(reps.map((r) => r.type), [
    C.NBD_REP_ERR_INVALID,
    C.NBD_REP_ERR_INVALID,
    C.NBD_REP_ERR_POLICY,
    C.NBD_REP_ACK,
  ]);
});

Deno.test("meta contexts: LIST wildcards and zero queries, SET selects exact names only", () => {
  const names = (reps: Reply[]) =>
    reps.filter((r) => r.type === C.NBD_REP_META_CONTEXT).map((
      r,
    ) => [new DataView(r.data.buffer).getUint32(0), new TextDecoder().decode(r.data.subarray(4))]);
  // LIST before STRUCTURED_REPLY is allowed (qemu); zero queries list everything with id 0.
  let reps = parseReplies(
    drive(
      cat(
        FIXED,
        option(C.NBD_OPT_LIST_META_CONTEXT, metaData("disk0", [])),
        option(C.NBD_OPT_ABORT),
      ),
    ).replies,
  );
  assert.deepEqual(names(reps), [[0, "base:allocation"], [0, "qemu:allocation-depth"], [
    0,
    "qemu:dirty-bitmap:b0",
  ], [0, "qemu:dirty-bitmap:b1"]]);
  reps = parseReplies(
    drive(
      cat(
        FIXED,
        option(
          C.NBD_OPT_LIST_META_CONTEXT,
          metaData("disk0", ["qemu:dirty-bitmap:", "x-foo:bar", "base:nosuch"]),
        ),
        option(C.NBD_OPT_ABORT),
      ),
    ).replies,
  );
  assert.deepEqual(names(reps), [[0, "qemu:dirty-bitmap:b0"], [0, "qemu:dirty-bitmap:b1"]]);
  // SET before STRUCTURED_REPLY is refused.
  reps = parseReplies(
    drive(
      cat(
        FIXED,
        option(C.NBD_OPT_SET_META_CONTEXT, metaData("disk0", ["base:allocation"])),
        option(C.NBD_OPT_ABORT),
      ),
    ).replies,
  );
  assert.equal(reps[0]!.type, C.NBD_REP_ERR_INVALID);
  // SET after SR: wildcards select nothing; exact names get qemu's ids.
  const run = drive(cat(
    FIXED,
    option(C.NBD_OPT_STRUCTURED_REPLY),
    option(
      C.NBD_OPT_SET_META_CONTEXT,
      metaData("disk0", ["qemu:", "base:", "base:allocation", "qemu:dirty-bitmap:b1"]),
    ),
    option(C.NBD_OPT_GO, infoData("disk0", [])),
  ));
  reps = parseReplies(run.replies);
  assert.deepEqual(names(reps), [[0, "base:allocation"], [3, "qemu:dirty-bitmap:b1"]]);
  assert.equal(run.effect.kind, "go");
  if (run.effect.kind === "go") assert.equal(run.effect.negotiated.meta.count, 2);
  // Inconsistent lengths: ERR_INVALID.
  const bad = metaData("disk0", ["base:allocation"]).slice(0, -3);
  reps = parseReplies(
    drive(
      cat(
        FIXED,
        option(C.NBD_OPT_STRUCTURED_REPLY),
        option(C.NBD_OPT_SET_META_CONTEXT, bad),
        option(C.NBD_OPT_ABORT),
      ),
    ).replies,
  );
  assert.equal(reps[1]!.type, C.NBD_REP_ERR_INVALID);
});

Deno.test("EXPORT_NAME: size, flags and 124 zero bytes unless NO_ZEROES; unknown name closes", () => {
  let run = drive(cat(u32(0), option(C.NBD_OPT_EXPORT_NAME, enc.encode("disk0"))));
  assert.equal(run.effect.kind, "go");
  assert.equal(run.replies.length, 134);
  assert.ok(run.replies.subarray(10).every((b) => b === 0));
  run = drive(cat(FIXED, option(C.NBD_OPT_EXPORT_NAME, enc.encode("disk0"))));
  assert.equal(run.replies.length, 10);
  run = drive(cat(FIXED, option(C.NBD_OPT_EXPORT_NAME, enc.encode("other"))));
  assert.equal(run.effect.kind, "close");
});

Deno.test("violations close the connection: unknown client flags, bad option magic, non-fixed client options", () => {
  assert.equal(drive(u32(4)).effect.kind, "close");
  const badMagic = option(C.NBD_OPT_LIST);
  badMagic[0] = 0;
  assert.equal(drive(cat(FIXED, badMagic)).effect.kind, "close");
  assert.equal(drive(cat(u32(0), option(C.NBD_OPT_LIST))).effect.kind, "close");
  // An option longer than 32 MiB is refused before anything is buffered.
  const huge = option(C.NBD_OPT_GO).slice(0, 16);
  new DataView(huge.buffer).setUint32(12, C.NBD_MAX_BUFFER_SIZE + 1);
  const run = drive(cat(FIXED, huge));
  assert.equal(run.effect.kind, "close");
  assert.equal(run.consumed, 4 + 16);
});

Deno.test("option flood is bounded", () => {
  const many: Uint8Array[] = [FIXED];
  for (let i = 0; i <= MAX_OPTIONS; i++) many.push(option(C.NBD_OPT_STRUCTURED_REPLY));
  const run = drive(cat(...many), 1 << 20);
  assert.equal(run.effect.kind, "close");
});

Deno.test("truncated input never produces a decision: the machine asks for more", () => {
  const full = cat(FIXED, option(C.NBD_OPT_GO, infoData("disk0", [])));
  for (let cut = 0; cut < full.length; cut++) {
    assert.equal(drive(full.subarray(0, cut), 1).effect.kind, "more", `cut at ${cut}`);
  }
});

Deno.test("random garbage after the flags ends in close or more, never an exception", () => {
  let seed = 12345;
  const rand = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
  for (let i = 0; i < 300; i++) {
    const n = Math.floor(rand() * 64);
    const junk = new Uint8Array(n).map(() => Math.floor(rand() * 256));
    // Half the time start with a valid option header so deeper states are reached.
    const input = rand() < 0.5
      ? cat(FIXED, junk)
      : cat(FIXED, option(Math.floor(rand() * 12), junk));
    const kind = drive(input, 1 + Math.floor(rand() * 8)).effect.kind;
    assert.ok(kind === "close" || kind === "more" || kind === "go", kind);
  }
});

// --tls-creds: qemu 7.2's forced-TLS rules (nbd/server.c), before and after STARTTLS.
const text = (b: Uint8Array) => new TextDecoder().decode(b);

Deno.test("forced TLS: every option but STARTTLS is refused with TLS_REQD and qemu's text", () => {
  for (
    const opt of [
      C.NBD_OPT_LIST,
      C.NBD_OPT_STRUCTURED_REPLY,
      C.NBD_OPT_GO,
      C.NBD_OPT_INFO,
      C.NBD_OPT_LIST_META_CONTEXT,
      C.NBD_OPT_SET_META_CONTEXT,
      99,
    ]
  ) {
    const run = drive(cat(FIXED, option(opt, infoData("disk0", [])), option(2)), 7, true);
    const [first, second] = parseReplies(run.replies);
    assert.equal(first!.type, C.NBD_REP_ERR_TLS_REQD, `option ${opt}`);
    assert.equal(text(first!.data), `Option 0x${opt.toString(16)} not permitted before TLS`);
    // ABORT is refused the same way, then the connection ends without an error in the log.
    assert.equal(second!.type, C.NBD_REP_ERR_TLS_REQD);
    assert.equal(text(second!.data), "Option 0x2 not permitted before TLS");
    assert.deepEqual(run.effect, {
      kind: "close",
      reason: "client sent NBD_OPT_ABORT",
      clean: true,
    });
  }
});

Deno.test("forced TLS: EXPORT_NAME drops the client, STARTTLS with data is invalid and fatal", () => {
  const byName = drive(cat(FIXED, option(C.NBD_OPT_EXPORT_NAME, enc.encode("disk0"))), 3, true);
  assert.equal(byName.replies.length, 0);
  assert.deepEqual(byName.effect, {
    kind: "close",
    reason: "Option 0x1 not permitted before TLS",
    clean: false,
  });
  const withData = drive(cat(FIXED, option(C.NBD_OPT_STARTTLS, u32(1))), 5, true);
  const [r] = parseReplies(withData.replies);
  assert.equal(r!.type, C.NBD_REP_ERR_INVALID);
  assert.deepEqual(withData.effect, {
    kind: "close",
    reason: "option 'starttls' has unexpected length",
    clean: false,
  });
  const oldStyle = drive(cat(u32(0), option(C.NBD_OPT_STARTTLS)), 4, true);
  assert.deepEqual(oldStyle.effect, {
    kind: "close",
    reason: "Unsupported option 0x5",
    clean: false,
  });
});

Deno.test("forced TLS: STARTTLS is acknowledged, then nothing from before survives", () => {
  let state = initialState(EXPORT, true);
  let r = step(state, FIXED);
  state = r.state;
  r = step(state, option(C.NBD_OPT_STARTTLS));
  assert.equal(r.effect.kind, "starttls");
  assert.equal(parseReplies(cat(...r.replies))[0]!.type, C.NBD_REP_ACK);
  state = r.state;
  // Encrypted now: a second STARTTLS is invalid, SET_META_CONTEXT needs STRUCTURED_REPLY first.
  const rest = cat(
    option(C.NBD_OPT_STARTTLS),
    option(C.NBD_OPT_SET_META_CONTEXT, metaData("disk0", ["base:allocation"])),
    option(C.NBD_OPT_STRUCTURED_REPLY),
    option(C.NBD_OPT_GO, infoData("disk0", [])),
  );
  const replies: Uint8Array[] = [];
  let input = rest;
  for (let i = 0; i < 100 && r.effect.kind !== "go"; i++) {
    r = step(state, input);
    state = r.state;
    input = input.subarray(r.consumed);
    replies.push(...r.replies);
  }
  const got = parseReplies(cat(...replies));
  assert.equal(got[0]!.type, C.NBD_REP_ERR_INVALID);
  assert.equal(text(got[0]!.data), "TLS already enabled");
  assert.equal(got[1]!.type, C.NBD_REP_ERR_INVALID);
  assert.match(text(got[1]!.data), /structured reply is not negotiated/);
  assert.equal(got[2]!.type, C.NBD_REP_ACK);
  assert.equal(r.effect.kind, "go");
  if (r.effect.kind === "go") assert.equal(r.effect.negotiated.structured, true);
});

Deno.test("without TLS configured STARTTLS is refused by policy", () => {
  const run = drive(cat(FIXED, option(C.NBD_OPT_STARTTLS), option(2)), 16);
  const [r] = parseReplies(run.replies);
  assert.equal(r!.type, C.NBD_REP_ERR_POLICY);
  assert.equal(text(r!.data), "TLS not configured");
});
