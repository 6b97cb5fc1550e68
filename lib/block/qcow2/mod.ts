/**
 * qcow2 format driver (read-only for now): opens an image, its backing chain and external data
 * file through a caller-supplied opener, and exposes it as a {@link BlockDevice} that reads, and
 * reports base:allocation / qemu:allocation-depth, like qemu-nbd 7.2.
 *
 * Modules: `header.ts` (cluster 0), `entry.ts` (L1/L2/compressed decoding), `l2_cache.ts`,
 * `compressed.ts` + `zstd.ts`, `snapshot.ts` (-l), `refcount.ts` (metadata-preallocation
 * heuristic), `image.ts` (the device).
 *
 * @module
 */

import { isAbsolute } from "node:path";
import { hasProtocol } from "../../cli/filename.ts";
import type { FileEngine } from "../../io/file_engine.ts";
import type { ImageFormat } from "../../cli/options.ts";
import { supportedFormats } from "../formats.ts";
import type { SectorCipher } from "../../crypto/cipher.ts";
import type { ObjectLookup } from "../../objects/types.ts";
import { luksPassword } from "../luks/mod.ts";
import { unlockLuks } from "../luks/unlock.ts";
import { type BlockDevice, BlockError, Errno } from "../types.ts";
import {
  AUTOCLEAR_DATA_FILE_RAW,
  hasQcow2Magic,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  MAX_L1_BYTES,
  parseHeader,
  type Qcow2Header,
  validateTable,
} from "./header.ts";
import { Qcow2Device, readZeroPadded } from "./image.ts";
import { loadImageBitmaps } from "./bitmap.ts";
import { RefcountStore } from "./refcount_store.ts";
import { repairDirtyImage } from "./repair.ts";
import {
  MAX_SNAPSHOT_TABLE_BYTES,
  parseSnapshotTable,
  selectSnapshot,
  type SnapshotEntry,
  type SnapshotSelector,
} from "./snapshot.ts";

/**
 * -l failed: qemu-nbd loads the snapshot after opening the image, so the message has its own
 * "Failed to load snapshot: " frame and not blk_new_open's.
 */
export class SnapshotLoadError extends BlockError {
  constructor(errno: number, detail: string) {
    super(errno, `Failed to load snapshot: ${detail}`);
  }
}

export { Qcow2Device } from "./image.ts";
export type { Qcow2Header } from "./header.ts";
export { parseSnapshotOptions, type SnapshotSelector } from "./snapshot.ts";

/** Images above the one being opened, for loop detection and the depth limit. */
export interface BackingChain {
  /** Real paths of the images above, top first. */
  readonly paths: readonly string[];
}

/** Options of {@link openQcow2}. */
export interface Qcow2OpenOptions {
  /**
   * Open a backing file (or external data file) by resolved path and optional format; the caller
   * supplies this so probing/raw drivers stay outside this module. Returns a BlockDevice.
   * When it opens a qcow2 image it should pass `chain` on as {@link Qcow2OpenOptions.chain}, so
   * a backing-file loop is reported instead of recursing.
   */
  openBacking(
    path: string,
    format: ImageFormat | undefined,
    chain: BackingChain,
  ): Promise<BlockDevice>;
  /**
   * -l / --load-snapshot: internal snapshot to export (read-only). An object selects by ID
   * and/or name exactly; a string is qemu-nbd's argument as given (`snapshot.id=..,snapshot.name=..`,
   * or an ID-or-name tried as ID first).
   */
  snapshot?: SnapshotSelector | string;
  /** l2-cache-size in bytes (qemu's default policy if undefined). */
  l2CacheSize?: number;
  /**
   * --discard=unmap: host clusters freed by a discard or an unmapping zero request are punched
   * out of the file once free (qemu's pass-discard-request, on when the export may unmap).
   */
  passDiscard?: boolean;
  /** Set by an `openBacking` implementation when opening a backing image (see there). */
  chain?: BackingChain;
  /**
   * Override of the header's backing file (--image-opts `backing.*`): `null` for no backing
   * file at all (`backing=`), or a file opened in its place.
   */
  backing?: null | { readonly path: string; readonly format: ImageFormat | undefined };
  /** Open for writing (the file must be open read-write). */
  writable?: boolean;
  /** An already open backing device (the -s overlay's image); owned by the device from now. */
  backingDevice?: BlockDevice;
  /** Warnings qemu prints at open (bitmaps invalidated by another program). */
  warn?: (message: string) => void;
  /**
   * The `encrypt.*` options (--image-opts, json:): `key-secret` names the --object secret that
   * unlocks a LUKS-encrypted image, `format` (aes or luks) must match the header's method.
   */
  encrypt?: { readonly keySecret?: string; readonly format?: string };
  /** --object secrets, for `encrypt.key-secret`. */
  objects?: ObjectLookup;
}

