/**
 * qemu-nbd 7.2's command line: its option table, defaults, and every check qemu-nbd makes before
 * it opens the image, in qemu-nbd's order so the first error reported is the same one.
 *
 * @module
 */

import { CliError, PROGRAM, TRY_HELP } from "./errors.ts";
import { getopt, type OptionSpec } from "./getopt.ts";
import { helpText, versionText } from "./help.ts";
import { parseImageOpts, parseQemuOpts, plainImage } from "./image_opts.ts";
import { parseInt32, parseU64 } from "./numbers.ts";
import { activationConflict, socketActivation } from "./socket_activation.ts";
import { ObjectHintError, type ObjectOutcome, ObjectRegistry } from "../objects/registry.ts";
import { ObjectError } from "../objects/types.ts";
import { formatDriver } from "../block/formats.ts";
import {
  expandLogfileName,
  parseTraceOption,
  TRACE_OPTIONS_HELP,
  traceEventList,
  TraceOptionError,
  type TraceRequest,
} from "../trace/trace_option.ts";
import type {
  AioMode,
  CacheMode,
  Command,
  DetectZeroesMode,
  DiscardMode,
  ImageSpec,
  ServerOptions,
} from "./options.ts";

export { CliError, formatCliError } from "./errors.ts";

type OptionId =
  | "help"
  | "version"
  | "bind"
  | "port"
  | "socket"
  | "offset"
  | "readOnly"
  | "allocationDepth"
  | "bitmap"
  | "connect"
  | "disconnect"
  | "list"
  | "snapshot"
  | "loadSnapshot"
  | "nocache"
  | "cache"
  | "aio"
  | "discard"
  | "detectZeroes"
  | "shared"
  | "format"
  | "persistent"
  | "verbose"
  | "object"
  | "exportName"
  | "description"
  | "tlsCreds"
  | "tlsHostname"
  | "tlsAuthz"
  | "imageOpts"
  | "trace"
  | "fork"
  | "pidFile"
  | "selinuxLabel"
  | "handshakeLimit"
  | "connections"
  | "deadConnTimeout";

/** qemu-nbd 7.2's short option string, kept for reference and checked by the tests. */
export const SHORT_OPTIONS = "hVb:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:L";

/** qemu-nbd 7.2's long options in its table order (the order glibc lists ambiguous matches in). */
export const OPTION_TABLE: readonly OptionSpec<OptionId>[] = [
  { id: "help", long: "help", short: "h", hasArg: false },
  { id: "version", long: "version", short: "V", hasArg: false },
  { id: "bind", long: "bind", short: "b", hasArg: true },
  { id: "port", long: "port", short: "p", hasArg: true },
  { id: "socket", long: "socket", short: "k", hasArg: true },
  { id: "offset", long: "offset", short: "o", hasArg: true },
  { id: "readOnly", long: "read-only", short: "r", hasArg: false },
  { id: "allocationDepth", long: "allocation-depth", short: "A", hasArg: false },
  { id: "bitmap", long: "bitmap", short: "B", hasArg: true },
  { id: "connect", long: "connect", short: "c", hasArg: true },
  { id: "disconnect", long: "disconnect", short: "d", hasArg: false },
  { id: "list", long: "list", short: "L", hasArg: false },
  { id: "snapshot", long: "snapshot", short: "s", hasArg: false },
  { id: "loadSnapshot", long: "load-snapshot", short: "l", hasArg: true },
  { id: "nocache", long: "nocache", short: "n", hasArg: false },
  { id: "cache", long: "cache", hasArg: true },
  { id: "aio", long: "aio", hasArg: true },
  { id: "discard", long: "discard", hasArg: true },
  { id: "detectZeroes", long: "detect-zeroes", hasArg: true },
  { id: "shared", long: "shared", short: "e", hasArg: true },
  { id: "format", long: "format", short: "f", hasArg: true },
  { id: "persistent", long: "persistent", short: "t", hasArg: false },
  { id: "verbose", long: "verbose", short: "v", hasArg: false },
  { id: "object", long: "object", hasArg: true },
  { id: "exportName", long: "export-name", short: "x", hasArg: true },
  { id: "description", long: "description", short: "D", hasArg: true },
  { id: "tlsCreds", long: "tls-creds", hasArg: true },
  { id: "tlsHostname", long: "tls-hostname", hasArg: true },
  { id: "tlsAuthz", long: "tls-authz", hasArg: true },
  { id: "imageOpts", long: "image-opts", hasArg: false },
  { id: "trace", long: "trace", short: "T", hasArg: true },
  { id: "fork", long: "fork", hasArg: false },
  { id: "pidFile", long: "pid-file", hasArg: true },
  { id: "selinuxLabel", long: "selinux-label", hasArg: true },
  // qemu 10's option; an extension here, so "--h" still means --help as in 7.2.
  { id: "handshakeLimit", long: "handshake-limit", hasArg: true, extension: true },
  { id: "connections", long: "connections", hasArg: true, extension: true },
  { id: "deadConnTimeout", long: "dead-conn-timeout", hasArg: true, extension: true },
];

