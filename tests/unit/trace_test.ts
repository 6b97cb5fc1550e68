/**
 * lib/trace: glob matching, enable lines, the -T option syntax and events files, the line
 * format, and that disabled points format nothing.
 *
 * @module
 */

import assert from "node:assert/strict";
import * as ev from "../../lib/trace/events.ts";
import {
  disableAllEvents,
  enableEvents,
  findTraceEvent,
  globMatch,
  setTraceSink,
  TraceEvent,
  traceEvents,
} from "../../lib/trace/trace.ts";
import {
  expandLogfileName,
  parseTraceOption,
  startTracing,
  traceEventList,
  TraceOptionError,
} from "../../lib/trace/trace_option.ts";

/** A sink that keeps what is written. */
function capture(): { text: () => string; restore: () => void; writes: () => number } {
  const chunks: Uint8Array[] = [];
  const prev = setTraceSink({
    writeSync(p) {
      chunks.push(p.slice());
      return p.length;
    },
  });
  return {
    text: () => chunks.map((c) => new TextDecoder().decode(c)).join(""),
    writes: () => chunks.length,
    restore: () => void setTraceSink(prev),
  };
}

Deno.test("trace: glob matching as GLib's g_pattern_match_simple", () => {
  const yes: [string, string][] = [
    ["nbd_*", "nbd_trip"],
    ["*", ""],
    ["*", "x"],
    ["nbd_tri?", "nbd_trip"],
    ["*trip", "nbd_trip"],
    ["n*d*p", "nbd_trip"],
    ["nbd_negotiate*", "nbd_negotiate_begin"],
    ["a*b*c", "aXbYbZc"],
    ["**", "abc"],
  ];
  const no: [string, string][] = [
    ["nbd_", "nbd_trip"],
    ["nbd_tri?", "nbd_tri"],
    ["?", ""],
    ["*x", "nbd_trip"],
    ["a*b*c", "aXbYbZ"],
    ["NBD_*", "nbd_trip"],
  ];
  for (const [p, n] of yes) assert.ok(globMatch(p, n), `${p} ~ ${n}`);
  for (const [p, n] of no) assert.ok(!globMatch(p, n), `${p} !~ ${n}`);
});

Deno.test("trace: enable lines: names, patterns, '-' disables, unknown names warn", () => {
  disableAllEvents();
  try {
    assert.equal(enableEvents("nbd_trip"), undefined);
    assert.equal(ev.nbd_trip.on, true);
    assert.equal(enableEvents("nbd_negotiate_*"), undefined);
    assert.equal(ev.nbd_negotiate_begin.on, true);
    assert.equal(ev.nbd_negotiate_success.on, true);
    assert.equal(ev.nbd_co_send_extents.on, false);
    assert.equal(enableEvents("-nbd_negotiate_s*"), undefined);
    assert.equal(ev.nbd_negotiate_success.on, false);
    assert.equal(ev.nbd_negotiate_begin.on, true);
    assert.equal(enableEvents("-nbd_trip"), undefined);
    assert.equal(ev.nbd_trip.on, false);
    assert.equal(enableEvents("nosuch"), "trace event 'nosuch' does not exist");
    assert.equal(enableEvents("-nosuch"), "trace event 'nosuch' does not exist");
    assert.equal(enableEvents("nosuch*"), undefined); // a pattern may match nothing
    // qemu-nbd's client-side names exist (never fired), so -T accepts them quietly.
    assert.equal(enableEvents("nbd_send_request"), undefined);
    assert.equal(findTraceEvent("nbd_send_request")?.fired, false);
  } finally {
    disableAllEvents();
  }
});

