/**
 * Socket activation as qemu-nbd 7.2 does it (systemd's LISTEN_PID/LISTEN_FDS, one listening
 * socket on descriptor 3):
 * - libnbd's launcher: `nbdinfo --json -- [ SERVER -f raw disk.raw ]`, `nbdinfo --map`, and
 *   nbdcopy from and to `[ SERVER ... ]`, compared with qemu-nbd's.
 * - An inherited unix or TCP listener (a small python launcher binds it on fd 3, sets the
 *   variables and execs the server, so LISTEN_PID is the server's pid).
 * - The refusals, exact stderr and exit code as qemu-nbd 7.2 prints them: `-k`, `-b`, `-p`, `-c`
 *   next to LISTEN_FDS, and LISTEN_FDS > 1.
 * - Variables that are not for us are ignored: LISTEN_PID of another process, LISTEN_FDS=0 or
 *   not a number; the server then listens where its options say.
 *
 * SERVER is `qemu-nbd`, or denbd as a command (scripts/bin/denbd, which execs Deno in place, so
 * the pid libnbd puts in LISTEN_PID stays the server's).
 */

import assert from "node:assert/strict";
import {
  closeQuietly,
  freePort,
  makeSparseImage,
  MiB,
  readWithTimeout,
  run,
  runOk,
  SERVER_KIND,
  type ServerKind,
  sleep,
  withTempDir,
} from "./_harness.ts";

/** denbd as a command (the wrapper runs main.ts with the pinned Deno and the permissions). */
const DENBD_COMMAND = decodeURIComponent(
  new URL("../../scripts/bin/denbd", import.meta.url).pathname,
);

/** The server under test as a command line that libnbd's `[ ... ]` can run. */
function serverCommand(kind: ServerKind): string[] {
  return kind === "qemu-nbd" ? ["qemu-nbd"] : [DENBD_COMMAND];
}

/** Messages with the program's name made qemu-nbd's (denbd names itself in its messages). */
function normalise(s: string): string {
  return s.replaceAll("denbd", "qemu-nbd");
}

/**
 * Binds `socks` listeners on descriptors 3.., sets LISTEN_FDS (unless "none") and LISTEN_PID
 * ("ours": the pid the server will have, "none", or a literal) and execs the rest of argv.
 * A listener is `unix:PATH` or `tcp:PORT` (on 127.0.0.1).
 */
const LAUNCHER = `
import json, os, socket, sys
cfg = json.loads(sys.argv[1])
argv = sys.argv[2:]
socks = []
for spec in cfg["socks"]:
    kind, _, where = spec.partition(":")
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(where)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(where)))
    s.listen(16)
    socks.append(s)
for i, s in enumerate(socks):
    os.dup2(s.fileno(), 3 + i)
    os.set_inheritable(3 + i, True)
env = dict(os.environ)
env.pop("LISTEN_FDS", None)
env.pop("LISTEN_PID", None)
if cfg["fds"] != "none":
    env["LISTEN_FDS"] = cfg["fds"]
if cfg["pid"] == "ours":
    env["LISTEN_PID"] = str(os.getpid())
elif cfg["pid"] != "none":
    env["LISTEN_PID"] = cfg["pid"]
os.execvpe(argv[0], argv, env)
`;

interface Launch {
  readonly socks: readonly string[];
  readonly fds: string;
  readonly pid: string;
}

function launcherArgv(kind: ServerKind, l: Launch, args: readonly string[]): string[] {
  return ["/usr/bin/python3", "-c", LAUNCHER, JSON.stringify(l), ...serverCommand(kind), ...args];
}

/** A launched server that keeps running; `stop` ends it and returns its exit code and stderr. */
function spawnLaunched(kind: ServerKind, l: Launch, args: readonly string[]) {
  const [cmd, ...rest] = launcherArgv(kind, l, args);
  const child = new Deno.Command(cmd!, {
    args: rest,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  return {
    status: child.status,
    async stop(): Promise<{ code: number; stderr: string }> {
      try {
        child.kill("SIGTERM");
      } catch { /* exited */ }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* exited */ }
      }, 5000);
      const s = await child.status;
      clearTimeout(timer);
      return { code: s.code, stderr: await stderr };
    },
  };
}

/** Retries `fn` until it succeeds or `ms` pass (the launched server needs a moment to start). */
async function eventually<T>(ms: number, fn: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + ms;
  for (let i = 0;; i++) {
    try {
      return await fn();
    } catch (e) {
      if (Date.now() > deadline || i > 400) throw e;
      await sleep(50);
    }
  }
}

const KINDS: readonly ServerKind[] = ["qemu-nbd", SERVER_KIND];

