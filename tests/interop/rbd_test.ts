/**
 * The rbd protocol against qemu-nbd 7.2's rbd driver on a real throwaway Ceph cluster
 * (tests/interop/_ceph.ts: one mon, one memstore OSD). Images are made at test time with `rbd`
 * and scribbled on with qemu-io through qemu's own rbd driver; denbd and qemu-nbd serve the same
 * image (read-only) or twins (writes) side by side.
 *
 * Compared: what nbdinfo reports (size, flags, contexts), `nbdinfo --map`, the bytes
 * (`qemu-img compare` between the two servers, and `rbd export` against what denbd serves),
 * for default images (fast-diff), small objects, no fast-diff, an odd size, a namespace, a
 * snapshot, qcow2 stored in an rbd image, and the rbd:, --image-opts and json: spellings. Writes:
 * one qemu-io workload of writes, zero writes and discards through each server on twin images,
 * exports compared byte for byte and maps compared. Open failures: qemu-nbd's messages. Faults:
 * kill -9 of denbd during flushed writes (everything flushed is in the image), and SIGSTOP /
 * SIGCONT of the OSD under a workload (requests wait, then complete; the server lives on).
 *
 * @module
 */

import assert from "node:assert/strict";
import { type Ceph, cephMissing, startCeph } from "./_ceph.ts";
import {
  MiB,
  PYTHON,
  run,
  runOk,
  type Server,
  SERVER_KIND,
  withServers,
  withTempDir,
} from "./_harness.ts";

const ignore = cephMissing();

async function nbdinfo(...args: string[]): Promise<string> {
  return (await runOk(["nbdinfo", ...args])).stdout;
}

/** nbdinfo's description without the lines naming the socket. */
async function info(s: Server): Promise<string> {
  return (await nbdinfo(s.uri)).split("\n").filter((l) => !/uri:|socket/.test(l)).join("\n");
}

async function qio(c: Ceph, target: string, cmds: readonly string[], fmt = "raw") {
  await runOk(["qemu-io", "-f", fmt, ...cmds.flatMap((x) => ["-c", x]), target], {
    env: { CEPH_CONF: c.conf },
    timeoutMs: 60_000,
  });
}

function rbdName(c: Ceph, spec: string): string {
  return `rbd:${spec}:conf=${c.conf}`;
}

/** The same image served by denbd and by qemu-nbd with the same arguments. */
async function sideBySide(
  dir: string,
  args: string[],
  fn: (d: Server, q: Server) => Promise<void>,
): Promise<void> {
  await withServers([
    { dir, kind: SERVER_KIND, args },
    { dir, kind: "qemu-nbd", args },
  ], async ([d, q]) => await fn(d!, q!));
}

async function compareViews(d: Server, q: Server, what: string): Promise<void> {
  assert.equal(await info(d), await info(q), `nbdinfo of ${what}`);
  assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri), `map of ${what}`);
  await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, q.uri]);
}

/**
 * An image whose size is not a multiple of 512 (1000001 bytes): qemu-nbd drops the connection
 * on block status of the rounded-up tail past librbd's end (its driver asserts there), so only
 * the description and the bytes are compared with it, and denbd's map is checked as expected.
 */
async function oddSizeViews(d: Server, q: Server): Promise<void> {
  // (qemu-img compare asks for block status too; the bytes are checked against rbd export.)
  assert.equal(await info(d), await info(q), "nbdinfo of rbd/odd");
  // The one 4 MiB object exists (written at 4096): data up to librbd's end, then the zero tail.
  assert.equal(
    await nbdinfo("--map", d.uri),
    "         0     1000001    0  data\n   1000001         447    3  hole,zero\n",
  );
}

/** `rbd export` of an image into a file; returns its path. */
async function exportImage(c: Ceph, spec: string, path: string): Promise<string> {
  await Deno.remove(path).catch(() => {});
  await c.rbd("export", "--no-progress", spec, path);
  return path;
}

/** What denbd serves, copied to a local file with nbdcopy. */
async function copyOut(s: Server, path: string): Promise<string> {
  await runOk(["nbdcopy", s.uri, path], { timeoutMs: 60_000 });
  return path;
}

/**
 * What a server served (`a`) against an `rbd export` (`b`): the same bytes, and past the export's
 * end (the export size rounded up to 512) only zeroes.
 */
