/**
 * Shared helpers for the interop tests: temp dirs, raw images with known patterns, starting and
 * stopping the server under test (denbd or qemu-nbd, chosen by `DENBD_TEST_SERVER`), and running
 * real clients (nbdinfo, nbdcopy, qemu-img, qemu-io, python libnbd) with a timeout.
 *
 * Every child process is awaited and its pipes drained, so Deno's resource and op sanitizers stay
 * quiet; callers put `server.stop()` in `finally`.
 *
 * @module
 */

import { DENBD_PERMISSIONS } from "../../lib/permissions.ts";

/** Which server implementation a test process talks to. */
export type ServerKind = "denbd" | "qemu-nbd";

/** The server under test: `DENBD_TEST_SERVER=qemu-nbd` validates the suite itself. */
export const SERVER_KIND: ServerKind = parseKind(Deno.env.get("DENBD_TEST_SERVER"));

/** Path of denbd's entry point. */
export const DENBD_MAIN = decodeURIComponent(new URL("../../main.ts", import.meta.url).pathname);

/** Permissions denbd runs with (lib/permissions.ts, the same set as `deno task start`). */
export const DENBD_PERMS: readonly string[] = DENBD_PERMISSIONS;

/** The python interpreter that has the `nbd` (libnbd) module. */
export const PYTHON = "/usr/bin/python3";

const MiB = 1024 * 1024;
export { MiB };

function parseKind(v: string | undefined): ServerKind {
  if (v === undefined || v === "" || v === "denbd") return "denbd";
  if (v === "qemu-nbd") return v;
  throw new Error(`DENBD_TEST_SERVER must be "denbd" or "qemu-nbd", got ${JSON.stringify(v)}`);
}

/** Argv prefix that starts a server of the given kind. */
export function serverArgv(kind: ServerKind): string[] {
  if (kind === "qemu-nbd") return ["qemu-nbd"];
  return [Deno.execPath(), "run", "--quiet", ...DENBD_PERMS, DENBD_MAIN];
}

// ---------------------------------------------------------------------------------------------
// Temp dirs and images

/** Runs `fn` with a fresh temp dir that is removed afterwards, whatever happens. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "denbd-interop-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** One run of bytes in an image: `fill` is a byte value, or "random" for seeded pseudo-random data. */
export interface Extent {
  readonly offset: number;
  readonly length: number;
  readonly fill: number | "random";
  readonly seed?: number;
}

/** Deterministic pseudo-random bytes (xorshift32), so checksums are reproducible. */
export function patternBytes(length: number, seed = 1): Uint8Array {
  const out = new Uint8Array(length);
  let x = (seed >>> 0) || 0x9e3779b9;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

function extentBytes(e: Extent): Uint8Array {
  return e.fill === "random" ? patternBytes(e.length, e.seed ?? e.offset + 1) : new Uint8Array(
    e.length,
  ).fill(e.fill);
}

/**
 * Creates a sparse raw image of `size` bytes: only `extents` are written, everything else is a
 * hole (the file is truncated to size, never written there).
 */
export async function makeSparseImage(
  path: string,
  size: number,
  extents: readonly Extent[] = [],
): Promise<void> {
  const f = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    await f.truncate(size);
    for (const e of extents) {
      await f.seek(e.offset, Deno.SeekMode.Start);
      await writeAll(f, extentBytes(e));
    }
    // Flushed data leaves the file in a settled state: fresh dirty pages make some ext4 extent
    // queries (SEEK_DATA after a zero-range) report data where a settled file reports zero.
    await f.syncData();
  } finally {
    f.close();
  }
}

/** Creates a fully allocated raw image filled with seeded pseudo-random data. */
export async function makeDenseImage(path: string, size: number, seed = 7): Promise<void> {
  await Deno.writeFile(path, patternBytes(size, seed));
}

async function writeAll(w: Deno.FsFile, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await w.write(data.subarray(off));
}

/** SHA-256 of a whole file, hex. Test images are a few MiB, so reading them whole is fine. */
export async function sha256File(path: string): Promise<string> {
  return sha256(await Deno.readFile(path));
}

/** SHA-256 of bytes, hex. */
export async function sha256(data: Uint8Array): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------------------------------------
// Processes

/** What a finished client command produced. */
export interface RunResult {
  readonly code: number;
  readonly signal: Deno.Signal | null;
  readonly stdout: string;
  readonly stderr: string;
  /** The command exited but something it left behind (a daemon) kept stdout/stderr open. */
  readonly pipesHeldOpen: boolean;
}

