/**
 * Server lifecycle and command-line behaviour: exit after the last client without -t, the -e
 * connection limit, --pid-file, a missing image, -o and --image-opts offset/size, size rounding,
 * format probing, and --detect-zeroes.
 */

import assert from "node:assert/strict";
import {
  makeSparseImage,
  MiB,
  patternBytes,
  readWithTimeout,
  run,
  runOk,
  Server,
  SERVER_KIND,
  serverArgv,
  sleep,
  withServer,
  withTempDir,
} from "./_harness.ts";
import { RawConn, rawConnect } from "./_nbd_raw.ts";

interface MapEntry {
  start: number;
  length: number;
  zero: boolean;
  data: boolean;
}

Deno.test("lifecycle: without -t the server exits with 0 after the last client disconnects", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, MiB);
    const server = await Server.start({ dir, image, args: ["-f", "raw"] });
    try {
      // The readiness probe did not negotiate, so the server must still be there.
      await sleep(200);
      assert.ok(server.running, "a probe that never negotiated must not end the server");
      await runOk(["nbdinfo", "--size", server.uri]);
      const s = await server.waitExit(5000);
      assert.ok(s !== undefined, "server still running 5 s after its only client left");
      assert.equal(s.code, 0, server.stderr);
      assert.equal(s.success, true);
    } finally {
      await server.stop();
    }
  });
});

Deno.test("lifecycle: with -t the server stays up after clients disconnect", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, MiB);
    await withServer({ dir, image, args: ["-f", "raw", "-t"] }, async (server) => {
      await runOk(["nbdinfo", "--size", server.uri]);
      assert.equal(await server.waitExit(500), undefined);
      assert.equal((await runOk(["nbdinfo", "--size", server.uri])).stdout.trim(), String(MiB));
    });
  });
});

Deno.test("lifecycle: -e 2 serves two clients at once and makes the third wait", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, MiB, [{ offset: 0, length: 4096, fill: 0x3c }]);
    await withServer({ dir, image, args: ["-f", "raw", "-t", "-e", "2"] }, async (server) => {
      const conns: RawConn[] = [];
      try {
        for (let i = 0; i < 2; i++) {
          const c = await rawConnect(server);
          conns.push(c);
          await c.negotiate();
        }
        // The third connection is accepted by the kernel (backlog) but gets no greeting.
        const third = await server.connect();
        try {
          let greeted: Uint8Array | null = null;
          try {
            greeted = await readWithTimeout(third, 8, 700);
          } catch { /* timed out: expected, and the helper closed `third` */ }
          assert.equal(greeted, null, "third client was greeted while two were connected");
        } finally {
          try {
            third.close();
          } catch { /* closed by the timeout */ }
        }
        // When one leaves, a new client gets in.
        conns.shift()!.close();
        const fourth = await rawConnect(server);
        conns.push(fourth);
        fourth.timeoutMs = 5000;
        await fourth.negotiate();
        assert.equal((await fourth.read(0, 4))[0], 0x3c);
      } finally {
        for (const c of conns) c.close();
      }
    });
  });
});

Deno.test("lifecycle: --pid-file holds the server's pid", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, MiB);
    const pidFile = `${dir}/server.pid`;
    await withServer(
      { dir, image, args: ["-f", "raw", "-t", "--pid-file", pidFile] },
      async (server) => {
        const text = await Deno.readTextFile(pidFile);
        assert.equal(text.trim(), String(server.pid));
      },
    );
  });
});

Deno.test("lifecycle: a missing image → non-zero exit and a message naming the file", async () => {
  await withTempDir(async (dir) => {
    const missing = `${dir}/no-such-image.img`;
    const r = await run([...serverArgv(SERVER_KIND), "-f", "raw", "-k", `${dir}/s.sock`, missing], {
      timeoutMs: 10_000,
    });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /no-such-image\.img/);
  });
});

Deno.test("lifecycle: -o OFFSET serves the file from that offset", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, 3 * MiB, [{ offset: MiB, length: MiB, fill: "random", seed: 4 }]);
    const want = patternBytes(MiB, 4);
    await withServer(
      { dir, image, args: ["-f", "raw", "-t", "-o", String(MiB)] },
      async (server) => {
        assert.equal(
          (await runOk(["nbdinfo", "--size", server.uri])).stdout.trim(),
          String(2 * MiB),
        );
        const c = await rawConnect(server);
        try {
          await c.negotiate();
          assert.deepEqual(await c.read(0, 4096), want.subarray(0, 4096));
          assert.deepEqual(
            await c.read(MiB - 512, 1024),
            new Uint8Array([...want.subarray(MiB - 512), ...new Uint8Array(512)]),
          );
          // A write lands at file offset OFFSET + 0.
          await c.request({ type: 1, offset: 0, length: 4, payload: new Uint8Array([1, 2, 3, 4]) });
          assert.equal((await c.reply()).kind === "simple", true);
        } finally {
          c.close();
        }
      },
    );
    const f = await Deno.readFile(image);
    assert.deepEqual(f.subarray(MiB, MiB + 4), new Uint8Array([1, 2, 3, 4]));
    assert.deepEqual(f.subarray(0, 4), new Uint8Array(4));
  });
});

Deno.test("lifecycle: --image-opts driver=raw,file.filename=F,offset=N,size=M", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, 3 * MiB, [{ offset: MiB, length: MiB, fill: "random", seed: 8 }]);
    const want = patternBytes(MiB, 8);
    await withServer(
      {
        dir,
        args: [
          "-t",
          "--image-opts",
          `driver=raw,file.filename=${image},offset=${MiB + 4096},size=65536`,
        ],
      },
      async (server) => {
        assert.equal((await runOk(["nbdinfo", "--size", server.uri])).stdout.trim(), "65536");
        const c = await rawConnect(server);
        try {
          await c.negotiate();
          assert.deepEqual(await c.read(0, 65536), want.subarray(4096, 4096 + 65536));
          await c.request({ type: 0, offset: 65536 - 512, length: 1024, cookie: 3n });
          assert.deepEqual(await c.reply(), { kind: "simple", error: 22, cookie: 3n });
        } finally {
          c.close();
        }
      },
    );
  });
});

