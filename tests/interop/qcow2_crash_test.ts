/**
 * Crash tests for qcow2 writes: a random workload with interleaved FLUSHes runs against the server
 * under test over three connections, and the server is killed with SIGKILL at a random moment.
 * Then:
 *
 * - `qemu-img check` must find no corruption (exit 0, or 3 for leaked clusters, as qemu-nbd leaves
 *   them after a kill), and
 * - every byte the workload wrote or zeroed before the last completed FLUSH must read back (the
 *   model in `crashModel`; bytes of ops sent after that flush, or trimmed, are not promised), and
 * - the crashed image must stay usable: one run per configuration reopens it, applies a second
 *   workload, stops cleanly and compares with qemu-io doing the same to a copy.
 *
 * The seed is random per run and printed on failure (`DENBD_WORKLOAD_SEED=N` replays it; the kill
 * moment follows the workload's progress, so a replay is close but not exact). `DENBD_SOAK=1` runs
 * many more kills.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  baseSeed,
  checkImage,
  compareWithModel,
  crashModel,
  type DriverResult,
  generateWorkload,
  mixSeed,
  qimg,
  qio,
  readGuest,
  replayWithQemuIo,
  Rng,
  runDriver,
  SOAK,
  WRITE_ARGS,
  writeWorkloadFiles,
} from "./_qcow2_write_helpers.ts";
import { MiB, run, Server, SERVER_KIND, sleep, withTempDir } from "./_harness.ts";

const KiB = 1024;

interface CrashConfig {
  readonly name: string;
  readonly size: number;
  readonly clusterSize: number;
  readonly subcluster?: number;
  readonly hot: readonly (readonly [number, number])[];
  /** Builds `img.qcow2` in `dir`. */
  build(dir: string): Promise<void>;
}

const CONFIGS: readonly CrashConfig[] = [
  {
    name: "4 KiB clusters",
    size: 16 * MiB,
    clusterSize: 4 * KiB,
    hot: [[0, MiB], [4 * MiB, 256 * KiB]],
    async build(dir) {
      const img = `${dir}/img.qcow2`;
      await qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "16M");
      await qio(img, ["write -P 0x11 0 1M", "write -z 4M 256k", "write -P 0x12 4160k 8k"]);
    },
  },
  {
    name: "extended L2 over a qcow2 backing file",
    size: 16 * MiB,
    clusterSize: 64 * KiB,
    subcluster: 2 * KiB,
    hot: [[0, 2 * MiB], [8 * MiB, 256 * KiB]],
    async build(dir) {
      await qimg("create", "-q", "-f", "qcow2", `${dir}/base.qcow2`, "16M");
      await qio(`${dir}/base.qcow2`, ["write -P 0x21 0 2M", "write -P 0x22 8M 256k"]);
      await qimg(
        "create",
        ..."-q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2".split(" "),
        `${dir}/img.qcow2`,
      );
      await qio(`${dir}/img.qcow2`, ["write -P 0x23 4k 6k", "write -z 1M 64k"]);
    },
  },
];

const RUNS = SOAK ? 40 : 6;
const OPS_PER_RUN = 2000;
const SEED = baseSeed();
/** `DENBD_WORKLOAD_VERBOSE=1` prints one line per kill. */
const VERBOSE = Deno.env.get("DENBD_WORKLOAD_VERBOSE") === "1";

for (const cfg of CONFIGS) {
  Deno.test(`qcow2 crash: kill -9 during writes, ${cfg.name}`, async () => {
    await withTempDir(async (dir) => {
      await cfg.build(dir);
      const initial = await readGuest(`${dir}/img.qcow2`, `${dir}/initial.raw`);
      let withFlush = 0;
      let checkedBytes = 0;
      for (let r = 0; r < RUNS; r++) {
        const seed = mixSeed(SEED, `${cfg.name} run ${r}`);
        try {
          const res = await crashRun(cfg, dir, r, seed, initial);
          if (res.lastFlush >= 0 && res.durable > 0) withFlush++;
          checkedBytes += res.checked;
          if (r === RUNS - 1) await reuseCrashed(cfg, dir, r, seed);
        } catch (e) {
          throw new Error(
            `${cfg.name}, run ${r}: DENBD_WORKLOAD_SEED=${SEED} (workload seed ${seed}): ${
              (e as Error).message
            }`,
            { cause: e },
          );
        }
      }
      // Without a completed flush a run proves only consistency; make sure some proved more.
      assert.ok(withFlush > 0, `no run had a completed flush before the kill (seed ${SEED})`);
      assert.ok(checkedBytes > 0);
    });
  });
}

interface CrashRunResult {
  readonly lastFlush: number;
  readonly durable: number;
  readonly checked: number;
}

