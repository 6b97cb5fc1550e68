/**
 * Shared helpers for the qcow2 tests: an image opener (qcow2 via the driver, raw via RawDevice)
 * and wrappers around qemu-img / qemu-io / qemu-nbd (the oracles). No tests of its own.
 */

import { RawDevice } from "../../lib/block/raw.ts";
import { type BlockDevice, ExtentList } from "../../lib/block/types.ts";
import { openFileEngine } from "../../lib/io/engine_factory.ts";
import {
  type BackingChain,
  isQcow2,
  openQcow2,
  type Qcow2OpenOptions,
} from "../../lib/block/qcow2/mod.ts";
import type { ImageFormat } from "../../lib/cli/options.ts";

/** Open any image the way the server will: probe, qcow2 through the driver, raw otherwise. */
export async function openImage(
  path: string,
  format?: ImageFormat,
  extra: Partial<Qcow2OpenOptions> = {},
  chain?: BackingChain,
): Promise<BlockDevice> {
  const file = openFileEngine(path, { writable: false });
  let fmt = format;
  if (fmt === undefined) {
    const head = new Uint8Array(4);
    await file.pread(head, 0);
    fmt = isQcow2(head) ? "qcow2" : "raw";
  }
  if (fmt !== "qcow2") {
    if (fmt !== "raw") throw new Error(`openImage: format ${fmt} is not handled here`);
    return new RawDevice(file, { writable: false, offset: 0, size: undefined, minBlock: 1 });
  }
  return await openQcow2(file, {
    openBacking: (p, f, c) => openImage(p, f, {}, c),
    ...extra,
    ...(chain ? { chain } : {}),
  });
}

/** Run a command; throws with its stderr when it fails. */
export async function run(cmd: string, args: string[], cwd?: string): Promise<string> {
  const out = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
  return text;
}

/** qemu-io with its output discarded. */
export async function qemuIo(img: string, cmds: string[], fmt = "qcow2"): Promise<void> {
  await run("qemu-io", ["-f", fmt, ...cmds.flatMap((c) => ["-c", c]), img]);
}

/** Read the whole device in `chunk`-sized pieces (all in flight at once when `parallel`). */
export async function readAll(
  dev: BlockDevice,
  chunk = 256 * 1024,
  parallel = true,
): Promise<Uint8Array> {
  const out = new Uint8Array(dev.size);
  const jobs: Promise<void>[] = [];
  for (let off = 0; off < dev.size; off += chunk) {
    const p = dev.pread(out.subarray(off, Math.min(dev.size, off + chunk)), off);
    if (parallel) jobs.push(p);
    else await p;
  }
  await Promise.all(jobs);
  return out;
}

/** Full-device extents (or depths) as [start, length, flags] triples. */
export async function collect(
  dev: BlockDevice,
  what: "extents" | "depth",
): Promise<Array<[number, number, number]>> {
  const out = new ExtentList(1 << 20);
  if (what === "extents") await dev.extents(0, dev.size, out);
  else await dev.allocationDepth!(0, dev.size, out);
  const res: Array<[number, number, number]> = [];
  let pos = 0;
  for (let i = 0; i < out.pairs.length; i += 2) {
    res.push([pos, out.pairs[i]!, out.pairs[i + 1]!]);
    pos += out.pairs[i]!;
  }
  return res;
}

/** qemu-img convert to raw, returned as bytes (convert args go before the source). */
export async function qemuRaw(
  img: string,
  dir: string,
  convertArgs: string[] = [],
): Promise<Uint8Array> {
  const out = `${dir}/oracle-${crypto.randomUUID()}.raw`;
  await run("qemu-img", ["convert", ...convertArgs, "-O", "raw", img, out]);
  try {
    return await Deno.readFile(out);
  } finally {
    await Deno.remove(out);
  }
}

/** First differing index of two arrays, or -1. */
export function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** Merge neighbouring runs with equal flags (qemu's lists are not always merged). */
export function merge(list: Array<[number, number, number]>): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  for (const [s, l, f] of list) {
    const last = out[out.length - 1];
    if (last && last[2] === f && last[0] + last[1] === s) last[1] += l;
    else out.push([s, l, f]);
  }
  return out;
}

/** Parse `nbdinfo --map` text into [start, length, flags] triples. */
export function parseNbdinfoMap(text: string): Array<[number, number, number]> {
  const res: Array<[number, number, number]> = [];
  for (const line of text.split("\n")) {
    const m = line.trim().match(/^(\d+)\s+(\d+)\s+(\d+)/);
    if (m) res.push([Number(m[1]), Number(m[2]), Number(m[3])]);
  }
  return res;
}

/**
 * The oracle: serve `img` with `qemu-nbd -r -A` (plus `args`) on a unix socket and return
 * `nbdinfo --map` for base:allocation and qemu:allocation-depth.
 */
export async function qemuNbdMaps(
  img: string,
  dir: string,
  args: string[] = [],
): Promise<
  { size: number; base: Array<[number, number, number]>; depth: Array<[number, number, number]> }
> {
  const sock = `${dir}/nbd-${crypto.randomUUID().slice(0, 8)}.sock`;
  const child = new Deno.Command("qemu-nbd", {
    args: ["-k", sock, "-f", "qcow2", "-r", "-A", "-t", ...args, img],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  try {
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        await Deno.stat(sock);
        break;
      } catch {
        if (Date.now() > deadline) throw new Error(`qemu-nbd did not start for ${img}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    const uri = `nbd+unix:///?socket=${sock}`;
    const base = parseNbdinfoMap(await run("nbdinfo", ["--map", uri]));
    const depth = parseNbdinfoMap(await run("nbdinfo", ["--map=qemu:allocation-depth", uri]));
    const size = Number((await run("nbdinfo", ["--size", uri])).trim());
    return { size, base, depth };
  } finally {
    child.kill("SIGTERM");
    await child.status;
    await child.stderr.cancel().catch(() => {});
    await Deno.remove(sock).catch(() => {});
  }
}
