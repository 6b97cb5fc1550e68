/**
 * A thousand connections that stay idle in negotiation -- some never read, some read the
 * greeting and stop, some send their flags and half an option header, some half an option's
 * data -- must not starve a working client: qemu-io writes and reads with pattern checks and
 * nbdcopy copies the whole export while they all sit there (with qemu-nbd's 10 s negotiation
 * limit, and denbd's default `--handshake-limit`, they are all still open when it is done).
 * Then they are closed and the server still serves. With `--handshake-limit=1` (denbd only:
 * qemu-nbd 7.2 has no such option) all of them are dropped after about a second.
 *
 * The server runs with `-e 0` (qemu-nbd's default `-e 1` would serve one client only). The
 * test raises its own soft RLIMIT_NOFILE (which the server inherits) when it is below 4096.
 * The server's peak RSS (VmHWM) is printed, and only checked against a generous bound.
 */

import assert from "node:assert/strict";
import {
  closeQuietly,
  makeDenseImage,
  MiB,
  patternBytes,
  readWithTimeout,
  runOk,
  Server,
  SERVER_KIND,
  sleep,
  withTempDir,
} from "./_harness.ts";

const IDLE = 1000;
const SIZE = 16 * MiB;

/**
 * Raises this process's soft open-files limit (the server inherits it) to 4096, or to the hard
 * limit when that is lower (raising it needs a privilege a sandbox may lack), and returns how
 * many idle connections fit: {@linkcode IDLE}, or fewer under a hard limit below ~1200.
 */
async function idleCountForNoFile(): Promise<number> {
  const want = 4096;
  const pid = String(Deno.pid);
  const cur = await runOk([
    "prlimit",
    "--pid",
    pid,
    "--nofile",
    "--raw",
    "-o",
    "SOFT,HARD",
    "--noheadings",
  ]);
  const [soft, hard] = cur.stdout.trim().split(/\s+/).map((s) =>
    s === "unlimited" ? Infinity : Number(s)
  ) as [number, number];
  let limit = soft;
  if (soft < want) {
    limit = Math.min(want, hard);
    const h = hard === Infinity ? "unlimited" : String(hard);
    await runOk(["prlimit", "--pid", pid, `--nofile=${limit}:${h}`]);
  }
  // Both this process and the server hold one descriptor per connection, plus their own.
  const n = Math.min(IDLE, limit - 200);
  if (n < IDLE) console.log(`open-files hard limit ${hard}: ${n} idle connections, not ${IDLE}`);
  assert.ok(n >= 500, `open-files hard limit ${hard} is too low for this test`);
  return n;
}

/** Peak resident set of a process in KiB (VmHWM), read with cat: Deno reads /proc/PID only with -A. */
async function peakRssKiB(pid: number): Promise<number> {
  const r = await runOk(["cat", `/proc/${pid}/status`]);
  const m = /^VmHWM:\s+(\d+) kB$/m.exec(r.stdout);
  assert.ok(m, `no VmHWM in /proc/${pid}/status`);
  return Number(m[1]);
}

type IdleKind = "silent" | "greeted" | "half-option" | "half-data";
const KINDS: readonly IdleKind[] = ["silent", "greeted", "half-option", "half-data"];

interface Idle {
  readonly kind: IdleKind;
  readonly conn: Deno.Conn;
}

const GREETING = 18; // NBDMAGIC, IHAVEOPT, handshake flags

/** Opens `n` idle connections of the kinds in turn, 100 at a time. Bounded by `deadline`. */
async function openIdle(server: Server, n: number, deadline: number): Promise<Idle[]> {
  const idle: Idle[] = [];
  const flagsAndHalfOption = new Uint8Array([
    0,
    0,
    0,
    3, // client flags: FIXED_NEWSTYLE | NO_ZEROES
    0x49,
    0x48,
    0x41,
    0x56,
    0x45,
    0x4f,
    0x50,
    0x54, // IHAVEOPT
    0,
    0, // half of the option number
  ]);
  const flagsAndHalfData = new Uint8Array([
    0,
    0,
    0,
    3,
    0x49,
    0x48,
    0x41,
    0x56,
    0x45,
    0x4f,
    0x50,
    0x54,
    0,
    0,
    0,
    7, // NBD_OPT_GO
    0,
    0,
    0,
    100, // 100 bytes of data announced
    0,
    0,
    0, // 3 of them sent
  ]);
  try {
    for (let i = 0; i < n; i += 100) {
      if (Date.now() > deadline) {
        throw new Error(`only ${idle.length} idle connections opened in time`);
      }
      const batch = await Promise.all(
        Array.from({ length: Math.min(100, n - i) }, async (_, j): Promise<Idle> => {
          const kind = KINDS[(i + j) % KINDS.length]!;
          const conn = await server.connect();
          try {
            if (kind !== "silent") {
              const g = await readWithTimeout(conn, GREETING, 5000);
              assert.equal(g?.length, GREETING, `${kind}: no greeting`);
            }
            if (kind === "half-option") await conn.write(flagsAndHalfOption);
            if (kind === "half-data") await conn.write(flagsAndHalfData);
          } catch (e) {
            closeQuietly(conn);
            throw e;
          }
          return { kind, conn };
        }),
      );
      idle.push(...batch);
    }
    return idle;
  } catch (e) {
    for (const c of idle) closeQuietly(c.conn);
    throw e;
  }
}

