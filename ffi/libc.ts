/**
 * libc through Deno FFI: one typed symbol table, C prototypes beside each symbol. Return codes
 * become {@link BlockError}s here and nowhere else.
 *
 * Why FFI: Deno.FsFile shares one cursor between concurrent reads and has no positional I/O,
 * SEEK_DATA/SEEK_HOLE, fallocate or O_DIRECT (shared/reference/deno-notes.md §2).
 *
 * @module
 */

import { BlockError } from "../lib/errors.ts";

const SYMBOLS = {
  // int open(const char *path, int flags, mode_t mode)
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  // int close(int fd)
  close: { parameters: ["i32"], result: "i32" },
  // ssize_t pread(int fd, void *buf, size_t count, off_t offset)
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  // ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  // ssize_t preadv2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
  preadv2: { parameters: ["i32", "buffer", "i32", "i64", "i32"], result: "isize" },
  // ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
  pwritev2: { parameters: ["i32", "buffer", "i32", "i64", "i32"], result: "isize" },
  // The same two on Deno's blocking pool: the event loop keeps serving while the kernel copies.
  pread_nb: {
    name: "pread",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  pwrite_nb: {
    name: "pwrite",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  // int fdatasync(int fd)
  fdatasync_nb: { name: "fdatasync", parameters: ["i32"], result: "i32", nonblocking: true },
  // int fdatasync(int fd)
  fdatasync: { parameters: ["i32"], result: "i32" },
  // int fallocate(int fd, int mode, off_t offset, off_t len)
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  fallocate_nb: {
    name: "fallocate",
    parameters: ["i32", "i32", "i64", "i64"],
    result: "i32",
    nonblocking: true,
  },
  // off_t lseek(int fd, off_t offset, int whence)
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  // int ftruncate(int fd, off_t length)
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  // int posix_fadvise(int fd, off_t offset, off_t len, int advice) (returns the error number)
  posix_fadvise: { parameters: ["i32", "i64", "i64", "i32"], result: "i32" },
  // int *__errno_location(void)
  __errno_location: { parameters: [], result: "pointer" },
  // char *strerror(int errnum)
  strerror: { parameters: ["i32"], result: "pointer" },
  // int ioctl(int fd, unsigned long request, ...) with an integer argument
  ioctl: { parameters: ["i32", "u64", "u64"], result: "i32" },
  // The same on Deno's blocking pool, for an ioctl that sleeps (NBD_DO_IT lasts the device's life).
  ioctl_nb: { name: "ioctl", parameters: ["i32", "u64", "u64"], result: "i32", nonblocking: true },
  // open(2) on the blocking pool: opening a /dev/nbd device reads its partition table through us.
  open_nb: { name: "open", parameters: ["buffer", "i32", "u32"], result: "i32", nonblocking: true },
  // int fstat(int fd, struct stat *buf) -- x86_64 layout: st_dev u64 @0, st_ino u64 @8, st_mode u32 @24
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  // int dup2(int oldfd, int newfd)
  dup2: { parameters: ["i32", "i32"], result: "i32" },
  // int flock(int fd, int operation)
  flock: { parameters: ["i32", "i32"], result: "i32" },
  // long syscall(long number, ...) with six integer arguments (io_uring has no libc wrappers)
  syscall: {
    parameters: ["i64", "i64", "i64", "i64", "i64", "i64", "i64"],
    result: "i64",
  },
  // The same on Deno's blocking pool, for a call that sleeps (io_uring_enter waiting for CQEs).
  syscall_nb: {
    name: "syscall",
    parameters: ["i64", "i64", "i64", "i64", "i64", "i64", "i64"],
    result: "i64",
    nonblocking: true,
  },
  // void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  // int munmap(void *addr, size_t length)
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  // int eventfd(unsigned int initval, int flags)
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  // ssize_t read(int fd, void *buf, size_t count) on the blocking pool (a parked eventfd read)
  read_nb: {
    name: "read",
    parameters: ["i32", "buffer", "usize"],
    result: "isize",
    nonblocking: true,
  },
  // ssize_t write(int fd, const void *buf, size_t count)
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
} as const satisfies Deno.ForeignLibraryInterface;

let lib: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;

/** The libc symbol table, opened on first use. */
export function libc(): Deno.DynamicLibrary<typeof SYMBOLS>["symbols"] {
  lib ??= Deno.dlopen("libc.so.6", SYMBOLS);
  return lib.symbols;
}

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;
export const O_DSYNC = 0o10000;
export const O_DIRECT = 0o40000;
export const O_CLOEXEC = 0o2000000;

export const SEEK_SET = 0;
export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export const POSIX_FADV_WILLNEED = 3;

/** preadv2 flag: fail with EAGAIN instead of waiting for the disk (page-cache hits only). */
export const RWF_NOWAIT = 0x08;
export const EAGAIN = 11;

export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_POPULATE = 0x8000;
/** eventfd(2) flag, the same bit as O_CLOEXEC. */
export const EFD_CLOEXEC = 0o2000000;

export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;
export const LOCK_UN = 8;

/** errno of the last synchronous libc call on this thread. */
export function errno(): number {
  const p = libc().__errno_location();
  return p === null ? 0 : new Deno.UnsafePointerView(p).getInt32();
}

/** The C library's message for an errno value ("No such file or directory"). */
export function strerror(err: number): string {
  const p = libc().strerror(err);
  return p === null ? `errno ${err}` : Deno.UnsafePointerView.getCString(p);
}

/** A BlockError for the current errno, with `what` naming the call and its context. */
export function errnoError(what: string, err = errno()): BlockError {
  return new BlockError(err, `${what}: ${strerror(err)}`);
}

const encoder = new TextEncoder();

/** NUL-terminated copy of a path for FFI. */
export function cString(s: string): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(s);
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

/** open(2); throws a BlockError naming the path on failure. */
export function openFile(path: string, flags: number, mode = 0o644): number {
  const fd = libc().open(cString(path), flags | O_CLOEXEC, mode);
  if (fd < 0) throw errnoError(`Could not open '${path}'`);
  return fd;
}