async function makeDisk(dir: string): Promise<string> {
  const disk = `${dir}/disk.raw`;
  await makeSparseImage(disk, 4 * MiB, [
    { offset: 0, length: 64 * 1024, fill: "random", seed: 1 },
    { offset: 2 * MiB + 512, length: 300_000, fill: "random", seed: 2 },
  ]);
  return disk;
}

Deno.test("socket activation: nbdinfo --json and --map -- [ SERVER -f raw disk.raw ] match qemu-nbd", async () => {
  await withTempDir(async (dir) => {
    const disk = await makeDisk(dir);
    for (const extra of [[], ["-r"]]) {
      const seen: string[][] = [];
      for (const kind of KINDS) {
        const cmd = ["--", "[", ...serverCommand(kind), "-f", "raw", ...extra, disk, "]"];
        const json = await runOk(["nbdinfo", "--json", ...cmd], { timeoutMs: 30_000 });
        const map = await runOk(["nbdinfo", "--map", ...cmd], { timeoutMs: 30_000 });
        seen.push([json.stdout, map.stdout, normalise(json.stderr + map.stderr)]);
      }
      assert.deepEqual(seen[1], seen[0], `nbdinfo ${extra.join(" ")}`);
      const info = JSON.parse(seen[1]![0]!);
      assert.equal(info.exports[0]["export-size"], 4 * MiB);
      assert.equal(info.exports[0]["is_read_only"], extra.includes("-r"));
    }
  });
});

Deno.test("socket activation: nbdcopy from and to [ SERVER -f raw disk.raw ]", async () => {
  await withTempDir(async (dir) => {
    const disk = await makeDisk(dir);
    for (const kind of KINDS) {
      const out = `${dir}/out-${kind}.raw`;
      await runOk(["nbdcopy", "--", "[", ...serverCommand(kind), "-f", "raw", disk, "]", out], {
        timeoutMs: 30_000,
      });
      const cmp = await run(["cmp", disk, out]);
      assert.equal(cmp.code, 0, `${kind}: ${cmp.stdout}${cmp.stderr}`);
      // And into an image through the server.
      const target = `${dir}/target-${kind}.raw`;
      await makeSparseImage(target, 4 * MiB);
      await runOk(["nbdcopy", disk, "--", "[", ...serverCommand(kind), "-f", "raw", target, "]"], {
        timeoutMs: 30_000,
      });
      const cmp2 = await run(["cmp", disk, target]);
      assert.equal(cmp2.code, 0, `${kind} (write): ${cmp2.stdout}${cmp2.stderr}`);
    }
  });
});

Deno.test("socket activation: an inherited unix or TCP listener on fd 3 is served", async () => {
  await withTempDir(async (dir) => {
    const disk = await makeDisk(dir);
    // Paths by position: under DENBD_TEST_SERVER=qemu-nbd both kinds are qemu-nbd.
    for (const [i, kind] of KINDS.entries()) {
      for (const transport of ["unix", "tcp"] as const) {
        const path = `${dir}/act-${i}-${kind}-${transport}.sock`;
        const port = freePort();
        const sock = transport === "unix" ? `unix:${path}` : `tcp:${port}`;
        const uri = transport === "unix"
          ? `nbd+unix:///?socket=${path}`
          : `nbd://127.0.0.1:${port}/`;
        // Without -t the server exits with 0 after its client leaves.
        const srv = spawnLaunched(kind, { socks: [sock], fds: "1", pid: "ours" }, [
          "-f",
          "raw",
          disk,
        ]);
        let status: Deno.CommandStatus | undefined;
        try {
          const size = await eventually(10_000, () => runOk(["nbdinfo", "--size", uri]));
          assert.equal(size.stdout.trim(), String(4 * MiB), `${kind} ${transport}`);
          let timer: ReturnType<typeof setTimeout> | undefined;
          status = await Promise.race([
            srv.status,
            new Promise<undefined>((r) => timer = setTimeout(() => r(undefined), 5000)),
          ]);
          clearTimeout(timer);
        } finally {
          const end = await srv.stop();
          assert.ok(status !== undefined, `${kind} ${transport}: still running after its client`);
          assert.equal(end.code, 0, `${kind} ${transport}: ${end.stderr}`);
        }
      }
    }
  });
});

