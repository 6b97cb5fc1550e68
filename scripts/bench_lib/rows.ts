/**
 * The benchmark rows. Each row is built by one of two factories (an nbdcopy stream or a fio job),
 * so a new row is one line in `ROW_DEFS`: e.g. `fioRow({ rw: "randread", iodepth: 1 })`,
 * `fioRow({ rw: "randread", numjobs: 4 })`, `nbdcopyRow({ direction: "read", connections: 1 })`
 * or any of them with `format: "qcow2"`.
 *
 * @module
 */

import { runClient } from "./proc.ts";
import type { ImageFormat, RowContext, RowDef, Sample } from "./types.ts";

const MiB = 1 << 20;

/** Options of a whole-image nbdcopy row. */
export interface NbdcopyRowOptions {
  readonly direction: "read" | "write";
  readonly format?: ImageFormat;
  /** nbdcopy --connections; nbdcopy's default (4 when the server allows multi-conn) if unset. */
  readonly connections?: number;
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
  const id = `seq-${o.direction}-nbdcopy${o.connections ? `-c${o.connections}` : ""}-${format}`;
  const title = `sequential ${o.direction} (nbdcopy${
    o.connections ? `, ${o.connections} conn` : ""
  }), ${format}, MiB/s`;
  return {
    id,
    title,
    format,
    unit: "MiB/s",
    run: async (ctx: RowContext): Promise<Sample> => {
      const argv = o.direction === "read"
        ? ["nbdcopy", ...conns, ctx.uri, "null:"]
        : ["nbdcopy", ...conns, "--sparse=0", ctx.sourceFile, ctx.uri];
      const r = await runClient(argv);
      return { value: ctx.imageBytes / MiB / r.seconds, bytes: ctx.imageBytes, seconds: r.seconds };
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
    title: `${bsKiB} KiB ${o.rw} (fio, QD${iodepth}${jobs}), ${format}, IOPS`,
    format,
    unit: "IOPS",
    run: async (ctx: RowContext): Promise<Sample> => {
      const r = await runClient([
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
      ]);
      const totals = parseFioJson(r.stdout);
      return { value: totals.iops, bytes: totals.bytes, seconds: r.seconds };
    },
  };
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

/** Rows run by default, in this order (issue 2). */
export const ROW_DEFS: readonly RowDef[] = [
  nbdcopyRow({ direction: "read" }),
  nbdcopyRow({ direction: "write" }),
  fioRow({ rw: "randread" }),
  fioRow({ rw: "randwrite" }),
  // qcow2 rows: reads only until the qcow2 write path lands.
  nbdcopyRow({ direction: "read", format: "qcow2" }),
  fioRow({ rw: "randread", format: "qcow2" }),
  nbdcopyRow({ direction: "read", format: "qcow2-compressed" }),
  fioRow({ rw: "randread", format: "qcow2-compressed" }),
];
