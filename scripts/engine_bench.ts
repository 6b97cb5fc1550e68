/**
 * Micro-benchmark of the file engines without NBD: random 4 KiB reads (page-cache hits, page-cache
 * misses, O_DIRECT) and random 4 KiB writes (buffered, O_DIRECT) at queue depth 1 and 32, through
 * the thread engine and the io_uring engine with each completion path, with and without the
 * synchronous page-cache shortcuts. Prints ops/s per cell and, in brackets, the CPU the process
 * used meanwhile (1.00 = one core busy).
 *
 * ```sh
 * deno run -A scripts/engine_bench.ts [--seconds=0.5] [--rounds=3] [--size-mib=1024]
 *   [--dir=/var/tmp] [--only=completion,read-cached,write] [--engines=threads,uring-enter]
 * ```
 *
 * Each engine runs each cell `--rounds` times for `--seconds` and reports its median, so the run
 * is bounded: 10 rows x 5 engines x 3 rounds x 0.5 s, about 80 s with the defaults.
 * The test file is created in `--dir` (default: the system temp dir) and removed afterwards.
 *
 * @module
 */

import { type CompletionWait, Ring } from "../ffi/io_uring.ts";
import { libc } from "../ffi/libc.ts";
import { DirectFileEngine } from "../lib/io/direct_engine.ts";
import { type FileEngine, ThreadFileEngine } from "../lib/io/file_engine.ts";
import { UringFileEngine } from "../lib/io/uring_engine.ts";

const POSIX_FADV_RANDOM = 1;
const POSIX_FADV_DONTNEED = 4;
const BS = 4096;

interface EngineSpec {
  readonly name: string;
  /** The completion path of the io_uring engine; undefined for the thread engine. */
  readonly wait?: CompletionWait;
  /** io_uring engine without its synchronous page-cache shortcuts. */
  readonly ringOnly?: boolean;
}

const WAITS: readonly CompletionWait[] = ["enter", "eventfd"];

const ENGINES: readonly EngineSpec[] = [
  { name: "threads" },
  ...WAITS.map((wait) => ({ name: `uring-${wait}`, wait })),
  ...WAITS.map((wait) => ({ name: `ring-only-${wait}`, wait, ringOnly: true })),
];

interface Workload {
  readonly name: string;
  readonly direct: boolean;
  readonly write: boolean;
  /** Drop the file from the page cache before the run (and read randomly, no readahead). */
  readonly evict: boolean;
}

const WORKLOADS: readonly Workload[] = [
  { name: "read-cached", direct: false, write: false, evict: false },
  { name: "read-miss", direct: false, write: false, evict: true },
  { name: "read-direct", direct: true, write: false, evict: false },
  { name: "write", direct: false, write: true, evict: false },
  { name: "write-direct", direct: true, write: true, evict: false },
];

const DEPTHS = [1, 32];

interface Sample {
  readonly opsPerSec: number;
  /** CPU time used per second of wall time (1 = one core busy). */
  readonly cpu: number;
}

/** xorshift32: cheap, deterministic offsets. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

function openEngine(path: string, spec: EngineSpec, w: Workload, ring?: Ring): FileEngine {
  const writable = true;
  if (spec.wait === undefined) {
    return w.direct
      ? new DirectFileEngine(path, writable)
      : new ThreadFileEngine(path, { writable });
  }
  const uring = (fd?: number) =>
    new UringFileEngine(path, {
      writable,
      direct: w.direct,
      fd,
      ring,
      shortcuts: !spec.ringOnly,
    });
  return w.direct ? new DirectFileEngine(path, writable, { inner: uring }) : uring();
}

async function runCell(
  file: FileEngine,
  blocks: number,
  w: Workload,
  depth: number,
  seconds: number,
): Promise<Sample> {
  // Every cell starts with no dirty pages, so one cell's writeback does not slow the next.
  await file.sync();
  if (w.evict) {
    libc().posix_fadvise(file.fd, 0n, 0n, POSIX_FADV_DONTNEED);
    libc().posix_fadvise(file.fd, 0n, 0n, POSIX_FADV_RANDOM);
  }
  const buffers = Array.from({ length: depth }, (_, i) => new Uint8Array(BS).fill(i + 1));
  const next = rng(0x9e3779b9 ^ depth);
  return await timed(depth, seconds, async (worker) => {
    const buf = buffers[worker]!;
    const offset = (next() % blocks) * BS;
    if (w.write) await file.pwrite(buf, offset);
    else if (await file.pread(buf, offset) !== BS) throw new Error(`short read at ${offset}`);
  });
}

/** Clock ticks per second of /proc/self/stat (USER_HZ, 100 on Linux). */
const TICKS_PER_SEC = 100;

/** User + system CPU time of this process (all threads) in clock ticks. */
function cpuTicks(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]); // utime, stime (fields 14 and 15)
}

