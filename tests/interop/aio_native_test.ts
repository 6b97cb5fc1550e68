/**
 * --aio=native (Linux AIO) against real qemu-nbd 7.2 with the same options:
 * - the refusal without cache.direct=on (every --cache mode but none and directsync, raw and
 *   qcow2, -r, -s, --image-opts), and the open errors that come before it: same stdout, stderr
 *   and exit code;
 * - the data: the same image served by both with `--aio=native --cache=none` (and directsync),
 *   the same qemu-io writes (aligned, unaligned, in flight together, zero, FUA) and nbdcopy
 *   copies in and out, then the same qemu-io hexdumps, nbdinfo views, copies and image files,
 *   byte for byte. Both processes must show a Linux AIO ring (`/[aio]` in /proc/PID/maps).
 */

import assert from "node:assert/strict";
import { O_DIRECT, O_RDONLY } from "../../ffi/libc.ts";
import { describeExport, serverMessages } from "./_differential.ts";
import {
  makeSparseImage,
  MiB,
  patternBytes,
  run,
  runOk,
  Server,
  SERVER_KIND,
  serverArgv,
  sha256File,
} from "./_harness.ts";

/**
 * A temp dir on a filesystem that takes O_DIRECT (a tmpfs /tmp does not), removed afterwards.
 */
async function withDirectDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  let dir: string | undefined;
  for (const base of [undefined, "/var/tmp"]) {
    const d = await Deno.makeTempDir({ prefix: "denbd-aio-native-", dir: base });
    const probe = `${d}/probe`;
    await Deno.writeFile(probe, new Uint8Array(4096));
    const ok = await openDirect(probe);
    await Deno.remove(probe);
    if (ok) {
      dir = d;
      break;
    }
    await Deno.remove(d, { recursive: true });
  }
  if (dir === undefined) throw new Error("No temp directory here takes O_DIRECT");
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function openDirect(path: string): Promise<boolean> {
  const { libc } = await import("../../ffi/libc.ts");
  const fd = libc().open(new TextEncoder().encode(`${path}\0`), O_RDONLY | O_DIRECT, 0);
  if (fd < 0) return false;
  libc().close(fd);
  return true;
}

/** The server's name in its messages, normalised. */
function normalise(s: string): string {
  return s.replaceAll("denbd", "qemu-nbd");
}

/** Whether process `pid` has a Linux AIO ring mapped (Deno reads /proc/PID only with -A). */
async function hasAioRing(pid: number): Promise<boolean> {
  const maps = await runOk(["cat", `/proc/${pid}/maps`]);
  return /\/\[aio\]/.test(maps.stdout);
}

/** qemu-io's output without its timing lines. */
function qemuIoOutput(r: { stdout: string; stderr: string }): string {
  return (r.stdout + r.stderr).split("\n").filter((l) => !/ ops; /.test(l)).join("\n");
}

function qemuIo(uri: string, cmds: readonly string[]) {
  return run(["qemu-io", "-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri], {
    timeoutMs: 60_000,
  });
}

// Size not a multiple of 4096: the last block is partial, read through the bounce buffer.
const SIZE = 8 * MiB + 1536;

async function makeImage(path: string): Promise<void> {
  await makeSparseImage(path, SIZE, [
    { offset: 0, length: MiB, fill: 0x11 },
    { offset: 3 * MiB + 4096, length: 700_001, fill: "random", seed: 5 },
    { offset: SIZE - 6000, length: 6000, fill: "random", seed: 9 },
  ]);
}

const WRITES = [
  "write -P 0x22 1M 64k",
  "write -P 0x44 5 1000", // unaligned: a read-modify-write under O_DIRECT
  "aio_write -P 0x55 2M 512k",
  "aio_write -P 0x56 2560k 512k",
  "aio_write -P 0x57 2039k 2k", // unaligned end, next to the 0x55 run
  "aio_write -P 0x58 1500k 7",
  "aio_write -P 0x59 6M 1M", // into a hole: blocks are allocated
  "aio_flush",
  "write -z 64k 64k",
  "write -f -P 0x66 4M 4k", // FUA
  "write -P 0x77 8191k 1024", // up to 512 bytes before the end
  "flush",
];

