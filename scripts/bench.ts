/**
 * `deno task bench`: serves the same image content with denbd, qemu-nbd and nbdkit over unix
 * sockets, runs the same clients (nbdcopy, fio's nbd engine) against each, and writes a Markdown
 * table with ratios plus a JSON file of raw samples to bench-results/.
 *
 * Rows live in `bench_lib/rows.ts`, servers in `bench_lib/servers.ts`. Every row runs against all
 * servers back to back, repeat by repeat (with a rotating server order), and the median is kept.
 * Rows on an image that writes would change (`qcow2-empty`) get a fresh image and a freshly
 * started server for every single measurement. A ratio chart (SVG) is written beside the report.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { renderRatioChart } from "./bench_lib/chart.ts";
import { ensureDenseFile, prepareImage, warmPageCache } from "./bench_lib/images.ts";
import { estimateSeconds, formatDuration, selectRows } from "./bench_lib/plan.ts";
import { killAllChildren, runClient, settlesWithin, toolVersion } from "./bench_lib/proc.ts";
import {
  type BenchResults,
  type Cell,
  type InstanceResult,
  type MeasuredSample,
  ratioChartOf,
  renderJson,
  renderMarkdown,
} from "./bench_lib/report.ts";
import { type Origin, startOrigin } from "./bench_lib/origins.ts";
import { ROW_DEFS } from "./bench_lib/rows.ts";
import { SERVER_DEFS, ServerHandle } from "./bench_lib/servers.ts";
import {
  type BenchCredentials,
  clientUri,
  makeBenchCredentials,
  removeBenchCredentials,
} from "./bench_lib/tls.ts";
import { FORMAT_INFO } from "./bench_lib/types.ts";
import type { ImageFormat, RowContext, RowDef, ServerDef } from "./bench_lib/types.ts";

const MiB = 1 << 20;

const USAGE = `Usage: deno task bench [options]

  --quick             CI smoke run: the rows marked (q) below, 256 MiB image, 2 s fio runs,
                      1 repeat
  --repeat N          measurements per row and server, median kept (default 3; quick 1)
  --runtime S         seconds per fio run (default 10; quick 2)
  --size-mib N        image size in MiB, a multiple of 8 (default 1024; quick 256)
  --dir DIR           work directory for images, sockets and logs (default /tmp/denbd-bench)
  --out DIR           where reports go (default <repo>/bench-results)
  --servers LIST      comma-separated server ids (default: ${
  SERVER_DEFS.filter((s) => !s.extra).map((s) => s.id).join(",")
};
                      denbd variants: ${
  SERVER_DEFS.filter((s) => s.extra).map((s) => s.id).join(",\n                        ")
})
  --rows LIST         comma-separated row ids (default: all; --quick: those marked (q)):
                      ${
  ROW_DEFS.map((r) => `${r.id}${r.quick ? " (q)" : ""}`).join("\n                      ")
}
  --start-timeout S   seconds a server may take to accept a connection (default 10)
  -h, --help          this text
`;

interface Options {
  readonly quick: boolean;
  readonly repeat: number;
  readonly runtime: number;
  readonly imageBytes: number;
  readonly dir: string;
  readonly out: string;
  readonly servers: readonly ServerDef[];
  readonly rows: readonly RowDef[];
  readonly startTimeoutMs: number;
}

function positiveInt(name: string, text: string | undefined, fallback: number): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`--${name} must be a positive integer`);
  return n;
}

function pick(name: string, all: readonly ServerDef[], list?: string): ServerDef[] {
  if (list === undefined) return all.filter((x) => !x.extra);
  return list.split(",").map((id) => {
    const found = all.find((x) => x.id === id.trim());
    if (!found) throw new Error(`--${name}: unknown id "${id}"; known: ${all.map((x) => x.id)}`);
    return found;
  });
}

function parseOptions(args: string[]): Options | undefined {
  const { values } = parseArgs({
    args,
    options: {
      quick: { type: "boolean", default: false },
      repeat: { type: "string" },
      runtime: { type: "string" },
      "size-mib": { type: "string" },
      dir: { type: "string", default: "/tmp/denbd-bench" },
      out: { type: "string" },
      servers: { type: "string" },
      rows: { type: "string" },
      "start-timeout": { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    console.log(USAGE);
    return undefined;
  }
  const quick = values.quick;
  const sizeMiB = positiveInt("size-mib", values["size-mib"], quick ? 256 : 1024);
  if (sizeMiB % 8 !== 0) throw new Error("--size-mib must be a multiple of 8");
  return {
    quick,
    repeat: positiveInt("repeat", values.repeat, quick ? 1 : 3),
    runtime: positiveInt("runtime", values.runtime, quick ? 2 : 10),
    imageBytes: sizeMiB * MiB,
    dir: values.dir,
    out: values.out ??
      decodeURIComponent(new URL("../bench-results", import.meta.url).pathname),
    servers: pick("servers", SERVER_DEFS, values.servers),
    rows: selectRows(ROW_DEFS, { quick, ids: values.rows?.split(",") }),
    startTimeoutMs: positiveInt("start-timeout", values["start-timeout"], 10) * 1000,
  };
}

/** Servers and origins currently running, so that Ctrl-C can stop them. */
const running = new Set<ServerHandle>();
const runningOrigins = new Set<Origin>();

