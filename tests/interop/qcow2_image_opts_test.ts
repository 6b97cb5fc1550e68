// --image-opts backing.* on qcow2: replacing the backing file, dropping it (`backing=`), and the
// refusal of a node reference (`backing=null`), compared with qemu-nbd on the same images.
import assert from "node:assert/strict";
import { DENBD_MAIN, DENBD_PERMS, run, runOk, withServers, withTempDir } from "./_harness.ts";

async function qemuIo(args: string[]): Promise<void> {
  await runOk(["qemu-io", ...args]);
}

async function observe(uri: string, dir: string, tag: string): Promise<string> {
  const depth = await runOk(["nbdinfo", "--map=qemu:allocation-depth", uri]);
  const map = await runOk(["nbdinfo", "--map", uri]);
  const out = `${dir}/${tag}.raw`;
  await runOk(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out]);
  const sum = await runOk(["sha256sum", out]);
  return `${depth.stdout}\n${map.stdout}\n${sum.stdout.split(" ")[0]}`;
}

Deno.test("qcow2 --image-opts backing.* matches qemu-nbd", () =>
  withTempDir(async (dir) => {
    await runOk(["qemu-img", "create", "-q", "-f", "qcow2", `${dir}/base.qcow2`, "8M"]);
    await qemuIo(["-f", "qcow2", "-c", "write -P 0xaa 0 1M", `${dir}/base.qcow2`]);
    await runOk([
      "qemu-img",
      "create",
      "-q",
      "-f",
      "qcow2",
      "-b",
      "base.qcow2",
      "-F",
      "qcow2",
      `${dir}/top.qcow2`,
    ]);
    await qemuIo(["-f", "qcow2", "-c", "write -P 0xcc 2M 512k", `${dir}/top.qcow2`]);
    await runOk(["qemu-img", "create", "-q", "-f", "qcow2", `${dir}/alt.qcow2`, "8M"]);
    await qemuIo(["-f", "qcow2", "-c", "write -P 0x77 0 3M", `${dir}/alt.qcow2`]);
    const rawBacking = `${dir}/alt.raw`;
    await Deno.writeFile(rawBacking, new Uint8Array(8 * 1024 * 1024).fill(0x55));

    const variants = [
      `driver=qcow2,file.filename=${dir}/top.qcow2,backing.file.filename=${dir}/alt.qcow2,backing.driver=qcow2`,
      `driver=qcow2,file.driver=file,file.filename=${dir}/top.qcow2,backing.driver=raw,backing.file.filename=${rawBacking}`,
      `driver=qcow2,file.filename=${dir}/top.qcow2,backing=`,
    ];
    for (const [i, opts] of variants.entries()) {
      const args = ["-r", "-A", "-t", "--image-opts", opts];
      await withServers(
        [{ dir, args, kind: "denbd" }, { dir, args, kind: "qemu-nbd" }],
        async ([denbd, qemu]) => {
          const [d, q] = await Promise.all([
            observe(denbd!.uri, dir, `d${i}`),
            observe(qemu!.uri, dir, `q${i}`),
          ]);
          assert.equal(d, q, opts);
        },
      );
    }
    // A backing file replaced by a different one really changes what is read.
    // (alt has 0x77 where base has 0xaa, so the first variant differs from the plain image.)
    await withServers([{
      dir,
      image: `${dir}/top.qcow2`,
      args: ["-r", "-t", "-f", "qcow2"],
      kind: "denbd",
    }], async ([plain]) => {
      const p = await runOk(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xaa 0 4k", plain!.uri]);
      assert.match(p.stdout, /read 4096\/4096/);
    });

    // backing=null names a block node: both refuse to start, with the same reason.
    const bad = `driver=qcow2,file.filename=${dir}/top.qcow2,backing=null`;
    const d = await run([
      Deno.execPath(),
      "run",
      ...DENBD_PERMS,
      DENBD_MAIN,
      "-r",
      "-k",
      `${dir}/x.sock`,
      "--image-opts",
      bad,
    ], { timeoutMs: 10000 });
    const q = await run(["qemu-nbd", "-r", "-k", `${dir}/y.sock`, "--image-opts", bad], {
      timeoutMs: 10000,
    });
    assert.notEqual(d.code, 0);
    assert.notEqual(q.code, 0);
    for (const r of [d, q]) {
      assert.match(r.stderr, /Cannot find device='null' nor node-name='null'/);
    }
  }));
