/**
 * Shared pieces of the qcow2 write workload and crash tests: a seeded PRNG, the random workload
 * generator, the pattern files both replays read their data from, the qemu-io replay, the libnbd
 * replay (`_workload.py`), and the crash model that says which bytes must have survived.
 *
 * A workload is a list of ops grouped in batches. Ops of one batch go out at the same time over
 * several connections, so they never overlap in bytes; they deliberately share and neighbour
 * clusters, which is where a qcow2 writer's allocation races live.
 *
 * @module
 */

import { patternBytes, PYTHON, run, runOk } from "./_harness.ts";

/** The libnbd replay script. */
export const WORKLOAD_PY = decodeURIComponent(new URL("./_workload.py", import.meta.url).pathname);

/** Server arguments for a writable qcow2 export, as the workload tests use it. */
export const WRITE_ARGS: readonly string[] = ["-f", "qcow2", "-t", "--discard=unmap", "-e", "0"];

// ---------------------------------------------------------------------------------------------
// PRNG

/** mulberry32: small, fast, and the same sequence everywhere for one seed. */
export class Rng {
  #s: number;

  constructor(seed: number) {
    this.#s = seed >>> 0;
  }

  /** Next unsigned 32-bit value. */
  next(): number {
    this.#s = (this.#s + 0x6d2b79f5) >>> 0;
    let t = this.#s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor((this.next() / 0x1_0000_0000) * n);
  }

  /** Integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.next() / 0x1_0000_0000 < p;
  }

  /** One element of a non-empty array. */
  pick<T>(items: readonly T[]): T {
    const v = items[this.int(items.length)];
    if (v === undefined) throw new Error("Rng.pick: empty array");
    return v;
  }
}

/** Mixes a label into a seed (FNV-1a over the label, then one PRNG step). */
export function mixSeed(seed: number, label: string): number {
  let h = (0x811c9dc5 ^ seed) >>> 0;
  for (let i = 0; i < label.length; i++) h = Math.imul(h ^ label.charCodeAt(i), 0x01000193) >>> 0;
  return new Rng(h).next();
}

/**
 * The run's base seed: `DENBD_WORKLOAD_SEED` if set (to replay a failure), else random. Tests
 * print it in every failure message.
 */
export function baseSeed(): number {
  const env = Deno.env.get("DENBD_WORKLOAD_SEED");
  if (env !== undefined && env !== "") {
    const n = Number(env);
    if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) {
      throw new Error(`DENBD_WORKLOAD_SEED must be an integer in [0, 2^32), got ${env}`);
    }
    return n;
  }
  return crypto.getRandomValues(new Uint32Array(1))[0]!;
}

/** True when `DENBD_SOAK=1` asks for long runs. */
export const SOAK = Deno.env.get("DENBD_SOAK") === "1";

// ---------------------------------------------------------------------------------------------
// Workload generation

/** What an op does; zero without `noHole` may unmap (qemu-io `write -z -u`). */
export type OpKind = "write" | "zero" | "trim" | "flush";

/** One NBD request of the workload. Flushes have off = len = 0. */
export interface Op {
  readonly kind: OpKind;
  readonly off: number;
  readonly len: number;
  /** Zero only: NBD_CMD_FLAG_NO_HOLE (qemu-io `write -z` without -u). */
  readonly noHole: boolean;
  /** NBD_CMD_FLAG_FUA (qemu-io `-f`); never on flushes. */
  readonly fua: boolean;
  /** Index of the connection that sends it. */
  readonly conn: number;
  /** Write only: length of the pattern that is repeated over the op (its file's size). */
  readonly pat: number;
  /** Write only: the pattern is all zero bytes (data that happens to be zero, not a zero op). */
  readonly zeroData: boolean;
}

/** A generated workload: ops in index order, and batches of op indices run one after another. */
export interface Workload {
  readonly seed: number;
  readonly size: number;
  readonly connections: number;
  readonly ops: readonly Op[];
  readonly batches: readonly (readonly number[])[];
}

