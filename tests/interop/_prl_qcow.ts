/**
 * Helpers shared by the parallels and qcow differential tests: side-by-side serving of copies
 * of one image on denbd and qemu-nbd, the views compared between them, qemu-io write scripts,
 * field patching of damaged images, open failures compared with qemu-nbd, and a kill -9 loop.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  MiB,
  run,
  runOk,
  type Server,
  SERVER_KIND,
  serverArgv,
  sha256File,
  sleep,
  withServer,
  withServers,
} from "./_harness.ts";

export async function qimg(...args: string[]): Promise<void> {
  await runOk(["qemu-img", ...args]);
}

export async function qio(
  target: string,
  cmds: readonly string[],
  fmt: string,
  readOnly = false,
): Promise<void> {
  const ro = readOnly ? ["-r"] : [];
  await runOk(["qemu-io", ...ro, "-f", fmt, ...cmds.flatMap((c) => ["-c", c]), target]);
}

export async function nbdinfo(...args: string[]): Promise<string> {
  return (await runOk(["nbdinfo", ...args])).stdout;
}

export async function virtualSize(img: string): Promise<number> {
  return Number(
    (await runOk(["qemu-img", "info", "--output=json", img])).stdout
      .match(/"virtual-size": *(\d+)/)![1],
  );
}

/** Serves a private copy of `img` on denbd and on qemu-nbd with `args`, then runs `fn`. */
export async function sideBySide(
  dir: string,
  img: string,
  args: (copy: string) => { args: string[]; image?: string },
  fn: (denbd: Server, qemu: Server, copies: [string, string]) => Promise<void>,
): Promise<[string, string]> {
  const copies: [string, string] = [`${img}.denbd`, `${img}.qemu`];
  for (const c of copies) await Deno.copyFile(img, c);
  const [a, b] = copies.map(args);
  await withServers([
    { dir, kind: SERVER_KIND, ...a! },
    { dir, kind: "qemu-nbd", ...b! },
  ], async ([d, q]) => await fn(d!, q!, copies));
  return copies;
}

/** nbdinfo's description of an export without the line naming its socket. */
async function info(uri: string): Promise<string> {
  return (await nbdinfo(uri)).split("\n").filter((l) => !l.includes("uri:")).join("\n");
}

/**
 * Everything a client sees of an export, compared between the two servers: the bytes (with
 * each other and, when given, with `src`), size, flags and block sizes, the base:allocation
 * map and, when `depth`, the qemu:allocation-depth map (the servers run with -A).
 */
export async function compareViews(
  d: Server,
  q: Server,
  opts: { src?: string; depth?: boolean; what: string },
): Promise<void> {
  await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, q.uri]);
  if (opts.src !== undefined) {
    await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", opts.src, d.uri]);
  }
  assert.equal(await nbdinfo("--size", d.uri), await nbdinfo("--size", q.uri));
  assert.equal(await info(d.uri), await info(q.uri), `nbdinfo of ${opts.what}`);
  assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri), `map of ${opts.what}`);
  if (opts.depth) {
    const dm = await nbdinfo("--map=qemu:allocation-depth", d.uri);
    assert.equal(dm, await nbdinfo("--map=qemu:allocation-depth", q.uri), `depth of ${opts.what}`);
    assert.notEqual(dm, "");
  }
}

/** A small seeded generator (xorshift32) for the write scripts. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

/** qemu-io writes: cluster boundaries, the last cluster, zero writes, then random ones. */
export function writeScript(size: number, cluster: number, seed: number): string[] {
  const r = rng(seed);
  const cmds = [
    `write -P 0x91 ${Math.max(0, cluster - 2048)} 4096`, // across a cluster boundary
    `write -P 0x92 ${size - 1000} 777`,
    `write -P 0x93 ${2 * cluster + 4096} 8192`,
    `write -z ${Math.floor(size / 2) + 512} 65536`,
    `write -P 0x94 ${Math.floor(cluster / 2)} ${Math.min(3 * cluster, size - cluster)}`,
  ];
  for (let i = 0; i < 10; i++) {
    const len = 1 + Math.floor(r() * Math.min(200_000, size / 4));
    const off = Math.floor(r() * (size - len));
    const pat = 1 + Math.floor(r() * 254);
    cmds.push(r() < 0.15 ? `write -z ${off} ${len}` : `write -P ${pat} ${off} ${len}`);
  }
  return cmds;
}

