/**
 * Benchmark images: dense files of pseudo-random bytes (so no server or client can skip work by
 * detecting zeroes), one private copy per server instance, and page-cache warming.
 *
 * @module
 */

import { runClient } from "./proc.ts";
import { type ImageFormat, LUKS_SECRET } from "./types.ts";

const CHUNK = 8 << 20;

/**
 * Makes `path` a dense file of `bytes` pseudo-random bytes from `seed`, unless a file of that size
 * already exists (it is reused across runs). Returns true if it had to be created.
 */
export async function ensureDenseFile(path: string, bytes: number, seed: number): Promise<boolean> {
  try {
    if ((await Deno.stat(path)).size === bytes) return false;
  } catch {
    // Missing: create it below.
  }
  if (bytes % CHUNK !== 0) throw new Error(`Image size ${bytes} is not a multiple of ${CHUNK}`);
  const tmp = `${path}.tmp`;
  const file = await Deno.open(tmp, { write: true, create: true, truncate: true });
  try {
    const words = new Uint32Array(CHUNK / 4);
    const buf = new Uint8Array(words.buffer);
    // xorshift32 never yields a zero state, so no 4-byte word run can make a zero block.
    let x = (seed >>> 0) || 1;
    for (let done = 0; done < bytes; done += CHUNK) {
      for (let i = 0; i < words.length; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        words[i] = x >>> 0;
      }
      for (let off = 0; off < buf.length;) off += await file.write(buf.subarray(off));
    }
  } finally {
    file.close();
  }
  await Deno.rename(tmp, path);
  return true;
}

/**
 * Writes a fresh private copy of the raw `master` to `dest` in `format`, so that no server sees
 * another's writes (a qcow2 server caches metadata, so sharing a file would be unsafe). For
 * `qcow2-empty` the copy has the master's size and no data at all.
 */
export async function prepareImage(
  master: string,
  dest: string,
  format: ImageFormat,
): Promise<void> {
  await Deno.remove(dest).catch(() => {});
  switch (format) {
    case "raw":
    case "tls-x509":
    case "tls-psk":
      await Deno.copyFile(master, dest);
      return;
    case "qcow2":
    case "vdi":
    case "vmdk":
    case "vhdx":
      await runClient(["qemu-img", "convert", "-f", "raw", "-O", format, master, dest]);
      return;
    case "luks":
      await runClient([
        "qemu-img",
        "convert",
        ...["--object", `secret,id=sec0,data=${LUKS_SECRET}`],
        ...["-f", "raw", "-O", "luks", "-o", "key-secret=sec0,iter-time=10", master, dest],
      ]);
      return;
    case "qcow2-empty": {
      const bytes = (await Deno.stat(master)).size;
      await runClient(["qemu-img", "create", "-q", "-f", "qcow2", dest, String(bytes)]);
      return;
    }
    case "qcow2-compressed": {
      // Random data does not compress (qemu would store the clusters plain), so compress a copy
      // whose every 4 KiB block keeps 1 KiB of the random bytes: ~4:1, and no zero blocks.
      const src = `${dest}.src`;
      await writeCompressibleCopy(master, src);
      try {
        await runClient(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", src, dest]);
      } finally {
        await Deno.remove(src).catch(() => {});
      }
      return;
    }
  }
}

/** Copies `master` to `dest` with bytes 1024..4095 of every 4 KiB block zeroed. */
async function writeCompressibleCopy(master: string, dest: string): Promise<void> {
  const input = await Deno.open(master, { read: true });
  const output = await Deno.open(dest, { write: true, create: true, truncate: true });
  try {
    const buf = new Uint8Array(CHUNK);
    for (;;) {
      let n = 0;
      while (n < buf.length) {
        const r = await input.read(buf.subarray(n));
        if (r === null) break;
        n += r;
      }
      if (n === 0) break;
      for (let b = 0; b < n; b += 4096) buf.fill(0, b + 1024, Math.min(b + 4096, n));
      for (let off = 0; off < n;) off += await output.write(buf.subarray(off, n));
      if (n < buf.length) break;
    }
  } finally {
    input.close();
    output.close();
  }
}

/** Reads `path` once so that it sits in the page cache before anything is timed. */
export async function warmPageCache(path: string): Promise<void> {
  const file = await Deno.open(path, { read: true });
  try {
    const buf = new Uint8Array(CHUNK);
    while ((await file.read(buf)) !== null) {
      // Discard: only the page-cache side effect matters.
    }
  } finally {
    file.close();
  }
}