async function onSignal(): Promise<void> {
  console.error("\nInterrupted: stopping servers and clients");
  // Servers get a polite SIGTERM first; whatever is left (clients included) gets SIGKILL.
  await settlesWithin(
    Promise.all([
      ...[...running].map((h) => h.stop()),
      ...[...runningOrigins].map((x) => x.stop()),
    ]),
    3000,
  );
  killAllChildren();
  Deno.exit(130);
}

/** Runs `row` once on `server`, with the server's CPU time and peak RSS read around the run. */
async function measure(
  row: RowDef,
  server: ServerHandle,
  ctx: RowContext,
): Promise<MeasuredSample> {
  await runClient(["sync"]); // Write back earlier runs' dirty pages outside the timed window.
  const windowed = await server.resetPeakRss();
  const before = await server.usage();
  const sample = await row.run(ctx);
  const after = await server.usage();
  return {
    ...sample,
    cpuSeconds: after.cpuSeconds - before.cpuSeconds,
    peakRssKiB: windowed ? after.peakRssKiB : 0,
  };
}

type Results = {
  cells: Record<string, Record<string, Cell>>;
  instances: InstanceResult[];
  /** How each remote format's origin ran, for the notes. */
  origins: string[];
};
/** The master image, the write rows' source, and the TLS rows' credentials (when selected). */
type Files = { master: string; source: string; tls?: BenchCredentials };

/** Measures `row` once on `h` into `cells[h.def.id]`; a failure closes the cell, never the run. */
async function measureInto(
  o: Options,
  row: RowDef,
  h: ServerHandle,
  run: { cells: Record<string, Cell>; files: Files; rep: number },
): Promise<void> {
  const id = h.def.id;
  const cell = run.cells[id];
  if (cell?.status !== "ok") return;
  const progress = `  [${run.rep + 1}/${o.repeat}] ${h.def.label}`;
  if (h.failure) {
    run.cells[id] = { status: "failed", error: h.failure, samples: cell.samples };
    console.log(`${progress}: ${h.failure}`);
    return;
  }
  const ctx: RowContext = {
    uri: clientUri(h.target),
    imageBytes: o.imageBytes,
    sourceFile: run.files.source,
    runtimeSeconds: o.runtime,
  };
  try {
    const s = await measure(row, h, ctx);
    cell.samples.push(s);
    console.log(
      `${progress}: ${s.value.toFixed(1)} ${row.unit} (${s.seconds.toFixed(2)} s, ` +
        `server CPU ${s.cpuSeconds.toFixed(2)} s, peak RSS ${
          (s.peakRssKiB / 1024).toFixed(0)
        } MiB)`,
    );
  } catch (e) {
    const error = h.failure ?? (e as Error).message;
    run.cells[id] = { status: "failed", error, samples: cell.samples };
    console.log(`${progress}: failed: ${error}`);
  }
}

