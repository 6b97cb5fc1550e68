/**
 * lib/cli: qemu-nbd 7.2's command line. Unit tests, plus a differential check that the real
 * qemu-nbd rejects every command line denbd rejects.
 */
import assert from "node:assert/strict";
import {
  CliError,
  formatCliError,
  OPTION_TABLE,
  parseCommandLine,
  SHORT_OPTIONS,
  unsupportedOptions,
} from "../../lib/cli/parse.ts";
import { HELP_SUPPORTED, VERSION } from "../../lib/cli/help.ts";
import { parseImageOpts, parseQemuOpts } from "../../lib/cli/image_opts.ts";
import { parseInt32, parseSize, parseU64 } from "../../lib/cli/numbers.ts";
import type { ServerOptions } from "../../lib/cli/options.ts";
import { supportedFormats } from "../../lib/block/formats.ts";

/** The formats list in "not supported" messages (it grows as drivers land). */
const ONLY = supportedFormats().join(", ");

function serve(args: string[]): ServerOptions {
  const c = parseCommandLine(args);
  assert.equal(c.kind, "serve");
  if (c.kind !== "serve") throw new Error("unreachable");
  return c.options;
}

/** Asserts that parsing fails with exactly this message (after "denbd: "). */
function rejects(args: string[], message: string | RegExp): CliError {
  let caught: unknown;
  try {
    parseCommandLine(args);
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof CliError, `expected CliError for ${JSON.stringify(args)}`);
  if (typeof message === "string") assert.equal(caught.message, message);
  else assert.match(caught.message, message);
  return caught;
}

Deno.test("cli: defaults", () => {
  const o = serve(["disk.img"]);
  assert.deepEqual(o.image, {
    filename: "disk.img",
    format: undefined,
    offset: 0,
    size: undefined,
    raw: {},
  });
  assert.equal(o.bind, "0.0.0.0");
  assert.equal(o.port, 10809);
  assert.equal(o.socket, undefined);
  assert.equal(o.shared, 1);
  assert.equal(o.exportName, "");
  assert.equal(o.description, undefined);
  assert.equal(o.cache, "writeback");
  assert.equal(o.aio, "auto"); // io_uring where the kernel allows it, else threads
  assert.equal(o.discard, "ignore");
  assert.equal(o.detectZeroes, "off");
  assert.equal(o.handshakeLimit, 10);
  assert.equal(o.readOnly, false);
  assert.equal(o.persistent, false);
  assert.equal(o.fork, false);
  assert.equal(o.verbose, false);
  assert.equal(o.list, false);
  assert.deepEqual(o.bitmaps, []);
  assert.ok(Object.isFrozen(o));
  assert.ok(Object.isFrozen(o.image));
  assert.deepEqual(unsupportedOptions(o), []);
});

Deno.test("cli: option table matches qemu-nbd 7.2's short option string", () => {
  let rebuilt = "";
  for (let i = 0; i < SHORT_OPTIONS.length; i++) {
    const letter = SHORT_OPTIONS[i] as string;
    if (letter === ":") continue;
    const spec = OPTION_TABLE.find((s) => s.short === letter);
    assert.ok(spec, `no option for -${letter}`);
    assert.equal(spec.hasArg, SHORT_OPTIONS[i + 1] === ":", `-${letter}`);
    rebuilt += letter + (spec.hasArg ? ":" : "");
  }
  assert.equal(rebuilt, SHORT_OPTIONS);
  assert.equal(OPTION_TABLE.filter((s) => s.short !== undefined).length, 22);
  assert.equal(OPTION_TABLE.length, 37); // with denbd's 3 extensions (--handshake-limit, --connections, --dead-conn-timeout)
});

Deno.test("cli: every option, long and short", () => {
  const o = serve([
    "-b",
    "127.0.0.1",
    "--port=10900",
    "-k",
    "/tmp/x.sock",
    "--read-only",
    "-e",
    "4",
    "-t",
    "-x",
    "name",
    "-D",
    "desc",
    "--cache=directsync",
    "--discard=unmap",
    "--detect-zeroes=unmap",
    "-f",
    "qcow2",
    "-v",
    "--fork",
    "--pid-file",
    "/tmp/pid",
    "--handshake-limit=0",
    "-B",
    "b1",
    "--bitmap=b2",
    "-A",
    "-T",
    "nbd_*",
    "--object",
    "secret,id=s0,data=x",
    "f.qcow2",
  ]);
  assert.equal(o.bind, "127.0.0.1");
  assert.equal(o.port, 10809); // the port is not used with a unix socket
  assert.equal(o.socket, "/tmp/x.sock");
  assert.equal(o.readOnly, true);
  assert.equal(o.shared, 4);
  assert.equal(o.persistent, true);
  assert.equal(o.exportName, "name");
  assert.equal(o.description, "desc");
  assert.equal(o.cache, "directsync");
  assert.equal(o.discard, "unmap");
  assert.equal(o.detectZeroes, "unmap");
  assert.equal(o.image.format, "qcow2");
  assert.equal(o.image.filename, "f.qcow2");
  assert.equal(o.verbose, true);
  assert.equal(o.fork, true);
  assert.equal(o.pidFile, "/tmp/pid");
  assert.equal(o.handshakeLimit, 0);
  assert.deepEqual(o.bitmaps, ["b1", "b2"]);
  assert.equal(o.allocationDepth, true);
  assert.deepEqual(o.trace, ["nbd_*"]);
  assert.deepEqual(o.objects, ["secret,id=s0,data=x"]);
  assert.deepEqual(unsupportedOptions(o), []);
  assert.equal(serve(["-p", "10900", "f"]).port, 10900);
  assert.equal(serve(["--bind", "::1", "f"]).bind, "::1");
});

