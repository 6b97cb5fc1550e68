/**
 * Child processes for the benchmark: a registry of every live child so that a signal handler or a
 * `finally` block can kill them all, a helper that runs a client to completion, and readers for a
 * server's CPU time and peak RSS from /proc.
 *
 * @module
 */

const live = new Set<Deno.ChildProcess>();

/** Spawns `argv` and remembers the child until it exits; the caller owns stdout/stderr. */
export function spawnTracked(
  argv: readonly string[],
  options: { stdout: "piped" | "null"; stderr: "piped" | "null" },
): Deno.ChildProcess {
  const [program, ...args] = argv;
  if (program === undefined) throw new Error("Empty command line");
  const child = new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: options.stdout,
    stderr: options.stderr,
  }).spawn();
  live.add(child);
  child.status.finally(() => live.delete(child));
  return child;
}

/** Sends SIGKILL to every child still running (used on Ctrl-C, after the polite path). */
export function killAllChildren(): void {
  for (const child of live) {
    try {
      child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }
}

/** Result of a client run. */
export interface RunResult {
  readonly stdout: string;
  readonly stderr: string;
  /** Wall-clock seconds from spawn to exit. */
  readonly seconds: number;
}

/** A client that exited unsuccessfully; keeps its output so a row can explain the failure. */
export class ClientError extends Error {
  readonly stdout: string;
  readonly stderr: string;
  constructor(message: string, output: { stdout: string; stderr: string }) {
    super(message);
    this.name = "ClientError";
    this.stdout = output.stdout;
    this.stderr = output.stderr;
  }
}

/**
 * Runs a client to completion; throws a ClientError with its exit code and stderr tail on failure.
 * With `timeoutMs` a client still running then is killed (SIGKILL) and the run fails: a stalled
 * server (qemu-nbd 7.2's curl driver sometimes stops for good) must not hang the benchmark.
 */
export async function runClient(
  argv: readonly string[],
  opts: { timeoutMs?: number } = {},
): Promise<RunResult> {
  const start = performance.now();
  const child = spawnTracked(argv, { stdout: "piped", stderr: "piped" });
  let timedOut = false;
  const timer = opts.timeoutMs === undefined ? undefined : setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch {
      // Exited meanwhile.
    }
  }, opts.timeoutMs);
  let out: Deno.CommandOutput;
  try {
    out = await child.output();
  } finally {
    clearTimeout(timer);
  }
  const seconds = (performance.now() - start) / 1000;
  const dec = new TextDecoder();
  const stdout = dec.decode(out.stdout);
  const stderr = dec.decode(out.stderr);
  if (timedOut) {
    throw new ClientError(
      `${argv[0]} timed out: killed after ${(opts.timeoutMs! / 1000).toFixed(0)} s`,
      { stdout, stderr },
    );
  }
  if (!out.success) {
    const why = out.signal ? `signal ${out.signal}` : `exit code ${out.code}`;
    throw new ClientError(`${argv[0]} failed (${why}): ${tail(stderr || stdout, 300)}`, {
      stdout,
      stderr,
    });
  }
  return { stdout, stderr, seconds };
}

/** Last `max` characters of `text`, trimmed, on one line, without ANSI colour codes. */
export function tail(text: string, max: number): string {
  // deno colours its error messages; escape codes would garble the Markdown report.
  // deno-lint-ignore no-control-regex
  const t = text.replace(/\x1b\[[0-9;]*m/g, "").trim().replace(/\s*\n\s*/g, " | ");
  return t.length > max ? "…" + t.slice(t.length - max) : t;
}

/** Clock ticks per second for /proc/PID/stat; 100 on every Linux this runs on (getconf CLK_TCK). */
const CLOCK_TICKS = 100;

/**
 * Reads a /proc file through `cat`: Deno refuses /proc/PID/* to anything short of --allow-all,
 * and the task grants --allow-run but not that.
 */
async function readProcFile(path: string): Promise<string> {
  return (await runClient(["cat", path])).stdout;
}

/**
 * User + system CPU seconds of process `pid` and all its threads, live or exited, from
 * /proc/PID/stat (fields 14 and 15).
 */
export async function readCpuSeconds(pid: number): Promise<number> {
  const stat = await readProcFile(`/proc/${pid}/stat`);
  // The command name (field 2) may contain spaces; fields after it start past the last ')'.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const utime = Number(rest[11]);
  const stime = Number(rest[12]);
  if (!Number.isFinite(utime) || !Number.isFinite(stime)) {
    throw new Error(`Cannot parse utime/stime in /proc/${pid}/stat`);
  }
  return (utime + stime) / CLOCK_TICKS;
}

/** Peak resident set size (VmHWM) of process `pid` in KiB, from /proc/PID/status. */
export async function readPeakRssKiB(pid: number): Promise<number> {
  const status = await readProcFile(`/proc/${pid}/status`);
  const m = /^VmHWM:\s+(\d+)\s+kB$/m.exec(status);
  if (!m?.[1]) throw new Error(`No VmHWM in /proc/${pid}/status`);
  return Number(m[1]);
}

/**
 * Resets the peak RSS (VmHWM) of process `pid` to its current RSS (Linux 4.0+ `clear_refs` value
 * 5), so that the next reading is the peak of what ran in between. Written through `sh` for the
 * same reason as `readProcFile`.
 */
export async function resetPeakRss(pid: number): Promise<void> {
  await runClient(["sh", "-c", `echo 5 > /proc/${pid}/clear_refs`]);
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits for `p` at most `ms` milliseconds; true if it settled in time. Clears its timer. */
export async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([p.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** First line of `argv`'s output, or "unknown" if it cannot run (for the report header). */
export async function toolVersion(argv: readonly string[]): Promise<string> {
  try {
    const r = await runClient(argv);
    return (r.stdout || r.stderr).split("\n")[0]?.trim() || "unknown";
  } catch {
    return "unknown";
  }
}