/** NBD_MAX_STRING_SIZE: the longest export name or description qemu-nbd accepts, in bytes. */
const NBD_MAX_STRING_SIZE = 4096;
const DEFAULT_PORT = 10809;
/** qemu's "snapshot." prefix that selects the key=value form of -l. */
const SNAPSHOT_OPT_BASE = "snapshot.";
const SNAPSHOT_KEYS: ReadonlySet<string> = new Set(["snapshot.id", "snapshot.name"]);

/** bdrv_parse_cache_mode(): "off" is an alias of "none". */
const CACHE_MODES: Readonly<Record<string, CacheMode>> = {
  none: "none",
  off: "none",
  writeback: "writeback",
  writethrough: "writethrough",
  directsync: "directsync",
  unsafe: "unsafe",
};
const AIO_MODES: Readonly<Record<string, AioMode>> = {
  threads: "threads",
  native: "native",
  io_uring: "io_uring",
};
/** bdrv_parse_discard_flags(): off/ignore and on/unmap. */
const DISCARD_MODES: Readonly<Record<string, DiscardMode>> = {
  off: "ignore",
  ignore: "ignore",
  on: "unmap",
  unmap: "unmap",
};
const DETECT_ZEROES_MODES: Readonly<Record<string, DetectZeroesMode>> = {
  off: "off",
  on: "on",
  unmap: "unmap",
};

function lookup<T>(table: Readonly<Record<string, T>>, key: string): T | undefined {
  return Object.hasOwn(table, key) ? table[key] : undefined;
}

/** Mutable while the options are read, in qemu-nbd's variable names' spirit. */
interface Draft {
  bind: string | undefined;
  port: string | undefined;
  socket: string | undefined;
  offset: bigint;
  readOnly: boolean;
  snapshot: boolean;
  loadSnapshot: string | undefined;
  /** -l given as an ID or name rather than the snapshot.id= form (only that form blocks -L). */
  loadSnapshotByName: boolean;
  shared: number;
  persistent: boolean;
  exportName: string | undefined;
  description: string | undefined;
  cache: CacheMode | undefined;
  aio: AioMode | undefined;
  discard: DiscardMode | undefined;
  detectZeroes: DetectZeroesMode;
  allocationDepth: boolean;
  bitmaps: string[];
  format: string | undefined;
  imageOpts: boolean;
  fork: boolean;
  pidFile: string | undefined;
  verbose: boolean;
  handshakeLimit: number;
  connections: number | undefined;
  deadConnTimeout: number | undefined;
  tlsCreds: string | undefined;
  tlsAuthz: string | undefined;
  tlsHostname: string | undefined;
  objects: string[];
  /** The --object objects, created as they are parsed. */
  registry: ObjectRegistry;
  trace: string[];
  /** The log file the last -T names (each -T sets it anew). */
  traceFile: string | undefined;
  selinuxLabel: string | undefined;
  connect: string | undefined;
  disconnect: boolean;
  list: boolean;
}

