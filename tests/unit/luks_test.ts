/**
 * LUKS pieces on their own: the sector cipher against node:crypto's per-sector AES (CBC, ECB,
 * CTR with plain/plain64 IVs), the anti-forensic split/merge round trip, a volume built here
 * (header, split and encrypted key material) unlocked by the right password and refused for a
 * wrong one and for hostile iteration counts, and a seeded fuzz of the header decoder and the
 * unlock path: every mutated header either decodes or fails with a BlockError, never anything
 * else, never a hang.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createCipheriv } from "node:crypto";
import { afMerge, afSplit } from "../../lib/crypto/afsplit.ts";
import { type CipherAlg, type CipherMode, SectorCipher } from "../../lib/crypto/cipher.ts";
import { pbkdf2 } from "../../lib/crypto/pbkdf2.ts";
import {
  decodeLuksHeader,
  encodeLuksHeader,
  LUKS_KEY_SLOT_DISABLED,
  LUKS_KEY_SLOT_ENABLED,
  splitKeySectors,
} from "../../lib/block/luks/header.ts";
import { unlockLuks } from "../../lib/block/luks/unlock.ts";
import { BlockError } from "../../lib/block/types.ts";

/** A small seeded generator (xorshift32). */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

function bytes(n: number, seed: number): Uint8Array {
  const r = rng(seed);
  return Uint8Array.from({ length: n }, () => Math.floor(r() * 256));
}

function plainIv(sector: number, wide: boolean): Uint8Array {
  const iv = new Uint8Array(16);
  const v = new DataView(iv.buffer);
  v.setUint32(0, sector >>> 0, true);
  if (wide) v.setUint32(4, Math.floor(sector / 2 ** 32), true);
  return iv;
}

Deno.test("luks cipher: sector-wise AES matches node:crypto", () => {
  const cases: { alg: CipherAlg; mode: CipherMode; ivgen: "plain" | "plain64" }[] = [
    { alg: "aes-256", mode: "cbc", ivgen: "plain64" },
    { alg: "aes-128", mode: "cbc", ivgen: "plain" },
    { alg: "aes-128", mode: "ecb", ivgen: "plain64" },
    { alg: "aes-256", mode: "ctr", ivgen: "plain64" },
    { alg: "aes-192", mode: "ctr", ivgen: "plain" },
  ];
  for (const c of cases) {
    const keyLen = { "aes-128": 16, "aes-192": 24, "aes-256": 32 }[c.alg];
    const key = bytes(keyLen, 5);
    const plain = bytes(4 * 512, 6);
    // A first sector past 2^32 tells plain from plain64.
    const first = 2 ** 32 + 7;
    const sc = new SectorCipher({ alg: c.alg, mode: c.mode, ivgen: c.ivgen, key });
    const buf = new Uint8Array(plain);
    sc.encrypt(buf, first);
    for (let s = 0; s < 4; s++) {
      const iv = c.mode === "ecb" ? null : plainIv(first + s, c.ivgen === "plain64");
      const e = createCipheriv(`${c.alg}-${c.mode}`, key, iv);
      e.setAutoPadding(false);
      const want = new Uint8Array(e.update(plain.subarray(s * 512, (s + 1) * 512)));
      assert.deepEqual(buf.subarray(s * 512, (s + 1) * 512), want, `${c.alg}-${c.mode} ${s}`);
    }
    sc.decrypt(buf, first);
    assert.deepEqual(buf, plain);
    sc.close();
  }
});

Deno.test("luks cipher: XTS and ESSIV round trips, IVs differ per sector", () => {
  for (const alg of ["aes-128", "aes-192", "aes-256"] as const) {
    const keyLen = { "aes-128": 32, "aes-192": 48, "aes-256": 64 }[alg];
    const sc = new SectorCipher({
      alg,
      mode: "xts",
      ivgen: "essiv",
      ivHash: "sha256",
      key: bytes(keyLen, 9),
    });
    const plain = new Uint8Array(1024); // two equal (zero) sectors
    const buf = new Uint8Array(plain);
    sc.encrypt(buf, 3);
    assert.notDeepEqual(buf.subarray(0, 512), buf.subarray(512));
    sc.decrypt(buf, 3);
    assert.deepEqual(buf, plain);
    sc.close();
  }
  assert.throws(
    () =>
      new SectorCipher({ alg: "aes-256", mode: "xts", ivgen: "plain64", key: new Uint8Array(32) }),
    /needs a 64-byte key/,
  );
});

Deno.test("luks cipher: batched XTS equals OpenSSL's XTS, aligned or not", () => {
  for (const keyLen of [32, 64]) {
    const alg = keyLen === 32 ? "aes-128" : "aes-256";
    const key = bytes(keyLen, 21);
    const ours = new SectorCipher({ alg, mode: "xts", ivgen: "plain64", key });
    const evp = new SectorCipher({ alg, mode: "xts", ivgen: "plain64", key, evpXts: true });
    for (const shift of [0, 1]) {
      const data = new Uint8Array(3 * 512 + shift).subarray(shift);
      data.set(bytes(3 * 512, 22));
      const want = new Uint8Array(data);
      ours.encrypt(data, 2 ** 33 + 5);
      evp.encrypt(want, 2 ** 33 + 5);
      assert.deepEqual(data, want, `${alg} shift ${shift}`);
      ours.decrypt(data, 2 ** 33 + 5);
      assert.deepEqual(data, bytes(3 * 512, 22));
    }
    ours.close();
    evp.close();
  }
});

Deno.test("luks afsplit: merge undoes split", () => {
  const key = bytes(32, 1);
  const split = afSplit("sha256", 32, key, 4000, bytes(32 * 3999, 2));
  assert.deepEqual(afMerge("sha256", 32, 32, 4000, split), key);
  const key20 = bytes(20, 3); // a key that is not a multiple of the digest
  const split2 = afSplit("sha512", 64, key20, 10, bytes(200, 4));
  assert.deepEqual(afMerge("sha512", 64, 20, 10, split2), key20);
});

