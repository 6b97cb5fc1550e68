/**
 * Which rows a run selects and how long it will take, worked out before anything starts so the
 * user can see the cost of a full run up front.
 *
 * @module
 */

import { FORMAT_INFO } from "./types.ts";
import type { ImageFormat, RowDef, ServerDef } from "./types.ts";

const GiB = 1 << 30;

/** Rough seconds to prepare one private image of 1 GiB, per format. */
const PREPARE_SECONDS_PER_GIB: Readonly<Record<ImageFormat, number>> = {
  raw: 1.5,
  qcow2: 3,
  "qcow2-compressed": 25,
  "qcow2-empty": 0,
  // Remote formats: one origin for all servers (qemu-nbd, or nginx on a link / a qcow2 copy).
  "nbd-raw": 0.5,
  "http-raw": 0.5,
  "http-qcow2": 1,
  // A raw copy each.
  "tls-x509": 1.5,
  "tls-psk": 1.5,
  // qemu-img convert from the raw master (luks encrypts every byte).
  vdi: 3,
  vmdk: 3,
  vhdx: 3,
  luks: 6,
  // Starting the Ceph cluster, then an rbd import per server.
  rbd: 8,
};
/** Seconds to start a server and wait for its socket, and to stop it. */
const SERVER_CYCLE_SECONDS = 2;
/** Per-measurement overhead: `sync`, /proc reads, peak-RSS reset. */
const MEASURE_OVERHEAD_SECONDS = 0.4;

/** What a run's duration depends on. */
export interface PlanInput {
  readonly rows: readonly RowDef[];
  readonly servers: readonly ServerDef[];
  readonly repeat: number;
  readonly imageBytes: number;
  readonly runtimeSeconds: number;
}

/** Rows of a run: the given `--rows` list, else the quick set or every row. */
export function selectRows(
  all: readonly RowDef[],
  opts: { quick: boolean; ids?: readonly string[] },
): RowDef[] {
  if (opts.ids === undefined) return all.filter((r) => !opts.quick || r.quick);
  return opts.ids.map((id) => {
    const found = all.find((r) => r.id === id.trim());
    if (!found) throw new Error(`--rows: unknown id "${id}"; see --help for the list`);
    return found;
  });
}

/** Rough wall-clock seconds of the whole run, image preparation and server starts included. */
export function estimateSeconds(p: PlanInput): number {
  const ctx = { imageBytes: p.imageBytes, runtimeSeconds: p.runtimeSeconds };
  let total = 0;
  for (const format of new Set(p.rows.map((r) => r.format))) {
    const servers = p.servers.filter((s) => s.formats.includes(format)).length;
    const cycles = FORMAT_INFO[format].freshPerRun
      ? p.rows.filter((r) => r.format === format).length * p.repeat
      : 1;
    const prepare = PREPARE_SECONDS_PER_GIB[format] * p.imageBytes / GiB + SERVER_CYCLE_SECONDS;
    total += servers * cycles * prepare;
  }
  for (const row of p.rows) {
    const servers = p.servers.filter((s) => s.formats.includes(row.format)).length;
    total += servers * p.repeat * (row.estimateSeconds(ctx) + MEASURE_OVERHEAD_SECONDS);
  }
  return total;
}

/** "45 s", "3 min", "1 h 05 min". */
export function formatDuration(seconds: number): string {
  if (seconds < 90) return `${Math.ceil(seconds)} s`;
  const min = Math.ceil(seconds / 60);
  return min < 60
    ? `${min} min`
    : `${Math.floor(min / 60)} h ${String(min % 60).padStart(2, "0")} min`;
}
