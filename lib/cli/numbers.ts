/**
 * The number syntaxes qemu-nbd 7.2 accepts on its command line, reimplemented from observed
 * behaviour: C `strtoull`/`strtol` (used by `-o`, `-e`, `--handshake-limit`) and qemu's size
 * syntax (`offset=`/`size=` in `--image-opts`: suffixes, fractions, hex).
 *
 * @module
 */

const U64_LIMIT = 1n << 64n;
const U64_MAX = U64_LIMIT - 1n;

/** Why a number did not parse: not a number at all, or out of the type's range. */
export type NumberError = "invalid" | "range";

/** The outcome of a C-style conversion that may stop before the end of the text. */
interface Scan {
  /** The value, already wrapped to 64 bits as strtoull does for a leading '-'. */
  readonly value: bigint;
  /** Index just past the last character consumed (0 when nothing was converted). */
  readonly end: number;
  readonly error: NumberError | undefined;
  /** The magnitude had a leading '-'. */
  readonly negative: boolean;
}

/** C locale isspace(). */
function isCSpace(ch: string | undefined): boolean {
  return ch === " " || ch === "\t" || ch === "\n" || ch === "\v" || ch === "\f" || ch === "\r";
}

function digitValue(ch: string | undefined): number {
  if (ch === undefined) return 99;
  const c = ch.charCodeAt(0);
  if (c >= 48 && c <= 57) return c - 48;
  if (c >= 97 && c <= 122) return c - 87;
  if (c >= 65 && c <= 90) return c - 55;
  return 99;
}

/** strtoull(text, &end, base) for base 0, 10 or 16, with errno folded into `error`. */
function scanUnsigned(text: string, base: 0 | 10 | 16): Scan {
  let i = 0;
  while (isCSpace(text[i])) i++;
  let negative = false;
  if (text[i] === "+" || text[i] === "-") {
    negative = text[i] === "-";
    i++;
  }
  let radix: number = base === 0 ? 10 : base;
  // "0x" counts as a prefix only when a hex digit follows; otherwise the "0" alone is the number.
  if (
    (base === 0 || base === 16) && text[i] === "0" &&
    (text[i + 1] === "x" || text[i + 1] === "X") &&
    digitValue(text[i + 2]) < 16
  ) {
    radix = 16;
    i += 2;
  } else if (base === 0 && text[i] === "0") {
    radix = 8;
  }
  const start = i;
  let magnitude = 0n;
  const bigRadix = BigInt(radix);
  while (digitValue(text[i]) < radix) {
    magnitude = magnitude * bigRadix + BigInt(digitValue(text[i]));
    i++;
  }
  if (i === start) return { value: 0n, end: 0, error: "invalid", negative };
  if (magnitude > U64_MAX) return { value: U64_MAX, end: i, error: "range", negative };
  const value = negative ? (U64_LIMIT - magnitude) % U64_LIMIT : magnitude;
  return { value, end: i, error: undefined, negative };
}

/**
 * qemu_strtou64(text, NULL, base): the whole text must be one C unsigned integer. A leading '-'
 * wraps modulo 2^64 exactly as strtoull does ("-1" is 2^64-1).
 */
export function parseU64(text: string, base: 0 | 10 | 16): bigint | NumberError {
  const s = scanUnsigned(text, base);
  if (s.end !== text.length) return "invalid";
  return s.error ?? s.value;
}

/** qemu_strtoi(text, NULL, base): a whole C `int` (strtoll, then the 32-bit range). */
export function parseInt32(text: string, base: 0 | 10): number | NumberError {
  const s = scanUnsigned(text, base);
  if (s.end !== text.length) return "invalid";
  if (s.error !== undefined) return s.error;
  const value = s.negative ? s.value - U64_LIMIT : s.value;
  if (s.negative && s.value === 0n) return 0; // "-0"
  if (value > 2147483647n || value < -2147483648n) return "range";
  return Number(value);
}

function suffixMultiplier(ch: string | undefined): bigint | undefined {
  switch (ch?.toUpperCase()) {
    case "B":
      return 1n;
    case "K":
      return 1n << 10n;
    case "M":
      return 1n << 20n;
    case "G":
      return 1n << 30n;
    case "T":
      return 1n << 40n;
    case "P":
      return 1n << 50n;
    case "E":
      return 1n << 60n;
    default:
      return undefined;
  }
}

/**
 * qemu 7.2's size syntax (qemu_strtosz): a decimal integer, optionally a fraction, optionally one
 * binary suffix (B K M G T P E, either case); or a hex integer ("0x1f", a suffix is accepted but
 * deprecated, a fraction is not). A fraction needs a suffix other than B unless it is zero. The
 * fraction is kept as 64-bit fixed point and the product rounded half up, which is why "0.1k" is
 * 102 and "1.5k" is 1536. Exponents ("1e3") and negative numbers are invalid; 2^64 and above is
 * out of range.
 */
export function parseSize(text: string): bigint | NumberError {
  const first = scanUnsigned(text, 10);
  if (first.error !== undefined) {
    return first.end === text.length ? first.error : "invalid";
  }
  if (text.slice(0, first.end).includes("-")) return "invalid";
  let value = first.value;
  let end = first.end;
  let fixedFraction = 0n; // fraction * 2^64, truncated
  if (value === 0n && (text[end] === "x" || text[end] === "X")) {
    const again = scanUnsigned(text, 16);
    if (again.error !== undefined) return again.end === text.length ? again.error : "invalid";
    if (text[again.end] === ".") return "invalid";
    // qemu 7.2 warns about a suffix on a hex number but still accepts it.
    value = again.value;
    end = again.end;
  } else if (text[end] === ".") {
    // strtod(".digits[e...]"): without digits nothing converts and only the '.' is skipped, so
    // "1.k" is 1 KiB.
    const m = /^\.(\d+)([eE][+-]?\d+)?/.exec(text.slice(end));
    if (m === null) {
      end += 1;
    } else if (m[2] !== undefined) {
      return "invalid";
    } else {
      const fraction = Number(`0.${m[1]}`);
      const scaled = fraction * 2 ** 64;
      // A fraction that rounds to 1.0 converts to 0 through qemu's (uint64_t) cast on x86-64.
      fixedFraction = scaled >= 2 ** 64 ? 0n : BigInt(Math.trunc(scaled));
      end += m[0].length;
    }
  }
  let mul = suffixMultiplier(text[end]);
  if (mul !== undefined) {
    end += 1;
  } else {
    mul = 1n;
  }
  if (end !== text.length) return "invalid";
  if (mul === 1n) {
    return fixedFraction === 0n ? value : "invalid";
  }
  const fractionProduct = fixedFraction * mul;
  const roundUp = (fractionProduct >> 63n) & 1n;
  const total = value * mul + (fractionProduct >> 64n) + roundUp;
  return total > U64_MAX ? "range" : total;
}
