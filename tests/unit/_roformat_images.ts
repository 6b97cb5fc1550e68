/**
 * Encoders of small dmg, cloop and bochs images for the tests (qemu-img creates none of these
 * formats). Written from the format descriptions, independent of the drivers in lib/block/:
 * every image they make is checked against qemu-nbd 7.2 in tests/interop/roformats_test.ts.
 *
 * @module
 */

import { deflateSync } from "node:zlib";

/** A deterministic byte pattern with zero runs, so images are neither empty nor random. */
export function sourceBytes(size: number, seed: number): Uint8Array {
  const out = new Uint8Array(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i += 512) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const kind = x >>> 29; // 0..7
    if (kind < 2) continue; // zero sector
    const base = x & 0xff;
    const end = Math.min(size, i + 512);
    for (let j = i; j < end; j++) out[j] = kind < 5 ? base : (base + j * 7 + (j >> 9)) & 0xff;
  }
  return out;
}

function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

// ---- bzip2 (libbz2's compressor, for dmg UDBZ chunks) ----

let bz2: { compress(src: Uint8Array): Uint8Array } | undefined;

/** bzip2-compresses `src` with libbz2 (block size 9). */
export function bzip2(src: Uint8Array): Uint8Array {
  if (bz2 === undefined) {
    const lib = Deno.dlopen(
      "libbz2.so.1.0",
      {
        // int BZ2_bzBuffToBuffCompress(char *dest, unsigned int *destLen, char *source,
        //                              unsigned int sourceLen, int blockSize100k, int verbosity,
        //                              int workFactor)
        BZ2_bzBuffToBuffCompress: {
          parameters: ["buffer", "buffer", "buffer", "u32", "i32", "i32", "i32"],
          result: "i32",
        },
      } as const,
    );
    bz2 = {
      compress(s: Uint8Array): Uint8Array {
        const out = new Uint8Array(Math.ceil(s.length * 1.02) + 600);
        const len = new Uint32Array([out.length]);
        const rc = lib.symbols.BZ2_bzBuffToBuffCompress(out, len, s, s.length, 9, 0, 0);
        if (rc !== 0) throw new Error(`BZ2_bzBuffToBuffCompress: ${rc}`);
        return out.slice(0, len[0]);
      },
    };
  }
  return bz2.compress(src);
}

// ---- dmg ----

export type DmgChunkKind =
  | "zero"
  | "raw"
  | "ignore"
  | "zlib"
  | "bzip2"
  | "lzfse"
  | "adc"
  | "comment";

const DMG_TYPES: Record<DmgChunkKind, number> = {
  zero: 0,
  raw: 1,
  ignore: 2,
  adc: 0x80000004,
  zlib: 0x80000005,
  bzip2: 0x80000006,
  lzfse: 0x80000007,
  comment: 0x7ffffffe,
};

export interface DmgChunkSpec {
  readonly kind: DmgChunkKind;
  /** Sectors of the disk the chunk covers. */
  readonly sectors: number;
  /** Bytes stored instead of the encoding of the chunk's sectors (damaged images). */
  readonly stored?: Uint8Array;
  /** Sector count written in the entry instead of `sectors` (damaged images). */
  readonly declaredSectors?: number | bigint;
  /** Length written in the entry instead of the stored length (damaged images). */
  readonly declaredLength?: number | bigint;
  /** Skip this many sectors before the chunk (a gap no chunk covers). */
  readonly gapBefore?: number;
}

export interface DmgOptions {
  /** Where the mish blocks go: base64 in an XML plist (default) or a resource fork. */
  readonly container?: "xml" | "rsrc";
  /** Split the chunks over this many mish blocks (default 1). */
  readonly mishBlocks?: number;
  /** Bytes of padding before the data fork (its offset in the trailer). */
  readonly dataForkOffset?: number;
  /** Trailer sector count instead of the chunks' total. */
  readonly totalSectors?: number | bigint;
  /** Edits the trailer before it is written (damaged images). */
  readonly trailerPatch?: (koly: DataView) => void;
}

function mishBlock(
  entries: { type: number; sector: bigint; count: bigint; offset: bigint; length: bigint }[],
  firstSector: bigint,
  sectorCount: bigint,
  dataOffset: bigint,
): Uint8Array {
  const b = new Uint8Array(204 + 40 * entries.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, 0x6d697368); // "mish"
  v.setUint32(4, 1);
  v.setBigUint64(8, firstSector);
  v.setBigUint64(16, sectorCount);
  v.setBigUint64(24, dataOffset);
  v.setUint32(32, 0x208); // buffers needed
  v.setUint32(36, 0);
  v.setUint32(64, 2); // checksum type CRC32 (value left 0: qemu does not check it)
  v.setUint32(68, 32);
  v.setUint32(200, entries.length);
  entries.forEach((e, i) => {
    const at = 204 + 40 * i;
    v.setUint32(at, e.type >>> 0);
    v.setBigUint64(at + 8, e.sector);
    v.setBigUint64(at + 16, e.count);
    v.setBigUint64(at + 24, e.offset);
    v.setBigUint64(at + 32, e.length);
  });
  return b;
}