async function sameFiles(a: string, b: string): Promise<void> {
  const size = (await Deno.stat(b)).size;
  const r = await run(["cmp", "-n", String(size), a, b]);
  assert.equal(r.code, 0, `${a} and ${b} differ: ${r.stdout}${r.stderr}`);
  const served = await Deno.readFile(a);
  assert.equal(served.length, Math.ceil(size / 512) * 512);
  assert.ok(served.subarray(size).every((x) => x === 0), `tail of ${a} is not zero`);
}

/** The images of the read tests: spec → how it was made. */
async function buildImages(c: Ceph, dir: string): Promise<string[]> {
  await c.rbd("create", "rbd/sparse", "--size", "64M");
  await qio(c, rbdName(c, "rbd/sparse"), [
    "write -P 0xab 0 1M",
    "write -P 0xcd 20M 64k",
    `write -P 0x11 ${40 * MiB - 512} 4k`, // across an object boundary
    "write -z 50M 1M",
  ]);
  await c.rbd("create", "rbd/empty", "--size", "16M");
  // Full: imported from a random local file.
  const src = `${dir}/full.raw`;
  await runOk(["dd", "if=/dev/urandom", `of=${src}`, "bs=1M", "count=12", "status=none"]);
  await c.rbd("import", "--no-progress", src, "rbd/full");
  await c.rbd("create", "rbd/small", "--size", "8M", "--object-size", "64K");
  await qio(c, rbdName(c, "rbd/small"), [
    "write -P 0x21 100k 300k",
    "write -P 0x22 5M 4k",
    "write -P 0x23 8380416 8k",
  ]);
  await c.rbd("create", "rbd/nofd", "--size", "8M", "--image-feature", "layering");
  await qio(c, rbdName(c, "rbd/nofd"), ["write -P 0x31 1M 64k"]);
  await c.rbd("create", "rbd/odd", "--size", "1000001B");
  await qio(c, rbdName(c, "rbd/odd"), ["write -P 0x41 4096 8192"]);
  await c.rbd("namespace", "create", "rbd/ns1");
  await c.rbd("create", "rbd/ns1/img", "--size", "8M");
  await qio(c, rbdName(c, "rbd/ns1/img"), ["write -P 0x51 2M 1M"]);
  // Snapshot: the image changes after it was taken.
  await c.rbd("snap", "create", "rbd/sparse@snap1");
  await qio(c, rbdName(c, "rbd/sparse"), ["write -P 0xee 0 2M", "write -P 0xef 30M 4M"]);
  return ["rbd/sparse", "rbd/empty", "rbd/full", "rbd/small", "rbd/nofd", "rbd/odd", "rbd/ns1/img"];
}

