/**
 * qemu's filename syntax for the image argument: the `json:{...}` pseudo-protocol and
 * `PROTOCOL:...` prefixes (`file:`, `null-co://`, `nbd://`, `http://`, ...). Both end up as qemu's
 * flat option dictionary (dotted keys, string values), the same shape `--image-opts` gives.
 *
 * @module
 */

import { CliError } from "./errors.ts";

/** Flat block-node options: `driver`, `file.filename`, `server.type`, ... → string values. */
export type NodeOptions = Record<string, string>;

/** How JSON `null` is kept in a flat string map (qemu's `"backing": null`). */
export const JSON_NULL = "\u0000null";

/** qemu's `path_has_protocol`: a colon before the first slash. */
export function hasProtocol(name: string): boolean {
  const colon = name.indexOf(":");
  if (colon < 0) return false;
  const slash = name.indexOf("/");
  return slash < 0 || colon < slash;
}

/**
 * The protocol a filename names, as qemu's `bdrv_find_protocol` reads it: the text before the
 * first colon when that colon comes before any slash, else undefined (a plain file).
 */
export function filenameProtocol(name: string): string | undefined {
  return hasProtocol(name) ? name.slice(0, name.indexOf(":")) : undefined;
}

/**
 * `json:{...}` → flat options. Nested objects become dotted keys (qemu's qdict_flatten);
 * numbers keep their JSON spelling, booleans become on/off, null is {@linkcode JSON_NULL}.
 */
export function parseJsonFilename(filename: string): NodeOptions {
  const text = filename.slice("json:".length);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new CliError(
      `Could not parse the JSON options: ${e instanceof Error ? e.message : String(e)}`,
    );
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new CliError("Invalid JSON object given");
  }
  const out: NodeOptions = {};
  flatten(value as Record<string, unknown>, "", out);
  return out;
}

function flatten(obj: Record<string, unknown>, prefix: string, out: NodeOptions): void {
  for (const [k, v] of Object.entries(obj)) {
    const key = prefix + k;
    if (v === null) out[key] = JSON_NULL;
    else if (typeof v === "string") out[key] = v;
    else if (typeof v === "number") out[key] = String(v);
    else if (typeof v === "boolean") out[key] = v ? "on" : "off";
    else if (Array.isArray(v)) {
      v.forEach((item, i) => {
        if (item !== null && typeof item === "object") {
          flatten(item as Record<string, unknown>, `${key}.${i}.`, out);
        } else flatten({ [String(i)]: item }, `${key}.`, out);
      });
    } else flatten(v as Record<string, unknown>, `${key}.`, out);
  }
}

/**
 * The subtree of `opts` under `prefix` ("file." → the child's options), keys relative to it
 * (qemu's qdict_extract_subqdict, without removing them).
 */
export function subOptions(opts: Readonly<NodeOptions>, prefix: string): NodeOptions {
  const out: NodeOptions = {};
  for (const [k, v] of Object.entries(opts)) {
    if (k.startsWith(prefix)) out[k.slice(prefix.length)] = v;
  }
  return out;
}

/** The keys of `opts` that belong to this node itself (no child prefix among `children`). */
export function ownOptions(
  opts: Readonly<NodeOptions>,
  children: readonly string[],
): NodeOptions {
  const out: NodeOptions = {};
  for (const [k, v] of Object.entries(opts)) {
    if (!children.some((c) => k.startsWith(`${c}.`))) out[k] = v;
  }
  return out;
}