Deno.test("trace: -T option syntax", () => {
  const warnings: string[] = [];
  const warn = (m: string, where?: string) => warnings.push(where ? `${where}: ${m}` : m);
  assert.deepEqual(parseTraceOption("nbd_trip", warn).lines, ["nbd_trip"]);
  assert.deepEqual(parseTraceOption("enable=nbd_trip,file=/x", warn).file, "/x");
  assert.equal(parseTraceOption("nbd_trip", warn).file, undefined);
  // ",," is a literal comma; the last value of a key wins.
  assert.deepEqual(parseTraceOption("a,,b", warn).lines, ["a,b"]);
  assert.deepEqual(parseTraceOption("nbd_trip,enable=nbd_negotiate_begin", warn).lines, [
    "nbd_negotiate_begin",
  ]);
  assert.deepEqual(parseTraceOption("", warn).lines, []);
  assert.deepEqual(parseTraceOption(",", warn).lines, [""]);
  assert.equal(parseTraceOption("help", warn).listEvents, true);
  assert.equal(parseTraceOption("enable=?", warn).listEvents, true);
  assert.equal(parseTraceOption("nbd_trip,help", warn).describeOptions, true);
  assert.deepEqual(parseTraceOption("nbd_trip,id=t0", warn).lines, ["nbd_trip"]);
  // Only the first element may leave out its key.
  assert.throws(() => parseTraceOption("id=t0,nbd_trip"), /Invalid parameter 'nbd_trip'/);
  assert.deepEqual(warnings, [
    "trace event 'a,b' does not exist",
    "trace event '' does not exist",
  ]);
  warnings.length = 0;
  // A bare flag means flag=on, with qemu's deprecation warning, and is then checked.
  assert.throws(() => parseTraceOption("nbd_trip,foo", warn), /Invalid parameter 'foo'/);
  assert.deepEqual(warnings, [
    "short-form boolean option 'foo' deprecated\nPlease use foo=on instead",
  ]);
  assert.throws(() => parseTraceOption("bogus=1"), /Invalid parameter 'bogus'/);
  assert.throws(() => parseTraceOption("nbd_trip=3"), /Invalid parameter 'nbd_trip'/);
  assert.throws(
    () => parseTraceOption("id=1"),
    (e) =>
      e instanceof TraceOptionError && e.message === "Parameter 'id' expects an identifier" &&
      e.hint!.startsWith("Identifiers consist of"),
  );
});

