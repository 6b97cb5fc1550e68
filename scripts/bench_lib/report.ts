/**
 * Turns benchmark results into a Markdown report (figures, ratios, server CPU per GiB, peak RSS)
 * and a JSON document with every raw sample.
 *
 * @module
 */

import type { ImageFormat, RowDef, Sample, ServerDef } from "./types.ts";

/** One client run plus the server CPU it cost. */
export interface MeasuredSample extends Sample {
  /** Server CPU seconds (user + system) consumed during the run. */
  readonly cpuSeconds: number;
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
}

const GiB = 1 << 30;

/** Ratio columns: [numerator, denominator] server ids, shown when both are selected. */
const RATIO_PAIRS: ReadonlyArray<readonly [string, string]> = [
  ["denbd", "qemu-nbd"],
  ["denbd", "nbdkit"],
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

function short(text: string, max = 90): string {
  const t = text.replace(/\|/g, "\\|");
  return t.length > max ? t.slice(0, max - 1) + "…" : t;
}

function formatValue(v: number, unit: RowDef["unit"]): string {
  return unit === "IOPS" ? Math.round(v).toLocaleString("en-US") : v.toFixed(0);
}

function cellText(cell: Cell | undefined, text: (c: Cell) => string | undefined): string {
  if (!cell || cell.status === "unsupported") return "—";
  if (cell.status === "failed") return `n/a (${short(cell.error)})`;
  return text(cell) ?? "n/a";
}

function table(head: readonly string[], body: readonly (readonly string[])[]): string {
  const line = (cols: readonly string[]) => `| ${cols.join(" | ")} |`;
  return [line(head), line(head.map(() => "---")), ...body.map(line)].join("\n");
}

/** Renders the Markdown report. */
export function renderMarkdown(r: BenchResults): string {
  const ids = new Set(r.servers.map((s) => s.id));
  const pairs = RATIO_PAIRS.filter(([a, b]) => ids.has(a) && ids.has(b));
  const label = (id: string) => r.servers.find((s) => s.id === id)?.label ?? id;

  const perf = table(
    ["row", ...r.servers.map((s) => s.label), ...pairs.map(([a, b]) => `${label(a)}/${label(b)}`)],
    r.rows.map((row) => {
      const cells = r.cells[row.id] ?? {};
      const ratios = pairs.map(([a, b]) => {
        const x = cellMedian(cells[a]);
        const y = cellMedian(cells[b]);
        return x !== undefined && y !== undefined && y > 0 ? `${(x / y).toFixed(2)}×` : "n/a";
      });
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
          })
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
        row.title.replace(/, [^,]+$/, ""),
        ...r.servers.map((s) => cellText(cells[s.id], (c) => cellCpuPerGiB(c)?.toFixed(2))),
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
    "## Server CPU seconds per GiB moved (user + system, all repeats; lower is better)",
    "",
    cpu,
    "",
    "## Server peak RSS",
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
            return [s.id, { ...c, median: cellMedian(c), cpuSecondsPerGiB: cellCpuPerGiB(c) }];
          }),
        ),
      })),
    },
    null,
    2,
  ) + "\n";
}
