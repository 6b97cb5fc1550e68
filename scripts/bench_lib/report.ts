/**
 * Turns benchmark results into a Markdown report (figures, ratios, server CPU per GiB, peak RSS
 * per row and per server), the data of the ratio chart, and a JSON document with every raw sample.
 *
 * @module
 */

import type { RatioChart, RatioValue } from "./chart.ts";
import type { ImageFormat, RowDef, Sample, ServerDef } from "./types.ts";

/** One client run plus what it cost the server. */
export interface MeasuredSample extends Sample {
  /** Server CPU seconds (user + system) consumed during the run. */
  readonly cpuSeconds: number;
  /** Server peak RSS (VmHWM) during the run in KiB; 0 if it could not be read. */
  readonly peakRssKiB: number;
}

/** A row × server cell. */
export type Cell =
  | { readonly status: "unsupported" }
  | { readonly status: "failed"; readonly error: string; readonly samples: MeasuredSample[] }
  | { readonly status: "ok"; readonly samples: MeasuredSample[] };

/** One server instance (a server on one image format). */
export interface InstanceResult {
  readonly serverId: string;
  readonly format: ImageFormat;
  readonly argv: readonly string[];
  readonly logFile: string;
  readonly failure: string | undefined;
  readonly peakRssKiB: number;
}

/** Everything one `deno task bench` run produced. */
export interface BenchResults {
  readonly meta: Readonly<Record<string, string | number>>;
  readonly notes: readonly string[];
  readonly servers: readonly ServerDef[];
  readonly rows: readonly RowDef[];
  /** cells[rowId][serverId] */
  readonly cells: Readonly<Record<string, Readonly<Record<string, Cell>>>>;
  readonly instances: readonly InstanceResult[];
  /** File name of the ratio chart beside the report, linked from the Markdown if set. */
  readonly chartFile?: string;
}

const GiB = 1 << 30;

/** Ratio columns: [numerator, denominator] server ids, shown when both are selected. */
export const RATIO_PAIRS: ReadonlyArray<readonly [string, string]> = [
  ["denbd", "qemu-nbd"],
  ["denbd", "nbdkit"],
  ["denbd", "denbd-baseline"],
];

/** Median of a non-empty list. */
export function median(values: readonly number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  const hi = s[mid];
  const lo = s[mid - 1];
  if (hi === undefined) throw new Error("Median of an empty list");
  return s.length % 2 === 1 || lo === undefined ? hi : (lo + hi) / 2;
}

/** Median figure of a cell, or undefined if it has no usable result. */
export function cellMedian(cell: Cell | undefined): number | undefined {
  return cell?.status === "ok" && cell.samples.length > 0
    ? median(cell.samples.map((s) => s.value))
    : undefined;
}

/** Server CPU seconds per GiB moved over all samples of a cell. */
export function cellCpuPerGiB(cell: Cell | undefined): number | undefined {
  if (cell?.status !== "ok") return undefined;
  const cpu = cell.samples.reduce((a, s) => a + s.cpuSeconds, 0);
  const bytes = cell.samples.reduce((a, s) => a + s.bytes, 0);
  return bytes > 0 ? cpu / (bytes / GiB) : undefined;
}

/** Largest per-run server peak RSS of a cell in KiB, or undefined if none was read. */
export function cellPeakRssKiB(cell: Cell | undefined): number | undefined {
  if (cell?.status !== "ok") return undefined;
  const peak = Math.max(0, ...cell.samples.map((s) => s.peakRssKiB));
  return peak > 0 ? peak : undefined;
}

/** Ratio of the medians of two cells, or undefined if either has no result. */
export function cellRatio(a: Cell | undefined, b: Cell | undefined): number | undefined {
  const x = cellMedian(a);
  const y = cellMedian(b);
  return x !== undefined && y !== undefined && y > 0 ? x / y : undefined;
}

/** Ratio pairs whose two servers are both part of `r`. */
function selectedPairs(r: BenchResults): ReadonlyArray<readonly [string, string]> {
  const ids = new Set(r.servers.map((s) => s.id));
  return RATIO_PAIRS.filter(([a, b]) => ids.has(a) && ids.has(b));
}

