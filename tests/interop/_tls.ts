/**
 * TLS credentials for the TLS interop tests (and the benchmark's TLS rows), made at run time in a
 * temp dir with GnuTLS's certtool, laid out the way qemu's `tls-creds-x509` / `tls-creds-psk`
 * objects read them (and libnbd's `tls-certificates=DIR` / `tls-psk-file=FILE`):
 *
 * - `server/`: ca-cert.pem (CA 1), server-cert.pem, server-key.pem. The server certificate names
 *   127.0.0.1, ::1 and {@linkcode SERVER_DNS_NAME}, but not "localhost", so a client that checks
 *   the host "localhost" fails (as in QEMU's iotest 233).
 * - `client1/`, `client3/`: ca-cert.pem (CA 1), client-cert.pem, client-key.pem, two clients of
 *   CA 1 with different distinguished names (for authz).
 * - `client2/`: the same files, CA 2 and a client certificate CA 2 signed: CA 1's server refuses
 *   it, and it refuses CA 1's server.
 * - `nocert/`: only ca-cert.pem (CA 1): a client without a certificate.
 * - `psk1/keys.psk` (`psk1:HEX`), `psk2/keys.psk` (`psk2:HEX`, another user), `psk1-wrong/keys.psk`
 *   (`psk1:` another key).
 *
 * One key pair signs and serves everything (as QEMU's common.tls does): key generation is the
 * slow part of certtool, and what is tested is the layout, the chains and the names.
 *
 * @module
 */

import { runOk } from "./_harness.ts";

/** A DNS name the server certificate carries (besides its IP addresses). */
export const SERVER_DNS_NAME = "nbd.tls.test";

/** The credentials one test file uses. */
export interface TlsFixture {
  /** The temp dir everything is in; remove it with {@linkcode removeTlsFixture}. */
  readonly root: string;
  /** Server dir of CA 1 (ca-cert.pem, server-cert.pem, server-key.pem). */
  readonly server: string;
  /** Client dir of CA 1 (ca-cert.pem, client-cert.pem, client-key.pem). */
  readonly client1: string;
  /** Another client of CA 1, another DN. */
  readonly client3: string;
  /** A client of CA 2 (its ca-cert.pem is CA 2). */
  readonly client2: string;
  /** CA 1's certificate and nothing else. */
  readonly nocert: string;
  /** Distinguished names of the client certificates, in GnuTLS's (and qemu-nbd's) order. */
  readonly client1Dn: string;
  readonly client3Dn: string;
  /** PSK dirs (keys.psk inside) and their users. */
  readonly psk1: string;
  readonly psk2: string;
  readonly psk1Wrong: string;
  /** PEM text of CA 1 (for Deno.startTls's caCerts). */
  readonly ca1Pem: string;
}

const CA_TEMPLATE = (name: string) => `cn = denbd test CA ${name}\nca\ncert_signing_key\n`;

const SERVER_TEMPLATE = `organization = TLS test server
cn = ${SERVER_DNS_NAME}
dns_name = ${SERVER_DNS_NAME}
ip_address = 127.0.0.1
ip_address = ::1
tls_www_server
encryption_key
signing_key
`;

const CLIENT_TEMPLATE = (name: string) =>
  `country = NZ
locality = R'lyeh
organization = TLS test ${name}
cn = localhost
tls_www_client
encryption_key
signing_key
`;

/** Hex of `n` random bytes. */
function randomHex(n: number): string {
  return Array.from(
    crypto.getRandomValues(new Uint8Array(n)),
    (b) => b.toString(16).padStart(2, "0"),
  )
    .join("");
}

async function certtool(args: readonly string[]): Promise<string> {
  return (await runOk(["certtool", ...args], { timeoutMs: 30_000 })).stdout;
}

/**
 * The subject DN of a client certificate made from {@linkcode CLIENT_TEMPLATE}, in the order
 * GnuTLS's `gnutls_x509_crt_get_dn` gives it (the order qemu-nbd matches authz rules against
 * and logs): the certificate's own RDN order, country first. `certtool -i` prints the reverse
 * (RFC 4514) order, so it cannot be used here. The authz tests check this text against the line
 * qemu-nbd itself prints when it denies the DN.
 */
function clientDn(name: string): string {
  return `C=NZ,L=R'lyeh,O=TLS test ${name},CN=localhost`;
}

