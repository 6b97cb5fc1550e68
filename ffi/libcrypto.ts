/**
 * OpenSSL 3 (libcrypto.so.3) through FFI: the EVP cipher calls LUKS bulk encryption needs
 * (node:crypto in Deno has no XTS, no AES-192-CBC and allocates per call), and PBKDF2 for the
 * hashes Web Crypto lacks (MD5, SHA-224, RIPEMD-160).
 *
 * The library is opened on first use; {@link libcrypto} throws when it is missing, and the
 * caller turns that into its own error.
 *
 * @module
 */

const SYMBOLS = {
  // EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void)
  EVP_CIPHER_CTX_new: { parameters: [], result: "pointer" },
  // void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
  EVP_CIPHER_CTX_free: { parameters: ["pointer"], result: "void" },
  // const EVP_CIPHER *EVP_get_cipherbyname(const char *name)
  EVP_get_cipherbyname: { parameters: ["buffer"], result: "pointer" },
  // int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, ENGINE *impl,
  //                       const unsigned char *key, const unsigned char *iv, int enc)
  EVP_CipherInit_ex: {
    parameters: ["pointer", "pointer", "pointer", "buffer", "buffer", "i32"],
    result: "i32",
  },
  // int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int padding)
  EVP_CIPHER_CTX_set_padding: { parameters: ["pointer", "i32"], result: "i32" },
  // int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
  //                      const unsigned char *in, int inl)
  EVP_CipherUpdate: {
    parameters: ["pointer", "buffer", "buffer", "buffer", "i32"],
    result: "i32",
  },
  // const EVP_MD *EVP_get_digestbyname(const char *name)
  EVP_get_digestbyname: { parameters: ["buffer"], result: "pointer" },
  // int PKCS5_PBKDF2_HMAC(const char *pass, int passlen, const unsigned char *salt, int saltlen,
  //                       int iter, const EVP_MD *digest, int keylen, unsigned char *out)
  // On the blocking pool: a LUKS key slot takes a second or more of it by design.
  PKCS5_PBKDF2_HMAC: {
    parameters: ["buffer", "i32", "buffer", "i32", "i32", "pointer", "i32", "buffer"],
    result: "i32",
    nonblocking: true,
  },
} as const satisfies Deno.ForeignLibraryInterface;

let lib: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;

/** The libcrypto symbol table, opened on first use (throws when libcrypto.so.3 is missing). */
export function libcrypto(): Deno.DynamicLibrary<typeof SYMBOLS>["symbols"] {
  lib ??= Deno.dlopen("libcrypto.so.3", SYMBOLS);
  return lib.symbols;
}

/** A NUL-terminated C string. */
export function cString(s: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(s + "\0");
}