/** The refusals, as qemu-nbd 7.2 prints them (exit code 1 for all). */
const REFUSALS: readonly { launch: Launch; args: string[]; stderr: string }[] = [
  {
    launch: { socks: ["unix:S0"], fds: "1", pid: "ours" },
    args: ["-k", "SOCK"],
    stderr: "qemu-nbd: Unix socket can't be set when using socket activation\n",
  },
  {
    launch: { socks: ["unix:S0"], fds: "1", pid: "ours" },
    args: ["-b", "127.0.0.1"],
    stderr: "qemu-nbd: The interface can't be set when using socket activation\n",
  },
  {
    launch: { socks: ["unix:S0"], fds: "1", pid: "ours" },
    args: ["-p", "PORT"],
    stderr: "qemu-nbd: TCP port number can't be set when using socket activation\n",
  },
  {
    launch: { socks: ["unix:S0"], fds: "1", pid: "ours" },
    args: ["-p", "PORT", "-b", "127.0.0.1"],
    stderr: "qemu-nbd: The interface can't be set when using socket activation\n",
  },
  {
    launch: { socks: ["unix:S0"], fds: "1", pid: "ours" },
    args: ["-k", "SOCK", "-b", "127.0.0.1", "-p", "PORT"],
    stderr: "qemu-nbd: Unix socket can't be set when using socket activation\n",
  },
  {
    launch: { socks: ["unix:S0"], fds: "1", pid: "ours" },
    args: ["-c", "/dev/nbd0"],
    stderr: "qemu-nbd: NBD device can't be set when using socket activation\n",
  },
  {
    launch: { socks: ["unix:S0", "unix:S1"], fds: "2", pid: "ours" },
    args: [],
    stderr: "qemu-nbd: qemu-nbd does not support socket activation with LISTEN_FDS > 1\n",
  },
  {
    // The conflicting option is reported before the count.
    launch: { socks: ["unix:S0", "unix:S1"], fds: "2", pid: "ours" },
    args: ["-k", "SOCK"],
    stderr: "qemu-nbd: Unix socket can't be set when using socket activation\n",
  },
  {
    launch: { socks: ["unix:S0", "unix:S1", "unix:S2"], fds: "3", pid: "ours" },
    args: ["-p", "PORT"],
    stderr: "qemu-nbd: TCP port number can't be set when using socket activation\n",
  },
];

Deno.test("socket activation: -k, -b, -p, -c and LISTEN_FDS > 1 are refused as qemu-nbd does", async () => {
  await withTempDir(async (dir) => {
    const disk = await makeDisk(dir);
    const port = String(freePort());
    let n = 0;
    for (const { launch, args, stderr } of REFUSALS) {
      for (const kind of KINDS) {
        const tag = `${++n}`;
        const l = {
          ...launch,
          socks: launch.socks.map((s) => s.replace(/S(\d)$/, `${dir}/l${tag}-$1.sock`)),
        };
        const a = args.map((x) => x === "SOCK" ? `${dir}/k${tag}.sock` : x === "PORT" ? port : x);
        const r = await run(launcherArgv(kind, l, [...a, "-f", "raw", disk]), {
          timeoutMs: 15_000,
        });
        const what = `${kind} with LISTEN_FDS=${launch.fds} ${args.join(" ")}`;
        assert.equal(normalise(r.stderr), stderr, what);
        assert.equal(r.code, 1, what);
        assert.equal(r.stdout, "", what);
      }
    }
  });
});

Deno.test("socket activation: LISTEN_PID of another process, LISTEN_FDS=0 or garbage are ignored", async () => {
  await withTempDir(async (dir) => {
    const disk = await makeDisk(dir);
    const cases: Launch[] = [
      { socks: ["unix:S"], fds: "1", pid: "1" },
      { socks: ["unix:S"], fds: "1", pid: "none" },
      { socks: ["unix:S"], fds: "0", pid: "ours" },
      { socks: ["unix:S"], fds: "abc", pid: "ours" },
      { socks: ["unix:S"], fds: "1", pid: "abc" },
    ];
    let n = 0;
    for (const c of cases) {
      for (const kind of KINDS) {
        const tag = `${++n}`;
        const inherited = `${dir}/inherited${tag}.sock`;
        const own = `${dir}/own${tag}.sock`;
        const what = `${kind} with LISTEN_FDS=${c.fds} LISTEN_PID=${c.pid}`;
        // The server must refuse nothing and listen on its own -k socket.
        const srv = spawnLaunched(kind, { ...c, socks: [`unix:${inherited}`] }, [
          "-t",
          "-k",
          own,
          "-f",
          "raw",
          disk,
        ]);
        try {
          const size = await eventually(
            10_000,
            () => runOk(["nbdinfo", "--size", `nbd+unix:///?socket=${own}`]),
          );
          assert.equal(size.stdout.trim(), String(4 * MiB), what);
          // Nobody accepts on the inherited socket: a connection gets no greeting.
          const conn = await Deno.connect({ transport: "unix", path: inherited });
          let greeted: Uint8Array | null = null;
          try {
            greeted = await readWithTimeout(conn, 8, 300);
          } catch {
            /* timed out, as expected */
          } finally {
            closeQuietly(conn);
          }
          assert.equal(greeted, null, `${what}: the inherited socket was served`);
        } finally {
          const end = await srv.stop();
          assert.equal(normalise(end.stderr), "", what);
        }
      }
    }
  });
});
