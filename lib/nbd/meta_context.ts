/**
 * Metadata-context queries (NBD_OPT_LIST/SET_META_CONTEXT) with qemu-nbd's matching rules:
 * `base:allocation`; `qemu:allocation-depth` (with -A); `qemu:dirty-bitmap:NAME` (with -B).
 * In LIST, the empty leaf of a namespace (`base:`, `qemu:`, `qemu:dirty-bitmap:`) is a wildcard
 * and zero queries list everything; in SET those wildcards select nothing. Unknown namespaces
 * and leaves are ignored, never errors.
 *
 * @module
 */

import {
  META_ID_ALLOCATION_DEPTH,
  META_ID_BASE_ALLOCATION,
  NBD_MAX_STRING_SIZE,
} from "./constants.ts";
import { view } from "./wire.ts";

/** Which contexts a connection selected. */
export interface MetaSelection {
  readonly baseAllocation: boolean;
  readonly allocationDepth: boolean;
  /** Indexes into the export's bitmap list. */
  readonly bitmaps: readonly number[];
  /** Number of selected contexts. */
  readonly count: number;
}

/** What the export offers. */
export interface MetaOffer {
  readonly allocationDepth: boolean;
  readonly bitmaps: readonly string[];
}

export interface ParsedQueries {
  readonly exportName: Uint8Array;
  readonly selection: MetaSelection;
}

/** Context id of bitmap number `i` (qemu numbers them after allocation-depth). */
export function bitmapContextId(i: number): number {
  return 2 + i;
}

const decoder = new TextDecoder();

/**
 * Parse the option data: u32 name length, export name, u32 query count, then per query u32
 * length and the query. Returns an error message for malformed data (ERR_INVALID).
 */
export function parseMetaQueries(
  data: Uint8Array,
  isSet: boolean,
  offer: MetaOffer,
): ParsedQueries | string {
  const v = view(data);
  if (data.length < 4) return "Inconsistent lengths in option";
  const nameLen = v.getUint32(0);
  if (nameLen > NBD_MAX_STRING_SIZE) return `Invalid name length: ${nameLen}`;
  let at = 4 + nameLen;
  if (at + 4 > data.length) return "Inconsistent lengths in option";
  const exportName = data.subarray(4, at);
  const count = v.getUint32(at);
  at += 4;

  let base = false;
  let depth = false;
  const bitmaps = new Set<number>();
  if (count === 0 && !isSet) {
    base = true;
    depth = offer.allocationDepth;
    offer.bitmaps.forEach((_, i) => bitmaps.add(i));
  }
  for (let q = 0; q < count; q++) {
    if (at + 4 > data.length) return "Inconsistent lengths in option";
    const len = v.getUint32(at);
    at += 4;
    if (len > data.length - at) return "Inconsistent lengths in option";
    const query = data.subarray(at, at + len);
    at += len;
    // Over-long queries can name no context; qemu skips them.
    if (len > NBD_MAX_STRING_SIZE) continue;
    const s = decoder.decode(query);
    if (s.startsWith("base:")) {
      const leaf = s.slice(5);
      if (leaf === "allocation" || (leaf === "" && !isSet)) base = true;
    } else if (s.startsWith("qemu:")) {
      const leaf = s.slice(5);
      if (leaf === "") {
        if (!isSet) {
          depth = offer.allocationDepth;
          offer.bitmaps.forEach((_, i) => bitmaps.add(i));
        }
      } else if (leaf === "allocation-depth") {
        depth = offer.allocationDepth;
      } else if (leaf.startsWith("dirty-bitmap:")) {
        const name = leaf.slice("dirty-bitmap:".length);
        if (name === "") {
          if (!isSet) offer.bitmaps.forEach((_, i) => bitmaps.add(i));
        } else {
          const i = offer.bitmaps.indexOf(name);
          if (i >= 0) bitmaps.add(i);
        }
      }
    }
  }
  if (at !== data.length) return "Inconsistent lengths in option";
  const list = [...bitmaps].sort((a, b) => a - b);
  return {
    exportName,
    selection: {
      baseAllocation: base,
      allocationDepth: depth,
      bitmaps: list,
      count: (base ? 1 : 0) + (depth ? 1 : 0) + list.length,
    },
  };
}

/** The selected contexts as (id, name) in qemu's reply order. */
export function metaContextNames(sel: MetaSelection, offer: MetaOffer): [number, string][] {
  const out: [number, string][] = [];
  if (sel.baseAllocation) out.push([META_ID_BASE_ALLOCATION, "base:allocation"]);
  if (sel.allocationDepth) out.push([META_ID_ALLOCATION_DEPTH, "qemu:allocation-depth"]);
  for (const i of sel.bitmaps) {
    out.push([bitmapContextId(i), `qemu:dirty-bitmap:${offer.bitmaps[i]}`]);
  }
  return out;
}