/**
 * Prepares a private image of `format` for `def` and starts `def` on it; with `origin` (remote
 * formats) `def` re-exports that URI or URL instead.
 */
async function startInstance(
  o: Options,
  def: ServerDef,
  format: ImageFormat,
  files: Files,
  origin?: Origin,
): Promise<ServerHandle> {
  const image = origin === undefined
    ? `${o.dir}/${def.id}.${format}`
    : origin.privateImage && !def.unavailable?.()
    ? await origin.privateImage(def.id)
    : origin.url;
  if (!origin && !def.unavailable?.()) {
    await prepareImage(files.master, image, format);
    if (!FORMAT_INFO[format].freshPerRun) await warmPageCache(image);
  }
  const mode = FORMAT_INFO[format].tls;
  if (mode !== undefined && files.tls === undefined) throw new Error("no TLS credentials");
  const tls = mode === undefined ? undefined : { mode, creds: files.tls! };
  const h = await ServerHandle.start(
    def,
    { socket: `${o.dir}/${def.id}.sock`, image, format, tls },
    { logFile: `${o.dir}/${def.id}-${format}.log`, timeoutMs: o.startTimeoutMs },
  );
  if (h.failure) console.log(`  ${def.label}: ${h.failure}`);
  else running.add(h);
  return h;
}

/** Stops `h`, deletes its private image and records the instance (merged per server and format). */
async function stopInstance(h: ServerHandle, results: Results): Promise<void> {
  await h.stop();
  running.delete(h);
  if (!FORMAT_INFO[h.target.format].remote) {
    await Deno.remove(h.target.image).catch(() => {}); // Private copy; the master is kept.
  }
  const format = h.target.format;
  const i = results.instances.findIndex((x) => x.serverId === h.def.id && x.format === format);
  const prev = i >= 0 ? results.instances[i] : undefined;
  const merged: InstanceResult = {
    serverId: h.def.id,
    format,
    argv: h.argv,
    logFile: h.logFile,
    failure: prev?.failure ?? h.failure,
    peakRssKiB: Math.max(prev?.peakRssKiB ?? 0, h.peakRssKiB),
  };
  if (prev) results.instances[i] = merged;
  else results.instances.push(merged);
}

function initialCells(servers: readonly ServerDef[]): Record<string, Cell> {
  return Object.fromEntries(servers.map((s) => [s.id, { status: "ok", samples: [] } as Cell]));
}

/** Rotates `list` by `n`, so no server always runs right after the same neighbour. */
function rotated<T>(list: readonly T[], n: number): T[] {
  return list.map((_, i) => list[(i + n) % list.length]!);
}

