/**
 * Side-by-side helpers for differential tests: start denbd and qemu-nbd with the same arguments
 * and compare what clients see (`nbdinfo --json` flags and sizes, `nbdinfo --map`, the data, and
 * what the servers printed).
 */

import assert from "node:assert/strict";
import { type Extent, makeSparseImage, run, runOk, Server, type ServerKind } from "./_harness.ts";

/** What a client sees of an export, minus what names the socket. */
export async function describeExport(uri: string): Promise<Record<string, unknown>> {
  const info = JSON.parse((await runOk(["nbdinfo", "--json", uri])).stdout);
  const exp = info.exports[0];
  delete exp["uri"];
  delete exp["export-name"];
  const map = (await runOk(["nbdinfo", "--map", uri])).stdout;
  return { ...exp, protocol: info.protocol, map };
}

/**
 * What a server printed, its name normalised. The harness's readiness probe hangs up before
 * negotiating; the line that makes servers print (its wording races between EOF and reset) is
 * the trace tests' business, so it is left out.
 */
export function serverMessages(s: Server): string {
  return s.stderr.replaceAll("denbd", "qemu-nbd").replace(
    /^qemu-nbd: option negotiation failed: .*\n/gm,
    "",
  );
}

/**
 * Starts qemu-nbd and denbd with `-t` and `args(kind)`, and asserts that clients see the same
 * export, the same data (`qemu-img compare` of the two) and the same messages. Returns denbd's view.
 */
export async function compareServers(
  dir: string,
  args: (kind: ServerKind) => string[],
): Promise<Record<string, unknown>> {
  const servers: Server[] = [];
  try {
    for (const kind of ["qemu-nbd", "denbd"] as const) {
      servers.push(await Server.start({ dir, kind, args: ["-t", ...args(kind)] }));
    }
    const [ref, got] = servers as [Server, Server];
    const [want, have] = [await describeExport(ref.uri), await describeExport(got.uri)];
    assert.deepEqual(have, want);
    const cmp = await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", ref.uri, got.uri]);
    assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
    assert.equal(serverMessages(got), serverMessages(ref));
    return have;
  } finally {
    for (const s of servers) await s.stop();
  }
}

/** A sparse raw image `disk.img` in `dir` with `extents` written, and its qcow2 copy `disk.qcow2`. */
export async function makeRawAndQcow2(
  dir: string,
  size: number,
  extents: readonly Extent[],
): Promise<{ raw: string; qcow2: string }> {
  const raw = `${dir}/disk.img`;
  await makeSparseImage(raw, size, extents);
  const qcow2 = `${dir}/disk.qcow2`;
  await runOk(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2]);
  return { raw, qcow2 };
}
