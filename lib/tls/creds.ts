/**
 * Loading `--object tls-creds-*` credentials as qemu does when the object is created: qemu's
 * file layout under `dir` (ca-cert.pem, ca-crl.pem, server-cert.pem, server-key.pem,
 * client-cert.pem, client-key.pem, dh-params.pem, keys.psk), its checks and its messages. The
 * result holds GnuTLS credentials every session of this thread shares.
 *
 * @module
 */

import {
  allocate,
  cstr,
  datum,
  DH_BITS,
  gnutls,
  GNUTLS_CRD_ANON,
  GNUTLS_CRD_CERTIFICATE,
  GNUTLS_CRD_PSK,
  GNUTLS_PSK_KEY_HEX,
  GNUTLS_X509_FMT_PEM,
  gnutlsError,
} from "../../ffi/gnutls.ts";
import { ObjectError } from "../objects/types.ts";
import type { TlsCredsSpec } from "./object_types.ts";
import { sanityCheckX509, TlsCheckError } from "./x509_check.ts";

/** Loaded credentials: what a session needs to start. */
export interface TlsCredentials {
  readonly spec: TlsCredsSpec;
  /** The same as spec.endpoint (what --tls-creds checks). */
  readonly endpoint: TlsCredsSpec["endpoint"];
  /** gnutls_credentials_set's type and handle. */
  readonly credType: number;
  readonly handle: Deno.PointerValue;
  /** The full GnuTLS priority string sessions use. */
  readonly priority: string;
}

/** qemu's default priority (its build's CONFIG_TLS_PRIORITY, Debian: "NORMAL"). */
const DEFAULT_PRIORITY = "NORMAL";
/**
 * Without a priority= of the user's, TLS 1.0 and 1.1 are refused: GnuTLS's NORMAL still
 * offers them, and every client qemu-nbd serves speaks 1.2 or 1.3.
 */
const MODERN_ONLY = ":-VERS-TLS1.1:-VERS-TLS1.0";

/** The priority string qemu builds for each credential type (plus the version floor). */
function priorityFor(spec: TlsCredsSpec): string {
  const base = spec.priority ?? DEFAULT_PRIORITY + MODERN_ONLY;
  switch (spec.kind) {
    case "x509":
      return base;
    case "anon":
      return base + ":+ANON-DH";
    case "psk":
      return base + ":+ECDHE-PSK:+DHE-PSK:+PSK";
  }
}

function errnoText(e: unknown): string {
  if (e instanceof Deno.errors.NotFound) return "No such file or directory";
  if (e instanceof Deno.errors.PermissionDenied) return "Permission denied";
  const msg = e instanceof Error ? e.message : String(e);
  return /^(.*?) \(os error \d+\)/.exec(msg)?.[1] ?? msg;
}

/**
 * `dir/name`, checked as qemu checks it: a missing required file is an error, a missing
 * optional one is undefined, any other failure to stat it is an error.
 */
function credPath(spec: TlsCredsSpec, name: string, required: boolean): string | undefined {
  if (spec.dir === undefined) {
    if (required) throw new ObjectError("Missing 'dir' property value");
    return undefined;
  }
  const path = `${spec.dir}/${name}`;
  try {
    Deno.statSync(path);
    return path;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound && !required) return undefined;
    throw new ObjectError(`Unable to access credentials ${path}: ${errnoText(e)}`);
  }
}

function check(r: number, message: (err: string) => string): void {
  if (r < 0) throw new ObjectError(message(gnutlsError(r)));
}

function handleOf(r: Deno.PointerValue | number, what: string): Deno.PointerValue {
  if (typeof r === "number") throw new ObjectError(`${what}: ${gnutlsError(r)}`);
  return r;
}

/** DH parameters from dh-params.pem, or generated as qemu does when there is none. */
function dhParams(file: string | undefined): Deno.PointerValue {
  const g = gnutls();
  const params = allocate((out) => g.gnutls_dh_params_init(out));
  const p = handleOf(params, "Unable to initialize DH parameters");
  if (file === undefined) {
    check(
      g.gnutls_dh_params_generate2(p, DH_BITS),
      (e) => `Unable to generate DH parameters: ${e}`,
    );
    return p;
  }
  let pem: Uint8Array<ArrayBuffer>;
  try {
    pem = Deno.readFileSync(file) as Uint8Array<ArrayBuffer>;
  } catch (e) {
    throw new ObjectError(`Failed to open file “${file}”: ${errnoText(e)}`);
  }
  check(
    g.gnutls_dh_params_import_pkcs3(p, datum(pem), GNUTLS_X509_FMT_PEM),
    (e) => `Unable to load DH parameters from ${file}: ${e}`,
  );
  return p;
}

