/**
 * The node opener on its own: null-co's options (size rounding, read-zeroes, latency-ns, refused
 * keys and filenames) and the `file` options denbd refuses instead of ignoring.
 */

import assert from "node:assert/strict";
import { type NodeContext, openTopNode } from "../../lib/block/open_node.ts";
import { BlockError, Errno, ExtentList, STATE_HOLE, STATE_ZERO } from "../../lib/block/types.ts";

const ctx: NodeContext = {
  writable: true,
  engine: { aio: "threads" },
  warn: () => {},
  passDiscard: false,
  openBacking: () => Promise.reject(new Error("no backing files here")),
};

async function rejects(opts: Record<string, string>, message: string): Promise<BlockError> {
  const e = await openTopNode(opts, ctx).then(() => undefined, (e) => e);
  assert.ok(e instanceof BlockError, `expected a BlockError for ${JSON.stringify(opts)}`);
  assert.equal(e.message, message);
  return e;
}

Deno.test("open_node: null-co sizes, zero reads and block status as qemu reports them", async () => {
  const dflt = await openTopNode({ driver: "null-co" }, ctx);
  assert.equal(dflt.device.size, 1 << 30);
  assert.equal(dflt.format, "protocol");
  const odd = await openTopNode({ driver: "null-aio", size: "12345" }, ctx);
  assert.equal(odd.device.size, 12800); // rounded up to whole sectors
  const buf = new Uint8Array(4096).fill(0xa5);
  await odd.device.pread(buf, 0);
  assert.ok(buf.every((b) => b === 0), "stale buffer contents must be overwritten");
  const plain = new ExtentList(16);
  await odd.device.extents(0, 4096, plain);
  assert.deepEqual(plain.pairs, [4096, STATE_HOLE]);
  const zeroes = await openTopNode({ driver: "null-co", size: "1M", "read-zeroes": "on" }, ctx);
  const z = new ExtentList(16);
  await zeroes.device.extents(0, 4096, z);
  assert.deepEqual(z.pairs, [4096, STATE_HOLE | STATE_ZERO]);
  // Probed through its filename: a raw format on top, with qemu's 512-byte guard.
  const probed = await openTopNode({ filename: "null-co://" }, ctx);
  assert.equal(probed.probed, true);
  assert.equal(probed.device.caps.minBlock, 512);
});

Deno.test("open_node: null-co latency-ns delays every request", async () => {
  const slow = await openTopNode({ driver: "null-co", size: "1M", "latency-ns": "200000000" }, ctx);
  const fast = await openTopNode({ driver: "null-co", size: "1M" }, ctx);
  const t0 = performance.now();
  await fast.device.pread(new Uint8Array(512), 0);
  const t1 = performance.now();
  await slow.device.pread(new Uint8Array(512), 0);
  const t2 = performance.now();
  assert.ok(t2 - t1 >= 150, `a 200 ms latency read took ${t2 - t1} ms`);
  assert.ok(t1 - t0 < 150, `a read without latency took ${t1 - t0} ms`);
});

Deno.test("open_node: refused options and names in qemu's words", async () => {
  await rejects(
    { driver: "null-co", bogus: "1" },
    "Block protocol 'null-co' doesn't support the option 'bogus'",
  );
  await rejects(
    { filename: "null-aio://x" },
    "The only allowed filename for this driver is 'null-aio://'",
  );
  await rejects(
    { driver: "null-co", size: "abc" },
    "Parameter 'size' expects a non-negative number below 2^64",
  );
  await rejects(
    { driver: "raw", file: "node0" },
    "Cannot find device='node0' nor node-name='node0'",
  );
  await rejects({ driver: "qcow2" }, `A block device must be specified for "file"`);
  await rejects({ filename: "gopher://x" }, "Unknown protocol 'gopher'");
  await rejects({ driver: "bogus" }, "Unknown driver 'bogus'");
  // qemu's file options denbd does not act on are refused, never silently ignored.
  const e = await rejects(
    { driver: "raw", "file.filename": "/dev/null", "file.aio": "native" },
    "Option 'aio' of the 'file' driver is not supported yet",
  );
  assert.equal(e.errno, Errno.ENOTSUP);
});