const MK_LEN = 64;
const SLOT_SECTORS = splitKeySectors(MK_LEN, 4000);
const PAYLOAD_SECTOR = 8 + 8 * SLOT_SECTORS;

/** A LUKS1 volume (aes-256-xts-plain64, sha256) with `password` in slot 2, built here. */
async function buildVolume(password: string, iterations = 1000): Promise<Uint8Array> {
  const mk = bytes(MK_LEN, 11);
  const mkSalt = bytes(32, 12);
  const digest = await pbkdf2("sha256", mk, mkSalt, iterations, 20);
  const slotSalt = bytes(32, 13);
  const pw = new TextEncoder().encode(password);
  const slotKey = await pbkdf2("sha256", pw, slotSalt, iterations, MK_LEN);
  const split = afSplit("sha256", 32, mk, 4000, bytes(MK_LEN * 3999, 14));
  const sc = new SectorCipher({ alg: "aes-256", mode: "xts", ivgen: "plain64", key: slotKey });
  sc.encrypt(split, 0);
  sc.close();
  const slots = Array.from({ length: 8 }, (_, i) => ({
    active: i === 2 ? LUKS_KEY_SLOT_ENABLED : LUKS_KEY_SLOT_DISABLED,
    iterations: i === 2 ? iterations : 0,
    salt: i === 2 ? slotSalt : new Uint8Array(32),
    keyOffsetSector: 8 + i * SLOT_SECTORS,
    stripes: 4000,
  }));
  const header = encodeLuksHeader({
    cipherName: "aes",
    cipherModeSpec: "xts-plain64",
    hashSpec: "sha256",
    payloadOffsetSector: PAYLOAD_SECTOR,
    masterKeyLen: MK_LEN,
    masterKeyDigest: digest,
    masterKeySalt: mkSalt,
    masterKeyIterations: iterations,
    uuid: "00000000-0000-0000-0000-000000000001",
    slots,
  });
  const vol = new Uint8Array(PAYLOAD_SECTOR * 512 + 4096);
  vol.set(header);
  vol.set(split, (8 + 2 * SLOT_SECTORS) * 512);
  // Payload: sector 0.. encrypted with the master key.
  const data = bytes(4096, 15);
  const pc = new SectorCipher({ alg: "aes-256", mode: "xts", ivgen: "plain64", key: mk });
  pc.encrypt(data, 0);
  pc.close();
  vol.set(data, PAYLOAD_SECTOR * 512);
  return vol;
}

function reader(vol: Uint8Array) {
  return (buf: Uint8Array, off: number): Promise<void> => {
    buf.fill(0);
    if (off < vol.length) buf.set(vol.subarray(off, Math.min(vol.length, off + buf.length)));
    return Promise.resolve();
  };
}

Deno.test("luks unlock: right password opens, wrong one and hostile counts do not", async () => {
  const vol = await buildVolume("secret");
  const v = await unlockLuks(reader(vol), new TextEncoder().encode("secret"));
  assert.equal(v.payloadOffset, PAYLOAD_SECTOR * 512);
  const data = vol.slice(PAYLOAD_SECTOR * 512);
  v.cipher.decrypt(data, 0);
  assert.deepEqual(data, bytes(4096, 15));
  v.cipher.close();
  await assert.rejects(
    () => unlockLuks(reader(vol), new TextEncoder().encode("Secret")),
    /Invalid password, cannot unlock any keyslot/,
  );
  const hostile = new Uint8Array(vol);
  new DataView(hostile.buffer).setUint32(208 + 2 * 48 + 4, 0xffffffff);
  await assert.rejects(
    () => unlockLuks(reader(hostile), new TextEncoder().encode("secret")),
    /iteration count 4294967295 is larger than denbd allows/,
  );
});

Deno.test("luks fuzz: mutated headers decode or fail with BlockError (seeded, bounded)", async () => {
  const vol = await buildVolume("pw", 1);
  const head = vol.slice(0, 592);
  const r = rng(0x1ced);
  let decoded = 0;
  for (let i = 0; i < 3000; i++) {
    const m = new Uint8Array(head);
    const flips = 1 + Math.floor(r() * 6);
    for (let f = 0; f < flips; f++) {
      const at = Math.floor(r() * m.length);
      m[at] = r() < 0.3 ? 0 : r() < 0.5 ? 0xff : Math.floor(r() * 256);
    }
    const cut = r() < 0.1 ? Math.floor(r() * 592) : 592;
    try {
      decodeLuksHeader(m.subarray(0, cut));
      decoded++;
    } catch (e) {
      assert.ok(e instanceof BlockError, `iteration ${i}: ${e}`);
    }
  }
  assert.ok(decoded > 0 && decoded < 3000);
  // The unlock path on mutated volumes: a result or a BlockError (iterations kept small).
  for (let i = 0; i < 40; i++) {
    const m = new Uint8Array(vol);
    const at = Math.floor(r() * 592);
    m[at] = Math.floor(r() * 256);
    // Keep PBKDF2 cheap: the mutation must not raise the iteration counts much.
    const v = new DataView(m.buffer);
    if (v.getUint32(164) > 10) v.setUint32(164, 1);
    if (v.getUint32(208 + 96 + 4) > 10) v.setUint32(208 + 96 + 4, 1);
    try {
      const got = await unlockLuks(reader(m), new TextEncoder().encode("pw"));
      got.cipher.close();
    } catch (e) {
      assert.ok(e instanceof BlockError, `unlock ${i} (byte ${at}): ${e}`);
    }
  }
});
