/**
 * Sector encryption as qemu 7.2's crypto/block.c does it for LUKS: the payload is cut into
 * 512-byte sectors, each encrypted on its own with the block cipher in ECB, CBC, CTR or XTS
 * mode and an IV made from the sector number (crypto/ivgen-*.c):
 *
 * - `plain`: the low 32 bits of the sector number, little-endian, zero-padded to the IV size;
 * - `plain64`: the 64-bit sector number, little-endian, zero-padded;
 * - `essiv`: plain64 encrypted (ECB) with a second cipher keyed by a hash of the master key.
 *
 * The bytes move through OpenSSL's EVP interface (ffi/libcrypto.ts), in place: one call to set
 * the IV and one to run a sector; ECB runs the whole buffer in one call. Keys are expanded once,
 * at construction. Everything here is synchronous (a 1 MiB request is well under a millisecond
 * with AES-NI), so no buffer is shared with another thread.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { cString, libcrypto } from "../../ffi/libcrypto.ts";

/** Bytes per encryption sector (QCRYPTO_BLOCK_LUKS_SECTOR_SIZE). */
export const CRYPT_SECTOR = 512;

/** qemu's QCryptoCipherAlgorithm names this module runs (AES only). */
export type CipherAlg = "aes-128" | "aes-192" | "aes-256";
/** qemu's QCryptoCipherMode names. */
export type CipherMode = "ecb" | "cbc" | "xts" | "ctr";
/** qemu's QCryptoIVGenAlgorithm names. */
export type IvGenAlg = "plain" | "plain64" | "essiv";
/** qemu's QCryptoHashAlgorithm names. */
export type HashAlg = "md5" | "sha1" | "sha224" | "sha256" | "sha384" | "sha512" | "ripemd160";

export const CIPHER_MODES: readonly CipherMode[] = ["ecb", "cbc", "xts", "ctr"];
export const IVGEN_ALGS: readonly IvGenAlg[] = ["plain", "plain64", "essiv"];
export const HASH_ALGS: readonly HashAlg[] = [
  "md5",
  "sha1",
  "sha224",
  "sha256",
  "sha384",
  "sha512",
  "ripemd160",
];

/** Digest sizes in bytes. */
export const DIGEST_BYTES: Readonly<Record<HashAlg, number>> = {
  md5: 16,
  sha1: 20,
  sha224: 28,
  sha256: 32,
  sha384: 48,
  sha512: 64,
  ripemd160: 20,
};

/** Key bytes of each algorithm (one key; XTS takes two). */
export const CIPHER_KEY_BYTES: Readonly<Record<CipherAlg, number>> = {
  "aes-128": 16,
  "aes-192": 24,
  "aes-256": 32,
};

/** What a sector cipher is made of. */
export interface SectorCipherSpec {
  readonly alg: CipherAlg;
  readonly mode: CipherMode;
  readonly ivgen: IvGenAlg;
  /** The ESSIV hash (ignored for plain and plain64, as qemu and dm-crypt ignore it). */
  readonly ivHash?: HashAlg;
  /** The whole key: twice the algorithm's key for XTS. */
  readonly key: Uint8Array;
}

/** A failure setting up a cipher; the message is qemu's where qemu has one. */
export class CipherError extends Error {
  override name = "CipherError";
}

type Ptr = Deno.PointerValue;

/** One EVP context, initialised once with its key; the IV is reset per sector. */
class EvpContext {
  readonly #ctx: Ptr;
  readonly #outl = new Int32Array(1);

  constructor(name: string, key: Uint8Array, encrypt: boolean) {
    const c = libcrypto();
    const cipher = c.EVP_get_cipherbyname(cString(name));
    if (cipher === null) throw new CipherError(`Cipher '${name}' is not available in libcrypto`);
    const ctx = c.EVP_CIPHER_CTX_new();
    if (ctx === null) throw new CipherError("Cannot allocate a cipher context");
    if (
      c.EVP_CipherInit_ex(
        ctx,
        cipher,
        null,
        key as Uint8Array<ArrayBuffer>,
        null,
        encrypt ? 1 : 0,
      ) !== 1
    ) {
      c.EVP_CIPHER_CTX_free(ctx);
      throw new CipherError(`Cannot set the key of cipher '${name}'`);
    }
    // Without padding every update returns all its bytes (a decrypting context with padding
    // would hold the last block back for a final call that never comes).
    c.EVP_CIPHER_CTX_set_padding(ctx, 0);
    this.#ctx = ctx;
  }

