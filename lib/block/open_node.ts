/**
 * Opens a block node from qemu's flat option dictionary (what `json:{...}`, `--image-opts` and a
 * `PROTOCOL:` filename all become), the way qemu's bdrv_open reads it: a format driver (raw,
 * qcow2, vdi) over its `file` child, a protocol driver (file, null-co, null-aio, nbd, http,
 * https) on its own, or a filter (compress, copy-on-read) over its `file` child. Without
 * `driver`, the protocol comes from the filename and the format is probed over it.
 *
 * Plain files keep their fast path (FileEngine under RawDevice/qcow2/vdi); other protocols are
 * BlockDevices, seen as a file by qcow2 and vdi through DeviceFile.
 *
 * @module
 */

import {
  filenameProtocol,
  JSON_NULL,
  type NodeOptions,
  ownOptions,
  parseJsonFilename,
  subOptions,
} from "../cli/filename.ts";
import { parseSize } from "../cli/numbers.ts";
import { QEMU_DRIVERS } from "../cli/image_opts.ts";
import type { FileEngine, OpenOptions } from "../io/file_engine.ts";
import { openFileEngine } from "../io/engine_factory.ts";
import { OffsetFilter } from "./filters/offset.ts";
import { ProbeGuardFilter } from "./filters/probe_guard.ts";
import { DeviceFile } from "./protocols/device_file.ts";
import { NullDevice } from "./protocols/null.ts";
import { openNbdProtocol } from "./protocols/nbd.ts";
import { parseNbdFilename } from "./protocols/nbd_filename.ts";
import { openHttpProtocol } from "./protocols/http.ts";
import { parseHttpFilename } from "./protocols/http_filename.ts";
import { openRbdProtocol } from "./protocols/rbd.ts";
import { parseRbdFilename } from "./protocols/rbd_filename.ts";
import { CompressFilter } from "./filters/compress.ts";
import { CopyOnReadFilter } from "./filters/copy_on_read.ts";
import { type BackingChain, openQcow2, SnapshotLoadError } from "./qcow2/mod.ts";
import { RawDevice } from "./raw.ts";
import { formatDriver, PROBE_BYTES, probeFormat, supportedFormats } from "./formats.ts";
import type { ImageFormat } from "../cli/options.ts";
import type { ObjectLookup } from "../objects/types.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  type FileRange,
  Filter,
} from "./types.ts";

/** How every file of the export is opened (image, backing files, overlay): the engine. */
export type EngineOptions = Pick<OpenOptions, "direct" | "aio" | "log">;

/** What opening needs besides the options. */
export interface NodeContext {
  readonly writable: boolean;
  readonly engine: EngineOptions;
  readonly warn: (msg: string) => void;
  /** --discard=unmap (qcow2 punches freed clusters). */
  readonly passDiscard: boolean;
  /** -l, for the top qcow2 node. */
  readonly loadSnapshot?: string;
  /** Opens a backing file by name (stack.ts: backing names may use protocols too). */
  readonly openBacking: (
    path: string,
    format: ImageFormat | undefined,
    chain: BackingChain,
  ) => Promise<BlockDevice>;
  /** --object objects (secrets for encrypted formats). */
  readonly objects?: ObjectLookup;
}

/** An opened node. */
export interface OpenedNode {
  readonly device: BlockDevice;
  readonly format: ImageFormat | "protocol" | "filter";
  /** The format was guessed (qemu warns and guards block 0). */
  readonly probed: boolean;
}

const FORMATS: ReadonlySet<string> = new Set(supportedFormats());
const PROTOCOLS: ReadonlySet<string> = new Set([
  "file",
  "null-co",
  "null-aio",
  "nbd",
  "http",
  "https",
  "rbd",
]);
/** qemu's `file` driver options that denbd does not act on yet: refused, never ignored. */
const FILE_OPTIONS_NOT_YET = [
  "aio",
  "aio-max-batch",
  "locking",
  "pr-manager",
  "cache.direct",
  "cache.no-flush",
  "x-check-cache-dropped",
  "drop-cache",
];

