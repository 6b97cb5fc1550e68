/**
 * TLS, differential: the server under test and qemu-nbd 7.2 run with the same `--object
 * tls-creds-*` / `--tls-creds` / `--tls-authz` arguments on copies of the same image, and the
 * same clients (qemu-img, qemu-io, qemu-nbd -L and the server under test's -L, nbdinfo, nbdcopy)
 * must see the same things: the same successes, the same refusals with the same (normalised)
 * messages, the same lines on the servers' stderr, the same data afterwards. Each expected
 * outcome is also asserted on qemu-nbd's side, so the suite checks itself under
 * DENBD_TEST_SERVER=qemu-nbd.
 *
 * Credentials come from tests/interop/_tls.ts (certtool, once for the file).
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  closeQuietly,
  makeSparseImage,
  MiB,
  readWithTimeout,
  run,
  type RunResult,
  Server,
  SERVER_KIND,
  serverArgv,
  type ServerKind,
  sha256File,
  sleep,
  withTempDir,
} from "./_harness.ts";
import {
  anonClientObject,
  anonServerArgs,
  makeTlsFixture,
  pskClientObject,
  pskServerArgs,
  SERVER_DNS_NAME,
  type TlsFixture,
  x509ClientObject,
  x509ServerArgs,
} from "./_tls.ts";

const fx: TlsFixture = await makeTlsFixture();
globalThis.addEventListener("unload", () => {
  try {
    Deno.removeSync(fx.root, { recursive: true });
  } catch { /* already gone */ }
});

const IMAGE_SIZE = 16 * MiB;

/** A value for a qemu option string: commas doubled. */
function commas(s: string): string {
  return s.replaceAll(",", ",,");
}

// ---------------------------------------------------------------------------------------------
// Servers side by side

/** qemu-nbd (the reference) and the server under test, on copies of one image. */
interface Pair {
  readonly ref: Server;
  readonly sub: Server;
  readonly dir: string;
}

/** A sparse image with known data: 0x11 at 1 MiB, pseudo-random at 5 MiB, holes elsewhere. */
async function makeImage(path: string): Promise<void> {
  await makeSparseImage(path, IMAGE_SIZE, [
    { offset: MiB, length: MiB, fill: 0x11 },
    { offset: 5 * MiB, length: 3 * MiB, fill: "random", seed: 5 },
  ]);
}

let pairCounter = 0;

/** Starts qemu-nbd and the server under test with `-f raw -t -e 0` and `args`, runs `fn`. */
async function withPair(
  dir: string,
  opts: { args: readonly string[]; transport: "unix" | "tcp" },
  fn: (p: Pair) => Promise<void>,
): Promise<void> {
  const n = ++pairCounter;
  const start = async (kind: ServerKind, role: string) => {
    const image = `${dir}/${role}${n}.img`;
    await makeImage(image);
    return Server.start({
      dir,
      image,
      kind,
      transport: opts.transport,
      socketName: `${role}${n}.sock`,
      args: ["-f", "raw", "-t", "-e", "0", ...opts.args],
    });
  };
  const started = await Promise.allSettled([start("qemu-nbd", "ref"), start(SERVER_KIND, "sub")]);
  const [r, s] = started;
  try {
    if (r!.status === "rejected") throw r!.reason;
    if (s!.status === "rejected") throw s!.reason;
    await fn({ ref: r!.value, sub: s!.value, dir });
  } finally {
    for (const x of started) if (x.status === "fulfilled") await x.value.stop();
  }
}

/** Where a server's image copy is. */
function imageOf(s: Server): string {
  return s.argv[s.argv.length - 1]!;
}

/** Text with what names a server instance (port, socket, dirs, program name) made neutral. */
function normalise(text: string, servers: readonly Server[] = []): string {
  let t = text;
  for (const s of servers) {
    if (s.socketPath !== undefined) t = t.replaceAll(s.socketPath, "SOCK");
    if (s.port !== undefined) t = t.replaceAll(String(s.port), "PORT");
    t = t.replaceAll(imageOf(s), "IMAGE");
  }
  return t.replaceAll(fx.root, "TLSDIR").replaceAll("denbd", "qemu-nbd")
    // qemu-io's timing lines.
    .replace(/^\d+ (?:bytes|[KMG]iB), \d+ ops; .*$/gm, "TIMING")
    .replace(RACY_HANGUP_OPTION, CONNECTION_ENDED)
    .replace(RACY_HANGUP_HANDSHAKE, `TLS handshake failed: ${CONNECTION_ENDED}`);
}

/**
 * How a client reports a server that refused it and closed the socket races between the
 * client's next write and its next read, and qemu-nbd 7.2 itself gives each of these (20 runs
 * of an authz denial: 14 "Software caused connection abort", 5 "write ... Input/output error",
 * 1 "read ... Input/output error"; of an x509 client at a PSK server: 19 "push", 1
 * "non-properly terminated"). They are one outcome here; the refusal itself, and the server's
 * line saying why, are still compared exactly.
 */
const RACY_HANGUP_OPTION =
  /(?:Failed to read option reply: Cannot read from|Failed to send option request header: Cannot write to) TLS channel: (?:Software caused connection abort|Input\/output error)/g;