function base64(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) {
    s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

/**
 * A UDIF image of `src` (a whole number of sectors) cut into `chunks` in order, each encoded
 * as its kind says (zero and ignore chunks store nothing; lzfse, adc and comment chunks store
 * the raw bytes, which qemu never reads).
 */
export function makeDmg(
  src: Uint8Array,
  chunks: readonly DmgChunkSpec[],
  opts: DmgOptions = {},
): Uint8Array {
  const pad = opts.dataForkOffset ?? 0;
  const data: Uint8Array[] = [new Uint8Array(pad)];
  let dataLength = 0;
  let sector = 0;
  const all: { type: number; sector: bigint; count: bigint; offset: bigint; length: bigint }[] = [];
  for (const c of chunks) {
    sector += c.gapBefore ?? 0;
    const bytes = src.subarray(sector * 512, (sector + c.sectors) * 512);
    if (bytes.length !== c.sectors * 512) throw new Error("makeDmg: chunks run past the source");
    let stored: Uint8Array;
    if (c.stored !== undefined) stored = c.stored;
    else if (c.kind === "zero" || c.kind === "ignore") stored = new Uint8Array(0);
    else if (c.kind === "zlib") stored = deflateSync(bytes);
    else if (c.kind === "bzip2") stored = bzip2(bytes);
    else stored = bytes;
    all.push({
      type: DMG_TYPES[c.kind],
      sector: BigInt(sector),
      count: BigInt(c.declaredSectors ?? c.sectors),
      offset: BigInt(dataLength),
      length: BigInt(c.declaredLength ?? stored.length),
    });
    data.push(stored);
    dataLength += stored.length;
    sector += c.sectors;
  }
  const total = BigInt(opts.totalSectors ?? sector);
  // Split into mish blocks: each block's sectors and offsets relative to its first entry.
  const nBlocks = Math.max(1, opts.mishBlocks ?? 1);
  const per = Math.ceil(all.length / nBlocks);
  const mishes: Uint8Array[] = [];
  for (let i = 0; i < all.length || mishes.length === 0; i += per) {
    const part = all.slice(i, i + per);
    const first = part[0]?.sector ?? 0n;
    const base = part[0]?.offset ?? 0n;
    const rel = part.map((e) => ({ ...e, sector: e.sector - first, offset: e.offset - base }));
    const last = i + per >= all.length;
    if (last) {
      rel.push({ type: 0xffffffff, sector: total - first, count: 0n, offset: 0n, length: 0n });
    }
    mishes.push(mishBlock(rel, first, total - first, base));
    if (part.length === 0) break;
  }
  const fork = concat(data);
  const parts: Uint8Array[] = [fork];
  let rsrc = { at: 0, length: 0 };
  let xml = { at: 0, length: 0 };
  const enc = new TextEncoder();
  if ((opts.container ?? "xml") === "xml") {
    const items = mishes.map((m, i) =>
      `\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n` +
      `\t\t\t\t<key>CFName</key>\n\t\t\t\t<string>part ${i}</string>\n` +
      `\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n` +
      (base64(m).match(/.{1,52}/g) ?? []).map((l) => `\t\t\t\t${l}\n`).join("") +
      `\t\t\t\t</data>\n\t\t\t</dict>\n`
    ).join("");
    const text = `<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0">\n<dict>\n` +
      `\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n${items}` +
      `\t\t</array>\n\t</dict>\n</dict>\n</plist>\n`;
    const b = enc.encode(text);
    xml = { at: fork.length, length: b.length };
    parts.push(b);
  } else {
    // Resource fork: a 256-byte header (data offset, map offset, data length, map length),
    // then the resource data: each resource a u32 length and its bytes. No map (qemu skips it).
    const body = concat(mishes.flatMap((m) => {
      const len = new Uint8Array(4);
      new DataView(len.buffer).setUint32(0, m.length);
      return [len, m];
    }));
    const head = new Uint8Array(256);
    const hv = new DataView(head.buffer);
    hv.setUint32(0, 256);
    hv.setUint32(4, 256 + body.length);
    hv.setUint32(8, body.length);
    hv.setUint32(12, 0);
    rsrc = { at: fork.length, length: 256 + body.length };
    parts.push(head, body);
  }
  const koly = new Uint8Array(512);
  const k = new DataView(koly.buffer);
  k.setUint32(0, 0x6b6f6c79); // "koly"
  k.setUint32(4, 4);
  k.setUint32(8, 512);
  k.setUint32(12, 1);
  k.setBigUint64(0x18, BigInt(pad));
  k.setBigUint64(0x20, BigInt(dataLength));
  k.setBigUint64(0x28, BigInt(rsrc.at));
  k.setBigUint64(0x30, BigInt(rsrc.length));
  k.setBigUint64(0xd8, BigInt(xml.at));
  k.setBigUint64(0xe0, BigInt(xml.length));
  k.setUint32(0x1e8, 1); // image variant
  k.setBigUint64(0x1ec, total);
  opts.trailerPatch?.(k);
  parts.push(koly);
  return concat(parts);
}

// ---- cloop ----

const CLOOP_SCRIPT = "#!/bin/sh\n#V2.0 Format\n" +
  "modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

export interface CloopOptions {
  /** Replace the block size, block count or offsets written (damaged images). */
  readonly blockSize?: number;
  readonly blocks?: number;
  readonly patchOffsets?: (offsets: bigint[]) => void;
  /** Replace a block's stored bytes. */
  readonly stored?: Readonly<Record<number, Uint8Array>>;
}

/** A cloop V2.0 image of `src` (padded with zeroes to whole blocks of `blockSize`). */
export function makeCloop(src: Uint8Array, blockSize: number, opts: CloopOptions = {}): Uint8Array {
  const blocks = Math.ceil(src.length / blockSize);
  const head = new Uint8Array(128 + 8);
  head.set(new TextEncoder().encode(CLOOP_SCRIPT));
  const hv = new DataView(head.buffer);
  hv.setUint32(128, opts.blockSize ?? blockSize);
  hv.setUint32(132, opts.blocks ?? blocks);
  const bodies: Uint8Array[] = [];
  for (let i = 0; i < blocks; i++) {
    const b = new Uint8Array(blockSize);
    b.set(src.subarray(i * blockSize, (i + 1) * blockSize));
    bodies.push(opts.stored?.[i] ?? deflateSync(b, { level: 9 }));
  }
  const offsets: bigint[] = [];
  let at = BigInt(head.length + (blocks + 1) * 8);
  for (const b of bodies) {
    offsets.push(at);
    at += BigInt(b.length);
  }
  offsets.push(at);
  opts.patchOffsets?.(offsets);
  const table = new Uint8Array(offsets.length * 8);
  const tv = new DataView(table.buffer);
  offsets.forEach((o, i) => tv.setBigUint64(i * 8, BigInt.asUintN(64, o)));
  return concat([head, table, ...bodies]);
}

// ---- bochs ----

export interface BochsOptions {
  readonly extentSize: number;
  /** Bitmap bytes per extent (default: one bit per sector, at least 1). */
  readonly bitmapSize?: number;
  /** Version 1 puts the disk size 4 bytes earlier. */
  readonly version?: 1 | 2;
  /** Extra catalog entries beyond what the disk needs. */
  readonly extraCatalog?: number;
  /**
   * Which sectors are stored (bit set): default every nonzero sector. Extents with no stored
   * sector stay unallocated. Allocated extents go into the file in reverse order, so the
   * catalog is not the identity.
   */
  readonly stored?: (sector: number) => boolean;
  readonly patch?: (header: DataView) => void;
}

/** A growing redolog image of `src` (its size rounded down to sectors is the disk size). */
export function makeBochs(src: Uint8Array, opts: BochsOptions): Uint8Array {
  const es = opts.extentSize;
  const spe = es / 512;
  const diskSectors = Math.floor(src.length / 512);
  const extents = Math.ceil(diskSectors / spe);
  const catalogN = extents + (opts.extraCatalog ?? 0);
  const bitmapSize = opts.bitmapSize ?? Math.max(1, Math.ceil(spe / 8));
  const bitmapBytes = Math.ceil(bitmapSize / 512) * 512;
  const stored = opts.stored ?? ((s: number) => {
    for (let j = s * 512; j < (s + 1) * 512; j++) if (src[j] !== 0) return true;
    return false;
  });
  const header = new Uint8Array(512);
  const enc = new TextEncoder();
  header.set(enc.encode("Bochs Virtual HD Image"), 0);
  header.set(enc.encode("Redolog"), 32);
  header.set(enc.encode("Growing"), 48);
  const hv = new DataView(header.buffer);
  const v1 = opts.version === 1;
  hv.setUint32(64, v1 ? 0x00010000 : 0x00020000, true);
  hv.setUint32(68, 512, true);
  hv.setUint32(72, catalogN, true);
  hv.setUint32(76, bitmapSize, true);
  hv.setUint32(80, es, true);
  hv.setBigUint64(v1 ? 84 : 88, BigInt(src.length), true);
  opts.patch?.(hv);
  const catalog = new Uint8Array(catalogN * 4);
  const cv = new DataView(catalog.buffer);
  for (let i = 0; i < catalogN; i++) cv.setUint32(i * 4, 0xffffffff, true);
  const used: number[] = [];
  for (let e = 0; e < extents; e++) {
    for (let s = e * spe; s < Math.min(diskSectors, (e + 1) * spe); s++) {
      if (stored(s)) {
        used.push(e);
        break;
      }
    }
  }
  const bodies: Uint8Array[] = [];
  used.reverse().forEach((e, index) => {
    cv.setUint32(e * 4, index, true);
    const body = new Uint8Array(bitmapBytes + es);
    for (let k = 0; k < spe; k++) {
      const s = e * spe + k;
      if (s >= diskSectors || !stored(s)) continue;
      body[k >> 3]! |= 1 << (k & 7);
      body.set(src.subarray(s * 512, (s + 1) * 512), bitmapBytes + k * 512);
    }
    bodies.push(body);
  });
  return concat([header, catalog, ...bodies]);
}