/**
 * The same writes three ways: through denbd, through qemu-nbd (both with `args`), and with
 * qemu-io straight into a copy. While the servers run their maps must match; afterwards the
 * three files read the same and denbd's is byte-identical to qemu-nbd's. Returns denbd's copy.
 */
export async function writeThreeWays(
  dir: string,
  img: string,
  fmt: string,
  args: string[],
  cmds: readonly string[],
): Promise<string> {
  const direct = `${img}.direct`;
  await Deno.copyFile(img, direct);
  const [viaDenbd, viaQemu] = await sideBySide(
    dir,
    img,
    (c) => ({ args, image: c }),
    async (d, q) => {
      await Promise.all([qio(d.uri, cmds, "raw"), qio(q.uri, cmds, "raw")]);
      assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri), `map of ${img}`);
      await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, q.uri]);
    },
  );
  await qio(direct, cmds, fmt);
  await runOk(["qemu-img", "compare", "-f", fmt, "-F", fmt, viaDenbd, direct]);
  await runOk(["qemu-img", "compare", "-f", fmt, "-F", fmt, viaDenbd, viaQemu]);
  assert.equal(await sha256File(viaDenbd), await sha256File(viaQemu), `bytes of ${img}`);
  return viaDenbd;
}

/** A field to patch: little- or big-endian, 32 or 64 bits, or raw bytes. */
export interface Patch {
  readonly at: number;
  readonly u32?: number;
  readonly u64?: bigint;
  readonly u8?: number;
  readonly bytes?: Uint8Array;
}

export async function patched(
  img: string,
  out: string,
  patches: readonly Patch[],
  littleEndian: boolean,
): Promise<void> {
  const file = await Deno.readFile(img);
  const end = Math.max(file.length, ...patches.map((p) => p.at + (p.bytes?.length ?? 8)));
  const b = new Uint8Array(end);
  b.set(file);
  const v = new DataView(b.buffer);
  for (const p of patches) {
    if (p.u32 !== undefined) v.setUint32(p.at, p.u32, littleEndian);
    if (p.u64 !== undefined) v.setBigUint64(p.at, p.u64, littleEndian);
    if (p.u8 !== undefined) v.setUint8(p.at, p.u8);
    if (p.bytes !== undefined) b.set(p.bytes, p.at);
  }
  await Deno.writeFile(out, b);
}

/** stderr without the program name. */
export function message(s: string): string {
  return s.trim().split("\n").map((l) => l.replace(/^(denbd|qemu-nbd): /, "")).join("\n");
}

/**
 * Opening `bad` with `args` must fail on denbd naming the file and matching `msg`; with
 * `qemuSame`, qemu-nbd must fail with the very same message.
 */
export async function refusedLikeQemu(
  dir: string,
  bad: string,
  args: readonly string[],
  msg: RegExp,
  qemuSame: boolean,
  what: string,
): Promise<void> {
  const sock = `${dir}/bad.sock`;
  const res = await run([...serverArgv("denbd"), "-k", sock, ...args, bad], { timeoutMs: 15_000 });
  assert.equal(res.code, 1, `${what}: ${res.stderr}`);
  // With --image-opts denbd names the file where qemu names the whole option string.
  const file = args.includes("--image-opts") ? bad.replace(/^.*file\.filename=/, "") : bad;
  assert.ok(res.stderr.includes(`Failed to blk_new_open '${file}': `), `${what}: ${res.stderr}`);
  assert.match(res.stderr, msg, what);
  if (qemuSame) {
    const q = await run(["qemu-nbd", "-k", sock, ...args, bad], { timeoutMs: 15_000 });
    assert.equal(q.code, 1, `${what}: qemu-nbd ${q.stderr}`);
    const after = (s: string) => message(s).replace(/^Failed to blk_new_open '[^']*': /, "");
    assert.equal(after(res.stderr), after(q.stderr), what);
  }
}

