/**
 * Sector encryption as qemu 7.2's crypto/block.c does it for LUKS: the payload is cut into
 * 512-byte sectors, each encrypted on its own with the block cipher in ECB, CBC, CTR or XTS
 * mode and an IV made from the sector number (crypto/ivgen-*.c):
 *
 * - `plain`: the low 32 bits of the sector number, little-endian, zero-padded to the IV size;
 * - `plain64`: the 64-bit sector number, little-endian, zero-padded;
 * - `essiv`: plain64 encrypted (ECB) with a second cipher keyed by a hash of the master key.
 *
 * The bytes move through OpenSSL's EVP interface (ffi/libcrypto.ts), in place: CBC and CTR take
 * one call to set the IV and one to run a sector; ECB runs the whole buffer in one call; XTS
 * runs on two ECB contexts, a batch of sectors at a time (see XtsOverEcb). Keys are expanded once,
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
  /** XTS through OpenSSL's own XTS, sector by sector (for tests; AES-128/256 only). */
  readonly evpXts?: boolean;
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

/** Sectors processed per batch (1 MiB): bounds the scratch buffers. */
const BATCH_SECTORS = 2048;

/**
 * XTS (IEEE 1619) on two ECB contexts: the tweak of a sector is its IV encrypted with the
 * second key, multiplied by x in GF(2^128) from block to block; each block is XORed with its
 * tweak before and after the first key's cipher. All tweaks of a batch are encrypted in one
 * call, expanded into a mask with 32-bit word operations and applied around one ECB call over
 * the whole batch: measured about twice as fast as OpenSSL's own XTS driven sector by sector
 * through FFI (two calls per sector), and the only XTS for AES-192, which OpenSSL lacks.
 */
class XtsOverEcb {
  readonly #data: EvpContext;
  readonly #tweak: EvpContext;
  #mask = new Uint32Array(0);
  #scratch = new Uint8Array(0);

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

  /**
   * Whole sectors of `buf` (at most {@link BATCH_SECTORS}) in place; `ivs` holds their IVs
   * (16 bytes each) and is overwritten with the tweaks.
   */
  run(buf: Uint8Array<ArrayBuffer>, ivs: Uint8Array<ArrayBuffer>): void {
    const n = buf.length / CRYPT_SECTOR;
    this.#tweak.run(ivs);
    const words = buf.length >> 2;
    if (this.#mask.length < words) this.#mask = new Uint32Array(words);
    const mask = this.#mask;
    const tw = new Uint32Array(ivs.buffer, ivs.byteOffset, n * 4);
    // Little-endian words (x86, arm64): the tweak is a little-endian 128-bit number.
    for (let s = 0, m = 0; s < n; s++) {
      let w0 = tw[s * 4]!, w1 = tw[s * 4 + 1]!, w2 = tw[s * 4 + 2]!, w3 = tw[s * 4 + 3]!;
      for (let b = 0; b < CRYPT_SECTOR / 16; b++, m += 4) {
        mask[m] = w0;
        mask[m + 1] = w1;
        mask[m + 2] = w2;
        mask[m + 3] = w3;
        const carry = w3 >>> 31;
        w3 = ((w3 << 1) | (w2 >>> 31)) >>> 0;
        w2 = ((w2 << 1) | (w1 >>> 31)) >>> 0;
        w1 = ((w1 << 1) | (w0 >>> 31)) >>> 0;
        w0 = ((w0 << 1) ^ (carry * 0x87)) >>> 0;
      }
    }
    // Word access needs a 4-byte aligned view: otherwise work on an aligned copy.
    let work = buf;
    if (buf.byteOffset % 4 !== 0) {
      if (this.#scratch.length < buf.length) this.#scratch = new Uint8Array(buf.length);
      work = this.#scratch.subarray(0, buf.length);
      work.set(buf);
    }
    const w = new Uint32Array(work.buffer, work.byteOffset, words);
    for (let i = 0; i < words; i++) w[i]! ^= mask[i]!;
    this.#data.run(work);
    for (let i = 0; i < words; i++) w[i]! ^= mask[i]!;
    if (work !== buf) buf.set(work);
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
  /** IVs of one batch, 16 bytes per sector. */
  readonly #ivs = new Uint8Array(BATCH_SECTORS * 16);
  readonly #ivView = new DataView(this.#ivs.buffer);
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
      spec.mode === "xts" && !spec.evpXts
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

  /** The IVs of `n` sectors from `sector` (a safe integer) into #ivs. */
  #makeIvs(sector: number, n: number): Uint8Array<ArrayBuffer> {
    const ivs = this.#ivs.subarray(0, n * 16);
    ivs.fill(0);
    const v = this.#ivView;
    const wide = this.spec.ivgen !== "plain";
    for (let i = 0; i < n; i++) {
      const s = sector + i;
      v.setUint32(i * 16, s >>> 0, true);
      if (wide) v.setUint32(i * 16 + 4, Math.floor(s / 0x100000000) >>> 0, true);
    }
    if (this.#essiv !== undefined) this.#essiv.run(ivs);
    return ivs;
  }

  #apply(ctx: EvpContext | XtsOverEcb, buf: Uint8Array, sector: number): void {
    if (buf.length % CRYPT_SECTOR !== 0) {
      throw new CipherError(`Length ${buf.length} is not a multiple of ${CRYPT_SECTOR}`);
    }
    const b = buf as Uint8Array<ArrayBuffer>;
    if (!this.#hasIv) {
      if (b.length > 0) (ctx as EvpContext).run(b); // ECB: no XTS here
      return;
    }
    const batch = BATCH_SECTORS * CRYPT_SECTOR;
    for (let at = 0; at < b.length; at += batch) {
      const part = b.subarray(at, Math.min(b.length, at + batch));
      const n = part.length / CRYPT_SECTOR;
      const ivs = this.#makeIvs(sector + at / CRYPT_SECTOR, n);
      if (ctx instanceof XtsOverEcb) {
        ctx.run(part, ivs);
        continue;
      }
      for (let i = 0; i < n; i++) {
        ctx.setIv(ivs.subarray(i * 16, i * 16 + 16));
        ctx.run(part.subarray(i * CRYPT_SECTOR, (i + 1) * CRYPT_SECTOR));
      }
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
