/**
 * Builds the block-layer stack for an export from the parsed options. This is the one place
 * where layers are composed; top to bottom:
 *
 * ```
 * read-only ─▶ detect-zeroes ─▶ cache mode ─▶ discard policy ─▶ FUA emulation
 *           ─▶ block-0 guard (probed raw) ─▶ raw (offset/size) ─▶ file engine
 *           ─▶ offset (-o) ─▶ qcow2 ─▶ file engine (+ backing chain)
 *           ─▶ offset (-o) ─▶ vdi, vmdk, ... (formats.ts) ─▶ file engine (+ backing chain)
 * ```
 *
 * @module
 */

import type { ImageFormat, ServerOptions } from "../cli/options.ts";
import type { FileEngine } from "../io/file_engine.ts";
import { openFileEngine } from "../io/engine_factory.ts";
import { UnsafeCacheFilter, WriteThroughFilter } from "./filters/cache_mode.ts";
import { DetectZeroesFilter } from "./filters/detect_zeroes.ts";
import { DiscardIgnoreFilter } from "./filters/discard.ts";
import { FuaEmulationFilter } from "./filters/fua.ts";
import { ProbeGuardFilter } from "./filters/probe_guard.ts";
import { ReadOnlyFilter } from "./filters/read_only.ts";
import { RawDevice } from "./raw.ts";
import { type BlockDevice, BlockError, Errno } from "./types.ts";
import { type BackingChain, openQcow2, SnapshotLoadError } from "./qcow2/mod.ts";
import { OffsetFilter } from "./filters/offset.ts";
import { withPrefetchCopy } from "./filters/copy_on_read.ts";
import { createTempOverlay } from "./qcow2/create.ts";
import { formatDriver, supportedFormats } from "./formats.ts";
import type { ObjectLookup } from "../objects/types.ts";
import {
  type EngineOptions,
  type NodeContext,
  openRegisteredFormat,
  openTopNode,
  probedRawWarning,
  probeFileFormat,
} from "./open_node.ts";
import { hasProtocol } from "../cli/filename.ts";
import { denbd_engine_fallback } from "../trace/events.ts";

/** What the stack builder hands back. */
export interface OpenedImage {
  readonly device: BlockDevice;
  readonly format: ImageFormat;
  /** True when the format was guessed (qemu warns and restricts block 0). */
  readonly probed: boolean;
}

/**
 * --cache and --aio as file-engine options; a fallback from io_uring to threads is said once
 * through -T's denbd_engine_fallback (qemu-nbd's -v prints nothing of the kind).
 * --aio=native without --cache=none|directsync fails each file's open, as in qemu-nbd (the
 * engine factory refuses it once the file is open).
 */
function reportEngineFallback(msg: string): void {
  if (denbd_engine_fallback.on) denbd_engine_fallback.emit(msg);
}

function engineOptions(options: ServerOptions): EngineOptions {
  return {
    direct: options.cache === "none" || options.cache === "directsync",
    aio: options.aio,
    log: reportEngineFallback,
  };
}

/** Open the image named in the options and build the filter stack over it. */
export async function openExportStack(
  options: ServerOptions,
  warn: (msg: string) => void,
  objects?: ObjectLookup,
): Promise<OpenedImage> {
  const engine = engineOptions(options);
  try {
    const opened = await openImage(options, engine, warn, objects);
    if (!options.snapshot) {
      return { ...opened, device: applyFilters(opened.device, options) };
    }
    const overlay = await openSnapshotOverlay(opened.device, engine);
    return { ...opened, probed: false, device: applyFilters(overlay, options) };
  } catch (e) {
    throw openError(e, options.image.source ?? options.image.filename);
  }
}

/**
 * qemu-nbd reports what fails inside blk_new_open as "Failed to blk_new_open 'FILE': ...";
 * loading the -l snapshot comes after it and keeps its own wording.
 */
function openError(e: unknown, source: string): unknown {
  if (!(e instanceof Error) || e instanceof SnapshotLoadError) return e;
  const msg = `Failed to blk_new_open '${source}': ${e.message}`;
  return e instanceof BlockError ? new BlockError(e.errno, msg) : new Error(msg);
}

/** An image given as qemu node options (json:, protocols, filters): open_node.ts opens it. */
async function openNodeImage(
  options: ServerOptions,
  node: Readonly<Record<string, string>>,
  engine: EngineOptions,
  warn: (msg: string) => void,
  objects: ObjectLookup | undefined,
): Promise<OpenedImage> {
  const image = options.image;
  const opened = await openTopNode({ ...node }, {
    ...nodeContext(!options.readOnly && !options.snapshot, engine, warn, objects),
    passDiscard: options.discard === "unmap",
    loadSnapshot: options.loadSnapshot,
  });
  let device = opened.format === "qcow2" ? withPrefetchCopy(opened.device) : opened.device;
  if (image.offset !== 0) device = new OffsetFilter(device, image.offset, undefined);
  return {
    device,
    format: opened.format === "protocol" || opened.format === "filter" ? "raw" : opened.format,
    probed: opened.probed,
  };
}

