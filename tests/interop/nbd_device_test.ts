// -c/-d without a kernel module: the device client's negotiation and ioctl sequence against
// denbd and qemu-nbd side by side (a fake kernel speaks NBD's simple replies on the socket it was
// handed, as the real one does), and the command-line errors of -c and -d on this machine,
// which has no /dev/nbd*, compared with qemu-nbd's. The real kernel is tests/vm.
import assert from "node:assert/strict";
import { attachDevice } from "../../lib/kernel/device_client.ts";
import { ReadinessLoop } from "../../lib/net/readiness.ts";
import { tryRecv, trySend } from "../../ffi/socket.ts";
import { FakeNbdOps } from "../unit/_fake_nbd_ops.ts";
import {
  DENBD_MAIN,
  DENBD_PERMS,
  makeDenseImage,
  patternBytes,
  run,
  type ServerKind,
  sha256File,
  sleep,
  withServer,
  withTempDir,
} from "./_harness.ts";

const KINDS: readonly ServerKind[] = ["denbd", "qemu-nbd"];
const SIZE = 4 << 20;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;

/** Bounded blocking-style I/O on a non-blocking socket (the fake kernel's side). */
async function sendAll(fd: number, b: Uint8Array): Promise<void> {
  let done = 0;
  for (let i = 0; done < b.length; i++) {
    if (i > 20_000) throw new Error("fake kernel: send timed out");
    const n = trySend(fd, b.subarray(done));
    if (n > 0) done += n;
    else await sleep(1);
  }
}

async function recvExactly(fd: number, n: number): Promise<Uint8Array> {
  const b = new Uint8Array(n);
  let got = 0;
  for (let i = 0; got < n; i++) {
    if (i > 20_000) throw new Error("fake kernel: recv timed out");
    const r = tryRecv(fd, b.subarray(got));
    if (r === 0) throw new Error("fake kernel: server closed the socket");
    if (r > 0) got += r;
    else await sleep(1);
  }
  return b;
}

function request(type: number, cookie: number, offset: number, length: number): Uint8Array {
  const b = new Uint8Array(28);
  const v = new DataView(b.buffer);
  v.setUint32(0, REQUEST_MAGIC);
  v.setUint16(6, type);
  v.setBigUint64(8, BigInt(cookie));
  v.setBigUint64(16, BigInt(offset));
  v.setUint32(24, length);
  return b;
}

/** One request and its simple reply (the only kind the kernel reads); the reply's error. */
async function roundTrip(
  fd: number,
  type: number,
  cookie: number,
  offset: number,
  payload: Uint8Array | number,
): Promise<{ error: number; data: Uint8Array }> {
  const length = typeof payload === "number" ? payload : payload.length;
  await sendAll(fd, request(type, cookie, offset, length));
  if (typeof payload !== "number") await sendAll(fd, payload);
  const h = new DataView((await recvExactly(fd, 16)).buffer);
  assert.equal(h.getUint32(0), SIMPLE_REPLY_MAGIC, "a simple reply, as the kernel needs");
  assert.equal(h.getBigUint64(8), BigInt(cookie));
  const error = h.getUint32(4);
  const want = type === CMD_READ && error === 0 ? length : 0;
  return { error, data: want > 0 ? await recvExactly(fd, want) : new Uint8Array() };
}

interface KernelRun {
  readonly log: string[];
  readonly readBack: Uint8Array;
  readonly head: Uint8Array;
  readonly exit: Deno.CommandStatus | undefined;
  readonly image: string;
}

