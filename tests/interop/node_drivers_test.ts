/**
 * The nbd, http(s), compress and copy-on-read drivers through the command line, differential
 * against qemu-nbd: the same filename or --image-opts given to both servers must give identical
 * `nbdinfo --json` flags and sizes, `nbdinfo --map` and data; writes through an NBD proxy must
 * reach the origin; images built through `driver=compress` or read through `copy-on-read` must
 * come out as qemu-nbd leaves them.
 */

import assert from "node:assert/strict";
import { MiB, run, runOk, Server, serverArgv, type ServerKind, withTempDir } from "./_harness.ts";
import { startNginx } from "./_nginx.ts";
import { compareServers, describeExport, makeRawAndQcow2 } from "./_differential.ts";

function makeImages(dir: string): Promise<{ raw: string; qcow2: string }> {
  return makeRawAndQcow2(dir, 8 * MiB, [
    { offset: 0, length: 192 * 1024, fill: "random", seed: 5 },
    { offset: 3 * MiB, length: 64 * 1024, fill: 0x22 },
    { offset: 6 * MiB, length: MiB, fill: "random", seed: 6 },
  ]);
}

/** An origin server for the proxies: its unix socket URI in every filename form. */
function forms(sock: string): string[][] {
  return [
    [`nbd+unix:///?socket=${sock}`],
    ["-f", "raw", `nbd:unix:${sock}`],
    ["--image-opts", `driver=nbd,server.type=unix,server.path=${sock}`],
    [`json:${JSON.stringify({ driver: "raw", file: { driver: "nbd", path: sock } })}`],
  ];
}

for (const origin of ["qemu-nbd", "denbd"] as const) {
  Deno.test(`nbd driver: both servers re-exporting ${origin} look the same, in every filename form`, async () => {
    await withTempDir(async (dir) => {
      const { qcow2 } = await makeImages(dir);
      const o = await Server.start({
        dir,
        kind: origin,
        image: qcow2,
        args: ["-t", "-e", "0", "-f", "qcow2", "-r"],
      });
      try {
        for (const f of forms(o.socketPath!)) await compareServers(dir, () => ["-r", ...f]);
      } finally {
        await o.stop();
      }
    });
  });
}

for (const origin of ["qemu-nbd", "denbd"] as const) {
  Deno.test(`nbd driver: writes, zeroes and trims through a proxy reach a ${origin} origin; qemu-nbd in front of the proxy`, async () => {
    await withTempDir(async (dir) => {
      const { raw } = await makeImages(dir);
      const o = await Server.start({
        dir,
        kind: origin,
        image: raw,
        args: ["-t", "-e", "0", "-f", "raw"],
      });
      try {
        const proxy = await Server.start({
          dir,
          kind: "denbd",
          args: ["-t", "-f", "raw", "--discard=unmap", `nbd+unix:///?socket=${o.socketPath}`],
        });
        try {
          await runOk([
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x77 1M 128k",
            "-c",
            "write -z 6M 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "flush",
            proxy.uri,
          ]);
          // Probed writable proxies warn with qemu's rebuilt node name, whatever the form.
          for (const f of forms(o.socketPath!)) await compareServers(dir, () => f);
          // Seen at the origin, by a client of the origin, ...
          const r = await runOk([
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read -P 0x77 1M 128k",
            "-c",
            "read -P 0 6M 64k",
            o.uri,
          ]);
          assert.doesNotMatch(r.stdout, /Pattern verification failed/);
          // ... and a qemu-nbd in front of the denbd proxy sees the same.
          const front = await Server.start({
            dir,
            kind: "qemu-nbd",
            args: ["-t", "-f", "raw", "-r", `nbd+unix:///?socket=${proxy.socketPath}`],
          });
          try {
            const cmp = await run([
              "qemu-img",
              "compare",
              "-f",
              "raw",
              "-F",
              "raw",
              front.uri,
              o.uri,
            ]);
            assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
            assert.equal(
              (await describeExport(front.uri))["map"],
              (await describeExport(o.uri))["map"],
            );
          } finally {
            await front.stop();
          }
        } finally {
          await proxy.stop();
        }
      } finally {
        await o.stop();
      }
    });
  });
}

Deno.test("nbd driver: -f qcow2 over an NBD export of the qcow2 file, as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const { qcow2 } = await makeImages(dir);
    const o = await Server.start({
      dir,
      kind: "qemu-nbd",
      image: qcow2,
      args: ["-t", "-e", "0", "-f", "raw", "-r"],
    });
    try {
      await compareServers(dir, () => ["-r", "-f", "qcow2", `nbd+unix:///?socket=${o.socketPath}`]);
      // Probed: the qcow2 magic is found over NBD too.
      await compareServers(dir, () => ["-r", `nbd+unix:///?socket=${o.socketPath}`]);
    } finally {
      await o.stop();
    }
  });
});

