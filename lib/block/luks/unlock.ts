/**
 * Opening a LUKS1 volume as qemu 7.2's qcrypto_block_luks_open does, for the raw `luks` driver
 * and for qcow2's `encrypt.format=luks`: the header is read and checked, the password (the
 * secret, which must be valid UTF-8) is tried on every active key slot in order -- PBKDF2 of
 * the password with the slot's salt gives the slot key, which decrypts the slot's key material
 * (sector-wise, IVs from sector 0), the anti-forensic merge gives a candidate master key, and
 * PBKDF2 of that compared with the header's digest tells whether it is the one. The master key
 * then keys the payload cipher.
 *
 * @module
 */

import { afMerge } from "../../crypto/afsplit.ts";
import { CipherError, DIGEST_BYTES, SectorCipher } from "../../crypto/cipher.ts";
import { pbkdf2 } from "../../crypto/pbkdf2.ts";
import { BlockError, Errno } from "../types.ts";
import {
  decodeLuksHeader,
  LUKS_DIGEST_LEN,
  LUKS_HEADER_SIZE,
  LUKS_KEY_SLOT_ENABLED,
  LUKS_MAX_ITERATIONS,
  LUKS_SECTOR,
  type LuksHeader,
} from "./header.ts";

/** Reads `buf.length` bytes of the LUKS volume at `offset` (zeroes past its end). */
export type LuksRead = (buf: Uint8Array, offset: number) => Promise<void>;

/** An unlocked volume. */
export interface LuksVolume {
  readonly header: LuksHeader;
  /** Payload cipher; sector numbers are the caller's (guest or host offsets / 512). */
  readonly cipher: SectorCipher;
  /** Bytes from the volume's start to the payload. */
  readonly payloadOffset: number;
}

/** qcrypto_secret_lookup_as_utf8: the secret must be UTF-8 without NUL bytes. */
export function secretPassword(bytes: Uint8Array, id: string): Uint8Array {
  let ok = !bytes.includes(0);
  if (ok) {
    try {
      new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    } catch {
      ok = false;
    }
  }
  if (!ok) throw new BlockError(Errno.EINVAL, `Data from secret ${id} is not valid UTF-8`);
  return bytes;
}

function cipherFailure(e: unknown): unknown {
  return e instanceof CipherError ? new BlockError(Errno.ENOTSUP, e.message) : e;
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i]! ^ b[i]!;
  return d === 0;
}

/** Reads and checks the header only (qemu's checks without the key). */
export async function readLuksHeader(read: LuksRead): Promise<LuksHeader> {
  const head = new Uint8Array(LUKS_HEADER_SIZE);
  await read(head, 0);
  return decodeLuksHeader(head);
}

/**
 * Unlocks the volume with `password`; throws BlockError with qemu's messages
 * ("Invalid password, cannot unlock any keyslot" when no slot opens).
 */
export async function unlockLuks(read: LuksRead, password: Uint8Array): Promise<LuksVolume> {
  const h = await readLuksHeader(read);
  const keyLen = h.masterKeyLen;
  const digestBytes = DIGEST_BYTES[h.hashAlg];
  const tooMany = (n: number) =>
    new BlockError(
      Errno.EINVAL,
      `LUKS PBKDF2 iteration count ${n} is larger than denbd allows (${LUKS_MAX_ITERATIONS})`,
    );
  if (h.masterKeyIterations > LUKS_MAX_ITERATIONS) throw tooMany(h.masterKeyIterations);
  for (const slot of h.slots) {
    if (slot.active !== LUKS_KEY_SLOT_ENABLED) continue;
    if (slot.iterations > LUKS_MAX_ITERATIONS) throw tooMany(slot.iterations);
    const slotKey = await pbkdf2(h.hashAlg, password, slot.salt, slot.iterations, keyLen);
    // Bounded: keyLen is at most 64 (the cipher lookup checked it), stripes 4000.
    const material = new Uint8Array(keyLen * slot.stripes);
    await read(material, slot.keyOffsetSector * LUKS_SECTOR);
    let slotCipher: SectorCipher;
    try {
      slotCipher = new SectorCipher({
        alg: h.cipherAlg,
        mode: h.cipherMode,
        ivgen: h.ivgenAlg,
        ivHash: h.ivgenHash,
        key: slotKey,
      });
    } catch (e) {
      throw cipherFailure(e);
    }
    try {
      // The material is sector-wise like the payload; its last sector may be partial.
      const whole = Math.ceil(material.length / LUKS_SECTOR) * LUKS_SECTOR;
      if (whole === material.length) {
        slotCipher.decrypt(material, 0);
      } else {
        const padded = new Uint8Array(whole);
        padded.set(material);
        slotCipher.decrypt(padded, 0);
        material.set(padded.subarray(0, material.length));
      }
    } finally {
      slotCipher.close();
    }
    const candidate = afMerge(h.hashAlg, digestBytes, keyLen, slot.stripes, material);
    const digest = await pbkdf2(
      h.hashAlg,
      candidate,
      h.masterKeySalt,
      h.masterKeyIterations,
      LUKS_DIGEST_LEN,
    );
    if (!equal(digest, h.masterKeyDigest)) continue;
    try {
      const cipher = new SectorCipher({
        alg: h.cipherAlg,
        mode: h.cipherMode,
        ivgen: h.ivgenAlg,
        ivHash: h.ivgenHash,
        key: candidate,
      });
      return { header: h, cipher, payloadOffset: h.payloadOffsetSector * LUKS_SECTOR };
    } catch (e) {
      throw cipherFailure(e);
    }
  }
  throw new BlockError(Errno.EINVAL, "Invalid password, cannot unlock any keyslot");
}
