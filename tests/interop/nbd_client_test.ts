/**
 * The nbd protocol driver (lib/block/protocols/nbd.ts over lib/nbd/client.ts) against real
 * servers: qemu-nbd and denbd (started as scripts/bin/denbd) on raw and qcow2 images, and
 * nbdkit for old-style handshakes, simple replies and injected errors.
 *
 * What it shows: a random workload through the device leaves the origin image byte-identical to
 * a shadow copy; block status equals `qemu-img map` of the origin; many requests in flight are
 * answered correctly; server errors keep their errno; a killed origin fails every pending
 * request with EIO promptly; connect and handshake failures carry qemu's messages and are bounded
 * in time.
 */

import assert from "node:assert/strict";
import { openNbdProtocol } from "../../lib/block/protocols/nbd.ts";
import { parseNbdFilename } from "../../lib/block/protocols/nbd_filename.ts";
import { NbdClient, negotiate, OptionClient } from "../../lib/nbd/client.ts";
import { type BlockDevice, BlockError, Errno, ExtentList } from "../../lib/block/types.ts";
import { makeSparseImage, MiB, patternBytes, run, runOk, withTempDir } from "./_harness.ts";

const DENBD = decodeURIComponent(new URL("../../scripts/bin/denbd", import.meta.url).pathname);
const ctxRW = { writable: true, warn: (m: string) => console.error(m) };
const ctxRO = { writable: false, warn: (m: string) => console.error(m) };

// ---------------------------------------------------------------------------------------------
// Helpers

/** An origin server process on a unix socket. */
class Origin {
  readonly socket: string;
  readonly #child: Deno.ChildProcess;
  readonly #status: Promise<Deno.CommandStatus>;
  #stderr = "";
  #exited = false;

  private constructor(argv: string[], socket: string) {
    this.socket = socket;
    this.#child = new Deno.Command(argv[0]!, {
      args: argv.slice(1),
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const dec = new TextDecoder();
    const pipe = this.#child.stderr.pipeTo(
      new WritableStream({ write: (c) => void (this.#stderr += dec.decode(c)) }),
    ).catch(() => {});
    this.#status = Promise.all([this.#child.status, pipe]).then(([s]) => {
      this.#exited = true;
      return s;
    });
  }

  /** `kind` qemu-nbd, denbd or nbdkit; `args` its options and FILE (socket options added). */
  static async start(kind: string, dir: string, args: string[], name = kind): Promise<Origin> {
    const socket = `${dir}/${name}.sock`;
    const argv = kind === "nbdkit"
      ? ["nbdkit", "-f", "-U", socket, ...args]
      : [kind === "denbd" ? DENBD : "qemu-nbd", "-k", socket, ...args];
    const o = new Origin(argv, socket);
    await o.ready();
    return o;
  }

  async ready(): Promise<void> {
    for (let i = 0; i < 400 && !this.#exited; i++) {
      try {
        const c = await Deno.connect({ transport: "unix", path: this.socket });
        c.close();
        return;
      } catch {
        await new Promise((r) => setTimeout(r, 25));
      }
    }
    await this.stop();
    throw new Error(`origin did not listen on ${this.socket}: ${this.#stderr}`);
  }

  uri(exp = ""): string {
    return `nbd+unix:///${encodeURIComponent(exp)}?socket=${this.socket}`;
  }

  kill(): void {
    try {
      this.#child.kill("SIGKILL");
    } catch { /* gone */ }
  }

  async stop(): Promise<void> {
    try {
      this.#child.kill("SIGTERM");
    } catch { /* gone */ }
    const t = setTimeout(() => this.kill(), 5000);
    await this.#status;
    clearTimeout(t);
  }
}

/** Deterministic random numbers (xorshift32). */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

async function rejection(p: Promise<unknown>): Promise<BlockError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof BlockError, `expected BlockError, got ${e}`);
    return e;
  }
  assert.fail("expected a rejection");
}

/** (length, data, zero) runs, neighbours with equal attributes merged. */
function mergeRuns(runs: [number, boolean, boolean][]): [number, boolean, boolean][] {
  const out: [number, boolean, boolean][] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last && last[1] === r[1] && last[2] === r[2]) last[0] += r[0];
    else out.push([...r]);
  }
  return out;
}

