/**
 * A self-contained SVG grouped horizontal bar chart of speed ratios (one group per benchmark row,
 * one bar per server pair) with a reference line at 1×. Pure: data in, SVG text out, no fonts,
 * scripts or external references, so the file renders the same in a browser, an image viewer or a
 * Markdown preview.
 *
 * @module
 */

/** One bar: a ratio, a short note drawn instead of a bar (e.g. "denbd error"), or nothing. */
export type RatioValue = number | string | undefined;

/** What the chart shows. */
export interface RatioChart {
  readonly title: string;
  readonly subtitle?: string;
  /** Legend entries, one per bar of a group (e.g. "denbd/qemu-nbd"). */
  readonly series: readonly string[];
  /** One group per row; `values[i]` belongs to `series[i]`. */
  readonly groups: readonly { readonly label: string; readonly values: readonly RatioValue[] }[];
}

const FONT_PX = 12;
/** Generous average glyph width of a 12 px sans-serif font, so labels never overrun. */
const CHAR_PX = 7;
const MAX_LABEL_CHARS = 70;
const BAR_PX = 14;
const BAR_GAP_PX = 2;
const GROUP_PAD_PX = 7;
const PLOT_PX = 460;
/** Room right of the plot for the value printed after the longest bar. */
const RIGHT_PX = 64;
const PLOT_TOP_PX = 92;
/** Value labels: small text with a white outline, so it stays legible across lines and bars. */
const HALO = `font-size="11" stroke="#ffffff" stroke-width="3" paint-order="stroke"`;
const COLORS = ["#3b6ea8", "#e0892c", "#4f9a4a", "#c8454b", "#7d5ba6"];

/** Escapes text for XML character data and attribute values. */
export function escapeXml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** A round tick step giving at most ~6 intervals up to `max`. */
export function tickStep(max: number): number {
  const raw = max / 6;
  const pow = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5]) if (m * pow >= raw) return m * pow;
  return 10 * pow;
}

/**
 * The x axis: its right end (past the largest ratio and 1×, with some headroom, on a tick) and
 * the tick step.
 */
export function axisScale(ratios: readonly number[]): { max: number; step: number } {
  const top = Math.max(1, ...ratios) * 1.05;
  const step = tickStep(top);
  // toPrecision drops float noise such as 6 × 0.2 = 1.2000000000000002.
  return { max: Number((Math.ceil(top / step - 1e-9) * step).toPrecision(12)), step };
}

function num(n: number): string {
  return String(Math.round(n * 100) / 100);
}

function truncate(text: string, max: number): string {
  return text.length > max ? text.slice(0, max - 1) + "…" : text;
}