/** The working client: qemu-io writes and reads with pattern checks, then nbdcopy of it all. */
async function work(server: Server, dir: string, orig: Uint8Array): Promise<void> {
  const io = await runOk([
    "qemu-io",
    "-f",
    "raw",
    "-c",
    "write -P 0x5a 1M 1M",
    "-c",
    "write -P 0xa5 4095 3",
    "-c",
    "read -P 0x5a 1M 1M",
    "-c",
    "read -P 0xa5 4095 3",
    "-c",
    "flush",
    server.uri,
  ], { timeoutMs: 30_000 });
  assert.doesNotMatch(io.stdout + io.stderr, /fail|error/i);
  assert.equal(io.stdout.match(/^read \d+\/\d+ bytes/gm)?.length, 2, io.stdout);
  const want = orig.slice();
  want.fill(0x5a, MiB, 2 * MiB);
  want.fill(0xa5, 4095, 4098);
  const out = `${dir}/copy.raw`;
  await runOk(["nbdcopy", server.uri, out], { timeoutMs: 30_000 });
  assert.deepEqual(await Deno.readFile(out), want, "nbdcopy read other data than was written");
  await Deno.remove(out);
}

/** True if nothing arrives and the peer does not close within `ms` (the read is then abandoned). */
async function staysOpen(conn: Deno.Conn, ms: number): Promise<boolean> {
  try {
    await readWithTimeout(conn, 1, ms);
    return false; // data or EOF
  } catch {
    return true; // timed out: still open, and readWithTimeout closed it
  }
}

/** Whether the server hung up on `conn` within `ms` (EOF or reset). */
async function closedByServer(conn: Deno.Conn, ms: number): Promise<boolean> {
  const buf = new Uint8Array(64);
  const deadline = Date.now() + ms;
  for (let i = 0; i < 10 && Date.now() < deadline; i++) {
    try {
      const r = await readWithTimeout(conn, buf.length, Math.max(1, deadline - Date.now()));
      if (r === null) return true;
      // A silent client still had its greeting queued; read on.
    } catch (e) {
      if (/timed out/.test((e as Error).message)) return false;
      return true; // ECONNRESET
    }
  }
  return false;
}

Deno.test("idle connections: 1000 clients idle in negotiation do not starve a working client", async () => {
  const count = await idleCountForNoFile();
  await withTempDir(async (dir) => {
    const image = `${dir}/disk.img`;
    await makeDenseImage(image, SIZE, 8);
    const orig = patternBytes(SIZE, 8);
    const server = await Server.start({ dir, image, args: ["-f", "raw", "-t", "-e", "0"] });
    let idle: Idle[] = [];
    try {
      const started = Date.now();
      // qemu-nbd drops a negotiating client after 10 s: everything below stays well inside.
      idle = await openIdle(server, count, started + 5000);
      const opened = Date.now() - started;
      await work(server, dir, orig);
      // A sample of those that read their greeting: the server sent nothing more, nor hung up.
      const sample = idle.filter((c) => c.kind !== "silent").slice(0, 40);
      const open = await Promise.all(sample.map((c) => staysOpen(c.conn, 200)));
      const elapsed = Date.now() - started;
      assert.ok(elapsed < 9000, `took ${elapsed} ms: qemu-nbd's 10 s limit would have run out`);
      assert.deepEqual(open, sample.map(() => true), "idle clients were dropped early");
      for (const c of idle) closeQuietly(c.conn);
      idle = [];
      await sleep(300);
      assert.ok(server.running, `server exited: ${server.stderr}`);
      await work(server, dir, orig); // the same writes again: the same result
      assert.equal((await runOk(["nbdinfo", "--size", server.uri])).stdout.trim(), String(SIZE));
      const rss = await peakRssKiB(server.pid);
      console.log(
        `${server.kind}: ${count} idle connections opened in ${opened} ms; peak RSS ${
          (rss / 1024).toFixed(1)
        } MiB`,
      );
      assert.ok(rss < 1024 * 1024, `peak RSS ${rss} KiB`);
    } finally {
      for (const c of idle) closeQuietly(c.conn);
      await server.stop();
    }
  });
});

Deno.test({
  name: "idle connections: --handshake-limit=1 drops every idle negotiating client",
  ignore: SERVER_KIND === "qemu-nbd",
  fn: async () => {
    const count = await idleCountForNoFile();
    await withTempDir(async (dir) => {
      const image = `${dir}/disk.img`;
      await makeDenseImage(image, SIZE, 8);
      const orig = patternBytes(SIZE, 8);
      const server = await Server.start({
        dir,
        image,
        args: ["-f", "raw", "-t", "-e", "0", "--handshake-limit=1"],
        kind: "denbd",
      });
      let idle: Idle[] = [];
      try {
        idle = await openIdle(server, count, Date.now() + 5000);
        // Every one of them is hung up on by the server, about a second after it connected.
        const closed = await Promise.all(idle.map((c) => closedByServer(c.conn, 4000)));
        const kept = idle.filter((_, i) => !closed[i]).map((c) => c.kind);
        assert.deepEqual(kept, [], "idle clients still open 4 s past a 1 s handshake limit");
        for (const c of idle) closeQuietly(c.conn);
        idle = [];
        assert.ok(server.running, `server exited: ${server.stderr}`);
        await work(server, dir, orig);
        const rss = await peakRssKiB(server.pid);
        console.log(`denbd --handshake-limit=1: peak RSS ${(rss / 1024).toFixed(1)} MiB`);
        assert.ok(rss < 1024 * 1024, `peak RSS ${rss} KiB`);
      } finally {
        for (const c of idle) closeQuietly(c.conn);
        await server.stop();
      }
    });
  },
});