/**
 * kill -9 loop: each iteration serves `img` read-write on denbd, writes 4 KiB patterns into the
 * lower half and flushes (qemu-io exits), then starts more writes into the upper half and kills
 * the server at a random moment. `after(img)` runs after each kill (a check, a repair). Then
 * the guest view is read whole: every flushed write reads back exactly, every write of the
 * killed batch as all new or all what the slot held before, and nothing else changed.
 */
export async function crashLoop(
  dir: string,
  img: string,
  fmt: string,
  iterations: number,
  after: (img: string, iteration: number) => Promise<void>,
): Promise<void> {
  const size = await virtualSize(img);
  const slots = Math.floor(size / 4096);
  const half = Math.floor(slots / 2);
  const model = new Uint8Array(slots); // the pattern byte each 4 KiB slot holds (0: zeroes)
  const r = rng(77);
  const raw = `${img}.view.raw`;
  let interrupted = 0;
  await qimg("convert", "-f", fmt, "-O", "raw", img, raw);
  const start = await Deno.readFile(raw);
  for (let i = 0; i < slots; i++) {
    assert.ok(start.subarray(i * 4096, (i + 1) * 4096).every((x) => x === 0), "fresh image");
  }
  for (let it = 0; it < iterations; it++) {
    const phase1: [number, number][] = [];
    const phase2: [number, number][] = [];
    for (let i = 0; i < 8; i++) phase1.push([1 + it * 8 + i, Math.floor(r() * half)]);
    for (let i = 0; i < 2000; i++) {
      phase2.push([0x80 + it * 8 + i % 8, half + Math.floor(r() * (slots - half))]);
    }
    await withServer({ dir, kind: "denbd", image: img, args: ["-f", fmt, "-t"] }, async (s) => {
      const w1 = phase1.map(([p, slot]) => `write -P ${p} ${slot * 4096} 4096`);
      await qio(s.uri, [...w1, "flush"], "raw");
      const writer = run([
        "qemu-io",
        "-f",
        "raw",
        ...phase2.flatMap(([p, slot]) => ["-c", `write -P ${p} ${slot * 4096} 4096`]),
        s.uri,
      ], { timeoutMs: 20_000 });
      await sleep(30 + Math.floor(r() * 300));
      Deno.kill(s.pid, "SIGKILL");
      await writer;
    });
    await after(img, it);
    for (const [p, slot] of phase1) model[slot] = p;
    await qimg("convert", "-f", fmt, "-O", "raw", img, raw);
    const view = await Deno.readFile(raw);
    const allowed = new Map<number, Set<number>>();
    for (const [p, slot] of phase2) {
      const set = allowed.get(slot) ?? new Set([model[slot]!]);
      set.add(p);
      allowed.set(slot, set);
    }
    for (let i = 0; i < slots; i++) {
      const b = view.subarray(i * 4096, (i + 1) * 4096);
      const ok = allowed.get(i) ?? new Set([model[i]!]);
      const v = b[0]!;
      assert.ok(b.every((x) => x === v), `iteration ${it}: slot ${i} is torn`);
      assert.ok(ok.has(v), `iteration ${it}: slot ${i} holds 0x${v.toString(16)}`);
      model[i] = v;
    }
    const landed = phase2.filter(([p, slot]) => view[slot * 4096] === p).length;
    if (Deno.env.get("DENBD_CRASH_VERBOSE")) {
      console.log(`iteration ${it}: ${landed} landed of ${phase2.length}`);
    }
    const [lastP, lastSlot] = phase2[phase2.length - 1]!;
    if (view[lastSlot * 4096] !== lastP) interrupted++;
  }
  // Otherwise every kill came after the batch and the loop tested nothing of a crash.
  assert.ok(interrupted > 0, "no kill landed before the end of its batch");
  await Deno.remove(raw);
}

export { MiB };