/** qcow2 crypt_method values. */
const CRYPT_AES = 1;
const CRYPT_LUKS = 2;

/**
 * The encryption of an image as qemu 7.2's qcow2_open sets it up: `encrypt.format` checked
 * against the header's method, then (LUKS) the full disk encryption header extension checked
 * and the LUKS header inside it unlocked with `encrypt.key-secret`. Legacy AES-CBC (method 1)
 * is refused. Returns the payload cipher, or undefined for an unencrypted image.
 */
async function openEncryption(
  file: FileEngine,
  h: Qcow2Header,
  options: Qcow2OpenOptions,
): Promise<SectorCipher | undefined> {
  const fmt = options.encrypt?.format;
  if (h.cryptMethod === 0) {
    if (fmt !== undefined) {
      throw new BlockError(
        Errno.EINVAL,
        `No encryption in image header, but options specified format '${fmt}'`,
      );
    }
    if (h.cryptoHeader !== undefined) {
      throw new BlockError(
        Errno.EINVAL,
        "CRYPTO header extension only expected with LUKS encryption method",
      );
    }
    return undefined;
  }
  const name = h.cryptMethod === CRYPT_AES ? "aes" : "luks";
  if (fmt !== undefined && fmt !== name) {
    throw new BlockError(
      Errno.EINVAL,
      `Header reported '${name}' encryption format but options specify '${fmt}'`,
    );
  }
  if (h.cryptMethod !== CRYPT_LUKS) {
    if (h.cryptoHeader !== undefined) {
      throw new BlockError(
        Errno.EINVAL,
        "CRYPTO header extension only expected with LUKS encryption method",
      );
    }
    throw new BlockError(
      Errno.ENOTSUP,
      `'${file.path}' is encrypted with legacy AES-CBC (encrypt.format=aes), which denbd does not support; convert it to LUKS encryption with qemu-img convert`,
    );
  }
  const ext = h.cryptoHeader;
  if (ext === undefined) {
    throw new BlockError(Errno.EINVAL, `Missing CRYPTO header for crypt method ${CRYPT_LUKS}`);
  }
  if (ext.extLength !== 16) {
    throw new BlockError(
      Errno.EINVAL,
      `CRYPTO header extension size ${ext.extLength}, but expected size 16`,
    );
  }
  if (ext.offset % h.clusterSize !== 0) {
    throw new BlockError(
      Errno.EINVAL,
      `Encryption header offset '${ext.offset}' is not a multiple of cluster size '${h.clusterSize}'`,
    );
  }
  const own: Record<string, string> = {};
  if (options.encrypt?.keySecret !== undefined) own["key-secret"] = options.encrypt.keySecret;
  const password = luksPassword(own, { objects: options.objects }, "key-secret", "encrypt.");
  const volume = await unlockLuks(async (buf, off) => {
    // qemu reads the LUKS header only inside the extension's region.
    if (off + buf.length > ext.length) {
      throw new BlockError(Errno.EINVAL, "Request for data outside of extension header");
    }
    await readZeroPadded(file, buf, ext.offset + off);
  }, password);
  return volume.cipher;
}

/** Autoclear bit 0: the bitmaps extension is valid. */
const AUTOCLEAR_BITMAPS = 1;
/** Header offset of the autoclear feature bits (v3). */
const HEADER_AUTOCLEAR = 88;

/** qemu's default L2 cache ceiling on Linux (DEFAULT_L2_CACHE_MAX_SIZE). */
const DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024;
/** Longest backing chain accepted (qemu has no limit and exhausts memory on a loop). */
export const MAX_CHAIN_DEPTH = 256;
/** Opens in progress in this process: a backstop when `chain` is not passed along. */
let opening = 0;

/** True when `header` starts with the qcow2 magic (for format probing). */
export function isQcow2(header: Uint8Array): boolean {
  return hasQcow2Magic(header);
}

function realPath(path: string): string {
  try {
    return Deno.realPathSync(path);
  } catch {
    return path;
  }
}

/** Backing name → path: absolute as is, relative to the directory of the image naming it. */
export function resolveBackingPath(imagePath: string, name: string): string {
  if (isAbsolute(name)) return name;
  // qemu's path_combine: the image's directory prefix as written, no normalisation.
  const slash = imagePath.lastIndexOf("/");
  return slash < 0 ? name : imagePath.slice(0, slash + 1) + name;
}

/**
 * Open a qcow2 image read-only. Takes ownership of `file` (closed by the device's close, or here
 * on failure). Errors are BlockErrors with qemu's wording where qemu has one.
 */
