/**
 * A small pool of Workers that decompress clusters, so compressed images use both cores the way
 * qemu's thread pool does (one inflate per 64 KiB cluster costs ~0.2 ms of CPU). Started on the
 * first compressed read, terminated with the device.
 *
 * @module
 */

interface Pending {
  readonly resolve: (out: Uint8Array | null) => void;
}

/** Workers in the pool: one per core of the 2-core machines this runs on. */
const POOL_SIZE = 2;

export class InflatePool {
  #workers: Worker[] = [];
  #pending = new Map<number, Pending>();
  #next = 0;
  #turn = 0;

  /** Decompress `src` into a new buffer of `size` bytes; null for corrupt data. */
  decompress(type: number, src: Uint8Array, size: number): Promise<Uint8Array | null> {
    if (this.#workers.length === 0) this.#start();
    const id = this.#next++;
    const worker = this.#workers[this.#turn++ % this.#workers.length]!;
    return new Promise((resolve) => {
      this.#pending.set(id, { resolve });
      worker.postMessage({ id, type, src, size }, [src.buffer as ArrayBuffer]);
    });
  }

  /** Stop the workers; pending jobs resolve as corrupt (the device is closing anyway). */
  close(): void {
    for (const w of this.#workers) w.terminate();
    this.#workers = [];
    for (const p of this.#pending.values()) p.resolve(null);
    this.#pending.clear();
  }

  #start(): void {
    for (let i = 0; i < POOL_SIZE; i++) {
      const w = new Worker(new URL("./inflate_worker.ts", import.meta.url).href, {
        type: "module",
      });
      w.onmessage = (e: MessageEvent<{ id: number; out: Uint8Array | null }>) => {
        const p = this.#pending.get(e.data.id);
        if (p === undefined) return;
        this.#pending.delete(e.data.id);
        p.resolve(e.data.out);
      };
      this.#workers.push(w);
    }
  }
}
