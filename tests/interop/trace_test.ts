/**
 * -T/--trace and -v against the real qemu-nbd 7.2: `-T help` output, the negotiation trace of
 * an nbdinfo connection, and what both servers write to stderr with -v, in the foreground and
 * under --fork, for a normal connection and for clients that fail negotiation or send requests
 * qemu-nbd drops them for. denbd runs with DENBD_PROGNAME=qemu-nbd so the prefixes compare.
 *
 * Servers are started without the harness's readiness probe: that probe connects and hangs up
 * during the greeting, which both servers report ("Failed to read flags: ..."), worded after a
 * race between EOF and a reset. The tests wait for the socket file instead.
 *
 * @module
 */

import assert from "node:assert/strict";
import { rawConnect } from "./_nbd_raw.ts";
import {
  makeSparseImage,
  MiB,
  run,
  runOk,
  Server,
  serverArgv,
  type ServerKind,
  sleep,
  withTempDir,
} from "./_harness.ts";

const KINDS: readonly ServerKind[] = ["qemu-nbd", "denbd"];
const ENV = { DENBD_PROGNAME: "qemu-nbd" };

/** Start a server and wait (bounded) for its unix socket to appear. */
async function startServer(kind: ServerKind, dir: string, args: string[]): Promise<Server> {
  const s = await Server.start({
    kind,
    dir,
    image: `${dir}/img.raw`,
    args,
    waitReady: false,
    env: ENV,
  });
  for (let i = 0; i < 400; i++) {
    try {
      if (Deno.statSync(s.socketPath!).isSocket) return s;
    } catch { /* not yet */ }
    if (s.exitStatus !== undefined) break;
    await sleep(25);
  }
  await s.stop();
  throw new Error(`${kind} did not create its socket: ${s.stderr}`);
}

/** The stderr a server wrote while `fn` drove it, after it stopped. */
async function stderrOf(
  kind: ServerKind,
  dir: string,
  args: string[],
  fn: (s: Server) => Promise<void>,
): Promise<string> {
  const s = await startServer(kind, dir, args);
  try {
    await fn(s);
    await sleep(300); // let the server finish reporting the last client
  } finally {
    await s.stop();
  }
  return s.stderr;
}

const NBD_OPT_EXPORT_NAME = 1;

/** Clients qemu-nbd reports on (and ones it does not), one after another. */
async function badClients(s: Server): Promise<void> {
  await run(["nbdinfo", s.uri]); // fine: nothing to say
  await run(["nbdinfo", s.uriFor("nope")]); // ERR_UNKNOWN, then ABORT: nothing to say
  { // unknown export with old-style EXPORT_NAME: negotiation fails
    const c = await rawConnect(s);
    await c.handshake();
    await c.sendOption(NBD_OPT_EXPORT_NAME, new TextEncoder().encode("nope"));
    await c.waitClosed();
    c.close();
  }
  { // garbage where an option header belongs
    const c = await rawConnect(s);
    await c.handshake();
    await c.write(new Uint8Array(16).fill(0x41));
    await c.waitClosed();
    c.close();
  }
  { // hang up in the middle of an option header
    const c = await rawConnect(s);
    await c.handshake();
    await c.write(new TextEncoder().encode("IHAV"));
    await sleep(100);
    c.close();
  }
  { // a request with a bad magic: dropped
    const c = await rawConnect(s);
    await c.negotiate();
    await c.request({ type: 0, length: 512, magic: 0x1234 });
    await c.waitClosed();
    c.close();
  }
  { // an invalid request (read past the end) is answered, not reported
    const c = await rawConnect(s);
    await c.negotiate({ structured: true });
    await c.request({ type: 0, offset: 64 * MiB, length: 512 });
    await c.fullReply();
    await c.request({ type: 2, length: 0 }); // DISC
    await c.waitClosed();
    c.close();
  }
  { // hang up in the middle of a write's payload
    const c = await rawConnect(s);
    await c.negotiate();
    await c.request({ type: 1, length: 4096 });
    await sleep(100);
    c.close();
  }
  await sleep(200);
}