const RACY_HANGUP_HANDSHAKE =
  /TLS handshake failed: (?:Error in the push function\.|Error in the pull function\.|The TLS connection was non-properly terminated\.)/g;
const CONNECTION_ENDED = "(the server ended the connection)";

/** What a client run showed, normalised. */
interface Seen {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `argvOf` against both servers at once; asserts they saw the same; returns qemu-nbd's. */
async function same(
  what: string,
  p: Pair,
  argvOf: (s: Server) => string[],
  opts: { stdoutFilter?: (s: string) => string } = {},
): Promise<Seen> {
  const [a, b] = await Promise.all(
    [p.ref, p.sub].map((s) => run(argvOf(s), { timeoutMs: 20_000 })),
  );
  const seen = (r: RunResult, s: Server): Seen => {
    const out = normalise(r.stdout, [s]);
    return {
      code: r.code,
      stdout: opts.stdoutFilter ? opts.stdoutFilter(out) : out,
      stderr: normalise(r.stderr, [s]),
    };
  };
  const want = seen(a!, p.ref);
  const got = seen(b!, p.sub);
  assert.deepEqual(got, want, `${what}: ${SERVER_KIND} differs from qemu-nbd`);
  return want;
}

/** Asserts a run succeeded. */
function ok(s: Seen, what: string): void {
  assert.equal(s.code, 0, `${what} should succeed: ${s.stderr}`);
}

/** Asserts a run failed with stderr matching `re`. */
function refused(s: Seen, what: string, re: RegExp): void {
  assert.notEqual(s.code, 0, `${what} should fail; stdout: ${s.stdout}`);
  assert.match(s.stderr, re, what);
}

/** qemu-img info over TCP or a unix socket, `extra` appended to the image options. */
function qemuImgInfo(obj: string | undefined, extra = ""): (s: Server) => string[] {
  return (s) => {
    const tls = obj === undefined ? "" : ",tls-creds=tls0";
    const where = s.transport === "tcp" ? `host=127.0.0.1,port=${s.port}` : `path=${s.socketPath}`;
    return [
      "qemu-img",
      "info",
      ...(obj === undefined ? [] : ["--object", obj]),
      "--image-opts",
      `driver=nbd,${where}${tls}${extra}`,
    ];
  };
}

/** An nbds:// or nbds+unix:// URI with TLS query parameters (`user` for PSK). */
function nbdsUri(s: Server, query: string, user?: string): string {
  const u = user === undefined ? "" : `${user}@`;
  return s.transport === "tcp"
    ? `nbds://${u}127.0.0.1:${s.port}/?${query}`
    : `nbds+unix://${u}/?socket=${s.socketPath}&${query}`;
}

/** nbdinfo --json, less the uri (it names the socket). */
function jsonFilter(stdout: string): string {
  try {
    const j = JSON.parse(stdout);
    for (const e of j.exports ?? []) delete e.uri;
    return JSON.stringify(j, null, 1);
  } catch {
    return stdout;
  }
}

/** `-L` with TLS client args, by `kind`'s program, against server `s`. */
function listArgv(kind: ServerKind, obj: string, extra: readonly string[] = []) {
  return (s: Server): string[] => [
    ...serverArgv(kind),
    "-L",
    ...(s.transport === "tcp" ? ["-b", "127.0.0.1", "-p", String(s.port)] : ["-k", s.socketPath!]),
    "--object",
    obj,
    "--tls-creds",
    "tls0",
    ...extra,
  ];
}

/**
 * `qemu-nbd -L` and the server under test's `-L` with the same arguments, each against both
 * servers: all four must print the same. Returns what qemu-nbd -L saw of qemu-nbd.
 */
async function sameList(
  what: string,
  p: Pair,
  obj: string,
  extra: readonly string[] = [],
): Promise<Seen> {
  const byQemu = await same(`qemu-nbd -L ${what}`, p, listArgv("qemu-nbd", obj, extra));
  const bySub = await same(`${SERVER_KIND} -L ${what}`, p, listArgv(SERVER_KIND, obj, extra));
  assert.deepEqual(bySub, byQemu, `-L ${what}: ${SERVER_KIND}'s -L differs from qemu-nbd's`);
  return byQemu;
}

/** The harness's readiness probe hangs up after the greeting; seen as an EOF or a reset. */
const READINESS_PROBE_LINE =
  /^qemu-nbd: option negotiation failed: Failed to read flags: (?:Unexpected end-of-file before all data were read|Unable to read from socket: Connection reset by peer)$/;

/**
 * The servers' stderr lines, normalised and sorted (clients run at once on both, so the order
 * of lines from different clients is not part of the contract), less the readiness probe's
 * (it hangs up after the greeting; how that reads races between EOF and reset).
 */
function serverLines(s: Server): string[] {
  return normalise(s.stderr, [s]).split("\n").filter((l) =>
    l !== "" && !READINESS_PROBE_LINE.test(l)
  ).sort();
}

/** Waits until both servers have printed the same number of lines (bounded), then compares. */
async function sameServerLines(p: Pair, what: string): Promise<string[]> {
  for (let i = 0; i < 40; i++) {
    if (serverLines(p.ref).length === serverLines(p.sub).length) break;
    await sleep(50);
  }
  await sleep(100);
  const want = serverLines(p.ref);
  assert.deepEqual(serverLines(p.sub), want, `${what}: server stderr`);
  return want;
}

/** A good client still gets through and both servers still run. */
async function stillServing(p: Pair, good: (s: Server) => string[]): Promise<void> {
  ok(await same("a good client after the refusals", p, good), "good client afterwards");
  assert.ok(p.ref.running && p.sub.running, "both servers still running");
}

const TLS_REQUIRED_GO =
  /TLS negotiation required before option 7 \(go\)\nDid you forget a valid tls-creds\?\nserver reported: Option 0x7 not permitted before TLS/;

// ---------------------------------------------------------------------------------------------
// x509

Deno.test({
  name: "tls x509 over TCP, verify-peer=on: clients, data, refusals, server messages",
  fn: () =>
    withTempDir((dir) =>
      withPair(dir, { transport: "tcp", args: x509ServerArgs(fx.server, true) }, async (p) => {
        const c1 = x509ClientObject(fx.client1);
        ok(await same("qemu-img info, client1", p, qemuImgInfo(c1)), "client1");
        ok(
          await same("qemu-img info, client3", p, qemuImgInfo(x509ClientObject(fx.client3))),
          "c3",
        );
        // The certificate names 127.0.0.1 and the DNS name, not localhost.
        const lh = (s: Server) =>
          qemuImgInfo(c1)(s).map((a) => a.replace("host=127.0.0.1", "host=localhost"));
        refused(
          await same("host=localhost", p, lh),
          "localhost",
          /Certificate does not match the hostname localhost/,
        );
        ok(
          await same("host=localhost, tls-hostname", p, (s) => {
            const a = lh(s);
            a[a.length - 1] += `,tls-hostname=${SERVER_DNS_NAME}`;
            return a;
          }),
          "tls-hostname override",
        );
        refused(
          await same("client of another CA", p, qemuImgInfo(x509ClientObject(fx.client2))),
          "other CA",
          /The certificate hasn't got a known issuer/,
        );
        refused(
          await same("no client certificate", p, qemuImgInfo(x509ClientObject(fx.nocert))),
          "no cert",
          /the server ended the connection/,
        );
        refused(await same("plain qemu-img", p, qemuImgInfo(undefined)), "plain", TLS_REQUIRED_GO);

        // libnbd.
        const info = await same(
          "nbdinfo --json",
          p,
          (s) => ["nbdinfo", "--json", nbdsUri(s, `tls-certificates=${fx.client1}`)],
          { stdoutFilter: jsonFilter },
        );
        ok(info, "nbdinfo --json");
        assert.equal(JSON.parse(info.stdout).TLS, true);
        const map = await same(
          "nbdinfo --map",
          p,
          (s) => ["nbdinfo", "--map", nbdsUri(s, `tls-certificates=${fx.client1}`)],
        );
        ok(map, "nbdinfo --map");
        assert.match(map.stdout, /1048576\s+1048576\s+0\s+data/);
        refused(
          await same(
            "nbdinfo, other CA",
            p,
            (s) => ["nbdinfo", nbdsUri(s, `tls-certificates=${fx.client2}`)],
          ),
          "nbdinfo other CA",
          /certificate verification/,
        );
        refused(
          await same(
            "nbdinfo, no client cert",
            p,
            (s) => ["nbdinfo", nbdsUri(s, `tls-certificates=${fx.nocert}`)],
          ),
          "nbdinfo no cert",
          /gnutls/,
        );
        refused(
          await same("plain nbdinfo", p, (s) => ["nbdinfo", `nbd://127.0.0.1:${s.port}/`]),
          "plain nbdinfo",
          /nbdinfo: /,
        );

        // -L (qemu-nbd's and the server under test's), iotest 233's cases.
        const l = await sameList("client1", p, c1);
        ok(l, "-L");
        assert.match(l.stdout, /^exports available: 1\n export: ''\n {2}size: {2}16777216\n/);
        const lhList = (kind: ServerKind, extra: string[]) => (s: Server) =>
          listArgv(kind, c1, extra)(s).map((a, i, all) => all[i - 1] === "-b" ? "localhost" : a);
        for (const kind of new Set<ServerKind>(["qemu-nbd", SERVER_KIND])) {
          refused(
            await same(`${kind} -L -b localhost`, p, lhList(kind, [])),
            "-L localhost",
            /Certificate does not match the hostname localhost/,
          );
          ok(
            await same(
              `${kind} -L --tls-hostname`,
              p,
              lhList(kind, ["--tls-hostname", "127.0.0.1"]),
            ),
            "-L --tls-hostname",
          );
        }
        refused(
          await sameList("other CA", p, x509ClientObject(fx.client2)),
          "-L other CA",
          /The certificate hasn't got a known issuer/,
        );

        // Data over TLS: qemu-io reads and writes, then the two image files must match.
        const io = await same("qemu-io over TLS", p, (s) => [
          "qemu-io",
          "--object",
          c1,
          "--image-opts",
          ...["-c", "r -P 0x11 1m 1m", "-c", "w -P 0x22 1m 64k", "-c", "w -z 9m 1m"],
          ...["-c", "r -P 0 9m 1m", "-c", "aio_write -P 0x33 12m 4k", "-c", "aio_flush"],
          `driver=nbd,host=127.0.0.1,port=${s.port},tls-creds=tls0`,
        ]);
        ok(io, "qemu-io");
        assert.doesNotMatch(io.stdout, /Pattern verification failed/);
        const cmp = await run([
          "qemu-img",
          "compare",
          "-f",
          "raw",
          "-F",
          "raw",
          imageOf(p.ref),
          imageOf(p.sub),
        ]);
        assert.equal(cmp.code, 0, `images differ after qemu-io: ${cmp.stdout}${cmp.stderr}`);
        const check = await run([
          "qemu-io",
          "-f",
          "raw",
          "-r",
          "-U",
          ...["-c", "r -P 0x22 1m 64k", "-c", "r -P 0x33 12m 4k"],
          imageOf(p.sub),
        ]);
        assert.doesNotMatch(check.stdout + check.stderr, /Pattern verification failed|error/i);

        // nbdcopy both ways.
        const src = `${dir}/src.img`;
        await makeSparseImage(src, IMAGE_SIZE, [{ offset: 0, length: IMAGE_SIZE, fill: "random" }]);
        ok(
          await same(
            "nbdcopy into the export",
            p,
            (s) => ["nbdcopy", src, nbdsUri(s, `tls-certificates=${fx.client1}`)],
          ),
          "nbdcopy write",
        );
        const want = await sha256File(src);
        assert.equal(await sha256File(imageOf(p.ref)), want, "qemu-nbd's image after nbdcopy");
        assert.equal(await sha256File(imageOf(p.sub)), want, "image after nbdcopy");
        ok(
          await same("nbdcopy out of the export", p, (s) => [
            "nbdcopy",
            nbdsUri(s, `tls-certificates=${fx.client1}`),
            `${dir}/out-${s === p.ref ? "ref" : "sub"}.img`,
          ]),
          "nbdcopy read",
        );
        assert.equal(await sha256File(`${dir}/out-ref.img`), want);
        assert.equal(await sha256File(`${dir}/out-sub.img`), want);

        await stillServing(p, qemuImgInfo(c1));
        const lines = await sameServerLines(p, "x509 TCP");
        assert.ok(
          lines.some((l) => l.includes("option negotiation failed: Verify failed: No certificate")),
          `qemu-nbd's lines: ${lines.join("\n")}`,
        );
      })
    ),
});

Deno.test({
  name: "tls x509 over a unix socket, verify-peer=off: hostnames, clients without certificates",
  fn: () =>
    withTempDir((dir) =>
      withPair(dir, { transport: "unix", args: x509ServerArgs(fx.server, false) }, async (p) => {
        const c1 = x509ClientObject(fx.client1);
        refused(
          await same("unix socket, no tls-hostname", p, qemuImgInfo(c1)),
          "no hostname",
          /No hostname for certificate validation/,
        );
        ok(
          await same("tls-hostname=127.0.0.1", p, qemuImgInfo(c1, ",tls-hostname=127.0.0.1")),
          "ip",
        );
        ok(
          await same("tls-hostname=DNS", p, qemuImgInfo(c1, `,tls-hostname=${SERVER_DNS_NAME}`)),
          "dns",
        );
        refused(
          await same("tls-hostname=localhost", p, qemuImgInfo(c1, ",tls-hostname=localhost")),
          "localhost",
          /Certificate does not match the hostname localhost/,
        );
        // verify-peer=off: no certificate needed, and a foreign one is not looked at.
        const hn = ",tls-hostname=127.0.0.1";
        ok(await same("no client cert", p, qemuImgInfo(x509ClientObject(fx.nocert), HN)), "nocert");
        refused(
          await same(
            "client of CA 2 (it refuses the server)",
            p,
            (s) => qemuImgInfo(x509ClientObject(fx.client2), hn)(s),
          ),
          "client2",
          /The certificate hasn't got a known issuer/,
        );
        const info = await same(
          "nbdinfo --json over unix",
          p,
          (s) => ["nbdinfo", "--json", nbdsUri(s, `tls-certificates=${fx.nocert}`)],
          { stdoutFilter: jsonFilter },
        );
        ok(info, "nbdinfo, no client cert");
        refused(
          await same(
            "plain nbdinfo over unix",
            p,
            (s) => ["nbdinfo", `nbd+unix:///?socket=${s.socketPath}`],
          ),
          "plain",
          /nbdinfo: /,
        );
        refused(
          await sameList("unix, no hostname", p, c1),
          "-L no hostname",
          /No hostname for certificate validation/,
        );
        ok(await sameList("unix, hostname", p, c1, ["--tls-hostname", "127.0.0.1"]), "-L hostname");
        await stillServing(p, qemuImgInfo(c1, hn));
        await sameServerLines(p, "x509 unix");
      })
    ),
});

// ---------------------------------------------------------------------------------------------
// PSK and anon

Deno.test({
  name: "tls PSK over a unix socket: users, keys, nbdcopy both ways, -L",
  fn: () =>
    withTempDir((dir) =>
      withPair(dir, { transport: "unix", args: pskServerArgs(fx.psk1) }, async (p) => {
        const good = pskClientObject(fx.psk1, "psk1");
        ok(await same("psk1", p, qemuImgInfo(good)), "psk1");
        refused(
          await same("unknown user psk2", p, qemuImgInfo(pskClientObject(fx.psk2, "psk2"))),
          "psk2",
          /TLS handshake failed/,
        );
        refused(
          await same("psk1, wrong key", p, qemuImgInfo(pskClientObject(fx.psk1Wrong, "psk1"))),
          "wrong key",
          /TLS handshake failed/,
        );
        refused(
          await same(
            "x509 client to a PSK server",
            p,
            (s) => qemuImgInfo(x509ClientObject(fx.client1), ",tls-hostname=127.0.0.1")(s),
          ),
          "x509 client",
          /TLS handshake failed|Cannot read/,
        );
        refused(await same("plain client", p, qemuImgInfo(undefined)), "plain", TLS_REQUIRED_GO);
        const psk = (d: string) => `tls-psk-file=${d}/keys.psk`;
        ok(
          await same(
            "nbdinfo --json psk1",
            p,
            (s) => ["nbdinfo", "--json", nbdsUri(s, psk(fx.psk1), "psk1")],
            { stdoutFilter: jsonFilter },
          ),
          "nbdinfo psk1",
        );
        refused(
          await same("nbdinfo psk2", p, (s) => ["nbdinfo", nbdsUri(s, psk(fx.psk2), "psk2")]),
          "nbdinfo psk2",
          /gnutls/,
        );
        refused(
          await same(
            "nbdinfo wrong key",
            p,
            (s) => ["nbdinfo", nbdsUri(s, psk(fx.psk1Wrong), "psk1")],
          ),
          "nbdinfo wrong key",
          /gnutls/,
        );
        const src = `${dir}/src.img`;
        await makeSparseImage(src, IMAGE_SIZE, [
          { offset: 0, length: IMAGE_SIZE / 2, fill: "random", seed: 3 },
        ]);
        ok(
          await same(
            "nbdcopy into the export, PSK",
            p,
            (s) => ["nbdcopy", src, nbdsUri(s, psk(fx.psk1), "psk1")],
          ),
          "nbdcopy write",
        );
        const want = await sha256File(src);
        assert.equal(await sha256File(imageOf(p.ref)), want);
        assert.equal(await sha256File(imageOf(p.sub)), want);
        ok(
          await same("nbdcopy out of the export, PSK", p, (s) => [
            "nbdcopy",
            nbdsUri(s, psk(fx.psk1), "psk1"),
            `${dir}/out-${s === p.ref ? "ref" : "sub"}.img`,
          ]),
          "nbdcopy read",
        );
        assert.equal(await sha256File(`${dir}/out-ref.img`), want);
        assert.equal(await sha256File(`${dir}/out-sub.img`), want);
        ok(await sameList("psk1", p, good), "-L psk1");
        refused(
          await sameList("psk1 wrong key", p, pskClientObject(fx.psk1Wrong, "psk1")),
          "-L wrong key",
          /TLS handshake failed/,
        );
        await stillServing(p, qemuImgInfo(good));
        const lines = await sameServerLines(p, "PSK");
        assert.ok(lines.some((l) => /TLS handshake failed/.test(l)), lines.join("\n"));
      })
    ),
});

Deno.test({
  name: "tls anon over TCP: anonymous clients in, x509 and plain clients refused",
  fn: () =>
    withTempDir((dir) =>
      withPair(dir, { transport: "tcp", args: anonServerArgs() }, async (p) => {
        ok(await same("anon client", p, qemuImgInfo(anonClientObject())), "anon");
        refused(
          await same("x509 client to anon server", p, qemuImgInfo(x509ClientObject(fx.client1))),
          "x509",
          /TLS handshake failed|Cannot read/,
        );
        refused(await same("plain client", p, qemuImgInfo(undefined)), "plain", TLS_REQUIRED_GO);
        const io = await same("qemu-io anon", p, (s) => [
          "qemu-io",
          "--object",
          anonClientObject(),
          "--image-opts",
          ...["-c", "r -P 0x11 1m 1m", "-c", "w -P 0x44 2m 128k"],
          `driver=nbd,host=127.0.0.1,port=${s.port},tls-creds=tls0`,
        ]);
        ok(io, "qemu-io anon");
        assert.doesNotMatch(io.stdout, /Pattern verification failed/);
        ok(await sameList("anon", p, anonClientObject()), "-L anon");
        await stillServing(p, qemuImgInfo(anonClientObject()));
        await sameServerLines(p, "anon");
        const cmp = await run(["qemu-img", "compare", "-f", "raw", imageOf(p.ref), imageOf(p.sub)]);
        assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
      })
    ),
});

// ---------------------------------------------------------------------------------------------
// authz

/** Server arguments: x509 with verify-peer on, the authz object(s) `objs`, --tls-authz authz0. */
function authzArgs(objs: readonly string[]): string[] {
  return [
    ...x509ServerArgs(fx.server, true),
    ...objs.flatMap((o) => ["--object", o]),
    "--tls-authz",
    "authz0",
  ];
}

const HN = ",tls-hostname=127.0.0.1";

/** The line qemu-nbd prints when it denies `dn`. */
function deniedLine(dn: string): string {
  return `qemu-nbd: option negotiation failed: TLS x509 authz check for ${dn} is denied`;
}

Deno.test({
  name: "tls authz: authz-simple and authz-list (exact, glob, allow and deny) admit one DN only",
  fn: () =>
    withTempDir(async (dir) => {
      const c1 = commas(fx.client1Dn);
      const c3 = commas(fx.client3Dn);
      const variants: [string, string][] = [
        ["authz-simple", `authz-simple,id=authz0,identity=${c1}`],
        [
          "authz-list exact",
          `authz-list,id=authz0,policy=deny,rules.0.match=${c1},rules.0.policy=allow`,
        ],
        [
          "authz-list glob",
          "authz-list,id=authz0,policy=deny,rules.0.match=C=NZ,,*client1,,CN=*,rules.0.policy=allow,rules.0.format=glob",
        ],
        [
          "authz-list deny rule, allow policy",
          `authz-list,id=authz0,policy=allow,rules.0.match=${c3},rules.0.policy=deny`,
        ],
      ];
      for (const [name, obj] of variants) {
        await withPair(dir, { transport: "unix", args: authzArgs([obj]) }, async (p) => {
          ok(
            await same(`${name}: client1`, p, qemuImgInfo(x509ClientObject(fx.client1), HN)),
            name,
          );
          refused(
            await same(`${name}: client3`, p, qemuImgInfo(x509ClientObject(fx.client3), HN)),
            `${name} client3`,
            /the server ended the connection/,
          );
          ok(
            await sameList(`${name} client1`, p, x509ClientObject(fx.client1), [
              "--tls-hostname",
              "127.0.0.1",
            ]),
            "-L",
          );
          await stillServing(p, qemuImgInfo(x509ClientObject(fx.client1), HN));
          const lines = await sameServerLines(p, name);
          assert.ok(
            lines.includes(deniedLine(fx.client3Dn)),
            `${name}: qemu-nbd's lines: ${lines.join("\n")}`,
          );
        });
      }
      // verify-peer=off: no certificate is checked, so authz is not consulted either.
      await withPair(dir, {
        transport: "unix",
        args: [
          ...x509ServerArgs(fx.server, false),
          ...["--object", variants[0]![1], "--tls-authz", "authz0"],
        ],
      }, async (p) => {
        ok(
          await same("verify-peer=off: client3", p, qemuImgInfo(x509ClientObject(fx.client3), HN)),
          "vp off",
        );
        ok(
          await same("verify-peer=off: no cert", p, qemuImgInfo(x509ClientObject(fx.nocert), HN)),
          "vp off",
        );
        await sameServerLines(p, "authz verify-peer=off");
      });
      // An authz id that names nothing: found out per connection.
      await withPair(dir, {
        transport: "unix",
        args: [...x509ServerArgs(fx.server, true), "--tls-authz", "nosuch"],
      }, async (p) => {
        refused(
          await same("unknown authz id", p, qemuImgInfo(x509ClientObject(fx.client1), HN)),
          "nosuch",
          /.+/,
        );
        const lines = await sameServerLines(p, "unknown authz");
        assert.ok(lines.some((l) => l.includes("nosuch")), lines.join("\n"));
      });
    }),
});

/** qemu-img info against one server; what it saw, normalised. */
async function seenBy(s: Server, argv: string[]): Promise<Seen> {
  const r = await run(argv, { timeoutMs: 20_000 });
  return { code: r.code, stdout: normalise(r.stdout, [s]), stderr: normalise(r.stderr, [s]) };
}

// Debian's qemu-nbd 7.2 cannot create authz-listfile ("invalid object type": its build lacks
// the file monitor), so this one has no reference run: the outcomes asked of it are the ones
// qemu-nbd gives with the same rules as an authz-list above.
Deno.test({
  name: "tls authz-listfile: rules from a JSON file, re-read with refresh=on (denbd only)",
  ignore: SERVER_KIND !== "denbd",
  fn: () =>
    withTempDir(async (dir) => {
      const rules = `${dir}/rules.json`;
      const write = (allow: readonly string[]) =>
        Deno.writeTextFile(
          rules,
          JSON.stringify({
            rules: allow.map((match) => ({ match, policy: "allow" })),
            policy: "deny",
          }),
        );
      await write([fx.client1Dn]);
      const image = `${dir}/disk.img`;
      await makeImage(image);
      const s = await Server.start({
        dir,
        image,
        kind: "denbd",
        args: [
          "-f",
          "raw",
          "-t",
          ...authzArgs([`authz-listfile,id=authz0,filename=${rules},refresh=on`]),
        ],
      });
      try {
        const c1 = qemuImgInfo(x509ClientObject(fx.client1), HN)(s);
        const c3 = qemuImgInfo(x509ClientObject(fx.client3), HN)(s);
        ok(await seenBy(s, c1), "client1 allowed by the file");
        refused(await seenBy(s, c3), "client3 denied", /the server ended the connection/);
        await write([fx.client1Dn, fx.client3Dn]);
        ok(await seenBy(s, c3), "client3 allowed after the file changed");
        await write([]);
        refused(await seenBy(s, c1), "client1 denied after the file changed", /ended the conn/);
        assert.ok(s.running, "still serving");
        const lines = serverLines(s);
        assert.deepEqual(
          lines.filter((l) => l.includes("authz")),
          [deniedLine(fx.client1Dn), deniedLine(fx.client3Dn)],
          lines.join("\n"),
        );
      } finally {
        await s.stop();
      }
    }),
});

// ---------------------------------------------------------------------------------------------
// A server without TLS, TLS clients

Deno.test({
  name: "tls clients to a plain server: refused with qemu-nbd's words",
  fn: () =>
    withTempDir((dir) =>
      withPair(dir, { transport: "tcp", args: [] }, async (p) => {
        const c1 = x509ClientObject(fx.client1);
        refused(
          await same("x509 client to plain server", p, qemuImgInfo(c1)),
          "qemu-img",
          /Denied by server for option 5 \(starttls\)\nserver reported: TLS not configured/,
        );
        refused(
          await same(
            "nbdinfo nbds to plain server",
            p,
            (s) => ["nbdinfo", nbdsUri(s, `tls-certificates=${fx.client1}`)],
          ),
          "nbdinfo",
          /nbdinfo: /,
        );
        refused(await sameList("to plain server", p, c1), "-L", /Denied by server for option 5/);
        await stillServing(p, qemuImgInfo(undefined));
        await sameServerLines(p, "plain server");
      })
    ),
});

// ---------------------------------------------------------------------------------------------
// Start-up errors

Deno.test({
  name: "tls start-up errors: the same message, byte for byte, and exit code",
  fn: () =>
    withTempDir(async (dir) => {
      const image = `${dir}/disk.img`;
      await makeSparseImage(image, MiB);
      // Server dirs with one file missing, or a bad one.
      const partial = async (name: string, files: string[], bad?: string) => {
        const d = `${dir}/${name}`;
        await Deno.mkdir(d);
        for (const f of files) await Deno.copyFile(`${fx.server}/${f}`, `${d}/${f}`);
        if (bad !== undefined) await Deno.writeTextFile(`${d}/${bad}`, "not a certificate\n");
        return d;
      };
      const noKey = await partial("nokey", ["ca-cert.pem", "server-cert.pem"]);
      const noCert = await partial("nocert", ["ca-cert.pem", "server-key.pem"]);
      const noCa = await partial("noca", ["server-cert.pem", "server-key.pem"]);
      const badCert = await partial(
        "badcert",
        ["ca-cert.pem", "server-key.pem"],
        "server-cert.pem",
      );
      const badCa = await partial("badca", ["server-cert.pem", "server-key.pem"], "ca-cert.pem");
      const emptyPsk = `${dir}/emptypsk`;
      await Deno.mkdir(emptyPsk);
      const x = (d: string, more = "") => [
        "--object",
        `tls-creds-x509,id=tls0,endpoint=server,dir=${d}${more}`,
        "--tls-creds",
        "tls0",
      ];
      const cases: [string, string[]][] = [
        ["endpoint=client for a server", [
          "--object",
          `tls-creds-x509,id=tls0,endpoint=client,dir=${fx.client1}`,
          "--tls-creds",
          "tls0",
        ]],
        ["dir that does not exist", x(`${dir}/nonexistent`)],
        ["no server-key.pem", x(noKey)],
        ["no server-cert.pem", x(noCert)],
        ["no ca-cert.pem", x(noCa)],
        ["garbage server-cert.pem", x(badCert)],
        ["garbage ca-cert.pem", x(badCa)],
        ["verify-peer=maybe", x(fx.server, ",verify-peer=maybe")],
        ["no dir", ["--object", "tls-creds-x509,id=tls0,endpoint=server", "--tls-creds", "tls0"]],
        ["unknown --tls-creds id", [...x(fx.server).slice(0, 2), "--tls-creds", "nosuch"]],
        ["--tls-creds without --object", ["--tls-creds", "tls0"]],
        ["--tls-creds naming a secret", [
          "--object",
          "secret,id=sec0,data=abc",
          "--tls-creds",
          "sec0",
        ]],
        ["--tls-authz without --tls-creds", ["--tls-authz", "authz0"]],
        ["--tls-hostname without -L", [...x(fx.server), "--tls-hostname", "h"]],
        ["psk with no keys.psk", pskServerArgs(emptyPsk)],
        ["psk server with a username", [
          "--object",
          `tls-creds-psk,id=tls0,endpoint=server,dir=${fx.psk1},username=psk1`,
          "--tls-creds",
          "tls0",
        ]],
        ["duplicate object id", [...x(fx.server).slice(0, 2), ...x(fx.server)]],
        ["unknown endpoint", x(fx.server, ",endpoint=sideways")],
      ];
      const sock = `${dir}/never.sock`;
      for (const [what, args] of cases) {
        const outs: Seen[] = [];
        for (const kind of new Set<ServerKind>(["qemu-nbd", SERVER_KIND])) {
          const r = await run([...serverArgv(kind), "-k", sock, "-f", "raw", ...args, image], {
            timeoutMs: 15_000,
          });
          outs.push({
            code: r.code,
            stdout: normalise(r.stdout),
            stderr: normalise(r.stderr.replaceAll(dir, "DIR")),
          });
        }
        const [want, got] = [outs[0]!, outs[outs.length - 1]!];
        assert.equal(want.code, 1, `${what}: qemu-nbd exits 1 (${want.stderr})`);
        assert.match(want.stderr, /^qemu-nbd: .+\n/, what);
        assert.deepEqual(got, want, `${what}: ${SERVER_KIND} differs from qemu-nbd`);
      }
      // -L with server credentials, and with a server-only option.
      const listCases: [string, string[]][] = [
        ["-L with endpoint=server", [...x(fx.server)]],
        ["-L with --tls-authz", [
          "--object",
          x509ClientObject(fx.client1),
          "--tls-creds",
          "tls0",
          "--tls-authz",
          "a",
        ]],
      ];
      for (const [what, args] of listCases) {
        const outs: Seen[] = [];
        for (const kind of new Set<ServerKind>(["qemu-nbd", SERVER_KIND])) {
          const r = await run([...serverArgv(kind), "-L", "-k", sock, ...args], {
            timeoutMs: 15_000,
          });
          outs.push({ code: r.code, stdout: normalise(r.stdout), stderr: normalise(r.stderr) });
        }
        assert.equal(outs[0]!.code, 1, `${what}: ${outs[0]!.stderr}`);
        assert.deepEqual(outs[outs.length - 1], outs[0], `${what}: ${SERVER_KIND} differs`);
      }
    }),
});

// ---------------------------------------------------------------------------------------------
// Stalled handshakes

/** Greeting, fixed-newstyle flags, STARTTLS and its ACK; returns the raw connection. */
async function startTlsRaw(s: Server): Promise<Deno.Conn> {
  const conn = await s.connect();
  const greet = await readWithTimeout(conn, 18, 3000);
  assert.ok(greet !== null && greet.length === 18, "greeting");
  const req = new Uint8Array(4 + 16);
  const v = new DataView(req.buffer);
  v.setUint32(0, 3); // FIXED_NEWSTYLE | NO_ZEROES
  v.setBigUint64(4, 0x49484156454f5054n); // IHAVEOPT
  v.setUint32(12, 5); // STARTTLS
  v.setUint32(16, 0);
  await conn.write(req);
  const rep = await readWithTimeout(conn, 20, 3000);
  assert.ok(rep !== null && rep.length === 20, "STARTTLS reply");
  assert.equal(new DataView(rep.buffer).getUint32(12), 1, "STARTTLS ACKed");
  return conn;
}

Deno.test({
  name: "tls stalled handshakes: clients stuck in TLS do not block others",
  fn: () =>
    withTempDir((dir) =>
      withPair(dir, { transport: "tcp", args: x509ServerArgs(fx.server, true) }, async (p) => {
        const stalled: Deno.Conn[] = [];
        try {
          for (const s of [p.ref, p.sub]) {
            stalled.push(await startTlsRaw(s)); // nothing after the ACK
            const half = await startTlsRaw(s);
            // A handshake record header announcing 512 bytes, and only 100 of them.
            await half.write(
              new Uint8Array([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]),
            );
            await half.write(new Uint8Array(91).fill(3));
            stalled.push(half);
          }
          const c1 = x509ClientObject(fx.client1);
          ok(await same("qemu-img while others stall", p, qemuImgInfo(c1)), "qemu-img");
          ok(
            await same(
              "nbdinfo while others stall",
              p,
              (s) => ["nbdinfo", "--size", nbdsUri(s, `tls-certificates=${fx.client1}`)],
            ),
            "nbdinfo",
          );
          // Still stalled, not dropped (qemu-nbd's limit is 10 s).
          for (const c of stalled) {
            await assert.rejects(readWithTimeout(c, 1, 300), /timed out/);
          }
        } finally {
          for (const c of stalled) closeQuietly(c);
        }
      })
    ),
});

Deno.test({
  name: "tls stalled handshakes: --handshake-limit=1 drops them (denbd only)",
  ignore: SERVER_KIND !== "denbd",
  fn: () =>
    withTempDir(async (dir) => {
      const image = `${dir}/disk.img`;
      await makeImage(image);
      const s = await Server.start({
        dir,
        image,
        kind: "denbd",
        transport: "tcp",
        args: ["-f", "raw", "-t", "-e", "0", "--handshake-limit=1", ...x509ServerArgs(fx.server)],
      });
      const conns: Deno.Conn[] = [];
      try {
        conns.push(await startTlsRaw(s));
        const half = await startTlsRaw(s);
        await half.write(new Uint8Array([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]));
        conns.push(half);
        const t0 = Date.now();
        for (const c of conns) {
          assert.equal(await readWithTimeout(c, 1, 5000), null, "dropped by the server");
        }
        const waited = Date.now() - t0;
        assert.ok(waited >= 500 && waited < 4000, `dropped after ${waited} ms`);
        const r = await run([
          "qemu-img",
          "info",
          "--object",
          x509ClientObject(fx.client1),
          "--image-opts",
          `driver=nbd,host=127.0.0.1,port=${s.port},tls-creds=tls0`,
        ]);
        assert.equal(r.code, 0, r.stderr);
      } finally {
        for (const c of conns) closeQuietly(c);
        await s.stop();
      }
    }),
});
