/**
 * qemu's `rbd:` filename syntax (block/rbd.c, qemu_rbd_parse_filename), read into the options
 * `--image-opts driver=rbd,...` takes:
 *
 *     rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:KEY=VALUE[:KEY=VALUE...]]
 *
 * A backslash escapes the next character (`\:` is a colon inside a value). `conf=` and `id=`
 * become the `conf` and `user` options; every other pair is handed to librados as a
 * configuration setting, in order, kept as a JSON list under {@link KEYVALUE_PAIRS} (qemu's
 * internal `=keyvalue-pairs` option, which no user can spell because of the `=`).
 *
 * Quirk kept from qemu: an `@` anywhere after the pool (even inside a KEY=VALUE) starts the
 * snapshot name, and the image name then runs up to that `@`.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";
import type { NodeOptions } from "../../cli/filename.ts";

/** The option holding the librados KEY=VALUE pairs of a filename: a JSON list k1, v1, k2, ... */
export const KEYVALUE_PAIRS = "=keyvalue-pairs";

/** Index of `delim` in `s` from `from`, skipping backslash-escaped characters; -1 if none. */
function findUnescaped(s: string, delim: string, from: number): number {
  for (let i = from; i < s.length; i++) {
    const ch = s[i];
    if (ch === delim) return i;
    if (ch === "\\" && i + 1 < s.length) i++;
  }
  return -1;
}

/** Drops the escaping backslashes (`\x` → `x`; a trailing lone backslash stays). */
function unescape(s: string): string {
  let out = "";
  for (let i = 0; i < s.length; i++) {
    if (s[i] === "\\" && i + 1 < s.length) i++;
    out += s[i];
  }
  return out;
}

/** Splits at the first unescaped `delim`: [before, after] or [all, undefined]. */
function nextToken(s: string, delim: string): [string, string | undefined] {
  const at = findUnescaped(s, delim, 0);
  return at < 0 ? [s, undefined] : [s.slice(0, at), s.slice(at + 1)];
}

/** `rbd:...` → options (pool, namespace, image, snapshot, conf, user, =keyvalue-pairs). */
export function parseRbdFilename(filename: string): NodeOptions {
  if (!filename.startsWith("rbd:")) {
    throw new BlockError(Errno.EINVAL, "File name must start with 'rbd:'");
  }
  const out: NodeOptions = {};
  const [pool, afterPool] = nextToken(filename.slice(4), "/");
  if (afterPool === undefined) throw new BlockError(Errno.EINVAL, "Pool name is required");
  out["pool"] = unescape(pool);
  let imageName: string;
  let rest: string | undefined;
  if (findUnescaped(afterPool, "@", 0) >= 0) {
    const [img, afterAt] = nextToken(afterPool, "@");
    imageName = img;
    const [snap, afterSnap] = nextToken(afterAt ?? "", ":");
    out["snapshot"] = unescape(snap);
    rest = afterSnap;
  } else {
    [imageName, rest] = nextToken(afterPool, ":");
  }
  if (findUnescaped(imageName, "/", 0) >= 0) {
    const [ns, img] = nextToken(imageName, "/");
    out["namespace"] = unescape(ns);
    imageName = img ?? "";
  } else {
    out["namespace"] = "";
  }
  out["image"] = unescape(imageName);
  const pairs: string[] = [];
  while (rest !== undefined) {
    const [name, afterName] = nextToken(rest, "=");
    if (afterName === undefined) {
      throw new BlockError(Errno.EINVAL, `conf option ${name} has no value`);
    }
    const [value, next] = nextToken(afterName, ":");
    const key = unescape(name);
    const val = unescape(value);
    if (key === "conf") out["conf"] = val;
    else if (key === "id") out["user"] = val;
    else pairs.push(key, val);
    rest = next;
  }
  if (pairs.length > 0) out[KEYVALUE_PAIRS] = JSON.stringify(pairs);
  return out;
}
