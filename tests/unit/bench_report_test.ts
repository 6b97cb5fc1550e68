/**
 * scripts/bench_lib: the pure parts of the benchmark — the SVG ratio chart (parsed back as XML),
 * the Markdown report's cells, row selection and ids, the run estimate, fio output parsing.
 */
import assert from "node:assert/strict";
import {
  axisScale,
  escapeXml,
  type RatioChart,
  renderRatioChart,
} from "../../scripts/bench_lib/chart.ts";
import { estimateSeconds, formatDuration, selectRows } from "../../scripts/bench_lib/plan.ts";
import {
  type BenchResults,
  type Cell,
  type MeasuredSample,
  ratioChartOf,
  renderMarkdown,
} from "../../scripts/bench_lib/report.ts";
import {
  fioRow,
  lastToolLine,
  nbdcopyRow,
  parseFioJson,
  ROW_DEFS,
  summarizeFioFailure,
} from "../../scripts/bench_lib/rows.ts";
import { SERVER_DEFS } from "../../scripts/bench_lib/servers.ts";
import type { ServerDef, ServeTarget } from "../../scripts/bench_lib/types.ts";

// --- A small strict XML reader, enough to prove the SVG is well-formed -------------------------

interface Element {
  readonly name: string;
  readonly attrs: Readonly<Record<string, string>>;
  readonly children: Element[];
  text: string;
}

