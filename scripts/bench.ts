/**
 * `deno task bench`: serves the same image content with denbd, qemu-nbd and nbdkit over unix
 * sockets, runs the same clients (nbdcopy, fio's nbd engine) against each, and writes a Markdown
 * table with ratios plus a JSON file of raw samples to bench-results/.
 *
 * Rows live in `bench_lib/rows.ts`, servers in `bench_lib/servers.ts`. Every row runs against all
 * servers back to back, repeat by repeat (with a rotating server order), and the median is kept.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { ensureDenseFile, prepareImage, warmPageCache } from "./bench_lib/images.ts";
import { killAllChildren, runClient, settlesWithin, toolVersion } from "./bench_lib/proc.ts";
import {
  type BenchResults,
  type Cell,
  type InstanceResult,
  renderJson,
  renderMarkdown,
} from "./bench_lib/report.ts";
import { ROW_DEFS } from "./bench_lib/rows.ts";
import { SERVER_DEFS, ServerHandle } from "./bench_lib/servers.ts";
import type { ImageFormat, RowContext, RowDef, ServerDef } from "./bench_lib/types.ts";

const MiB = 1 << 20;

const USAGE = `Usage: deno task bench [options]

  --quick             CI smoke run: 256 MiB image, 2 s fio runs, 1 repeat
  --repeat N          measurements per row and server, median kept (default 3; quick 1)
  --runtime S         seconds per fio run (default 10; quick 2)
  --size-mib N        image size in MiB, a multiple of 8 (default 1024; quick 256)
  --dir DIR           work directory for images, sockets and logs (default /tmp/denbd-bench)
  --out DIR           where reports go (default <repo>/bench-results)
  --servers LIST      comma-separated server ids (default: all of ${
  SERVER_DEFS.map((s) => s.id).join(",")
})
  --rows LIST         comma-separated row ids (default: all of
                      ${ROW_DEFS.map((r) => r.id).join(",\n                      ")})
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

function pick<T extends { id: string }>(name: string, all: readonly T[], list?: string): T[] {
  if (list === undefined) return [...all];
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
    rows: pick("rows", ROW_DEFS, values.rows),
    startTimeoutMs: positiveInt("start-timeout", values["start-timeout"], 10) * 1000,
  };
}

/** Servers currently running, so that Ctrl-C can stop them. */
const running = new Set<ServerHandle>();

async function onSignal(): Promise<void> {
  console.error("\nInterrupted: stopping servers and clients");
  // Servers get a polite SIGTERM first; whatever is left (clients included) gets SIGKILL.
  await settlesWithin(Promise.all([...running].map((h) => h.stop())), 3000);
  killAllChildren();
  Deno.exit(130);
}

/** Runs `row` once on `server`, with the server's CPU time read around the client run. */
async function measure(row: RowDef, server: ServerHandle, ctx: RowContext) {
  await runClient(["sync"]); // Write back earlier runs' dirty pages outside the timed window.
  const cpu0 = await server.cpuSeconds();
  const sample = await row.run(ctx);
  const cpu1 = await server.cpuSeconds();
  return { ...sample, cpuSeconds: cpu1 - cpu0 };
}