/** Shape of a workload: the image geometry and how much to generate. */
export interface GenOptions {
  readonly size: number;
  readonly clusterSize: number;
  /** Subcluster size for extended L2 images (cs / 32). */
  readonly subcluster?: number;
  /** Number of data ops (flushes come on top). */
  readonly ops: number;
  readonly connections: number;
  /** Largest op length. */
  readonly maxLen: number;
  /** Byte ranges seeded with data before the workload: ops favour them. */
  readonly hot?: readonly (readonly [number, number])[];
  /**
   * Keep every other op of a batch out of the clusters where a WRITE_ZEROES without NO_HOLE
   * starts or ends unaligned. qemu-nbd 7.2 corrupts the image in that case (it widens such a
   * zero to the whole cluster when the cluster reads as zero, racing with a concurrent write into
   * the same cluster: refcount=1 reference=2), so the tests avoid it when validated against
   * qemu-nbd and keep it for denbd.
   */
  readonly avoidQemuZeroRace?: boolean;
}

/** Generates a workload; the same seed and options always give the same workload. */
export function generateWorkload(seed: number, o: GenOptions): Workload {
  const rng = new Rng(seed);
  const cs = o.clusterSize;
  const clusters = Math.ceil(o.size / cs);
  const hotClusters: number[] = [];
  for (const [off, len] of o.hot ?? []) {
    const first = Math.floor(off / cs);
    const last = Math.floor((off + len - 1) / cs);
    for (let i = 0; i < 4; i++) hotClusters.push(rng.range(first, last));
  }
  for (let i = 0; i < 8; i++) hotClusters.push(rng.int(clusters));

  const ops: Op[] = [];
  const batches: number[][] = [];
  let dataOps = 0;

  const flushOp = (conn: number): Op => ({
    kind: "flush",
    off: 0,
    len: 0,
    noHole: false,
    fua: false,
    conn,
    pat: 0,
    zeroData: false,
  });

  const pickLen = (): number => {
    const r = rng.int(100);
    let len: number;
    if (r < 18) len = rng.range(1, 64);
    else if (r < 36) len = rng.range(1, 4096);
    else if (r < 50) len = 512 * rng.range(1, 16);
    else if (r < 60) len = (o.subcluster ?? 4096) * rng.range(1, 8);
    else if (r < 80) len = cs * rng.range(1, 3);
    else if (r < 90) len = rng.range(1, 3 * cs);
    else len = rng.range(1, o.maxLen);
    return Math.max(1, Math.min(len, o.maxLen, o.size));
  };

  /** A range near cluster `anchor`, with a random alignment class. */
  const pickRange = (anchor: number, clusterAligned: boolean): [number, number] => {
    const base = anchor * cs;
    if (clusterAligned) {
      const len = Math.min(cs * rng.range(1, 3), Math.max(cs, o.maxLen - (o.maxLen % cs)));
      return clamp(base, len);
    }
    let len = pickLen();
    const r = rng.int(100);
    let off: number;
    if (r < 25) off = base;
    else if (r < 45) off = base + 512 * rng.int(Math.max(1, cs / 512));
    else if (r < 55) {
      const g = o.subcluster ?? Math.min(4096, cs);
      off = base + g * rng.int(Math.max(1, cs / g));
    } else if (r < 80) off = base + rng.int(cs);
    else {
      // Crosses the boundary at the end of the anchor cluster.
      if (len < 2) len = rng.range(2, Math.min(o.maxLen, 2 * cs));
      off = base + cs - rng.range(1, len - 1);
    }
    return clamp(off, len);
  };

  const clamp = (off: number, len: number): [number, number] => {
    len = Math.min(len, o.size);
    off = Math.max(0, Math.min(off, o.size - len));
    return [off, len];
  };

  const dataOp = (kind: OpKind, off: number, len: number, conn: number): Op => {
    const zeroData = kind === "write" && rng.chance(0.03);
    return {
      kind,
      off,
      len,
      noHole: kind === "zero" && rng.chance(0.5),
      fua: rng.chance(0.08),
      conn,
      pat: kind === "write" ? (rng.chance(0.05) ? 1 : rng.range(257, 4099)) : 0,
      zeroData,
    };
  };

  const pickKind = (): OpKind => {
    const r = rng.int(100);
    return r < 55 ? "write" : r < 82 ? "zero" : "trim";
  };

  /** Clusters an op touches, and those no other op of its batch may touch (see avoidQemuZeroRace). */
  const footprint = (op: Op) => {
    const first = Math.floor(op.off / cs);
    const last = Math.floor((op.off + op.len - 1) / cs);
    const own: number[] = [];
    if (o.avoidQemuZeroRace && op.kind === "zero" && !op.noHole) {
      if (op.off % cs !== 0) own.push(first);
      if ((op.off + op.len) % cs !== 0) own.push(last);
    }
    return { off: op.off, end: op.off + op.len, first, last, own };
  };
  type Footprint = ReturnType<typeof footprint>;
  const conflict = (a: Footprint, b: Footprint) =>
    (a.off < b.end && b.off < a.end) ||
    a.own.some((c) => c >= b.first && c <= b.last) ||
    b.own.some((c) => c >= a.first && c <= a.last);

  // Bounded: every iteration adds at least one op, or gives up on one after a fixed number of
  // placement attempts.
  for (let iter = 0; dataOps < o.ops && iter < o.ops * 4; iter++) {
    if (rng.chance(0.05)) {
      batches.push([ops.length]);
      ops.push(flushOp(rng.int(o.connections)));
      continue;
    }
    const batch: number[] = [];
    const placed: Footprint[] = [];
    const connBase = rng.int(o.connections);
    /** Adds the op to the batch unless it conflicts with one already there. */
    const tryAdd = (kind: OpKind, off: number, len: number): boolean => {
      const op = dataOp(kind, off, len, (connBase + batch.length) % o.connections);
      const fp = footprint(op);
      if (placed.some((p) => conflict(p, fp))) return false;
      placed.push(fp);
      batch.push(ops.length);
      ops.push(op);
      dataOps++;
      return true;
    };
    const anchor = rng.chance(0.5) ? rng.pick(hotClusters) : rng.int(clusters);
    const scatter = rng.chance(0.15);
    const want = rng.chance(0.3) ? rng.range(1, 12) : rng.range(1, 5);
    if (rng.chance(0.3) && (anchor + 1) * cs <= o.size && cs > 1) {
      // Two halves of one cluster (often not allocated yet) from two connections at once.
      const split = rng.range(1, cs - 1);
      tryAdd(rng.chance(0.8) ? "write" : "zero", anchor * cs, split);
      tryAdd(rng.chance(0.7) ? "write" : pickKind(), anchor * cs + split, cs - split);
    }
    for (let j = 0; j < want && dataOps < o.ops; j++) {
      for (let attempt = 0; attempt < 30; attempt++) {
        const kind = pickKind();
        const a = scatter ? rng.int(clusters) : Math.max(0, anchor + rng.range(-1, 2));
        // Trims and zeroes that cover whole clusters are the ones that change the mapping.
        const aligned = kind !== "write" && rng.chance(0.4);
        const [off, len] = pickRange(Math.min(a, clusters - 1), aligned);
        if (tryAdd(kind, off, len)) break;
      }
    }
    if (batch.length === 0) continue;
    if (rng.chance(0.08)) {
      // A flush in flight together with writes: it covers only what completed before it.
      batch.push(ops.length);
      ops.push(flushOp(rng.int(o.connections)));
    }
    batches.push(batch);
  }
  batches.push([ops.length]);
  ops.push(flushOp(0));
  return { seed, size: o.size, connections: o.connections, ops, batches };
}

