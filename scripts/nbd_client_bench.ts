/**
 * Micro-benchmark of the nbd protocol driver (lib/block/protocols/nbd.ts) as a client of a real
 * server: random 4 KiB reads at queue depth 32 and sequential 1 MiB reads (queue depth 1 and 8)
 * through the BlockDevice against qemu-nbd (or denbd) serving a dense raw image from the page
 * cache over a unix socket. As a reference, qemu's own NBD client does the same sequential and
 * 4 KiB runs (`qemu-img bench`, which has no random mode) against the same server.
 *
 * ```sh
 * deno run -A scripts/nbd_client_bench.ts [--seconds=3] [--size-mib=512] [--origin=qemu-nbd|denbd]
 *   [--dir=/tmp] [--no-reference]
 * ```
 *
 * Each cell runs for `--seconds`; the image is created in `--dir` and removed afterwards.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { openNbdProtocol } from "../lib/block/protocols/nbd.ts";
import type { BlockDevice } from "../lib/block/types.ts";

const args = parseArgs({
  args: Deno.args,
  options: {
    seconds: { type: "string", default: "3" },
    "size-mib": { type: "string", default: "512" },
    origin: { type: "string", default: "qemu-nbd" },
    dir: { type: "string", default: Deno.env.get("TMPDIR") ?? "/tmp" },
    "no-reference": { type: "boolean", default: false },
  },
});
const SECONDS = Number(args.values.seconds);
const SIZE = Number(args.values["size-mib"]) * 1024 * 1024;
const MiB = 1024 * 1024;
const DENBD = decodeURIComponent(new URL("./bin/denbd", import.meta.url).pathname);

/** Keep `qd` requests in flight for `seconds`; returns completed ops and bytes. */
async function loop(
  qd: number,
  next: () => { buf: Uint8Array; offset: number },
  dev: BlockDevice,
): Promise<{ ops: number; seconds: number }> {
  const end = performance.now() + SECONDS * 1000;
  const t0 = performance.now();
  let ops = 0;
  const worker = async () => {
    for (let i = 0; i < 1e9 && performance.now() < end; i++) {
      const r = next();
      await dev.pread(r.buf, r.offset);
      ops++;
    }
  };
  await Promise.all(Array.from({ length: qd }, worker));
  return { ops, seconds: (performance.now() - t0) / 1000 };
}

function report(name: string, ops: number, seconds: number, bs: number): void {
  const iops = ops / seconds;
  console.log(
    `${name.padEnd(44)} ${iops.toFixed(0).padStart(9)} ops/s ${
      (iops * bs / MiB).toFixed(0).padStart(7)
    } MiB/s`,
  );
}

async function qemuImgBench(uri: string, bs: number, depth: number): Promise<void> {
  const count = bs === 4096 ? 200_000 : 4000;
  const t0 = performance.now();
  const out = await new Deno.Command("qemu-img", {
    args: ["bench", "-f", "raw", "-c", String(count), "-d", String(depth), "-s", String(bs), uri],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dt = (performance.now() - t0) / 1000;
  if (out.code !== 0) {
    console.log(`qemu-img bench failed: ${new TextDecoder().decode(out.stderr)}`);
    return;
  }
  const m = /Run completed in ([\d.]+) seconds/.exec(new TextDecoder().decode(out.stdout));
  report(
    `qemu-img bench ${bs === 4096 ? "4K" : "1M"} seq QD${depth} (reference)`,
    count,
    m ? Number(m[1]) : dt,
    bs,
  );
}

async function main(): Promise<void> {
  const dir = await Deno.makeTempDir({ dir: args.values.dir, prefix: "nbd-client-bench-" });
  const image = `${dir}/dense.raw`;
  const socket = `${dir}/origin.sock`;
  let child: Deno.ChildProcess | undefined;
  try {
    // Dense, non-zero data so no server can answer with holes.
    const f = await Deno.open(image, { write: true, create: true });
    const chunk = new Uint8Array(MiB);
    for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131 + 7) & 0xff;
    for (let at = 0; at < SIZE; at += MiB) {
      let done = 0;
      while (done < MiB) done += await f.write(chunk.subarray(done));
    }
    f.close();
    await new Deno.Command("cat", { args: [image], stdout: "null" }).output(); // warm the cache

    const origin = args.values.origin;
    const bin = origin === "denbd" ? DENBD : "qemu-nbd";
    child = new Deno.Command(bin, {
      args: ["-k", socket, "-f", "raw", "-t", "-e", "0", image],
      stdout: "null",
      stderr: "null", // qemu-nbd complains about the readiness probe's early close
    }).spawn();
    for (let i = 0; i < 400; i++) {
      try {
        (await Deno.connect({ transport: "unix", path: socket })).close();
        break;
      } catch {
        await new Promise((r) => setTimeout(r, 25));
      }
    }
    const uri = `nbd+unix:///?socket=${socket}`;
    console.log(
      `origin ${origin}, ${SIZE / MiB} MiB dense raw image (page cache), ${SECONDS} s per cell`,
    );

    const dev = await openNbdProtocol(
      { "server.type": "unix", "server.path": socket },
      { writable: false, warn: console.error },
    );
    try {
      let x = 12345;
      const blocks = SIZE / 4096;
      const bufs = Array.from({ length: 32 }, () => new Uint8Array(4096));
      let k = 0;
      const rand4k = () => {
        x ^= x << 13;
        x >>>= 0;
        x ^= x >>> 17;
        x ^= x << 5;
        x >>>= 0;
        return { buf: bufs[k++ & 31]!, offset: (x % blocks) * 4096 };
      };
      let r = await loop(32, rand4k, dev);
      report("denbd nbd driver 4K random read QD32", r.ops, r.seconds, 4096);

      for (const qd of [1, 8]) {
        let pos = 0;
        const big = Array.from({ length: qd }, () => new Uint8Array(MiB));
        let j = 0;
        const seq = () => {
          const offset = pos;
          pos = (pos + MiB) % SIZE;
          return { buf: big[j++ % qd]!, offset };
        };
        r = await loop(qd, seq, dev);
        report(`denbd nbd driver 1M sequential read QD${qd}`, r.ops, r.seconds, MiB);
      }
    } finally {
      await dev.close();
    }
    if (!args.values["no-reference"]) {
      await qemuImgBench(uri, 4096, 32);
      await qemuImgBench(uri, MiB, 1);
      await qemuImgBench(uri, MiB, 8);
    }
  } finally {
    if (child) {
      child.kill("SIGTERM");
      await child.status;
    }
    await Deno.remove(dir, { recursive: true });
  }
}

await main();
