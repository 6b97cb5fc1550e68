/**
 * The benchmark rows. Each row is built by one of two factories (an nbdcopy stream or a fio job),
 * so a new row is one line in `ROW_DEFS`: e.g. `fioRow({ rw: "randread", iodepth: 1 })`,
 * `fioRow({ rw: "randread", numjobs: 4 })`, `nbdcopyRow({ direction: "read", connections: 1 })`
 * or any of them with `format: "qcow2"`.
 *
 * Row ids are systematic: `seq-<read|write>-nbdcopy-c<connections>-<format>` and
 * `fio-<rw>-<bs>k-qd<iodepth>-j<jobs>-<format>` (and `libnbd-randread-4k-qd32-<format>` for what
 * fio cannot open); remote formats (`nbd-raw`, `http-raw`,
 * `http-qcow2`) re-export an origin (see origins.ts).
 *
 * @module
 */

import { ClientError, runClient } from "./proc.ts";
import { FORMAT_INFO } from "./types.ts";
import type { ImageFormat, RowContext, RowDef, Sample } from "./types.ts";

const MiB = 1 << 20;

/** Throughput assumed by the start-up estimate for a whole-image copy, MiB/s. */
const ESTIMATED_COPY_MIB_S = 400;
/** A whole-image copy slower than this (MiB/s) is counted as stalled and killed. */
const STALLED_COPY_MIB_S = 10;
/** Seconds past its runtime after which a fio run is counted as stalled and killed. */
const FIO_GRACE_SECONDS = 60;

/** Options of a whole-image nbdcopy row. */
export interface NbdcopyRowOptions {
  readonly direction: "read" | "write";
  readonly format?: ImageFormat;
  /**
   * nbdcopy --connections; nbdcopy's default (4 when the server allows multi-conn) if unset.
   * nbdcopy silently uses one connection when the server does not advertise multi-conn.
   */
  readonly connections?: number;
  /** Part of the `--quick` set (default false). */
  readonly quick?: boolean;
}

/**
 * A sequential whole-image copy: `read` copies the export to `null:`, `write` copies the local
 * dense source file into the export. `--sparse=0` stops nbdcopy from turning zero blocks into
 * zero requests, so every byte is written. No `--flush`: the figure is the server's data path,
 * not the host disk's write-back speed.
 */
export function nbdcopyRow(o: NbdcopyRowOptions): RowDef {
  const format = o.format ?? "raw";
  const conns = o.connections === undefined ? [] : [`--connections=${o.connections}`];
  const c = o.connections === undefined ? "" : `-c${o.connections}`;
  const connText = o.connections === undefined
    ? ""
    : `, ${o.connections} conn${o.connections > 1 ? "s" : ""}`;
  return {
    id: `seq-${o.direction}-nbdcopy${c}-${format}`,
    title: `sequential ${o.direction} (nbdcopy${connText}), ${FORMAT_INFO[format].label}, MiB/s`,
    format,
    unit: "MiB/s",
    quick: o.quick ?? false,
    estimateSeconds: (ctx) => 0.5 + ctx.imageBytes / MiB / ESTIMATED_COPY_MIB_S,
    run: async (ctx: RowContext): Promise<Sample> => {
      const argv = o.direction === "read"
        ? ["nbdcopy", ...conns, ctx.uri, "null:"]
        : ["nbdcopy", ...conns, "--sparse=0", ctx.sourceFile, ctx.uri];
      let seconds: number;
      try {
        const limitS = 30 + ctx.imageBytes / MiB / STALLED_COPY_MIB_S;
        ({ seconds } = await runClient(argv, { timeoutMs: limitS * 1000 }));
      } catch (e) {
        if (e instanceof ClientError) {
          if (/ timed out: /.test(e.message)) throw new Error(e.message);
          throw new Error(lastToolLine("nbdcopy", e.stderr) ?? e.message);
        }
        throw e;
      }
      return { value: ctx.imageBytes / MiB / seconds, bytes: ctx.imageBytes, seconds };
    },
  };
}

/** Options of a time-based fio row using fio's nbd engine (libnbd). */
export interface FioRowOptions {
  readonly rw: "randread" | "randwrite" | "read" | "write";
  readonly format?: ImageFormat;
  /** Block size in KiB (default 4). */
  readonly bsKiB?: number;
  /** Requests in flight per job (default 32). */
  readonly iodepth?: number;
  /** Jobs, each with its own NBD connection (default 1). */
  readonly numjobs?: number;
  /** Part of the `--quick` set (default false). */
  readonly quick?: boolean;
}

