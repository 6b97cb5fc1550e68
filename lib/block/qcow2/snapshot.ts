/**
 * The internal snapshot table (read side): decoding, lookup by ID and/or name as qemu's
 * `find_snapshot_by_id_and_name` does, and qemu-nbd's `-l` argument forms.
 *
 * @module
 */

import { BlockError, Errno } from "../types.ts";

/** One snapshot table entry (the fields a reader needs). */
export interface SnapshotEntry {
  readonly l1TableOffset: number;
  readonly l1Size: number;
  readonly id: string;
  readonly name: string;
  /** Virtual disk size at snapshot time, when the entry's extra data has it. */
  readonly diskSize: number | undefined;
  /** Bytes the entry takes in the table, padding included. */
  readonly entryBytes: number;
}

/** Which snapshot to load: both given ⇒ both must match; one given ⇒ that one must match. */
export interface SnapshotSelector {
  readonly id?: string;
  readonly name?: string;
}

/** qemu's per-entry limits (block/qcow2.h). */
const MAX_EXTRA_DATA = 1024;
/** Total table size limit (QCOW_MAX_SNAPSHOTS_SIZE). */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;

const decoder = new TextDecoder();

/**
 * Decode `count` entries from `table` (the bytes at snapshots_offset, zero-filled past end of
 * file). Returns undefined when `table` is too short and `complete` is false (the caller reads
 * more and retries); throws EFBIG with qemu's wording when an entry is malformed or the table
 * does not fit in a complete buffer.
 */
export function parseSnapshotTable(
  table: Uint8Array,
  count: number,
  complete = true,
): SnapshotEntry[] | undefined {
  const v = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const out: SnapshotEntry[] = [];
  let pos = 0;
  for (let i = 0; i < count; i++) {
    if (pos + 40 > table.length) {
      if (!complete) return undefined;
      throw new BlockError(Errno.EFBIG, "Snapshot table exceeds the maximum size");
    }
    const l1TableOffset = v.getUint32(pos) * 0x100000000 + v.getUint32(pos + 4);
    const l1Size = v.getUint32(pos + 8);
    const idLen = v.getUint16(pos + 12);
    const nameLen = v.getUint16(pos + 14);
    const extraSize = v.getUint32(pos + 36);
    if (extraSize > MAX_EXTRA_DATA) {
      throw new BlockError(
        Errno.EFBIG,
        `Too much extra metadata in snapshot table entry ${i}`,
      );
    }
    const extra = pos + 40;
    const end = extra + extraSize + idLen + nameLen;
    if (end > table.length) {
      if (!complete) return undefined;
      throw new BlockError(Errno.EFBIG, "Snapshot table exceeds the maximum size");
    }
    let diskSize: number | undefined;
    if (extraSize >= 16) diskSize = v.getUint32(extra + 8) * 0x100000000 + v.getUint32(extra + 12);
    const idStart = extra + extraSize;
    out.push({
      l1TableOffset,
      l1Size,
      id: decoder.decode(table.subarray(idStart, idStart + idLen)),
      name: decoder.decode(table.subarray(idStart + idLen, end)),
      diskSize,
      entryBytes: ((end + 7) & ~7) - pos,
    });
    pos = (end + 7) & ~7;
  }
  return out;
}

/** Index of the matching snapshot, or -1 (qemu's `find_snapshot_by_id_and_name`). */
export function findSnapshot(entries: readonly SnapshotEntry[], sel: SnapshotSelector): number {
  const { id, name } = sel;
  if (id === undefined && name === undefined) return -1;
  return entries.findIndex((s) =>
    (id === undefined || s.id === id) && (name === undefined || s.name === name)
  );
}

/**
 * Resolve a `-l` argument: `snapshot.id=ID,snapshot.name=NAME` (either key, `,,` escapes a comma)
 * selects exactly; a plain string is tried as an ID first, then as a name, like qemu-nbd's
 * `bdrv_snapshot_load_tmp_by_id_or_name`.
 */
export function selectSnapshot(
  entries: readonly SnapshotEntry[],
  arg: string | SnapshotSelector,
): number {
  if (typeof arg !== "string") return findSnapshot(entries, arg);
  if (arg.startsWith("snapshot.")) return findSnapshot(entries, parseSnapshotOptions(arg));
  const byId = findSnapshot(entries, { id: arg });
  return byId >= 0 ? byId : findSnapshot(entries, { name: arg });
}

/** Parse the `snapshot.id=...,snapshot.name=...` form. Throws EINVAL on unknown keys. */
export function parseSnapshotOptions(arg: string): SnapshotSelector {
  const parts: string[] = [];
  let cur = "";
  for (let i = 0; i < arg.length; i++) {
    const c = arg[i]!;
    if (c === ",") {
      if (arg[i + 1] === ",") {
        cur += ",";
        i++;
        continue;
      }
      parts.push(cur);
      cur = "";
      continue;
    }
    cur += c;
  }
  parts.push(cur);
  let id: string | undefined;
  let name: string | undefined;
  for (const p of parts) {
    const eq = p.indexOf("=");
    const key = eq < 0 ? p : p.slice(0, eq);
    const value = eq < 0 ? "on" : p.slice(eq + 1);
    if (key === "snapshot.id") id = value;
    else if (key === "snapshot.name") name = value;
    else throw new BlockError(Errno.EINVAL, `Invalid parameter '${key}'`);
  }
  return { ...(id !== undefined ? { id } : {}), ...(name !== undefined ? { name } : {}) };
}
