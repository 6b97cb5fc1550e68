/**
 * TLS at the byte level, differential: raw option requests to qemu-nbd 7.2 and the server under
 * test, both in forced-TLS mode with the same x509 credentials, and the replies compared whole
 * (type, option, and the error text qemu puts in them). Then the upgrade itself with Deno's
 * own TLS client (rustls, not GnuTLS): a second STARTTLS, what is left of the options refused
 * before TLS, and a read. Last, the TLS versions offered by an OpenSSL client (python's ssl).
 *
 * The servers run with verify-peer=off: Deno.startTls cannot present a client certificate.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  makeSparseImage,
  MiB,
  PYTHON,
  run,
  Server,
  SERVER_KIND,
  type ServerKind,
  withServers,
  withTempDir,
} from "./_harness.ts";
import {
  CMD,
  infoRequest,
  metaContextQuery,
  OPT,
  type OptReply,
  RawConn,
  repName,
  SIMPLE_REPLY_MAGIC,
  view,
} from "./_nbd_raw.ts";
import { makeTlsFixture, type TlsFixture, x509ServerArgs } from "./_tls.ts";

const fx: TlsFixture = await makeTlsFixture();
globalThis.addEventListener("unload", () => {
  try {
    Deno.removeSync(fx.root, { recursive: true });
  } catch { /* already gone */ }
});

const dec = new TextDecoder();

/** qemu-nbd and the server under test, on copies of one image (0x11 at 1 MiB), over TCP. */
async function withTlsPair(fn: (servers: Server[]) => Promise<void>): Promise<void> {
  await withTempDir(async (dir) => {
    const kinds: ServerKind[] = ["qemu-nbd", SERVER_KIND];
    const specs = await Promise.all(kinds.map(async (kind, i) => {
      const image = `${dir}/disk${i}.img`;
      await makeSparseImage(image, 4 * MiB, [{ offset: MiB, length: MiB, fill: 0x11 }]);
      return {
        dir,
        image,
        kind,
        transport: "tcp" as const,
        args: ["-f", "raw", "-t", ...x509ServerArgs(fx.server, false)],
      };
    }));
    await withServers(specs, fn);
  });
}

/** An option reply as comparable text: option, type name, and its data (text if printable). */
function show(r: OptReply): string {
  const text = dec.decode(r.data);
  const data = /^[\x20-\x7e]*$/.test(text)
    ? JSON.stringify(text)
    : Array.from(r.data, (b) => b.toString(16).padStart(2, "0")).join("");
  return `opt ${r.option} ${repName(r.type)} ${data}`;
}

/** One option and its reply, or "closed" when the server hung up instead. */
async function ask(c: RawConn, option: number, data?: Uint8Array): Promise<string> {
  try {
    await c.sendOption(option, data);
    return show(await c.optReply());
  } catch (e) {
    if (await c.waitClosed(3000)) return `opt ${option}: closed`;
    throw e;
  }
}

/** Whether the server closes the connection (within 3 s) without sending anything more. */
async function closesQuietly(c: RawConn): Promise<string> {
  try {
    const b = await c.readExact(1, 3000);
    return `sent ${b.length} byte(s)`;
  } catch (e) {
    return /timed out/.test((e as Error).message) ? "still open" : "closed";
  }
}

/** Runs `script` on each server (a fresh raw connection each) and asserts the transcripts match. */
async function sameTranscript(
  servers: readonly Server[],
  what: string,
  script: (c: RawConn) => Promise<string[]>,
): Promise<string[]> {
  const out: string[][] = [];
  for (const s of servers) {
    const c = new RawConn(await s.connect());
    try {
      out.push(await script(c));
    } finally {
      c.close();
    }
  }
  assert.deepEqual(out[1], out[0], `${what}: ${SERVER_KIND} differs from qemu-nbd`);
  return out[0]!;
}