/** Filename prefixes that name a protocol driver by another name (qemu's protocol_name list). */
const PROTOCOL_PREFIXES: Readonly<Record<string, string>> = {
  "nbd+tcp": "nbd",
  "nbd+unix": "nbd",
};
const FILTERS: ReadonlySet<string> = new Set(["compress", "copy-on-read"]);
/** qemu 7.2's drivers (Debian build) this opener does not handle: "not supported", not "Unknown". */
const QEMU_ONLY: ReadonlySet<string> = new Set(
  [...QEMU_DRIVERS].filter((d) => !PROTOCOLS.has(d) && !FILTERS.has(d) && !FORMATS.has(d)),
);

function unknownDriver(name: string): BlockError {
  if (QEMU_ONLY.has(name)) {
    return new BlockError(Errno.ENOTSUP, `Driver '${name}' is not supported by denbd yet`);
  }
  return new BlockError(Errno.EINVAL, `Unknown driver '${name}'`);
}

/** `json:` in a filename: its options, with those given beside it taking precedence. */
function expandJson(opts: NodeOptions): NodeOptions {
  const name = opts["filename"];
  if (name === undefined || !name.startsWith("json:")) return opts;
  const rest = { ...opts };
  delete rest["filename"];
  return { ...parseJsonFilename(name), ...rest };
}

/** The top node of an export. */
export async function openTopNode(opts: NodeOptions, ctx: NodeContext): Promise<OpenedNode> {
  return await openNode(expandJson(opts), ctx, true);
}

async function openNode(opts: NodeOptions, ctx: NodeContext, top: boolean): Promise<OpenedNode> {
  const driver = opts["driver"];
  if (driver !== undefined && FILTERS.has(driver)) return await openFilter(driver, opts, ctx);
  if (driver !== undefined && PROTOCOLS.has(driver)) {
    const proto = await openProtocol(opts, ctx);
    return { device: protocolAsDevice(proto, ctx), format: "protocol", probed: false };
  }
  if (driver !== undefined && !FORMATS.has(driver)) throw unknownDriver(driver);
  // A format (given or probed) over its file child.
  const own = ownOptions(opts, ["file"]);
  let child = subOptions(opts, "file.");
  if (own["filename"] !== undefined && own["file"] === undefined) {
    if (Object.keys(child).length > 0) {
      throw new BlockError(Errno.EINVAL, "Cannot specify both 'filename' and 'file.*' options");
    }
    child = { filename: own["filename"] };
    delete own["filename"];
  }
  requireChild(own, child);
  const proto = await openProtocol(expandJson(child), ctx);
  try {
    return await openFormat(driver as ImageFormat | undefined, own, proto, ctx, top);
  } catch (e) {
    closeProtocol(proto);
    throw e;
  }
}

/**
 * A filter driver over its `file` child. The child is a format when it names one (`driver`),
 * else a protocol node: qemu does not probe below a filter.
 */