  setIv(iv: Uint8Array<ArrayBuffer>): void {
    if (libcrypto().EVP_CipherInit_ex(this.#ctx, null, null, null, iv, -1) !== 1) {
      throw new CipherError("Cannot set the cipher IV");
    }
  }

  /** Runs `buf` through the cipher in place. */
  run(buf: Uint8Array<ArrayBuffer>): void {
    const c = libcrypto();
    if (c.EVP_CipherUpdate(this.#ctx, buf, this.#outl, buf, buf.length) !== 1) {
      throw new CipherError("Cipher operation failed");
    }
    if (this.#outl[0] !== buf.length) throw new CipherError("Cipher returned a short result");
  }

  free(): void {
    libcrypto().EVP_CIPHER_CTX_free(this.#ctx);
  }
}

/**
 * XTS (IEEE 1619) built on two ECB contexts, for AES-192, which OpenSSL has no XTS for: the
 * tweak is the IV encrypted with the second key, multiplied by x in GF(2^128) from block to
 * block; each block is XORed with its tweak before and after the first key's cipher. One
 * sector's tweaks go into a 512-byte mask so the cipher runs once per sector.
 */
class XtsOverEcb {
  readonly #data: EvpContext;
  readonly #tweak: EvpContext;
  readonly #mask = new Uint8Array(CRYPT_SECTOR);
  readonly #t = new Uint8Array(16);

  constructor(alg: CipherAlg, key: Uint8Array, encrypt: boolean) {
    const half = key.length / 2;
    this.#data = new EvpContext(`${alg}-ecb`, key.subarray(0, half), encrypt);
    try {
      this.#tweak = new EvpContext(`${alg}-ecb`, key.subarray(half), true);
    } catch (e) {
      this.#data.free();
      throw e;
    }
  }

  /** One sector in place, with tweak IV `iv`. */
  sector(buf: Uint8Array<ArrayBuffer>, iv: Uint8Array): void {
    const t = this.#t;
    t.set(iv);
    this.#tweak.run(t);
    const mask = this.#mask;
    for (let at = 0; at < CRYPT_SECTOR; at += 16) {
      mask.set(t, at);
      // t *= x: a left shift of the little-endian 128-bit value, reduced by x^128 + x^7 + x^2 + x + 1.
      let carry = 0;
      for (let i = 0; i < 16; i++) {
        const b = t[i]!;
        t[i] = ((b << 1) | carry) & 0xff;
        carry = b >>> 7;
      }
      if (carry !== 0) t[0]! ^= 0x87;
    }
    for (let i = 0; i < CRYPT_SECTOR; i++) buf[i]! ^= mask[i]!;
    this.#data.run(buf);
    for (let i = 0; i < CRYPT_SECTOR; i++) buf[i]! ^= mask[i]!;
  }

  free(): void {
    this.#data.free();
    this.#tweak.free();
  }
}

/** qemu's hash of `data` (for ESSIV keys). */
export function hashBytes(alg: HashAlg, data: Uint8Array): Uint8Array {
  return new Uint8Array(createHash(alg).update(data).digest());
}

/**
 * The ESSIV cipher qemu picks (qcrypto_block_luks_essiv_cipher): the block cipher itself when
 * its key is as long as the digest, else the AES whose key is the digest's size.
 */
export function essivCipher(alg: CipherAlg, hash: HashAlg): CipherAlg {
  const digest = DIGEST_BYTES[hash];
  if (CIPHER_KEY_BYTES[alg] === digest) return alg;
  for (const a of ["aes-128", "aes-192", "aes-256"] as const) {
    if (CIPHER_KEY_BYTES[a] === digest) return a;
  }
  throw new CipherError(`No AES cipher with key size ${digest} available`);
}

/** Encrypts and decrypts whole 512-byte sectors, numbered from the caller's sector 0. */
export class SectorCipher {
  readonly spec: SectorCipherSpec;
  readonly #enc: EvpContext | XtsOverEcb;
  readonly #dec: EvpContext | XtsOverEcb;
  /** ECB cipher of ESSIV (encrypts the sector number into the IV), when ivgen is essiv. */
  readonly #essiv: EvpContext | undefined;
  readonly #iv = new Uint8Array(16);
  readonly #ivWords = new DataView(this.#iv.buffer);
  readonly #hasIv: boolean;

  constructor(spec: SectorCipherSpec) {
    this.spec = spec;
    const want = CIPHER_KEY_BYTES[spec.alg] * (spec.mode === "xts" ? 2 : 1);
    if (spec.key.length !== want) {
      throw new CipherError(
        `Cipher ${spec.alg}-${spec.mode} needs a ${want}-byte key, not ${spec.key.length}`,
      );
    }
    const name = `${spec.alg}-${spec.mode}`;
    this.#hasIv = spec.mode !== "ecb";
    let essiv: EvpContext | undefined;
    if (this.#hasIv && spec.ivgen === "essiv") {
      const hash = spec.ivHash;
      if (hash === undefined) throw new CipherError("Missing IV generator hash specification");
      const ivAlg = essivCipher(spec.alg, hash);
      essiv = new EvpContext(`${ivAlg}-ecb`, hashBytes(hash, spec.key), true);
    }
    this.#essiv = essiv;
    const make = (encrypt: boolean) =>
      spec.alg === "aes-192" && spec.mode === "xts"
        ? new XtsOverEcb(spec.alg, spec.key, encrypt)
        : new EvpContext(name, spec.key, encrypt);
    try {
      this.#enc = make(true);
    } catch (e) {
      essiv?.free();
      throw e;
    }
    try {
      this.#dec = make(false);
    } catch (e) {
      this.#enc.free();
      essiv?.free();
      throw e;
    }
  }

  /** Sets the IV of sector `sector` (a safe integer) into #iv. */
  #makeIv(sector: number): void {
    const iv = this.#iv;
    iv.fill(0);
    const v = this.#ivWords;
    if (this.spec.ivgen === "plain") {
      v.setUint32(0, sector >>> 0, true);
      return;
    }
    v.setUint32(0, sector >>> 0, true);
    v.setUint32(4, Math.floor(sector / 0x100000000) >>> 0, true);
    if (this.#essiv !== undefined) this.#essiv.run(iv);
  }

  #apply(ctx: EvpContext | XtsOverEcb, buf: Uint8Array, sector: number): void {
    if (buf.length % CRYPT_SECTOR !== 0) {
      throw new CipherError(`Length ${buf.length} is not a multiple of ${CRYPT_SECTOR}`);
    }
    const b = buf as Uint8Array<ArrayBuffer>;
    if (ctx instanceof XtsOverEcb) {
      for (let at = 0; at < b.length; at += CRYPT_SECTOR) {
        this.#makeIv(sector + at / CRYPT_SECTOR);
        ctx.sector(b.subarray(at, at + CRYPT_SECTOR), this.#iv);
      }
      return;
    }
    if (!this.#hasIv) {
      if (b.length > 0) ctx.run(b);
      return;
    }
    for (let at = 0; at < b.length; at += CRYPT_SECTOR) {
      this.#makeIv(sector + at / CRYPT_SECTOR);
      ctx.setIv(this.#iv);
      ctx.run(b.subarray(at, at + CRYPT_SECTOR));
    }
  }

  /** Encrypts `buf` (whole sectors) in place; its first sector is number `sector`. */
  encrypt(buf: Uint8Array, sector: number): void {
    this.#apply(this.#enc, buf, sector);
  }

  /** Decrypts `buf` (whole sectors) in place; its first sector is number `sector`. */
  decrypt(buf: Uint8Array, sector: number): void {
    this.#apply(this.#dec, buf, sector);
  }

  close(): void {
    this.#enc.free();
    this.#dec.free();
    this.#essiv?.free();
  }
}
