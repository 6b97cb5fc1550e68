/**
 * A throwaway single-node Ceph cluster for tests (Debian's ceph-mon, ceph-osd, ceph-common):
 * one monitor and one memstore OSD on 127.0.0.1 with free ports, no authentication, pool `rbd`
 * ready for images. Every wait is bounded; a start that does not become healthy in time fails
 * with the daemons' log tails. Daemons are killed by the PIDs started here (never by name).
 *
 * ```ts
 * const c = await startCeph();
 * try { await c.rbd("create", "rbd/img", "--size", "64M"); } finally { await c.stop(); }
 * ```
 *
 * @module
 */

import { freePort, run, type RunResult } from "./_harness.ts";

const CEPH_MON = "/usr/bin/ceph-mon";
const CEPH_OSD = "/usr/bin/ceph-osd";

/** Whether the Ceph daemons are installed (tests are ignored, with a message, when not). */
export function cephInstalled(): boolean {
  for (const p of [CEPH_MON, CEPH_OSD, "/usr/bin/ceph", "/usr/bin/rbd", "/usr/bin/monmaptool"]) {
    try {
      Deno.statSync(p);
    } catch {
      return false;
    }
  }
  return true;
}

/** Ignore flag for Deno.test: prints once why the ceph tests do not run. */
export function cephMissing(): boolean {
  if (cephInstalled()) return false;
  console.warn(
    "SKIPPED: rbd tests need ceph-mon, ceph-osd and ceph-common (.ci/run installs them)",
  );
  return true;
}

/** A running cluster. */
export interface Ceph {
  readonly dir: string;
  /** Path of the ceph.conf clients use. */
  readonly conf: string;
  readonly monPid: number;
  readonly osdPid: number;
  /** Runs `rbd ARGS` against the cluster (throws unless it exits 0). */
  rbd(...args: string[]): Promise<RunResult>;
  /** Runs `ceph ARGS`. */
  ceph(...args: string[]): Promise<RunResult>;
  /** Kills the daemons and removes the directory. */
  stop(): Promise<void>;
}

const MS_PER_WAIT = 60_000;

function conf(dir: string, fsid: string, p2: number, p1: number, memstoreBytes: number): string {
  return `[global]
fsid = ${fsid}
mon host = [v2:127.0.0.1:${p2},v1:127.0.0.1:${p1}]
mon initial members = a
public network = 127.0.0.1/32
cluster network = 127.0.0.1/32
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
keyring = ${dir}/keyring
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
log file = ${dir}/log/$name.log
mon cluster log file = ${dir}/log/mon-cluster.log
pid file = ${dir}/run/$name.pid
crash dir = ${dir}/crash
mon data = ${dir}/$name
osd data = ${dir}/$name
osd objectstore = memstore
memstore device bytes = ${memstoreBytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon osd auto mark in = true
osd fast shutdown = true
osd op thread timeout = 120
osd op thread suicide timeout = 0
osd op num shards = 1
osd op num threads per shard = 2
ms async op threads = 2
paxos propose interval = 0.05
paxos min wait = 0.01
osd mon report interval = 1
[client]
log file = /dev/null
admin socket =
`;
}

