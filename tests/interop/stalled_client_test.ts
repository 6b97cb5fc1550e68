/**
 * A client that stalls in the middle of a request must not hold up the others. Three raw
 * clients each stop mid-request: one after a WRITE header and half its payload, one in the middle
 * of a request header, and one that later sends the rest of its WRITE. Meanwhile a libnbd client
 * on the same server writes and reads with correct data and sees the stalled write's range
 * unchanged. Closing the stallers leaves the server serving, without the partial write applied;
 * the resumed write lands whole. raw (a data-plane thread for denbd) and qcow2 (the main thread).
 */

import assert from "node:assert/strict";
import {
  makeDenseImage,
  MiB,
  patternBytes,
  runOk,
  runPython,
  Server,
  sleep,
  withTempDir,
} from "./_harness.ts";
import { CMD, RawConn, rawConnect, SIMPLE_REPLY_MAGIC, view } from "./_nbd_raw.ts";

const SIZE = 8 * MiB;
const SEED = 5;
/** The half-sent WRITE (never completed). */
const STALL_OFF = 3 * MiB;
const STALL_LEN = 256 * 1024;
/** The WRITE that stalls and then resumes. */
const RESUME_OFF = 6 * MiB + 4096;
const RESUME_LEN = 128 * 1024;

/** Random writes and verified reads below 2 MiB, plus reads of the stalled ranges. */
const WORKER = `
import json, random, sys, time, nbd
uri, stall_off, stall_len, resume_off, resume_len = sys.argv[1], *map(int, sys.argv[2:6])
orig = open(sys.argv[6], "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(int(sys.argv[7]))
deadline = time.monotonic() + 3
model = bytearray(orig[:2 << 20])
ops = bad = 0
while ops < 200 and time.monotonic() < deadline:
    ln = rng.randint(1, 256 << 10)
    off = rng.randint(0, len(model) - ln)
    if rng.random() < 0.5:
        data = rng.randbytes(ln)
        h.pwrite(data, off)
        model[off:off + ln] = data
    elif h.pread(ln, off) != bytes(model[off:off + ln]):
        bad += 1
    ops += 1
h.flush()
if h.pread(len(model), 0) != bytes(model):
    bad += 1
stalled = h.pread(stall_len, stall_off) == orig[stall_off:stall_off + stall_len]
resumed = h.pread(resume_len, resume_off) == orig[resume_off:resume_off + resume_len]
h.shutdown()
print(json.dumps(dict(ops=ops, bad=bad, stalledUnchanged=stalled, resumeUnchanged=resumed)))
`;

interface WorkerResult {
  ops: number;
  bad: number;
  stalledUnchanged: boolean;
  resumeUnchanged: boolean;
}

function writeHeader(offset: number, length: number, cookie: bigint): Uint8Array {
  const b = new Uint8Array(28);
  const v = view(b);
  v.setUint32(0, 0x25609513);
  v.setUint16(6, CMD.WRITE);
  v.setBigUint64(8, cookie);
  v.setBigUint64(16, BigInt(offset));
  v.setUint32(24, length);
  return b;
}

async function stalled(format: "raw" | "qcow2"): Promise<void> {
  await withTempDir(async (dir) => {
    const raw = `${dir}/disk.img`;
    await makeDenseImage(raw, SIZE, SEED);
    const orig = patternBytes(SIZE, SEED);
    let image = raw;
    if (format === "qcow2") {
      image = `${dir}/disk.qcow2`;
      await runOk(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image]);
    }
    const server = await Server.start({ dir, image, args: ["-f", format, "-t", "-e", "0"] });
    const stallers: RawConn[] = [];
    try {
      // Each staller negotiates and proves it works with one read before it stalls.
      for (let i = 0; i < 3; i++) {
        const c = await rawConnect(server);
        stallers.push(c);
        await c.negotiate();
        assert.deepEqual(await c.read(4096 * i, 512), orig.subarray(4096 * i, 4096 * i + 512));
      }
      const [halfWrite, halfHeader, resumer] = stallers as [RawConn, RawConn, RawConn];
      const payload = new Uint8Array(STALL_LEN).fill(0xee);
      await halfWrite.write(writeHeader(STALL_OFF, STALL_LEN, 21n));
      await halfWrite.write(payload.subarray(0, STALL_LEN / 2));
      await halfHeader.write(writeHeader(0, 4096, 22n).subarray(0, 13));
      const resumed = new Uint8Array(RESUME_LEN).fill(0x5c);
      await resumer.write(writeHeader(RESUME_OFF, RESUME_LEN, 23n));
      await resumer.write(resumed.subarray(0, 1000));
      await sleep(200);

      const origPath = `${dir}/orig.img`;
      await Deno.writeFile(origPath, orig);
      const args = [server.uri, STALL_OFF, STALL_LEN, RESUME_OFF, RESUME_LEN, origPath, 3];
      const r = await runPython<WorkerResult>(WORKER, args.map(String), { timeoutMs: 30_000 });
      console.log(`${server.kind} ${format}: ${JSON.stringify(r)}`);
      assert.equal(r.bad, 0, "the working client read wrong data");
      assert.ok(r.ops >= 20, `only ${r.ops} operations while the others stalled`);
      assert.equal(r.stalledUnchanged, true, "half a WRITE payload was applied");
      assert.equal(r.resumeUnchanged, true, "a WRITE was applied before its payload arrived");

      // The resumed WRITE completes with a simple reply and its data lands whole.
      await resumer.write(resumed.subarray(1000));
      const rep = await resumer.readExact(16);
      assert.equal(view(rep).getUint32(0), SIMPLE_REPLY_MAGIC);
      assert.equal(view(rep).getUint32(4), 0, "resumed WRITE failed");
      assert.equal(view(rep).getBigUint64(8), 23n);
      assert.deepEqual(await resumer.read(RESUME_OFF, RESUME_LEN), resumed);

      // The stallers hang up mid-request; the server keeps serving and drops the partial write.
      halfWrite.close();
      halfHeader.close();
      await sleep(200);
      assert.ok(server.running, "the server exited after a client hung up mid-request");
      const after = await rawConnect(server);
      stallers.push(after);
      await after.negotiate();
      assert.deepEqual(
        await after.read(STALL_OFF - 512, STALL_LEN + 1024),
        orig.subarray(STALL_OFF - 512, STALL_OFF + STALL_LEN + 512),
      );
      assert.deepEqual(await after.read(RESUME_OFF, RESUME_LEN), resumed);
      const info = await runOk(["nbdinfo", "--size", server.uri]);
      assert.equal(info.stdout.trim(), String(SIZE));
    } finally {
      for (const c of stallers) c.close();
      await server.stop();
    }
  });
}

Deno.test("stalled client: raw, mid-WRITE and mid-header stalls do not block another client", () =>
  stalled("raw"));

Deno.test("stalled client: qcow2, mid-WRITE and mid-header stalls do not block another client", () =>
  stalled("qcow2"));
