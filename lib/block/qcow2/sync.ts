/**
 * Coordination primitives for the qcow2 write path: a FIFO mutex for metadata, per-cluster locks
 * that serialise writes to the same guest clusters, and I/O epochs that let a flush wait for
 * every data read/write that might still use a cluster about to be freed.
 *
 * @module
 */

/** A FIFO async mutex. `run` holds it for the duration of `fn`. */
export class Mutex {
  #tail: Promise<void> = Promise.resolve();

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.#tail;
    let release!: () => void;
    this.#tail = new Promise<void>((r) => (release = r));
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/**
 * Locks on integer keys (guest cluster indexes). A holder of a range of keys took them in
 * ascending order, so two overlapping ranges cannot deadlock.
 */
export class KeyedLocks {
  readonly #held = new Map<number, Promise<void>>();

  /** Take keys `[first, last]` in order; returns the release function. */
  async acquire(first: number, last: number): Promise<() => void> {
    const releases: Array<() => void> = [];
    for (let k = first; k <= last; k++) {
      // Wait until nobody holds k, then take it (re-check: a waiter woken earlier may win).
      for (;;) {
        const busy = this.#held.get(k);
        if (busy === undefined) break;
        await busy;
      }
      let release!: () => void;
      const p = new Promise<void>((r) => (release = r));
      this.#held.set(k, p);
      releases.push(() => {
        if (this.#held.get(k) === p) this.#held.delete(k);
        release();
      });
    }
    return () => {
      for (const r of releases) r();
    };
  }

  /** True when some lock is held (for tests). */
  get busy(): boolean {
    return this.#held.size > 0;
  }
}

interface Waiter {
  readonly upTo: number;
  readonly resolve: () => void;
}

/**
 * Counts data I/O per epoch. `drain()` starts a new epoch and resolves once every operation that
 * began in an earlier epoch has ended: after it, no request can still read or write a host cluster
 * that was unreferenced before the call.
 */
export class IoEpochs {
  #epoch = 0;
  readonly #counts = new Map<number, number>();
  #waiters: Waiter[] = [];

  /** Mark an operation as started; pass the result to `end`. */
  begin(): number {
    const e = this.#epoch;
    this.#counts.set(e, (this.#counts.get(e) ?? 0) + 1);
    return e;
  }

  end(epoch: number): void {
    const n = (this.#counts.get(epoch) ?? 1) - 1;
    if (n > 0) {
      this.#counts.set(epoch, n);
      return;
    }
    this.#counts.delete(epoch);
    if (this.#waiters.length > 0) this.#wake();
  }

  drain(): Promise<void> {
    const upTo = this.#epoch++;
    if (!this.#busyUpTo(upTo)) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push({ upTo, resolve }));
  }

  #busyUpTo(upTo: number): boolean {
    for (const e of this.#counts.keys()) if (e <= upTo) return true;
    return false;
  }

  #wake(): void {
    const still: Waiter[] = [];
    for (const w of this.#waiters) {
      if (this.#busyUpTo(w.upTo)) still.push(w);
      else w.resolve();
    }
    this.#waiters = still;
  }
}