export async function openQcow2(file: FileEngine, options: Qcow2OpenOptions): Promise<BlockDevice> {
  const chain = options.chain?.paths ?? [];
  const self = realPath(file.path);
  const opened: BlockDevice[] = [];
  let crypto: SectorCipher | undefined;
  opening++;
  try {
    if (chain.includes(self)) {
      throw new BlockError(
        Errno.EINVAL,
        `Backing file loop detected: '${file.path}' is its own backing file (chain: ${
          [...chain, self].join(" -> ")
        })`,
      );
    }
    if (chain.length >= MAX_CHAIN_DEPTH || opening > 4 * MAX_CHAIN_DEPTH) {
      throw new BlockError(
        Errno.EINVAL,
        `Backing chain of '${file.path}' is deeper than ${MAX_CHAIN_DEPTH} images`,
      );
    }
    const header = await readHeader(file);
    crypto = await openEncryption(file, header, options);
    const snapshots = header.nbSnapshots > 0 ? await readSnapshots(file, header) : [];
    const l1 = await readL1(file, header, snapshots, options.snapshot);

    const below: BackingChain = { paths: [...chain, self] };
    let dataFile: BlockDevice | undefined;
    if (header.dataFile !== undefined) {
      // qemu 7.2 opens a relative data-file name from the current directory, not the image's.
      dataFile = await options.openBacking(header.dataFile, "raw", below);
      opened.push(dataFile);
    }
    // qemu loads every bitmap at open (errors fail the open), before the backing file.
    const bitmaps = await loadImageBitmaps(header, {
      read: (buf, off) => readZeroPadded(file, buf, off),
      warn: options.warn,
    });
    let backing: BlockDevice | undefined;
    if (options.backingDevice !== undefined) {
      backing = options.backingDevice;
    } else if (options.backing === null) {
      // No backing file: unallocated clusters read as zeroes.
    } else if (options.backing !== undefined) {
      backing = await options.openBacking(options.backing.path, options.backing.format, below);
      opened.push(backing);
    } else if (header.backingFile !== undefined && header.backingFile !== "") {
      backing = await openBackingFile(file.path, header, below, options);
      opened.push(backing);
    }

    const { cacheBytes, sliceBytes } = l2CacheGeometry(header, options.l2CacheSize);
    const refs = options.writable ? await openForWriting(file, header) : undefined;
    const device = new Qcow2Device({
      refs,
      file,
      header,
      l1,
      backing,
      dataFile,
      l2CacheBytes: cacheBytes,
      l2SliceBytes: sliceBytes,
      passDiscard: options.passDiscard ?? false,
      crypto,
    });
    crypto = undefined; // the device owns it now
    device.bitmaps = bitmaps;
    // On failure the catch below closes the file and backing files (nothing else is started).
    if (refs !== undefined && (header.incompatible & BigInt(INCOMPAT_DIRTY)) !== 0n) {
      // A crash left lazy refcounts behind: qemu repairs them before writing, so do we.
      const fixed = await repairDirtyImage({ file, header, refs, l1, snapshots, bitmaps });
      options.warn?.(
        `Repaired ${fixed} refcount(s) of '${file.path}', left dirty by lazy refcounts`,
      );
    }
    if (refs !== undefined) await device.markBitmapsInUse();
    return device;
  } catch (e) {
    for (const d of opened) await d.close().catch(() => {});
    crypto?.close();
    file.close();
    throw e;
  } finally {
    opening--;
  }
}

/**
 * Checks that writing `file` is safe and prepares it as qemu does on a read-write open: refuses
 * the corrupt bit (qemu's wording), refuses what this driver cannot yet keep consistent, clears
 * unknown autoclear bits (their meaning would be invalidated by our writes), and loads refcounts.
 */
async function openForWriting(file: FileEngine, h: Qcow2Header): Promise<RefcountStore> {
  if ((h.incompatible & BigInt(INCOMPAT_CORRUPT)) !== 0n) {
    throw new BlockError(Errno.EACCES, "qcow2: Image is corrupt; cannot be opened read/write");
  }
  const refuse = (what: string) => {
    throw new BlockError(
      Errno.ENOTSUP,
      `'${file.path}': writing qcow2 images ${what} is not supported yet (use -r to export it read-only)`,
    );
  };
  if (h.dataFile !== undefined) refuse("with an external data file");
  const known = BigInt(AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW);
  if (h.version === 3 && (h.autoclear & ~known) !== 0n) {
    const buf = new Uint8Array(8);
    new DataView(buf.buffer).setBigUint64(0, h.autoclear & known);
    await file.pwrite(buf, HEADER_AUTOCLEAR);
    await file.sync();
  }
  return await RefcountStore.open({
    file,
    clusterSize: h.clusterSize,
    refcountOrder: h.refcountOrder,
    tableOffset: h.refcountTableOffset,
    tableClusters: h.refcountTableClusters,
  });
}