async function deviceRuns(d: BlockDevice): Promise<[number, boolean, boolean][]> {
  const el = new ExtentList(1_000_000);
  await d.extents(0, d.size, el);
  const runs: [number, boolean, boolean][] = [];
  for (let i = 0; i < el.pairs.length; i += 2) {
    const f = el.pairs[i + 1]!;
    runs.push([el.pairs[i]!, (f & 1) === 0, (f & 2) !== 0]);
  }
  return mergeRuns(runs);
}

async function mapRuns(image: string, format: string): Promise<[number, boolean, boolean][]> {
  const r = await runOk(["qemu-img", "map", "-U", "-f", format, "--output=json", image]);
  const entries = JSON.parse(r.stdout) as { length: number; data: boolean; zero: boolean }[];
  return mergeRuns(entries.map((e) => [e.length, e.data, e.zero]));
}

/** The guest-visible bytes of an image file. */
async function imageBytes(image: string, format: string, dir: string): Promise<Uint8Array> {
  if (format === "raw") return await Deno.readFile(image);
  const out = `${dir}/converted.raw`;
  await runOk(["qemu-img", "convert", "-U", "-f", format, "-O", "raw", image, out]);
  const b = await Deno.readFile(out);
  await Deno.remove(out);
  return b;
}

const SIZE = 8 * MiB;

async function makeImage(dir: string, format: "raw" | "qcow2"): Promise<string> {
  const raw = `${dir}/base.raw`;
  await makeSparseImage(raw, SIZE, [
    { offset: 0, length: 64 * 1024, fill: "random", seed: 3 },
    { offset: 1 * MiB, length: 300 * 1024, fill: 0x5a },
    { offset: 5 * MiB + 4096, length: 8192, fill: "random", seed: 9 },
  ]);
  if (format === "raw") return raw;
  const q = `${dir}/base.qcow2`;
  await runOk(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q]);
  await runOk(["qemu-io", "-f", "qcow2", "-c", "write -z 2M 128k", q]);
  await Deno.remove(raw);
  return q;
}

// ---------------------------------------------------------------------------------------------
// The workload, against each origin and format