async function main(): Promise<void> {
  const args: Record<string, string | undefined> = {};
  for (const a of Deno.args) {
    const m = /^--([a-z-]+)=(.*)$/.exec(a);
    if (m === null) throw new Error(`engine_bench: unknown argument '${a}'`);
    args[m[1]!] = m[2];
  }
  const seconds = Number(args.seconds ?? 0.5);
  const rounds = Number(args.rounds ?? 3);
  // Big enough that a second of random misses leaves most of it uncached.
  const sizeMiB = Number(args["size-mib"] ?? 1024);
  const only = args.only?.split(",");
  const engineNames = args.engines?.split(",");
  if (only === undefined || only.includes("completion")) await completionPath(seconds, rounds);
  const workloads = WORKLOADS.filter((w) => only === undefined || only.includes(w.name));
  const engines = ENGINES.filter((e) => engineNames === undefined || engineNames.includes(e.name));
  if (workloads.length === 0) return;

  const dir = await Deno.makeTempDir({ dir: args.dir, prefix: "denbd-engine-bench-" });
  const path = `${dir}/bench.img`;
  try {
    // Real data everywhere: a hole would be read without touching the disk.
    const chunk = new Uint8Array(1 << 20);
    crypto.getRandomValues(chunk.subarray(0, 65536));
    for (let i = 65536; i < chunk.length; i += 65536) chunk.copyWithin(i, 0, 65536);
    const f = await Deno.open(path, { write: true, create: true, truncate: true });
    for (let i = 0; i < sizeMiB; i++) await f.write(chunk);
    await f.syncData();
    f.close();
    const blocks = sizeMiB * 256;

    console.log(
      `engine_bench: ${sizeMiB} MiB file in ${dir}, 4 KiB random I/O, median of ${rounds} ` +
        `runs of ${seconds} s; ops/s (CPU, 1.00 = one core)\n`,
    );
    const header = ["workload", "depth", ...engines.map((e) => e.name)];
    const rows: string[][] = [];
    for (const w of workloads) {
      for (const depth of DEPTHS) {
        // Engines take turns, round after round, and each reports its median: a neighbour's
        // burst of load then spoils one sample, not one engine.
        const samples = engines.map(() => [] as Sample[]);
        for (let round = 0; round < rounds; round++) {
          for (let k = 0; k < engines.length; k++) {
            const e = (k + round) % engines.length;
            const spec = engines[e]!;
            const ring = spec.wait === undefined ? undefined : new Ring({ wait: spec.wait });
            const file = openEngine(path, spec, w, ring);
            try {
              samples[e]!.push(await runCell(file, blocks, w, depth, seconds));
            } finally {
              file.close();
              await ring?.close();
            }
          }
        }
        const row = [w.name, String(depth), ...samples.map(median)];
        rows.push(row);
        console.log(row.join("\t"));
      }
    }
    console.log();
    printTable(header, rows);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * The completion path alone: NOPs forced through a kernel worker complete asynchronously like a
 * disk I/O but without the disk, so what is timed is submission plus the wake-up of the event
 * loop. The thread engine's equivalent is a `nonblocking` FFI call that fails at once.
 */
async function completionPath(seconds: number, rounds: number): Promise<void> {
  const header = ["round trip", "depth", "threads (pool hop)", ...WAITS.map((w) => `uring-${w}`)];
  const rows: string[][] = [];
  const empty = new Uint8Array(1);
  const columns = WAITS.length + 1;
  for (const depth of DEPTHS) {
    const samples = Array.from({ length: columns }, () => [] as Sample[]);
    for (let round = 0; round < rounds; round++) {
      for (let k = 0; k < columns; k++) {
        const e = (k + round) % columns;
        const ring = e === 0 ? undefined : new Ring({ wait: WAITS[e - 1] });
        const op = ring === undefined
          ? () => libc().pread_nb(-1, empty, 0n, 0n)
          : () => ring.nop(true);
        try {
          samples[e]!.push(await timed(depth, seconds, op));
        } finally {
          await ring?.close();
        }
      }
    }
    const row = ["async no-op", String(depth), ...samples.map(median)];
    rows.push(row);
    console.log(row.join("\t"));
  }
  console.log();
  printTable(header, rows);
}

async function timed(
  depth: number,
  seconds: number,
  op: (worker: number) => Promise<unknown>,
): Promise<Sample> {
  let ops = 0;
  const cpu0 = cpuTicks();
  const t0 = performance.now();
  const end = t0 + seconds * 1000;
  const worker = async (_: unknown, id: number) => {
    while (performance.now() < end) {
      await op(id);
      ops++;
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
  const secs = (performance.now() - t0) / 1000;
  return { opsPerSec: ops / secs, cpu: (cpuTicks() - cpu0) / TICKS_PER_SEC / secs };
}

function median(s: Sample[]): string {
  s.sort((a, b) => a.opsPerSec - b.opsPerSec);
  const m = s[s.length >> 1]!;
  return `${Math.round(m.opsPerSec).toLocaleString()} (${m.cpu.toFixed(2)})`;
}

function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) =>
    "| " + cells.map((c, i) => i < 2 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)).join(" | ") +
    " |";
  console.log(line(header));
  console.log("|" + widths.map((w) => "-".repeat(w + 2)).join("|") + "|");
  for (const r of rows) console.log(line(r));
}

if (import.meta.main) await main();