function newDraft(): Draft {
  return {
    bind: undefined,
    port: undefined,
    socket: undefined,
    offset: 0n,
    readOnly: false,
    snapshot: false,
    loadSnapshot: undefined,
    loadSnapshotByName: false,
    shared: 1,
    persistent: false,
    exportName: undefined,
    description: undefined,
    cache: undefined,
    aio: undefined,
    discard: undefined,
    detectZeroes: "off",
    allocationDepth: false,
    bitmaps: [],
    format: undefined,
    imageOpts: false,
    fork: false,
    pidFile: undefined,
    verbose: false,
    handshakeLimit: 10,
    connections: undefined,
    deadConnTimeout: undefined,
    tlsCreds: undefined,
    tlsAuthz: undefined,
    tlsHostname: undefined,
    objects: [],
    registry: new ObjectRegistry(),
    trace: [],
    traceFile: undefined,
    selinuxLabel: undefined,
    connect: undefined,
    disconnect: false,
    list: false,
  };
}

const utf8 = new TextEncoder();

/** -l: the snapshot.id=/snapshot.name= form is checked as qemu's option parser would. */
function checkSnapshotParam(value: string): void {
  if (!value.startsWith(SNAPSHOT_OPT_BASE)) return;
  for (const p of parseQemuOpts(value)) {
    if (!SNAPSHOT_KEYS.has(p.key)) {
      throw new CliError(
        `Failed in parsing snapshot param \`${value}': Invalid parameter '${p.key}'`,
      );
    }
  }
}