/** Serve a copy of the image with `kind`, bind a fake device to it, do I/O, disconnect. */
async function kernelRun(kind: ServerKind, dir: string, extra: string[]): Promise<KernelRun> {
  const image = `${dir}/${kind}.raw`;
  await makeDenseImage(image, SIZE, 3);
  const written = patternBytes(8192, 99);
  let head: Uint8Array = new Uint8Array();
  let readBack: Uint8Array = new Uint8Array();
  const ops = new FakeNbdOps({
    kernel: async (fd) => {
      head = (await roundTrip(fd, CMD_READ, 1, 0, 4096)).data;
      assert.equal((await roundTrip(fd, CMD_WRITE, 2, 65536, written)).error, 0);
      assert.equal((await roundTrip(fd, CMD_FLUSH, 3, 0, 0)).error, 0);
      readBack = (await roundTrip(fd, CMD_READ, 4, 65536, written.length)).data;
      await sendAll(fd, request(CMD_DISC, 5, 0, 0));
      return 0;
    },
  });
  return await withServer(
    { kind, dir, image, args: ["-f", "raw", ...extra] },
    async (server) => {
      const loop = new ReadinessLoop({ spin: false });
      try {
        ops.open("/dev/nbd0"); // keeps descriptor numbering identical for both servers
        const attached = await attachDevice({
          device: "/dev/nbd0",
          socket: server.socketPath!,
          loop,
          ops,
        });
        assert.equal(await attached.done, true);
      } finally {
        await loop.close();
      }
      // Without -t the server ends once its one client (the "kernel") is gone.
      const exit = await server.waitExit(10_000);
      assert.deepEqual(written, readBack);
      return { log: ops.log.slice(1), readBack, head, exit, image };
    },
  );
}

Deno.test("nbd device: the kernel's end negotiates, reads and writes the same with denbd and qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const runs = [];
    for (const kind of KINDS) runs.push(await kernelRun(kind, dir, []));
    const [d, q] = runs as [KernelRun, KernelRun];
    assert.deepEqual(d.log, q.log, "the same ioctls with the same arguments");
    assert.deepEqual(d.log.slice(0, 5), [
      "open /dev/nbd0",
      "SET_SOCK <socket>",
      "SET_BLKSIZE 512",
      `SET_SIZE_BLOCKS ${SIZE / 512}`,
      d.log[4],
    ]);
    assert.match(d.log[4]!, /^SET_FLAGS \d+$/);
    // NBD_DO_IT starts, the partitions are rescanned while it runs, and it is cleared after.
    assert.deepEqual(d.log.slice(5), [
      "DO_IT",
      "rescan /dev/nbd0",
      "CLEAR_QUE 0",
      "CLEAR_SOCK 0",
      "close",
    ]);
    assert.deepEqual(d.head, q.head);
    assert.equal(d.exit?.code, 0, "denbd exits 0 when the device disconnects");
    assert.equal(q.exit?.code, 0);
    assert.equal(await sha256File(d.image), await sha256File(q.image));
  });
});

Deno.test("nbd device: -r is passed to the kernel as the read-only flag, as qemu-nbd does", async () => {
  await withTempDir(async (dir) => {
    const flags: number[] = [];
    for (const kind of KINDS) {
      const image = `${dir}/${kind}-ro.raw`;
      await makeDenseImage(image, SIZE, 4);
      const ops = new FakeNbdOps({
        kernel: async (fd) => {
          const r = await roundTrip(fd, CMD_WRITE, 1, 0, new Uint8Array(512));
          assert.notEqual(r.error, 0, `${kind}: a write to a read-only export fails`);
          await sendAll(fd, request(CMD_DISC, 2, 0, 0));
          return 0;
        },
      });
      await withServer({ kind, dir, image, args: ["-f", "raw", "-r"] }, async (server) => {
        const loop = new ReadinessLoop({ spin: false });
        try {
          ops.open("/dev/nbd0");
          assert.equal(
            await (await attachDevice({
              device: "/dev/nbd0",
              socket: server.socketPath!,
              loop,
              ops,
            })).done,
            true,
          );
        } finally {
          await loop.close();
        }
      });
      const f = ops.log.find((l) => l.startsWith("SET_FLAGS "))!;
      flags.push(Number(f.split(" ")[1]));
    }
    assert.equal(flags[0], flags[1]);
    assert.equal(flags[0]! & 0x2, 0x2, "NBD_FLAG_READ_ONLY");
  });
});

