/**
 * X.509 checks with qemu's wording: the start-up sanity check of a tls-creds-x509 object's own
 * certificate and CA (sanity-check=on, the default), and the peer checks after a handshake
 * (verify-peer=on). Both speak through GnuTLS's certificate functions.
 *
 * @module
 */

import {
  allocate,
  cstr,
  datum,
  gnutls,
  GNUTLS_CERT_INSECURE_ALGORITHM,
  GNUTLS_CERT_INVALID,
  GNUTLS_CERT_REVOKED,
  GNUTLS_CERT_SIGNER_NOT_FOUND,
  GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE,
  GNUTLS_E_SHORT_MEMORY_BUFFER,
  GNUTLS_KEY_DIGITAL_SIGNATURE,
  GNUTLS_KEY_KEY_CERT_SIGN,
  GNUTLS_X509_FMT_DER,
  GNUTLS_X509_FMT_PEM,
  gnutlsError,
} from "../../ffi/gnutls.ts";

/** A failed check: `message` is qemu's text. */
export class TlsCheckError extends Error {
  override name = "TlsCheckError";
}

const KP_TLS_WWW_SERVER = "1.3.6.1.5.5.7.3.1";
const KP_TLS_WWW_CLIENT = "1.3.6.1.5.5.7.3.2";
const KP_ANY = "2.5.29.37.0";
const MAX_CA_CERTS = 16;

/** Why GnuTLS's verification status refuses a certificate, in qemu's words. */
export function verifyStatusReason(status: number): string {
  let reason = "Invalid certificate";
  if (status & GNUTLS_CERT_INVALID) reason = "The certificate is not trusted";
  if (status & GNUTLS_CERT_SIGNER_NOT_FOUND) reason = "The certificate hasn't got a known issuer";
  if (status & GNUTLS_CERT_REVOKED) reason = "The certificate has been revoked";
  if (status & GNUTLS_CERT_INSECURE_ALGORITHM) {
    reason = "The certificate uses an insecure algorithm";
  }
  return reason;
}

/** Role words for messages. */
function role(isServer: boolean): string {
  return isServer ? "server" : "client";
}

/** Read a PEM file's text as qemu does (its length is up to the first NUL). */
function readPem(file: string): Uint8Array<ArrayBuffer> {
  let bytes: Uint8Array<ArrayBuffer>;
  try {
    bytes = Deno.readFileSync(file) as Uint8Array<ArrayBuffer>;
  } catch (e) {
    throw new TlsCheckError(`Cannot load CA cert list ${file}: ${fileError(file, e)}`);
  }
  const nul = bytes.indexOf(0);
  return nul >= 0 ? bytes.slice(0, nul) : bytes;
}

/** GLib's wording for a file it failed to read. */
function fileError(file: string, e: unknown): string {
  const why = e instanceof Deno.errors.NotFound
    ? "No such file or directory"
    : e instanceof Deno.errors.PermissionDenied
    ? "Permission denied"
    : e instanceof Error
    ? (/^(.*?) \(os error \d+\)/.exec(e.message)?.[1] ?? e.message)
    : String(e);
  return `Failed to open file “${file}”: ${why}`;
}

function newCert(): Deno.PointerValue {
  const c = allocate((out) => gnutls().gnutls_x509_crt_init(out));
  if (typeof c === "number") {
    throw new TlsCheckError(`Unable to initialize certificate: ${gnutlsError(c)}`);
  }
  return c;
}

function loadCert(file: string, isServer: boolean): Deno.PointerValue {
  const cert = newCert();
  const pem = readPem(file);
  const r = gnutls().gnutls_x509_crt_import(
    cert,
    Deno.UnsafePointer.of(datum(pem)),
    GNUTLS_X509_FMT_PEM,
  );
  if (r < 0) {
    gnutls().gnutls_x509_crt_deinit(cert);
    throw new TlsCheckError(
      `Unable to import ${role(isServer)} certificate ${file}: ${gnutlsError(r)}`,
    );
  }
  return cert;
}

function loadCaList(file: string): Deno.PointerValue[] {
  const pem = readPem(file);
  const list = new BigUint64Array(MAX_CA_CERTS);
  const max = new Uint32Array([MAX_CA_CERTS]);
  const r = gnutls().gnutls_x509_crt_list_import(list, max, datum(pem), GNUTLS_X509_FMT_PEM, 0);
  if (r < 0) throw new TlsCheckError(`Unable to import CA certificate list ${file}`);
  return Array.from(list.subarray(0, max[0]!), (p) => Deno.UnsafePointer.create(p));
}

function nowSeconds(): bigint {
  return BigInt(Math.floor(Date.now() / 1000));
}