/** Applies one option, as qemu-nbd's getopt loop does, including its immediate checks. */
function apply(d: Draft, id: OptionId, value: string): void {
  switch (id) {
    case "bind":
      d.bind = value;
      return;
    case "port":
      d.port = value;
      return;
    case "socket":
      if (!value.startsWith("/")) throw new CliError("socket path must be absolute");
      d.socket = value;
      return;
    case "offset": {
      const v = parseU64(value, 0);
      if (typeof v !== "bigint") throw new CliError(`Invalid offset '${value}'`);
      d.offset = v;
      return;
    }
    case "readOnly":
      d.readOnly = true;
      return;
    case "allocationDepth":
      d.allocationDepth = true;
      return;
    case "bitmap":
      d.bitmaps.push(value);
      return;
    case "connect":
      d.connect = value;
      return;
    case "disconnect":
      d.disconnect = true;
      return;
    case "list":
      d.list = true;
      return;
    case "snapshot":
      d.snapshot = true;
      return;
    case "loadSnapshot":
      checkSnapshotParam(value);
      d.loadSnapshot = value;
      d.loadSnapshotByName = d.loadSnapshotByName || !value.startsWith(SNAPSHOT_OPT_BASE);
      d.readOnly = true; // qemu-nbd: a loaded internal snapshot is always exported read-only
      return;
    case "nocache":
    case "cache": {
      if (d.cache !== undefined) throw new CliError("-n and --cache can only be specified once");
      const mode = id === "nocache" ? "none" : lookup(CACHE_MODES, value);
      if (mode === undefined) throw new CliError(`Invalid cache mode \`${value}'`);
      d.cache = mode;
      return;
    }
    case "aio": {
      if (d.aio !== undefined) throw new CliError("--aio can only be specified once");
      const mode = lookup(AIO_MODES, value);
      if (mode === undefined) throw new CliError(`Invalid aio mode '${value}'`);
      d.aio = mode;
      return;
    }
    case "discard": {
      if (d.discard !== undefined) throw new CliError("--discard can only be specified once");
      const mode = lookup(DISCARD_MODES, value);
      if (mode === undefined) throw new CliError(`Invalid discard mode \`${value}'`);
      d.discard = mode;
      return;
    }
    case "detectZeroes": {
      const mode = lookup(DETECT_ZEROES_MODES, value);
      if (mode === undefined) {
        throw new CliError(
          `Failed to parse detect_zeroes mode: invalid parameter value: ${value}`,
        );
      }
      // Checked when the option is seen: --discard=unmap must come before it, as in qemu-nbd.
      if (mode === "unmap" && d.discard !== "unmap") {
        throw new CliError(
          "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        );
      }
      d.detectZeroes = mode;
      return;
    }
    case "shared": {
      const v = parseInt32(value, 0);
      if (typeof v !== "number" || v < 0) {
        throw new CliError(`Invalid shared device number '${value}'`);
      }
      d.shared = v;
      return;
    }
    case "format":
      d.format = value;
      return;
    case "persistent":
      d.persistent = true;
      return;
    case "verbose":
      d.verbose = true;
      return;
    case "object":
      d.objects.push(value);
      return;
    case "exportName":
      if (utf8.encode(value).length > NBD_MAX_STRING_SIZE) {
        throw new CliError(`export name '${value}' too long`);
      }
      d.exportName = value;
      return;
    case "description":
      if (utf8.encode(value).length > NBD_MAX_STRING_SIZE) {
        throw new CliError(`export description '${value}' too long`);
      }
      d.description = value;
      return;
    case "tlsCreds":
      d.tlsCreds = value;
      return;
    case "tlsHostname":
      d.tlsHostname = value;
      return;
    case "tlsAuthz":
      d.tlsAuthz = value;
      return;
    case "imageOpts":
      d.imageOpts = true;
      return;
    case "trace":
      d.trace.push(value);
      return;
    case "fork":
      d.fork = true;
      return;
    case "pidFile":
      d.pidFile = value;
      return;
    case "selinuxLabel":
      d.selinuxLabel = value;
      return;
    case "handshakeLimit": {
      const v = parseInt32(value, 0);
      if (typeof v !== "number" || v < 0) {
        throw new CliError(`Invalid handshake limit '${value}'`);
      }
      d.handshakeLimit = v;
      return;
    }
    case "connections": {
      const v = parseInt32(value, 0);
      if (typeof v !== "number" || v < 1 || v > 64) {
        throw new CliError(`Invalid number of connections '${value}' (1 to 64)`);
      }
      d.connections = v;
      return;
    }
    case "deadConnTimeout": {
      const v = parseInt32(value, 0);
      if (typeof v !== "number" || v < 0) {
        throw new CliError(`Invalid dead connection timeout '${value}'`);
      }
      d.deadConnTimeout = v;
      return;
    }
    case "help":
    case "version":
      return; // handled by the caller
  }
}

/**
 * The TCP port qemu-nbd would listen on or connect to. qemu-nbd hands the text to getaddrinfo,
 * which also takes service names and silently wraps numbers above 65535; denbd takes only a
 * decimal number from 0 to 65535 (a deliberate difference) and words its errors like qemu-nbd.
 */
function resolvePort(d: Draft): number {
  if (d.port === undefined) return DEFAULT_PORT;
  if (!/^[ \t\n\v\f\r]*\+?\d+$/.test(d.port)) {
    throw new CliError(
      `address resolution failed for ${d.bind ?? "0.0.0.0"}:${d.port}: ` +
        "Servname not supported for ai_socktype",
    );
  }
  const n = Number(d.port.trim());
  if (n > 65535) throw new CliError(`Invalid port '${d.port}': must be from 0 to 65535`);
  return n;
}

/**
 * The checks qemu-nbd makes after its option loop and before it opens the image, in its order.
 * `positionals` are the non-option arguments.
 */
function finish(d: Draft, positionals: readonly string[]): ServerOptions {
  if (d.list) {
    if (positionals.length !== 0) throw new CliError("List mode is incompatible with a file name");
    if (
      d.exportName !== undefined || d.description !== undefined || d.offset !== 0n ||
      d.connect !== undefined || d.disconnect || d.format !== undefined ||
      d.loadSnapshotByName || d.bitmaps.length > 0 || d.allocationDepth ||
      d.aio !== undefined || d.discard !== undefined || d.cache !== undefined
    ) {
      throw new CliError("List mode is incompatible with per-device settings");
    }
    if (d.fork) throw new CliError("List mode is incompatible with forking");
  } else if (positionals.length !== 1) {
    throw new CliError("Invalid number of arguments", TRY_HELP);
  }
  // qemu-nbd checks the -T log file's name here (it opens it when the server starts).
  if (d.traceFile !== undefined) {
    try {
      expandLogfileName(d.traceFile, 0);
    } catch (e) {
      throw new CliError((e as Error).message);
    }
  }

  // Socket activation replaces -k/-b/-p, and qemu-nbd takes exactly one socket.
  const activation = d.list ? 0 : socketActivation();
  if (activation > 0) {
    const conflict = activationConflict({
      device: d.connect !== undefined,
      socket: d.socket !== undefined,
      bind: d.bind !== undefined,
      port: d.port !== undefined,
    });
    if (conflict !== undefined) throw new CliError(conflict);
    if (activation > 1) {
      throw new CliError(`${PROGRAM} does not support socket activation with LISTEN_FDS > 1`);
    }
  }

  if (d.connections !== undefined && d.connect === undefined) {
    throw new CliError("--connections is only supported with -c");
  }
  if (d.deadConnTimeout !== undefined && d.connections === undefined) {
    throw new CliError("--dead-conn-timeout needs --connections (the netlink interface)");
  }
  if (
    d.connections !== undefined && d.connections > 1 && d.shared !== 0 &&
    d.shared < d.connections
  ) {
    throw new CliError(
      `--connections=${d.connections} needs -e 0 or -e ${d.connections} or more (the server ` +
        "must accept them all and advertise NBD_FLAG_CAN_MULTI_CONN)",
    );
  }

  if (d.tlsCreds !== undefined) {
    if (d.connect !== undefined) throw new CliError("TLS is not supported with a host device");
    if (d.tlsAuthz !== undefined && d.list) {
      throw new CliError("TLS authorization is incompatible with export list");
    }
    if (d.tlsHostname !== undefined && !d.list) {
      throw new CliError("TLS hostname is only supported with export list");
    }
    tlsCredsCheck(d.registry, d.tlsCreds, d.list);
  } else {
    if (d.tlsAuthz !== undefined) {
      throw new CliError("--tls-authz is not permitted without --tls-creds");
    }
    if (d.tlsHostname !== undefined) {
      throw new CliError("--tls-hostname is not permitted without --tls-creds");
    }
  }
  if (d.selinuxLabel !== undefined && d.socket === undefined && d.connect === undefined) {
    throw new CliError("--selinux-label is not permitted without --socket");
  }

  // With a unix socket qemu-nbd never looks at the port.
  const port = d.socket === undefined ? resolvePort(d) : DEFAULT_PORT;

  const file = positionals[0];
  const image = resolveImage(d, file);
  return Object.freeze({
    image,
    bind: d.bind ?? "0.0.0.0",
    port,
    socket: d.socket,
    readOnly: d.readOnly,
    snapshot: d.snapshot,
    loadSnapshot: d.loadSnapshot,
    shared: d.shared,
    persistent: d.persistent,
    exportName: d.exportName ?? "",
    description: d.description,
    cache: d.cache ?? "writeback",
    // qemu-nbd defaults to threads; denbd to its faster engine (scripts/engine_bench.ts).
    aio: d.aio ?? "auto",
    discard: d.discard ?? "ignore",
    detectZeroes: d.detectZeroes,
    allocationDepth: d.allocationDepth,
    bitmaps: Object.freeze([...d.bitmaps]),
    fork: d.fork,
    pidFile: d.pidFile,
    verbose: d.verbose,
    handshakeLimit: d.handshakeLimit,
    connections: d.connections,
    deadConnTimeout: d.deadConnTimeout,
    tlsCreds: d.tlsCreds,
    tlsAuthz: d.tlsAuthz,
    tlsHostname: d.tlsHostname,
    objects: Object.freeze([...d.objects]),
    trace: Object.freeze([...d.trace]),
    selinuxLabel: d.selinuxLabel,
    connect: d.connect,
    file,
    disconnect: d.disconnect,
    list: d.list,
    activation,
  });
}

/**
 * FILE (or the --image-opts string) plus -f and -o, as one {@linkcode ImageSpec}. -o puts a raw
 * window on top of whatever format was opened; with driver=raw's own offset=/size= the two
 * windows compose into one (qemu-nbd rejects an -o beyond the inner size= when it opens it).
 */
function resolveImage(d: Draft, file: string | undefined): ImageSpec {
  if (file === undefined) {
    // -L: there is no image.
    return Object.freeze({
      filename: "",
      format: undefined,
      offset: 0,
      size: undefined,
      raw: Object.freeze({}),
    });
  }
  if (d.disconnect) return plainImage(file, undefined); // FILE is the /dev/nbdX to disconnect
  if (d.imageOpts && d.format !== undefined) {
    throw new CliError("--image-opts and -f are mutually exclusive");
  }
  let inner: ImageSpec;
  try {
    inner = d.imageOpts ? parseImageOpts(file) : plainImage(file, d.format);
  } catch (e) {
    // These are blk_new_open's checks in qemu-nbd, reported with its prefix.
    if (!(e instanceof CliError)) throw e;
    throw new CliError(`Failed to blk_new_open '${file}': ${e.message}`, e.hint);
  }
  if (d.offset === 0n) return inner;
  // qemu-nbd passes -o on as a signed 64-bit number; "-1" wraps to 2^64-1 and fails there.
  if (d.offset > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CliError(`Invalid offset '${d.offset}': larger than denbd supports (2^53-1)`);
  }
  const outer = Number(d.offset);
  if (inner.size !== undefined && outer > inner.size) {
    throw new CliError(
      `Offset (${outer}) cannot be greater than size of the containing file (${inner.size})`,
    );
  }
  return Object.freeze({
    ...inner,
    offset: inner.offset + outer,
    size: inner.size === undefined ? undefined : inner.size - outer,
  });
}

/**
 * Parses qemu-nbd 7.2's command line (`argv` without the program name). Options are acted on in
 * order, so `-h` or `-V` wins over a later bad option and loses to an earlier one, as in
 * qemu-nbd. Throws {@linkcode CliError} for anything qemu-nbd rejects before opening the image
 * (and for a few things denbd cannot represent, such as offsets beyond 2^53-1). Options that are
 * parsed but not implemented are reported by {@linkcode unsupportedOptions}, not here.
 *
 * In list mode (-L) `image.filename` is ""; with -d it is the device to disconnect.
 */
export function parseCommandLine(argv: readonly string[]): Command {
  const d = newDraft();
  const walk = getopt(argv, OPTION_TABLE);
  for (let step = walk.next();; step = walk.next()) {
    if (step.done) {
      return Object.freeze({
        kind: "serve",
        options: finish(d, step.value),
        objects: d.registry,
      });
    }
    const { spec, value } = step.value;
    if (spec.id === "help") return Object.freeze({ kind: "help", text: helpText() });
    if (spec.id === "version") return Object.freeze({ kind: "version", text: versionText() });
    if (spec.id === "object") {
      // qemu-nbd creates each object as it parses it: its errors and help come at this point.
      const outcome = addObject(d, value ?? "");
      if (outcome.kind === "help") return Object.freeze({ kind: "help", text: outcome.text });
    }
    if (spec.id === "trace") {
      // qemu-nbd acts on -T at once: its warnings, errors and `help` come at this point.
      const req = traceOption(value ?? "");
      if (req.listEvents) return Object.freeze({ kind: "help", text: traceEventList() });
      if (req.describeOptions) {
        return Object.freeze({ kind: "help", text: TRACE_OPTIONS_HELP, exitCode: 1 });
      }
      d.traceFile = req.file;
    }
    apply(d, spec.id, value ?? "");
  }
}

/** Create one --object now, as qemu-nbd does; its errors are command-line errors. */
function addObject(d: Draft, text: string): ObjectOutcome {
  try {
    return d.registry.add(text);
  } catch (e) {
    if (e instanceof ObjectHintError) throw new CliError(e.message, e.hint);
    if (e instanceof ObjectError) throw new CliError(e.message);
    throw e;
  }
}

/** qemu-nbd's lookup of --tls-creds: it must exist, be TLS credentials, for our endpoint. */
function tlsCredsCheck(objects: ObjectRegistry, id: string, list: boolean): void {
  const obj = objects.get(id);
  const fail = (why: string) => new CliError(`Failed to get TLS creds: ${why}`);
  if (obj === undefined) throw fail(`No TLS credentials with id '${id}'`);
  if (!obj.classes.includes("tls-creds")) {
    throw fail(`Object with id '${id}' is not TLS credentials`);
  }
  const want = list ? "client" : "server";
  if ((obj.value as { endpoint?: string }).endpoint !== want) {
    throw fail(`Expected TLS credentials for a ${want} endpoint`);
  }
}

/**
 * One -T argument, read as qemu-nbd reads it (its events file too). Warnings go to stderr as
 * qemu's warn_report() words them, except in the --fork child, whose parent printed them already.
 */
function traceOption(arg: string): TraceRequest {
  const quiet = forkChild();
  try {
    return parseTraceOption(arg, (msg, where) => {
      if (!quiet) {
        console.error(`${PROGRAM}${where === undefined ? "" : `:${where}`}: warning: ${msg}`);
      }
    });
  } catch (e) {
    if (e instanceof TraceOptionError) throw new CliError(e.message, e.hint, e.location);
    throw e;
  }
}

/** main.ts's --fork child marker (the child parses the same command line again). */
function forkChild(): boolean {
  try {
    return Deno.env.get("DENBD_FORK_CHILD") === "1";
  } catch {
    return false;
  }
}

/**
 * Options denbd parses but does not implement yet, each with the message to print. One row per
 * feature: delete the row when the feature lands.
 */
const NOT_YET: readonly (readonly [used: (o: ServerOptions) => boolean, message: string])[] = [
  [(o) => o.selinuxLabel !== undefined, "--selinux-label is not supported yet"],
];

/** --image-opts keys denbd acts on; any other key is reported as not supported yet. */
const IMAGE_KEYS_DONE: ReadonlySet<string> = new Set([
  "driver",
  "file.driver",
  "file.filename",
  "filename",
  "offset",
  "size",
  // qcow2: replace or drop the backing file named in the image header.
  "backing",
  "backing.driver",
  "backing.file.driver",
  "backing.file.filename",
  // qcow2 encryption (LUKS): the secret that unlocks it, and the expected format.
  "encrypt.key-secret",
  "encrypt.format",
]);

/**
 * One message per option in `o` that denbd accepts on the command line but does not implement
 * yet (empty when everything asked for is implemented). main.ts prints them and exits 1, so no
 * option is silently ignored.
 */
export function unsupportedOptions(o: ServerOptions): string[] {
  const messages = NOT_YET.filter(([used]) => used(o)).map(([, message]) => message);
  // A registered format's own options (luks key-secret...) are the driver's to check.
  const driver = o.image.format === undefined ? undefined : formatDriver(o.image.format);
  const own = driver?.optionKeys ?? [];
  for (const key of Object.keys(o.image.raw)) {
    if (!IMAGE_KEYS_DONE.has(key) && !own.includes(key)) {
      messages.push(`--image-opts option '${key}' is not supported yet`);
    }
  }
  return messages;
}