/** A row title without its trailing unit (", MiB/s" or ", IOPS"). */
function rowLabel(row: RowDef): string {
  return row.title.replace(/, [^,]+$/, "");
}

function short(text: string, max = 90): string {
  const t = text.replace(/\|/g, "\\|");
  return t.length > max ? t.slice(0, max - 1) + "…" : t;
}

function formatValue(v: number, unit: RowDef["unit"]): string {
  return unit === "IOPS" ? Math.round(v).toLocaleString("en-US") : v.toFixed(0);
}

/**
 * Table text of a cell: "—" if the server does not run the row, the error (in full in the main
 * table, as a bare "error" in the cost tables) if it failed, else `text(cell)`.
 */
function cellText(
  cell: Cell | undefined,
  text: (c: Cell) => string | undefined,
  opts: { fullError: boolean },
): string {
  if (!cell || cell.status === "unsupported") return "—";
  if (cell.status === "failed") {
    if (!opts.fullError) return "error";
    // Runs that succeeded before the failure (e.g. a server that stalled on the 3rd repeat).
    const n = cell.samples.length;
    const before = n > 0
      ? `${text({ status: "ok", samples: cell.samples })} in ${n} run(s), then `
      : "";
    return `${before}error: ${short(cell.error, 80)}`;
  }
  return text(cell) ?? "n/a";
}

/** Ratio column text: "—" when a server does not run the row, "error" when one failed. */
function ratioText(a: Cell | undefined, b: Cell | undefined): string {
  if (!a || !b || a.status === "unsupported" || b.status === "unsupported") return "—";
  if (a.status === "failed" || b.status === "failed") return "error";
  const ratio = cellRatio(a, b);
  return ratio === undefined ? "n/a" : `${ratio.toFixed(2)}×`;
}

function table(head: readonly string[], body: readonly (readonly string[])[]): string {
  const line = (cols: readonly string[]) => `| ${cols.join(" | ")} |`;
  return [line(head), line(head.map(() => "---")), ...body.map(line)].join("\n");
}

/** Renders the Markdown report. */
export function renderMarkdown(r: BenchResults): string {
  const pairs = selectedPairs(r);
  const label = (id: string) => r.servers.find((s) => s.id === id)?.label ?? id;

  const perf = table(
    ["row", ...r.servers.map((s) => s.label), ...pairs.map(([a, b]) => `${label(a)}/${label(b)}`)],
    r.rows.map((row) => {
      const cells = r.cells[row.id] ?? {};
      const ratios = pairs.map(([a, b]) => ratioText(cells[a], cells[b]));
      return [
        row.title,
        ...r.servers.map((s) =>
          cellText(cells[s.id], (c) => {
            const m = cellMedian(c);
            if (m === undefined || c.status !== "ok") return undefined;
            const v = c.samples.map((x) => x.value);
            const spread = v.length > 1
              ? ` (${formatValue(Math.min(...v), row.unit)}–${
                formatValue(Math.max(...v), row.unit)
              })`
              : "";
            return formatValue(m, row.unit) + spread;
          }, { fullError: true })
        ),
        ...ratios,
      ];
    }),
  );

  const cpu = table(
    ["row", ...r.servers.map((s) => s.label)],
    r.rows.map((row) => {
      const cells = r.cells[row.id] ?? {};
      return [
        rowLabel(row),
        ...r.servers.map((s) =>
          cellText(cells[s.id], (c) => cellCpuPerGiB(c)?.toFixed(2), { fullError: false })
        ),
      ];
    }),
  );

  const rowRss = table(
    ["row", ...r.servers.map((s) => s.label)],
    r.rows.map((row) => {
      const cells = r.cells[row.id] ?? {};
      return [
        rowLabel(row),
        ...r.servers.map((s) =>
          cellText(cells[s.id], (c) => {
            const kib = cellPeakRssKiB(c);
            return kib === undefined ? undefined : (kib / 1024).toFixed(1);
          }, { fullError: false })
        ),
      ];
    }),
  );

  const rss = table(
    ["server", "format", "peak RSS (VmHWM), MiB", "command"],
    r.instances.map((i) => [
      label(i.serverId),
      i.format,
      i.failure && i.peakRssKiB === 0
        ? `n/a (${short(i.failure)})`
        : (i.peakRssKiB / 1024).toFixed(1),
      short("`" + i.argv.join(" ") + "`", 400),
    ]),
  );

  const failures = r.instances.filter((i) => i.failure).map((i) =>
    `- ${label(i.serverId)} (${i.format}): ${i.failure} — log: ${i.logFile}`
  );
  for (const row of r.rows) {
    for (const s of r.servers) {
      const c = r.cells[row.id]?.[s.id];
      const startFailure = r.instances.find((i) => i.serverId === s.id && i.format === row.format)
        ?.failure;
      if (c?.status === "failed" && c.error !== startFailure) {
        failures.push(`- ${row.id} on ${s.label}: ${c.error}`);
      }
    }
  }

  return [
    `# denbd benchmark, ${r.meta["date"]}`,
    "",
    ...Object.entries(r.meta).map(([k, v]) => `- ${k}: ${v}`),
    "",
    "Median of the repeats (min–max in brackets); higher is better. Ratios above 1 mean denbd " +
    "is faster.",
    "",
    perf,
    "",
    ...(r.chartFile ? [`![ratio chart](${r.chartFile})`, ""] : []),
    "## Server CPU seconds per GiB moved (user + system, all repeats; lower is better)",
    "",
    cpu,
    "",
    "## Server peak RSS per row, MiB (VmHWM reset before each run; largest run)",
    "",
    rowRss,
    "",
    "## Server peak RSS per instance (whole life, all rows)",
    "",
    rss,
    "",
    "## Notes",
    "",
    ...r.notes.map((n) => `- ${n}`),
    ...(failures.length ? ["", "## Failures", "", ...failures] : []),
    "",
  ].join("\n");
}