const ENTITY = /&(#\d+|#x[0-9a-fA-F]+|amp|lt|gt|quot|apos);/g;

function decode(text: string, where: string): string {
  const bare = text.replace(ENTITY, "");
  if (bare.includes("&")) throw new Error(`Bare '&' in ${where}: ${text}`);
  return text.replace(ENTITY, (_, e: string) => {
    if (e.startsWith("#x")) return String.fromCodePoint(parseInt(e.slice(2), 16));
    if (e.startsWith("#")) return String.fromCodePoint(Number(e.slice(1)));
    return { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'" }[e]!;
  });
}

/** Parses `doc` into its root element; throws on any unbalanced or malformed markup. */
function parseXml(doc: string): Element {
  const token =
    /<\?xml[^?]*\?>|<!--[\s\S]*?-->|<(\/?)([A-Za-z][\w:.-]*)((?:\s+[A-Za-z][\w:.-]*="[^"<]*")*)\s*(\/?)>|([^<]+)/y;
  const stack: Element[] = [];
  let root: Element | undefined;
  let pos = 0;
  for (let guard = 0; pos < doc.length; guard++) {
    if (guard > 1_000_000) throw new Error("XML reader did not advance");
    token.lastIndex = pos;
    const m = token.exec(doc);
    if (!m) throw new Error(`Malformed markup at ${pos}: ${doc.slice(pos, pos + 60)}`);
    pos = token.lastIndex;
    const [whole, closing, name, attrText, selfClosing, text] = m;
    if (text !== undefined) {
      const top = stack.at(-1);
      if (top) top.text += decode(text, `<${top.name}>`);
      else if (text.trim()) throw new Error(`Text outside the root: ${text.trim()}`);
      continue;
    }
    if (name === undefined) continue; // Prolog or comment.
    if (whole.startsWith("<?") || whole.startsWith("<!--")) continue;
    if (closing) {
      const open = stack.pop();
      if (open?.name !== name) throw new Error(`</${name}> closes <${open?.name ?? "nothing"}>`);
      if (stack.length === 0) root = open;
      continue;
    }
    const attrs: Record<string, string> = {};
    for (const a of (attrText ?? "").matchAll(/([A-Za-z][\w:.-]*)="([^"]*)"/g)) {
      if (a[1]! in attrs) throw new Error(`Duplicate attribute ${a[1]} on <${name}>`);
      attrs[a[1]!] = decode(a[2]!, `${name}@${a[1]}`);
    }
    const el: Element = { name, attrs, children: [], text: "" };
    const parent = stack.at(-1);
    if (parent) parent.children.push(el);
    else if (root || stack.length > 0) throw new Error(`Second root element <${name}>`);
    if (selfClosing) {
      if (!parent) root = el;
    } else stack.push(el);
  }
  if (stack.length > 0) throw new Error(`Unclosed <${stack.map((e) => e.name).join("><")}>`);
  if (!root) throw new Error("No root element");
  return root;
}

function all(el: Element, pred: (e: Element) => boolean): Element[] {
  return [...(pred(el) ? [el] : []), ...el.children.flatMap((c) => all(c, pred))];
}

Deno.test("parseXml: the checker itself rejects broken markup", () => {
  assert.doesNotThrow(() => parseXml(`<a x="1"><b/>t &amp; u</a>`));
  for (
    const bad of [
      `<a><b></a></b>`,
      `<a>`,
      `<a></a><b/>`,
      `<a x=1/>`,
      `<a>x & y</a>`,
      `<a x="1" x="2"/>`,
      `<a><</a>`,
    ]
  ) {
    assert.throws(() => parseXml(bad), Error, bad);
  }
});

// --- The chart ---------------------------------------------------------------------------------

const CHART: RatioChart = {
  title: 'Ratios <&> "quoted"',
  subtitle: "sub & title",
  series: ["denbd/qemu-nbd", "denbd/nbdkit"],
  groups: [
    { label: "seq read <raw>", values: [1.5, 0.5] },
    { label: "randwrite & co", values: [2.75, undefined] },
    { label: "qcow2 write", values: ["denbd error", undefined] },
    { label: "x".repeat(200), values: [1, 0.25] },
  ],
};

Deno.test("renderRatioChart: well-formed, self-contained SVG", () => {
  const svg = renderRatioChart(CHART);
  const root = parseXml(svg);
  assert.equal(root.name, "svg");
  assert.equal(root.attrs["xmlns"], "http://www.w3.org/2000/svg");
  assert.match(root.attrs["viewBox"] ?? "", /^0 0 \d+ \d+$/);
  assert.doesNotMatch(svg, /<script|href=|url\(|@import|@font-face/i);
  // Escaped text comes back intact.
  const texts = all(root, (e) => e.name === "text").map((e) => e.text);
  assert.ok(texts.includes(CHART.title), texts.join("\n"));
  assert.ok(texts.includes("seq read <raw>"));
  assert.ok(texts.includes("randwrite & co"));
  assert.ok(texts.includes("denbd/qemu-nbd: denbd error"));
  // Labels past 70 characters are cut with an ellipsis.
  assert.ok(texts.includes("x".repeat(69) + "…"));
  // Everything is drawn inside the canvas.
  const [, , w, h] = root.attrs["viewBox"]!.split(" ").map(Number);
  for (const e of all(root, (e) => e.attrs["x"] !== undefined)) {
    const x = Number(e.attrs["x"]);
    const width = Number(e.attrs["width"] ?? 0);
    assert.ok(x >= 0 && x + width <= w!, `${e.name} x=${x} width=${width} outside ${w}`);
    assert.ok(Number(e.attrs["y"]) <= h!, `${e.name} below the canvas`);
  }
});

Deno.test("renderRatioChart: bar lengths are proportional, 1× line where a 1.0 bar ends", () => {
  const root = parseXml(renderRatioChart(CHART));
  const bars = all(root, (e) => e.name === "rect" && e.attrs["class"] === "bar");
  const expected = CHART.groups.flatMap((g) => g.values.filter((v) => typeof v === "number"));
  assert.deepEqual(bars.map((b) => Number(b.attrs["data-ratio"])), expected);
  const ref = all(root, (e) => e.attrs["class"] === "reference");
  assert.equal(ref.length, 1);
  const x0 = Number(bars[0]!.attrs["x"]);
  const unit = Number(ref[0]!.attrs["x1"]) - x0; // Pixels per 1×.
  assert.ok(unit > 100, `1× spans ${unit} px`);
  for (const b of bars) {
    assert.equal(Number(b.attrs["x"]), x0, "bars share one origin");
    const ratio = Number(b.attrs["data-ratio"]);
    assert.ok(Math.abs(Number(b.attrs["width"]) - ratio * unit) < 0.02, `bar for ${ratio}`);
    assert.match(b.children[0]?.text ?? "", new RegExp(`${ratio.toFixed(2)}×$`));
  }
  // The axis reaches past the longest bar.
  const widest = Math.max(...bars.map((b) => Number(b.attrs["width"])));
  const ticks = all(
    root,
    (e) => e.name === "text" && /^[\d.]+×$/.test(e.text) && !e.attrs["stroke"],
  );
  const lastTick = Math.max(...ticks.map((t) => Number(t.attrs["x"])));
  assert.ok(lastTick - x0 >= widest, `last tick ${lastTick - x0} < bar ${widest}`);
  // One bar slot per series in each group: undefined draws nothing, a string draws a note.
  assert.equal(all(root, (e) => e.attrs["class"] === "note").length, 1);
});

Deno.test("renderRatioChart: no series and no groups still make a valid document", () => {
  for (const groups of [[], [{ label: "only", values: [] }]]) {
    const root = parseXml(renderRatioChart({ title: "t", series: [], groups }));
    assert.equal(all(root, (e) => e.attrs["class"] === "bar").length, 0);
  }
});

Deno.test("axisScale: ends on a tick past the largest ratio and 1×", () => {
  for (const ratios of [[], [0.2], [1.04], [1.2], [2.75], [9.3], [0.97, 1.41, 0.66]]) {
    const { max, step } = axisScale(ratios);
    assert.ok(max >= Math.max(1, ...ratios), `${ratios}: ${max}`);
    assert.ok(max <= Math.max(1, ...ratios) * 1.05 + step + 1e-9, `${ratios}: ${max} too far`);
    const k = max / step;
    assert.ok(Math.abs(k - Math.round(k)) < 1e-9 && k <= 8, `${ratios}: ${max} / ${step}`);
  }
  assert.deepEqual(axisScale([1.04]), { max: 1.2, step: 0.2 });
  assert.equal(escapeXml(`<a href="x">&'`), "&#60;a href=&#34;x&#34;&#62;&#38;&#39;");
});

// --- Report -----------------------------------------------------------------------------------

function server(id: string, formats: ServerDef["formats"]): ServerDef {
  return { id, label: id, formats, argv: () => [id] };
}

function ok(values: number[], rssKiB = 10240): Cell {
  const samples: MeasuredSample[] = values.map((value) => ({
    value,
    bytes: 1 << 30,
    seconds: 1,
    cpuSeconds: 2,
    peakRssKiB: rssKiB,
  }));
  return { status: "ok", samples };
}

function results(): BenchResults {
  const raw = fioRow({ rw: "randread" });
  const empty = nbdcopyRow({ direction: "write", connections: 4, format: "qcow2-empty" });
  return {
    meta: { date: "D", mode: "quick", repeats: 3, "image size": "64 MiB, dense" },
    notes: [],
    servers: [
      server("denbd", ["raw", "qcow2-empty"]),
      server("qemu-nbd", ["raw", "qcow2-empty"]),
      server("nbdkit", ["raw"]),
    ],
    rows: [raw, empty],
    cells: {
      [raw.id]: { denbd: ok([30, 10, 20], 2048), "qemu-nbd": ok([10]), nbdkit: ok([40]) },
      [empty.id]: {
        denbd: { status: "failed", error: "nbdcopy: write at offset 0 failed: EPERM", samples: [] },
        "qemu-nbd": ok([500]),
        nbdkit: { status: "unsupported" },
      },
    },
    instances: [],
  };
}

Deno.test("ratioChartOf: median ratios, notes for failures, nothing for unsupported", () => {
  const c = ratioChartOf(results());
  assert.deepEqual(c.series, ["denbd/qemu-nbd", "denbd/nbdkit"]);
  assert.deepEqual(c.groups.map((g) => g.values), [[2, 0.5], ["denbd error", undefined]]);
  assert.deepEqual(c.groups.map((g) => g.label), [
    "4 KiB randread (fio, QD32), raw",
    "sequential write (nbdcopy, 4 conns), qcow2 (empty)",
  ]);
  assert.match(c.subtitle ?? "", /quick run, 3 repeat\(s\).*64 MiB image/);
});

Deno.test("renderMarkdown: errors, ratios, CPU per GiB and per-row peak RSS", () => {
  const md = renderMarkdown({ ...results(), chartFile: "b.svg" });
  const line = (prefix: string) => md.split("\n").filter((l) => l.startsWith(`| ${prefix}`));
  const [perf, cpu, rss] = line("4 KiB randread");
  assert.equal(
    perf,
    "| 4 KiB randread (fio, QD32), raw, IOPS | 20 (10–30) | 10 | 40 | 2.00× | 0.50× |",
  );
  assert.equal(cpu, "| 4 KiB randread (fio, QD32), raw | 2.00 | 2.00 | 2.00 |"); // 6 s / 3 GiB
  assert.equal(rss, "| 4 KiB randread (fio, QD32), raw | 2.0 | 10.0 | 10.0 |");
  const [perfE, cpuE, rssE] = line("sequential write");
  assert.equal(
    perfE,
    "| sequential write (nbdcopy, 4 conns), qcow2 (empty), MiB/s | " +
      "error: nbdcopy: write at offset 0 failed: EPERM | 500 | — | error | — |",
  );
  assert.equal(cpuE, "| sequential write (nbdcopy, 4 conns), qcow2 (empty) | error | 2.00 | — |");
  assert.equal(rssE, "| sequential write (nbdcopy, 4 conns), qcow2 (empty) | error | 10.0 | — |");
  assert.ok(md.includes("![ratio chart](b.svg)"));
  // A cell that failed after some good runs shows them, and no ratio.
  const r = results();
  const raw = r.rows[0]!.id;
  const partial = {
    ...r.cells[raw]!,
    denbd: { ...ok([30, 10]), status: "failed", error: "stall" },
  };
  const md2 = renderMarkdown({
    ...r,
    cells: { ...r.cells, [raw]: partial as Record<string, Cell> },
  });
  assert.ok(
    md2.includes("| 20 (10–30) in 2 run(s), then error: stall | 10 | 40 | error | error |"),
    md2,
  );
  assert.ok(md.includes("- seq-write-nbdcopy-c4-qcow2-empty on denbd: nbdcopy: write at offset 0"));
});

// --- Rows, selection, estimate ------------------------------------------------------------------

Deno.test("ROW_DEFS: unique systematic ids, the issue 4 and 5 matrix, a small quick set", () => {
  const ids = ROW_DEFS.map((r) => r.id);
  assert.equal(new Set(ids).size, ids.length);
  for (const id of ids) {
    assert.match(
      id,
      /^(seq-(read|write)-nbdcopy-c[124]|(fio-rand(read|write)-4k-qd(1|32)-j[14])|libnbd-randread-4k-qd32)-(raw|qcow2|qcow2-empty|qcow2-compressed|nbd-raw|http-raw|http-qcow2|tls-x509|tls-psk|vdi|vmdk|vhdx|luks|rbd)$/,
    );
  }
  for (const format of ["raw", "qcow2"]) {
    for (const rw of ["randread", "randwrite"]) {
      for (const qd of [1, 32]) {
        for (const j of [1, 4]) assert.ok(ids.includes(`fio-${rw}-4k-qd${qd}-j${j}-${format}`));
      }
    }
  }
  for (const dir of ["read", "write"]) {
    for (const c of [1, 2, 4]) assert.ok(ids.includes(`seq-${dir}-nbdcopy-c${c}-raw`));
  }
  assert.ok(ids.includes("seq-write-nbdcopy-c4-qcow2-empty"));
  assert.ok(ids.includes("fio-randwrite-4k-qd32-j1-qcow2-empty"));
  // Proxy rows: NBD re-export (sequential and random) and HTTP (raw and qcow2), reads only.
  for (
    const id of [
      "seq-read-nbdcopy-c1-nbd-raw",
      "fio-randread-4k-qd32-j1-nbd-raw",
      "seq-read-nbdcopy-c1-http-raw",
      "seq-read-nbdcopy-c1-http-qcow2",
    ]
  ) assert.ok(ids.includes(id), id);
  // rbd rows (issue 14): random reads and writes, sequential both ways over 1 and 4 connections.
  for (
    const id of [
      "fio-randread-4k-qd32-j1",
      "fio-randwrite-4k-qd32-j1",
      "seq-read-nbdcopy-c1",
      "seq-read-nbdcopy-c4",
      "seq-write-nbdcopy-c1",
      "seq-write-nbdcopy-c4",
    ]
  ) assert.ok(ids.includes(`${id}-rbd`), `${id}-rbd`);
  // TLS rows (issue 11): sequential and random reads, x509 and PSK.
  for (const tls of ["tls-x509", "tls-psk"]) {
    for (const id of ["seq-read-nbdcopy-c1", "seq-read-nbdcopy-c4", "libnbd-randread-4k-qd32"]) {
      assert.ok(ids.includes(`${id}-${tls}`), `${id}-${tls}`);
    }
  }
  for (const r of ROW_DEFS.filter((r) => /nbd-raw|http|tls/.test(r.format))) {
    assert.doesNotMatch(r.id, /write/, `${r.id}: origins are read-only`);
  }
  const quick = selectRows(ROW_DEFS, { quick: true });
  assert.ok(quick.length >= 4 && quick.length <= 10, `${quick.length} quick rows`);
  assert.ok(quick.some((r) => r.format === "qcow2-empty"));
});

Deno.test("SERVER_DEFS: proxies open the origin read-only; nbdkit has no qcow2 via HTTP", () => {
  const def = (id: string) => SERVER_DEFS.find((s) => s.id === id)!;
  const nbd = { socket: "/t/s.sock", image: "nbd+unix:///?socket=/t/o.sock", format: "nbd-raw" };
  const http = { socket: "/t/s.sock", image: "http://127.0.0.1:8/disk.qcow2" };
  const q = def("qemu-nbd").argv(nbd as ServeTarget);
  const tail = (id: string, t: ServeTarget) => def(id).argv(t).slice(-9);
  const expected = ["-k", "/t/s.sock", "-t", "-e", "0", "-r", "-f", "raw", nbd.image];
  assert.deepEqual(q, ["qemu-nbd", ...expected]);
  assert.deepEqual(tail("denbd", nbd as ServeTarget), expected);
  assert.deepEqual(tail("nbdkit", nbd as ServeTarget).slice(-3), ["-r", "nbd", "socket=/t/o.sock"]);
  const qcow2: ServeTarget = { ...http, format: "http-qcow2" };
  for (const id of ["denbd", "qemu-nbd"]) {
    assert.deepEqual(tail(id, qcow2), [...expected.slice(0, -3), "-f", "qcow2", http.image]);
  }
  assert.deepEqual(tail("nbdkit", { ...http, format: "http-raw" }).slice(-3), [
    "-r",
    "curl",
    http.image,
  ]);
  assert.ok(!def("nbdkit").formats.includes("http-qcow2"));
  // File formats keep their argv: no -r, qemu-nbd's cache and aio spelled out.
  const file = def("qemu-nbd").argv({ socket: "/s", image: "/i", format: "raw" });
  assert.ok(!file.includes("-r") && file.includes("--aio=threads"), file.join(" "));
  // luks: the secret object and --image-opts on both, nbdkit's luks filter with the passphrase.
  const luks: ServeTarget = { socket: "/s", image: "/i.luks", format: "luks" };
  for (const id of ["denbd", "qemu-nbd"]) {
    const argv = def(id).argv(luks);
    assert.deepEqual(argv.slice(-4), [
      "--object",
      "secret,id=bench0,data=denbd-bench",
      "--image-opts",
      "driver=luks,key-secret=bench0,file.filename=/i.luks",
    ]);
  }
  assert.deepEqual(def("nbdkit").argv(luks).slice(-4), [
    "--filter=luks",
    "file",
    "/i.luks",
    "passphrase=denbd-bench",
  ]);
});

Deno.test("selectRows: --rows wins over --quick, in the given order; unknown ids throw", () => {
  const picked = selectRows(ROW_DEFS, {
    quick: true,
    ids: ["fio-randread-4k-qd1-j4-raw", " seq-read-nbdcopy-c1-raw"],
  });
  assert.deepEqual(picked.map((r) => r.id), [
    "fio-randread-4k-qd1-j4-raw",
    "seq-read-nbdcopy-c1-raw",
  ]);
  assert.equal(selectRows(ROW_DEFS, { quick: false }).length, ROW_DEFS.length);
  assert.throws(() => selectRows(ROW_DEFS, { quick: false, ids: ["nope"] }), /unknown id "nope"/);
});

Deno.test("estimateSeconds: grows with repeats, runtime and fresh-image restarts", () => {
  const servers = [server("a", ["raw", "qcow2-empty"]), server("b", ["raw"])];
  const fio = fioRow({ rw: "randread" });
  const base = { servers, repeat: 1, imageBytes: 256 << 20, runtimeSeconds: 2 };
  const one = estimateSeconds({ ...base, rows: [fio] });
  assert.ok(one >= 2 * 2 && one < 60, `${one}`);
  assert.ok(estimateSeconds({ ...base, rows: [fio], repeat: 3 }) > 2.5 * (one - 10));
  assert.ok(estimateSeconds({ ...base, rows: [fio], runtimeSeconds: 10 }) >= one + 2 * 8);
  // Fresh-image rows restart their (one) server for every measurement.
  const empty = fioRow({ rw: "randwrite", format: "qcow2-empty" });
  const e1 = estimateSeconds({ ...base, rows: [empty] });
  const e3 = estimateSeconds({ ...base, rows: [empty], repeat: 3 });
  assert.ok(e3 >= 3 * e1 - 1e-9, `${e3} vs ${e1}`);
  assert.equal(formatDuration(42.2), "43 s");
  assert.equal(formatDuration(600), "10 min");
  assert.equal(formatDuration(3 * 3600 + 301), "3 h 06 min");
});

// --- Client output ------------------------------------------------------------------------------

Deno.test("parseFioJson sums jobs after log lines; job errors throw", () => {
  const job = (iops: number, bytes: number) => ({ jobname: "j", read: { iops, io_bytes: bytes } });
  const out = "fio: connected to NBD server\n" +
    JSON.stringify({ jobs: [job(10, 4096), job(5, 8192)] });
  assert.deepEqual(parseFioJson(out), { iops: 15, bytes: 12288 });
  assert.throws(() => parseFioJson(JSON.stringify({ jobs: [{ jobname: "x", error: 1 }] })), /x/);
  assert.throws(() => parseFioJson("no json"), /No JSON/);
});

Deno.test("summarizeFioFailure and lastToolLine turn client stderr into one line", () => {
  const stderr = "fio: io_u error on file x.0.0: Operation not permitted: write offset=4046848, " +
    "buflen=4096\nfio: io_u error on file x.0.0: Operation not permitted: write offset=1, " +
    "buflen=4096\nfio: pid=1, err=1/file:io_u.c:1876, func=io_u error, error=Operation not permitted";
  assert.equal(
    summarizeFioFailure(stderr),
    "fio: write failed: Operation not permitted (first at offset 4046848)",
  );
  assert.equal(summarizeFioFailure("fio: something else"), undefined);
  assert.equal(
    lastToolLine("nbdcopy", "libnbd: debug\nnbdcopy: write at offset 0 failed: EPERM\n"),
    "nbdcopy: write at offset 0 failed: EPERM",
  );
  assert.equal(lastToolLine("nbdcopy", "other"), undefined);
});