/** Hexdumps of ranges around everything written (and the partial last block). */
const READS = [
  "read -v 0 4096",
  "read -v 60k 8k",
  "read -v 1020k 8k",
  "read -v 1500k 4k",
  "read -v 2036k 16k",
  "read -v 3076k 4k",
  "read -v 4M 4k",
  `read -v ${SIZE - 7000} 7000`,
  "read -P 0x22 1M 64k",
  "read -P 0x55 2M 512k",
  "read -P 0x56 2560k 512k",
  "read -P 0x59 6M 1M",
];

/** Real qemu-nbd and the server under test, each on its own copy of the image. */
async function withPair(
  dir: string,
  args: readonly string[],
  fn: (pair: { ref: Server; got: Server; refImage: string; gotImage: string }) => Promise<void>,
): Promise<void> {
  const refImage = `${dir}/ref.img`;
  const gotImage = `${dir}/got.img`;
  // Each made anew: a copy would not keep the holes.
  await makeImage(refImage);
  await makeImage(gotImage);
  const env = { DENBD_THREADS: "0" };
  const ref = await Server.start({ dir, kind: "qemu-nbd", image: refImage, args: [...args] });
  try {
    const got = await Server.start({ dir, image: gotImage, env, args: [...args] });
    try {
      await fn({ ref, got, refImage, gotImage });
    } finally {
      await got.stop();
    }
  } finally {
    await ref.stop();
  }
}

for (const cache of ["none", "directsync"]) {
  Deno.test(`aio=native: qemu-io and nbdcopy through --cache=${cache} as through qemu-nbd`, async () => {
    await withDirectDir(async (dir) => {
      const args = ["-f", "raw", "-t", "--aio=native", `--cache=${cache}`];
      await withPair(dir, args, async ({ ref, got, refImage, gotImage }) => {
        assert.ok(await hasAioRing(ref.pid), "qemu-nbd has a Linux AIO ring");
        assert.ok(await hasAioRing(got.pid), `${got.kind} has a Linux AIO ring`);
        assert.deepEqual(await describeExport(got.uri), await describeExport(ref.uri));

        const wRef = await qemuIo(ref.uri, WRITES);
        const wGot = await qemuIo(got.uri, WRITES);
        assert.equal(wRef.code, 0, wRef.stdout + wRef.stderr);
        assert.equal(wGot.code, wRef.code);
        // aio_write completions are reported in the order they finish, on either server.
        const sorted = (t: string) => t.split("\n").sort().join("\n");
        assert.equal(sorted(qemuIoOutput(wGot)), sorted(qemuIoOutput(wRef)));

        const rRef = await qemuIo(ref.uri, READS);
        const rGot = await qemuIo(got.uri, READS);
        assert.equal(rRef.code, 0, rRef.stdout + rRef.stderr);
        assert.doesNotMatch(rRef.stdout, /Pattern verification failed/);
        assert.equal(qemuIoOutput(rGot), qemuIoOutput(rRef));
        // The hexdumps show data, or the comparison above proves little.
        assert.match(rRef.stdout, /00000000: {2}11 11 11 11 11 44 44 44/);

        // nbdcopy out of both, many requests in flight: the same bytes.
        const [outRef, outGot] = [`${dir}/out-ref.raw`, `${dir}/out-got.raw`];
        await runOk(["nbdcopy", "--request-size=65536", ref.uri, outRef]);
        await runOk(["nbdcopy", "--request-size=65536", got.uri, outGot]);
        assert.equal((await Deno.stat(outGot)).size, SIZE);
        assert.equal(await sha256File(outGot), await sha256File(outRef));

        // nbdcopy a new image into both, then out again.
        const input = `${dir}/in.raw`;
        const data = patternBytes(SIZE, 77);
        data.fill(0, MiB, 2 * MiB); // a zero run nbdcopy may send as a zero request
        await Deno.writeFile(input, data);
        await runOk(["nbdcopy", "--request-size=32768", input, ref.uri]);
        await runOk(["nbdcopy", "--request-size=32768", input, got.uri]);
        await runOk(["nbdcopy", got.uri, outGot]);
        assert.deepEqual(await Deno.readFile(outGot), data);
        assert.deepEqual(await describeExport(got.uri), await describeExport(ref.uri));
        await ref.stop();
        await got.stop();
        // What reached the files is the same too.
        assert.equal(await sha256File(gotImage), await sha256File(refImage));
        assert.equal(serverMessages(got), serverMessages(ref));
      });
    });
  });
}