Deno.test("cli: cache, aio, discard aliases", () => {
  assert.equal(serve(["-n", "f"]).cache, "none");
  assert.equal(serve(["--nocache", "f"]).cache, "none");
  assert.equal(serve(["--cache=off", "f"]).cache, "none");
  for (const m of ["none", "writeback", "writethrough", "directsync", "unsafe"]) {
    assert.equal(serve([`--cache=${m}`, "f"]).cache, m);
  }
  assert.equal(serve(["--discard=on", "f"]).discard, "unmap");
  assert.equal(serve(["--discard=off", "f"]).discard, "ignore");
  assert.equal(serve(["--discard", "ignore", "f"]).discard, "ignore");
  assert.equal(serve(["--aio=threads", "f"]).aio, "threads");
  assert.equal(serve(["--detect-zeroes=on", "--detect-zeroes=off", "f"]).detectZeroes, "off");
  assert.equal(serve(["--aio=native", "f"]).aio, "native");
  assert.deepEqual(unsupportedOptions(serve(["--aio=native", "f"])), []);
  assert.equal(serve(["--aio=io_uring", "f"]).aio, "io_uring");
  assert.deepEqual(unsupportedOptions(serve(["--aio=io_uring", "f"])), []);
  rejects(["--aio=auto", "f"], "Invalid aio mode 'auto'"); // the default has no name, as in qemu
});

Deno.test("cli: clusters, attached values, --, options after FILE", () => {
  const a = serve(["-rtp10810", "f"]);
  assert.equal(a.readOnly, true);
  assert.equal(a.persistent, true);
  assert.equal(a.port, 10810);
  const b = serve(["-rt", "-e", "0", "f"]);
  assert.equal(b.shared, 0);
  assert.equal(serve(["-rtp", "10811", "f"]).port, 10811);
  assert.equal(serve(["f", "-x", "late"]).exportName, "late");
  assert.equal(serve(["-x", "-r", "f"]).exportName, "-r"); // the value may start with '-'
  assert.equal(serve(["--export-name", "--", "f"]).exportName, "--");
  assert.equal(serve(["--", "-o"]).image.filename, "-o");
  assert.equal(serve(["-r", "--", "-x"]).readOnly, true);
  assert.equal(serve(["-"]).image.filename, "-");
  assert.equal(serve(["--export-name=", "f"]).exportName, "");
  assert.equal(serve(["-x", "a=b", "f"]).exportName, "a=b");
  assert.equal(serve(["--export-name=a=b", "f"]).exportName, "a=b");
});

Deno.test("cli: long-option abbreviations follow getopt_long", () => {
  assert.equal(serve(["--pers", "f"]).persistent, true);
  assert.equal(serve(["--re", "f"]).readOnly, true);
  assert.equal(serve(["--sh=3", "f"]).shared, 3);
  assert.equal(serve(["--exp", "n", "f"]).exportName, "n");
  assert.equal(serve(["--ha=5", "f"]).handshakeLimit, 5);
  assert.equal(parseCommandLine(["--he"]).kind, "help");
  assert.equal(parseCommandLine(["--h"]).kind, "help"); // as in 7.2, despite --handshake-limit
  assert.equal(parseCommandLine(["--vers"]).kind, "version");
  rejects(
    ["--p", "f"],
    "option '--p' is ambiguous; possibilities: '--port' '--persistent' '--pid-file'",
  );
  rejects(
    ["--de=1", "f"],
    "option '--de=1' is ambiguous; possibilities: '--detect-zeroes' '--description'",
  );
  rejects(
    ["--tls", "f"],
    "option '--tls' is ambiguous; possibilities: '--tls-creds' '--tls-hostname' '--tls-authz'",
  );
  const e = rejects(["--pers=1", "f"], "option '--persistent' doesn't allow an argument");
  assert.equal(
    formatCliError(e),
    "denbd: option '--persistent' doesn't allow an argument\ndenbd: Try `denbd --help' for more information.\n",
  );
});

Deno.test("cli: getopt errors", () => {
  rejects(["--bogus", "f"], "unrecognized option '--bogus'");
  rejects(["--bogus=x", "f"], "unrecognized option '--bogus=x'");
  rejects(["---x", "f"], "unrecognized option '---x'");
  rejects(["-Z", "f"], "invalid option -- 'Z'");
  rejects(["-rZ", "f"], "invalid option -- 'Z'");
  rejects(["f", "-p"], "option requires an argument -- 'p'");
  rejects(["-rtp"], "option requires an argument -- 'p'");
  rejects(["f", "--port"], "option '--port' requires an argument");
  rejects(["f", "--po"], "option '--port' requires an argument");
  rejects(["--help=3"], "option '--help' doesn't allow an argument");
  rejects(
    ["--=x"],
    /^option '--=x' is ambiguous; possibilities: '--help' '--version' .* '--selinux-label'$/,
  );
});

