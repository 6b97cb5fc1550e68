/**
 * The LUKS anti-forensic merge (crypto/afsplit.c, the LUKS1 spec §2.4): the key material of a
 * slot is `stripes` blocks of the key's size; every block but the last is XORed into an
 * accumulator that is then diffused with the hash, and the last block XORed with the
 * accumulator is the key. Diffusion hashes each digest-sized piece with its big-endian 32-bit
 * index in front and keeps as many bytes of the digest as the piece has.
 *
 * @module
 */

import { createHash } from "node:crypto";
import type { HashAlg } from "./cipher.ts";

function diffuse(hash: HashAlg, block: Uint8Array, digestBytes: number): void {
  const index = new Uint8Array(4);
  const iv = new DataView(index.buffer);
  for (let i = 0, at = 0; at < block.length; i++, at += digestBytes) {
    const n = Math.min(digestBytes, block.length - at);
    iv.setUint32(0, i);
    const d = createHash(hash).update(index).update(block.subarray(at, at + n)).digest();
    block.set(d.subarray(0, n), at);
  }
}

/** The key merged from `material` (`stripes` blocks of `keyBytes`). */
export function afMerge(
  hash: HashAlg,
  digestBytes: number,
  keyBytes: number,
  stripes: number,
  material: Uint8Array,
): Uint8Array {
  const acc = new Uint8Array(keyBytes);
  for (let s = 0; s < stripes - 1; s++) {
    const base = s * keyBytes;
    for (let i = 0; i < keyBytes; i++) acc[i]! ^= material[base + i]!;
    diffuse(hash, acc, digestBytes);
  }
  const last = (stripes - 1) * keyBytes;
  for (let i = 0; i < keyBytes; i++) acc[i]! ^= material[last + i]!;
  return acc;
}

/** The inverse, for tests: splits `key` into `stripes` blocks whose first ones are `random`. */
export function afSplit(
  hash: HashAlg,
  digestBytes: number,
  key: Uint8Array,
  stripes: number,
  random: Uint8Array,
): Uint8Array {
  const kb = key.length;
  const out = new Uint8Array(kb * stripes);
  out.set(random.subarray(0, kb * (stripes - 1)));
  const acc = new Uint8Array(kb);
  for (let s = 0; s < stripes - 1; s++) {
    for (let i = 0; i < kb; i++) acc[i]! ^= out[s * kb + i]!;
    diffuse(hash, acc, digestBytes);
  }
  for (let i = 0; i < kb; i++) out[(stripes - 1) * kb + i] = acc[i]! ^ key[i]!;
  return out;
}
