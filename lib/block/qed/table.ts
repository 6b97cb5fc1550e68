/**
 * QED tables (the L1 table and the L2 tables): `table_size` clusters of little-endian 64-bit
 * offsets, kept as the bytes read from the file so a changed entry is written back as the
 * 512-byte sectors that hold it (qemu writes table updates in whole sectors too), and a small
 * LRU cache of L2 tables bounded in bytes.
 *
 * An entry is 0 (unallocated: read the backing file), 1 (a zero cluster, for L2 entries) or a
 * byte offset in the image file. Entries past 2^53 cannot be a real offset; they read as
 * {@link HUGE_OFFSET}, which every range check refuses.
 *
 * @module
 */

/** Stands for any entry too large for a JS number (never a valid offset). */
export const HUGE_OFFSET = Number.MAX_SAFE_INTEGER;
/** The L2 entry of a zero cluster. */
export const QED_ZERO_CLUSTER = 1;
const SECTOR = 512;
const PER_SECTOR = SECTOR / 8;
const TWO32 = 0x100000000;

export class QedTable {
  readonly bytes: Uint8Array;
  /** Entries in the table. */
  readonly length: number;
  readonly #view: DataView;

  constructor(bytes: Uint8Array) {
    this.bytes = bytes;
    this.length = bytes.length >>> 3;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get(i: number): number {
    const hi = this.#view.getUint32(i * 8 + 4, true);
    if (hi >= 0x200000) return HUGE_OFFSET;
    return hi * TWO32 + this.#view.getUint32(i * 8, true);
  }

  set(i: number, value: number): void {
    this.#view.setUint32(i * 8, value % TWO32, true);
    this.#view.setUint32(i * 8 + 4, Math.floor(value / TWO32), true);
  }

  /**
   * The whole sectors holding entries `[index, index+n)`: their byte offset in the table and
   * their bytes (a view: encode before the next change if it is written asynchronously).
   */
  sectors(index: number, n: number): { offset: number; bytes: Uint8Array } {
    const start = index - (index % PER_SECTOR);
    const end = Math.min(this.length, Math.ceil((index + n) / PER_SECTOR) * PER_SECTOR);
    return { offset: start * 8, bytes: this.bytes.slice(start * 8, end * 8) };
  }
}

/** L2 tables by file offset, least recently used first out, within a byte budget. */
export class L2Cache {
  readonly #tables = new Map<number, QedTable>();
  readonly #max: number;

  /** @param maxTables tables kept (at least 1) */
  constructor(maxTables: number) {
    this.#max = Math.max(1, maxTables);
  }

  get(offset: number): QedTable | undefined {
    const t = this.#tables.get(offset);
    if (t !== undefined && this.#tables.size > 1) {
      // Most recent last (Map keeps insertion order).
      this.#tables.delete(offset);
      this.#tables.set(offset, t);
    }
    return t;
  }

  set(offset: number, table: QedTable): void {
    this.#tables.delete(offset);
    while (this.#tables.size >= this.#max) {
      const oldest = this.#tables.keys().next().value;
      if (oldest === undefined) break;
      this.#tables.delete(oldest);
    }
    this.#tables.set(offset, table);
  }

  clear(): void {
    this.#tables.clear();
  }
}