async function openFilter(
  driver: string,
  opts: NodeOptions,
  ctx: NodeContext,
): Promise<OpenedNode> {
  const own = ownOptions(opts, ["file"]);
  const child = subOptions(opts, "file.");
  const known = driver === "copy-on-read" ? ["driver", "bottom", "file"] : ["driver", "file"];
  for (const k of Object.keys(own)) {
    if (!known.includes(k)) {
      throw new BlockError(
        Errno.EINVAL,
        `Block format '${driver}' does not support the option '${k}'`,
      );
    }
  }
  requireChild(own, child);
  const childDriver = child["driver"];
  const below = childDriver !== undefined && (FORMATS.has(childDriver) || FILTERS.has(childDriver))
    ? await openNode(child, ctx, true)
    : {
      device: protocolAsDevice(await openProtocol(expandJson(child), ctx), ctx),
      format: "protocol" as const,
      probed: false,
    };
  try {
    if (driver === "compress") {
      const name = below.format === "protocol" ? (childDriver ?? "file") : below.format;
      return { device: new CompressFilter(below.device, name), format: "filter", probed: false };
    }
    // copy-on-read
    if (own["bottom"] !== undefined) {
      // Node names do not exist in a standalone server, so no bottom node can be found.
      throw new BlockError(Errno.EINVAL, `Bottom node '${own["bottom"]}' not found`);
    }
    if (!ctx.writable) throw new BlockError(Errno.EPERM, "Block node is read-only");
    const cs = (below.device as { clusterSize?: number }).clusterSize;
    if (cs === undefined || below.device.allocationDepth === undefined) {
      // No backing chain below (raw, a protocol): every read is already in the top image.
      return { device: below.device, format: "filter", probed: false };
    }
    return {
      device: new CopyOnReadFilter(below.device, { clusterSize: cs }),
      format: "filter",
      probed: false,
    };
  } catch (e) {
    await below.device.close().catch(() => {});
    throw e;
  }
}

/**
 * The `file` child of a format or filter node: qemu's refusals for a node reference
 * (`file=NAME`) and for a missing child.
 */
function requireChild(own: NodeOptions, child: NodeOptions): void {
  const ref = own["file"];
  if (ref !== undefined) {
    throw new BlockError(Errno.EINVAL, `Cannot find device='${ref}' nor node-name='${ref}'`);
  }
  if (Object.keys(child).length === 0) {
    throw new BlockError(Errno.EINVAL, `A block device must be specified for "file"`);
  }
}

/** A protocol node: a plain file (fast path) or another block device. */
type Protocol =
  | { readonly kind: "file"; readonly file: FileEngine }
  | { readonly kind: "device"; readonly dev: BlockDevice; readonly name: string };

function closeProtocol(p: Protocol): void {
  if (p.kind === "file") p.file.close();
  else void p.dev.close().catch(() => {});
}

function protocolAsDevice(p: Protocol, ctx: NodeContext): BlockDevice {
  if (p.kind === "device") return p.dev;
  try {
    return new RawDevice(p.file, {
      writable: ctx.writable,
      offset: 0,
      size: undefined,
      minBlock: 1,
    });
  } catch (e) {
    p.file.close();
    throw e;
  }
}

function rejectUnknownKeys(driver: string, opts: NodeOptions, known: readonly string[]): void {
  for (const k of Object.keys(opts)) {
    if (!known.includes(k)) {
      throw new BlockError(
        Errno.EINVAL,
        `Block protocol '${driver}' doesn't support the option '${k}'`,
      );
    }
  }
}

function sizeOpt(opts: NodeOptions, key: string, fallback: number): number {
  const text = opts[key];
  if (text === undefined) return fallback;
  const v = parseSize(text);
  if (typeof v !== "bigint") {
    throw new BlockError(
      Errno.EINVAL,
      `Parameter '${key}' expects a non-negative number below 2^64`,
    );
  }
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError(Errno.EINVAL, `Value '${text}' is out of range for parameter '${key}'`);
  }
  return Number(v);
}

function boolOpt(opts: NodeOptions, key: string, fallback: boolean): boolean {
  const text = opts[key];
  if (text === undefined) return fallback;
  if (text === "on" || text === "true" || text === "yes") return true;
  if (text === "off" || text === "false" || text === "no") return false;
  throw new BlockError(
    Errno.EINVAL,
    `Parameter '${key}' expects 'on' or 'off'`,
  );
}

