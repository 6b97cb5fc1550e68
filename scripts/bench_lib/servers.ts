/**
 * The servers under test and their lifecycle: start one on a unix socket, wait until the socket
 * accepts a connection, read its CPU time and peak RSS, stop it.
 *
 * All servers run with `-e 0` (or nbdkit's unlimited default) so that they accept any number of
 * clients and may advertise NBD_FLAG_CAN_MULTI_CONN, which lets nbdcopy open several connections.
 *
 * @module
 */

import {
  readCpuSeconds,
  readPeakRssKiB,
  resetPeakRss,
  settlesWithin,
  sleep,
  spawnTracked,
  tail,
} from "./proc.ts";
import type { ImageFormat, ServerDef, ServeTarget } from "./types.ts";
import { DENBD_PERMISSIONS } from "../../lib/permissions.ts";
import { driverOf, FORMAT_INFO, imageArgs, LUKS_SECRET } from "./types.ts";
import { nbdkitTlsArgs, qemuTlsArgs } from "./tls.ts";

/** denbd's entry point, found relative to this file so the script runs from any directory. */
const DENBD_MAIN = decodeURIComponent(new URL("../../main.ts", import.meta.url).pathname);

/** Image formats read from a local file. */
const FILE_FORMATS: readonly ImageFormat[] = ["raw", "qcow2", "qcow2-compressed", "qcow2-empty"];
/** The other image formats (issue 13): denbd and qemu-nbd (nbdkit only has a luks filter). */
const OTHER_FORMATS: readonly ImageFormat[] = ["vdi", "vmdk", "vhdx", "luks"];
/** Raw served over TLS (x509, PSK). */
const TLS_FORMATS: readonly ImageFormat[] = ["tls-x509", "tls-psk"];
/** Remote formats (an origin re-exported read-only, or a private rbd image). */
const REMOTE_FORMATS: readonly ImageFormat[] = ["nbd-raw", "http-raw", "http-qcow2", "rbd"];

/** `-r` for NBD and HTTP origins: the proxies only read, and the origin is read-only anyway. */
function readOnlyFor(t: ServeTarget): string[] {
  const remote = FORMAT_INFO[t.format].remote;
  return remote === "nbd" || remote === "http" ? ["-r"] : [];
}

/**
 * denbd with extra options (the plain "denbd" runs its defaults, on remote formats too); `main`
 * is another checkout's entry file for A/B runs.
 */
function denbdDef(
  id: string,
  label: string,
  options: readonly string[],
  main: () => string | undefined = () => DENBD_MAIN,
  env: readonly string[] = [],
): ServerDef {
  const baseline = id === "denbd-baseline";
  return {
    id,
    label,
    formats: options.length > 0
      ? FILE_FORMATS
      : [...FILE_FORMATS, ...REMOTE_FORMATS, ...TLS_FORMATS, ...OTHER_FORMATS],
    argv: (t) => [
      // env(1) execs, so the measured pid is still the server's.
      ...(env.length > 0 ? ["env", ...env] : []),
      Deno.execPath(),
      "run",
      ...DENBD_PERMISSIONS,
      main() ?? DENBD_MAIN,
      ...["-k", t.socket, "-t", "-e", "0", ...readOnlyFor(t)],
      ...qemuTlsArgs(t),
      ...options,
      ...imageArgs(t.format, t.image),
    ],
    unavailable: () => {
      const file = main();
      if (file === undefined) return `set ${BASELINE_ENV} to another checkout's main.ts`;
      try {
        Deno.statSync(file);
        return undefined;
      } catch {
        return `${file} not found`;
      }
    },
    extra: options.length > 0 || baseline || env.length > 0,
  };
}

/** Environment variable naming the entry file of the `denbd-baseline` server. */
const BASELINE_ENV = "DENBD_BENCH_BASELINE";

/** nbdkit's plugin and its arguments for a target: file, nbd (socket=) or curl (URL). */
function nbdkitPlugin(t: ServeTarget): string[] {
  switch (FORMAT_INFO[t.format].remote) {
    case "nbd":
      return ["-r", "nbd", `socket=${new URL(t.image).searchParams.get("socket")}`];
    case "http":
      return ["-r", "curl", t.image];
    default:
      if (t.format === "luks") {
        return ["--filter=luks", "file", t.image, `passphrase=${LUKS_SECRET}`];
      }
      return ["file", t.image];
  }
}

/**
 * The origin of the `nbd-raw` format, started once for all servers: qemu-nbd exporting the raw
 * master read-only (`image` is the master file here, `socket` the origin's socket).
 */
export const NBD_ORIGIN_DEF: ServerDef = {
  id: "origin-qemu-nbd",
  label: "origin (qemu-nbd)",
  formats: ["raw"],
  argv: (t) => ["qemu-nbd", "-t", "-e", "0", "-r", "-f", "raw", "-k", t.socket, t.image],
};