Deno.test("trace: events files read as qemu reads them", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const f = `${dir}/events`;
    // Comments and empty lines are skipped; the last character of each line is dropped (the
    // newline, or the last letter of a final line without one); spaces are kept.
    await Deno.writeTextFile(
      f,
      "# comment\n\nnbd_trip\n-nbd_trip\n nbd_trip\nx\nnbd_receive_requestX",
    );
    const warnings: string[] = [];
    const req = parseTraceOption(
      `events=${f},enable=nbd_negotiate_begin`,
      (m, where) => warnings.push(`${where ?? "-"}: ${m}`),
    );
    assert.deepEqual(req.lines, [
      "nbd_negotiate_begin",
      "nbd_trip",
      "-nbd_trip",
      " nbd_trip",
      "x",
      "nbd_receive_request",
    ]);
    assert.deepEqual(warnings, [
      `${f}:5: trace event ' nbd_trip' does not exist`,
      `${f}:6: trace event 'x' does not exist`,
    ]);
    // A line saying help lists the events.
    await Deno.writeTextFile(`${dir}/help`, "nbd_trip\nhelp\n");
    assert.equal(parseTraceOption(`events=${dir}/help`).listEvents, true);
    // A missing file is an error naming it; a directory reads as empty, as with fopen/fgets.
    assert.throws(
      () => parseTraceOption(`events=${dir}/missing`),
      (e) =>
        e instanceof TraceOptionError && e.message === "No such file or directory" &&
        e.location === `${dir}/missing`,
    );
    assert.deepEqual(parseTraceOption(`events=${dir}`).lines, []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("trace: log file names", () => {
  assert.equal(expandLogfileName("/tmp/t.log", 42), "/tmp/t.log");
  assert.equal(expandLogfileName("/tmp/t.%d.log", 42), "/tmp/t.42.log");
  for (const bad of ["/tmp/%s", "/tmp/%d%d", "/tmp/%%", "/tmp/x%"]) {
    assert.throws(() => expandLogfileName(bad, 1), new RegExp(`Bad logfile template: ${bad}`));
  }
});

Deno.test("trace: line format is 'name message' and -T help lists every point", () => {
  const out = capture();
  try {
    ev.nbd_trip.emit();
    ev.nbd_negotiate_options_check_magic.emit(0x49484156454f5054n);
    ev.nbd_co_send_simple_reply.emit(ev.handleOf(1, 2), 22, ev.nbdErrName(22), 0);
    ev.nbd_co_send_extents.emit(7n, 1, 0, 4096, true);
    ev.nbd_negotiate_handle_info_block_size.emit(1, 4096, 32 * 1024 * 1024);
    // An event qemu-nbd has but denbd never fires writes nothing.
    findTraceEvent("nbd_send_request")!.emit();
    assert.equal(
      out.text(),
      [
        "nbd_trip Reading request",
        "nbd_negotiate_options_check_magic Checking opts magic 0x49484156454f5054",
        "nbd_co_send_simple_reply Send simple reply: handle = 4294967298, error = 22 (EINVAL), len = 0",
        "nbd_co_send_extents Send block status reply: handle = 7, extents = 1, context = 0 (extents cover 4096 bytes, last chunk = 1)",
        "nbd_negotiate_handle_info_block_size advertising minimum 0x1, preferred 0x1000, maximum 0x2000000",
        "",
      ].join("\n"),
    );
  } finally {
    out.restore();
  }
  const names = traceEventList().split("\n");
  assert.deepEqual(names, traceEvents().map((e) => e.name));
  assert.equal(new Set(names).size, names.length);
  assert.ok(names.indexOf("nbd_trip") < names.indexOf("nbd_handshake_timer_cb"));
});

Deno.test("trace: a disabled point formats nothing and writes nothing", () => {
  let formatted = 0;
  const probe = new TraceEvent("denbd_test_probe", (n: number) => {
    formatted++;
    return `n=${n}`;
  });
  const out = capture();
  try {
    // The call-site idiom: arguments are only computed behind the flag.
    const site = () => {
      if (probe.on) probe.emit(expensive());
    };
    let computed = 0;
    const expensive = () => ++computed;
    for (let i = 0; i < 1000; i++) site();
    assert.equal(formatted, 0);
    assert.equal(computed, 0);
    assert.equal(out.writes(), 0);
    probe.on = true;
    site();
    assert.equal(formatted, 1);
    assert.equal(out.text(), "denbd_test_probe n=1\n");
  } finally {
    probe.on = false;
    out.restore();
  }
  assert.throws(() => new TraceEvent("nbd_trip"), /declared twice/);
});

Deno.test("trace: startTracing applies -T arguments in order and opens the last file", async () => {
  const dir = await Deno.makeTempDir();
  disableAllEvents();
  const prev = setTraceSink(Deno.stderr);
  try {
    startTracing(["nbd_negotiate_*", "-nbd_negotiate_begin", `nbd_trip,file=${dir}/t.%d`]);
    assert.equal(ev.nbd_negotiate_success.on, true);
    assert.equal(ev.nbd_negotiate_begin.on, false);
    assert.equal(ev.nbd_trip.on, true);
    ev.nbd_trip.emit();
    assert.equal(await Deno.readTextFile(`${dir}/t.${Deno.pid}`), "nbd_trip Reading request\n");
    assert.throws(
      () => startTracing([`file=${dir}/no/such`]),
      new RegExp(`Error opening logfile ${dir}/no/such: No such file or directory`),
    );
  } finally {
    const file = setTraceSink(prev);
    if (file !== Deno.stderr) (file as Deno.FsFile).close();
    disableAllEvents();
    await Deno.remove(dir, { recursive: true });
  }
});