Deno.test({
  name: "tls raw: before STARTTLS every option is refused as qemu-nbd refuses it",
  fn: () =>
    withTlsPair(async (servers) => {
      const options: [number, Uint8Array?][] = [
        [OPT.LIST],
        [OPT.INFO, infoRequest("", [])],
        [OPT.GO, infoRequest("", [])],
        [OPT.STRUCTURED_REPLY],
        [OPT.LIST_META_CONTEXT, metaContextQuery("", ["base:allocation"])],
        [OPT.SET_META_CONTEXT, metaContextQuery("", ["base:allocation"])],
        [OPT.EXTENDED_HEADERS],
        [0x42],
        [OPT.STARTTLS, new Uint8Array(4)], // STARTTLS carrying data
      ];
      const t = await sameTranscript(servers, "options before TLS", async (c) => {
        await c.handshake();
        const lines: string[] = [];
        for (const [o, d] of options) lines.push(await ask(c, o, d));
        lines.push(await closesQuietly(c));
        return lines;
      });
      // What qemu-nbd 7.2 answers, so the comparison above compares something.
      for (const line of t.slice(0, 8)) assert.match(line, / ERR_TLS_REQD "Option 0x/, line);
      assert.match(t[8]!, /^opt 5 ERR_INVALID /, t[8]);
      assert.equal(t[9], "closed", "STARTTLS with data ends the negotiation");

      const abort = await sameTranscript(servers, "ABORT before TLS", async (c) => {
        await c.handshake();
        return [await ask(c, OPT.ABORT), await closesQuietly(c)];
      });
      assert.match(abort[0]!, /^opt 2 ERR_TLS_REQD /, abort[0]);
      assert.equal(abort[1], "closed");

      const exportName = await sameTranscript(servers, "EXPORT_NAME before TLS", async (c) => {
        await c.handshake();
        await c.sendOption(OPT.EXPORT_NAME);
        return [await closesQuietly(c)];
      });
      assert.deepEqual(exportName, ["closed"], "EXPORT_NAME before TLS: dropped, nothing sent");

      // A client without FIXED_NEWSTYLE cannot send STARTTLS at all.
      await sameTranscript(servers, "non-fixed newstyle", async (c) => {
        await c.handshake(0);
        return [await ask(c, OPT.STARTTLS), await closesQuietly(c)];
      });
    }),
});

/** STARTTLS, then the TLS handshake with Deno's client; a RawConn over the TLS stream. */
async function upgrade(c: RawConn): Promise<RawConn> {
  await c.sendOption(OPT.STARTTLS);
  const r = await c.optReply();
  assert.equal(repName(r.type), "ACK", "STARTTLS acknowledged");
  const tls = await Deno.startTls(c.conn as Deno.TcpConn, {
    hostname: "127.0.0.1",
    caCerts: [fx.ca1Pem],
  });
  await tls.handshake();
  return new RawConn(tls);
}

Deno.test({
  name: "tls raw: after STARTTLS nothing tried before it stands; a second STARTTLS is refused",
  fn: () =>
    withTlsPair(async (servers) => {
      const t = await sameTranscript(servers, "the upgrade", async (plain) => {
        await plain.handshake();
        const lines = [await ask(plain, OPT.STRUCTURED_REPLY)];
        const c = await upgrade(plain);
        try {
          lines.push(await ask(c, OPT.STARTTLS));
          // Structured replies were asked for (and refused) before TLS only: a meta context
          // needs them, so this is refused, and READ gets a simple reply.
          lines.push(
            await ask(c, OPT.SET_META_CONTEXT, metaContextQuery("", ["base:allocation"])),
          );
          await c.sendOption(OPT.GO, infoRequest("", []));
          for (const r of await c.optReplies()) lines.push(show(r));
          await c.request({ type: CMD.READ, offset: MiB - 512, length: 1024, cookie: 9n });
          const h = view(await c.readExact(16));
          lines.push(`reply magic ${h.getUint32(0).toString(16)} error ${h.getUint32(4)}`);
          const data = await c.readExact(1024);
          lines.push(`data ${data[0]} ${data[511]} ${data[512]} ${data[1023]}`);
          await c.request({ type: CMD.DISC, length: 0 });
          lines.push(await closesQuietly(c));
        } finally {
          c.close();
        }
        return lines;
      });
      assert.match(t[0]!, /^opt 8 ERR_TLS_REQD /, t[0]);
      assert.match(t[1]!, /^opt 5 ERR_INVALID /, `second STARTTLS: ${t[1]}`);
      assert.match(t[2]!, /^opt 10 ERR_INVALID /, `meta context without structured: ${t[2]}`);
      assert.ok(t.includes(`reply magic ${SIMPLE_REPLY_MAGIC.toString(16)} error 0`), t.join("\n"));
      assert.ok(t.includes("data 0 0 17 17"), t.join("\n"));
      assert.equal(t[t.length - 1], "closed");
    }),
});

/** Python (OpenSSL): NBD preamble in the clear, STARTTLS, then TLS pinned to one version. */
const VERSION_PROBE = `
import socket, ssl, struct, sys
port, ca, version = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.create_connection(("127.0.0.1", port), timeout=5)
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise SystemExit("closed before TLS")
        b += c
    return b
recv(18)
s.sendall(struct.pack(">IQII", 3, 0x49484156454f5054, 5, 0))
assert struct.unpack(">QIII", recv(20))[2] == 1, "STARTTLS not acknowledged"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
v = getattr(ssl.TLSVersion, version)
ctx.minimum_version = ctx.maximum_version = v
try:
    t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    print("ok", t.version())
except (ssl.SSLError, OSError) as e:
    print("refused")
`;

// qemu-nbd 7.2 on Debian (GnuTLS NORMAL) also accepts TLS 1.1 and 1.0; the server under test
// keeps the floor at 1.2 on purpose (the "-VERS-TLS1.1:-VERS-TLS1.0" it adds to the priority),
// so for those two qemu-nbd shows the probe works and the server under test must refuse.
Deno.test({
  name: "tls raw: TLS 1.2 and 1.3 are spoken as by qemu-nbd; 1.0 and 1.1 are refused",
  fn: () =>
    withTlsPair(async ([ref, sub]) => {
      const ca = `${fx.root}/server/ca-cert.pem`;
      const probe = async (s: Server, version: string) => {
        const r = await run([PYTHON, "-c", VERSION_PROBE, String(s.port), ca, version], {
          timeoutMs: 15_000,
        });
        assert.equal(r.code, 0, r.stderr);
        return r.stdout.trim();
      };
      for (const [version, want] of [["TLSv1_3", "ok TLSv1.3"], ["TLSv1_2", "ok TLSv1.2"]]) {
        assert.equal(await probe(ref!, version!), want, `qemu-nbd, ${version}`);
        assert.equal(await probe(sub!, version!), want, `${SERVER_KIND}, ${version}`);
      }
      if (SERVER_KIND === "qemu-nbd") return;
      for (const version of ["TLSv1_1", "TLSv1"]) {
        // The probe can speak it (else the refusal below would prove nothing).
        assert.match(await probe(ref!, version), /^ok TLSv1(?:\.1)?$/, `qemu-nbd, ${version}`);
        assert.equal(await probe(sub!, version), "refused", version);
      }
    }),
});
