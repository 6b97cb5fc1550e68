/**
 * Decompressed chunks (dmg) and blocks (cloop), kept for the reads that follow: qemu keeps the
 * last one; denbd keeps the most recently used ones up to a byte budget, and a chunk that
 * several concurrent requests need is decompressed once.
 *
 * A decoder that fails (corrupt data) rejects every waiting read; the failure is not cached, so
 * a later read tries again, as qemu's does.
 *
 * @module
 */

/** Default budget of decompressed bytes held (at least one chunk is kept whatever its size). */
export const CHUNK_CACHE_BYTES = 64 * 1024 * 1024;

export class ChunkCache {
  readonly #budget: number;
  /** Insertion order is recency order: the first key is the least recently used. */
  readonly #done = new Map<number, Uint8Array>();
  readonly #pending = new Map<number, Promise<Uint8Array>>();
  #bytes = 0;

  constructor(budget = CHUNK_CACHE_BYTES) {
    this.#budget = budget;
  }

  /** The decoded chunk `key`, from the cache or from `decode` (called at most once at a time). */
  get(key: number, decode: () => Promise<Uint8Array>): Promise<Uint8Array> {
    const hit = this.#done.get(key);
    if (hit !== undefined) {
      this.#done.delete(key);
      this.#done.set(key, hit);
      return Promise.resolve(hit);
    }
    const inFlight = this.#pending.get(key);
    if (inFlight !== undefined) return inFlight;
    const p = decode().then(
      (data) => {
        this.#pending.delete(key);
        this.#insert(key, data);
        return data;
      },
      (e) => {
        this.#pending.delete(key);
        throw e;
      },
    );
    this.#pending.set(key, p);
    return p;
  }

  #insert(key: number, data: Uint8Array): void {
    this.#done.set(key, data);
    this.#bytes += data.length;
    for (const [k, v] of this.#done) {
      if (this.#bytes <= this.#budget || this.#done.size <= 1) break;
      this.#done.delete(k);
      this.#bytes -= v.length;
    }
  }

  clear(): void {
    this.#done.clear();
    this.#bytes = 0;
  }
}
