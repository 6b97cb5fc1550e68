/** A FileEngine over a growable in-memory buffer, for the parallels and qcow unit tests. */

import type { FileEngine } from "../../lib/io/file_engine.ts";
import { BlockError, Errno } from "../../lib/block/types.ts";

/** Past this the in-memory file refuses to grow, as a full disk would. */
const MAX_BYTES = 64 * 1024 * 1024;

export function memFile(init: Uint8Array, path = "mem.img"): FileEngine & { bytes(): Uint8Array } {
  let buf = new Uint8Array(init);
  let len = buf.length;
  const ensure = (n: number) => {
    if (n > MAX_BYTES) throw new BlockError(Errno.EFBIG, `in-memory file cannot grow to ${n}`);
    if (n > buf.length) {
      const g = new Uint8Array(Math.max(n, buf.length * 2));
      g.set(buf.subarray(0, len));
      buf = g;
    }
  };
  return {
    path,
    fd: -1,
    pread(b: Uint8Array, off: number) {
      const n = Math.max(0, Math.min(b.length, len - off));
      b.set(buf.subarray(off, off + n));
      return Promise.resolve(n);
    },
    pwrite(b: Uint8Array, off: number) {
      try {
        ensure(off + b.length);
      } catch (e) {
        return Promise.reject(e);
      }
      buf.set(b, off);
      len = Math.max(len, off + b.length);
      return Promise.resolve();
    },
    sync: () => Promise.resolve(),
    length: () => len,
    truncate(n: number) {
      ensure(n);
      if (n < len) buf.fill(0, n, len);
      len = n;
    },
    punchHole: () => Promise.resolve(),
    zeroRange(off: number, n: number) {
      try {
        ensure(off + n);
      } catch (e) {
        return Promise.reject(e);
      }
      buf.fill(0, off, off + n);
      len = Math.max(len, off + n);
      return Promise.resolve();
    },
    seekData: (o: number) => o < len ? o : -1,
    seekHole: () => len,
    prefetch() {},
    close() {},
    bytes: () => buf.subarray(0, len),
  };
}

/** A seeded generator (xorshift32), values in [0, 1). */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}