for (const kind of ["qemu-nbd", "denbd"]) {
  for (const format of ["raw", "qcow2"] as const) {
    Deno.test(`nbd client: random workload through ${kind} -f ${format} leaves the origin identical`, async () => {
      await withTempDir(async (dir) => {
        const image = await makeImage(dir, format);
        const shadow = await imageBytes(image, format, dir);
        const origin = await Origin.start(kind, dir, [
          "-f",
          format,
          "-t",
          "--discard=unmap",
          image,
        ]);
        let dev: BlockDevice | undefined;
        try {
          dev = await openNbdProtocol(parseNbdFilename(origin.uri()), ctxRW);
          const d = dev;
          assert.equal(d.size, SIZE);
          assert.equal(d.caps.writable, true);
          assert.equal(d.caps.flush && d.caps.trim && d.caps.zero && d.caps.extents, true);
          assert.equal(d.caps.minBlock, 1);

          const rand = rng(format === "raw" ? 11 : 12);
          const counts = { read: 0, write: 0, zero: 0, trim: 0, flush: 0 };
          for (let i = 0; i < 400; i++) {
            const len = 1 + rand(rand(4) === 0 ? 2 * MiB : 70_000);
            const off = rand(SIZE - len);
            const op = rand(10);
            if (op < 3) {
              const buf = new Uint8Array(len).fill(0xee); // stale bytes must be overwritten
              await d.pread(buf, off);
              assert.deepEqual(buf, shadow.subarray(off, off + len), `read ${len} at ${off}`);
              counts.read++;
            } else if (op < 6) {
              const data = patternBytes(len, i + 1);
              await d.pwrite(data, off, { fua: rand(2) === 0 });
              shadow.set(data, off);
              counts.write++;
            } else if (op < 8) {
              await d.zero(off, len, { noHole: rand(2) === 0, fua: rand(3) === 0 });
              shadow.fill(0, off, off + len);
              counts.zero++;
            } else if (op < 9) {
              // After TRIM the contents are the server's choice: learn them back.
              await d.trim(off, len, {});
              const back = new Uint8Array(len);
              await d.pread(back, off);
              shadow.set(back, off);
              counts.trim++;
            } else {
              await d.flush();
              counts.flush++;
            }
          }
          assert.ok(Object.values(counts).every((n) => n > 10), JSON.stringify(counts));

          // Many requests in flight: 200 concurrent reads over 64 slots, plus large ones split
          // at the 32 MiB... (the export is 8 MiB: the whole disk in one request).
          const reads = Array.from({ length: 200 }, (_, k) => {
            const len = k % 50 === 0 ? SIZE : 4096;
            const off = len === SIZE ? 0 : rand(SIZE - len);
            const b = new Uint8Array(len);
            return { off, b, p: d.pread(b, off) };
          });
          await Promise.all(reads.map((r) => r.p));
          for (const r of reads) {
            assert.deepEqual(r.b, shadow.subarray(r.off, r.off + r.b.length), `read at ${r.off}`);
          }

          await d.flush();
          assert.deepEqual(await deviceRuns(d), await mapRuns(image, format));
        } finally {
          await dev?.close();
          await origin.stop();
        }
        const final = await imageBytes(image, format, dir);
        assert.equal(final.length, shadow.length);
        assert.ok(final.every((b, k) => b === shadow[k]), "origin differs from the shadow copy");
      });
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

Deno.test("nbd client: read-only origin, reads past the end, ENOSPC and EIO keep their errno", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.raw`;
    await makeSparseImage(image, MiB, [{ offset: 0, length: 4096, fill: 7 }]);
    const ro = await Origin.start("qemu-nbd", dir, ["-f", "raw", "-r", "-t", image], "ro");
    const full = await Origin.start("nbdkit", dir, ["full", "1M"], "full");
    const eio = await Origin.start(
      "nbdkit",
      dir,
      ["--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=100%"],
      "eio",
    );
    try {
      // Writable open of a read-only export: qemu-nbd's own re-export says the same.
      const e = await rejection(openNbdProtocol(parseNbdFilename(ro.uri()), ctxRW));
      const q = await run(["qemu-nbd", "-k", `${dir}/re.sock`, "-f", "raw", ro.uri()]);
      assert.equal(q.stderr.trim(), `qemu-nbd: Failed to blk_new_open '${ro.uri()}': ${e.message}`);

      const d = await openNbdProtocol(parseNbdFilename(ro.uri()), ctxRO);
      try {
        assert.equal(d.caps.writable, false);
        assert.equal((await rejection(d.pwrite(new Uint8Array(1), 0, {}))).errno, Errno.EPERM);
        const b = new Uint8Array(4096);
        await d.pread(b, 0);
        assert.ok(b.every((x) => x === 7));
        const past = await rejection(d.pread(new Uint8Array(512), MiB));
        assert.equal(past.errno, Errno.EINVAL);
      } finally {
        await d.close();
      }

      // The server's own answer to a write on a read-only export, through the bare client.
      const conn = await Deno.connect({ transport: "unix", path: ro.socket });
      const oc = new OptionClient(conn);
      const c = new NbdClient(conn, oc.reader, await negotiate(oc, { exportName: "" }));
      try {
        // qemu-nbd 7.2 answers EINVAL here (not EPERM), with its message in the error chunk.
        const w = await rejection(c.write(new Uint8Array(512), 0));
        assert.equal(w.errno, Errno.EINVAL);
        assert.equal(w.message, "Invalid argument: Export is read-only");
        await c.read(new Uint8Array(512), 0); // the connection survives a refused request
      } finally {
        await c.disconnect();
      }

      const f = await openNbdProtocol(parseNbdFilename(full.uri()), ctxRW);
      try {
        assert.equal((await rejection(f.pwrite(new Uint8Array(4096), 0, {}))).errno, Errno.ENOSPC);
      } finally {
        await f.close();
      }
      const x = await openNbdProtocol(parseNbdFilename(eio.uri()), ctxRW);
      try {
        assert.equal((await rejection(x.pread(new Uint8Array(4096), 0))).errno, Errno.EIO);
        await x.pwrite(new Uint8Array(4096).fill(1), 0, {}); // writes are not affected
      } finally {
        await x.close();
      }
    } finally {
      await Promise.all([ro.stop(), full.stop(), eio.stop()]);
    }
  });
});

Deno.test("nbd client: a killed origin fails every pending and later request with EIO promptly", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/big.raw`;
    await makeSparseImage(image, 64 * MiB, [{ offset: 0, length: 64 * MiB, fill: 3 }]);
    const origin = await Origin.start("qemu-nbd", dir, ["-f", "raw", "-t", image]);
    const d = await openNbdProtocol(parseNbdFilename(origin.uri()), ctxRW);
    try {
      const pending = Array.from(
        { length: 300 },
        (_, i) => d.pread(new Uint8Array(MiB), (i % 64) * MiB),
      );
      await pending[0];
      origin.kill();
      const t0 = Date.now();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const settled = await Promise.race([
        Promise.allSettled(pending),
        new Promise<"timeout">((r) => timer = setTimeout(() => r("timeout"), 10_000)),
      ]);
      clearTimeout(timer);
      assert.notEqual(settled, "timeout", "requests still pending 10 s after the origin died");
      const results = settled as PromiseSettledResult<void>[];
      const failed = results.filter((r) => r.status === "rejected");
      assert.ok(failed.length > 0, "every request finished before the kill");
      for (const r of failed) {
        assert.equal(((r as PromiseRejectedResult).reason as BlockError).errno, Errno.EIO);
      }
      assert.ok(Date.now() - t0 < 5000, `took ${Date.now() - t0} ms`);
      // Later requests: one reconnect attempt each, refused: EIO at once.
      const t1 = Date.now();
      assert.equal((await rejection(d.pread(new Uint8Array(512), 0))).errno, Errno.EIO);
      assert.equal((await rejection(d.flush())).errno, Errno.EIO);
      assert.ok(Date.now() - t1 < 3000);
    } finally {
      await d.close();
      await origin.stop();
    }
  });
});

Deno.test("nbd client: reconnect-delay re-sends requests once the origin is back", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.raw`;
    await makeSparseImage(image, 4 * MiB, [{ offset: MiB, length: MiB, fill: 9 }]);
    const args = ["-f", "raw", "-t", image];
    let origin = await Origin.start("qemu-nbd", dir, args);
    const d = await openNbdProtocol(
      { ...parseNbdFilename(origin.uri()), "reconnect-delay": "10" },
      ctxRW,
    );
    try {
      origin.kill();
      await new Promise((r) => setTimeout(r, 200));
      const b = new Uint8Array(MiB);
      const p = d.pread(b, MiB);
      await new Promise((r) => setTimeout(r, 500));
      origin = await Origin.start("qemu-nbd", dir, args);
      await p;
      assert.ok(b.every((x) => x === 9));
    } finally {
      await d.close();
      await origin.stop();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Opening: messages and bounds

/** qemu-img's complaint about `filename`, after its "Could not open 'F': " prefix. */
async function qemuImgError(filename: string): Promise<string> {
  const r = await run(["qemu-img", "info", filename]);
  assert.notEqual(r.code, 0);
  return r.stderr.trim().replace(`qemu-img: Could not open '${filename}': `, "");
}

Deno.test("nbd client: connect and negotiation failures say what qemu says", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.raw`;
    await makeSparseImage(image, MiB);
    const origin = await Origin.start("qemu-nbd", dir, ["-f", "raw", "-t", "-x", "exp", image]);
    try {
      for (
        const f of [
          "nbd://127.0.0.1:1/x",
          "nbd://[::1]:1/x",
          `nbd+unix:///x?socket=${dir}/missing.sock`,
          "nbd:unix:",
          origin.uri("nope"),
          "nbd:",
        ]
      ) {
        const e = await rejection(openNbdProtocol(parseNbdFilename(f), ctxRW));
        assert.equal(e.message, await qemuImgError(f), f);
      }
      const good = parseNbdFilename(origin.uri("exp"));
      for (
        const [extra, key] of [
          [{ bogus: "1" }, "bogus"],
          [{ "server.bogus": "1" }, "bogus"],
          [{ "reconnect-delay": "soon" }, "reconnect-delay"],
        ] as const
      ) {
        const opts: Record<string, string> = { ...good, ...extra };
        const e = await rejection(openNbdProtocol(opts, ctxRW));
        const json = `json:${JSON.stringify({ driver: "nbd", ...opts })}`;
        assert.equal(e.message, await qemuImgError(json), key);
      }
      const tls = await rejection(openNbdProtocol({ ...good, "tls-creds": "t" }, ctxRW));
      assert.match(tls.message, /not supported yet/);
      // qemu's x-dirty-bitmap, with a context the server does not have, and with one it has.
      const noBitmap = { ...good, "x-dirty-bitmap": "qemu:dirty-bitmap:none" };
      const nb = await rejection(openNbdProtocol(noBitmap, ctxRW));
      assert.equal(
        nb.message,
        await qemuImgError(`json:${JSON.stringify({ driver: "nbd", ...noBitmap })}`),
      );
    } finally {
      await origin.stop();
    }
  });
});

