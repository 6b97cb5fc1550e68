/**
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of VHDX headers, region
 * tables and log entries. Table-driven, eight bytes a step (slicing-by-8).
 *
 * @module
 */

const POLY = 0x82f63b78;

const TABLES: Uint32Array[] = (() => {
  const t: Uint32Array[] = [];
  for (let k = 0; k < 8; k++) t.push(new Uint32Array(256));
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let j = 0; j < 8; j++) c = c & 1 ? (c >>> 1) ^ POLY : c >>> 1;
    t[0]![i] = c >>> 0;
  }
  for (let i = 0; i < 256; i++) {
    let c = t[0]![i]!;
    for (let k = 1; k < 8; k++) {
      c = (c >>> 8) ^ t[0]![c & 0xff]!;
      t[k]![i] = c >>> 0;
    }
  }
  return t;
})();

/**
 * Continues a CRC-32C over `data`. `crc` is a previous result (0 to start); the result is the
 * finished checksum, so `crc32c(crc32c(0, a), b)` equals `crc32c(0, a ++ b)`.
 */
export function crc32c(crc: number, data: Uint8Array): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = TABLES as [
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
    Uint32Array,
  ];
  let c = ~crc >>> 0;
  let i = 0;
  const n = data.length;
  for (; i + 8 <= n; i += 8) {
    const lo =
      (c ^ (data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24))) >>>
      0;
    c = t7[lo & 0xff]! ^ t6[(lo >>> 8) & 0xff]! ^ t5[(lo >>> 16) & 0xff]! ^ t4[lo >>> 24]! ^
      t3[data[i + 4]!]! ^ t2[data[i + 5]!]! ^ t1[data[i + 6]!]! ^ t0[data[i + 7]!]!;
  }
  for (; i < n; i++) c = t0[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

/** CRC-32C of `data` with its 4-byte checksum field at `at` read as zero. */
export function crc32cWithHole(data: Uint8Array, at: number): number {
  let c = crc32c(0, data.subarray(0, at));
  c = crc32c(c, new Uint8Array(4));
  return crc32c(c, data.subarray(at + 4));
}