Deno.test("cli: help and version act in order", () => {
  const h = parseCommandLine(["-h", "-o", "bad"]);
  assert.equal(h.kind, "help");
  rejects(["-o", "bad", "-h"], "Invalid offset 'bad'");
  assert.equal(parseCommandLine(["-V", "-Z"]).kind, "version");
  rejects(["-Z", "-V"], "invalid option -- 'Z'");
  assert.equal(parseCommandLine(["f", "g", "--help"]).kind, "help");
  const v = parseCommandLine(["--version"]);
  assert.ok(v.kind === "version" && v.text.startsWith(`denbd ${VERSION}\n`));
  assert.match(v.kind === "version" ? v.text : "", /qemu-nbd 7\.2/);
});

Deno.test("cli: help lists exactly the supported options", () => {
  const c = parseCommandLine(["--help"]);
  assert.equal(c.kind, "help");
  const text = c.kind === "help" ? c.text : "";
  assert.match(text, /^Usage: denbd \[OPTIONS\] FILE\n/);
  for (const spec of OPTION_TABLE) {
    const shown = new RegExp(`--${spec.long}\\b`).test(text);
    assert.equal(shown, HELP_SUPPORTED.has(spec.long), `--${spec.long} in help`);
  }
  for (const line of text.split("\n")) assert.ok(line.length <= 80, line);
  assert.doesNotMatch(text, /qemu-nbd/);
});

Deno.test("cli: offset (-o) uses strtoull base 0", () => {
  assert.equal(serve(["-o", "512", "f"]).image.offset, 512);
  assert.equal(serve(["-o", "0x200", "f"]).image.offset, 512);
  assert.equal(serve(["-o", "01000", "f"]).image.offset, 512); // octal, as in C
  assert.equal(serve(["-o", " +512", "f"]).image.offset, 512);
  assert.equal(serve(["-o", "-0", "f"]).image.offset, 0);
  assert.equal(serve(["--offset=4096", "-f", "qcow2", "f"]).image.offset, 4096);
  rejects(["-o", "-512", "f"], /^Invalid offset '18446744073709551104'/); // wraps, like qemu
  rejects(["-o", "1k", "f"], "Invalid offset '1k'");
  rejects(["-o", "", "f"], "Invalid offset ''");
  rejects(["-o", "08", "f"], "Invalid offset '08'");
  rejects(["-o", "0x", "f"], "Invalid offset '0x'");
  rejects(["-o", "18446744073709551616", "f"], "Invalid offset '18446744073709551616'");
  rejects(["-o", "9007199254740992", "f"], /larger than denbd supports/);
});

Deno.test("cli: value checks", () => {
  rejects(["-k", "rel.sock", "f"], "socket path must be absolute");
  rejects(["-e", "-1", "f"], "Invalid shared device number '-1'");
  rejects(["-e", "abc", "f"], "Invalid shared device number 'abc'");
  rejects(["-e", "2147483648", "f"], "Invalid shared device number '2147483648'");
  rejects(["--shared=", "f"], "Invalid shared device number ''");
  assert.equal(serve(["-e", "010", "f"]).shared, 8);
  assert.equal(serve(["-e", "2147483647", "f"]).shared, 2147483647);
  rejects(["--handshake-limit=-1", "f"], "Invalid handshake limit '-1'");
  rejects(["--cache=bogus", "f"], "Invalid cache mode `bogus'");
  rejects(["--cache=None", "f"], "Invalid cache mode `None'");
  rejects(["-n", "--cache=none", "f"], "-n and --cache can only be specified once");
  rejects(["-n", "-n", "f"], "-n and --cache can only be specified once");
  rejects(["--aio=bogus", "f"], "Invalid aio mode 'bogus'");
  rejects(["--aio=threads", "--aio=threads", "f"], "--aio can only be specified once");
  rejects(["--discard=bogus", "f"], "Invalid discard mode `bogus'");
  rejects(["--discard=on", "--discard=on", "f"], "--discard can only be specified once");
  rejects(
    ["--detect-zeroes=x", "f"],
    "Failed to parse detect_zeroes mode: invalid parameter value: x",
  );
  const unmap =
    "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap";
  rejects(["--detect-zeroes=unmap", "f"], unmap);
  rejects(["--detect-zeroes=unmap", "--discard=unmap", "f"], unmap); // order matters in qemu-nbd
  rejects(["-x", "a".repeat(4097), "f"], /^export name 'a+' too long$/);
  assert.equal(serve(["-x", "a".repeat(4096), "f"]).exportName.length, 4096);
  rejects(["-x", "é".repeat(2049), "f"], /too long/); // bytes, not characters
  rejects(["-D", "d".repeat(4097), "f"], /^export description 'd+' too long$/);
  rejects(
    ["-p", "abc", "f"],
    "address resolution failed for 0.0.0.0:abc: Servname not supported for ai_socktype",
  );
  rejects(
    ["-b", "127.0.0.1", "-p", "-1", "f"],
    "address resolution failed for 127.0.0.1:-1: Servname not supported for ai_socktype",
  );
  rejects(["-p", "70000", "f"], "Invalid port '70000': must be from 0 to 65535");
  assert.equal(serve(["-k", "/s", "-p", "abc", "f"]).socket, "/s"); // port unused with -k
});

