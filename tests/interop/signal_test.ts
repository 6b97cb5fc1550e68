/**
 * SIGTERM, SIGINT and SIGHUP, compared with qemu-nbd: the exit status, what is left on disk
 * (unix socket, pid file), and the image a client had written to while it was still connected
 * (data kept, qcow2 dirty bit clear, `qemu-img check` clean). Both servers run side by side on
 * copies of the same image; the test asserts that denbd's outcome equals qemu-nbd's, and that
 * the outcome is the clean one.
 */

import assert from "node:assert/strict";
import { MiB, PYTHON, runOk, Server, type ServerKind, withTempDir } from "./_harness.ts";

/** Held-open client: writes 64 KiB of 0xab at 1 MiB, says "ok", then keeps the connection. */
const HOLD_CLIENT = `
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\\xab" * 65536, 1048576)
print("ok", flush=True)
time.sleep(30)
`;

interface Outcome {
  code: number;
  signal: string | null;
  socketLeft: boolean;
  pidFileLeft: boolean;
  dataKept: boolean;
  dirtyBit: boolean | undefined;
  check: number | undefined;
}

function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

/** qcow2 header: incompatible_features (offset 72, big endian 64-bit), bit 0 = dirty. */
function qcow2Dirty(path: string): boolean {
  const head = Deno.readFileSync(path).subarray(72, 80);
  return (new DataView(head.buffer, head.byteOffset).getBigUint64(0) & 1n) === 1n;
}

async function readExport(path: string, format: string): Promise<Uint8Array> {
  const out = `${path}.flat`;
  await runOk(["qemu-img", "convert", "-U", "-f", format, "-O", "raw", path, out]);
  const data = await Deno.readFile(out);
  await Deno.remove(out);
  return data;
}

async function outcome(
  kind: ServerKind,
  dir: string,
  format: "raw" | "qcow2",
  signal: Deno.Signal,
): Promise<Outcome> {
  const image = `${dir}/${kind}.${format}`;
  if (format === "qcow2") {
    await runOk([
      "qemu-img",
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "lazy_refcounts=on",
      image,
      "4M",
    ]);
  } else {
    await runOk(["qemu-img", "create", "-q", "-f", "raw", image, "4M"]);
  }
  const pidFile = `${dir}/${kind}.pid`;
  const server = await Server.start({
    dir,
    kind,
    image,
    args: ["-t", "-f", format, `--pid-file=${pidFile}`],
    socketName: `${kind}.sock`,
  });
  const client = new Deno.Command(PYTHON, {
    args: ["-c", HOLD_CLIENT, server.uri],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let status: Deno.CommandStatus | undefined;
  try {
    const reader = client.stdout.getReader();
    const first = await reader.read();
    reader.releaseLock();
    assert.equal(new TextDecoder().decode(first.value ?? new Uint8Array()).trim(), "ok");
    Deno.kill(server.pid, signal);
    status = await server.waitExit(10_000);
  } finally {
    try {
      client.kill("SIGKILL");
    } catch { /* gone */ }
    await client.output().catch(() => {});
    await server.stop();
  }
  assert.ok(status !== undefined, `${kind} did not exit within 10 s of ${signal}`);
  const data = await readExport(image, format);
  const check = format === "qcow2"
    ? (await new Deno.Command("qemu-img", { args: ["check", "-q", image] }).output()).code
    : undefined;
  return {
    code: status.code,
    signal: status.signal,
    socketLeft: exists(server.socketPath!),
    pidFileLeft: exists(pidFile),
    dataKept: data.subarray(MiB, MiB + 65536).every((b) => b === 0xab),
    dirtyBit: format === "qcow2" ? qcow2Dirty(image) : undefined,
    check,
  };
}

for (const format of ["raw", "qcow2"] as const) {
  for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
    Deno.test(`signals: ${signal} on a ${format} export with a client connected, as qemu-nbd`, async () => {
      await withTempDir(async (dir) => {
        const ref = await outcome("qemu-nbd", dir, format, signal);
        const got = await outcome("denbd", dir, format, signal);
        assert.deepEqual(got, ref);
        // And the reference itself is the clean shutdown this test is about.
        assert.equal(got.code, 0);
        assert.equal(got.socketLeft, false);
        assert.equal(got.dataKept, true);
        if (format === "qcow2") {
          assert.equal(got.dirtyBit, false);
          assert.equal(got.check, 0);
        }
      });
    });
  }
}

Deno.test("signals: a --fork daemon removes its unix socket on SIGTERM and keeps its pid file, as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const results: Record<string, { socketLeft: boolean; pidFileLeft: boolean }> = {};
    for (const kind of ["qemu-nbd", "denbd"] as const) {
      const image = `${dir}/${kind}.qcow2`;
      await runOk(["qemu-img", "create", "-q", "-f", "qcow2", image, "4M"]);
      const sock = `${dir}/${kind}-fork.sock`;
      const pidFile = `${dir}/${kind}-fork.pid`;
      const argv = kind === "qemu-nbd" ? ["qemu-nbd"] : [
        Deno.execPath(),
        "run",
        "--quiet",
        "-A",
        new URL("../../main.ts", import.meta.url).pathname,
      ];
      await runOk([
        ...argv,
        "--fork",
        "-r",
        "-f",
        "qcow2",
        "-k",
        sock,
        `--pid-file=${pidFile}`,
        image,
      ]);
      const pid = Number((await Deno.readTextFile(pidFile)).trim());
      Deno.kill(pid, "SIGTERM");
      // The daemon is not our child: poll for its socket to go, bounded.
      for (let i = 0; i < 100 && exists(sock); i++) await new Promise((r) => setTimeout(r, 50));
      await new Promise((r) => setTimeout(r, 200));
      results[kind] = { socketLeft: exists(sock), pidFileLeft: exists(pidFile) };
    }
    assert.deepEqual(results["denbd"], results["qemu-nbd"]);
    assert.equal(results["denbd"]!.socketLeft, false);
  });
});