/**
 * -s/--snapshot as qemu-nbd does it: a temporary qcow2 (default options, the image's size) in
 * qemu's temp directory, unlinked at once, on top of the image opened read-only; flushes of it
 * are no-ops (qemu's cache.no-flush), and everything written is gone when the server exits.
 */
async function openSnapshotOverlay(
  base: BlockDevice,
  engine: EngineOptions,
): Promise<BlockDevice> {
  let file: FileEngine;
  try {
    const path = await createTempOverlay({ size: base.size });
    try {
      // A temporary file whose flushes are ignored: it always goes through the page cache
      // (so not through Linux AIO, which needs O_DIRECT: --aio=native uses the default there).
      const aio = engine.aio === "native" ? "auto" : engine.aio;
      file = openFileEngine(path, { ...engine, aio, writable: true, direct: false });
    } finally {
      await Deno.remove(path).catch(() => {});
    }
  } catch (e) {
    await base.close().catch(() => {});
    throw e;
  }
  const overlay = await openQcow2(file, {
    openBacking: () => Promise.reject(new BlockError(Errno.EINVAL, "overlay has no backing name")),
    backingDevice: base,
    writable: true,
  }).catch(async (e) => {
    await base.close().catch(() => {});
    throw e;
  });
  return new UnsafeCacheFilter(withPrefetchCopy(overlay));
}

/** The image with its format driver and offset, before the option-driven filters. */
async function openImage(
  options: ServerOptions,
  engine: EngineOptions,
  warn: (msg: string) => void,
  objects: ObjectLookup | undefined,
): Promise<OpenedImage> {
  const image = options.image;
  if (image.node !== undefined) {
    return await openNodeImage(options, image.node, engine, warn, objects);
  }
  // With -s the image itself is only read; writes go to the overlay.
  const writable = !options.readOnly && !options.snapshot;
  const file = openFileEngine(image.filename, { ...engine, writable });
  let format: ImageFormat;
  try {
    format = image.format ?? await probeFileFormat(file);
  } catch (e) {
    file.close();
    throw e;
  }
  const probed = image.format === undefined;
  if (format === "qcow2") {
    // openQcow2 owns the file from here on (it closes it if opening fails).
    let dev = await openQcow2(file, {
      openBacking: (path, fmt, chain) => openBackingImage(path, fmt, chain, engine, warn, objects),
      snapshot: options.loadSnapshot,
      warn,
      backing: backingOverride(image.raw, warn),
      writable,
      passDiscard: options.discard === "unmap",
      encrypt: { keySecret: image.raw["encrypt.key-secret"], format: image.raw["encrypt.format"] },
      objects,
    });
    dev = withPrefetchCopy(dev);
    if (image.offset !== 0 || image.size !== undefined) {
      dev = new OffsetFilter(dev, image.offset, image.size);
    }
    return { device: dev, format, probed: false };
  }
  if (formatDriver(format) !== undefined) {
    if (image.raw["offset"] !== undefined || image.raw["size"] !== undefined) {
      // Probing found another format under raw's offset=/size= (qemu refuses them then).
      file.close();
      const key = image.raw["offset"] !== undefined ? "offset" : "size";
      throw new BlockError(
        Errno.EINVAL,
        `Block format '${format}' does not support the option '${key}'`,
      );
    }
    // The driver owns the file from here on (it closes it if opening fails).
    let dev = await openRegisteredFormat(format, file, formatOwnOptions(image.raw), {
      writable,
      plainFile: true,
      warn,
      engine,
      openBacking: (path, fmt, chain) => openBackingImage(path, fmt, chain, engine, warn, objects),
      objects,
      loadSnapshot: options.loadSnapshot,
    });
    if (image.offset !== 0 || image.size !== undefined) {
      dev = new OffsetFilter(dev, image.offset, image.size);
    }
    return { device: dev, format, probed: false };
  }
  try {
    // qemu warns only when it will write the image itself (neither -r nor -s).
    if (probed && writable) {
      warn(probedRawWarning(image.filename));
    }
    let dev: BlockDevice = new RawDevice(file, {
      writable,
      offset: image.offset,
      size: image.size,
      // What qemu reports: 512 for probed raw (block-0 protection), else 1 -- also under
      // O_DIRECT, whose alignment the engine handles internally as qemu's block layer does.
      minBlock: probed ? 512 : 1,
      zeroCopy: !engine.direct,
    });
    if (probed && writable) dev = new ProbeGuardFilter(dev);
    return { device: dev, format, probed };
  } catch (e) {
    file.close();
    throw e;
  }
}