async function crashRun(
  cfg: CrashConfig,
  dir: string,
  r: number,
  seed: number,
  initial: Uint8Array,
): Promise<CrashRunResult> {
  // Run images stay beside img.qcow2 so a relative backing file name still resolves.
  const img = `${dir}/run${r}.qcow2`;
  const work = `${dir}/run${r}`;
  await Deno.copyFile(`${dir}/img.qcow2`, img);
  const w = generateWorkload(seed, {
    size: cfg.size,
    clusterSize: cfg.clusterSize,
    subcluster: cfg.subcluster,
    ops: OPS_PER_RUN,
    connections: 3,
    maxLen: 16 * cfg.clusterSize,
    hot: cfg.hot,
    avoidQemuZeroRace: SERVER_KIND === "qemu-nbd",
  });
  const wlPath = await writeWorkloadFiles(w, work);
  const logPath = `${work}/log.txt`;
  const rng = new Rng(mixSeed(seed, "kill"));
  // Kill once the driver has started a random batch, plus a few ms so some kills land with
  // requests in flight and some between batches.
  const killAt = rng.range(1, Math.floor(w.batches.length * 0.9));
  const extraMs = rng.int(4);

  const server = await Server.start({ dir, image: img, args: WRITE_ARGS });
  let driver: DriverResult;
  try {
    const running = runDriver(server.uri, wlPath, work, logPath, { deadlineS: 60 });
    let settled = false;
    running.then(() => settled = true, () => settled = true);
    const deadline = Date.now() + 30_000;
    for (let i = 0; i < 100_000 && !settled && Date.now() < deadline; i++) {
      if (await batchesStarted(logPath) >= killAt) break;
      await sleep(2);
    }
    await sleep(extraMs);
    if (!server.running) {
      throw new Error(`${server.kind} exited before the kill: ${server.stderr}`);
    }
    Deno.kill(server.pid, "SIGKILL");
    driver = await running;
  } finally {
    await server.stop();
  }
  assert.equal(
    server.exitStatus?.signal,
    "SIGKILL",
    `the ${server.kind} process outlived the kill`,
  );

  const check = await checkImage(img);
  const corruptions = Number(check.report?.["corruptions"] ?? 0);
  const checkErrors = Number(check.report?.["check-errors"] ?? 0);
  assert.ok(
    (check.code === 0 || check.code === 3) && corruptions === 0 && checkErrors === 0,
    `qemu-img check after kill -9 (exit ${check.code}, ${driver.acked} acks):\n${check.output}`,
  );

  const model = crashModel(initial, w, await Deno.readTextFile(logPath));
  const actual = await readGuest(img, `${work}/after.raw`);
  const diff = compareWithModel(model, actual, w);
  if (diff !== undefined) {
    throw new Error(
      `after kill -9 (last completed flush: op ${model.lastFlush}, ${model.durable} durable ops, ` +
        `${model.issued} ops sent): ${diff}`,
    );
  }
  let checked = 0;
  for (const u of model.unknown) if (u === 0) checked++;
  if (VERBOSE) {
    console.log(
      `run ${r}: killed at batch ${killAt}/${w.batches.length}, ${driver.acked} acks, ` +
        `${driver.errors} failed, last flush op ${model.lastFlush}, ${model.durable} durable ops, ` +
        `${model.fua} FUA ops after it, ` +
        `${checked} bytes checked, qemu-img check exit ${check.code}`,
    );
  }
  return { lastFlush: model.lastFlush, durable: model.durable, checked };
}

/** Number of `B` lines (batches started) in the driver's log so far. */
async function batchesStarted(logPath: string): Promise<number> {
  let text: string;
  try {
    text = await Deno.readTextFile(logPath);
  } catch {
    return 0;
  }
  let n = 0;
  for (let i = text.indexOf("B "); i >= 0; i = text.indexOf("B ", i + 2)) n++;
  return n;
}

/**
 * The crashed image (leaked clusters and all) must take more writes: a second workload through a
 * fresh server, stopped cleanly, must leave it reading the same as qemu-io's replay on a copy, and
 * still free of corruption.
 */
async function reuseCrashed(cfg: CrashConfig, dir: string, r: number, seed: number): Promise<void> {
  const a = `${dir}/run${r}.qcow2`;
  const b = `${dir}/run${r}-qemu-io.qcow2`;
  const work = `${dir}/run${r}-reuse`;
  await Deno.copyFile(a, b);
  const w = generateWorkload(mixSeed(seed, "reuse"), {
    size: cfg.size,
    clusterSize: cfg.clusterSize,
    subcluster: cfg.subcluster,
    ops: 400,
    connections: 3,
    maxLen: 16 * cfg.clusterSize,
    hot: cfg.hot,
    avoidQemuZeroRace: SERVER_KIND === "qemu-nbd",
  });
  const wlPath = await writeWorkloadFiles(w, work);
  const server = await Server.start({ dir, image: a, args: WRITE_ARGS });
  let driver: DriverResult;
  try {
    driver = await runDriver(server.uri, wlPath, work, `${work}/log.txt`);
  } finally {
    await server.stop();
  }
  assert.equal(driver.stopped, null, `reuse after crash: driver stopped: ${driver.stopped}`);
  assert.equal(driver.errors, 0, "reuse after crash: requests failed");
  await replayWithQemuIo(b, w, `${work}/pat`);
  const cmp = await run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a, b], {
    timeoutMs: 60_000,
  });
  assert.equal(cmp.code, 0, `reuse after crash: qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
  const check = await checkImage(a);
  assert.ok(
    check.code === 0 || check.code === 3,
    `reuse after crash: qemu-img check: ${check.output}`,
  );
}