/** A fio row; its value is total IOPS over all jobs. */
export function fioRow(o: FioRowOptions): RowDef {
  const format = o.format ?? "raw";
  const bsKiB = o.bsKiB ?? 4;
  const iodepth = o.iodepth ?? 32;
  const numjobs = o.numjobs ?? 1;
  const id = `fio-${o.rw}-${bsKiB}k-qd${iodepth}-j${numjobs}-${format}`;
  const jobs = numjobs > 1 ? `, ${numjobs} conns` : "";
  return {
    id,
    title: `${bsKiB} KiB ${o.rw} (fio, QD${iodepth}${jobs}), ${FORMAT_INFO[format].label}, IOPS`,
    format,
    unit: "IOPS",
    quick: o.quick ?? false,
    // fio start-up, connection and JSON output on top of the timed part.
    estimateSeconds: (ctx) => ctx.runtimeSeconds + 1,
    run: async (ctx: RowContext): Promise<Sample> => {
      const argv = [
        "fio",
        `--name=${id}`,
        "--ioengine=nbd",
        `--uri=${ctx.uri}`,
        `--rw=${o.rw}`,
        `--bs=${bsKiB}k`,
        `--iodepth=${iodepth}`,
        `--numjobs=${numjobs}`,
        `--runtime=${ctx.runtimeSeconds}`,
        "--time_based",
        "--output-format=json",
      ];
      let stdout: string;
      let seconds: number;
      try {
        const limitS = ctx.runtimeSeconds + FIO_GRACE_SECONDS;
        ({ stdout, seconds } = await runClient(argv, { timeoutMs: limitS * 1000 }));
      } catch (e) {
        if (e instanceof ClientError) {
          if (/ timed out: /.test(e.message)) throw new Error(e.message);
          throw new Error(summarizeFioFailure(e.stderr) ?? e.message);
        }
        throw e;
      }
      const totals = parseFioJson(stdout);
      return { value: totals.iops, bytes: totals.bytes, seconds };
    },
  };
}

/** The Python random-read client (see the script's docstring for why it exists). */
const LIBNBD_RANDREAD = decodeURIComponent(
  new URL("./libnbd_randread.py", import.meta.url).pathname,
);

/**
 * 4 KiB random reads at QD32 over one connection by libnbd's Python binding: the random row for
 * URIs fio's nbd engine refuses (`tls-certificates=` and `tls-psk-file=` name local files).
 * Debian's python3 only.
 */
export function libnbdRandReadRow(o: { format: ImageFormat }): RowDef {
  const iodepth = 32;
  const bs = 4096;
  return {
    id: `libnbd-randread-4k-qd${iodepth}-${o.format}`,
    title: `4 KiB randread (libnbd python, QD${iodepth}), ${FORMAT_INFO[o.format].label}, IOPS`,
    format: o.format,
    unit: "IOPS",
    quick: false,
    estimateSeconds: (ctx) => ctx.runtimeSeconds + 1,
    run: async (ctx: RowContext): Promise<Sample> => {
      const argv = [
        "/usr/bin/python3",
        LIBNBD_RANDREAD,
        ctx.uri,
        String(ctx.runtimeSeconds),
        String(iodepth),
        String(bs),
      ];
      let stdout: string;
      try {
        const limitS = ctx.runtimeSeconds + FIO_GRACE_SECONDS;
        ({ stdout } = await runClient(argv, { timeoutMs: limitS * 1000 }));
      } catch (e) {
        if (e instanceof ClientError) {
          throw new Error(e.stderr.trim().split("\n").at(-1) || e.message);
        }
        throw e;
      }
      const r = JSON.parse(stdout.trim().split("\n").at(-1) ?? "") as {
        ios: number;
        bytes: number;
        seconds: number;
      };
      return { value: r.ios / r.seconds, bytes: r.bytes, seconds: r.seconds };
    },
  };
}

/**
 * One line for a failed fio run from its stderr, e.g. "fio: write failed: Operation not permitted
 * (first at offset 4046848)", or undefined if stderr has no I/O error line.
 */
export function summarizeFioFailure(stderr: string): string | undefined {
  // fio: "io_u error on file NAME: MESSAGE: OP offset=N, buflen=M"
  const m = /io_u error on file [^:\n]*: ([^\n]+?): (\w+) offset=(\d+)/.exec(stderr);
  if (!m) return undefined;
  return `fio: ${m[2]} failed: ${m[1]} (first at offset ${m[3]})`;
}

/** The last stderr line a tool prefixed with its own name (its error message), if any. */
export function lastToolLine(tool: string, stderr: string): string | undefined {
  return stderr.split("\n").map((l) => l.trim()).filter((l) => l.startsWith(`${tool}: `)).at(-1);
}

interface FioDir {
  readonly iops?: number;
  readonly io_bytes?: number;
}
interface FioJob {
  readonly jobname?: string;
  readonly error?: number;
  readonly read?: FioDir;
  readonly write?: FioDir;
}