Deno.test("cli: argument count and mode checks", () => {
  const none = rejects([], "Invalid number of arguments");
  assert.equal(
    formatCliError(none),
    "denbd: Invalid number of arguments\nTry `denbd --help' for more information.\n",
  );
  rejects(["a", "b"], "Invalid number of arguments");
  rejects(["-L", "f"], "List mode is incompatible with a file name");
  for (
    const opt of [
      ["-x", ""],
      ["-D", "d"],
      ["-o", "1"],
      ["-c", "/dev/nbd0"],
      ["-d"],
      ["-f", "raw"],
      ["-l", "s1"],
      ["-B", "b"],
      ["-A"],
      ["--aio=threads"],
      ["--discard=ignore"],
      ["-n"],
    ]
  ) {
    rejects(["-L", ...opt], "List mode is incompatible with per-device settings");
  }
  rejects(["-L", "--fork"], "List mode is incompatible with forking");
  const list = serve(["-L", "-o", "0", "-l", "snapshot.id=1", "-r", "-b", "127.0.0.1"]);
  assert.equal(list.list, true);
  assert.equal(list.image.filename, "");
  assert.deepEqual(unsupportedOptions(list), []);
  rejects(["--tls-authz=a", "f"], "--tls-authz is not permitted without --tls-creds");
  rejects(["--tls-hostname=h", "f"], "--tls-hostname is not permitted without --tls-creds");
  rejects(
    ["--tls-creds=t", "--tls-hostname=h", "f"],
    "TLS hostname is only supported with export list",
  );
  rejects(
    ["-L", "--tls-creds=t", "--tls-authz=a"],
    "TLS authorization is incompatible with export list",
  );
  rejects(["--tls-creds=t", "-c", "/dev/nbd0", "f"], "TLS is not supported with a host device");
  rejects(["--selinux-label=l", "f"], "--selinux-label is not permitted without --socket");
  rejects(["--tls-creds=t", "f"], "Failed to get TLS creds: No TLS credentials with id 't'");
  rejects(
    ["--object", "secret,id=t,data=x", "--tls-creds=t", "f"],
    "Failed to get TLS creds: Object with id 't' is not TLS credentials",
  );
  rejects(
    ["--object", "tls-creds-anon,id=t", "--tls-creds=t", "f"],
    "Failed to get TLS creds: Expected TLS credentials for a server endpoint",
  );
  rejects(
    ["-L", "--object", "tls-creds-anon,id=t,endpoint=server", "--tls-creds=t"],
    "Failed to get TLS creds: Expected TLS credentials for a client endpoint",
  );
  const tls = serve([
    "--object",
    "tls-creds-anon,id=t,endpoint=server",
    "--tls-creds=t",
    "--tls-authz=a",
    "-k",
    "/s",
    "--selinux-label=l",
    "f",
  ]);
  assert.deepEqual(unsupportedOptions(tls), ["--selinux-label is not supported yet"]);
  const dev = serve(["-d", "/dev/nbd0"]);
  assert.equal(dev.disconnect, true);
  assert.equal(dev.image.filename, "/dev/nbd0");
  assert.deepEqual(unsupportedOptions(serve(["-c", "/dev/nbd0", "-s", "f"])), []);
});

Deno.test("cli: -l forces read-only and checks the snapshot.* form", () => {
  const o = serve(["-l", "snap1", "f"]);
  assert.equal(o.readOnly, true);
  assert.equal(o.loadSnapshot, "snap1");
  assert.equal(
    serve(["--load-snapshot=snapshot.id=1,snapshot.name=a,,b", "f"]).loadSnapshot,
    "snapshot.id=1,snapshot.name=a,,b",
  );
  rejects(
    ["-l", "snapshot.bogus=1", "f"],
    "Failed in parsing snapshot param `snapshot.bogus=1': Invalid parameter 'snapshot.bogus'",
  );
  rejects(["-l", "snapshot.id=1,foo=x", "f"], /Invalid parameter 'foo'/);
  assert.equal(serve(["-l", "snapshotx", "f"]).loadSnapshot, "snapshotx"); // not the snapshot. form
});

Deno.test("cli: -f formats", () => {
  assert.equal(serve(["-f", "raw", "f"]).image.format, "raw");
  assert.equal(serve(["--format=qcow2", "f"]).image.format, "qcow2");
  assert.equal(serve(["-f", "file", "f"]).image.format, "raw");
  rejects(
    ["-f", "vvfat", "f"],
    `Failed to blk_new_open 'f': Image format 'vvfat' is not supported by denbd (only ${ONLY})`,
  );
  rejects(["-f", "bogus", "f"], "Failed to blk_new_open 'f': Unknown driver 'bogus'");
  rejects(["-f", "RAW", "f"], "Failed to blk_new_open 'f': Unknown driver 'RAW'");
  rejects(["-f", "", "f"], "Failed to blk_new_open 'f': Unknown driver ''");
});

Deno.test("cli: qemu option string syntax", () => {
  assert.deepEqual(parseQemuOpts("a=1,b=x,,y,c=", "file"), [
    { key: "a", value: "1", flag: false },
    { key: "b", value: "x,y", flag: false },
    { key: "c", value: "", flag: false },
  ]);
  assert.deepEqual(parseQemuOpts("/p,,q,driver=raw", "file"), [
    { key: "file", value: "/p,q", flag: false },
    { key: "driver", value: "raw", flag: false },
  ]);
  assert.deepEqual(parseQemuOpts("x=1,foo,nobar"), [
    { key: "x", value: "1", flag: false },
    { key: "foo", value: "on", flag: true },
    { key: "bar", value: "off", flag: true },
  ]);
  assert.deepEqual(parseQemuOpts("driver=raw,,file.filename=x", "file"), [
    { key: "driver", value: "raw,file.filename=x", flag: false },
  ]);
  assert.deepEqual(parseQemuOpts("a=1,,,b=2"), [
    { key: "a", value: "1,", flag: false },
    { key: "b", value: "2", flag: false },
  ]);
  assert.deepEqual(parseQemuOpts(""), []);
});