/**
 * Every server the benchmark knows. The first three are the required columns; the denbd
 * variants (engines and cache modes) run only when named in `--servers`.
 */
export const SERVER_DEFS: readonly ServerDef[] = [
  denbdDef("denbd", "denbd", []),
  {
    id: "qemu-nbd",
    label: "qemu-nbd",
    formats: [...FILE_FORMATS, ...REMOTE_FORMATS, ...TLS_FORMATS, ...OTHER_FORMATS],
    // qemu-nbd's own defaults, spelled out (the file options mean nothing to nbd/curl nodes).
    argv: (t) => [
      "qemu-nbd",
      ...["-k", t.socket, "-t", "-e", "0", ...readOnlyFor(t)],
      ...qemuTlsArgs(t),
      ...(FORMAT_INFO[t.format].remote ? [] : ["--cache=writeback", "--aio=threads"]),
      ...imageArgs(t.format, t.image),
    ],
  },
  {
    id: "nbdkit",
    label: "nbdkit",
    // No qcow2, vdi, vmdk or vhdx reader in nbdkit 1.32 ("—"); its luks filter reads LUKS1.
    formats: ["raw", "nbd-raw", "http-raw", ...TLS_FORMATS, "luks"],
    // -f: stay in the foreground so the PID we hold is the server; default 16 threads.
    argv: (t) => [
      "nbdkit",
      ...["-f", "--exit-with-parent", "-U", t.socket, ...nbdkitTlsArgs(t)],
      ...nbdkitPlugin(t),
    ],
  },
  {
    id: "qemu-nbd-io_uring",
    label: "qemu-nbd (aio=io_uring)",
    formats: FILE_FORMATS,
    argv: (t) => [
      "qemu-nbd",
      ...["-f", driverOf(t.format), "-k", t.socket, "-t", "-e", "0"],
      ...["--cache=writeback", "--aio=io_uring", t.image],
    ],
  },
  denbdDef("denbd-threads", "denbd (aio=threads)", ["--aio=threads"]),
  denbdDef("denbd-io_uring", "denbd (aio=io_uring)", ["--aio=io_uring"]),
  denbdDef("denbd-none", "denbd (cache=none)", ["--cache=none", "--aio=io_uring"]),
  denbdDef("denbd-threads-none", "denbd (cache=none, aio=threads)", [
    "--cache=none",
    "--aio=threads",
  ]),
  denbdDef("denbd-native-none", "denbd (cache=none, aio=native)", [
    "--cache=none",
    "--aio=native",
  ]),
  {
    id: "qemu-nbd-native-none",
    label: "qemu-nbd (cache=none, aio=native)",
    formats: FILE_FORMATS,
    argv: (t) => [
      "qemu-nbd",
      ...["-f", driverOf(t.format), "-k", t.socket, "-t", "-e", "0"],
      ...["--cache=none", "--aio=native", t.image],
    ],
    extra: true,
  },
  denbdDef("denbd-writethrough", "denbd (cache=writethrough)", ["--cache=writethrough"]),
  denbdDef("denbd-threads-writethrough", "denbd (cache=writethrough, aio=threads)", [
    "--cache=writethrough",
    "--aio=threads",
  ]),
  denbdDef("denbd-unsafe", "denbd (cache=unsafe)", ["--cache=unsafe"]),
  // Data-plane threads (lib/net/data_plane.ts): none (the main thread serves), or one.
  denbdDef("denbd-t0", "denbd (main thread only)", [], undefined, ["DENBD_THREADS=0"]),
  denbdDef("denbd-t1", "denbd (1 data thread)", [], undefined, ["DENBD_THREADS=1"]),
  // A/B: another checkout (e.g. `git archive HEAD~1 | tar -x -C /tmp/base`), all formats.
  denbdDef("denbd-baseline", "denbd (baseline)", [], () => Deno.env.get(BASELINE_ENV)),
];

/** A running server, or the reason it is not running. */
export class ServerHandle {
  readonly def: ServerDef;
  readonly target: ServeTarget;
  readonly logFile: string;
  readonly argv: readonly string[];
  #child: Deno.ChildProcess | undefined;
  #exit: string | undefined;
  #outputTail = "";
  #pumps: Promise<void>[] = [];
  #peakRssKiB = 0;
  /** Why the server is not usable (did not start, or exited), or undefined while it runs. */
  failure: string | undefined;

  private constructor(def: ServerDef, target: ServeTarget, logFile: string) {
    this.def = def;
    this.target = target;
    this.logFile = logFile;
    this.argv = def.argv(target);
    const why = def.unavailable?.();
    if (why) this.failure = `did not start: ${why}`;
  }