Deno.test("nbd client: x-dirty-bitmap selects another meta context for block status", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.raw`;
    await makeSparseImage(image, MiB, [{ offset: 0, length: 4096, fill: 1 }]);
    const origin = await Origin.start("qemu-nbd", dir, ["-f", "raw", "-t", "-A", image]);
    try {
      const opts = { ...parseNbdFilename(origin.uri()), "x-dirty-bitmap": "qemu:allocation-depth" };
      const d = await openNbdProtocol(opts, ctxRW);
      try {
        const el = new ExtentList(100);
        await d.extents(0, d.size, el);
        assert.deepEqual(el.pairs, [MiB, 1]); // raw: depth 1 everywhere, as qemu-nbd -A says
      } finally {
        await d.close();
      }
    } finally {
      await origin.stop();
    }
  });
});

Deno.test("nbd client: a server that never answers cannot hang the open", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/silent.sock`;
    const l = Deno.listen({ transport: "unix", path });
    const held: Deno.Conn[] = [];
    const accepting = (async () => {
      for await (const c of l) held.push(c);
    })();
    try {
      const opts = { "server.type": "unix", "server.path": path };
      let t0 = Date.now();
      const e = await rejection(openNbdProtocol(opts, { ...ctxRW, handshakeTimeoutMs: 300 }));
      assert.match(e.message, /timed out/);
      assert.ok(Date.now() - t0 < 3000);
      t0 = Date.now();
      await rejection(openNbdProtocol({ ...opts, "open-timeout": "1" }, ctxRW));
      assert.ok(Date.now() - t0 < 4000, `open-timeout=1 took ${Date.now() - t0} ms`);
    } finally {
      l.close();
      await accepting.catch(() => {});
      for (const c of held) c.close();
    }
  });
});