Deno.test("cli: --image-opts", () => {
  const o = serve(["--image-opts", "driver=raw,file.filename=/x.img,offset=512,size=1048576"]);
  assert.deepEqual(o.image, {
    filename: "/x.img",
    format: "raw",
    offset: 512,
    size: 1048576,
    raw: { driver: "raw", "file.filename": "/x.img", offset: "512", size: "1048576" },
  });
  const q = parseImageOpts("driver=qcow2,file.driver=file,file.filename=/x.qcow2");
  assert.equal(q.format, "qcow2");
  assert.equal(q.filename, "/x.qcow2");
  assert.equal(q.offset, 0);
  assert.equal(q.size, undefined);
  assert.equal(parseImageOpts("file.filename=/a,,b").filename, "/a,b");
  assert.equal(parseImageOpts("file.filename=/a").format, undefined); // probe
  assert.deepEqual(parseImageOpts("driver=file,filename=/f"), {
    filename: "/f",
    format: "raw",
    offset: 0,
    size: undefined,
    raw: { driver: "file", filename: "/f" },
  });
  assert.equal(parseImageOpts("driver=raw,driver=qcow2,file.filename=/f").format, "qcow2"); // last wins
  const sized = parseImageOpts("driver=raw,file.filename=/f,offset=1.5k,size=2M");
  assert.equal(sized.offset, 1536);
  assert.equal(sized.size, 2 * 1024 * 1024);
  // -o adds a window on top of the raw driver's own.
  const both = serve([
    "--image-opts",
    "-o",
    "1024",
    "driver=raw,file.filename=/f,offset=512,size=4k",
  ]);
  assert.equal(both.image.offset, 1536);
  assert.equal(both.image.size, 3072);
  rejects(
    ["-o", "8192", "--image-opts", "driver=raw,file.filename=/f,size=4k"],
    "Offset (8192) cannot be greater than size of the containing file (4096)",
  );
  const extra = serve([
    "--image-opts",
    "driver=qcow2,file.filename=/f,file.locking=off,lazy-refcounts",
  ]);
  assert.deepEqual(unsupportedOptions(extra), [
    "--image-opts option 'file.locking' is not supported yet",
    "--image-opts option 'lazy-refcounts' is not supported yet",
  ]);
});

Deno.test("cli: --image-opts errors", () => {
  rejects(
    ["--image-opts", "-f", "raw", "driver=raw,file.filename=/f"],
    "--image-opts and -f are mutually exclusive",
  );
  // qemu-nbd reports these from blk_new_open, prefixed with the FILE argument.
  const bad = (text: string, message: string | RegExp) =>
    rejects(
      ["--image-opts", text],
      typeof message === "string"
        ? `Failed to blk_new_open '${text}': ${message}`
        : new RegExp(`^Failed to blk_new_open '${RegExp.escape(text)}': .*${message.source}`),
    );
  bad("driver=bogus,file.filename=/f", "Unknown driver 'bogus'");
  bad(
    "driver=vvfat,file.filename=/f",
    `Block format 'vvfat' is not supported by denbd (only ${ONLY})`,
  );
  bad("driver=raw,,file.filename=x", "Unknown driver 'raw,file.filename=x'");
  bad("driver=raw,file.driver=bogus,file.filename=/f", "Unknown driver 'bogus'");
  bad("/f", "Cannot find device='/f' nor node-name='/f'");
  bad("file=/f", "Cannot find device='/f' nor node-name='/f'");
  bad("", "Must specify either driver or file");
  bad("filename=/f", "Must specify either driver or file");
  bad("driver=qcow2,filename=/f", `A block device must be specified for "file"`);
  bad("driver=raw", `A block device must be specified for "file"`);
  bad(
    "driver=qcow2,file.filename=/f,offset=5",
    "Block format 'qcow2' does not support the option 'offset'",
  );
  bad(
    "driver=file,filename=/f,size=512",
    "Block protocol 'file' doesn't support the option 'size'",
  );
  bad(
    "driver=raw,file.filename=/f,size=abc",
    "Parameter 'size' expects a non-negative number below 2^64",
  );
  bad(
    "driver=raw,file.filename=/f,offset=-1",
    "Parameter 'offset' expects a non-negative number below 2^64",
  );
  bad(
    "driver=raw,file.filename=/f,offset=16E",
    "Value '16E' is out of range for parameter 'offset'",
  );
  bad("driver=raw,file.filename=/f,size=1000", "Specified size is not multiple of 512");
  bad("driver=raw,file.filename=/f,offset=8E", /larger than denbd supports/);
  bad("driver=raw,=x,file.filename=/f", /Invalid parameter ''/);
});