/** Options for {@linkcode run}. */
export interface RunOptions {
  /** Kill the command after this many ms (default 20 000). */
  readonly timeoutMs?: number;
  /** Bytes or text written to the command's stdin, which is then closed. */
  readonly stdin?: string | Uint8Array;
  readonly env?: Record<string, string>;
  readonly cwd?: string;
}

/**
 * Runs a command to completion and captures its output. A command still running after the
 * timeout is killed with SIGKILL and the result says so (signal set, code non-zero).
 */
export async function run(argv: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const [cmd, ...args] = argv;
  if (cmd === undefined) throw new Error("run: empty argv");
  const timeoutMs = opts.timeoutMs ?? 20_000;
  const child = new Deno.Command(cmd, {
    args,
    stdin: opts.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
    env: opts.env,
    cwd: opts.cwd,
  }).spawn();
  // Read the pipes ourselves rather than with output(): a daemon the command leaves behind may
  // hold them open, and then output() would never return.
  const out = collect(child.stdout);
  const err = collect(child.stderr);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch { /* already gone */ }
  }, timeoutMs);
  let status: Deno.CommandStatus;
  try {
    if (opts.stdin !== undefined) {
      const w = child.stdin.getWriter();
      const data = typeof opts.stdin === "string"
        ? new TextEncoder().encode(opts.stdin)
        : opts.stdin;
      try {
        await w.write(data);
      } finally {
        await w.close().catch(() => {});
      }
    }
    status = await child.status;
  } finally {
    clearTimeout(timer);
  }
  const [outEof, errEof] = await Promise.all([
    out.settled(PIPE_GRACE_MS),
    err.settled(PIPE_GRACE_MS),
  ]);
  const res: RunResult = {
    code: status.code,
    signal: status.signal,
    stdout: await out.text(),
    stderr: await err.text(),
    pipesHeldOpen: !outEof || !errEof,
  };
  if (timedOut) {
    throw new Error(
      `${
        argv.join(" ")
      } timed out after ${timeoutMs} ms\nstdout: ${res.stdout}\nstderr: ${res.stderr}`,
    );
  }
  return res;
}

/** How long a pipe may stay open after its process exited (a left-behind daemon holds it). */
const PIPE_GRACE_MS = 2000;

/** Accumulates a child's pipe; `settled` waits a bounded time for EOF and else cancels it. */
function collect(stream: ReadableStream<Uint8Array>) {
  const reader = stream.getReader();
  const chunks: Uint8Array[] = [];
  const done = (async () => {
    for (;;) {
      const r = await reader.read().catch(() => ({ done: true as const, value: undefined }));
      if (r.done) return;
      chunks.push(r.value);
    }
  })();
  return {
    /** True if EOF came within `ms`; otherwise the pipe is cancelled and false returned. */
    async settled(ms: number): Promise<boolean> {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const t = new Promise<"timeout">((r) => timer = setTimeout(() => r("timeout"), ms));
      const r = await Promise.race([done.then(() => "eof" as const), t]);
      clearTimeout(timer);
      if (r === "eof") return true;
      await reader.cancel().catch(() => {});
      await done;
      return false;
    },
    async text(): Promise<string> {
      await done;
      const dec = new TextDecoder();
      return chunks.map((c) => dec.decode(c, { stream: true })).join("") + dec.decode();
    },
  };
}

/** Like {@linkcode run} but throws (with the output) unless the command exits 0. */
export async function runOk(argv: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await run(argv, opts);
  if (r.code !== 0) {
    throw new Error(
      `${argv.join(" ")} exited ${r.code}${
        r.signal ? ` (${r.signal})` : ""
      }\nstdout: ${r.stdout}\nstderr: ${r.stderr}`,
    );
  }
  return r;
}

/**
 * Runs a python libnbd script (`import nbd` is available) and parses the last stdout line as
 * JSON. Arguments are passed as `sys.argv[1:]`.
 */
