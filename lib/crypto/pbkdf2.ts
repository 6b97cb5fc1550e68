/**
 * PBKDF2-HMAC as LUKS uses it (key slots and the master key digest). Web Crypto runs SHA-1 and
 * SHA-2 (measured about twice as fast as OpenSSL's PKCS5_PBKDF2_HMAC and node:crypto here, and
 * off the event loop); MD5, SHA-224 and RIPEMD-160 go to libcrypto on the blocking pool.
 *
 * @module
 */

import { cString, libcrypto } from "../../ffi/libcrypto.ts";
import { CipherError, type HashAlg } from "./cipher.ts";

const WEB_HASH: Partial<Record<HashAlg, string>> = {
  sha1: "SHA-1",
  sha256: "SHA-256",
  sha384: "SHA-384",
  sha512: "SHA-512",
};

/** `length` bytes of PBKDF2-HMAC-`hash` of `password` and `salt` over `iterations` rounds. */
export async function pbkdf2(
  hash: HashAlg,
  password: Uint8Array,
  salt: Uint8Array,
  iterations: number,
  length: number,
): Promise<Uint8Array> {
  const web = WEB_HASH[hash];
  if (web !== undefined) {
    const key = await crypto.subtle.importKey(
      "raw",
      password as Uint8Array<ArrayBuffer>,
      "PBKDF2",
      false,
      ["deriveBits"],
    );
    const bits = await crypto.subtle.deriveBits(
      { name: "PBKDF2", hash: web, salt: salt as Uint8Array<ArrayBuffer>, iterations },
      key,
      length * 8,
    );
    return new Uint8Array(bits);
  }
  const c = libcrypto();
  const md = c.EVP_get_digestbyname(cString(hash));
  if (md === null) throw new CipherError(`Hash algorithm '${hash}' is not available in libcrypto`);
  const out = new Uint8Array(length);
  // Copies: the call runs on another thread while these buffers must stay put.
  const pw = new Uint8Array(password);
  const s = new Uint8Array(salt);
  const ok = await c.PKCS5_PBKDF2_HMAC(pw, pw.length, s, s.length, iterations, md, length, out);
  if (ok !== 1) throw new CipherError(`PBKDF2 with '${hash}' failed`);
  return out;
}
