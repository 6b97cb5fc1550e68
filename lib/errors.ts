/**
 * The errno-carrying error of the I/O path and the errno values it uses.
 *
 * It sits here, below both ffi/ and lib/, because every layer throws it: ffi/ turns C return
 * codes into it, lib/io/ and the block layers pass it up, and lib/nbd/ maps its errno to an NBD
 * error. Defined in lib/block/ it made ffi/ and lib/io/ import from a layer above them;
 * lib/block/types.ts re-exports both names so block code keeps importing them from there.
 *
 * @module
 */

/** An error with an errno value, thrown by the file engines and block layers. */
export class BlockError extends Error {
  /** Linux errno value (EIO=5, EPERM=1, EINVAL=22, ENOSPC=28, ENOTSUP=95, ...). */
  readonly errno: number;
  constructor(errno: number, message: string) {
    super(message);
    this.name = "BlockError";
    this.errno = errno;
  }
}

/** errno values used across the I/O path and the block layer. */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  EBADF: 9,
  ENOMEM: 12,
  EACCES: 13,
  EEXIST: 17,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  ESPIPE: 29,
  EROFS: 30,
  EOVERFLOW: 75,
  EOPNOTSUPP: 95,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
  EDQUOT: 122,
  ENXIO: 6,
  EBUSY: 16,
  ENOTTY: 25,
} as const;