/** The bytes op `i` repeats over its range (its pattern file's content). */
export function opPattern(w: Workload, i: number): Uint8Array {
  const op = w.ops[i]!;
  if (op.zeroData) return new Uint8Array(op.pat);
  return patternBytes(op.pat, mixSeed(w.seed, `pattern ${i}`) || 1);
}

/** The data a write op writes: its pattern repeated to its length. */
export function opData(w: Workload, i: number): Uint8Array {
  const op = w.ops[i]!;
  const pat = opPattern(w, i);
  const out = new Uint8Array(op.len);
  for (let p = 0; p < op.len; p += pat.length) out.set(pat.subarray(0, op.len - p), p);
  return out;
}

/** Writes the workload JSON and one pattern file per write op; returns the JSON path. */
export async function writeWorkloadFiles(w: Workload, dir: string): Promise<string> {
  await Deno.mkdir(`${dir}/pat`, { recursive: true });
  const jobs: Promise<void>[] = [];
  w.ops.forEach((op, i) => {
    if (op.kind === "write") jobs.push(Deno.writeFile(`${dir}/pat/${i}.bin`, opPattern(w, i)));
  });
  await Promise.all(jobs);
  const path = `${dir}/workload.json`;
  await Deno.writeTextFile(path, JSON.stringify(w));
  return path;
}

