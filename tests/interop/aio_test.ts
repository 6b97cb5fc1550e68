/**
 * --aio: the same qemu-io workload through each engine (io_uring, threads, io_uring under
 * O_DIRECT), checked with read -P and qemu-img compare against the workload replayed locally
 * on a copy; the io_uring fd in /proc shows which engine ran. Then the fallback: with io_uring
 * disabled (DENBD_IO_URING_DISABLE) the default engine is threads, said once through -T, and
 * --aio=io_uring refuses to start.
 */

import assert from "node:assert/strict";
import { Ring } from "../../ffi/io_uring.ts";
import {
  makeSparseImage,
  MiB,
  run,
  runOk,
  SERVER_KIND,
  serverArgv,
  sha256File,
  withServer,
  withTempDir,
} from "./_harness.ts";

const DISABLE_ENV = { DENBD_IO_URING_DISABLE: "1" };
const DENBD_ONLY = SERVER_KIND !== "denbd";

/** Writes (some in flight together through aio_write) and flushes; replayed on the reference. */
const WRITES = [
  "write -P 0x22 1M 64k",
  "write -P 0x44 5 1000", // unaligned: a read-modify-write under O_DIRECT
  "aio_write -P 0x55 3M 512k",
  "aio_write -P 0x56 3584k 512k",
  "aio_write -P 0x57 2047k 2k", // across the 2 MiB boundary
  "aio_write -P 0x58 1500k 7",
  "aio_flush",
  "write -z 64k 64k",
  "write -f -P 0x66 2M 4k", // FUA
  "flush",
];

const READS = [
  "read -P 0x11 0 5",
  "read -P 0x44 5 1000",
  "read -P 0x11 1005 64531",
  "read -P 0 64k 64k",
  "read -P 0x11 128k 896k",
  "read -P 0x22 1M 64k",
  "read -P 0x58 1500k 7",
  "read -P 0x57 2047k 1k", // its second half is under the FUA write
  "read -P 0x66 2M 4k",
  "read -P 0x55 3M 512k",
  "read -P 0x56 3584k 512k",
];

function qemuIo(target: string, cmds: readonly string[]) {
  return run(["qemu-io", "-f", "raw", ...cmds.flatMap((c) => ["-c", c]), target]);
}

/**
 * Whether process `pid` has an io_uring instance open (an fd linked to anon_inode:[io_uring]).
 * Deno reads /proc/PID only with --allow-all, so `ls` looks (the suite runs with the project's
 * permission set).
 */
async function ringCount(pid: number): Promise<number> {
  const r = await run(["ls", "-l", `/proc/${pid}/fd`]);
  // Exit 1 with a listing: a descriptor closed while ls read it (the server is still starting).
  if (r.code !== 0 && !(r.code === 1 && r.stdout.startsWith("total"))) {
    throw new Error(`ls -l /proc/${pid}/fd exited ${r.code}: ${r.stderr}`);
  }
  return r.stdout.split("anon_inode:[io_uring]").length - 1;
}

/**
 * Whether this process can set up a ring: the sysctl may allow io_uring while a seccomp policy
 * (a container's) still refuses io_uring_setup, so try it.
 */
async function probeIoUring(): Promise<boolean> {
  try {
    await new Ring({ entries: 4 }).close();
    return true;
  } catch {
    return false;
  }
}

const RING_OK = await probeIoUring();

/**
 * Rings that are not the file engine's: the readiness loop of the one thread that serves (the
 * tests run with DENBD_THREADS=0) parks its sockets in a ring of its own where io_uring works.
 */
const TRANSPORT_RINGS = RING_OK ? 1 : 0;

async function hasIoUring(pid: number): Promise<boolean> {
  return await ringCount(pid) > TRANSPORT_RINGS;
}

async function makeImages(dir: string): Promise<{ image: string; reference: string }> {
  const image = `${dir}/a.img`;
  await makeSparseImage(image, 4 * MiB, [
    { offset: 0, length: MiB, fill: 0x11 },
    { offset: 2 * MiB + 4096, length: 300_000, fill: "random", seed: 3 },
  ]);
  const reference = `${dir}/ref.img`;
  await Deno.copyFile(image, reference);
  return { image, reference };
}

const CONFIGS: readonly { name: string; args: string[]; ring: boolean }[] = [
  { name: "--aio=io_uring", args: ["--aio=io_uring"], ring: true },
  { name: "--aio=threads", args: ["--aio=threads"], ring: false },
  { name: "--aio=io_uring --cache=none", args: ["--aio=io_uring", "--cache=none"], ring: true },
];

