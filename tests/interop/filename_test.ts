/**
 * qemu's filename syntax, differential against qemu-nbd: `file:`, `json:{...}` with nested
 * `file` objects, `null-co://`/`null-aio://` and `--image-opts driver=null-co,...`. For every
 * form both servers serve the same image side by side and must give identical `nbdinfo --json`
 * flags and sizes, `nbdinfo --map`, data (`qemu-img compare` of the two exports) and probe
 * warnings; malformed forms must fail with qemu-nbd's exit code and message.
 */

import assert from "node:assert/strict";
import { MiB, run, runOk, Server, serverArgv, type ServerKind, withTempDir } from "./_harness.ts";
import { compareServers, makeRawAndQcow2 } from "./_differential.ts";

function makeImages(dir: string): Promise<{ raw: string; qcow2: string }> {
  return makeRawAndQcow2(dir, 4 * MiB, [
    { offset: 0, length: 64 * 1024, fill: "random", seed: 3 },
    { offset: 2 * MiB, length: 128 * 1024, fill: 0x11 },
  ]);
}

Deno.test("filename: file:PATH, probed and with -f, raw and qcow2, as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const { raw, qcow2 } = await makeImages(dir);
    await compareServers(dir, () => [`file:${raw}`]);
    await compareServers(dir, () => ["-f", "raw", `file:${raw}`]);
    const view = await compareServers(dir, () => ["-f", "qcow2", `file:${qcow2}`]);
    assert.equal(view["export-size"], 4 * MiB);
    await compareServers(dir, () => [`file:${qcow2}`]);
    // qemu warns about a probed raw image only when it may write it (not under -r or -s).
    await compareServers(dir, () => ["-r", `file:${raw}`]);
    await compareServers(dir, () => ["-r", raw]);
    await compareServers(dir, () => ["-s", raw]);
  });
});

Deno.test("filename: json: with nested file objects and dotted keys, as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const { raw, qcow2 } = await makeImages(dir);
    const forms = [
      { driver: "qcow2", file: { driver: "file", filename: qcow2 } },
      { driver: "raw", file: { filename: raw }, offset: 65536, size: 1048576 },
      { "driver": "raw", "file.driver": "file", "file.filename": raw },
      { file: { driver: "file", filename: qcow2 } },
      { driver: "file", filename: raw },
    ];
    for (const f of forms) {
      await compareServers(dir, () => ["-r", `json:${JSON.stringify(f)}`]);
    }
    // A json: image under -f: the format given wins, as in qemu.
    await compareServers(
      dir,
      () => ["-f", "raw", `json:${JSON.stringify({ file: { filename: raw } })}`],
    );
  });
});

Deno.test("filename: null-co:// and null-aio:// with qemu's defaults and options", async () => {
  await withTempDir(async (dir) => {
    const probed = await compareServers(dir, () => ["null-co://"]);
    assert.equal(probed["export-size"], 1 << 30);
    assert.equal(probed["block_size_minimum"], 512);
    await compareServers(dir, () => ["-f", "raw", "null-aio://"]);
    await compareServers(dir, () => ["--image-opts", "driver=null-co,size=1M"]);
    const zeroes = await compareServers(dir, () => [
      "--image-opts",
      "driver=null-co,size=3M,read-zeroes=on",
    ]);
    assert.match(String(zeroes["map"]), /hole,zero/);
    await compareServers(dir, () => [`json:${JSON.stringify({ driver: "null-co", size: 12345 })}`]);
  });
});

Deno.test("filename: writes through file: and json: reach the image", async () => {
  await withTempDir(async (dir) => {
    const { qcow2 } = await makeImages(dir);
    const server = await Server.start({
      dir,
      args: ["-t", `json:${JSON.stringify({ driver: "qcow2", file: { filename: qcow2 } })}`],
    });
    try {
      await runOk(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", server.uri]);
    } finally {
      await server.stop();
    }
    const r = await runOk(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k", qcow2]);
    assert.match(r.stdout, /read 65536\/65536 bytes/);
    await runOk(["qemu-img", "check", "-q", qcow2]);
  });
});

Deno.test("filename: malformed forms fail with qemu-nbd's exit code and message", async () => {
  await withTempDir(async (dir) => {
    const { raw } = await makeImages(dir);
    const cases: string[][] = [
      ["foo://x"],
      ["foo:bar"],
      ['json:{"driver":"bogus"}'],
      ["json:[]"],
      ["file:/nonexistent/x"],
      ["null-co://x"],
      ["--image-opts", "driver=null-co,bogus=1"],
      [`json:${JSON.stringify({ driver: "raw", file: { driver: "file", filename: "/nope" } })}`],
      [`json:${JSON.stringify({ driver: "qcow2", file: { driver: "null-co" } })}`],
      [`json:${JSON.stringify({ driver: "raw", file: { driver: "bogus", filename: raw } })}`],
      ["-f", "bogus", raw],
      ["--image-opts", ""],
    ];
    for (const c of cases) {
      const argv = (
        kind: ServerKind,
      ) => [...serverArgv(kind), "-k", `${dir}/${kind}-bad.sock`, ...c];
      const [want, have] = [await run(argv("qemu-nbd")), await run(argv("denbd"))];
      assert.equal(want.code, 1, want.stderr);
      assert.equal(have.code, want.code, `${c.join(" ")}: ${have.stderr}`);
      assert.equal(have.stderr.replace(/^denbd: /, "qemu-nbd: "), want.stderr, c.join(" "));
    }
    // Malformed JSON: qemu's parser words the detail its own way; the frame is the same.
    const bad = await run([...serverArgv("denbd"), "-k", `${dir}/j.sock`, "json:{bad"]);
    assert.equal(bad.code, 1);
    assert.match(
      bad.stderr,
      /^denbd: Failed to blk_new_open 'json:\{bad': Could not parse the JSON options: /,
    );
  });
});