async function openProtocol(opts: NodeOptions, ctx: NodeContext): Promise<Protocol> {
  const filename = opts["filename"];
  const prefix = filename === undefined ? undefined : filenameProtocol(filename);
  const named = prefix === undefined ? undefined : (PROTOCOL_PREFIXES[prefix] ?? prefix);
  const driver = opts["driver"] ?? named ?? "file";
  if (opts["driver"] === undefined && named !== undefined && !PROTOCOLS.has(named)) {
    throw new BlockError(Errno.EINVAL, `Unknown protocol '${named}'`);
  }
  if (FORMATS.has(driver) || FILTERS.has(driver)) {
    // qemu allows a format as a child (raw over qcow2...): not needed by qemu-nbd users yet.
    throw new BlockError(
      Errno.ENOTSUP,
      `A '${driver}' node under another format is not supported yet`,
    );
  }
  if (!PROTOCOLS.has(driver)) throw unknownDriver(driver);
  switch (driver) {
    case "file": {
      for (const k of FILE_OPTIONS_NOT_YET) {
        if (opts[k] !== undefined) {
          throw new BlockError(
            Errno.ENOTSUP,
            `Option '${k}' of the 'file' driver is not supported yet`,
          );
        }
      }
      rejectUnknownKeys("file", opts, ["driver", "filename"]);
      if (filename === undefined) {
        throw new BlockError(Errno.EINVAL, "The 'file' block driver requires a file name");
      }
      const path = filename.startsWith("file:") ? filename.slice(5) : filename;
      return {
        kind: "file",
        file: openFileEngine(path, { ...ctx.engine, writable: ctx.writable }),
      };
    }
    case "null-co":
    case "null-aio": {
      if (filename !== undefined && filename !== `${driver}://`) {
        throw new BlockError(
          Errno.EINVAL,
          `The only allowed filename for this driver is '${driver}://'`,
        );
      }
      rejectUnknownKeys(driver, opts, ["driver", "filename", "size", "latency-ns", "read-zeroes"]);
      const dev = new NullDevice({
        size: sizeOpt(opts, "size", 1 << 30),
        latencyNs: sizeOpt(opts, "latency-ns", 0),
        readZeroes: boolOpt(opts, "read-zeroes", false),
        writable: ctx.writable,
      });
      return { kind: "device", dev, name: filename ?? `${driver}://` };
    }
    case "nbd": {
      const own = { ...opts };
      delete own["driver"];
      delete own["filename"];
      const fromName = filename === undefined ? {} : parseNbdFilename(filename);
      for (const k of Object.keys(own)) {
        if (k in fromName) {
          // qemu refuses a filename together with explicit server options this way.
          throw new BlockError(Errno.EINVAL, "No valid URL specified");
        }
      }
      const dev = await openNbdProtocol({ ...fromName, ...own }, {
        writable: ctx.writable,
        warn: ctx.warn,
      });
      return { kind: "device", dev, name: nbdNodeName({ ...fromName, ...own }) };
    }
    case "http":
    case "https": {
      const own = { ...opts };
      delete own["driver"];
      delete own["filename"];
      const fromName = filename === undefined ? {} : parseHttpFilename(filename);
      const dev = await openHttpProtocol({ ...fromName, ...own }, {
        writable: ctx.writable,
        warn: ctx.warn,
        driver,
      });
      return { kind: "device", dev, name: filename ?? own["url"] ?? driver };
    }
    case "rbd": {
      const own = { ...opts };
      delete own["driver"];
      delete own["filename"];
      // qemu's bdrv_parse_filename: what the filename says overrides the other options.
      const fromName = filename === undefined ? {} : parseRbdFilename(filename);
      const dev = await openRbdProtocol({ ...own, ...fromName }, {
        writable: ctx.writable,
        warn: ctx.warn,
        noCache: ctx.engine.direct === true,
      });
      return { kind: "device", dev, name: filename ?? `rbd:${own["pool"]}/${own["image"]}` };
    }
    default:
      throw new BlockError(
        Errno.ENOTSUP,
        `Block protocol '${driver}' is not supported by denbd yet`,
      );
  }
}

/**
 * The name qemu gives an nbd node (nbd_refresh_filename), which its messages show: rebuilt from
 * the options, whatever form the filename had ("nbd:unix:/s" → "nbd+unix://?socket=/s").
 */