for (const cfg of CONFIGS) {
  Deno.test({
    name: `aio: qemu-io writes, reads and flushes through ${cfg.name}`,
    ignore: cfg.ring && !RING_OK,
    fn: async () => {
      await withTempDir(async (dir) => {
        const { image, reference } = await makeImages(dir);
        const env = { DENBD_THREADS: "0" };
        await withServer(
          { dir, image, env, args: ["-f", "raw", "-t", ...cfg.args] },
          async (server) => {
            if (SERVER_KIND === "denbd") {
              const engineRings = await ringCount(server.pid) - TRANSPORT_RINGS;
              assert.equal(
                engineRings > 0,
                cfg.ring,
                `io_uring fds of the file engine: ${engineRings}`,
              );
            }
            const w = await qemuIo(server.uri, WRITES);
            assert.equal(w.code, 0, w.stdout + w.stderr);
            const r = await qemuIo(server.uri, READS);
            assert.equal(r.code, 0, r.stdout + r.stderr);
            assert.doesNotMatch(r.stdout, /Pattern verification failed/);
            // A wrong pattern must fail, or the checks above prove nothing.
            const bad = await qemuIo(server.uri, ["read -P 0x22 3M 4k"]);
            assert.match(bad.stdout, /Pattern verification failed/);

            await runOk(["qemu-io", "-f", "raw", ...WRITES.flatMap((c) => ["-c", c]), reference]);
            const cmp = await run([
              "qemu-img",
              "compare",
              "-f",
              "raw",
              "-F",
              "raw",
              reference,
              server.uri,
            ]);
            assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
            assert.match(cmp.stdout, /Images are identical/);
          },
        );
        // Everything reached the file, not just the server's view of it.
        assert.equal(await sha256File(image), await sha256File(reference));
      });
    },
  });
}

Deno.test({
  name: "aio: a qcow2 overlay and its raw backing file both read through --aio=io_uring",
  ignore: DENBD_ONLY || !RING_OK,
  fn: async () => {
    await withTempDir(async (dir) => {
      const base = `${dir}/base.img`;
      await makeSparseImage(base, 2 * MiB, [{ offset: MiB, length: MiB, fill: 0x77 }]);
      const top = `${dir}/top.qcow2`;
      await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top]);
      await withServer({
        dir,
        image: top,
        env: { DENBD_THREADS: "0" },
        args: ["-t", "--aio=io_uring"],
      }, async (server) => {
        assert.ok(await hasIoUring(server.pid));
        const w = await run(["qemu-io", "-f", "raw", "-c", "write -P 0x78 1M 4k", server.uri]);
        assert.equal(w.code, 0, w.stdout + w.stderr);
        const r = await qemuIo(server.uri, [
          "read -P 0 0 1M",
          "read -P 0x78 1M 4k",
          "read -P 0x77 1028k 1020k",
        ]);
        assert.equal(r.code, 0, r.stdout + r.stderr);
        assert.doesNotMatch(r.stdout, /Pattern verification failed/);
      });
    });
  },
});

Deno.test({
  name: "aio: without --aio the server uses io_uring where the kernel allows it",
  ignore: DENBD_ONLY || !RING_OK,
  fn: async () => {
    await withTempDir(async (dir) => {
      const { image } = await makeImages(dir);
      await withServer(
        { dir, image, env: { DENBD_THREADS: "0" }, args: ["-f", "raw", "-t", "-v"] },
        async (server) => {
          assert.ok(await hasIoUring(server.pid));
          const r = await qemuIo(server.uri, ["read -P 0x11 0 1M"]);
          assert.equal(r.code, 0, r.stdout + r.stderr);
          assert.doesNotMatch(server.stderr, /io_uring/);
        },
      );
    });
  },
});

Deno.test({
  name:
    "aio: io_uring disabled: the default falls back to threads, said once through -T only (not -v)",
  ignore: DENBD_ONLY,
  fn: async () => {
    await withTempDir(async (dir) => {
      const { image } = await makeImages(dir);
      // A qcow2 overlay over the raw image: two files opened, still one message.
      const top = `${dir}/top.qcow2`;
      await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "raw", top]);
      // qemu-nbd -v prints nothing in server mode (QEMU's iotests compare it byte for byte).
      for (const extra of [["-v"], [], ["-T", "denbd_engine_fallback"]]) {
        const traced = extra[0] === "-T";
        await withServer(
          { dir, image: top, args: ["-t", ...extra], env: DISABLE_ENV },
          async (server) => {
            assert.equal(await hasIoUring(server.pid), false);
            const r = await qemuIo(server.uri, ["write -P 0x12 0 4k", "read -P 0x11 4k 60k"]);
            assert.equal(r.code, 0, r.stdout + r.stderr);
            const said = server.stderr.match(/io_uring is not available/g) ?? [];
            assert.equal(said.length, traced ? 1 : 0, server.stderr);
            if (traced) {
              assert.match(
                server.stderr,
                /io_uring is not available \(io_uring_setup: Operation not permitted \(disabled by DENBD_IO_URING_DISABLE\)\); using the thread engine/,
              );
            }
          },
        );
      }
    });
  },
});

Deno.test({
  name: "aio: --aio=io_uring refuses to start when io_uring cannot be set up",
  ignore: DENBD_ONLY,
  fn: async () => {
    await withTempDir(async (dir) => {
      const { image } = await makeImages(dir);
      const r = await run(
        [...serverArgv("denbd"), "-f", "raw", "-k", `${dir}/s.sock`, "--aio=io_uring", image],
        { env: DISABLE_ENV, timeoutMs: 15_000 },
      );
      assert.equal(r.code, 1, r.stderr);
      assert.match(
        r.stderr,
        /^denbd: Failed to blk_new_open '.*a\.img': Could not use --aio=io_uring for '.*a\.img': io_uring_setup: Operation not permitted \(disabled by DENBD_IO_URING_DISABLE\)\n$/,
      );
    });
  },
});