Deno.test("cli: qemu size syntax", () => {
  // Expected values observed from qemu-nbd 7.2's error messages (see the interop check below).
  const cases: [string, bigint | "invalid" | "range"][] = [
    ["0", 0n],
    ["5", 5n],
    ["0x10", 16n],
    ["0X10", 16n],
    ["010", 10n], // decimal, unlike -o
    ["0x10k", 16384n],
    ["1.5k", 1536n],
    ["1.k", 1024n],
    ["0.1k", 102n],
    ["1.0", 1n],
    ["5.0k", 5120n],
    ["1.00000000000000000001k", 1024n],
    ["0.9999999999999999999k", 0n],
    ["15.9999E", 18446628781559090944n],
    ["15.99999999999999999E", 17293822569102704640n],
    ["5b", 5n],
    ["5K", 5120n],
    ["5m", 5n << 20n],
    ["5g", 5n << 30n],
    ["5t", 5n << 40n],
    ["5p", 5n << 50n],
    ["5e", 5n << 60n],
    [" 5", 5n],
    ["\t5", 5n],
    ["+5", 5n],
    ["18446744073709551615", 18446744073709551615n],
    ["1e3", "invalid"],
    ["1.5", "invalid"],
    ["1.5b", "invalid"],
    [".5k", "invalid"],
    ["0.5", "invalid"],
    ["5 ", "invalid"],
    ["5 k", "invalid"],
    ["-0", "invalid"],
    ["-5", "invalid"],
    ["0x1.8k", "invalid"],
    ["0x", "invalid"],
    ["00x10", "invalid"],
    ["5kk", "invalid"],
    ["5KiB", "invalid"],
    ["", "invalid"],
    ["abc", "invalid"],
    ["16E", "range"],
    ["18446744073709551616", "range"],
    ["99999999999999999999k", "invalid"],
  ];
  for (const [text, want] of cases) assert.equal(parseSize(text), want, JSON.stringify(text));
});

Deno.test("cli: C integer parsing", () => {
  assert.equal(parseU64("-1", 0), 18446744073709551615n);
  assert.equal(parseU64("0x", 0), "invalid");
  assert.equal(parseU64("0", 0), 0n);
  assert.equal(parseU64("077", 0), 63n);
  assert.equal(parseU64("0xfF", 0), 255n);
  assert.equal(parseU64("18446744073709551616", 0), "range");
  assert.equal(parseInt32("-2147483648", 0), -2147483648);
  assert.equal(parseInt32("-2147483649", 0), "range");
  assert.equal(parseInt32("0x7fffffff", 0), 2147483647);
  assert.equal(parseInt32("-0", 0), 0);
  assert.equal(parseInt32("1 ", 0), "invalid");
});

// ---- Differential: the real qemu-nbd must reject what denbd rejects. ----

const QEMU_NBD = "/usr/bin/qemu-nbd";

interface Outcome {
  readonly code: number;
  readonly stderr: string;
}