function checkTimes(cert: Deno.PointerValue, file: string, isServer: boolean, isCA: boolean) {
  const what = isCA ? "CA" : role(isServer);
  const now = nowSeconds();
  if (gnutls().gnutls_x509_crt_get_expiration_time(cert) < now) {
    throw new TlsCheckError(`The ${what} certificate ${file} has expired`);
  }
  if (gnutls().gnutls_x509_crt_get_activation_time(cert) > now) {
    throw new TlsCheckError(`The ${what} certificate ${file} is not yet active`);
  }
}

function checkBasicConstraints(
  cert: Deno.PointerValue,
  file: string,
  isServer: boolean,
  isCA: boolean,
) {
  const status = gnutls().gnutls_x509_crt_get_basic_constraints(cert, null, null, null);
  if (status > 0) {
    if (!isCA) {
      throw new TlsCheckError(
        `The certificate ${file} basic constraints show a CA, but we need one for a ${
          role(isServer)
        }`,
      );
    }
  } else if (status === 0) {
    if (isCA) {
      throw new TlsCheckError(`The certificate ${file} basic constraints do not show a CA`);
    }
  } else if (status === GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
    if (isCA) {
      throw new TlsCheckError(`The certificate ${file} is missing basic constraints for a CA`);
    }
  } else {
    throw new TlsCheckError(
      `Unable to query certificate ${file} basic constraints: ${gnutlsError(status)}`,
    );
  }
}

function checkKeyUsage(cert: Deno.PointerValue, file: string, isCA: boolean) {
  const usage = new Uint32Array(1);
  const critical = new Uint32Array(1);
  const status = gnutls().gnutls_x509_crt_get_key_usage(cert, usage, critical);
  let bits = usage[0]!;
  if (status < 0) {
    if (status !== GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
      throw new TlsCheckError(
        `Unable to query certificate ${file} key usage: ${gnutlsError(status)}`,
      );
    }
    bits = isCA ? GNUTLS_KEY_KEY_CERT_SIGN : GNUTLS_KEY_DIGITAL_SIGNATURE;
  }
  if (isCA && !(bits & GNUTLS_KEY_KEY_CERT_SIGN) && critical[0]) {
    throw new TlsCheckError(`Certificate ${file} usage does not permit certificate signing`);
  }
  if (!isCA && !(bits & GNUTLS_KEY_DIGITAL_SIGNATURE) && critical[0]) {
    throw new TlsCheckError(`Certificate ${file} usage does not permit digital signature`);
  }
}

function checkKeyPurpose(cert: Deno.PointerValue, file: string, isServer: boolean) {
  let allowServer = false;
  let allowClient = false;
  let critical = false;
  const size = new BigUint64Array(1);
  const purposeCritical = new Uint32Array(1);
  for (let i = 0; i < 64; i++) {
    size[0] = 0n;
    let status = gnutls().gnutls_x509_crt_get_key_purpose_oid(cert, i, null, size, null);
    if (status === GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
      if (i === 0) allowServer = allowClient = true;
      break;
    }
    if (status !== GNUTLS_E_SHORT_MEMORY_BUFFER) {
      throw new TlsCheckError(
        `Unable to query certificate ${file} key purpose: ${gnutlsError(status)}`,
      );
    }
    const buf = new Uint8Array(Number(size[0]));
    status = gnutls().gnutls_x509_crt_get_key_purpose_oid(cert, i, buf, size, purposeCritical);
    if (status < 0) {
      throw new TlsCheckError(
        `Unable to query certificate ${file} key purpose: ${gnutlsError(status)}`,
      );
    }
    if (purposeCritical[0]) critical = true;
    const nul = buf.indexOf(0);
    const oid = new TextDecoder().decode(nul >= 0 ? buf.subarray(0, nul) : buf);
    if (oid === KP_TLS_WWW_SERVER) allowServer = true;
    else if (oid === KP_TLS_WWW_CLIENT) allowClient = true;
    else if (oid === KP_ANY) allowServer = allowClient = true;
  }
  if (isServer && !allowServer && critical) {
    throw new TlsCheckError(`Certificate ${file} purpose does not allow use with a TLS server`);
  }
  if (!isServer && !allowClient && critical) {
    throw new TlsCheckError(`Certificate ${file} purpose does not allow use with a TLS client`);
  }
}

function checkCert(cert: Deno.PointerValue, file: string, isServer: boolean, isCA: boolean) {
  checkTimes(cert, file, isServer, isCA);
  checkBasicConstraints(cert, file, isServer, isCA);
  checkKeyUsage(cert, file, isCA);
  if (!isCA) checkKeyPurpose(cert, file, isServer);
}

function pointerArray(ptrs: readonly Deno.PointerValue[]): BigUint64Array {
  return BigUint64Array.from(ptrs, (p) => BigInt(Deno.UnsafePointer.value(p)));
}

