/**
 * A byte-bounded LRU cache of L2 table slices with single-flight loads: concurrent misses on one
 * slice share one read. Slices hold the entries as host-order 32-bit words, two per u64 (high word
 * first), so lookups are plain array reads.
 *
 * @module
 */

/** Reads `buf.length` bytes of the image at `offset` (zero-filled past end of file). */
export type SliceReader = (buf: Uint8Array, offset: number) => Promise<void>;

/** The L2 cache of one image. */
export class L2Cache {
  readonly sliceBytes: number;
  readonly capacity: number;
  readonly #read: SliceReader;
  /** Insertion order is recency order: the first key is the least recently used. */
  readonly #slices = new Map<number, Uint32Array>();
  readonly #loading = new Map<number, Promise<Uint32Array>>();
  /** Slices changed since the last write-back; never evicted. */
  readonly #dirty = new Set<number>();

  /**
   * @param sliceBytes bytes per slice (a whole L2 table, or 4 KiB of one)
   * @param cacheBytes the byte budget; at least two slices are always kept, as in qemu
   */
  constructor(sliceBytes: number, cacheBytes: number, read: SliceReader) {
    this.sliceBytes = sliceBytes;
    this.capacity = Math.max(2, Math.floor(cacheBytes / sliceBytes));
    this.#read = read;
  }

  /** Slices held now. */
  get size(): number {
    return this.#slices.size;
  }

  /** The cached slice at host offset `key`, or undefined. A hit makes it most recent. */
  get(key: number): Uint32Array | undefined {
    const s = this.#slices.get(key);
    if (s !== undefined) {
      this.#slices.delete(key);
      this.#slices.set(key, s);
    }
    return s;
  }

  /** Load the slice at host offset `key` (shared with any load of it already in flight). */
  load(key: number): Promise<Uint32Array> {
    const cached = this.get(key);
    if (cached !== undefined) return Promise.resolve(cached);
    let p = this.#loading.get(key);
    if (p === undefined) {
      p = this.#fetch(key);
      this.#loading.set(key, p);
    }
    return p;
  }

  async #fetch(key: number): Promise<Uint32Array> {
    try {
      const bytes = new Uint8Array(this.sliceBytes);
      await this.#read(bytes, key);
      const view = new DataView(bytes.buffer);
      const words = new Uint32Array(this.sliceBytes >> 2);
      for (let i = 0; i < words.length; i++) words[i] = view.getUint32(i << 2);
      // A slice cached meanwhile (a new table put by the writer) wins over the disk copy.
      const fresh = this.#slices.get(key);
      if (fresh !== undefined) return fresh;
      this.#insert(key, words);
      return words;
    } finally {
      this.#loading.delete(key);
    }
  }

  /** Insert a slice the writer built (a new or copied L2 table), dirty. */
  put(key: number, words: Uint32Array): void {
    this.#slices.delete(key);
    this.#insert(key, words);
    this.#dirty.add(key);
  }

  /** Mark a cached slice as changed; call right after changing it, with no await between. */
  markDirty(key: number): void {
    this.#dirty.add(key);
  }

  /** Number of dirty slices. */
  get dirtyCount(): number {
    return this.#dirty.size;
  }

  /** The dirty slices as big-endian bytes, and their keys; they count as clean from now on. */
  takeDirty(): Array<{ key: number; bytes: Uint8Array }> {
    const out: Array<{ key: number; bytes: Uint8Array }> = [];
    for (const key of this.#dirty) {
      const words = this.#slices.get(key)!;
      const bytes = new Uint8Array(words.length * 4);
      const view = new DataView(bytes.buffer);
      for (let i = 0; i < words.length; i++) view.setUint32(i << 2, words[i]!);
      out.push({ key, bytes });
    }
    this.#dirty.clear();
    return out;
  }

  /** Mark slices dirty again after a failed write-back. */
  restoreDirty(keys: readonly number[]): void {
    for (const k of keys) if (this.#slices.has(k)) this.#dirty.add(k);
  }

  /** Evict clean slices, oldest first, until there is room for one more. */
  #insert(key: number, words: Uint32Array): void {
    if (this.#slices.size >= this.capacity) {
      for (const k of this.#slices.keys()) {
        if (this.#slices.size < this.capacity) break;
        if (!this.#dirty.has(k)) this.#slices.delete(k);
      }
    }
    this.#slices.set(key, words);
  }

  /** Drop everything (close). */
  clear(): void {
    this.#slices.clear();
    this.#dirty.clear();
  }
}