/** Runs `rows` (all of one format) on every selected server supporting the format. */
async function runFormat(
  o: Options,
  format: ImageFormat,
  rows: readonly RowDef[],
  files: Files,
  results: Results,
): Promise<void> {
  const servers = o.servers.filter((s) => s.formats.includes(format));
  if (FORMAT_INFO[format].freshPerRun) {
    for (const row of rows) {
      console.log(`Row ${row.id} (fresh ${format} image and server per measurement)`);
      const cells = initialCells(servers);
      for (let rep = 0; rep < o.repeat; rep++) {
        for (const def of rotated(servers, rep)) {
          if (cells[def.id]?.status !== "ok") continue;
          const h = await startInstance(o, def, format, files);
          try {
            await measureInto(o, row, h, { cells, files, rep });
          } finally {
            await stopInstance(h, results);
          }
        }
      }
      Object.assign(results.cells[row.id] ??= {}, cells);
    }
    return;
  }
  const handles: ServerHandle[] = [];
  let origin: Origin | undefined;
  try {
    if (FORMAT_INFO[format].remote) {
      console.log(`Starting the ${format} origin`);
      try {
        origin = await startOrigin(format, {
          dir: o.dir,
          master: files.master,
          timeoutMs: o.startTimeoutMs,
        });
      } catch (e) {
        const error = `origin did not start: ${(e as Error).message}`;
        console.log(`  ${error}`);
        for (const row of rows) {
          for (const def of servers) {
            results.cells[row.id]![def.id] = { status: "failed", error, samples: [] };
          }
        }
        return;
      }
      runningOrigins.add(origin);
      results.origins.push(`${FORMAT_INFO[format].label}: ${origin.description}`);
    }
    for (const def of servers) {
      console.log(`Starting ${def.label} on ${format}`);
      handles.push(await startInstance(o, def, format, files, origin));
    }
    for (const row of rows) {
      console.log(`Row ${row.id}`);
      const cells = initialCells(servers);
      for (let rep = 0; rep < o.repeat; rep++) {
        for (const h of rotated(handles, rep)) await measureInto(o, row, h, { cells, files, rep });
      }
      Object.assign(results.cells[row.id] ??= {}, cells);
    }
  } finally {
    for (const h of handles) await stopInstance(h, results);
    if (origin) {
      await origin.stop();
      runningOrigins.delete(origin);
    }
  }
}