Deno.test("lifecycle: a 1000-byte raw file is exported as 1024 bytes, the tail reads as zero", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/small.img`;
    await Deno.writeFile(image, new Uint8Array(1000).fill(0x78));
    await withServer({ dir, image, args: ["-f", "raw", "-t"] }, async (server) => {
      assert.equal((await runOk(["nbdinfo", "--size", server.uri])).stdout.trim(), "1024");
      const c = await rawConnect(server);
      try {
        await c.negotiate();
        const d = await c.read(0, 1024);
        assert.deepEqual(d.subarray(0, 1000), new Uint8Array(1000).fill(0x78));
        assert.deepEqual(d.subarray(1000), new Uint8Array(24));
      } finally {
        c.close();
      }
    });
    assert.equal((await Deno.stat(image)).size, 1000, "serving must not resize the file");
  });
});

Deno.test("lifecycle: a format-probed raw image (no -f) advertises minimum block 512 and warns", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/probed.img`;
    await makeSparseImage(image, MiB);
    await withServer({ dir, image, args: ["-t"] }, async (server) => {
      const info = JSON.parse((await runOk(["nbdinfo", "--json", server.uri])).stdout);
      assert.equal(info.exports[0].block_size_minimum, 512);
      assert.match(server.stderr, /probed|probing/i);
    });
  });
});

async function zeroWriteMap(dir: string, detectZeroes: string | undefined): Promise<MapEntry> {
  const image = `${dir}/dz-${detectZeroes ?? "default"}.img`;
  await makeSparseImage(image, 2 * MiB, [{ offset: 0, length: MiB, fill: 0x11 }]);
  const args = ["-f", "raw", "-t", ...(detectZeroes ? [`--detect-zeroes=${detectZeroes}`] : [])];
  return await withServer({ dir, image, args }, async (server) => {
    await runOk(["qemu-io", "-f", "raw", "-c", "write -P 0 64k 64k", server.uri]);
    await runOk([
      "qemu-io",
      "-f",
      "raw",
      "-c",
      "read -P 0 64k 64k",
      "-c",
      "read -P 0x11 0 64k",
      server.uri,
    ]);
    const map: MapEntry[] = JSON.parse(
      (await runOk(["qemu-img", "map", "--output=json", "-f", "raw", server.uri])).stdout,
    );
    const e = map.find((m) => m.start <= 65536 && 65536 < m.start + m.length);
    assert.ok(e, JSON.stringify(map));
    return e;
  });
}

Deno.test("lifecycle: --detect-zeroes=on turns all-zero writes into zero writes (map shows zero)", async () => {
  await withTempDir(async (dir) => {
    const [on, off] = await Promise.all([zeroWriteMap(dir, "on"), zeroWriteMap(dir, undefined)]);
    assert.deepEqual([on.start, on.length, on.zero, on.data], [65536, 65536, true, false]);
    assert.deepEqual([off.zero, off.data], [false, true]);
  });
});

Deno.test("lifecycle: SIGTERM → exit code 0 and the unix socket file is removed", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, MiB);
    const server = await Server.start({ dir, image, args: ["-f", "raw", "-t"] });
    const status = await server.stop();
    assert.equal(status.code, 0, server.stderr);
    assert.equal(status.signal, null);
    await assert.rejects(Deno.stat(server.socketPath!), Deno.errors.NotFound);
  });
});

Deno.test("lifecycle: --fork returns once the server accepts, and the daemon serves", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, MiB, [{ offset: 0, length: 512, fill: 0x61 }]);
    const sock = `${dir}/fork.sock`;
    const pidFile = `${dir}/fork.pid`;
    const r = await run(
      [
        ...serverArgv(SERVER_KIND),
        "-f",
        "raw",
        "-t",
        "-k",
        sock,
        "--fork",
        "--pid-file",
        pidFile,
        image,
      ],
      { timeoutMs: 10_000 },
    );
    let pid: number | undefined;
    try {
      pid = Number((await Deno.readTextFile(pidFile).catch(() => "")).trim()) || undefined;
      assert.ok(pid !== undefined && Number.isInteger(pid) && pid > 1, `pid file: ${pid}`);
      assert.equal(r.code, 0, r.stderr);
      // No waiting: the parent returned only after the socket was listening.
      const info = await runOk(["nbdinfo", "--size", `nbd+unix:///?socket=${sock}`]);
      assert.equal(info.stdout.trim(), String(MiB));
      // qemu-nbd's daemon points its stdio at /dev/null, so `qemu-nbd --fork … | cat` returns.
      assert.equal(r.pipesHeldOpen, false, "the daemon kept the caller's stdout/stderr open");
    } finally {
      if (pid !== undefined && pid > 1) {
        try {
          Deno.kill(pid, "SIGTERM");
        } catch { /* already gone */ }
        // Bounded wait for the daemon (not our child, so no status to await) to go away.
        for (let i = 0; i < 100; i++) {
          // Gone, or a zombie nobody reaps yet (the daemon is not our child).
          const stat = await Deno.readTextFile(`/proc/${pid}/stat`).catch(() => "");
          if (stat === "" || / Z /.test(stat.slice(stat.lastIndexOf(")")))) break;
          await sleep(30);
        }
      }
    }
  });
});
