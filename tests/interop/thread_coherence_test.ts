/**
 * Multi-connection coherence across data-plane threads: six libnbd connections to one export
 * that advertises CAN_MULTI_CONN (`-e 0`), commands in flight on all of them at once
 * (tests/interop/_coherence.py). A write on connection A, a FLUSH on B and a read on C must
 * agree; for qcow2 the connections also race to allocate neighbouring fresh clusters and pieces
 * of one cluster. Afterwards the image file must equal the script's model (`qemu-img compare`)
 * and a qcow2 image must pass `qemu-img check`.
 *
 * denbd runs with DENBD_THREADS=4 so that raw connections really spread over threads (the
 * default on 2 cores is one data-plane thread); qemu-nbd ignores the variable.
 */

import assert from "node:assert/strict";
import { makeSparseImage, MiB, run, runOk, runPython, Server, withTempDir } from "./_harness.ts";

const SCRIPT = decodeURIComponent(new URL("./_coherence.py", import.meta.url).pathname);

interface Summary {
  multiConn: boolean[];
  size: number;
  rounds: number;
  raceRounds: number;
  writes: number;
  reads: number;
  flushes: number;
  zeroes: number;
  maxInFlight: number;
  mismatches: unknown[];
}

const CONNS = 6;
const SIZE = 32 * MiB;
const CLUSTER = 64 * 1024;

async function coherence(format: "raw" | "qcow2", seed: number): Promise<void> {
  await withTempDir(async (dir) => {
    const raw = `${dir}/base.img`;
    await makeSparseImage(raw, SIZE, [
      { offset: 0, length: MiB, fill: "random", seed: 3 },
      { offset: 5 * MiB + 123, length: 300_000, fill: 0x6b },
      { offset: 12 * MiB, length: 2 * MiB, fill: "random", seed: 9 },
    ]);
    let image = raw;
    if (format === "qcow2") {
      image = `${dir}/disk.qcow2`;
      await runOk(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image]);
    }
    const model = `${dir}/model.raw`;
    const server = await Server.start({
      dir,
      image,
      args: ["-f", format, "-t", "-e", "0"],
      env: { DENBD_THREADS: "4" },
    });
    let summary: Summary;
    try {
      summary = await runPython<Summary>(
        await Deno.readTextFile(SCRIPT),
        [
          server.uri,
          model,
          JSON.stringify({
            conns: CONNS,
            seed,
            rounds: 120,
            raceRounds: 60,
            seconds: 12,
            cluster: CLUSTER,
            // The first 16 MiB take the coherence rounds; the rest stays fresh for the races.
            raceFrom: 16 * MiB,
          }),
        ],
        { timeoutMs: 90_000 },
      );
    } finally {
      await server.stop();
    }
    console.log(
      `${server.kind} ${format}: ${JSON.stringify({ ...summary, mismatches: undefined })}`,
    );
    assert.deepEqual(summary.mismatches, []);
    assert.deepEqual(summary.multiConn, new Array(CONNS).fill(true));
    assert.equal(summary.size, SIZE);
    // The bounds are generous, but a run that did (almost) nothing proves nothing.
    assert.ok(summary.rounds >= 20, `only ${summary.rounds} coherence rounds`);
    assert.ok(summary.raceRounds >= 10, `only ${summary.raceRounds} race rounds`);
    assert.ok(summary.maxInFlight >= CONNS, `at most ${summary.maxInFlight} commands in flight`);

    const cmp = await run(["qemu-img", "compare", "-f", "raw", "-F", format, model, image]);
    assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
    if (format === "qcow2") {
      const check = await run(["qemu-img", "check", "-f", "qcow2", image]);
      assert.equal(check.code, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
      assert.match(check.stdout, /No errors were found on the image/);
    }
  });
}

Deno.test("thread coherence: raw, 6 connections, write on A / flush on B / read on C", () =>
  coherence("raw", 11));

Deno.test("thread coherence: qcow2, 6 connections, coherence rounds and cluster allocation races", () =>
  coherence("qcow2", 12));
