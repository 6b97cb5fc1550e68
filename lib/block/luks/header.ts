/**
 * The LUKS1 header (the 592 bytes at the start of a LUKS volume, big-endian; LUKS On-Disk
 * Format Specification 1.2.3) decoded with a DataView and checked as qemu 7.2's
 * crypto/block-luks.c checks it, in its order and with its messages: the basic sanity checks,
 * then the cipher mode string `MODE-IVGEN[:IVHASH]` and the algorithm names.
 *
 * qemu 7.2 reads LUKS version 1 only: a LUKS2 volume does not probe as luks, and `-f luks`
 * refuses it with "LUKS version 2 is not supported".
 *
 * @module
 */

import {
  CIPHER_MODES,
  type CipherAlg,
  type CipherMode,
  essivCipher,
  HASH_ALGS,
  type HashAlg,
  IVGEN_ALGS,
  type IvGenAlg,
} from "../../crypto/cipher.ts";
import { BlockError, Errno } from "../types.ts";

/** Bytes of the header proper (qemu's QCryptoBlockLUKSHeader). */
export const LUKS_HEADER_SIZE = 592;
export const LUKS_SECTOR = 512;
export const LUKS_NUM_KEY_SLOTS = 8;
export const LUKS_STRIPES = 4000;
export const LUKS_SALT_LEN = 32;
export const LUKS_DIGEST_LEN = 20;
/** Where key material may start (the header is rounded up to this). */
export const LUKS_KEY_SLOT_OFFSET = 4096;
export const LUKS_KEY_SLOT_ENABLED = 0x00ac71f3;
export const LUKS_KEY_SLOT_DISABLED = 0x0000dead;
/**
 * Beyond qemu: PBKDF2 iteration counts above this are refused instead of computed (qemu would
 * spend many minutes on a hostile count of 2^32). qemu's own images take about a tenth of it
 * for its default 2 s iter-time on a fast host.
 */
export const LUKS_MAX_ITERATIONS = 100_000_000;

const MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]; // "LUKS\xba\xbe"
const HEADER_SECTORS = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR;

/** One key slot. */
export interface LuksKeySlot {
  readonly active: number;
  readonly iterations: number;
  readonly salt: Uint8Array;
  /** In 512-byte sectors. */
  readonly keyOffsetSector: number;
  readonly stripes: number;
}

/** The decoded and checked header. */
export interface LuksHeader {
  readonly version: number;
  readonly cipherName: string;
  readonly cipherModeSpec: string;
  readonly hashSpec: string;
  /** In 512-byte sectors. */
  readonly payloadOffsetSector: number;
  readonly masterKeyLen: number;
  readonly masterKeyDigest: Uint8Array;
  readonly masterKeySalt: Uint8Array;
  readonly masterKeyIterations: number;
  readonly uuid: string;
  readonly slots: readonly LuksKeySlot[];
  // Parsed from the strings:
  readonly cipherAlg: CipherAlg;
  readonly cipherMode: CipherMode;
  readonly ivgenAlg: IvGenAlg;
  readonly ivgenHash: HashAlg | undefined;
  readonly hashAlg: HashAlg;
}

/** qemu's qcrypto_block_luks_has_format: the magic and version 1 (the luks probe). */
export function hasLuksMagic(head: Uint8Array): boolean {
  if (head.length < 8) return false;
  for (let i = 0; i < MAGIC.length; i++) if (head[i] !== MAGIC[i]) return false;
  return ((head[6]! << 8) | head[7]!) === 1;
}

function invalid(message: string): BlockError {
  return new BlockError(Errno.EINVAL, message);
}

/** A NUL-terminated field, or undefined when it has no NUL. */
function cField(bytes: Uint8Array, at: number, len: number): string | undefined {
  const f = bytes.subarray(at, at + len);
  const nul = f.indexOf(0);
  if (nul < 0) return undefined;
  return new TextDecoder("latin1").decode(f.subarray(0, nul));
}

/** Sectors of a slot's key material, as cryptsetup and qemu round them. */
export function splitKeySectors(masterKeyLen: number, stripes: number): number {
  const sectors = Math.ceil((masterKeyLen * stripes) / LUKS_SECTOR);
  return Math.ceil(sectors / HEADER_SECTORS) * HEADER_SECTORS;
}