function checkPair(
  cert: Deno.PointerValue,
  certFile: string,
  cas: readonly Deno.PointerValue[],
  caFile: string,
  isServer: boolean,
) {
  const status = new Uint32Array(1);
  const r = gnutls().gnutls_x509_crt_list_verify(
    pointerArray([cert]),
    1,
    pointerArray(cas),
    cas.length,
    null,
    0,
    0,
    status,
  );
  if (r < 0) {
    throw new TlsCheckError(
      `Unable to verify ${role(isServer)} certificate ${certFile} against CA certificate ${caFile}`,
    );
  }
  if (status[0] !== 0) {
    throw new TlsCheckError(
      `Our own certificate ${certFile} failed validation against ${caFile}: ${
        verifyStatusReason(status[0]!)
      }`,
    );
  }
}

function readable(file: string): boolean {
  try {
    const f = Deno.openSync(file, { read: true });
    f.close();
    return true;
  } catch {
    return false;
  }
}

/**
 * The start-up check of an x509 object's files (qemu's sanity check): the certificate (when
 * readable) and every CA certificate must be valid now and fit for their role, and the
 * certificate must verify against the CAs.
 */
export function sanityCheckX509(
  isServer: boolean,
  caFile: string,
  certFile: string | undefined,
): void {
  let cert: Deno.PointerValue = null;
  let cas: Deno.PointerValue[] = [];
  try {
    if (certFile !== undefined && readable(certFile)) cert = loadCert(certFile, isServer);
    if (readable(caFile)) cas = loadCaList(caFile);
    if (cert !== null) checkCert(cert, certFile!, isServer, false);
    for (const ca of cas) checkCert(ca, caFile, isServer, true);
    if (cert !== null && cas.length > 0) checkPair(cert, certFile!, cas, caFile, isServer);
  } finally {
    if (cert !== null) gnutls().gnutls_x509_crt_deinit(cert);
    for (const ca of cas) gnutls().gnutls_x509_crt_deinit(ca);
  }
}

/** What the peer checks learned: the peer certificate's distinguished name. */
export interface PeerIdentity {
  readonly dn: string;
}

/**
 * After a handshake with verify-peer on: the peer's chain must verify, every certificate must be
 * valid now; the first one's DN goes to `authorize` (which throws to refuse), and its names must
 * match `hostname` when there is one (a client without one cannot check the server).
 */
export function checkPeerCertificate(
  session: Deno.PointerValue,
  hostname: string | undefined,
  isClient: boolean,
  authorize: (dn: string) => void,
): PeerIdentity {
  const g = gnutls();
  const status = new Uint32Array(1);
  const r = g.gnutls_certificate_verify_peers2(session, status);
  if (r < 0) throw new TlsCheckError(`Verify failed: ${gnutlsError(r)}`);
  if (status[0] !== 0) throw new TlsCheckError(verifyStatusReason(status[0]!));
  const count = new Uint32Array(1);
  const list = g.gnutls_certificate_get_peers(session, count);
  if (list === null) throw new TlsCheckError("No certificate peers");
  const now = nowSeconds();
  let dn = "";
  for (let i = 0; i < count[0]!; i++) {
    const cert = newCert();
    try {
      const item = Deno.UnsafePointer.offset(list, i * 16);
      const ir = g.gnutls_x509_crt_import(cert, item, GNUTLS_X509_FMT_DER);
      if (ir < 0) throw new TlsCheckError(`Cannot import certificate: ${gnutlsError(ir)}`);
      if (g.gnutls_x509_crt_get_expiration_time(cert) < now) {
        throw new TlsCheckError("The certificate has expired");
      }
      if (g.gnutls_x509_crt_get_activation_time(cert) > now) {
        throw new TlsCheckError("The certificate is not yet activated");
      }
      if (i === 0) {
        dn = certificateDn(cert);
        authorize(dn);
        if (hostname !== undefined) {
          if (!g.gnutls_x509_crt_check_hostname(cert, cstr(hostname))) {
            throw new TlsCheckError(`Certificate does not match the hostname ${hostname}`);
          }
        } else if (isClient) {
          throw new TlsCheckError("No hostname for certificate validation");
        }
      }
    } finally {
      g.gnutls_x509_crt_deinit(cert);
    }
  }
  return { dn };
}

/** The certificate's subject DN as GnuTLS formats it (RFC 4514 order, as qemu logs it). */
function certificateDn(cert: Deno.PointerValue): string {
  const size = new BigUint64Array([1024n]);
  for (let attempt = 0; attempt < 4; attempt++) {
    const buf = new Uint8Array(Number(size[0]));
    const r = gnutls().gnutls_x509_crt_get_dn(cert, buf, size);
    if (r === GNUTLS_E_SHORT_MEMORY_BUFFER) continue;
    if (r < 0) throw new TlsCheckError(`Cannot get client distinguished name: ${gnutlsError(r)}`);
    return new TextDecoder().decode(buf.subarray(0, Number(size[0])));
  }
  throw new TlsCheckError("Cannot get client distinguished name: name too long");
}