/** The --image-opts keys of the format node itself (not driver=, file.*, offset=, size=). */
function formatOwnOptions(raw: Readonly<Record<string, string>>): Record<string, string> {
  const own: Record<string, string> = {};
  for (const [k, v] of Object.entries(raw)) {
    if (k === "driver" || k === "file" || k.startsWith("file.") || k === "filename") continue;
    if (k === "offset" || k === "size") continue;
    own[k] = v;
  }
  return own;
}

/**
 * --image-opts `backing.*` as qemu reads them: `backing=` (empty) drops the backing file (qemu
 * warns that the empty string is deprecated); `backing.file.filename=` with an optional
 * `backing.driver=` opens that file instead; any other `backing=` value names a block node,
 * which a standalone server does not have.
 */
function backingOverride(
  raw: Readonly<Record<string, string>>,
  warn: (msg: string) => void,
): null | { path: string; format: ImageFormat | undefined } | undefined {
  if ("backing" in raw) {
    const ref = raw["backing"]!;
    if (ref !== "") {
      throw new BlockError(
        Errno.EINVAL,
        `Could not open backing file: Cannot find device='${ref}' nor node-name='${ref}'`,
      );
    }
    warn(`warning: Use of "backing": "" is deprecated; use "backing": null instead`);
    return null;
  }
  const path = raw["backing.file.filename"];
  if (path === undefined) {
    if (Object.keys(raw).some((k) => k.startsWith("backing."))) {
      throw new BlockError(
        Errno.EINVAL,
        "backing.file.filename is required to replace the backing file",
      );
    }
    return undefined;
  }
  const driver = raw["backing.driver"];
  if (driver !== undefined && !supportedFormats().includes(driver as ImageFormat)) {
    throw new BlockError(
      Errno.ENOTSUP,
      `Backing driver '${driver}' is not supported (${supportedFormats().join(", ")})`,
    );
  }
  const fileDriver = raw["backing.file.driver"];
  if (fileDriver !== undefined && fileDriver !== "file") {
    throw new BlockError(Errno.ENOTSUP, `Backing protocol '${fileDriver}' is not supported (file)`);
  }
  return { path, format: driver as ImageFormat | undefined };
}

/** How the node opener opens images of this export (backing files through openBackingImage). */
function nodeContext(
  writable: boolean,
  engine: EngineOptions,
  warn: (msg: string) => void,
  objects: ObjectLookup | undefined,
): NodeContext {
  return {
    writable,
    engine,
    warn,
    passDiscard: false,
    openBacking: (path, fmt, chain) => openBackingImage(path, fmt, chain, engine, warn, objects),
    objects,
  };
}

/**
 * Open a backing file (or external data file) read-only: the format given by the image, else
 * probed. Every image of a chain goes through here, so qcow2 backing files get their own chain.
 */
async function openBackingImage(
  path: string,
  format: ImageFormat | undefined,
  chain: BackingChain,
  engine: EngineOptions,
  warn: (msg: string) => void,
  objects: ObjectLookup | undefined,
): Promise<BlockDevice> {
  if (hasProtocol(path)) {
    // A backing file named by protocol (nbd://, http://, json:{...}): the node opener's job.
    const name: Record<string, string> = format === undefined
      ? { filename: path }
      : { driver: format, filename: path };
    const opened = await openTopNode(name, nodeContext(false, engine, warn, objects));
    return opened.device;
  }
  const file = openFileEngine(path, { ...engine, writable: false });
  let fmt: ImageFormat;
  try {
    fmt = format ?? await probeFileFormat(file);
  } catch (e) {
    file.close();
    throw e;
  }
  if (fmt === "qcow2") {
    return await openQcow2(file, {
      openBacking: (p, f, c) => openBackingImage(p, f, c, engine, warn, objects),
      chain,
      warn,
    });
  }
  if (formatDriver(fmt) !== undefined) {
    return await openRegisteredFormat(fmt, file, {}, {
      writable: false,
      plainFile: true,
      warn,
      engine,
      openBacking: (p, f, c) => openBackingImage(p, f, c, engine, warn, objects),
      objects,
      chain,
    });
  }
  try {
    return new RawDevice(file, { writable: false, offset: 0, size: undefined, minBlock: 1 });
  } catch (e) {
    file.close();
    throw e;
  }
}

/** The option-driven filters, in their documented order (bottom first). */
function applyFilters(driver: BlockDevice, options: ServerOptions): BlockDevice {
  let dev: BlockDevice = new FuaEmulationFilter(driver);
  if (options.discard === "ignore") dev = new DiscardIgnoreFilter(dev);
  if (options.cache === "writethrough" || options.cache === "directsync") {
    dev = new WriteThroughFilter(dev);
  }
  if (options.cache === "unsafe") dev = new UnsafeCacheFilter(dev);
  if (options.detectZeroes !== "off") {
    dev = new DetectZeroesFilter(dev, options.detectZeroes === "unmap");
  }
  if (options.readOnly) dev = new ReadOnlyFilter(dev);
  return dev;
}
