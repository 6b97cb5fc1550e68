/**
 * Sequential read throughput over http from a local nginx serving a dense random raw file:
 * the http block device alone (256 KiB reads, several in flight, as nbdcopy issues them), and
 * `nbdcopy URI null:` through `nbdkit curl` and through `qemu-nbd -r URL` for comparison.
 *
 * ```sh
 * deno run --allow-read --allow-write --allow-net --allow-ffi --allow-env --allow-run \
 *   scripts/http_bench.ts [--size-mib 1024] [--repeat 3] [--workers 1|auto]
 * ```
 *
 * Prints one Markdown table of medians (min–max) in MiB/s, with the CPU seconds each NBD server
 * process used per copy (start-up included) where /proc still has it when the copy ends.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { openHttpProtocol } from "../lib/block/protocols/http.ts";
import { startNginx } from "../tests/interop/_nginx.ts";

const MiB = 1024 * 1024;
/** denbd started as the release wrapper starts it (same as `deno run ... main.ts`). */
const DENBD = new URL("./bin/denbd", import.meta.url).pathname;
/** A copy that takes longer than this is counted as hung. */
const NBDCOPY_LIMIT_S = 120;

/** Writes `size` bytes of random data to `path` (dense: every block is data). */
export async function makeRandomFile(path: string, size: number): Promise<void> {
  const f = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    const chunk = new Uint8Array(4 * MiB);
    for (let done = 0; done < size;) {
      const n = Math.min(chunk.length, size - done);
      for (let i = 0; i < n; i += 65536) crypto.getRandomValues(chunk.subarray(i, i + 65536));
      let w = 0;
      while (w < n) w += await f.write(chunk.subarray(w, n));
      done += n;
    }
  } finally {
    f.close();
  }
}

/**
 * Reads the whole device behind `url` sequentially with `inFlight` reads of `reqSize` bytes
 * outstanding; returns MiB/s.
 */
export async function deviceThroughput(
  url: string,
  opts: { reqSize?: number; inFlight?: number; connections?: number } = {},
): Promise<number> {
  const reqSize = opts.reqSize ?? 256 * 1024;
  const inFlight = opts.inFlight ?? 64;
  const dev = await openHttpProtocol({ url }, {
    writable: false,
    warn: (m) => console.error(m),
    driver: url.startsWith("https:") ? "https" : "http",
  }, { connections: opts.connections });
  try {
    let next = 0;
    const t0 = performance.now();
    await Promise.all(Array.from({ length: inFlight }, async () => {
      const buf = new Uint8Array(reqSize);
      while (next < dev.size) {
        const off = next;
        next += reqSize;
        await dev.pread(off + reqSize <= dev.size ? buf : buf.subarray(0, dev.size - off), off);
      }
    }));
    return dev.size / MiB / ((performance.now() - t0) / 1000);
  } finally {
    await dev.close();
  }
}

/**
 * Waits for the server's socket file. Never by connecting: a probe connection that closes
 * before negotiating is a client to qemu-nbd (without -t it then wedges) and an error to nbdkit.
 */
async function waitForSocket(path: string, child: Deno.ChildProcess): Promise<void> {
  let exited = false;
  child.status.then(() => exited = true);
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline && !exited) {
    try {
      if ((await Deno.stat(path)).isSocket) return;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`server did not listen on ${path}`);
}

/** CPU seconds (user + system) `pid` has used so far, from /proc; NaN when unreadable. */
function procCpuSeconds(pid: number): number {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / 100; // USER_HZ is 100 on Linux
  } catch {
    return NaN;
  }
}

/** CPU seconds of the server per copy, by row; filled by {@link nbdcopyThroughput}. */
const serverCpu = new Map<string, number[]>();

/**
 * Starts `argv` (an NBD server on unix socket `sock`), times `nbdcopy URI null:`; MiB/s. The
 * server's CPU seconds (including its start-up) are appended to `serverCpu` under `row`.
 */