Deno.test("nbd client: open-timeout waits for a server that starts late", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.raw`;
    await makeSparseImage(image, MiB);
    const socket = `${dir}/qemu-nbd.sock`;
    const opening = openNbdProtocol(
      { "server.type": "unix", "server.path": socket, "open-timeout": "20" },
      ctxRW,
    );
    await new Promise((r) => setTimeout(r, 700));
    const origin = await Origin.start("qemu-nbd", dir, ["-f", "raw", "-t", image]);
    try {
      const d = await opening;
      assert.equal(d.size, MiB);
      await d.close();
    } finally {
      await origin.stop();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Old servers (nbdkit): no structured replies, non-fixed newstyle, oldstyle

for (
  const [what, flags] of [
    ["simple replies only (--no-sr)", ["--no-sr"]],
    ["non-fixed newstyle (EXPORT_NAME)", ["--mask-handshake=0"]],
    ["oldstyle", ["--oldstyle"]],
  ] as const
) {
  Deno.test(`nbd client: nbdkit with ${what}`, async () => {
    await withTempDir(async (dir) => {
      const origin = await Origin.start("nbdkit", dir, [...flags, "memory", "1M"]);
      try {
        const d = await openNbdProtocol(parseNbdFilename(origin.uri()), ctxRW);
        try {
          assert.equal(d.size, MiB);
          assert.equal(d.caps.extents, false);
          const data = patternBytes(100_000, 5);
          // nbdkit 1.32 advertises FUA and WRITE_ZEROES to oldstyle clients and then refuses them.
          const oldstyle = flags[0] === "--oldstyle";
          await d.pwrite(data, 12345, { fua: !oldstyle });
          if (!oldstyle) await d.zero(200_000, 5000, {});
          const b = new Uint8Array(300_000);
          await Promise.all([d.pread(b, 0), d.pread(new Uint8Array(4096), 4096)]);
          const want = new Uint8Array(300_000);
          want.set(data, 12345);
          assert.deepEqual(b, want);
          const el = new ExtentList(10);
          await d.extents(0, d.size, el);
          assert.deepEqual(el.pairs, [MiB, 0]); // no base:allocation: all data
        } finally {
          await d.close();
        }
      } finally {
        await origin.stop();
      }
    });
  });
}