Deno.test({
  name: "rbd: reads, sizes, flags and maps as qemu-nbd; rbd export matches; open errors",
  ignore,
  async fn(t) {
    await withTempDir(async (dir) => {
      const c = await startCeph();
      try {
        const images = await buildImages(c, dir);
        for (const spec of images) {
          await t.step(`${spec}: rbd: filename, writable and -r`, async () => {
            await sideBySide(dir, ["-t", "-f", "raw", rbdName(c, spec)], async (d, q) => {
              if (spec === "rbd/odd") await oddSizeViews(d, q);
              else await compareViews(d, q, spec);
              const name = spec.replaceAll("/", "_");
              await sameFiles(
                await copyOut(d, `${dir}/${name}.nbd`),
                await exportImage(c, spec, `${dir}/${name}.exp`),
              );
            });
            await sideBySide(
              dir,
              ["-t", "-r", "-f", "raw", rbdName(c, spec)],
              (d, q) => spec === "rbd/odd" ? oddSizeViews(d, q) : compareViews(d, q, `${spec} -r`),
            );
          });
        }
        await t.step("snapshot: read-only, the data at the snapshot", async () => {
          await sideBySide(
            dir,
            ["-t", "-r", "-f", "raw", rbdName(c, "rbd/sparse@snap1")],
            async (d, q) => {
              await compareViews(d, q, "rbd/sparse@snap1");
              await sameFiles(
                await copyOut(d, `${dir}/snap.nbd`),
                await exportImage(c, "rbd/sparse@snap1", `${dir}/snap.exp`),
              );
            },
          );
          await sideBySide(
            dir,
            [
              "-t",
              "-r",
              "--image-opts",
              `driver=rbd,pool=rbd,image=sparse,snapshot=snap1,conf=${c.conf}`,
            ],
            (d, q) => compareViews(d, q, "snapshot= option"),
          );
        });
        await t.step("-A: qemu:allocation-depth as qemu-nbd", async () => {
          await sideBySide(
            dir,
            ["-t", "-r", "-A", "-f", "raw", rbdName(c, "rbd/sparse")],
            async (d, q) => {
              assert.equal(
                await nbdinfo("--map=qemu:allocation-depth", d.uri),
                await nbdinfo("--map=qemu:allocation-depth", q.uri),
              );
            },
          );
        });
        await t.step("--image-opts and json: spellings", async () => {
          const forms = [
            ["--image-opts", `driver=rbd,pool=rbd,image=small,conf=${c.conf}`],
            [
              "--image-opts",
              `driver=raw,file.driver=rbd,file.pool=rbd,file.namespace=ns1,file.image=img,file.conf=${c.conf}`,
            ],
            [
              `json:${
                JSON.stringify({ driver: "rbd", pool: "rbd", image: "sparse", conf: c.conf })
              }`,
            ],
            [`json:${
              JSON.stringify({
                driver: "raw",
                file: { driver: "rbd", pool: "rbd", image: "full", conf: c.conf },
              })
            }`],
          ];
          for (const f of forms) {
            await sideBySide(dir, ["-t", "-r", ...f], (d, q) => compareViews(d, q, f.join(" ")));
          }
        });
        await t.step("qcow2 stored in an rbd image: -f qcow2 and probed", async () => {
          const local = `${dir}/img.qcow2`;
          await runOk(["qemu-img", "create", "-q", "-f", "qcow2", local, "16M"]);
          await runOk([
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x61 1M 192k",
            "-c",
            "write -P 0x62 9M 64k",
            "-c",
            "write -z 12M 1M",
            local,
          ]);
          await c.rbd("import", "--no-progress", local, "rbd/q2");
          for (const args of [["-f", "qcow2"], []]) {
            await sideBySide(dir, ["-t", "-r", ...args, rbdName(c, "rbd/q2")], async (d, q) => {
              await compareViews(d, q, `qcow2 ${args.join(" ")}`);
              await runOk(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", local, d.uri]);
            });
          }
        });
        await t.step("open failures: qemu-nbd's messages", async () => {
          const cases = [
            ["-f", "raw", rbdName(c, "rbd/nope")],
            ["-f", "raw", rbdName(c, "nopool/x")],
            ["-f", "raw", rbdName(c, "rbd/sparse@nosnap")],
            ["-f", "raw", rbdName(c, "rbd/ns9/x")],
            ["-f", "raw", rbdName(c, "rbd/sparse@snap1")], // writable snapshot
            ["-f", "raw", "rbd:rbd/sparse:conf=/nonexistent.conf"],
            ["-f", "raw", `${rbdName(c, "rbd/sparse")}:bogus_option=1`],
            ["-f", "raw", `${rbdName(c, "rbd/sparse")}:id`],
            ["-f", "raw", "rbd:rbd"],
            // Cluster unreachable, bounded by client_mount_timeout as the user sets it.
            ["-f", "raw", "rbd:rbd/x:mon_host=127.0.0.1\\:1:client_mount_timeout=2:conf=/dev/null"],
            ["--image-opts", `driver=rbd,pool=rbd,conf=${c.conf}`],
            ["--image-opts", `driver=rbd,image=x,conf=${c.conf}`],
            ["--image-opts", `driver=rbd,pool=rbd,image=sparse,conf=${c.conf},foo=bar`],
          ];
          for (const args of cases) {
            const sock = `${dir}/fail.sock`;
            const [d, q] = await Promise.all(["denbd", "qemu-nbd"].map((k) => {
              const argv = k === "qemu-nbd" ? ["qemu-nbd", "-k", sock + ".q", ...args] : [
                Deno.execPath(),
                "run",
                "--quiet",
                "-A",
                new URL("../../main.ts", import.meta.url).pathname,
                "-k",
                sock + ".d",
                ...args,
              ];
              return run(argv, { timeoutMs: 30_000 });
            }));
            assert.notEqual(d!.code, 0, `denbd ${args.join(" ")}`);
            assert.notEqual(q!.code, 0, `qemu-nbd ${args.join(" ")}`);
            assert.equal(
              d!.stderr.trim().replace(/^denbd:/, "qemu-nbd:"),
              q!.stderr.trim(),
              args.join(" "),
            );
          }
        });
      } finally {
        await c.stop();
      }
    });
  },
});

/** Fixed requests first (object boundaries, thin and thick zeroes, discards), then random ones. */
function workload(size: number, seed: number): string[] {
  let x = seed >>> 0 || 1;
  const r = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
  const cmds = [
    `write -P 0x71 ${4 * MiB - 4096} 8192`,
    "write -P 0x72 0 3M",
    "write -z 1M 64k",
    "write -z -u 8M 4M",
    "discard 2M 512k",
    `write -P 0x73 ${size - 12345} 12345`,
    "flush",
  ];
  for (let i = 0; i < 24; i++) {
    const len = 1 + Math.floor(r() * 600_000);
    const off = Math.floor(r() * (size - len));
    const k = r();
    if (k < 0.15) cmds.push(`write -z ${off} ${len}`);
    else if (k < 0.25) cmds.push(`write -z -u ${off} ${len}`);
    else if (k < 0.35) cmds.push(`discard ${off} ${len}`);
    else cmds.push(`write -P ${1 + Math.floor(r() * 254)} ${off} ${len}`);
  }
  cmds.push("flush");
  return cmds;
}

/** Flushed writes to distinct 64 KiB blocks; prints the count written before each flush. */
const FLUSHED_WRITER = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
bs = 65536
n = h.get_size() // bs
i = 0
while i < n:
    for _ in range(8):
        if i >= n:
            break
        h.pwrite(bytes([(i * 7) % 251 + 1]) * bs, i * bs)
        i += 1
    h.flush()
    print(i, flush=True)
`;

/** Writes, flushes and reads back (raises on a mismatch); prints "done". */
const VERIFYING_WORKLOAD = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
bs = 65536
for i in range(int(sys.argv[2])):
    off = (i * 37 % 256) * bs
    data = bytes([i % 250 + 1]) * bs
    h.pwrite(data, off)
    if i % 4 == 0:
        h.flush()
    assert h.pread(bs, off) == data, "read back %d" % i
print("done")
`;

Deno.test({
  name: "rbd: writes, zeroes and discards as qemu-nbd; kill -9 keeps flushed writes; OSD stop",
  ignore,
  async fn(t) {
    await withTempDir(async (dir) => {
      const c = await startCeph();
      try {
        const size = 24 * MiB;
        for (const [i, extra] of [[], ["--discard=unmap"], ["--cache=none"]].entries()) {
          await t.step(`workload through each server on twins ${extra.join(" ")}`, async () => {
            const a = `rbd/wa${i}`, b = `rbd/wb${i}`;
            for (const s of [a, b]) {
              await c.rbd("create", s, "--size", "24M");
              await qio(c, rbdName(c, s), ["write -P 0x5a 0 6M", "write -P 0x5b 16M 4M"]);
            }
            const cmds = workload(size, 11 + i);
            await withServers([
              { dir, kind: SERVER_KIND, args: ["-t", "-f", "raw", ...extra, rbdName(c, a)] },
              { dir, kind: "qemu-nbd", args: ["-t", "-f", "raw", ...extra, rbdName(c, b)] },
            ], async ([d, q]) => {
              await Promise.all([qio(c, d!.uri, cmds), qio(c, q!.uri, cmds)]);
              assert.equal(await nbdinfo("--map", d!.uri), await nbdinfo("--map", q!.uri));
            });
            await sameFiles(
              await exportImage(c, a, `${dir}/wa.exp`),
              await exportImage(c, b, `${dir}/wb.exp`),
            );
            // And qemu's own rbd driver reads what denbd wrote.
            await runOk([
              "qemu-img",
              "compare",
              "-f",
              "raw",
              "-F",
              "raw",
              rbdName(c, a),
              `${dir}/wb.exp`,
            ], { timeoutMs: 60_000 });
          });
        }

        await t.step(
          "kill -9 during flushed writes: every flushed write is in the image",
          async () => {
            for (let iter = 0; iter < 3; iter++) {
              const spec = `rbd/crash${iter}`;
              await c.rbd("create", spec, "--size", "32M");
              await withServers([
                { dir, kind: SERVER_KIND, args: ["-t", "-f", "raw", rbdName(c, spec)] },
              ], async ([d]) => {
                const child = new Deno.Command(PYTHON, {
                  args: ["-c", FLUSHED_WRITER, d!.uri],
                  stdout: "piped",
                  stderr: "null",
                }).spawn();
                const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
                let flushed = 0;
                let buffered = "";
                const deadline = Date.now() + 800 + iter * 500;
                while (Date.now() < deadline) {
                  const r = await lines.read();
                  if (r.done) break;
                  buffered += r.value;
                  const parts = buffered.split("\n");
                  buffered = parts.pop()!;
                  for (const p of parts) if (p !== "") flushed = Number(p);
                }
                Deno.kill(d!.pid, "SIGKILL");
                // Lines already printed before the kill count as flushed too.
                for (;;) {
                  const r = await lines.read();
                  if (r.done) break;
                  buffered += r.value;
                  const parts = buffered.split("\n");
                  buffered = parts.pop()!;
                  for (const p of parts) if (p !== "") flushed = Number(p);
                }
                await child.status;
                assert.ok(flushed > 0, "no flush completed before the kill");
                const exp = await Deno.readFile(await exportImage(c, spec, `${dir}/crash.exp`));
                for (let j = 0; j < flushed; j++) {
                  const want = (j * 7) % 251 + 1;
                  const blk = exp.subarray(j * 65536, (j + 1) * 65536);
                  assert.ok(blk.every((v) => v === want), `flushed block ${j} of ${flushed} lost`);
                }
              });
            }
          },
        );

        await t.step(
          "rados_osd_op_timeout: a stopped OSD fails requests, then both serve again",
          async () => {
            await c.rbd("create", "rbd/tmo", "--size", "8M");
            const name = `${rbdName(c, "rbd/tmo")}:rados_osd_op_timeout=2`;
            await withServers([
              { dir, kind: SERVER_KIND, args: ["-t", "-f", "raw", name] },
              { dir, kind: "qemu-nbd", args: ["-t", "-f", "raw", name] },
            ], async (servers) => {
              const io = (s: Server, cmd: string) =>
                run(["qemu-io", "-f", "raw", "-c", cmd, s.uri], { timeoutMs: 30_000 });
              Deno.kill(c.osdPid, "SIGSTOP");
              try {
                for (const s of servers) {
                  const r = await io(s, "write -P 0x66 0 64k");
                  assert.match(r.stdout + r.stderr, /write failed/, `${s.kind} during the stop`);
                }
              } finally {
                Deno.kill(c.osdPid, "SIGCONT");
              }
              for (const s of servers) {
                const w = await io(s, "write -P 0x67 1M 64k");
                assert.doesNotMatch(w.stdout + w.stderr, /failed/, `${s.kind} after the stop`);
                const r = await io(s, "read -P 0x67 1M 64k");
                assert.doesNotMatch(r.stdout + r.stderr, /failed|verification/);
                assert.equal(s.exitStatus, undefined, `${s.kind} exited`);
              }
            });
          },
        );

        await t.step(
          "SIGSTOP/SIGCONT of the OSD mid-workload: requests wait, then complete",
          async () => {
            await c.rbd("create", "rbd/stall", "--size", "16M");
            await withServers([
              { dir, kind: SERVER_KIND, args: ["-t", "-f", "raw", rbdName(c, "rbd/stall")] },
            ], async ([d]) => {
              let finished = false;
              const work = run([PYTHON, "-c", VERIFYING_WORKLOAD, d!.uri, "3000"], {
                timeoutMs: 90_000,
              }).finally(() => finished = true);
              await new Promise((r) => setTimeout(r, 300));
              assert.ok(!finished, "the workload ended before the OSD was stopped");
              Deno.kill(c.osdPid, "SIGSTOP");
              try {
                await new Promise((r) => setTimeout(r, 3000));
              } finally {
                Deno.kill(c.osdPid, "SIGCONT");
              }
              // Requests waited for the OSD (no error, no crash): the workload was still running.
              assert.ok(!finished, "the workload ended while the OSD was stopped");
              const r = await work;
              assert.equal(r.code, 0, r.stderr);
              assert.match(r.stdout, /done/);
              assert.equal(d!.exitStatus, undefined, "denbd exited");
              // It serves new connections afterwards.
              assert.match(await nbdinfo("--size", d!.uri), /^16777216/);
            });
          },
        );
      } finally {
        await c.stop();
      }
    });
  },
});