async function nbdcopyThroughput(
  argv: string[],
  sock: string,
  size: number,
  row: string,
): Promise<number> {
  const child = new Deno.Command(argv[0]!, {
    args: argv.slice(1),
    stdin: "null",
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  try {
    await waitForSocket(sock, child);
    const t0 = performance.now();
    // qemu-nbd 7.2's curl driver sometimes stalls for good under nbdcopy: bounded, reported.
    const out = await new Deno.Command("/usr/bin/timeout", {
      args: [String(NBDCOPY_LIMIT_S), "/usr/bin/nbdcopy", `nbd+unix:///?socket=${sock}`, "null:"],
      stdout: "null",
      stderr: "piped",
    }).output();
    const dt = (performance.now() - t0) / 1000;
    const cpu = procCpuSeconds(child.pid);
    if (out.code === 124) return NaN;
    serverCpu.set(row, [...(serverCpu.get(row) ?? []), cpu]);
    if (!out.success) throw new Error(`nbdcopy failed: ${new TextDecoder().decode(out.stderr)}`);
    return size / MiB / dt;
  } finally {
    try {
      child.kill("SIGKILL"); // a stalled qemu-nbd ignores SIGTERM
    } catch { /* exited */ }
    await child.status;
    await Deno.remove(sock).catch(() => {});
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1]!;
}

/** "median (min–max)" of the runs that finished, and how many hung. */
function cell(samples: number[]): string {
  const ok = samples.filter((v) => !Number.isNaN(v));
  const hung = samples.length - ok.length;
  const note = hung > 0 ? ` (${hung} of ${samples.length} runs hung > ${NBDCOPY_LIMIT_S} s)` : "";
  if (ok.length === 0) return `hung${note}`;
  return `${median(ok).toFixed(0)} | ${Math.min(...ok).toFixed(0)}–${
    Math.max(...ok).toFixed(0)
  }${note}`;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      "size-mib": { type: "string", default: "1024" },
      repeat: { type: "string", default: "3" },
      workers: { type: "string", default: "1" },
    },
  });
  const size = Number(values["size-mib"]) * MiB;
  const repeat = Number(values.repeat);
  const dir = await Deno.makeTempDir({ prefix: "denbd-http-bench-" });
  try {
    console.error(`making ${size / MiB} MiB of random data...`);
    await makeRandomFile(`${dir}/disk.img`, size);
    const ngx = await startNginx({
      root: dir,
      workers: values.workers === "auto" ? "auto" : Number(values.workers),
    });
    try {
      const url = ngx.url("/disk.img");
      const sock = `${dir}/nbd.sock`;
      const rows: Array<[string, () => Promise<number>]> = [
        ["http device, 256 KiB reads, 64 in flight, 8 connections", () => deviceThroughput(url)],
        [
          "http device, 256 KiB reads, 64 in flight, 4 connections",
          () => deviceThroughput(url, { connections: 4 }),
        ],
        [
          "http device, 256 KiB reads, 16 in flight, 8 connections",
          () => deviceThroughput(url, { inFlight: 16 }),
        ],
        [
          "nbdkit curl + nbdcopy",
          () =>
            nbdcopyThroughput(
              ["nbdkit", "-f", "-U", sock, "curl", url],
              sock,
              size,
              "nbdkit curl + nbdcopy",
            ),
        ],
        [
          "denbd -r + nbdcopy",
          () =>
            nbdcopyThroughput(
              [DENBD, "-t", "-r", "-f", "raw", "-k", sock, url],
              sock,
              size,
              "denbd -r + nbdcopy",
            ),
        ],
        [
          "qemu-nbd -r + nbdcopy",
          () =>
            nbdcopyThroughput(
              ["qemu-nbd", "-r", "-f", "raw", "-k", sock, url],
              sock,
              size,
              "qemu-nbd -r + nbdcopy",
            ),
        ],
      ];
      const samples = rows.map(() => [] as number[]);
      for (let r = 0; r < repeat; r++) {
        for (let i = 0; i < rows.length; i++) {
          const v = await rows[i]![1]();
          samples[i]!.push(v);
          console.error(`${rows[i]![0]}: ${v.toFixed(0)} MiB/s`);
        }
      }
      console.log(
        `\nSequential read of ${
          size / MiB
        } MiB over http (nginx, ${values.workers} worker(s)), MiB/s, median of ${repeat}:\n`,
      );
      console.log(
        "| path | MiB/s | min–max | server CPU s (median) |\n| --- | --- | --- | --- |",
      );
      rows.forEach(([name], i) => {
        const cpu = serverCpu.get(name);
        // qemu-nbd without -t exits when the client leaves, before its /proc entry is read.
        const known = (cpu ?? []).filter((v) => !Number.isNaN(v));
        const cpuCell = known.length === 0 ? "–" : median(known).toFixed(2);
        console.log(`| ${name} | ${cell(samples[i]!)} | ${cpuCell} |`);
      });
    } finally {
      await ngx.stop();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) await main();