/** Renders `chart` as a standalone SVG document. */
export function renderRatioChart(chart: RatioChart): string {
  const ratios = chart.groups.flatMap((g) =>
    g.values.filter((v): v is number => typeof v === "number" && Number.isFinite(v))
  );
  const { max: xMax, step } = axisScale(ratios);
  const labelChars = Math.min(
    MAX_LABEL_CHARS,
    Math.max(10, ...chart.groups.map((g) => g.label.length)),
  );
  const x0 = 16 + labelChars * CHAR_PX;
  const scale = PLOT_PX / xMax;
  const bars = Math.max(1, chart.series.length);
  const groupPx = 2 * GROUP_PAD_PX + bars * BAR_PX + (bars - 1) * BAR_GAP_PX;
  const plotBottom = PLOT_TOP_PX + chart.groups.length * groupPx;
  const width = x0 + PLOT_PX + RIGHT_PX;
  const height = plotBottom + 52;
  const out: string[] = [];

  out.push(
    `<?xml version="1.0" encoding="UTF-8"?>`,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
      `viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="${FONT_PX}">`,
    `<title>${escapeXml(chart.title)}</title>`,
    `<rect x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>`,
    `<text x="16" y="24" font-size="15" font-weight="bold">${escapeXml(chart.title)}</text>`,
  );
  if (chart.subtitle) {
    out.push(
      `<text x="16" y="42" font-size="11" fill="#555555">${escapeXml(chart.subtitle)}</text>`,
    );
  }

  // Legend.
  let lx = x0;
  chart.series.forEach((name, i) => {
    const color = COLORS[i % COLORS.length]!;
    out.push(
      `<rect x="${num(lx)}" y="52" width="12" height="12" fill="${color}"/>`,
      `<text x="${num(lx + 17)}" y="62">${escapeXml(name)}</text>`,
    );
    lx += 40 + name.length * CHAR_PX;
  });

  // Zebra background, then grid lines and tick labels, so bars paint over them.
  chart.groups.forEach((_, gi) => {
    if (gi % 2 === 1) {
      out.push(
        `<rect x="0" y="${num(PLOT_TOP_PX + gi * groupPx)}" width="${width}" ` +
          `height="${groupPx}" fill="#f3f3f3"/>`,
      );
    }
  });
  for (let i = 0; i * step <= xMax + 1e-9; i++) {
    const v = Number((i * step).toPrecision(12));
    const x = num(x0 + v * scale);
    out.push(
      `<line x1="${x}" y1="${PLOT_TOP_PX}" x2="${x}" y2="${plotBottom}" stroke="#dddddd"/>`,
      `<text x="${x}" y="${plotBottom + 16}" text-anchor="middle" fill="#333333">` +
        `${num(v)}×</text>`,
    );
  }
  out.push(
    `<line x1="${x0}" y1="${PLOT_TOP_PX}" x2="${x0}" y2="${plotBottom}" stroke="#888888"/>`,
    `<text x="${num(x0 + PLOT_PX / 2)}" y="${plotBottom + 36}" text-anchor="middle" ` +
      `fill="#333333">ratio of median throughput (denbd ÷ other server; higher is better)</text>`,
  );

  // Bars first, then the 1× line over them, then value labels (with a white halo) over both.
  const labels: string[] = [];
  chart.groups.forEach((g, gi) => {
    const top = PLOT_TOP_PX + gi * groupPx;
    out.push(
      `<text x="${x0 - 8}" y="${num(top + groupPx / 2 + FONT_PX * 0.35)}" text-anchor="end">` +
        `${escapeXml(truncate(g.label, MAX_LABEL_CHARS))}</text>`,
    );
    g.values.forEach((v, si) => {
      const y = top + GROUP_PAD_PX + si * (BAR_PX + BAR_GAP_PX);
      const textY = num(y + BAR_PX / 2 + FONT_PX * 0.35);
      const series = chart.series[si] ?? `series ${si + 1}`;
      if (typeof v === "number" && Number.isFinite(v)) {
        const w = Math.max(0, v) * scale;
        const tip = `${g.label}: ${series} = ${v.toFixed(2)}×`;
        out.push(
          `<rect class="bar" data-series="${escapeXml(series)}" data-ratio="${v.toFixed(4)}" ` +
            `x="${x0}" y="${num(y)}" width="${num(w)}" height="${BAR_PX}" ` +
            `fill="${COLORS[si % COLORS.length]}"><title>${escapeXml(tip)}</title></rect>`,
        );
        labels.push(`<text x="${num(x0 + w + 4)}" y="${textY}" ${HALO}>${v.toFixed(2)}×</text>`);
      } else if (typeof v === "string") {
        labels.push(
          `<text class="note" x="${x0 + 4}" y="${textY}" font-style="italic" fill="#b00020" ` +
            `${HALO}>${escapeXml(`${series}: ${v}`)}</text>`,
        );
      }
    });
  });

  const x1 = num(x0 + scale);
  out.push(
    `<line class="reference" x1="${x1}" y1="${PLOT_TOP_PX - 6}" x2="${x1}" y2="${plotBottom}" ` +
      `stroke="#222222" stroke-width="1.5" stroke-dasharray="5 3"/>`,
    `<text x="${x1}" y="${PLOT_TOP_PX - 9}" text-anchor="middle" font-size="11">1.0×</text>`,
    ...labels,
    `</svg>`,
    "",
  );
  return out.join("\n");
}