/**
 * Describes where two images' contents differ (first few runs of differing bytes, each with the
 * ops that touched it), or returns undefined if they are equal.
 */
export function describeDiff(
  actual: Uint8Array,
  expected: Uint8Array,
  w: Workload,
): string | undefined {
  if (actual.length !== expected.length) {
    return `sizes differ: ${actual.length} vs ${expected.length} bytes`;
  }
  const runs: [number, number][] = [];
  let total = 0;
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] === expected[i]) continue;
    total++;
    const last = runs[runs.length - 1];
    if (last !== undefined && last[1] === i) last[1] = i + 1;
    else if (runs.length < 4) runs.push([i, i + 1]);
  }
  if (total === 0) return undefined;
  const lines = runs.map(([lo, hi]) => {
    const touching = w.ops.flatMap((op, i) =>
      op.kind !== "flush" && op.off < hi && op.off + op.len > lo ? [describeOp(w, i)] : []
    );
    return `  bytes [${lo}, ${hi}): got 0x${actual[lo]!.toString(16)}, expected 0x${
      expected[lo]!.toString(16)
    }; ops there: ${touching.slice(-6).join("; ") || "none"}`;
  });
  return `${total} bytes differ, first runs:\n${lines.join("\n")}`;
}

/** One-line description of an op, for failure messages. */
export function describeOp(w: Workload, i: number): string {
  const op = w.ops[i];
  if (op === undefined) return `op ${i} (none)`;
  if (op.kind === "flush") return `op ${i}: flush conn ${op.conn}`;
  const flags = [op.noHole ? "NO_HOLE" : "", op.fua ? "FUA" : ""].filter((s) => s).join("|");
  return `op ${i}: ${op.kind} ${op.off}+${op.len}${flags ? ` ${flags}` : ""} conn ${op.conn}`;
}

// ---------------------------------------------------------------------------------------------
// Replays

/** qemu-io commands equivalent to the workload (flushes included; they change no content). */
export function qemuIoScript(w: Workload, patDir: string): string {
  const lines = w.ops.map((op, i) => {
    const f = op.fua ? "-f " : "";
    switch (op.kind) {
      case "write":
        return `write -q ${f}-s ${patDir}/${i}.bin ${op.off} ${op.len}`;
      case "zero":
        // NBD WRITE_ZEROES without NO_HOLE may unmap, exactly qemu's BDRV_REQ_MAY_UNMAP.
        return `write -q -z ${op.noHole ? "" : "-u "}${f}${op.off} ${op.len}`;
      case "trim":
        return `discard -q ${op.off} ${op.len}`;
      case "flush":
        return "flush";
    }
  });
  return lines.join("\n") + "\nquit\n";
}

/**
 * Applies the workload to a qcow2 image with qemu-io directly (writeback cache, discard=unmap
 * like the server's --discard=unmap). Throws if qemu-io reports any failure.
 */
export async function replayWithQemuIo(image: string, w: Workload, patDir: string): Promise<void> {
  const r = await run(
    ["qemu-io", "-f", "qcow2", "-t", "writeback", "-d", "unmap", image],
    { stdin: qemuIoScript(w, patDir), timeoutMs: 120_000 },
  );
  // qemu-io keeps going after a failed command; any output besides prompts is a failure.
  const noise = (r.stdout + "\n" + r.stderr).split("\n").map((l) => l.replace(/^(qemu-io> )+/, ""))
    .filter((l) => l.trim() !== "");
  if (r.code !== 0 || noise.length > 0) {
    throw new Error(
      `qemu-io replay on ${image} failed (exit ${r.code}):\n${noise.slice(0, 20).join("\n")}`,
    );
  }
}

/** The summary `_workload.py` prints. */
export interface DriverResult {
  readonly acked: number;
  readonly errors: number;
  readonly flushes: number;
  readonly batches: number;
  readonly multiConn: boolean;
  readonly stopped: string | null;
  readonly sha256?: string;
}