export async function runPython<T = unknown>(
  script: string,
  args: readonly string[] = [],
  opts: RunOptions = {},
): Promise<T> {
  const r = await runOk([PYTHON, "-c", script, ...args], opts);
  const lines = r.stdout.trim().split("\n");
  const last = lines[lines.length - 1] ?? "";
  try {
    return JSON.parse(last) as T;
  } catch {
    throw new Error(`python script printed no JSON\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Servers

/** How to start a server. `args` are qemu-nbd style, without the socket options and FILE. */
export interface ServerSpec {
  /** Image path (the positional FILE argument); omit when args carry it (e.g. --image-opts). */
  readonly image?: string;
  /** qemu-nbd options, e.g. ["-f", "raw", "-t"]. */
  readonly args?: readonly string[];
  /** Listen on a unix socket in `dir` (default) or on 127.0.0.1 with a free port. */
  readonly transport?: "unix" | "tcp";
  /** Directory for the unix socket. */
  readonly dir: string;
  /** Export name used to build `uri` (the harness does not add -x itself). */
  readonly exportName?: string;
  /** denbd or qemu-nbd; default {@linkcode SERVER_KIND}. */
  readonly kind?: ServerKind;
  /** Wait until the server accepts connections (default true). */
  readonly waitReady?: boolean;
  /** Socket file name inside `dir` (default derived from kind and a counter). */
  readonly socketName?: string;
  /** Extra environment variables for the server process (e.g. TMPDIR for -s). */
  readonly env?: Readonly<Record<string, string>>;
}

let socketCounter = 0;

/** A running server process. Always `await stop()` in `finally`. */
export class Server {
  readonly kind: ServerKind;
  readonly argv: readonly string[];
  readonly transport: "unix" | "tcp";
  readonly socketPath: string | undefined;
  readonly port: number | undefined;
  readonly exportName: string;
  readonly #child: Deno.ChildProcess;
  readonly #status: Promise<Deno.CommandStatus>;
  readonly #drained: Promise<void>;
  #stderr = "";
  #stdout = "";
  #exit: Deno.CommandStatus | undefined;

  private constructor(
    spec: ServerSpec,
    argv: string[],
    socketPath: string | undefined,
    port: number | undefined,
  ) {
    this.kind = spec.kind ?? SERVER_KIND;
    this.argv = argv;
    this.transport = spec.transport ?? "unix";
    this.socketPath = socketPath;
    this.port = port;
    this.exportName = spec.exportName ?? "";
    const [cmd, ...args] = argv;
    this.#child = new Deno.Command(cmd!, {
      args,
      env: spec.env === undefined ? undefined : { ...spec.env },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#drained = Promise.all([
      drain(this.#child.stdout, (s) => this.#stdout += s),
      drain(this.#child.stderr, (s) => this.#stderr += s),
    ]).then(() => {});
    this.#status = this.#child.status.then((s) => this.#exit = s);
  }

  /** Starts a server and (by default) waits until it accepts connections. */
  static async start(spec: ServerSpec): Promise<Server> {
    const kind = spec.kind ?? SERVER_KIND;
    const transport = spec.transport ?? "unix";
    const sockArgs: string[] = [];
    let socketPath: string | undefined;
    let port: number | undefined;
    if (transport === "unix") {
      socketPath = `${spec.dir}/${spec.socketName ?? `${kind}-${++socketCounter}.sock`}`;
      sockArgs.push("-k", socketPath);
    } else {
      port = freePort();
      sockArgs.push("-b", "127.0.0.1", "-p", String(port));
    }
    const argv = [
      ...serverArgv(kind),
      ...sockArgs,
      ...(spec.args ?? []),
      ...(spec.image === undefined ? [] : [spec.image]),
    ];
    const server = new Server(spec, argv, socketPath, port);
    if (spec.waitReady ?? true) {
      try {
        await server.waitReady();
      } catch (e) {
        await server.stop();
        throw new Error(`${(e as Error).message}\nserver stderr:\n${server.stderr}`);
      }
    }
    return server;
  }

  /** Everything the server wrote to stderr so far. */
  get stderr(): string {
    return this.#stderr;
  }

  /** Everything the server wrote to stdout so far. */
  get stdout(): string {
    return this.#stdout;
  }

  /** Exit status once the process has exited, else undefined. */
  get exitStatus(): Deno.CommandStatus | undefined {
    return this.#exit;
  }

  /** PID of the server process. */
  get pid(): number {
    return this.#child.pid;
  }

  /** `nbd+unix:///NAME?socket=PATH` or `nbd://127.0.0.1:PORT/NAME`. */
  get uri(): string {
    return this.uriFor(this.exportName);
  }

  /** The URI for another export name on the same server. */
  uriFor(name: string): string {
    const n = encodeURIComponent(name);
    return this.transport === "unix"
      ? `nbd+unix:///${n}?socket=${this.socketPath}`
      : `nbd://127.0.0.1:${this.port}/${n}`;
  }

  /** The URI form qemu-img/qemu-io accept (same as {@linkcode uri}). */
  get qemuUri(): string {
    return this.uri;
  }

  /** Polls until a connection gets the NBD greeting magic; bounded by `timeoutMs`. */
  async waitReady(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let lastErr = "";
    for (let i = 0; i < 2000 && Date.now() < deadline; i++) {
      if (this.#exit !== undefined) {
        await this.#drained;
        throw new Error(
          `${this.kind} exited with code ${this.#exit.code} before accepting connections: ${
            this.argv.join(" ")
          }`,
        );
      }
      try {
        const conn = await this.connect();
        try {
          const magic = await readWithTimeout(conn, 8, 2000);
          if (magic !== null && new TextDecoder().decode(magic) === "NBDMAGIC") return;
          lastErr = "no NBDMAGIC greeting";
        } finally {
          closeQuietly(conn);
        }
      } catch (e) {
        lastErr = (e as Error).message;
      }
      await sleep(25);
    }
    throw new Error(
      `${this.kind} did not accept connections within ${timeoutMs} ms (${lastErr}): ${
        this.argv.join(" ")
      }`,
    );
  }

  /** A raw socket connection to the server. */
  connect(): Promise<Deno.Conn> {
    return this.transport === "unix"
      ? Deno.connect({ transport: "unix", path: this.socketPath! })
      : Deno.connect({ hostname: "127.0.0.1", port: this.port! });
  }

  /** Waits for the process to exit on its own, at most `timeoutMs`; undefined on timeout. */
  async waitExit(timeoutMs: number): Promise<Deno.CommandStatus | undefined> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<undefined>((r) =>
      timer = setTimeout(() => r(undefined), timeoutMs)
    );
    try {
      const s = await Promise.race([this.#status, timeout]);
      if (s !== undefined) await this.#drained;
      return s;
    } finally {
      clearTimeout(timer);
    }
  }

  /** SIGTERM, then SIGKILL after `graceMs`; waits for exit and drains the pipes. */
  async stop(graceMs = 3000): Promise<Deno.CommandStatus> {
    if (this.#exit === undefined) {
      try {
        this.#child.kill("SIGTERM");
      } catch { /* exited meanwhile */ }
      if (await this.waitExit(graceMs) === undefined) {
        try {
          this.#child.kill("SIGKILL");
        } catch { /* exited meanwhile */ }
      }
    }
    const s = await this.#status;
    await this.#drained;
    return s;
  }

  /** True while the process runs. */
  get running(): boolean {
    return this.#exit === undefined;
  }
}

async function drain(stream: ReadableStream<Uint8Array>, sink: (s: string) => void): Promise<void> {
  const dec = new TextDecoder();
  for await (const chunk of stream) sink(dec.decode(chunk, { stream: true }));
  sink(dec.decode());
}

/** Closes a connection that may already be closed. */
export function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch { /* already closed */ }
}

/** Picks a free TCP port on 127.0.0.1 by binding port 0 and releasing it. */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** Resolves after `ms`. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Reads exactly `n` bytes, or returns what arrived before EOF (null if nothing did). Throws if
 * `timeoutMs` passes; the connection is then closed so no read stays pending.
 */
export async function readWithTimeout(
  conn: Deno.Conn,
  n: number,
  timeoutMs: number,
): Promise<Uint8Array | null> {
  const buf = new Uint8Array(n);
  let got = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let timedOut = false;
  const reading = (async () => {
    while (got < n) {
      const r = await conn.read(buf.subarray(got));
      if (r === null) break;
      got += r;
    }
  })();
  const timeout = new Promise<void>((r) =>
    timer = setTimeout(() => {
      timedOut = true;
      r();
    }, timeoutMs)
  );
  try {
    await Promise.race([reading, timeout]);
  } finally {
    clearTimeout(timer);
  }
  if (timedOut) {
    closeQuietly(conn);
    await reading.catch(() => {});
    throw new Error(`read of ${n} bytes timed out after ${timeoutMs} ms (got ${got})`);
  }
  await reading;
  return got === 0 ? null : buf.subarray(0, got);
}

/** Starts several servers in parallel and runs `fn`; all are stopped afterwards. */
export async function withServers<T>(
  specs: readonly ServerSpec[],
  fn: (servers: Server[]) => Promise<T>,
): Promise<T> {
  const started = await Promise.allSettled(specs.map((s) => Server.start(s)));
  const servers = started.flatMap((r) => r.status === "fulfilled" ? [r.value] : []);
  try {
    const failed = started.find((r) => r.status === "rejected");
    if (failed !== undefined) throw (failed as PromiseRejectedResult).reason;
    return await fn(servers);
  } finally {
    await Promise.all(servers.map((s) => s.stop()));
  }
}

/** Starts one server and runs `fn`; the server is stopped afterwards. */
export function withServer<T>(spec: ServerSpec, fn: (server: Server) => Promise<T>): Promise<T> {
  return withServers([spec], ([s]) => fn(s!));
}