Deno.test("trace: -T help lists the points one per line, like qemu-nbd -T help", async () => {
  const q = await runOk(["qemu-nbd", "-T", "help"]);
  const d = await runOk([...serverArgv("denbd"), "-T", "help"]);
  assert.equal(d.stderr, q.stderr);
  assert.equal(q.stderr, "");
  const ql = q.stdout.split("\n");
  const dl = d.stdout.split("\n");
  assert.equal(ql.pop(), "");
  assert.equal(dl.pop(), "");
  for (const l of [...ql, ...dl]) assert.match(l, /^[A-Za-z0-9_]+$/);
  // Every nbd_ point qemu-nbd has is listed, in qemu-nbd's order; the rest are denbd's own.
  assert.deepEqual(dl.filter((n) => n.startsWith("nbd_")), ql.filter((n) => n.startsWith("nbd_")));
  for (const n of dl) assert.ok(n.startsWith("nbd_") || n.startsWith("denbd_"), n);
  // `?` is help too, and -T is acted on before the missing FILE is noticed.
  const q2 = await run(["qemu-nbd", "-T", "?"]);
  const d2 = await run([...serverArgv("denbd"), "-T", "?"]);
  assert.equal(q2.code, 0);
  assert.equal(d2.code, 0);
  assert.equal(d2.stdout, d.stdout);
});

Deno.test("trace: bad -T arguments are refused in qemu-nbd's words", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeTextFile(
      `${dir}/ev`,
      "# c\n\nnbd_trip\n nbd_trip\n-nosuch\nnbd_neg*\nnbd_tripX",
    );
    const cases = [
      ["-T", "bogus=1"],
      ["-T", "nosuch"],
      ["-T", "nbd_trip,foo"],
      ["-T", "nbd_trip,,x"],
      ["-T", "id=1"],
      ["-T", `events=${dir}/missing`],
      ["-T", `events=${dir}/ev`],
      ["-T", `events=${dir}`],
      ["-T", `file=${dir}/a%s`, "img"],
      ["-T", "nosuch", "-T", "enable=nbd_trip,enable=nosuch2"],
      ["-T", "nbd_trip,help"],
    ];
    for (const args of cases) {
      const q = await run(["qemu-nbd", ...args]);
      const d = await run([...serverArgv("denbd"), ...args], { env: ENV });
      assert.equal(d.stdout, q.stdout, args.join(" "));
      // qemu-nbd's "Try `ARGV0 --help'" hint has the path it was started as.
      const qErr = q.stderr.replaceAll("/usr/bin/qemu-nbd", "qemu-nbd");
      assert.equal(d.stderr, qErr, args.join(" "));
      assert.equal(d.code, q.code, args.join(" "));
    }
  });
});

Deno.test("trace: -T 'nbd_negotiate*' gives the same lines for an nbdinfo connection", async () => {
  await withTempDir(async (dir) => {
    await makeSparseImage(`${dir}/img.raw`, 4 * MiB, [{ offset: 0, length: 4096, fill: 7 }]);
    const out: Record<string, string[]> = {};
    for (const kind of KINDS) {
      const err = await stderrOf(kind, dir, ["-f", "raw", "-T", "nbd_negotiate*"], async (s) => {
        await runOk(["nbdinfo", s.uri]);
      });
      out[kind] = err.split("\n").filter((l) => l !== "");
    }
    const q = out["qemu-nbd"]!;
    const d = out["denbd"]!;
    assert.ok(q.length > 20, q.join("\n"));
    assert.deepEqual(d.map((l) => l.split(" ")[0]), q.map((l) => l.split(" ")[0]));
    // The negotiation carries no pointers or cookies, so the whole lines compare.
    assert.deepEqual(d, q);
  });
});

Deno.test("trace: transmission points name the same requests and replies", async () => {
  await withTempDir(async (dir) => {
    const names: Record<string, string[]> = {};
    for (const kind of KINDS) {
      await makeSparseImage(`${dir}/img.raw`, 4 * MiB, [{ offset: 0, length: 4096, fill: 7 }]);
      const err = await stderrOf(
        kind,
        dir,
        ["-f", "raw", "-T", "nbd_*", "-T", "-nbd_neg*"],
        (s) =>
          runOk([
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read 0 8k",
            "-c",
            "write -P 1 64k 4k",
            "-c",
            "flush",
            s.uri,
          ]).then(() => {}),
      );
      // Replies and the next read race in both servers; compare what happened, sorted.
      names[kind] = err.split("\n").filter((l) => l !== "").map((l) =>
        l.replace(/handle = \d+/g, "handle = H").replace(/data = \S+,/, "data = P,")
      ).sort();
    }
    assert.deepEqual(names["denbd"], names["qemu-nbd"]);
  });
});