  /**
   * Starts `def` on `target` and waits up to `timeoutMs` for its socket to accept a connection.
   * Never throws: a server that cannot start comes back with `failure` set.
   */
  static async start(
    def: ServerDef,
    target: ServeTarget,
    opts: { logFile: string; timeoutMs: number },
  ): Promise<ServerHandle> {
    const h = new ServerHandle(def, target, opts.logFile);
    if (h.failure) return h;
    await Deno.remove(target.socket).catch(() => {});
    try {
      h.#child = spawnTracked(h.argv, { stdout: "piped", stderr: "piped" });
    } catch (e) {
      h.failure = `did not start: cannot run ${h.argv[0]}: ${(e as Error).message}`;
      return h;
    }
    const log = await Deno.open(opts.logFile, { write: true, create: true, truncate: true });
    h.#pumps = [h.#pump(h.#child.stdout, log), h.#pump(h.#child.stderr, log)];
    Promise.all(h.#pumps).finally(() => log.close());
    h.#child.status.then((s) => {
      h.#exit = s.signal ? `killed by ${s.signal}` : `exited with code ${s.code}`;
    });
    const why = await h.#waitForSocket(opts.timeoutMs);
    if (why) {
      h.failure = `did not start: ${why}`;
      await h.stop();
    }
    return h;
  }

  /** Copies a child stream into the log file and keeps its tail for error messages. */
  async #pump(stream: ReadableStream<Uint8Array>, log: Deno.FsFile): Promise<void> {
    const dec = new TextDecoder();
    try {
      for await (const chunk of stream) {
        for (let off = 0; off < chunk.length;) off += await log.write(chunk.subarray(off));
        this.#outputTail = (this.#outputTail + dec.decode(chunk, { stream: true })).slice(-2000);
      }
    } catch {
      // The stream ends when the child dies; nothing to report beyond the exit status.
    }
  }

  async #waitForSocket(timeoutMs: number): Promise<string | undefined> {
    const deadline = performance.now() + timeoutMs;
    let lastError = "";
    while (performance.now() < deadline) {
      if (this.#exit) {
        await Promise.all(this.#pumps);
        return `${this.#exit}: ${tail(this.#outputTail, 300) || "no output"}`;
      }
      try {
        const conn = await Deno.connect({ transport: "unix", path: this.target.socket });
        conn.close();
        return undefined;
      } catch (e) {
        lastError = (e as Error).message;
      }
      await sleep(50);
    }
    return `socket ${this.target.socket} did not accept a connection within ${timeoutMs} ms ` +
      `(last error: ${lastError}; output: ${tail(this.#outputTail, 200) || "none"})`;
  }

  /** PID of the running server; throws (and records `failure`) if it has exited. */
  pid(): number {
    if (this.failure) throw new Error(this.failure);
    if (this.#exit || !this.#child) {
      this.failure = `server ${this.#exit ?? "is not running"}: ${tail(this.#outputTail, 300)}`;
      throw new Error(this.failure);
    }
    return this.#child.pid;
  }

  /**
   * CPU seconds the server has used so far and its current peak RSS (VmHWM, KiB, 0 if unreadable);
   * the peak also feeds the instance-wide maximum.
   */
  async usage(): Promise<{ cpuSeconds: number; peakRssKiB: number }> {
    const pid = this.pid();
    const peakRssKiB = await this.#samplePeakRss(pid);
    return { cpuSeconds: await readCpuSeconds(pid), peakRssKiB };
  }

  /**
   * Starts a new peak-RSS window (see `resetPeakRss`); the instance-wide maximum is kept. False if
   * the kernel refused, in which case later readings are the peak since the server started.
   */
  async resetPeakRss(): Promise<boolean> {
    const pid = this.pid();
    await this.#samplePeakRss(pid);
    try {
      await resetPeakRss(pid);
      return true;
    } catch {
      return false;
    }
  }

  /** Largest VmHWM seen, in KiB (0 if never sampled). */
  get peakRssKiB(): number {
    return this.#peakRssKiB;
  }

  async #samplePeakRss(pid: number): Promise<number> {
    try {
      const kib = await readPeakRssKiB(pid);
      this.#peakRssKiB = Math.max(this.#peakRssKiB, kib);
      return kib;
    } catch {
      return 0; // The process is exiting; keep the last value.
    }
  }

  /** Stops the server: SIGTERM, then SIGKILL after 5 s; removes its socket. Idempotent. */
  async stop(): Promise<void> {
    const child = this.#child;
    if (child && !this.#exit) {
      await this.#samplePeakRss(child.pid);
      try {
        child.kill("SIGTERM");
      } catch {
        // Already exited.
      }
      if (!await settlesWithin(child.status, 5000)) {
        try {
          child.kill("SIGKILL");
        } catch {
          // Exited meanwhile.
        }
        await child.status;
      }
    }
    if (child) await child.status;
    await Promise.all(this.#pumps);
    await Deno.remove(this.target.socket).catch(() => {});
  }
}
