/**
 * The synchronous operations on an image descriptor that every file engine shares (they cost
 * one cheap syscall each and need errno at once), and the fallocate error mapping both engines
 * apply to their own asynchronous fallocate.
 *
 * @module
 */

import {
  errno,
  errnoError,
  libc,
  POSIX_FADV_WILLNEED,
  SEEK_DATA,
  SEEK_END,
  SEEK_HOLE,
} from "../../ffi/libc.ts";
import { BlockError, Errno } from "../errors.ts";

const ENOSYS = 38;

/** Current length of the file behind `fd`. */
export function fdLength(fd: number, path: string): number {
  const n = Number(libc().lseek(fd, 0n, SEEK_END));
  if (n < 0) throw errnoError(`lseek '${path}'`);
  return n;
}

/** ftruncate(2). */
export function fdTruncate(fd: number, path: string, length: number): void {
  if (libc().ftruncate(fd, BigInt(length)) < 0) throw errnoError(`ftruncate '${path}'`);
}

/** Offset of the next data at or after `offset`, or -1 when only a hole follows (ENXIO). */
export function fdSeekData(fd: number, path: string, offset: number): number {
  const r = Number(libc().lseek(fd, BigInt(offset), SEEK_DATA));
  if (r >= 0) return r;
  const err = errno();
  if (err === Errno.ENXIO) return -1;
  throw errnoError(`lseek SEEK_DATA '${path}' at ${offset}`, err);
}

/** Offset of the next hole at or after `offset` (end of file at the latest). */
export function fdSeekHole(fd: number, path: string, offset: number): number {
  const r = Number(libc().lseek(fd, BigInt(offset), SEEK_HOLE));
  if (r >= 0) return r;
  const err = errno();
  if (err === Errno.ENXIO) return offset;
  throw errnoError(`lseek SEEK_HOLE '${path}' at ${offset}`, err);
}

/** posix_fadvise(WILLNEED): a hint, so its result is ignored. */
export function fdPrefetch(fd: number, offset: number, length: number): void {
  libc().posix_fadvise(fd, BigInt(offset), BigInt(length), POSIX_FADV_WILLNEED);
}

/** The error for a failed fallocate: ENOTSUP where the filesystem lacks the mode. */
export function fallocateError(
  path: string,
  mode: number,
  offset: number,
  length: number,
  err: number,
): BlockError {
  // EOPNOTSUPP is what filesystems without the mode answer; ENOSYS likewise.
  if (err === Errno.ENOTSUP || err === ENOSYS) {
    return new BlockError(Errno.ENOTSUP, `fallocate mode ${mode} not supported on '${path}'`);
  }
  return errnoError(`fallocate '${path}' at ${offset}+${length}`, err);
}