Deno.test("trace: -v prints exactly what qemu-nbd -v prints (foreground)", async () => {
  await withTempDir(async (dir) => {
    await makeSparseImage(`${dir}/img.raw`, 4 * MiB);
    const err: Record<string, string> = {};
    for (const kind of KINDS) {
      err[kind] = await stderrOf(kind, dir, ["-f", "raw", "-t", "-v"], badClients);
    }
    assert.match(err["qemu-nbd"]!, /option negotiation failed: Bad magic received/);
    assert.match(err["qemu-nbd"]!, /Disconnect client, due to: /);
    assert.equal(err["denbd"], err["qemu-nbd"]);
    // A plain connection: nothing at all, with or without -v.
    for (const v of [[], ["-v"]]) {
      const plain: string[] = [];
      for (const kind of KINDS) {
        plain.push(
          await stderrOf(kind, dir, ["-f", "raw", ...v], async (s) => {
            await runOk(["nbdinfo", s.uri]);
          }),
        );
      }
      assert.deepEqual(plain, ["", ""]);
    }
  });
});

Deno.test("trace: -v --fork: the parent returns, the daemon's stderr is /dev/null", async () => {
  await withTempDir(async (dir) => {
    await makeSparseImage(`${dir}/img.raw`, 4 * MiB);
    for (const kind of KINDS) {
      for (const v of [[], ["-v"]]) {
        const sock = `${dir}/${kind}.sock`;
        const pidFile = `${dir}/${kind}.pid`;
        const argv = [
          ...serverArgv(kind),
          ...v,
          "--fork",
          "-t",
          "-f",
          "raw",
          "--pid-file",
          pidFile,
          "-k",
          sock,
          `${dir}/img.raw`,
        ];
        // stderr captured in a pipe: the parent must exit and nothing may hold the pipe.
        const r = await run(argv, { env: ENV });
        const label = `${kind} ${v.join(" ")}`;
        assert.equal(r.code, 0, `${label}: ${r.stderr}`);
        assert.equal(r.stderr, "", label);
        assert.equal(r.pipesHeldOpen, false, label);
        const pid = Number((await Deno.readTextFile(pidFile)).trim());
        try {
          const s = { connect: () => Deno.connect({ transport: "unix", path: sock }) };
          const c = await rawConnect(s);
          await c.handshake();
          await c.write(new Uint8Array(16).fill(0x41)); // a failure qemu-nbd reports
          await c.waitClosed();
          c.close();
          // Where did the report go? Not to any of the daemon's standard descriptors.
          for (const fd of [0, 1, 2]) {
            const l = await runOk(["readlink", `/proc/${pid}/fd/${fd}`]);
            assert.equal(l.stdout.trim(), "/dev/null", label);
          }
        } finally {
          Deno.kill(pid, "SIGTERM");
          for (let i = 0; i < 200; i++) {
            try {
              Deno.statSync(`/proc/${pid}`);
            } catch {
              break;
            }
            await sleep(25);
          }
        }
      }
    }
  });
});

Deno.test("trace: -T file= writes the trace there, not on stderr", async () => {
  await withTempDir(async (dir) => {
    await makeSparseImage(`${dir}/img.raw`, 4 * MiB);
    const logs: string[] = [];
    for (const kind of KINDS) {
      const log = `${dir}/${kind}.%d.log`;
      let pid = 0;
      const err = await stderrOf(
        kind,
        dir,
        ["-f", "raw", "-T", `nbd_negotiate_begin,file=${log}`],
        async (s) => {
          pid = s.pid;
          await runOk(["nbdinfo", s.uri]);
        },
      );
      assert.equal(err, "", kind);
      logs.push(await Deno.readTextFile(log.replace("%d", String(pid))));
    }
    assert.deepEqual(logs, ["nbd_negotiate_begin Beginning negotiation\n", logs[0]]);
  });
});
