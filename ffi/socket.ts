/**
 * Sockets through FFI: the calls the fd-level transport (lib/net/) needs, one typed symbol table
 * with the C prototype beside each symbol. Failures become {@link SocketError}s here and nowhere
 * else; "would block" is not an error but a return value (-1 from the try* helpers), so the hot
 * path allocates nothing.
 *
 * Why FFI: Deno.Conn has no file descriptor, so it cannot try a read without waiting, hand a
 * socket to another thread, adopt an inherited one (socket activation) or sendfile(2) into it
 * (shared/reference/deno-notes.md).
 *
 * @module
 */

import { errno, libc, strerror } from "./libc.ts";

const SYMBOLS = {
  // int socket(int domain, int type, int protocol)
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  // int bind(int fd, const struct sockaddr *addr, socklen_t len)
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  // int connect(int fd, const struct sockaddr *addr, socklen_t len)
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  // int listen(int fd, int backlog)
  listen: { parameters: ["i32", "i32"], result: "i32" },
  // int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
  accept4: { parameters: ["i32", "pointer", "pointer", "i32"], result: "i32" },
  // int socketpair(int domain, int type, int protocol, int sv[2])
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  // ssize_t recv(int fd, void *buf, size_t len, int flags)
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  // ssize_t send(int fd, const void *buf, size_t len, int flags)
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  // ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)
  sendfile: { parameters: ["i32", "i32", "buffer", "usize"], result: "isize" },
  // int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  // int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  // int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  // int shutdown(int fd, int how)
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  // int fcntl(int fd, int cmd, long arg)
  fcntl: { parameters: ["i32", "i32", "i64"], result: "i32" },
  // int poll(struct pollfd *fds, nfds_t n, int timeout)
  poll: { parameters: ["buffer", "u64", "i32"], result: "i32" },
  // int epoll_create1(int flags)
  epoll_create1: { parameters: ["i32"], result: "i32" },
  // int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event)
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  // int epoll_wait(int epfd, struct epoll_event *events, int max, int timeout), on the blocking
  // pool: it sleeps, and the event loop must not.
  epoll_wait_nb: {
    name: "epoll_wait",
    parameters: ["i32", "buffer", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },
  // int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
  //                 struct addrinfo **res)
  getaddrinfo: { parameters: ["buffer", "buffer", "buffer", "buffer"], result: "i32" },
  // void freeaddrinfo(struct addrinfo *res)
  freeaddrinfo: { parameters: ["pointer"], result: "void" },
  // const char *gai_strerror(int code)
  gai_strerror: { parameters: ["i32"], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

let lib: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;

/** The socket symbol table, opened on first use (once per thread: FFI handles are per isolate). */
export function sock(): Deno.DynamicLibrary<typeof SYMBOLS>["symbols"] {
  lib ??= Deno.dlopen("libc.so.6", SYMBOLS);
  return lib.symbols;
}

export const AF_UNSPEC = 0;
export const AF_UNIX = 1;
export const AF_INET = 2;
export const AF_INET6 = 10;
export const SOCK_STREAM = 1;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SO_REUSEADDR = 2;
export const SO_ACCEPTCONN = 30;
export const SO_ERROR = 4;
export const IPPROTO_TCP = 6;
export const IPPROTO_IPV6 = 41;
export const TCP_NODELAY = 1;
export const IPV6_V6ONLY = 26;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
/** More data follows (a reply header before its sendfile payload): one segment, not two. */
export const MSG_MORE = 0x8000;
export const SHUT_RDWR = 2;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const F_SETFD = 2;
export const FD_CLOEXEC = 1;
export const O_NONBLOCK = 0o4000;
export const AI_PASSIVE = 1;

export const POLLIN = 0x1;
export const POLLOUT = 0x4;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;

export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
export const EPOLLONESHOT = 1 << 30;
export const EPOLL_CLOEXEC = 0o2000000;

export const EINTR = 4;
export const EAGAIN = 11;
export const EPIPE = 32;
export const ECONNRESET = 104;
export const EADDRINUSE = 98;
export const EINPROGRESS = 115;

/** A failed socket call: the errno and a message naming the call and its context. */
export class SocketError extends Error {
  readonly errno: number;
  constructor(err: number, what: string) {
    // "(os error N)" as Deno's own errors say it: the session's messages strip it the same way.
    super(`${what}: ${strerror(err)} (os error ${err})`);
    this.name = "SocketError";
    this.errno = err;
  }
}

/**
 * The error for a failed read or write on a connection. Reset and broken pipe are Deno's own
 * error classes, so the session words them as qemu does whichever transport carried them.
 */
export function connectionError(err: number, what: string): Error {
  if (err === ECONNRESET) return new Deno.errors.ConnectionReset(`${what}: ${strerror(err)}`);
  if (err === EPIPE) return new Deno.errors.BrokenPipe(`${what}: ${strerror(err)}`);
  return new SocketError(err, what);
}

/** A new non-blocking, close-on-exec stream socket. */
export function openSocket(family: number): number {
  const fd = sock().socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new SocketError(errno(), "socket");
  return fd;
}

/** A connected pair of non-blocking unix stream sockets (tests; one end for the kernel's -c). */
export function socketPair(): [number, number] {
  const sv = new Int32Array(2);
  const r = sock().socketpair(
    AF_UNIX,
    SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
    0,
    new Uint8Array(sv.buffer),
  );
  if (r !== 0) throw new SocketError(errno(), "socketpair");
  return [sv[0]!, sv[1]!];
}

/** setsockopt(2) with an int value. */
export function setIntOption(fd: number, level: number, name: number, value: number): void {
  const v = new Int32Array([value]);
  if (sock().setsockopt(fd, level, name, new Uint8Array(v.buffer), 4) !== 0) {
    throw new SocketError(errno(), `setsockopt(${level}, ${name})`);
  }
}

/** getsockopt(2) of an int value. */
export function getIntOption(fd: number, level: number, name: number): number {
  const v = new Int32Array([0, 4]);
  const bytes = new Uint8Array(v.buffer);
  if (sock().getsockopt(fd, level, name, bytes.subarray(0, 4), bytes.subarray(4)) !== 0) {
    throw new SocketError(errno(), `getsockopt(${level}, ${name})`);
  }
  return v[0]!;
}

/** Make `fd` non-blocking and close-on-exec (an adopted descriptor). */
export function makeNonBlocking(fd: number): void {
  const s = sock();
  const flags = s.fcntl(fd, F_GETFL, 0n);
  if (flags < 0 || s.fcntl(fd, F_SETFL, BigInt(flags | O_NONBLOCK)) < 0) {
    throw new SocketError(errno(), "fcntl(O_NONBLOCK)");
  }
  s.fcntl(fd, F_SETFD, BigInt(FD_CLOEXEC));
}

/** Shut both directions down (ends pending polls on it), then close. Never throws. */
export function closeSocket(fd: number): void {
  sock().shutdown(fd, SHUT_RDWR);
  libc().close(fd);
}

/**
 * recv(2) without waiting: bytes read, 0 at end of stream, -1 when nothing is there yet.
 * Throws a connection error otherwise.
 */
export function tryRecv(fd: number, buf: Uint8Array): number {
  for (;;) {
    const n = Number(sock().recv(fd, buf, BigInt(buf.length), MSG_DONTWAIT));
    if (n >= 0) return n;
    const err = errno();
    if (err === EAGAIN) return -1;
    if (err !== EINTR) throw connectionError(err, "recv");
  }
}

/**
 * send(2) without waiting (and without SIGPIPE): bytes written, or -1 when the socket buffer is
 * full. `more` holds the segment back for data that follows at once (MSG_MORE).
 */
export function trySend(fd: number, buf: Uint8Array, more = false): number {
  const flags = MSG_DONTWAIT | MSG_NOSIGNAL | (more ? MSG_MORE : 0);
  for (;;) {
    const n = Number(sock().send(fd, buf, BigInt(buf.length), flags));
    if (n >= 0) return n;
    const err = errno();
    if (err === EAGAIN) return -1;
    if (err !== EINTR) throw connectionError(err, "send");
  }
}

const sendfileOffset = new BigInt64Array(1);
const sendfileOffsetBytes = new Uint8Array(sendfileOffset.buffer);

/**
 * sendfile(2) of up to `length` bytes of `fileFd` at `offset` into the socket: bytes sent (0 at
 * end of file), or -1 when the socket buffer is full.
 */
export function trySendfile(
  sockFd: number,
  fileFd: number,
  offset: number,
  length: number,
): number {
  for (;;) {
    sendfileOffset[0] = BigInt(offset);
    const n = Number(sock().sendfile(sockFd, fileFd, sendfileOffsetBytes, BigInt(length)));
    if (n >= 0) return n;
    const err = errno();
    if (err === EAGAIN) return -1;
    if (err !== EINTR) throw connectionError(err, "sendfile");
  }
}