/** The JSON document: meta, instances and every sample, with medians precomputed. */
export function renderJson(r: BenchResults): string {
  return JSON.stringify(
    {
      meta: r.meta,
      notes: r.notes,
      servers: r.servers.map((s) => ({ id: s.id, label: s.label, formats: s.formats })),
      instances: r.instances,
      rows: r.rows.map((row) => ({
        id: row.id,
        title: row.title,
        format: row.format,
        unit: row.unit,
        cells: Object.fromEntries(
          r.servers.map((s) => {
            const c = r.cells[row.id]?.[s.id] ?? { status: "unsupported" as const };
            return [s.id, {
              ...c,
              median: cellMedian(c),
              cpuSecondsPerGiB: cellCpuPerGiB(c),
              peakRssKiB: cellPeakRssKiB(c),
            }];
          }),
        ),
      })),
    },
    null,
    2,
  ) + "\n";
}

/**
 * The ratio chart of `r`: one group per row, one bar per ratio pair whose servers were both
 * selected. A failed cell shows as a note instead of a bar; a row neither server of a pair
 * supports shows nothing for that pair.
 */
export function ratioChartOf(r: BenchResults): RatioChart {
  const pairs = selectedPairs(r);
  const label = (id: string) => r.servers.find((s) => s.id === id)?.label ?? id;
  const size = r.meta["image size"];
  return {
    title: "denbd throughput relative to other servers (> 1× means denbd is faster)",
    subtitle: `${r.meta["date"]}, ${r.meta["mode"]} run, ${r.meta["repeats"]} repeat(s), ` +
      `median ratios${typeof size === "string" ? `; ${size.replace(/,.*$/, "")} image` : ""}`,
    series: pairs.map(([a, b]) => `${label(a)}/${label(b)}`),
    groups: r.rows.map((row) => {
      const cells = r.cells[row.id] ?? {};
      return {
        label: rowLabel(row),
        values: pairs.map(([a, b]): RatioValue => {
          const ca = cells[a];
          const cb = cells[b];
          if (!ca || !cb || ca.status === "unsupported" || cb.status === "unsupported") {
            return undefined;
          }
          if (ca.status === "failed") return `${label(a)} error`;
          if (cb.status === "failed") return `${label(b)} error`;
          return cellRatio(ca, cb) ?? "n/a";
        }),
      };
    }),
  };
}