async function retry(what: string, fn: () => Promise<boolean>, ms = MS_PER_WAIT): Promise<void> {
  const end = Date.now() + ms;
  let last = "";
  for (;;) {
    try {
      if (await fn()) return;
      last = "";
    } catch (e) {
      last = (e as Error).message;
    }
    if (Date.now() > end) {
      throw new Error(
        `ceph: ${what} did not happen within ${ms} ms${last ? ` (last: ${last})` : ""}`,
      );
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Options of {@linkcode startCeph}. */
export interface CephOptions {
  /** The memstore OSD's capacity, held in RAM (default 1 GiB). */
  readonly memstoreBytes?: number;
}

/** Starts a cluster in a fresh temp dir (about 2 s on an idle machine). */
export async function startCeph(options: CephOptions = {}): Promise<Ceph> {
  const dir = await Deno.makeTempDir({ prefix: "denbd-ceph-" });
  for (const d of ["run", "log", "mon.a", "osd.0", "crash"]) await Deno.mkdir(`${dir}/${d}`);
  const p2 = freePort();
  let p1 = freePort();
  while (p1 === p2) p1 = freePort();
  const fsid = crypto.randomUUID();
  const confPath = `${dir}/ceph.conf`;
  await Deno.writeTextFile(confPath, conf(dir, fsid, p2, p1, options.memstoreBytes ?? 2 ** 30));
  const env = { CEPH_CONF: confPath };
  const pids: number[] = [];
  const children: Deno.ChildProcess[] = [];
  const must = async (argv: string[], timeoutMs = 30_000) => {
    const r = await run(argv, { env, timeoutMs });
    if (r.code !== 0) throw new Error(`${argv.join(" ")} exited ${r.code}: ${r.stderr}`);
    return r;
  };
  // Daemons log to DIR/log/NAME.log (ceph.conf); their stdout and stderr are not kept.
  const daemon = (argv: string[]) => {
    const child = new Deno.Command(argv[0]!, {
      args: argv.slice(1),
      stdin: "null",
      stdout: "null",
      stderr: "null",
      env,
    }).spawn();
    pids.push(child.pid);
    children.push(child);
    // Known through the status promise: /proc/PID needs --allow-all, which the suite lacks.
    const d = { pid: child.pid, exited: false };
    child.status.then(() => d.exited = true, () => d.exited = true);
    return d;
  };
  const stop = async () => {
    for (const pid of [...pids].reverse()) {
      try {
        Deno.kill(pid, "SIGKILL");
      } catch { /* gone */ }
    }
    await Promise.all(children.map((c) => c.status.catch(() => {})));
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  try {
    const q = ["--connect-timeout", "5", "-c", confPath];
    await must([
      "ceph-authtool",
      "--create-keyring",
      `${dir}/keyring`,
      "--gen-key",
      "-n",
      "mon.",
      "--cap",
      "mon",
      "allow *",
    ]);
    await must([
      "monmaptool",
      "--create",
      "--fsid",
      fsid,
      "--addv",
      "a",
      `[v2:127.0.0.1:${p2},v1:127.0.0.1:${p1}]`,
      `${dir}/monmap`,
    ]);
    await must([
      CEPH_MON,
      "-c",
      confPath,
      "-i",
      "a",
      "--mkfs",
      "--monmap",
      `${dir}/monmap`,
      "--keyring",
      `${dir}/keyring`,
    ]);
    const mon = daemon([CEPH_MON, "-c", confPath, "-i", "a", "-f"]);
    await retry("mon up", async () => {
      if (mon.exited) throw new Error("ceph-mon exited");
      const r = await run(["ceph", ...q, "-s"], { env, timeoutMs: 10_000 });
      if (r.code !== 0) throw new Error(`ceph -s exited ${r.code}: ${r.stderr.trim()}`);
      return true;
    });
    const uuid = crypto.randomUUID();
    const id = (await must(["ceph", ...q, "osd", "new", uuid])).stdout.trim();
    if (id !== "0") throw new Error(`unexpected osd id ${id}`);
    await must([CEPH_OSD, "-c", confPath, "-i", "0", "--mkfs", "--osd-uuid", uuid], 60_000);
    const osd = daemon([CEPH_OSD, "-c", confPath, "-i", "0", "-f"]);
    await retry("osd up and in", async () => {
      if (osd.exited) throw new Error("ceph-osd exited");
      const r = await run(["ceph", ...q, "osd", "stat", "-f", "json"], { env, timeoutMs: 10_000 });
      return /"num_up_osds":1,.*"num_in_osds":1,/.test(r.stdout);
    });
    await must(["ceph", ...q, "osd", "pool", "create", "rbd", "8", "8"]);
    await must(["rbd", "-c", confPath, "pool", "init", "rbd"]);
    // The PGs serve I/O once a stat of a missing object answers "No such file".
    await retry("pool rbd active", async () => {
      const r = await run(["rados", "-c", confPath, "-p", "rbd", "stat", "__probe__"], {
        env,
        timeoutMs: 10_000,
      });
      return /No such file/.test(r.stderr);
    });
    const rbd = (...args: string[]) => must(["rbd", "-c", confPath, ...args], 60_000);
    const ceph = (...args: string[]) => must(["ceph", ...q, ...args]);
    return { dir, conf: confPath, monPid: mon.pid, osdPid: osd.pid, rbd, ceph, stop };
  } catch (e) {
    let logs = "";
    for (const n of ["mon.a", "osd.0"]) {
      try {
        logs += `--- ${n}.log\n${
          Deno.readTextFileSync(`${dir}/log/${n}.log`).split("\n").slice(-20).join("\n")
        }\n`;
      } catch { /* none */ }
    }
    await stop();
    throw new Error(`${(e as Error).message}\n${logs}`);
  }
}