function lookup<T extends string>(
  names: readonly T[],
  name: string,
  type: string,
): T {
  if ((names as readonly string[]).includes(name)) return name as T;
  throw invalid(`${type} '${name}' not supported`);
}

/** qemu's qcrypto_block_luks_cipher_name_lookup (XTS halves the key). */
function cipherLookup(name: string, mode: CipherMode, keyBytes: number): CipherAlg {
  const per = mode === "xts" ? Math.floor(keyBytes / 2) : keyBytes;
  if (name === "aes") {
    if (per === 16) return "aes-128";
    if (per === 24) return "aes-192";
    if (per === 32) return "aes-256";
  }
  const known: Record<string, readonly number[]> = {
    cast5: [16],
    serpent: [16, 24, 32],
    twofish: [16, 24, 32],
  };
  if (known[name]?.includes(per)) {
    // qemu takes these with its nettle/gcrypt backends; denbd's OpenSSL path runs AES only.
    throw new BlockError(
      Errno.ENOTSUP,
      `Algorithm '${name}' with key size ${per} bytes not supported by denbd (AES only)`,
    );
  }
  throw invalid(`Algorithm '${name}' with key size ${per} bytes not supported`);
}

/**
 * Decodes and checks the header at the start of `bytes` (at least {@link LUKS_HEADER_SIZE}
 * bytes; shorter input reads as zero-padded). Throws BlockError with qemu's message.
 */
export function decodeLuksHeader(input: Uint8Array): LuksHeader {
  const bytes = new Uint8Array(LUKS_HEADER_SIZE);
  bytes.set(input.subarray(0, LUKS_HEADER_SIZE));
  const v = new DataView(bytes.buffer);
  for (let i = 0; i < MAGIC.length; i++) {
    if (bytes[i] !== MAGIC[i]) throw invalid("Volume is not in LUKS format");
  }
  const version = v.getUint16(6);
  if (version !== 1) throw invalid(`LUKS version ${version} is not supported`);
  const cipherName = cField(bytes, 8, 32);
  if (cipherName === undefined) throw invalid("LUKS header cipher name is not NUL terminated");
  const cipherModeSpec = cField(bytes, 40, 32);
  if (cipherModeSpec === undefined) {
    throw invalid("LUKS header cipher mode is not NUL terminated");
  }
  const hashSpec = cField(bytes, 72, 32);
  if (hashSpec === undefined) throw invalid("LUKS header hash spec is not NUL terminated");
  const payloadOffsetSector = v.getUint32(104);
  const masterKeyLen = v.getUint32(108);
  const masterKeyIterations = v.getUint32(164);
  if (payloadOffsetSector < HEADER_SECTORS) {
    throw invalid("LUKS payload is overlapping with the header");
  }
  if (masterKeyIterations === 0) throw invalid("LUKS key iteration count is zero");

  const slots: LuksKeySlot[] = [];
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) {
    const at = 208 + i * 48;
    slots.push({
      active: v.getUint32(at),
      iterations: v.getUint32(at + 4),
      salt: bytes.slice(at + 8, at + 8 + LUKS_SALT_LEN),
      keyOffsetSector: v.getUint32(at + 40),
      stripes: v.getUint32(at + 44),
    });
  }
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) {
    const s = slots[i]!;
    const start = s.keyOffsetSector;
    const len = splitKeySectors(masterKeyLen, s.stripes);
    if (s.stripes !== LUKS_STRIPES) {
      throw invalid(`Keyslot ${i} is corrupted (stripes ${s.stripes | 0} != ${LUKS_STRIPES})`);
    }
    if (s.active !== LUKS_KEY_SLOT_DISABLED && s.active !== LUKS_KEY_SLOT_ENABLED) {
      throw invalid(`Keyslot ${i} state (active/disable) is corrupted`);
    }
    if (s.active === LUKS_KEY_SLOT_ENABLED && s.iterations === 0) {
      throw invalid(`Keyslot ${i} iteration count is zero`);
    }
    if (start < HEADER_SECTORS) {
      throw invalid(`Keyslot ${i} is overlapping with the LUKS header`);
    }
    if (start + len > payloadOffsetSector) {
      throw invalid(`Keyslot ${i} is overlapping with the encrypted payload`);
    }
    for (let j = i + 1; j < LUKS_NUM_KEY_SLOTS; j++) {
      const t = slots[j]!;
      const start2 = t.keyOffsetSector;
      const len2 = splitKeySectors(masterKeyLen, t.stripes);
      if (start + len > start2 && start2 + len2 > start) {
        throw invalid(`Keyslots ${i} and ${j} are overlapping in the header`);
      }
    }
  }

  // qcrypto_block_luks_parse_header: MODE-IVGEN[:IVHASH].
  const dash = cipherModeSpec.indexOf("-");
  if (dash < 0) throw invalid(`Unexpected cipher mode string format '${cipherModeSpec}'`);
  const modeName = cipherModeSpec.slice(0, dash);
  let ivgenName = cipherModeSpec.slice(dash + 1);
  let ivgenHash: HashAlg | undefined;
  const colon = ivgenName.indexOf(":");
  if (colon >= 0) {
    ivgenHash = lookup(HASH_ALGS, ivgenName.slice(colon + 1), "Hash algorithm");
    ivgenName = ivgenName.slice(0, colon);
  }
  const cipherMode = lookup(CIPHER_MODES, modeName, "Cipher mode");
  const cipherAlg = cipherLookup(cipherName, cipherMode, masterKeyLen);
  const hashAlg = lookup(HASH_ALGS, hashSpec, "Hash algorithm");
  const ivgenAlg = lookup(IVGEN_ALGS, ivgenName, "IV generator");
  if (ivgenAlg === "essiv") {
    if (ivgenHash === undefined) throw invalid("Missing IV generator hash specification");
    try {
      essivCipher(cipherAlg, ivgenHash);
    } catch (e) {
      throw invalid((e as Error).message);
    }
  }
  return {
    version,
    cipherName,
    cipherModeSpec,
    hashSpec,
    payloadOffsetSector,
    masterKeyLen,
    masterKeyDigest: bytes.slice(112, 112 + LUKS_DIGEST_LEN),
    masterKeySalt: bytes.slice(132, 132 + LUKS_SALT_LEN),
    masterKeyIterations,
    uuid: cField(bytes, 168, 40) ?? "",
    slots,
    cipherAlg,
    cipherMode,
    ivgenAlg,
    ivgenHash,
    hashAlg,
  };
}

