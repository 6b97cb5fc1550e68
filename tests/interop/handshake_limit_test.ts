// --handshake-limit: a client that never finishes negotiating is dropped after the limit, and the
// server keeps serving others. (qemu-nbd 7.2 hard-codes 10 s and has no option, so this runs
// against denbd only.)
import assert from "node:assert/strict";
import {
  closeQuietly,
  makeDenseImage,
  MiB,
  readWithTimeout,
  runOk,
  Server,
  withTempDir,
} from "./_harness.ts";

Deno.test({
  name: "handshake limit: an idle client is dropped after N seconds, others keep working",
  ignore: Deno.env.get("DENBD_TEST_SERVER") === "qemu-nbd",
  fn: () =>
    withTempDir(async (dir) => {
      const image = `${dir}/disk.img`;
      await makeDenseImage(image, MiB);
      const server = await Server.start({
        dir,
        image,
        args: ["-f", "raw", "-t", "-e", "0", "--handshake-limit=1"],
        kind: "denbd",
      });
      try {
        const idle = await Deno.connect({ transport: "unix", path: server.socketPath! });
        try {
          const greeting = await readWithTimeout(idle, 18, 2000);
          assert.ok(greeting !== null && greeting.length === 18, "greeting received");
          const started = Date.now();
          // Send nothing more: the server must close the connection (EOF) after ~1 s.
          const more = await readWithTimeout(idle, 1, 5000);
          const waited = Date.now() - started;
          assert.equal(more, null, "connection closed by the server");
          assert.ok(waited >= 800 && waited < 4000, `closed after ${waited} ms`);
        } finally {
          closeQuietly(idle);
        }
        const info = await runOk(["nbdinfo", "--size", server.uri]);
        assert.equal(info.stdout.trim(), String(MiB));
      } finally {
        await server.stop();
      }
    }),
});