function nbdNodeName(o: NodeOptions): string {
  const exp = o["export"] !== undefined && o["export"] !== "" ? o["export"] : undefined;
  const type = o["server.type"] ?? (o["path"] !== undefined ? "unix" : "inet");
  if (type === "unix") {
    const path = o["server.path"] ?? o["path"] ?? "";
    return exp === undefined ? `nbd+unix://?socket=${path}` : `nbd+unix:///${exp}?socket=${path}`;
  }
  const host = o["server.host"] ?? o["host"] ?? "";
  const port = o["server.port"] ?? o["port"] ?? "10809";
  return exp === undefined ? `nbd://${host}:${port}` : `nbd://${host}:${port}/${exp}`;
}

/** Raises the minimum block size (probed raw images: qemu guards whole sectors). */
class MinBlockFilter extends Filter {
  readonly #caps: Capabilities;
  constructor(next: BlockDevice, minBlock: number) {
    super(next);
    this.#caps = { ...next.caps, minBlock: Math.max(minBlock, next.caps.minBlock) };
  }
  override get caps(): Capabilities {
    return this.#caps;
  }
}

/** The format of an open file, from its first bytes, as qemu probes. */
export async function probeFileFormat(file: FileEngine): Promise<ImageFormat> {
  if (file.length() === 0) return "raw";
  const head = new Uint8Array(PROBE_BYTES);
  const n = await file.pread(head, 0);
  head.fill(0, n);
  return probeFormat(head, file.path);
}

async function probe(proto: Protocol): Promise<ImageFormat> {
  if (proto.kind === "file") return await probeFileFormat(proto.file);
  const head = new Uint8Array(PROBE_BYTES);
  const n = Math.min(proto.dev.size, PROBE_BYTES);
  if (n === 0) return "raw";
  await proto.dev.pread(head.subarray(0, n), 0);
  return probeFormat(head, proto.name);
}

/** -l on a format without internal snapshots: qemu opens the image, then cannot load one. */
export function snapshotUnsupported(format: string): SnapshotLoadError {
  return new SnapshotLoadError(
    Errno.ENOTSUP,
    `Block format '${format}' used by device '' does not support temporarily loading internal snapshots`,
  );
}

/**
 * Opens a registered format (formats.ts) over `file` as the top image or a backing file:
 * its own options checked against what the driver takes, -l refused after opening.
 */
export async function openRegisteredFormat(
  format: ImageFormat,
  file: FileEngine,
  own: Readonly<Record<string, string>>,
  ctx: {
    writable: boolean;
    /** A plain file without O_DIRECT (FormatContext.zeroCopy). */
    plainFile: boolean;
    warn: (msg: string) => void;
    engine: EngineOptions;
    openBacking: NodeContext["openBacking"];
    objects?: ObjectLookup;
    chain?: BackingChain;
    loadSnapshot?: string;
  },
): Promise<BlockDevice> {
  const driver = formatDriver(format)!;
  const keys = driver.optionKeys ?? [];
  for (const key of Object.keys(own)) {
    if (!keys.includes(key)) {
      file.close();
      throw new BlockError(
        Errno.EINVAL,
        `Block format '${format}' does not support the option '${key}'`,
      );
    }
  }
  const device = await driver.open(file, {
    writable: ctx.writable,
    zeroCopy: ctx.plainFile && !ctx.engine.direct,
    direct: ctx.engine.direct === true,
    options: own,
    warn: ctx.warn,
    chain: ctx.chain ?? { paths: [] },
    openBacking: ctx.openBacking,
    openFile: (path, writable) => openFileEngine(path, { ...ctx.engine, writable }),
    objects: ctx.objects,
  });
  if (ctx.loadSnapshot !== undefined) {
    await device.close();
    throw snapshotUnsupported(format);
  }
  // Page-cache and sendfile shortcuts need a plain file without O_DIRECT, whatever the driver
  // offers.
  const zeroCopy = ctx.plainFile && !ctx.engine.direct;
  if (!zeroCopy && (device.fileRange !== undefined || device.writeRange !== undefined)) {
    return new NoZeroCopyFilter(device);
  }
  return device;
}