/** Sums IOPS and bytes over every job of fio's JSON output (which may follow log lines). */
export function parseFioJson(stdout: string): { iops: number; bytes: number } {
  const start = stdout.search(/^\{/m);
  if (start < 0) throw new Error(`No JSON in fio output: ${stdout.slice(0, 200)}`);
  const doc = JSON.parse(stdout.slice(start)) as { jobs?: FioJob[] };
  if (!doc.jobs?.length) throw new Error("fio JSON has no jobs");
  let iops = 0;
  let bytes = 0;
  for (const job of doc.jobs) {
    if (job.error) throw new Error(`fio job ${job.jobname} failed with error ${job.error}`);
    iops += (job.read?.iops ?? 0) + (job.write?.iops ?? 0);
    bytes += (job.read?.io_bytes ?? 0) + (job.write?.io_bytes ?? 0);
  }
  return { iops, bytes };
}

/** fio 4 KiB random rows at QD1 and QD32, over 1 connection and 4 (issue 5). */
function randomMatrix(format: ImageFormat, quick: readonly string[]): RowDef[] {
  const rows: RowDef[] = [];
  for (const rw of ["randread", "randwrite"] as const) {
    for (const numjobs of [1, 4]) {
      for (const iodepth of [1, 32]) {
        const key = `${rw}-qd${iodepth}-j${numjobs}`;
        rows.push(fioRow({ rw, iodepth, numjobs, format, quick: quick.includes(key) }));
      }
    }
  }
  return rows;
}

/** Every row, in run order (issues 2, 4, 5, 11 and 13). */
export const ROW_DEFS: readonly RowDef[] = [
  // raw: nbdcopy over 1, 2 and 4 connections, then the fio matrix.
  ...[1, 2, 4].map((c) => nbdcopyRow({ direction: "read", connections: c, quick: c === 4 })),
  ...[1, 2, 4].map((c) => nbdcopyRow({ direction: "write", connections: c, quick: c === 4 })),
  ...randomMatrix("raw", ["randread-qd32-j1", "randwrite-qd32-j4"]),
  // qcow2 with every cluster allocated: reads, and writes that overwrite in place.
  nbdcopyRow({ direction: "read", connections: 4, format: "qcow2", quick: true }),
  ...randomMatrix("qcow2", ["randread-qd32-j1", "randwrite-qd32-j1"]),
  // Empty qcow2 (a fresh image per measurement): every write allocates.
  nbdcopyRow({ direction: "write", connections: 4, format: "qcow2-empty", quick: true }),
  fioRow({ rw: "randwrite", format: "qcow2-empty", quick: true }),
  // zlib-compressed qcow2: reads only (qemu never writes compressed clusters in place).
  nbdcopyRow({ direction: "read", connections: 4, format: "qcow2-compressed" }),
  fioRow({ rw: "randread", format: "qcow2-compressed" }),
  // Proxies: each server re-exports one qemu-nbd origin (its NBD client is measured) ...
  ...[1, 4].map((c) => nbdcopyRow({ direction: "read", connections: c, format: "nbd-raw" })),
  fioRow({ rw: "randread", format: "nbd-raw" }),
  // ... or reads an image from nginx (its HTTP client; nbdkit cannot read qcow2).
  nbdcopyRow({ direction: "read", connections: 1, format: "http-raw" }),
  nbdcopyRow({ direction: "read", connections: 1, format: "http-qcow2" }),
  // TLS (issue 11): the raw image over x509 and PSK, sequential and random reads. fio's nbd
  // engine refuses URIs that name local files (tls-certificates=, tls-psk-file=), so the random
  // rows use libnbd's Python binding.
  ...(["tls-x509", "tls-psk"] as const).flatMap((format) => [
    ...[1, 4].map((c) => nbdcopyRow({ direction: "read", connections: c, format })),
    libnbdRandReadRow({ format }),
  ]),
  // Other formats (issue 13), every block allocated: sequential and random reads, random writes
  // that overwrite in place; LUKS: sequential reads (the cipher is the work).
  ...(["vdi", "vmdk", "vhdx"] as const).flatMap((format) => [
    nbdcopyRow({ direction: "read", connections: 4, format }),
    fioRow({ rw: "randread", format }),
    fioRow({ rw: "randwrite", format }),
  ]),
  nbdcopyRow({ direction: "read", connections: 4, format: "luks" }),
  fioRow({ rw: "randread", format: "luks" }),
  // Ceph RBD (issue 14): each server's own image on a local one-OSD cluster, through librbd.
  ...[1, 4].map((c) => nbdcopyRow({ direction: "read", connections: c, format: "rbd" })),
  ...[1, 4].map((c) => nbdcopyRow({ direction: "write", connections: c, format: "rbd" })),
  fioRow({ rw: "randread", format: "rbd" }),
  fioRow({ rw: "randwrite", format: "rbd" }),
];