/** denbd's stderr with its hint lines (denbd's own, after qemu-nbd's message) removed. */
function withoutHints(stderr: string): string {
  return stderr.split("\n").filter((l) => !l.startsWith("(")).join("\n");
}

async function cli(kind: ServerKind, args: string[]) {
  const argv = kind === "denbd"
    ? [Deno.execPath(), "run", ...DENBD_PERMS, DENBD_MAIN, ...args]
    : ["qemu-nbd", ...args];
  const r = await run(argv, { timeoutMs: 20_000 });
  return {
    code: r.code,
    stdout: r.stdout,
    stderr: kind === "denbd" ? r.stderr.replaceAll("denbd:", "qemu-nbd:") : r.stderr,
    raw: r.stderr,
  };
}

Deno.test("nbd device: -c and -d errors on this machine match qemu-nbd's (exit code, words)", async () => {
  let missing = "/dev/nbd15";
  for (let i = 15; i >= 0; i--) {
    try {
      Deno.statSync(`/dev/nbd${i}`);
    } catch {
      missing = `/dev/nbd${i}`;
      break;
    }
  }
  await withTempDir(async (dir) => {
    const image = `${dir}/img.raw`;
    await makeDenseImage(image, 1 << 20, 5);
    const notDevice = `${dir}/plain-file`;
    await Deno.writeFile(notDevice, new Uint8Array(4096));
    const cases: string[][] = [
      ["-c", missing, "-f", "raw", "-k", `${dir}/a.sock`, image],
      ["-v", "-c", missing, "-f", "raw", "-k", `${dir}/b.sock`, image],
      ["-c", missing, "-f", "raw", image], // qemu-nbd's default socket under /var/lock
      ["-c", notDevice, "-f", "raw", "-k", `${dir}/c.sock`, image],
      ["-d", missing],
      ["-d", notDevice],
      [
        "-c",
        missing,
        "--object",
        "tls-creds-anon,id=t0,endpoint=server",
        "--tls-creds",
        "t0",
        image,
      ],
    ];
    for (const args of cases) {
      const d = await cli("denbd", args);
      const q = await cli("qemu-nbd", args);
      const what = args.join(" ");
      assert.equal(d.code, q.code, `${what}: exit code`);
      assert.equal(withoutHints(d.stderr), q.stderr, `${what}: stderr`);
      assert.equal(d.stdout, q.stdout, `${what}: stdout`);
      if (args.includes(missing) && q.stderr.includes("No such file")) {
        assert.match(d.raw, /modprobe nbd/, `${what}: the hint`);
      }
    }
    // Neither leaves its default socket behind.
    const base = missing.slice(missing.lastIndexOf("/") + 1);
    assert.throws(() => Deno.statSync(`/var/lock/qemu-nbd-${base}`));
  });
});

Deno.test('nbd device: with -x NAME the device\'s client (export "") is refused by both servers alike', async () => {
  await withTempDir(async (dir) => {
    const messages: string[] = [];
    for (const kind of KINDS) {
      const image = `${dir}/${kind}-x.raw`;
      await makeDenseImage(image, SIZE, 6);
      const ops = new FakeNbdOps();
      await withServer({ kind, dir, image, args: ["-f", "raw", "-x", "disk0"] }, async (server) => {
        const loop = new ReadinessLoop({ spin: false });
        try {
          await assert.rejects(
            attachDevice({ device: "/dev/nbd0", socket: server.socketPath!, loop, ops }),
            (e: Error) => {
              messages.push(e.message);
              return true;
            },
          );
        } finally {
          await loop.close();
        }
      });
      assert.deepEqual(ops.log, [], `${kind}: no ioctl once negotiation failed`);
    }
    assert.equal(messages[0], messages[1]);
    assert.match(messages[0]!, /export/i);
  });
});