/** Runs `_workload.py` to its end and returns its summary. */
export async function runDriver(
  uri: string,
  workloadPath: string,
  dir: string,
  logPath: string,
  opts: { hash?: boolean; deadlineS?: number } = {},
): Promise<DriverResult> {
  const deadline = opts.deadlineS ?? 90;
  const r = await runOk([
    PYTHON,
    WORKLOAD_PY,
    uri,
    workloadPath,
    `${dir}/pat`,
    logPath,
    "--deadline",
    String(deadline),
    ...(opts.hash ? ["--hash"] : []),
  ], { timeoutMs: (deadline + 30) * 1000 });
  const last = r.stdout.trim().split("\n").pop() ?? "";
  try {
    return JSON.parse(last) as DriverResult;
  } catch {
    throw new Error(`_workload.py printed no JSON\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Images

/** qemu-img with the given arguments; throws on failure. */
export async function qimg(...args: string[]): Promise<string> {
  return (await runOk(["qemu-img", ...args], { timeoutMs: 60_000 })).stdout;
}

/** qemu-io commands on an image file (seeding); throws on failure. */
export async function qio(img: string, cmds: readonly string[], fmt = "qcow2"): Promise<void> {
  await runOk(["qemu-io", "-f", fmt, ...cmds.flatMap((c) => ["-c", c]), img]);
}

/** Whole guest content of an image (through its backing chain), or of one internal snapshot. */
export async function readGuest(
  img: string,
  out: string,
  snapshot?: string,
): Promise<Uint8Array> {
  await qimg(
    "convert",
    "-U",
    "-f",
    "qcow2",
    ...(snapshot === undefined ? [] : ["-l", `snapshot.name=${snapshot}`]),
    "-O",
    "raw",
    img,
    out,
  );
  const data = await Deno.readFile(out);
  await Deno.remove(out);
  return data;
}

/** `qemu-img check --output=json` result. */
export interface CheckResult {
  readonly code: number;
  readonly report: Record<string, unknown> | undefined;
  readonly output: string;
}

/** Runs `qemu-img check --output=json` (exit 0 clean, 2 corrupt, 3 leaks only). */
export async function checkImage(img: string): Promise<CheckResult> {
  const r = await run(["qemu-img", "check", "--output=json", "-f", "qcow2", img], {
    timeoutMs: 60_000,
  });
  let report: Record<string, unknown> | undefined;
  try {
    report = JSON.parse(r.stdout) as Record<string, unknown>;
  } catch { /* left undefined; the caller reports the raw output */ }
  return { code: r.code, report, output: `${r.stdout}${r.stderr}` };
}

// ---------------------------------------------------------------------------------------------
// Crash model

/** What the model says about an image after a crash. */
export interface CrashModel {
  /** Expected bytes; only meaningful where `unknown` is 0. */
  readonly expected: Uint8Array;
  /** 1 where the content is not promised (not flushed, in flight, or trimmed). */
  readonly unknown: Uint8Array;
  /** Index of the last flush that completed, or -1. */
  readonly lastFlush: number;
  /** Ops whose effect is promised (completed before that flush was sent). */
  readonly durable: number;
  /** Ops after that flush whose effect is promised because they were acknowledged with FUA. */
  readonly fua: number;
  /** Ops that were sent (their batch started). */
  readonly issued: number;
}

/** One parsed `_workload.py` log. */
interface ParsedLog {
  readonly started: number[];
  readonly acked: Set<number>;
  readonly failed: Map<number, number>;
}

function parseLog(text: string): ParsedLog {
  const started: number[] = [];
  const acked = new Set<number>();
  const failed = new Map<number, number>();
  for (const line of text.split("\n")) {
    const [tag, a, b] = line.split(" ");
    if (tag === "B") started.push(Number(a));
    else if (tag === "A") acked.add(Number(a));
    else if (tag === "E") failed.set(Number(a), Number(b));
  }
  return { started, acked, failed };
}

/**
 * Builds the crash model from the image's content before the workload and the driver's log.
 *
 * NBD promises that a FLUSH makes durable every write the server completed before the flush was
 * sent. Batches run one after another and a batch's ops (and its flush, if any) are sent
 * together, so the flush in batch k covers exactly the acknowledged ops of batches before k. Those
 * are applied in op order; every byte touched by any other sent op may or may not have changed.
 * A trim promises nothing about content, so trimmed bytes are unknown until a durable write or
 * zero covers them again. A write or zero acknowledged with FUA after that flush is promised
 * too, where no other op sent after the flush overlaps it.
 *
 * Throws if an op failed before the last completed flush (the server was still alive then).
 */
export function crashModel(initial: Uint8Array, w: Workload, logText: string): CrashModel {
  const log = parseLog(logText);
  const batchOf = new Map<number, number>();
  w.batches.forEach((b, bi) => b.forEach((oi) => batchOf.set(oi, bi)));
  let lastFlush = -1;
  for (let i = 0; i < w.ops.length; i++) {
    if (w.ops[i]!.kind === "flush" && log.acked.has(i)) lastFlush = i;
  }
  const flushBatch = lastFlush < 0 ? 0 : batchOf.get(lastFlush)!;
  const expected = initial.slice();
  const unknown = new Uint8Array(initial.length);
  let durable = 0;
  for (let bi = 0; bi < flushBatch; bi++) {
    for (const oi of w.batches[bi]!) {
      const op = w.ops[oi]!;
      if (!log.acked.has(oi)) {
        throw new Error(
          `${describeOp(w, oi)} in batch ${bi} did not succeed (errno ${
            log.failed.get(oi)
          }) although a later flush (op ${lastFlush}) completed`,
        );
      }
      durable++;
      if (op.kind === "write") {
        expected.set(opData(w, oi), op.off);
        unknown.fill(0, op.off, op.off + op.len);
      } else if (op.kind === "zero") {
        expected.fill(0, op.off, op.off + op.len);
        unknown.fill(0, op.off, op.off + op.len);
      } else if (op.kind === "trim") {
        unknown.fill(1, op.off, op.off + op.len);
      }
    }
  }
  let issued = 0;
  const pending: number[] = [];
  for (const bi of log.started) {
    for (const oi of w.batches[bi] ?? []) {
      issued++;
      if (bi < flushBatch) continue;
      const op = w.ops[oi]!;
      if (op.kind === "flush") continue;
      unknown.fill(1, op.off, op.off + op.len);
      pending.push(oi);
    }
  }
  // A write or zero acknowledged with FUA is durable on its own. Its bytes are promised unless
  // another op sent after the flush touched them too (its order against that op is unknown).
  let fua = 0;
  for (const oi of pending) {
    const op = w.ops[oi]!;
    if (!op.fua || !log.acked.has(oi) || (op.kind !== "write" && op.kind !== "zero")) continue;
    const alone = pending.every((other) => {
      const o = w.ops[other]!;
      return other === oi || o.off >= op.off + op.len || o.off + o.len <= op.off;
    });
    if (!alone) continue;
    fua++;
    if (op.kind === "write") expected.set(opData(w, oi), op.off);
    else expected.fill(0, op.off, op.off + op.len);
    unknown.fill(0, op.off, op.off + op.len);
  }
  return { expected, unknown, lastFlush, durable, fua, issued };
}

/**
 * Compares an image's content with the model; returns a description of the first mismatches, or
 * undefined when every promised byte matches.
 */
export function compareWithModel(
  m: CrashModel,
  actual: Uint8Array,
  w: Workload,
): string | undefined {
  if (actual.length !== m.expected.length) {
    return `image reads ${actual.length} bytes, expected ${m.expected.length}`;
  }
  const bad: string[] = [];
  let count = 0;
  for (let i = 0; i < actual.length; i++) {
    if (m.unknown[i] === 0 && actual[i] !== m.expected[i]) {
      count++;
      if (bad.length < 8) {
        bad.push(
          `  byte ${i}: got 0x${actual[i]!.toString(16)}, expected 0x${
            m.expected[i]!.toString(16)
          } (${opsAt(w, i)})`,
        );
      }
    }
  }
  return count === 0 ? undefined : `${count} promised bytes differ:\n${bad.join("\n")}`;
}

/** The last few ops of the workload that touch `byte`, described (for failure messages). */
function opsAt(w: Workload, byte: number): string {
  const hits = w.ops.flatMap((op, i) =>
    op.kind !== "flush" && byte >= op.off && byte < op.off + op.len ? [describeOp(w, i)] : []
  );
  return hits.length === 0 ? "no op touched it" : `ops there: ${hits.slice(-3).join("; ")}`;
}
