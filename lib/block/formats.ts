/**
 * The registry of image format drivers other than raw and qcow2 (which keep their own paths for
 * their extra options: offset/size, snapshots, bitmaps, the temporary overlay). Each driver lives
 * in its own folder (`lib/block/vdi/`, ...) and exports one {@link FormatDriver}; stack.ts and
 * open_node.ts open every registered format the same way, over a plain file or any protocol,
 * as the top image or as a backing file.
 *
 * Probing is qemu's bdrv_probe_all: every driver scores the first {@link PROBE_BYTES} bytes (and
 * the file name), the highest score wins, raw scores 1.
 *
 * @module
 */

import type { FileEngine } from "../io/file_engine.ts";
import type { ImageFormat } from "../cli/options.ts";
import type { ObjectLookup } from "../objects/types.ts";
import type { BackingChain } from "./qcow2/mod.ts";
import { hasQcow2Magic } from "./qcow2/header.ts";
import type { BlockDevice } from "./types.ts";
import { qedFormat } from "./qed/mod.ts";
import { vdiFormat } from "./vdi/mod.ts";
import { vmdkFormat } from "./vmdk/mod.ts";
import { vhdxFormat } from "./vhdx/mod.ts";
import { luksFormat } from "./luks/mod.ts";
import { bochsFormat } from "./bochs/mod.ts";
import { cloopFormat } from "./cloop/mod.ts";
import { dmgFormat } from "./dmg/mod.ts";
import { parallelsFormat } from "./parallels/mod.ts";
import { qcowFormat } from "./qcow/mod.ts";
import { vpcFormat } from "./vpc/mod.ts";

/** Bytes qemu's probe reads (BLOCK_PROBE_BUF_SIZE; past the end of the file they are zeroes). */
export const PROBE_BYTES = 2048;

/** What a format driver gets besides its file. */
export interface FormatContext {
  /** Open for writing (the file is open read-write). */
  readonly writable: boolean;
  /**
   * The file is a plain host file read through the page cache (not a protocol, no O_DIRECT),
   * so the driver may offer BlockDevice.fileRange/writeRange for data stored as-is in it.
   */
  readonly zeroCopy?: boolean;
  /**
   * The file is open with O_DIRECT (--cache=none|directsync): no zero-copy reads or writes
   * through the page cache (BlockDevice.fileRange/writeRange) over it.
   */
  readonly direct?: boolean;
  /**
   * The format node's own options (`--image-opts`, `json:`), without `driver`, `file` and
   * `file.*`: e.g. `key-secret` for luks. Only keys listed in {@link FormatDriver.optionKeys}
   * get here; the opener refuses others as qemu does.
   */
  readonly options: Readonly<Record<string, string>>;
  /** qemu-style warnings on stderr. */
  readonly warn: (msg: string) => void;
  /** Images above this one (real paths, top first): for backing-file loop detection. */
  readonly chain: BackingChain;
  /**
   * Opens a backing (parent) image read-only by name: absolute, or already resolved against
   * this image's directory by the driver (qcow2/mod.ts resolveBackingPath); a protocol name
   * (nbd://, json:) as it is. `format` undefined probes. Pass `{ paths: [...chain, self] }`.
   */
  readonly openBacking: (
    path: string,
    format: ImageFormat | undefined,
    chain: BackingChain,
  ) => Promise<BlockDevice>;
  /** Opens another plain file of the image (vmdk extents), with the export's file engine. */
  readonly openFile: (path: string, writable: boolean) => FileEngine;
  /** --object secrets (luks key-secret), when the command line created any. */
  readonly objects?: ObjectLookup;
}

/** One image format. */
export interface FormatDriver {
  /** qemu's driver name (`-f NAME`, `driver=NAME`). */
  readonly name: ImageFormat;
  /**
   * qemu's probe score for a file whose first bytes are `head` and whose name is `filename`
   * (qemu's dmg looks at it; "" when there is none): 0 when it is not this format, 100 for a
   * magic number. `head.length` is qemu's buf_size: {@link PROBE_BYTES} when opening (zeroes
   * past the end of the file), 512 when raw's block-0 guard checks a write.
   */
  probe(head: Uint8Array, filename: string): number;
  /**
   * Opens the image over `file`, which the driver owns from here on: closed by the device's
   * close, or here when opening fails. Errors are BlockErrors with qemu's wording.
   */
  open(file: FileEngine, ctx: FormatContext): Promise<BlockDevice>;
  /** Option keys the driver accepts in `FormatContext.options` (for the command line check). */
  readonly optionKeys?: readonly string[];
}

/** Registered drivers, in the order qemu registers them (ties in probing go to the first). */
const DRIVERS: readonly FormatDriver[] = [
  vdiFormat,
  vmdkFormat,
  vhdxFormat,
  qedFormat,
  luksFormat,
  cloopFormat,
  bochsFormat,
  dmgFormat,
  parallelsFormat,
  qcowFormat,
  vpcFormat,
];

const BY_NAME: ReadonlyMap<string, FormatDriver> = new Map(DRIVERS.map((d) => [d.name, d]));

/** The registered driver named `name` (not raw or qcow2). */
export function formatDriver(name: string): FormatDriver | undefined {
  return BY_NAME.get(name);
}

/** Every format denbd opens: raw, qcow2 and the registered ones. */
export function supportedFormats(): readonly ImageFormat[] {
  return ["raw", "qcow2", ...DRIVERS.map((d) => d.name)];
}

/** The format qemu's bdrv_probe_all finds in `head` (see {@link FormatDriver.probe}). */
export function probeFormat(head: Uint8Array, filename: string): ImageFormat {
  let best: ImageFormat = "raw";
  let score = 1;
  // qcow2_probe: the magic and version 2 or later (version 1 is the qcow driver's).
  if (
    head.length >= 8 && hasQcow2Magic(head) &&
    new DataView(head.buffer, head.byteOffset).getUint32(4) >= 2
  ) {
    best = "qcow2";
    score = 100;
  }
  for (const d of DRIVERS) {
    const s = d.probe(head, filename);
    if (s > score) {
      best = d.name;
      score = s;
    }
  }
  return best;
}