/** Runs qemu-nbd; if it is still running after 2 s it was serving: kill it and report that. */
async function runQemuNbd(args: string[]): Promise<Outcome | "still running"> {
  const child = new Deno.Command(QEMU_NBD, {
    args,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"still running">((resolve) => {
    timer = setTimeout(() => resolve("still running"), 2000);
  });
  const done = child.output().then((o) => ({
    code: o.code,
    stderr: new TextDecoder().decode(o.stderr),
  }));
  const first = await Promise.race([done, timeout]);
  clearTimeout(timer);
  if (first === "still running") {
    child.kill("SIGKILL");
    await done;
  }
  return first;
}

Deno.test("cli: qemu-nbd 7.2 rejects what denbd rejects", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denbd-cli-" });
  try {
    const img = `${dir}/img.raw`;
    await Deno.writeFile(img, new Uint8Array(1024 * 1024));
    const missing = `${dir}/missing.img`;
    let n = 0;
    const sock = () => `${dir}/s${n++}.sock`;
    // [arguments, fragment of qemu-nbd's stderr, fragment of denbd's message]. Never --fork or
    // -c here: a forked or kernel-attached qemu-nbd would escape the 2 s kill.
    const cases: [string[], string, string][] = [
      [["-k", sock(), "-o", "abc", missing], "Invalid offset 'abc'", "Invalid offset 'abc'"],
      [["-k", sock(), "-o", "1k", missing], "Invalid offset '1k'", "Invalid offset '1k'"],
      [
        ["-k", sock(), "-f", "raw", "-o", "-512", img],
        "Parameter 'offset' expects",
        "Invalid offset",
      ],
      [["-k", "rel.sock", missing], "socket path must be absolute", "socket path must be absolute"],
      [
        ["-k", sock(), "-e", "-1", missing],
        "Invalid shared device number '-1'",
        "Invalid shared device number '-1'",
      ],
      [
        ["-k", sock(), "-e", "2147483648", missing],
        "Invalid shared device number",
        "Invalid shared device number",
      ],
      [
        ["-k", sock(), "--cache=bogus", missing],
        "Invalid cache mode `bogus'",
        "Invalid cache mode `bogus'",
      ],
      [
        ["-k", sock(), "-n", "--cache=none", missing],
        "-n and --cache can only",
        "-n and --cache can only",
      ],
      [
        ["-k", sock(), "--aio=bogus", missing],
        "Invalid aio mode 'bogus'",
        "Invalid aio mode 'bogus'",
      ],
      [
        ["-k", sock(), "--aio=threads", "--aio=threads", missing],
        "--aio can only",
        "--aio can only",
      ],
      [
        ["-k", sock(), "--discard=bogus", missing],
        "Invalid discard mode `bogus'",
        "Invalid discard mode `bogus'",
      ],
      [
        ["-k", sock(), "--discard=on", "--discard=on", missing],
        "--discard can only",
        "--discard can only",
      ],
      [
        ["-k", sock(), "--detect-zeroes=bogus", missing],
        "Failed to parse detect_zeroes mode",
        "Failed to parse detect_zeroes mode",
      ],
      [
        ["-k", sock(), "--detect-zeroes=unmap", missing],
        "setting detect-zeroes to unmap",
        "setting detect-zeroes to unmap",
      ],
      [
        ["-k", sock(), "--detect-zeroes=unmap", "--discard=unmap", missing],
        "setting detect-zeroes to unmap",
        "setting detect-zeroes to unmap",
      ],
      [["-k", sock()], "Invalid number of arguments", "Invalid number of arguments"],
      [
        ["-k", sock(), missing, missing],
        "Invalid number of arguments",
        "Invalid number of arguments",
      ],
      [
        ["-k", sock(), "--bogus", missing],
        "unrecognized option '--bogus'",
        "unrecognized option '--bogus'",
      ],
      [["-k", sock(), "-Z", missing], "invalid option -- 'Z'", "invalid option -- 'Z'"],
      [
        ["-k", sock(), "--p", "1", missing],
        "option '--p' is ambiguous; possibilities: '--port' '--persistent' '--pid-file'",
        "option '--p' is ambiguous; possibilities: '--port' '--persistent' '--pid-file'",
      ],
      [
        ["-k", sock(), "--pers=1", missing],
        "option '--persistent' doesn't allow an argument",
        "option '--persistent' doesn't allow an argument",
      ],
      [
        ["-k", sock(), missing, "-p"],
        "option requires an argument -- 'p'",
        "option requires an argument -- 'p'",
      ],
      [
        ["-k", sock(), missing, "--port"],
        "option '--port' requires an argument",
        "option '--port' requires an argument",
      ],
      [["-k", sock(), "-rto1k", missing], "Invalid offset '1k'", "Invalid offset '1k'"],
      [["-k", sock(), "-x", "a".repeat(4097), missing], "too long", "too long"],
      [["-k", sock(), "-D", "a".repeat(4097), missing], "too long", "too long"],
      [
        ["-k", sock(), "-l", "snapshot.bogus=1", missing],
        "Failed in parsing snapshot param",
        "Failed in parsing snapshot param",
      ],
      [
        ["-k", sock(), "-L", img],
        "List mode is incompatible with a file name",
        "List mode is incompatible with a file name",
      ],
      [
        ["-k", sock(), "-L", "-x", "a"],
        "List mode is incompatible with per-device settings",
        "List mode is incompatible with per-device settings",
      ],
      [["-k", sock(), "-L", "-o", "1"], "per-device settings", "per-device settings"],
      [
        ["-k", sock(), "-L", "--fork"],
        "List mode is incompatible with forking",
        "List mode is incompatible with forking",
      ],
      [
        ["-k", sock(), "--tls-creds=nope", missing],
        "Failed to get TLS creds: No TLS credentials with id 'nope'",
        "Failed to get TLS creds: No TLS credentials with id 'nope'",
      ],
      [
        ["-k", sock(), "--object", "secret,id=s,data=1", "--tls-creds=s", missing],
        "Object with id 's' is not TLS credentials",
        "Object with id 's' is not TLS credentials",
      ],
      [
        ["-k", sock(), "--object", "tls-creds-anon,id=t", "--tls-creds=t", missing],
        "Expected TLS credentials for a server endpoint",
        "Expected TLS credentials for a server endpoint",
      ],
      [
        ["-k", sock(), "--object", "tls-creds-x509,id=t,endpoint=server", missing],
        "Missing 'dir' property value",
        "Missing 'dir' property value",
      ],
      [
        ["-k", sock(), "--object", "secret,id=a,data=1", "--object", "secret,id=a,data=2", missing],
        "attempt to add duplicate property 'a' to object (type 'container')",
        "attempt to add duplicate property 'a' to object (type 'container')",
      ],
      [
        ["-k", sock(), "--object", "authz-list,id=l,rules.0.match=x", missing],
        "Parameter 'rules.0.policy' is missing",
        "Parameter 'rules.0.policy' is missing",
      ],
      [
        ["-k", sock(), "--object", "nosuch,id=x", "-x"],
        "Parameter 'qom-type' does not accept value 'nosuch'",
        "Parameter 'qom-type' does not accept value 'nosuch'",
      ],
      [
        ["-k", sock(), "--tls-authz=x", missing],
        "--tls-authz is not permitted without --tls-creds",
        "--tls-authz is not permitted without --tls-creds",
      ],
      [
        ["-k", sock(), "--tls-hostname=x", missing],
        "--tls-hostname is not permitted without --tls-creds",
        "--tls-hostname is not permitted without --tls-creds",
      ],
      [
        ["-b", "127.0.0.1", "-p", "1", "--tls-creds=x", "--tls-hostname=y", missing],
        "TLS hostname is only supported with export list",
        "TLS hostname is only supported with export list",
      ],
      [
        ["-L", "-k", sock(), "--tls-creds=x", "--tls-authz=y"],
        "TLS authorization is incompatible with export list",
        "TLS authorization is incompatible with export list",
      ],
      [
        ["-b", "127.0.0.1", "-p", "1", "--selinux-label=x", missing],
        "--selinux-label is not permitted without --socket",
        "--selinux-label is not permitted without --socket",
      ],
      [
        ["-b", "127.0.0.1", "-p", "abc", missing],
        "address resolution failed for 127.0.0.1:abc",
        "address resolution failed for 127.0.0.1:abc",
      ],
      [
        ["-k", sock(), "--image-opts", "-f", "raw", `driver=raw,file.filename=${missing}`],
        "--image-opts and -f are mutually exclusive",
        "--image-opts and -f are mutually exclusive",
      ],
      [["-k", sock(), "-f", "bogus", img], "Unknown driver 'bogus'", "Unknown driver 'bogus'"],
      [
        ["-k", sock(), "--image-opts", `driver=bogus,file.filename=${img}`],
        "Unknown driver 'bogus'",
        "Unknown driver 'bogus'",
      ],
      [
        ["-k", sock(), "--image-opts", `driver=raw,,file.filename=${img}`],
        "Unknown driver 'raw,file.filename=",
        "Unknown driver 'raw,file.filename=",
      ],
      [["-k", sock(), "--image-opts", img], "Cannot find device=", "Cannot find device="],
      [
        ["-k", sock(), "--image-opts", ""],
        "Must specify either driver or file",
        "Must specify either driver or file",
      ],
      [
        ["-k", sock(), "--image-opts", `driver=qcow2,filename=${img}`],
        `A block device must be specified for "file"`,
        `A block device must be specified for "file"`,
      ],
      [
        ["-k", sock(), "--image-opts", `driver=raw,file.filename=${img},size=abc`],
        "Parameter 'size' expects a non-negative number below 2^64",
        "Parameter 'size' expects a non-negative number below 2^64",
      ],
      [
        ["-k", sock(), "--image-opts", `driver=raw,file.filename=${img},offset=1e3`],
        "Parameter 'offset' expects",
        "Parameter 'offset' expects",
      ],
      [
        ["-k", sock(), "--image-opts", `driver=raw,file.filename=${img},offset=1.5`],
        "Parameter 'offset' expects",
        "Parameter 'offset' expects",
      ],
      [
        ["-k", sock(), "--image-opts", `driver=raw,file.filename=${img},offset=-0`],
        "Parameter 'offset' expects",
        "Parameter 'offset' expects",
      ],
      [
        ["-k", sock(), "--image-opts", `driver=raw,file.filename=${img},offset=16E`],
        "Value '16E' is out of range for parameter 'offset'",
        "Value '16E' is out of range for parameter 'offset'",
      ],
      [
        ["-k", sock(), "--image-opts", `driver=raw,file.filename=${img},size=1000`],
        "Specified size is not multiple of 512",
        "Specified size is not multiple of 512",
      ],
      [
        ["-k", sock(), "-o", "8192", "--image-opts", `driver=raw,file.filename=${img},size=4k`],
        "Offset (8192) cannot be greater than size of the containing file (4096)",
        "Offset (8192) cannot be greater than size of the containing file (4096)",
      ],
    ];
    const failures: string[] = [];
    for (const [args, qemuWants, denbdWants] of cases) {
      let denbd: string;
      try {
        parseCommandLine(args);
        denbd = "(accepted)";
      } catch (e) {
        denbd = e instanceof CliError ? e.message : `(threw ${e})`;
      }
      const qemu = await runQemuNbd(args);
      const label = JSON.stringify(args).slice(0, 160);
      if (qemu === "still running") {
        failures.push(`${label}: qemu-nbd accepted it and started serving`);
      } else if (qemu.code !== 1 || !qemu.stderr.includes(qemuWants)) {
        failures.push(`${label}: qemu-nbd exit ${qemu.code}: ${qemu.stderr.trim()}`);
      }
      if (!denbd.includes(denbdWants)) failures.push(`${label}: denbd said ${denbd}`);
    }
    assert.deepEqual(failures, []);
    // And the same size values qemu-nbd accepted above parse here to the same bytes.
    const accepted: [string, string][] = [["1.5k", "1536"], ["0.1k", "102"], ["010", "10"], [
      "0x10k",
      "16384",
    ], ["15.9999E", "18446628781559090944"]];
    for (const [value, bytes] of accepted) {
      const qemu = await runQemuNbd([
        "-k",
        sock(),
        "--image-opts",
        `driver=raw,file.filename=${img},offset=${value},size=2M`,
      ]);
      assert.ok(qemu !== "still running");
      assert.match(qemu.stderr, new RegExp(`Offset \\(${bytes}\\)|offset \\(${bytes}\\)`), value);
      assert.equal(parseSize(value), BigInt(bytes));
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cli: -c, -d and denbd's --connections/--dead-conn-timeout", () => {
  const c = serve(["-c", "/dev/nbd0", "-f", "qcow2", "vm.qcow2"]);
  assert.equal(c.connect, "/dev/nbd0");
  assert.equal(c.file, "vm.qcow2");
  assert.equal(c.connections, undefined);
  const d = serve(["-d", "/dev/nbd0"]);
  assert.equal(d.disconnect, true);
  assert.equal(d.file, "/dev/nbd0");
  const n = serve(["-c", "/dev/nbd1", "--connections=4", "-e", "0", "--dead-conn-timeout=30", "x"]);
  assert.equal(n.connections, 4);
  assert.equal(n.deadConnTimeout, 30);
  assert.equal(serve(["-c", "/dev/nbd1", "--connections=1", "x"]).connections, 1);
  rejects(["--connections=2", "-e", "0", "x"], "--connections is only supported with -c");
  rejects(["-c", "/dev/nbd1", "--connections=2", "x"], /needs -e 0 or -e 2 or more/);
  rejects(["-c", "/dev/nbd1", "--connections=4", "-e", "3", "x"], /needs -e 0 or -e 4 or more/);
  rejects(
    ["-c", "/dev/nbd1", "--connections=0", "x"],
    "Invalid number of connections '0' (1 to 64)",
  );
  rejects(["-c", "/dev/nbd1", "--dead-conn-timeout=5", "x"], /needs --connections/);
});
