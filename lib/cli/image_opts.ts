/**
 * qemu's `key=value,key=value` option syntax (QemuOpts) and the image description it yields for
 * `--image-opts` (and, without it, for FILE plus `-f`).
 *
 * @module
 */

import { CliError } from "./errors.ts";
import { type NumberError, parseSize } from "./numbers.ts";
import type { ImageFormat, ImageSpec } from "./options.ts";
import { hasProtocol } from "./filename.ts";
import { supportedFormats } from "../block/formats.ts";

/** One parsed `key=value` pair; `flag` marks qemu's short form ("foo" = on, "nofoo" = off). */
export interface QemuOptPair {
  readonly key: string;
  readonly value: string;
  readonly flag: boolean;
}

/** Reads one value up to a single ','; ",," stands for a literal comma. Returns [value, next]. */
function readValue(text: string, at: number): [string, number] {
  let value = "";
  let i = at;
  while (i < text.length) {
    const ch = text[i] as string;
    if (ch === ",") {
      if (text[i + 1] !== ",") break;
      i++; // ",," → ","
    }
    value += ch;
    i++;
  }
  return [value, i];
}

/**
 * Splits a qemu option string. `impliedKey` names a first element written without "key=" (qemu's
 * implied option name, "file" for --image-opts); without it such an element is a boolean flag.
 * Keys cannot contain ',' or '='; values use ",," for a comma.
 */
export function parseQemuOpts(text: string, impliedKey?: string): QemuOptPair[] {
  const pairs: QemuOptPair[] = [];
  let i = 0;
  let first = true;
  while (i < text.length) {
    let nameEnd = i;
    while (nameEnd < text.length && text[nameEnd] !== "=" && text[nameEnd] !== ",") nameEnd++;
    if (text[nameEnd] === "=") {
      const [value, next] = readValue(text, nameEnd + 1);
      pairs.push({ key: text.slice(i, nameEnd), value, flag: false });
      i = next;
    } else if (first && impliedKey !== undefined) {
      const [value, next] = readValue(text, i);
      pairs.push({ key: impliedKey, value, flag: false });
      i = next;
    } else {
      const name = text.slice(i, nameEnd);
      pairs.push(
        name.startsWith("no")
          ? { key: name.slice(2), value: "off", flag: true }
          : { key: name, value: "on", flag: true },
      );
      i = nameEnd;
    }
    if (text[i] === ",") i++;
    first = false;
  }
  return pairs;
}

/** Formats denbd opens itself. */
const SUPPORTED_FORMATS: ReadonlySet<string> = new Set(supportedFormats());

/**
 * Block drivers qemu-nbd 7.2 knows (Debian build, `qemu-img --help`) besides raw and qcow2:
 * naming one denbd does not open gets "not supported", anything else qemu's "Unknown driver".
 */
export const QEMU_DRIVERS: ReadonlySet<string> = new Set([
  "blkdebug",
  "blklogwrites",
  "blkverify",
  "bochs",
  "cloop",
  "compress",
  "copy-before-write",
  "copy-on-read",
  "dmg",
  "file",
  "ftp",
  "ftps",
  "gluster",
  "host_cdrom",
  "host_device",
  "http",
  "https",
  "iscsi",
  "iser",
  "luks",
  "nbd",
  "nfs",
  "null-aio",
  "null-co",
  "nvme",
  "parallels",
  "preallocate",
  "qcow",
  "qed",
  "quorum",
  "rbd",
  "replication",
  "snapshot-access",
  "ssh",
  "throttle",
  "vdi",
  "vhdx",
  "vmdk",
  "vpc",
  "vvfat",
]);

/** Rejects a driver/format name denbd cannot open, with wording a qemu user recognises. */
function checkDriver(name: string, what: string): ImageFormat {
  if (SUPPORTED_FORMATS.has(name)) return name as ImageFormat;
  if (QEMU_DRIVERS.has(name)) {
    throw new CliError(
      `${what} '${name}' is not supported by denbd (only ${supportedFormats().join(", ")})`,
    );
  }
  throw new CliError(`Unknown driver '${name}'`);
}

/** A size option of the raw driver, as qemu's option parser reads it. */
function sizeOption(raw: Readonly<Record<string, string>>, key: string): number | undefined {
  const text = raw[key];
  if (text === undefined) return undefined;
  const v: bigint | NumberError = parseSize(text);
  if (v === "range") throw new CliError(`Value '${text}' is out of range for parameter '${key}'`);
  if (v === "invalid") {
    throw new CliError(
      `Parameter '${key}' expects a non-negative number below 2^64`,
      "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
        "and exabytes, respectively.",
    );
  }
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CliError(`Parameter '${key}' value '${text}' is larger than denbd supports (2^53-1)`);
  }
  return Number(v);
}

/** The sector size qemu's raw driver requires `size=` to be a multiple of. */
const RAW_SIZE_ALIGN = 512;