Deno.test("nbd driver: an unreachable origin, or one that goes away, fails cleanly", async () => {
  await withTempDir(async (dir) => {
    for (const name of [`nbd+unix:///?socket=${dir}/none.sock`, "nbd://127.0.0.1:1/x"]) {
      const argv = (k: ServerKind) => [...serverArgv(k), "-k", `${dir}/${k}.sock`, name];
      const [want, have] = [await run(argv("qemu-nbd")), await run(argv("denbd"))];
      assert.equal(have.code, want.code);
      assert.equal(have.stderr.replace(/^denbd:/, "qemu-nbd:"), want.stderr);
    }
    const { raw } = await makeImages(dir);
    const o = await Server.start({ dir, kind: "qemu-nbd", image: raw, args: ["-t", "-f", "raw"] });
    const proxy = await Server.start({
      dir,
      kind: "denbd",
      args: ["-t", "-e", "0", "-f", "raw", `nbd+unix:///?socket=${o.socketPath}`],
    });
    try {
      await o.stop();
      // The proxy answers with an error instead of hanging, and keeps serving other clients.
      const r = await run(["qemu-io", "-f", "raw", "-c", "read 0 64k", proxy.uri], {
        timeoutMs: 15_000,
      });
      assert.match(r.stdout + r.stderr, /Input\/output error/);
      assert.equal((await runOk(["nbdinfo", "--size", proxy.uri])).stdout.trim(), String(8 * MiB));
    } finally {
      await proxy.stop();
      await o.stop();
    }
  });
});

Deno.test("http driver: raw and qcow2 images from a real nginx, as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    await makeImages(dir);
    const nginx = await startNginx({ root: dir, tls: true });
    try {
      await compareServers(dir, () => ["-r", nginx.url("/disk.img")]);
      await compareServers(dir, () => ["-r", "-f", "qcow2", nginx.url("/disk.qcow2")]);
      await compareServers(dir, () => ["-r", nginx.url("/disk.qcow2")]);
      await compareServers(dir, () => [
        "-r",
        "--image-opts",
        `driver=qcow2,file.driver=https,file.url=${
          nginx.tlsUrl("/disk.qcow2")
        },file.sslverify=off,file.readahead=1M`,
      ]);
      // Without -r both refuse (curl is read-only), with the same words.
      const argv = (
        k: ServerKind,
      ) => [...serverArgv(k), "-k", `${dir}/${k}-w.sock`, nginx.url("/disk.img")];
      const [want, have] = [await run(argv("qemu-nbd")), await run(argv("denbd"))];
      assert.equal(want.code, 1);
      assert.equal(have.code, 1);
      assert.equal(have.stderr.replace(/^denbd:/, "qemu-nbd:"), want.stderr);
    } finally {
      await nginx.stop();
    }
  });
});

/** Compressed clusters and the check verdict of a qcow2 file. */
async function checkInfo(path: string): Promise<{ compressed: number; allocated: number }> {
  const c = JSON.parse((await runOk(["qemu-img", "check", "--output=json", path])).stdout);
  assert.equal(c["check-errors"], 0);
  assert.equal(c["corruptions"] ?? 0, 0);
  return { compressed: c["compressed-clusters"], allocated: c["allocated-clusters"] };
}

Deno.test("compress filter: nbdcopy into driver=compress builds the same compressed qcow2 as qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const { raw } = await makeImages(dir);
    const result: Record<string, { compressed: number; allocated: number }> = {};
    for (const kind of ["qemu-nbd", "denbd"] as const) {
      const out = `${dir}/out-${kind}.qcow2`;
      await runOk(["qemu-img", "create", "-q", "-f", "qcow2", out, "8M"]);
      const s = await Server.start({
        dir,
        kind,
        args: ["-t", "--image-opts", `driver=compress,file.driver=qcow2,file.file.filename=${out}`],
      });
      try {
        await runOk(["nbdcopy", raw, s.uri]);
        const info = await describeExport(s.uri);
        assert.equal(info["block_size_minimum"], 65536);
      } finally {
        await s.stop();
      }
      const cmp = await run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, out]);
      assert.equal(cmp.code, 0, cmp.stdout);
      result[kind] = await checkInfo(out);
    }
    assert.deepEqual(result["denbd"], result["qemu-nbd"]);
    assert.ok(result["denbd"]!.compressed > 0);
    // Misuse gets qemu-nbd's words.
    const argv = (k: ServerKind) => [
      ...serverArgv(k),
      "-k",
      `${dir}/${k}-c.sock`,
      "--image-opts",
      `driver=compress,file.driver=raw,file.file.filename=${raw}`,
    ];
    const [want, have] = [await run(argv("qemu-nbd")), await run(argv("denbd"))];
    assert.equal(have.code, want.code);
    assert.equal(have.stderr.replace(/^denbd:/, "qemu-nbd:"), want.stderr);
  });
});