async function openBackingFile(
  imagePath: string,
  header: Qcow2Header,
  below: BackingChain,
  options: Qcow2OpenOptions,
): Promise<BlockDevice> {
  const name = header.backingFile!;
  const fmt = header.backingFormat as ImageFormat | undefined;
  if (fmt !== undefined && !supportedFormats().includes(fmt)) {
    throw new BlockError(
      Errno.ENOTSUP,
      `Backing file '${name}' of '${imagePath}' has format '${fmt}', which is not supported`,
    );
  }
  // A protocol name (nbd://, http://, json:{...}) is opened as it is, like qemu does.
  if (hasProtocol(name)) return await options.openBacking(name, fmt, below);
  const path = resolveBackingPath(imagePath, name);
  if (below.paths.includes(realPath(path))) {
    throw new BlockError(
      Errno.EINVAL,
      `Backing file loop detected: '${imagePath}' has backing file '${name}', which is above it in the chain`,
    );
  }
  return await options.openBacking(path, fmt, below);
}

async function readHeader(file: FileEngine): Promise<Qcow2Header> {
  const head = new Uint8Array(512);
  await readZeroPadded(file, head, 0);
  if (!hasQcow2Magic(head)) throw new BlockError(Errno.EINVAL, "Image is not in qcow2 format");
  const bits = new DataView(head.buffer).getUint32(20);
  if (bits < 9 || bits > 21) {
    throw new BlockError(Errno.EINVAL, `Unsupported cluster size: 2^${bits}`);
  }
  const cluster0 = new Uint8Array(1 << bits);
  await readZeroPadded(file, cluster0, 0);
  return parseHeader(cluster0);
}

async function readSnapshots(file: FileEngine, h: Qcow2Header): Promise<SnapshotEntry[]> {
  // Grow the buffer until the table fits (entries are variable-length), capped like qemu.
  let size = Math.min(64 * 1024, MAX_SNAPSHOT_TABLE_BYTES);
  for (;;) {
    const buf = new Uint8Array(size);
    await readZeroPadded(file, buf, h.snapshotsOffset);
    const complete = size >= MAX_SNAPSHOT_TABLE_BYTES;
    const entries = parseSnapshotTable(buf, h.nbSnapshots, complete);
    if (entries !== undefined) return entries;
    size = Math.min(size * 4, MAX_SNAPSHOT_TABLE_BYTES);
  }
}

async function readL1(
  file: FileEngine,
  h: Qcow2Header,
  snapshots: readonly SnapshotEntry[],
  sel: SnapshotSelector | string | undefined,
): Promise<Uint32Array> {
  let offset = h.l1TableOffset;
  let entries = h.l1Size;
  if (sel !== undefined) {
    const i = selectSnapshot(snapshots, sel);
    if (i < 0) throw new SnapshotLoadError(Errno.ENOENT, "Can't find snapshot");
    const sn = snapshots[i]!;
    try {
      validateTable(
        sn.l1TableOffset,
        sn.l1Size,
        8,
        MAX_L1_BYTES,
        h.clusterSize,
        "Snapshot L1 table",
      );
    } catch (e) {
      throw new SnapshotLoadError((e as BlockError).errno, (e as Error).message);
    }
    offset = sn.l1TableOffset;
    entries = sn.l1Size;
  }
  const bytes = new Uint8Array(entries * 8);
  await readZeroPadded(file, bytes, offset);
  const view = new DataView(bytes.buffer);
  const words = new Uint32Array(entries * 2);
  for (let i = 0; i < words.length; i++) words[i] = view.getUint32(i * 4);
  return words;
}

/**
 * qemu's `read_cache_sizes` default: enough to map the whole disk, at most 32 MiB; 4 KiB slices
 * when that does not cover the whole disk, whole tables otherwise.
 */
export function l2CacheGeometry(
  h: Qcow2Header,
  requested: number | undefined,
): { cacheBytes: number; sliceBytes: number } {
  const entryBytes = h.extendedL2 ? 16 : 8;
  const clusters = Math.ceil(h.size / h.clusterSize);
  const whole = Math.ceil((clusters * entryBytes) / h.clusterSize) * h.clusterSize;
  const cacheBytes = requested ?? Math.min(whole, DEFAULT_L2_CACHE_MAX);
  const sliceBytes = cacheBytes < whole ? Math.min(h.clusterSize, 4096) : h.clusterSize;
  return { cacheBytes, sliceBytes };
}