/**
 * Turns an `--image-opts` FILE into an {@linkcode ImageSpec}. All pairs land in `raw` (the last of
 * repeated keys wins, as in qemu). Understood: `driver` (raw, qcow2; `file` = the plain file,
 * exported like raw), `file.driver` (file), `file.filename`, `filename` (with driver=file), and
 * for raw `offset`/`size` in qemu's size syntax. Other keys stay in `raw` for
 * `unsupportedOptions` to report.
 */
export function parseImageOpts(text: string): ImageSpec {
  const raw: Record<string, string> = {};
  for (const p of parseQemuOpts(text, "file")) {
    if (p.key === "") throw new CliError(`Invalid parameter '' in --image-opts '${text}'`);
    raw[p.key] = p.value;
  }
  if (needsNodeOpener(raw)) return nodeImage(text, raw);
  const driver = raw["driver"];
  if (raw["file"] !== undefined) {
    // qemu takes a plain "file=" as the name of an existing block node, which qemu-nbd never has.
    const node = raw["file"];
    throw new CliError(`Cannot find device='${node}' nor node-name='${node}'`);
  }
  if (driver === "file") {
    // The protocol driver on its own: the file's bytes as they are, i.e. a raw export.
    const filename = raw["filename"];
    if (filename === undefined) {
      throw new CliError("The 'file' block driver requires a file name");
    }
    for (const key of ["offset", "size"]) {
      if (raw[key] !== undefined) {
        throw new CliError(`Block protocol 'file' doesn't support the option '${key}'`);
      }
    }
    return Object.freeze({
      filename,
      format: "raw",
      offset: 0,
      size: undefined,
      raw: Object.freeze(raw),
    });
  }
  if (driver === undefined && raw["file.filename"] === undefined) {
    throw new CliError("Must specify either driver or file");
  }
  const format = driver === undefined ? undefined : checkDriver(driver, "Block format");
  const protocol = raw["file.driver"];
  if (protocol !== undefined && protocol !== "file") {
    checkDriver(protocol, "Block protocol");
    throw new CliError(`Block protocol '${protocol}' is not supported by denbd (only file)`);
  }
  const filename = raw["file.filename"];
  if (filename === undefined) {
    throw new CliError(`A block device must be specified for "file"`);
  }
  if (format !== undefined && format !== "raw") {
    for (const key of ["offset", "size"]) {
      if (raw[key] !== undefined) {
        throw new CliError(`Block format '${format}' does not support the option '${key}'`);
      }
    }
  }
  // Without driver= qemu probes first and only a raw result accepts offset=/size=: the caller
  // must reject them when probing finds qcow2 (raw["offset"] / raw["size"] tell it they were set).
  const offset = sizeOption(raw, "offset") ?? 0;
  const size = sizeOption(raw, "size");
  if (size !== undefined && size % RAW_SIZE_ALIGN !== 0) {
    throw new CliError(`Specified size is not multiple of ${RAW_SIZE_ALIGN}`);
  }
  return Object.freeze({ filename, format, offset, size, raw: Object.freeze(raw) });
}

/** Drivers that only the generic node opener (lib/block/open_node.ts) handles. */
const NODE_DRIVERS: ReadonlySet<string> = new Set([
  "null-co",
  "null-aio",
  "nbd",
  "http",
  "https",
  "rbd",
  "compress",
  "copy-on-read",
]);

/** A name that is more than a plain path: `json:` or a protocol prefix other than none. */
function specialName(name: string | undefined): boolean {
  return name !== undefined && (name.startsWith("json:") || hasProtocol(name));
}

/** Options that go beyond a plain file under raw/qcow2. */
function needsNodeOpener(raw: Readonly<Record<string, string>>): boolean {
  const driver = raw["driver"];
  const proto = raw["file.driver"];
  return (driver !== undefined && NODE_DRIVERS.has(driver)) ||
    (proto !== undefined && NODE_DRIVERS.has(proto)) ||
    specialName(raw["filename"]) || specialName(raw["file.filename"]);
}

/** An image the node opener opens from qemu's flat options. */
function nodeImage(source: string, node: Readonly<Record<string, string>>): ImageSpec {
  return Object.freeze({
    filename: source,
    format: undefined,
    offset: 0,
    size: undefined,
    raw: Object.freeze({}),
    node: Object.freeze({ ...node }),
    source,
  });
}

/** FILE without --image-opts: `-f` checked against what denbd opens; undefined means probe. */
export function plainImage(filename: string, format: string | undefined): ImageSpec {
  if (specialName(filename)) {
    if (format !== undefined && format !== "file") checkDriver(format, "Image format");
    return nodeImage(
      filename,
      format === undefined || format === "file" ? { filename } : { driver: format, filename },
    );
  }
  return Object.freeze({
    filename,
    // "-f file" opens the protocol driver alone: the file's bytes, exported like raw.
    format: format === undefined
      ? undefined
      : format === "file"
      ? "raw"
      : checkDriver(format, "Image format"),
    offset: 0,
    size: undefined,
    raw: Object.freeze({}),
  });
}