Deno.test("copy-on-read filter: reads pull backing data into the top image as qemu-nbd does", async () => {
  await withTempDir(async (dir) => {
    const { qcow2 } = await makeImages(dir);
    const maps: Record<string, string> = {};
    for (const kind of ["qemu-nbd", "denbd"] as const) {
      const top = `${dir}/top-${kind}.qcow2`;
      await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-b", qcow2, "-F", "qcow2", top]);
      const s = await Server.start({
        dir,
        kind,
        args: [
          "-t",
          "--image-opts",
          `driver=copy-on-read,file.driver=qcow2,file.file.filename=${top}`,
        ],
      });
      try {
        await runOk(["qemu-io", "-f", "raw", "-c", "read 0 128k", "-c", "read 6M 512k", s.uri]);
      } finally {
        await s.stop();
      }
      await runOk(["qemu-img", "check", "-q", top]);
      const m = JSON.parse((await runOk(["qemu-img", "map", "--output=json", top])).stdout) as {
        start: number;
        length: number;
        depth: number;
        data: boolean;
      }[];
      maps[kind] = JSON.stringify(m.map((e) => [e.start, e.length, e.depth, e.data]));
      const cmp = await run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", top, qcow2]);
      assert.equal(cmp.code, 0);
    }
    assert.equal(maps["denbd"], maps["qemu-nbd"]);
    assert.match(maps["denbd"]!, /\[0,131072,0,true\]/);
  });
});

Deno.test("backing files named by protocol (nbd://, http://, json:) open as qemu-nbd opens them", async () => {
  await withTempDir(async (dir) => {
    const { raw, qcow2 } = await makeImages(dir);
    const o = await Server.start({
      dir,
      kind: "qemu-nbd",
      image: raw,
      args: ["-t", "-e", "0", "-f", "raw", "-r"],
    });
    const nginx = await startNginx({ root: dir });
    try {
      const bases: [string, string][] = [
        [`nbd+unix:///?socket=${o.socketPath}`, "raw"],
        [nginx.url("/disk.qcow2"), "qcow2"],
        [`json:${JSON.stringify({ driver: "qcow2", file: { filename: qcow2 } })}`, "qcow2"],
      ];
      for (const [i, [base, fmt]] of bases.entries()) {
        const top = `${dir}/top${i}.qcow2`;
        await runOk([
          "qemu-img",
          "create",
          "-q",
          "-f",
          "qcow2",
          "-u",
          "-b",
          base,
          "-F",
          fmt,
          top,
          "8M",
        ]);
        await runOk(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 2M 64k", top]);
        await compareServers(dir, () => ["-r", "-f", "qcow2", top]);
      }
    } finally {
      await nginx.stop();
      await o.stop();
    }
  });
});

Deno.test("NBD_CMD_CACHE on a qcow2 image with a backing file copies into the top image, as qemu-nbd (EPERM with -r)", async () => {
  await withTempDir(async (dir) => {
    const { qcow2 } = await makeImages(dir);
    const results: Record<string, string> = {};
    for (const kind of ["qemu-nbd", "denbd"] as const) {
      for (const args of [[], ["-r"], ["-s"]]) {
        const top = `${dir}/cache-${kind}.qcow2`;
        await runOk(["qemu-img", "create", "-q", "-f", "qcow2", "-b", qcow2, "-F", "qcow2", top]);
        const s = await Server.start({ dir, kind, args: ["-t", "-f", "qcow2", ...args, top] });
        let answer: string;
        try {
          const r = await run([
            "/usr/bin/python3",
            "-c",
            "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n" +
            "try:\n  h.cache(196608, 0); h.cache(65536, 6291456); print('ok')\n" +
            "except nbd.Error as e: print(e.errnum)",
            s.uri,
          ]);
          answer = r.stdout.trim();
        } finally {
          await s.stop();
        }
        const m = JSON.parse((await runOk(["qemu-img", "map", "--output=json", top])).stdout) as {
          start: number;
          length: number;
          depth: number;
        }[];
        results[`${kind} ${args.join(" ")}`] = `${answer} ${
          JSON.stringify(m.map((e) => [e.start, e.length, e.depth]))
        }`;
      }
    }
    for (const args of ["", "-r", "-s"]) {
      assert.equal(results[`denbd ${args}`], results[`qemu-nbd ${args}`], args);
    }
    assert.match(results["denbd "]!, /^ok \[\[0,196608,0\]/);
    assert.match(results["denbd -r"]!, /^1 /);
  });
});
