/**
 * qemu's keyval syntax for `--object` (util/keyval.c): `[TYPE,]KEY=VALUE,...`, where a first
 * element without `=` is the implied `qom-type`, `,,` is a literal comma in a value, a later
 * key replaces an earlier one, and `help` (alone or as `TYPE,help`) asks for help.
 *
 * @module
 */

import { ObjectError } from "./types.ts";

/** A parsed `--object` argument: flat keys (dotted ones for lists) and whether help was asked. */
export interface KeyvalResult {
  readonly pairs: ReadonlyMap<string, string>;
  readonly help: boolean;
}

/** Read one value up to an unescaped comma; returns it and where parsing continues. */
function readValue(text: string, at: number): [string, number] {
  let value = "";
  while (at < text.length) {
    const c = text[at]!;
    if (c === ",") {
      if (text[at + 1] !== ",") break;
      value += ",";
      at += 2;
      continue;
    }
    value += c;
    at++;
  }
  return [value, at];
}

const KEY_PART = /^[A-Za-z0-9_-]+$/;

/** Parse `text` with `implied` as the key of a leading bare value. */
export function parseKeyval(text: string, implied: string): KeyvalResult {
  const pairs = new Map<string, string>();
  let help = false;
  let at = 0;
  let first = true;
  while (at <= text.length) {
    if (at === text.length && !first) break;
    const eq = text.indexOf("=", at);
    const comma = text.indexOf(",", at);
    const keyEnd = eq < 0 ? text.length : eq;
    const elemEnd = comma < 0 ? text.length : comma;
    if (elemEnd < keyEnd) {
      // An element without "=": the implied key's value (first only), or "help".
      const [value, next] = readValue(text, at);
      if (value === "help" || value === "?") help = true;
      else if (first && value !== "") pairs.set(implied, value);
      else throw new ObjectError(`Invalid parameter '${value}'`);
      at = next + 1;
      first = false;
      continue;
    }
    const key = text.slice(at, keyEnd);
    if (eq < 0) {
      if (key === "help" || key === "?") {
        help = true;
        break;
      }
      if (first && key !== "") {
        pairs.set(implied, readValue(text, at)[0]);
        break;
      }
      throw new ObjectError(`Expected '=' after parameter '${key}'`);
    }
    if (key === "" || !key.split(".").every((k) => KEY_PART.test(k))) {
      throw new ObjectError(`Invalid parameter '${key}'`);
    }
    const [value, next] = readValue(text, eq + 1);
    pairs.set(key, value);
    at = next + 1;
    first = false;
  }
  return { pairs, help };
}