/** Makes a fresh set of credentials in a new temp dir (about 0.2 s). */
export async function makeTlsFixture(): Promise<TlsFixture> {
  const root = await Deno.makeTempDir({ prefix: "denbd-tls-" });
  const p = (s: string) => `${root}/${s}`;
  const key = p("key.pem");
  await certtool(["--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", key]);
  const selfSigned = async (name: string) => {
    await Deno.writeTextFile(p(`${name}.info`), CA_TEMPLATE(name));
    await certtool([
      "--generate-self-signed",
      ...["--load-privkey", key, "--template", p(`${name}.info`)],
      ...["--outfile", p(`${name}-cert.pem`)],
    ]);
  };
  await selfSigned("ca1");
  await selfSigned("ca2");
  const signed = async (
    ca: string,
    dir: string,
    template: string,
    file: "server" | "client",
  ) => {
    await Deno.mkdir(p(dir));
    await Deno.writeTextFile(p(`${dir}.info`), template);
    await certtool([
      "--generate-certificate",
      ...["--load-ca-privkey", key, "--load-ca-certificate", p(`${ca}-cert.pem`)],
      ...["--load-privkey", key, "--template", p(`${dir}.info`)],
      ...["--outfile", p(`${dir}/${file}-cert.pem`)],
    ]);
    await Deno.copyFile(p(`${ca}-cert.pem`), p(`${dir}/ca-cert.pem`));
    await Deno.copyFile(key, p(`${dir}/${file}-key.pem`));
  };
  await signed("ca1", "server", SERVER_TEMPLATE, "server");
  await signed("ca1", "client1", CLIENT_TEMPLATE("client1"), "client");
  await signed("ca1", "client3", CLIENT_TEMPLATE("client3"), "client");
  await signed("ca2", "client2", CLIENT_TEMPLATE("client2"), "client");
  await Deno.mkdir(p("nocert"));
  await Deno.copyFile(p("ca1-cert.pem"), p("nocert/ca-cert.pem"));
  const pskKey = randomHex(32);
  const psk = async (dir: string, line: string) => {
    await Deno.mkdir(p(dir));
    await Deno.writeTextFile(p(`${dir}/keys.psk`), `${line}\n`);
  };
  await psk("psk1", `psk1:${pskKey}`);
  await psk("psk2", `psk2:${randomHex(32)}`);
  await psk("psk1-wrong", `psk1:${randomHex(32)}`);
  return {
    root,
    server: p("server"),
    client1: p("client1"),
    client3: p("client3"),
    client2: p("client2"),
    nocert: p("nocert"),
    client1Dn: clientDn("client1"),
    client3Dn: clientDn("client3"),
    psk1: p("psk1"),
    psk2: p("psk2"),
    psk1Wrong: p("psk1-wrong"),
    ca1Pem: await Deno.readTextFile(p("ca1-cert.pem")),
  };
}

/** Removes a fixture's temp dir. */
export async function removeTlsFixture(f: TlsFixture): Promise<void> {
  await Deno.remove(f.root, { recursive: true });
}

// ---------------------------------------------------------------------------------------------
// Arguments for servers and clients

/** `--object tls-creds-x509,...,endpoint=server --tls-creds tls0` (qemu-nbd and denbd). */
export function x509ServerArgs(dir: string, verifyPeer?: boolean): string[] {
  const vp = verifyPeer === undefined ? "" : `,verify-peer=${verifyPeer ? "on" : "off"}`;
  return [
    "--object",
    `tls-creds-x509,id=tls0,endpoint=server,dir=${dir}${vp}`,
    "--tls-creds",
    "tls0",
  ];
}

/** `--object tls-creds-psk,...,endpoint=server --tls-creds tls0`. */
export function pskServerArgs(dir: string): string[] {
  return ["--object", `tls-creds-psk,id=tls0,endpoint=server,dir=${dir}`, "--tls-creds", "tls0"];
}

/** `--object tls-creds-anon,...,endpoint=server --tls-creds tls0`. */
export function anonServerArgs(): string[] {
  return ["--object", "tls-creds-anon,id=tls0,endpoint=server", "--tls-creds", "tls0"];
}

/** The client object qemu-img / qemu-io / qemu-nbd -L take: x509 from `dir`. */
export function x509ClientObject(dir: string): string {
  return `tls-creds-x509,dir=${dir},endpoint=client,id=tls0`;
}

/** The client object for PSK user `user` with keys.psk in `dir`. */
export function pskClientObject(dir: string, user: string): string {
  return `tls-creds-psk,dir=${dir},username=${user},endpoint=client,id=tls0`;
}

/** The anonymous client object. */
export function anonClientObject(): string {
  return "tls-creds-anon,endpoint=client,id=tls0";
}

/** libnbd URI query parameters for x509 (`tls-certificates=DIR`). */
export function libnbdX509(dir: string): string {
  return `tls-certificates=${encodeURIComponent(dir)}`;
}

/** libnbd URI query parameters for PSK (`tls-psk-file=FILE&tls-username=USER`). */
export function libnbdPsk(dir: string, user: string): string {
  return `tls-psk-file=${encodeURIComponent(`${dir}/keys.psk`)}&tls-username=${user}`;
}