async function main(args: string[]): Promise<number> {
  const o = parseOptions(args);
  if (!o) return 0;
  await Deno.mkdir(o.dir, { recursive: true });
  await Deno.mkdir(o.out, { recursive: true });
  const date = new Date();
  const mib = o.imageBytes / MiB;

  const estimate = estimateSeconds({
    rows: o.rows,
    servers: o.servers,
    repeat: o.repeat,
    imageBytes: o.imageBytes,
    runtimeSeconds: o.runtime,
  });
  console.log(
    `${o.rows.length} row(s) × up to ${o.servers.length} server(s) × ${o.repeat} repeat(s), ` +
      `${mib} MiB image, ${o.runtime} s fio runs: estimated ${formatDuration(estimate)}`,
  );

  const files: Files = {
    master: `${o.dir}/master-${mib}M.raw`,
    source: `${o.dir}/source-${mib}M.raw`,
  };
  console.log(`Preparing ${mib} MiB dense images in ${o.dir}`);
  await ensureDenseFile(files.master, o.imageBytes, 0x9e3779b9);
  await ensureDenseFile(files.source, o.imageBytes, 0x85ebca6b);
  await warmPageCache(files.source);

  const results: Results = { cells: {}, instances: [], origins: [] };
  for (const row of o.rows) {
    results.cells[row.id] = Object.fromEntries(
      o.servers.map((s) => [s.id, { status: "unsupported" } as Cell]),
    );
  }
  const formats = [...new Set(o.rows.map((r) => r.format))];
  const withTls = formats.some((f) => FORMAT_INFO[f].tls !== undefined);
  if (withTls) {
    console.log("Making TLS credentials (certtool)");
    files.tls = await makeBenchCredentials();
  }
  try {
    for (const format of formats) {
      await runFormat(o, format, o.rows.filter((r) => r.format === format), files, results);
    }
  } finally {
    if (files.tls) await removeBenchCredentials(files.tls);
  }

  const report: BenchResults = {
    meta: {
      date: date.toISOString(),
      mode: o.quick ? "quick" : "full",
      "image size": `${mib} MiB, dense pseudo-random data, page cache warm`,
      repeats: o.repeat,
      "fio runtime per run": `${o.runtime} s`,
      host: `${navigator.hardwareConcurrency} CPUs, Linux ${await toolVersion(["uname", "-r"])}`,
      deno: Deno.version.deno,
      "qemu-nbd": await toolVersion(["qemu-nbd", "--version"]),
      nbdkit: await toolVersion(["nbdkit", "--version"]),
      nbdcopy: await toolVersion(["nbdcopy", "--version"]),
      fio: await toolVersion(["fio", "--version"]),
    },
    notes: [
      "All servers run on unix sockets with `-e 0` (unlimited clients; nbdkit's default), so " +
      "each advertises NBD_FLAG_CAN_MULTI_CONN and nbdcopy really opens `--connections` N.",
      "qemu-nbd runs with its defaults, `--cache=writeback --aio=threads`; the io_uring column " +
      "differs only in `--aio=io_uring`. nbdkit has no qcow2 support (—).",
      "Each server has a private copy of the image; `sync` runs before every measurement.",
      "nbdcopy write uses `--sparse=0` and no `--flush`; fio uses its nbd engine (libnbd) with " +
      "`--numjobs` jobs, each its own NBD connection, and the IOPS of all jobs summed.",
      "qcow2 (allocated): the raw master converted with `qemu-img convert`, so every cluster " +
      "holds data and writes overwrite in place. qcow2 (empty): a new `qemu-img create -f qcow2` " +
      "image and a newly started server for every measurement, so writes allocate clusters; " +
      "fio runs are time-based, so later random writes may land in clusters allocated earlier.",
      "Peak RSS per row: the server's VmHWM is reset (`clear_refs` 5) before each run and read " +
      "after it; the largest run is shown.",
      "Clients share the host's CPUs with the server, so figures are relative, not absolute.",
      ...(results.origins.length === 0 ? [] : [
        "Remote rows via NBD or HTTP: one origin per format serves every server, which " +
        "re-exports it with `-r` (denbd and qemu-nbd: the URI or URL as FILE; nbdkit: " +
        "`nbdkit -r nbd socket=ORIGIN` or `nbdkit -r curl URL`); CPU and RSS are the proxy's " +
        "alone. nbdkit 1.32 has no qcow2 reader, so its qcow2-via-HTTP cell is n/a (—).",
        ...results.origins.map((d) => `Origin, ${d}.`),
      ]),
      ...(!withTls ? [] : [
        "TLS rows: the raw image over TLS 1.3 with one set of credentials made by certtool " +
        "(RSA 2048). denbd and qemu-nbd: `--object tls-creds-x509,...,verify-peer=on` or " +
        "`tls-creds-psk` and `--tls-creds`; nbdkit: `--tls=require --tls-certificates=DIR " +
        "--tls-verify-peer` or `--tls=require --tls-psk=FILE`. Clients use `nbds+unix://` with " +
        "`tls-certificates=` (a client certificate) or `tls-psk-file=`.",
      ]),
    ],
    servers: o.servers,
    rows: o.rows,
    cells: results.cells,
    instances: results.instances,
  };
  const stamp = date.toISOString().replace(/:/g, "-").replace(/\.\d+Z$/, "Z");
  const name = `bench-${stamp}${o.quick ? "-quick" : ""}`;
  const base = `${o.out}/${name}`;
  const chart = ratioChartOf(report);
  const written = [`${base}.md`, `${base}.json`];
  if (chart.series.length > 0) {
    await Deno.writeTextFile(`${base}.svg`, renderRatioChart(chart));
    written.push(`${base}.svg`);
  }
  const md = renderMarkdown({
    ...report,
    chartFile: chart.series.length > 0 ? `${name}.svg` : undefined,
  });
  await Deno.writeTextFile(`${base}.md`, md);
  await Deno.writeTextFile(`${base}.json`, renderJson(report));
  console.log("\n" + md);
  console.log(`Wrote ${written.join(", ")}`);
  return 0;
}

if (import.meta.main) {
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  let code = 1;
  try {
    code = await main(Deno.args);
  } catch (e) {
    console.error(`bench: ${(e as Error).message}`);
  } finally {
    killAllChildren();
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
  }
  Deno.exit(code);
}