/** Hides a device's fileRange/writeRange (its file is not read through the page cache). */
class NoZeroCopyFilter extends Filter {
  override fileRange(): FileRange | undefined {
    return undefined;
  }
  override writeRange(): FileRange | undefined {
    return undefined;
  }
  /** Drivers' cluster size, for the copy-on-read filter above. */
  get clusterSize(): number | undefined {
    return (this.next as { clusterSize?: number }).clusterSize;
  }
}

/** qemu's warning for a probed raw image it will write (not under -r or -s). */
export function probedRawWarning(name: string): string {
  return `WARNING: Image format was not specified for '${name}' and probing guessed raw.\n` +
    "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
    "         Specify the 'raw' format explicitly to remove the restrictions.";
}

function protocolName(proto: Protocol): string {
  return proto.kind === "file" ? proto.file.path : proto.name;
}

async function openFormat(
  driver: ImageFormat | undefined,
  own: NodeOptions,
  proto: Protocol,
  ctx: NodeContext,
  top: boolean,
): Promise<OpenedNode> {
  const format = driver ?? await probe(proto);
  const probed = driver === undefined;
  if (format !== "raw") {
    for (const key of ["offset", "size"]) {
      if (own[key] !== undefined) {
        throw new BlockError(
          Errno.EINVAL,
          `Block format '${format}' does not support the option '${key}'`,
        );
      }
    }
  }
  if (formatDriver(format) !== undefined) {
    const file = proto.kind === "file" ? proto.file : new DeviceFile(proto.dev, proto.name);
    const rest = { ...own };
    delete rest["driver"];
    const device = await openRegisteredFormat(format, file, rest, {
      ...ctx,
      plainFile: proto.kind === "file",
      loadSnapshot: top ? ctx.loadSnapshot : undefined,
    });
    return { device, format, probed: false };
  }
  if (format === "qcow2") {
    const file = proto.kind === "file" ? proto.file : new DeviceFile(proto.dev, proto.name);
    const device = await openQcow2(file, {
      openBacking: ctx.openBacking,
      snapshot: top ? ctx.loadSnapshot : undefined,
      warn: ctx.warn,
      backing: own["backing"] === JSON_NULL ? null : undefined,
      writable: ctx.writable,
      passDiscard: ctx.passDiscard,
      encrypt: { keySecret: own["encrypt.key-secret"], format: own["encrypt.format"] },
      objects: ctx.objects,
    });
    return { device, format, probed: false };
  }
  // qemu warns only when it will write the image itself (neither -r nor -s).
  if (probed && ctx.writable) ctx.warn(probedRawWarning(protocolName(proto)));
  const offset = sizeOpt(own, "offset", 0);
  const size = own["size"] === undefined ? undefined : sizeOpt(own, "size", 0);
  if (size !== undefined && size % 512 !== 0) {
    throw new BlockError(Errno.EINVAL, "Specified size is not multiple of 512");
  }
  let dev: BlockDevice;
  if (proto.kind === "file") {
    dev = new RawDevice(proto.file, {
      writable: ctx.writable,
      offset,
      size,
      minBlock: probed ? 512 : 1,
    });
  } else {
    if (offset > proto.dev.size) {
      throw new BlockError(
        Errno.EINVAL,
        `Offset (${offset}) cannot be greater than size of the containing file (${proto.dev.size})`,
      );
    }
    dev = offset !== 0 || size !== undefined
      ? new OffsetFilter(proto.dev, offset, size)
      : proto.dev;
    if (probed) dev = new MinBlockFilter(dev, 512);
  }
  if (probed && ctx.writable) dev = new ProbeGuardFilter(dev);
  return { device: dev, format: "raw", probed };
}