function loadX509(spec: TlsCredsSpec, secret: (id: string) => Uint8Array): TlsCredentials {
  const g = gnutls();
  const server = spec.endpoint === "server";
  const caCert = credPath(spec, "ca-cert.pem", true)!;
  let caCrl: string | undefined;
  let cert: string | undefined;
  let key: string | undefined;
  let dh: string | undefined;
  if (server) {
    caCrl = credPath(spec, "ca-crl.pem", false);
    cert = credPath(spec, "server-cert.pem", true);
    key = credPath(spec, "server-key.pem", true);
    dh = credPath(spec, "dh-params.pem", false);
  } else {
    cert = credPath(spec, "client-cert.pem", false);
    key = credPath(spec, "client-key.pem", false);
  }
  if (spec.sanityCheck) {
    try {
      sanityCheckX509(server, caCert, cert);
    } catch (e) {
      if (e instanceof TlsCheckError) throw new ObjectError(e.message);
      throw e;
    }
  }
  const handle = handleOf(
    allocate((out) => g.gnutls_certificate_allocate_credentials(out)),
    "Cannot allocate credentials",
  );
  check(
    g.gnutls_certificate_set_x509_trust_file(handle, cstr(caCert), GNUTLS_X509_FMT_PEM),
    (e) => `Cannot load CA certificate '${caCert}': ${e}`,
  );
  if (cert !== undefined && key !== undefined) {
    let password: Uint8Array | null = null;
    if (spec.passwordId !== undefined) {
      const bytes = secret(spec.passwordId);
      password = new Uint8Array(bytes.length + 1);
      password.set(bytes);
    }
    check(
      g.gnutls_certificate_set_x509_key_file2(
        handle,
        cstr(cert),
        cstr(key),
        GNUTLS_X509_FMT_PEM,
        password,
        0,
      ),
      (e) => `Cannot load certificate '${cert}' & key '${key}': ${e}`,
    );
  }
  if (caCrl !== undefined) {
    check(
      g.gnutls_certificate_set_x509_crl_file(handle, cstr(caCrl), GNUTLS_X509_FMT_PEM),
      (e) => `Cannot load CRL '${caCrl}': ${e}`,
    );
  }
  if (server) g.gnutls_certificate_set_dh_params(handle, dhParams(dh));
  return {
    spec,
    endpoint: spec.endpoint,
    credType: GNUTLS_CRD_CERTIFICATE,
    handle,
    priority: priorityFor(spec),
  };
}

/** The hex key of `username` in a keys.psk file (`user:hexkey` lines), as qemu finds it. */
export function lookupPskKey(file: string, username: string): string {
  let text: string;
  try {
    text = Deno.readTextFileSync(file);
  } catch (e) {
    throw new ObjectError(
      `Cannot read PSK file ${file}: Failed to open file “${file}”: ${errnoText(e)}`,
    );
  }
  for (const line of text.split("\n")) {
    if (line.startsWith(username) && line[username.length] === ":") {
      return line.slice(username.length + 1);
    }
  }
  throw new ObjectError(`Username ${username} not found in PSK file ${file}`);
}

function loadPsk(spec: TlsCredsSpec): TlsCredentials {
  const g = gnutls();
  const priority = priorityFor(spec);
  if (spec.endpoint === "server") {
    if (spec.username !== undefined) {
      throw new ObjectError("username should not be set when endpoint=server");
    }
    const dh = credPath(spec, "dh-params.pem", false);
    const file = credPath(spec, "keys.psk", true)!;
    const handle = handleOf(
      allocate((out) => g.gnutls_psk_allocate_server_credentials(out)),
      "Cannot allocate credentials",
    );
    const params = dhParams(dh);
    check(
      g.gnutls_psk_set_server_credentials_file(handle, cstr(file)),
      (e) => `Cannot set PSK server credentials: ${e}`,
    );
    g.gnutls_psk_set_server_dh_params(handle, params);
    return { spec, endpoint: spec.endpoint, credType: GNUTLS_CRD_PSK, handle, priority };
  }
  const file = credPath(spec, "keys.psk", true)!;
  const username = spec.username ?? "qemu";
  const key = new TextEncoder().encode(lookupPskKey(file, username));
  const handle = handleOf(
    allocate((out) => g.gnutls_psk_allocate_client_credentials(out)),
    "Cannot allocate credentials",
  );
  check(
    g.gnutls_psk_set_client_credentials(handle, cstr(username), datum(key), GNUTLS_PSK_KEY_HEX),
    (e) => `Cannot set PSK client credentials: ${e}`,
  );
  return { spec, endpoint: spec.endpoint, credType: GNUTLS_CRD_PSK, handle, priority };
}

function loadAnon(spec: TlsCredsSpec): TlsCredentials {
  const g = gnutls();
  const priority = priorityFor(spec);
  if (spec.endpoint === "server") {
    const dh = credPath(spec, "dh-params.pem", false);
    const handle = handleOf(
      allocate((out) => g.gnutls_anon_allocate_server_credentials(out)),
      "Cannot allocate credentials",
    );
    g.gnutls_anon_set_server_dh_params(handle, dhParams(dh));
    return { spec, endpoint: spec.endpoint, credType: GNUTLS_CRD_ANON, handle, priority };
  }
  const handle = handleOf(
    allocate((out) => g.gnutls_anon_allocate_client_credentials(out)),
    "Cannot allocate credentials",
  );
  return { spec, endpoint: spec.endpoint, credType: GNUTLS_CRD_ANON, handle, priority };
}

/** Load the credentials a tls-creds object describes (throws ObjectError as qemu words it). */
export function loadTlsCredentials(
  spec: TlsCredsSpec,
  secret: (id: string) => Uint8Array,
): TlsCredentials {
  switch (spec.kind) {
    case "x509":
      return loadX509(spec, secret);
    case "psk":
      return loadPsk(spec);
    case "anon":
      return loadAnon(spec);
  }
}

/** Whether a created object's value is loaded TLS credentials. */
export function isTlsCredentials(value: unknown): value is TlsCredentials {
  return typeof value === "object" && value !== null && "credType" in value && "spec" in value;
}