/** Option sets whose open fails: each with every --cache mode that lacks cache.direct=on. */
const REFUSED: readonly { name: string; args: (dir: string) => string[]; frame?: false }[] = [
  { name: "raw", args: (d) => ["-f", "raw", `${d}/x.raw`] },
  { name: "probed raw", args: (d) => [`${d}/x.raw`] },
  { name: "qcow2", args: (d) => [`${d}/q.qcow2`] },
  { name: "-r", args: (d) => ["-r", "-f", "raw", `${d}/x.raw`] },
  { name: "-s", args: (d) => ["-s", "-f", "raw", `${d}/x.raw`] },
  // denbd names a plain-file --image-opts image by its path in the blk_new_open frame, where
  // qemu-nbd repeats the option string (for every open error, not just this one): compared
  // after the frame.
  {
    name: "--image-opts",
    args: (d) => ["--image-opts", `driver=raw,file.filename=${d}/x.raw`],
    frame: false,
  },
];

const NOT_DIRECT = [[], ["--cache=writeback"], ["--cache=writethrough"], ["--cache=unsafe"]];

/**
 * Runs `args` on both servers (which must exit: none of them starts) and compares; with
 * `frame` false, stderr after the "Failed to blk_new_open 'FILE': " frame.
 */
async function compareExit(dir: string, args: readonly string[], frame = true): Promise<string> {
  const results = [];
  for (const kind of ["qemu-nbd", SERVER_KIND] as const) {
    const sock = `${dir}/${kind}.sock`;
    const r = await run([...serverArgv(kind), "-k", sock, ...args], { timeoutMs: 15_000 });
    results.push(r);
  }
  const [ref, got] = results as [Awaited<ReturnType<typeof run>>, Awaited<ReturnType<typeof run>>];
  const what = args.join(" ");
  assert.equal(ref.signal, null, `qemu-nbd ${what} did not exit`);
  assert.equal(got.code, ref.code, `${what}: ${got.stderr}`);
  assert.equal(normalise(got.stdout), normalise(ref.stdout), what);
  const unframed = (t: string) => frame ? t : t.replace(/Failed to blk_new_open '[^\n]*?': /, "");
  assert.equal(unframed(normalise(got.stderr)), unframed(normalise(ref.stderr)), what);
  return ref.stderr;
}

Deno.test("aio=native: refused without cache.direct=on, in qemu-nbd's words and exit code", async () => {
  await withDirectDir(async (dir) => {
    await makeSparseImage(`${dir}/x.raw`, MiB, [{ offset: 0, length: 4096, fill: 1 }]);
    await runOk(["qemu-img", "create", "-q", "-f", "qcow2", `${dir}/q.qcow2`, "1M"]);
    for (const set of REFUSED) {
      for (const cache of NOT_DIRECT) {
        const args = ["--aio=native", ...cache, ...set.args(dir)];
        const stderr = await compareExit(dir, args, set.frame);
        assert.match(
          stderr,
          /: aio=native was specified, but it requires cache\.direct=on, which was not specified\.\n$/,
          `${set.name} ${cache.join(" ")}: ${stderr}`,
        );
      }
    }
    // A file that cannot be opened says so first, whatever the cache mode.
    for (const cache of [[], ["--cache=none"]]) {
      const stderr = await compareExit(dir, [
        "--aio=native",
        ...cache,
        "-f",
        "raw",
        `${dir}/missing.raw`,
      ]);
      assert.match(stderr, /Could not open '.*missing\.raw': No such file or directory\n$/);
    }
    // Protocols other than files take no aio option: null-co serves (both servers start).
    for (const kind of ["qemu-nbd", SERVER_KIND] as const) {
      const s = await Server.start({
        dir,
        kind,
        args: ["-f", "raw", "--aio=native", "null-co://"],
      });
      await s.stop();
    }
  });
});
