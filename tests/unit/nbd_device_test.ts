// The /dev/nbd ioctl sequences of -c and -d (qemu 7.2's nbd_init, nbd_client, nbd_disconnect)
// against a recording fake, with the failure of each step and the message qemu-nbd prints for it.
import assert from "node:assert/strict";
import {
  bindDevice,
  DeviceError,
  disconnectDevice,
  openDevice,
  runDevice,
} from "../../lib/kernel/nbd_device.ts";
import { FakeNbdOps } from "./_fake_nbd_ops.ts";

const EBUSY = 16;
const EINVAL = 22;
const ENOENT = 2;
const ENOTTY = 25;
const EACCES = 13;
const EPERM = 1;

const FLAGS_RW = 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100 | 0x200 | 0x800; // qemu-nbd's for raw
const FLAGS_RO = FLAGS_RW | 0x2;

function bound(ops: FakeNbdOps, size: number, flags: number, minBlock = 0): void {
  const fd = openDevice(ops, "/dev/nbd0");
  bindDevice(ops, fd, "/dev/nbd0", 7, { size, flags, minBlock });
}

Deno.test("nbd device: -c binds in qemu's order with 512-byte sectors and the server's flags", () => {
  const ops = new FakeNbdOps();
  bound(ops, 64 << 20, FLAGS_RW);
  assert.deepEqual(ops.log, [
    "open /dev/nbd0",
    "SET_SOCK <socket>",
    "SET_BLKSIZE 512",
    `SET_SIZE_BLOCKS ${(64 << 20) / 512}`,
    `SET_FLAGS ${FLAGS_RW}`,
  ]);
});

Deno.test("nbd device: a larger minimum block size is the sector size; a partial tail is cut", () => {
  const ops = new FakeNbdOps();
  bound(ops, 10 * 4096 + 1000, FLAGS_RO, 4096);
  assert.deepEqual(ops.log.slice(2, 4), ["SET_BLKSIZE 4096", "SET_SIZE_BLOCKS 10"]);
  const small = new FakeNbdOps();
  bound(small, 3 * 512 + 100, FLAGS_RW, 1);
  assert.deepEqual(small.log.slice(2, 4), ["SET_BLKSIZE 512", "SET_SIZE_BLOCKS 3"]);
});

Deno.test("nbd device: a kernel without NBD_SET_FLAGS is told read-only through BLKROSET", () => {
  const ro = new FakeNbdOps({ fail: { SET_FLAGS: ENOTTY } });
  bound(ro, 1 << 20, FLAGS_RO);
  assert.deepEqual(ro.log.slice(-2), [`SET_FLAGS ${FLAGS_RO}`, "BLKROSET 1"]);
  const rw = new FakeNbdOps({ fail: { SET_FLAGS: ENOTTY } });
  bound(rw, 1 << 20, FLAGS_RW);
  assert.equal(rw.log.at(-1), "BLKROSET 0");
  const broken = new FakeNbdOps({ fail: { SET_FLAGS: ENOTTY, BLKROSET: EINVAL } });
  assert.throws(() => bound(broken, 1 << 20, FLAGS_RW), {
    message: "Failed setting read-only attribute",
  });
});

Deno.test("nbd device: each failing step stops the sequence with qemu-nbd's message", () => {
  const cases: [string, number, string, RegExp][] = [
    ["SET_SOCK", EBUSY, "Failed to set NBD socket", /already connected; 'denbd -d \/dev\/nbd0'/],
    ["SET_SOCK", ENOTTY, "Failed to set NBD socket", /not an NBD device/],
    ["SET_SOCK", EINVAL, "Failed to set NBD socket", /not an NBD device/],
    ["SET_BLKSIZE", EINVAL, "Failed setting NBD block size", /Invalid argument/],
    ["SET_SIZE_BLOCKS", EINVAL, "Failed setting size (in blocks)", /Invalid argument/],
    ["SET_FLAGS", EINVAL, "Failed setting flags", /Invalid argument/],
  ];
  for (const [step, err, message, hint] of cases) {
    const ops = new FakeNbdOps({ fail: { [step]: err } });
    let thrown: unknown;
    try {
      bound(ops, 1 << 20, FLAGS_RW);
    } catch (e) {
      thrown = e;
    }
    assert.ok(thrown instanceof DeviceError, `${step}: ${thrown}`);
    assert.equal(thrown.message, message);
    assert.match(thrown.hint ?? "", hint);
    assert.ok(ops.log.at(-1)!.startsWith(step), `${step} is the last call: ${ops.log}`);
  }
});

Deno.test("nbd device: open failures name the device, with a hint for the module and for root", () => {
  const cases: [number, string, RegExp][] = [
    [ENOENT, "Failed to open /dev/nbd0: No such file or directory", /modprobe nbd/],
    [EACCES, "Failed to open /dev/nbd0: Permission denied", /needs root/],
    [EPERM, "Failed to open /dev/nbd0: Operation not permitted", /needs root/],
  ];
  for (const [err, message, hint] of cases) {
    assert.throws(() => openDevice(new FakeNbdOps({ openErrno: err }), "/dev/nbd0"), (e) => {
      assert.ok(e instanceof DeviceError);
      assert.equal(e.message, message);
      assert.match(e.hint!, hint);
      return true;
    });
  }
});

Deno.test("nbd device: NBD_DO_IT is followed by CLEAR_QUE and CLEAR_SOCK, failed or not", async () => {
  for (const fail of [undefined, { DO_IT: 5 }]) {
    const ops = new FakeNbdOps({ fail });
    const fd = ops.open("/dev/nbd1");
    assert.equal(await runDevice(ops, fd), fail === undefined);
    assert.deepEqual(ops.log, ["open /dev/nbd1", "DO_IT", "CLEAR_QUE 0", "CLEAR_SOCK 0"]);
  }
});

Deno.test("nbd device: -d clears the queue, disconnects, clears the socket and ignores errors", () => {
  const ops = new FakeNbdOps({ fail: { DISCONNECT: EINVAL, CLEAR_QUE: EINVAL } });
  disconnectDevice(ops, "/dev/nbd3");
  assert.deepEqual(ops.log, [
    "open /dev/nbd3",
    "CLEAR_QUE 0",
    "DISCONNECT 0",
    "CLEAR_SOCK 0",
    "close",
  ]);
  assert.deepEqual(ops.openFds, []);
  assert.throws(() => disconnectDevice(new FakeNbdOps({ openErrno: ENOENT }), "/dev/nbd3"), {
    message: "Cannot open /dev/nbd3: No such file or directory",
  });
});
