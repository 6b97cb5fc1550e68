/**
 * GnuTLS (libgnutls.so.30) through FFI: credentials (x509, PSK, anonymous), sessions driven on a
 * non-blocking socket descriptor (GnuTLS itself calls recv/send on it, so no callback crosses
 * into JavaScript), peer certificate checks and the x509 helpers qemu's checks need.
 *
 * Why GnuTLS: Deno.startTls is client-only and rustls has no PSK; qemu-nbd uses GnuTLS, so the
 * same priority strings give the same ciphers and the same error texts
 * (shared/prototypes/tls/).
 *
 * @module
 */

const SYMBOLS = {
  // const char *gnutls_check_version(const char *req)
  gnutls_check_version: { parameters: ["pointer"], result: "pointer" },
  // const char *gnutls_strerror(int error)
  gnutls_strerror: { parameters: ["i32"], result: "pointer" },
  // int gnutls_certificate_allocate_credentials(gnutls_certificate_credentials_t *res)
  gnutls_certificate_allocate_credentials: { parameters: ["buffer"], result: "i32" },
  // void gnutls_certificate_free_credentials(gnutls_certificate_credentials_t sc)
  gnutls_certificate_free_credentials: { parameters: ["pointer"], result: "void" },
  // int gnutls_certificate_set_x509_trust_file(cred, const char *cafile, fmt)
  gnutls_certificate_set_x509_trust_file: {
    parameters: ["pointer", "buffer", "i32"],
    result: "i32",
  },
  // int gnutls_certificate_set_x509_key_file2(cred, certfile, keyfile, fmt, const char *pass,
  //                                           unsigned flags)
  gnutls_certificate_set_x509_key_file2: {
    parameters: ["pointer", "buffer", "buffer", "i32", "buffer", "u32"],
    result: "i32",
  },
  // int gnutls_certificate_set_x509_crl_file(cred, const char *crlfile, fmt)
  gnutls_certificate_set_x509_crl_file: { parameters: ["pointer", "buffer", "i32"], result: "i32" },
  // void gnutls_certificate_set_dh_params(cred, gnutls_dh_params_t)
  gnutls_certificate_set_dh_params: { parameters: ["pointer", "pointer"], result: "void" },
  // int gnutls_dh_params_init(gnutls_dh_params_t *)
  gnutls_dh_params_init: { parameters: ["buffer"], result: "i32" },
  // int gnutls_dh_params_import_pkcs3(params, const gnutls_datum_t *pkcs3, fmt)
  gnutls_dh_params_import_pkcs3: { parameters: ["pointer", "buffer", "i32"], result: "i32" },
  // int gnutls_dh_params_generate2(params, unsigned bits)
  gnutls_dh_params_generate2: { parameters: ["pointer", "u32"], result: "i32" },
  // int gnutls_psk_allocate_server_credentials(gnutls_psk_server_credentials_t *)
  gnutls_psk_allocate_server_credentials: { parameters: ["buffer"], result: "i32" },
  // int gnutls_psk_set_server_credentials_file(cred, const char *password_file)
  gnutls_psk_set_server_credentials_file: { parameters: ["pointer", "buffer"], result: "i32" },
  // void gnutls_psk_set_server_dh_params(cred, gnutls_dh_params_t)
  gnutls_psk_set_server_dh_params: { parameters: ["pointer", "pointer"], result: "void" },
  // int gnutls_psk_allocate_client_credentials(gnutls_psk_client_credentials_t *)
  gnutls_psk_allocate_client_credentials: { parameters: ["buffer"], result: "i32" },
  // int gnutls_psk_set_client_credentials(cred, const char *username, const gnutls_datum_t *key,
  //                                       gnutls_psk_key_flags flags)
  gnutls_psk_set_client_credentials: {
    parameters: ["pointer", "buffer", "buffer", "i32"],
    result: "i32",
  },
  // int gnutls_anon_allocate_server_credentials(gnutls_anon_server_credentials_t *)
  gnutls_anon_allocate_server_credentials: { parameters: ["buffer"], result: "i32" },
  // void gnutls_anon_set_server_dh_params(cred, gnutls_dh_params_t)
  gnutls_anon_set_server_dh_params: { parameters: ["pointer", "pointer"], result: "void" },
  // int gnutls_anon_allocate_client_credentials(gnutls_anon_client_credentials_t *)
  gnutls_anon_allocate_client_credentials: { parameters: ["buffer"], result: "i32" },
  // int gnutls_init(gnutls_session_t *session, unsigned flags)
  gnutls_init: { parameters: ["buffer", "u32"], result: "i32" },
  // void gnutls_deinit(gnutls_session_t)
  gnutls_deinit: { parameters: ["pointer"], result: "void" },
  // int gnutls_priority_set_direct(session, const char *priorities, const char **err_pos)
  gnutls_priority_set_direct: { parameters: ["pointer", "buffer", "pointer"], result: "i32" },
  // int gnutls_credentials_set(session, gnutls_credentials_type_t type, void *cred)
  gnutls_credentials_set: { parameters: ["pointer", "i32", "pointer"], result: "i32" },
  // void gnutls_certificate_server_set_request(session, gnutls_certificate_request_t req)
  gnutls_certificate_server_set_request: { parameters: ["pointer", "i32"], result: "void" },
  // void gnutls_transport_set_int2(session, int recv_fd, int send_fd)
  gnutls_transport_set_int2: { parameters: ["pointer", "i32", "i32"], result: "void" },
  // int gnutls_handshake(session)
  gnutls_handshake: { parameters: ["pointer"], result: "i32" },
  // int gnutls_record_get_direction(session): 0 = wants to read, 1 = wants to write
  gnutls_record_get_direction: { parameters: ["pointer"], result: "i32" },
  // ssize_t gnutls_record_send(session, const void *data, size_t len)
  gnutls_record_send: { parameters: ["pointer", "buffer", "usize"], result: "isize" },
  // ssize_t gnutls_record_recv(session, void *data, size_t len)
  gnutls_record_recv: { parameters: ["pointer", "buffer", "usize"], result: "isize" },
  // size_t gnutls_record_check_pending(session)
  gnutls_record_check_pending: { parameters: ["pointer"], result: "usize" },
  // void gnutls_record_cork(session)
  gnutls_record_cork: { parameters: ["pointer"], result: "void" },
  // int gnutls_record_uncork(session, unsigned flags)
  gnutls_record_uncork: { parameters: ["pointer", "u32"], result: "i32" },
  // int gnutls_certificate_verify_peers2(session, unsigned *status)
  gnutls_certificate_verify_peers2: { parameters: ["pointer", "buffer"], result: "i32" },
  // const gnutls_datum_t *gnutls_certificate_get_peers(session, unsigned *list_size)
  gnutls_certificate_get_peers: { parameters: ["pointer", "buffer"], result: "pointer" },
  // const char *gnutls_psk_server_get_username(session)
  gnutls_psk_server_get_username: { parameters: ["pointer"], result: "pointer" },
  // char *gnutls_session_get_desc(session) (caller frees with gnutls_free; leaked: trace only)
  gnutls_session_get_desc: { parameters: ["pointer"], result: "pointer" },
  // int gnutls_x509_crt_init(gnutls_x509_crt_t *)
  gnutls_x509_crt_init: { parameters: ["buffer"], result: "i32" },
  // void gnutls_x509_crt_deinit(gnutls_x509_crt_t)
  gnutls_x509_crt_deinit: { parameters: ["pointer"], result: "void" },
  // int gnutls_x509_crt_import(crt, const gnutls_datum_t *data, fmt)
  gnutls_x509_crt_import: { parameters: ["pointer", "pointer", "i32"], result: "i32" },
  // int gnutls_x509_crt_list_import(crts *, unsigned *max, const gnutls_datum_t *, fmt, flags)
  gnutls_x509_crt_list_import: {
    parameters: ["buffer", "buffer", "buffer", "i32", "u32"],
    result: "i32",
  },
  // int gnutls_x509_crt_get_dn(crt, char *buf, size_t *size)
  gnutls_x509_crt_get_dn: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // time_t gnutls_x509_crt_get_expiration_time(crt)
  gnutls_x509_crt_get_expiration_time: { parameters: ["pointer"], result: "i64" },
  // time_t gnutls_x509_crt_get_activation_time(crt)
  gnutls_x509_crt_get_activation_time: { parameters: ["pointer"], result: "i64" },
  // unsigned gnutls_x509_crt_check_hostname(crt, const char *hostname)
  gnutls_x509_crt_check_hostname: { parameters: ["pointer", "buffer"], result: "u32" },
  // int gnutls_x509_crt_get_basic_constraints(crt, unsigned *critical, unsigned *ca, int *pathlen)
  gnutls_x509_crt_get_basic_constraints: {
    parameters: ["pointer", "buffer", "buffer", "buffer"],
    result: "i32",
  },
  // int gnutls_x509_crt_get_key_usage(crt, unsigned *key_usage, unsigned *critical)
  gnutls_x509_crt_get_key_usage: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // int gnutls_x509_crt_get_key_purpose_oid(crt, unsigned idx, void *oid, size_t *size,
  //                                         unsigned *critical)
  gnutls_x509_crt_get_key_purpose_oid: {
    parameters: ["pointer", "u32", "buffer", "buffer", "buffer"],
    result: "i32",
  },
  // int gnutls_x509_crt_list_verify(const crts *, unsigned n, const cas *, unsigned ncas,
  //                                 const crls *, unsigned ncrls, unsigned flags, unsigned *verify)
  gnutls_x509_crt_list_verify: {
    parameters: ["buffer", "u32", "buffer", "u32", "pointer", "u32", "u32", "buffer"],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

let lib: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;

/** The GnuTLS symbol table, opened on first use (once per thread: FFI handles are per isolate). */
export function gnutls(): Deno.DynamicLibrary<typeof SYMBOLS>["symbols"] {
  if (lib === undefined) {
    try {
      lib = Deno.dlopen("libgnutls.so.30", SYMBOLS);
    } catch (e) {
      throw new Error(
        `TLS needs GnuTLS (libgnutls.so.30, Debian package libgnutls30): ${
          e instanceof Error ? e.message : String(e)
        }`,
      );
    }
  }
  return lib.symbols;
}

export const GNUTLS_SERVER = 1;
export const GNUTLS_CLIENT = 1 << 1;
export const GNUTLS_NONBLOCK = 1 << 3;
export const GNUTLS_NO_SIGNAL = 1 << 6;
export const GNUTLS_CRD_CERTIFICATE = 1;
export const GNUTLS_CRD_ANON = 2;
export const GNUTLS_CRD_PSK = 4;
export const GNUTLS_X509_FMT_DER = 0;
export const GNUTLS_X509_FMT_PEM = 1;
export const GNUTLS_CERT_REQUEST = 1;
export const GNUTLS_PSK_KEY_HEX = 1;
export const GNUTLS_E_AGAIN = -28;
export const GNUTLS_E_INTERRUPTED = -52;
export const GNUTLS_E_PREMATURE_TERMINATION = -110;
export const GNUTLS_E_SHORT_MEMORY_BUFFER = -51;
export const GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE = -56;
export const GNUTLS_CERT_INVALID = 1 << 1;
export const GNUTLS_CERT_REVOKED = 1 << 5;
export const GNUTLS_CERT_SIGNER_NOT_FOUND = 1 << 6;
export const GNUTLS_CERT_INSECURE_ALGORITHM = 1 << 8;
export const GNUTLS_KEY_DIGITAL_SIGNATURE = 128;
export const GNUTLS_KEY_KEY_ENCIPHERMENT = 32;
export const GNUTLS_KEY_KEY_CERT_SIGN = 4;
/** Bits of generated DH parameters when dh-params.pem is absent (qemu's DH_BITS). */
export const DH_BITS = 2048;

/** GnuTLS's text for an error code (its words: qemu prints them as they are). */
export function gnutlsError(code: number): string {
  return cString(gnutls().gnutls_strerror(code)) ?? `GnuTLS error ${code}`;
}

/** The NUL-terminated string at `p`, or undefined for NULL. */
export function cString(p: Deno.PointerValue): string | undefined {
  return p === null ? undefined : Deno.UnsafePointerView.getCString(p);
}

/** `s` as a NUL-terminated C string. */
export function cstr(s: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(s + "\0");
}

/** Call an allocator `fn(&out)`; returns the handle, or the (negative) GnuTLS code. */
export function allocate(fn: (out: BigUint64Array) => number): Deno.PointerValue | number {
  const out = new BigUint64Array(1);
  const r = fn(out);
  if (r < 0) return r;
  return Deno.UnsafePointer.create(out[0]!);
}

/** A gnutls_datum_t {data, size} over `bytes` (which must stay alive while it is used). */
export function datum(bytes: Uint8Array<ArrayBuffer>): Uint8Array<ArrayBuffer> {
  const d = new Uint8Array(16);
  const v = new DataView(d.buffer);
  v.setBigUint64(0, BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes))), true);
  v.setUint32(8, bytes.length, true);
  return d;
}