/** Starts every server supporting `format`, runs `rows` on them, stops them. */
async function runFormat(
  o: Options,
  format: ImageFormat,
  rows: readonly RowDef[],
  files: { master: string; source: string },
  results: { cells: Record<string, Record<string, Cell>>; instances: InstanceResult[] },
): Promise<void> {
  const servers = o.servers.filter((s) => s.formats.includes(format));
  const handles: ServerHandle[] = [];
  try {
    for (const def of servers) {
      const image = `${o.dir}/${def.id}.${format}`;
      if (!def.unavailable?.()) {
        await prepareImage(files.master, image, format);
        await warmPageCache(image);
      }
      console.log(`Starting ${def.label} on ${image}`);
      const h = await ServerHandle.start(
        def,
        { socket: `${o.dir}/${def.id}.sock`, image, format },
        {
          logFile: `${o.dir}/${def.id}-${format}.log`,
          timeoutMs: o.startTimeoutMs,
        },
      );
      if (h.failure) console.log(`  ${def.label}: ${h.failure}`);
      else running.add(h);
      handles.push(h);
    }
    for (const row of rows) {
      console.log(`Row ${row.id}`);
      const cellOf: Record<string, Cell> = {};
      for (const h of handles) cellOf[h.def.id] = { status: "ok", samples: [] };
      for (let rep = 0; rep < o.repeat; rep++) {
        // Rotate the order so no server always runs right after the same neighbour.
        const order = handles.map((_, i) => handles[(i + rep) % handles.length]!);
        for (const h of order) {
          const cell = cellOf[h.def.id]!;
          if (cell.status !== "ok") continue;
          if (h.failure) {
            cellOf[h.def.id] = { status: "failed", error: h.failure, samples: cell.samples };
            continue;
          }
          const ctx: RowContext = {
            uri: `nbd+unix:///?socket=${h.target.socket}`,
            imageBytes: o.imageBytes,
            sourceFile: files.source,
            runtimeSeconds: o.runtime,
          };
          try {
            const s = await measure(row, h, ctx);
            cell.samples.push(s);
            console.log(
              `  [${rep + 1}/${o.repeat}] ${h.def.label}: ${s.value.toFixed(1)} ${row.unit} ` +
                `(${s.seconds.toFixed(2)} s, server CPU ${s.cpuSeconds.toFixed(2)} s)`,
            );
          } catch (e) {
            const error = h.failure ?? (e as Error).message;
            cellOf[h.def.id] = { status: "failed", error, samples: cell.samples };
            console.log(`  [${rep + 1}/${o.repeat}] ${h.def.label}: failed: ${error}`);
          }
        }
      }
      const rowCells = (results.cells[row.id] ??= {});
      Object.assign(rowCells, cellOf);
    }
  } finally {
    for (const h of handles) {
      await h.stop();
      running.delete(h);
      await Deno.remove(h.target.image).catch(() => {}); // Private copy; the master is kept.
      results.instances.push({
        serverId: h.def.id,
        format,
        argv: h.argv,
        logFile: h.logFile,
        failure: h.failure,
        peakRssKiB: h.peakRssKiB,
      });
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

  const files = { master: `${o.dir}/master-${mib}M.raw`, source: `${o.dir}/source-${mib}M.raw` };
  console.log(`Preparing ${mib} MiB dense images in ${o.dir}`);
  await ensureDenseFile(files.master, o.imageBytes, 0x9e3779b9);
  await ensureDenseFile(files.source, o.imageBytes, 0x85ebca6b);
  await warmPageCache(files.source);

  const results: { cells: Record<string, Record<string, Cell>>; instances: InstanceResult[] } = {
    cells: {},
    instances: [],
  };
  for (const row of o.rows) {
    results.cells[row.id] = Object.fromEntries(
      o.servers.map((s) => [s.id, { status: "unsupported" } as Cell]),
    );
  }
  const formats = [...new Set(o.rows.map((r) => r.format))];
  for (const format of formats) {
    await runFormat(o, format, o.rows.filter((r) => r.format === format), files, results);
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
      "each may advertise NBD_FLAG_CAN_MULTI_CONN and nbdcopy uses its default 4 connections.",
      "qemu-nbd runs with its defaults, `--cache=writeback --aio=threads`; the io_uring column " +
      "differs only in `--aio=io_uring`.",
      "Each server has a private copy of the image; `sync` runs before every measurement.",
      "nbdcopy write uses `--sparse=0` and no `--flush`; fio uses its nbd engine (libnbd), one " +
      "connection per job.",
      "Clients share the host's CPUs with the server, so figures are relative, not absolute.",
    ],
    servers: o.servers,
    rows: o.rows,
    cells: results.cells,
    instances: results.instances,
  };
  const md = renderMarkdown(report);
  const stamp = date.toISOString().replace(/:/g, "-").replace(/\.\d+Z$/, "Z");
  const base = `${o.out}/bench-${stamp}${o.quick ? "-quick" : ""}`;
  await Deno.writeTextFile(`${base}.md`, md);
  await Deno.writeTextFile(`${base}.json`, renderJson(report));
  console.log("\n" + md);
  console.log(`Wrote ${base}.md and ${base}.json`);
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