/** Encodes a header (for tests and images made by test code). */
export function encodeLuksHeader(
  h:
    & Omit<
      LuksHeader,
      "cipherAlg" | "cipherMode" | "ivgenAlg" | "ivgenHash" | "hashAlg" | "version"
    >
    & { version?: number },
): Uint8Array {
  const bytes = new Uint8Array(LUKS_HEADER_SIZE);
  const v = new DataView(bytes.buffer);
  bytes.set(MAGIC, 0);
  v.setUint16(6, h.version ?? 1);
  const enc = new TextEncoder();
  bytes.set(enc.encode(h.cipherName).subarray(0, 31), 8);
  bytes.set(enc.encode(h.cipherModeSpec).subarray(0, 31), 40);
  bytes.set(enc.encode(h.hashSpec).subarray(0, 31), 72);
  v.setUint32(104, h.payloadOffsetSector);
  v.setUint32(108, h.masterKeyLen);
  bytes.set(h.masterKeyDigest.subarray(0, LUKS_DIGEST_LEN), 112);
  bytes.set(h.masterKeySalt.subarray(0, LUKS_SALT_LEN), 132);
  v.setUint32(164, h.masterKeyIterations);
  bytes.set(enc.encode(h.uuid).subarray(0, 39), 168);
  h.slots.forEach((s, i) => {
    const at = 208 + i * 48;
    v.setUint32(at, s.active);
    v.setUint32(at + 4, s.iterations);
    bytes.set(s.salt.subarray(0, LUKS_SALT_LEN), at + 8);
    v.setUint32(at + 40, s.keyOffsetSector);
    v.setUint32(at + 44, s.stripes);
  });
  return bytes;
}
