/**
 * The Deno permissions denbd runs with, in one place. Whatever starts denbd from TypeScript
 * (main.ts's `--fork` child, `deno task demo`, the benchmark's servers, the interop tests'
 * harness) spreads {@linkcode DENBD_PERMISSIONS} into its `deno run` argv. The places that cannot
 * import TypeScript (the tasks in deno.json, scripts/bin/denbd, the usage comment of
 * scripts/http_bench.ts, the README) spell the flags out, and tests/unit/permissions_test.ts fails
 * when their flags differ from this list.
 *
 * Each flag is unscoped: the paths, hosts and programs denbd touches come from its command line.
 *
 * @module
 */

/**
 * `deno run` flags for denbd, in the order they are written everywhere:
 * - `--allow-read`: the image and its backing chain, files named by `--object`, the unix
 *   sockets of `nbd+unix://` images, and /proc/self/cmdline (the program name in messages).
 * - `--allow-write`: writable exports, `--pid-file`, the unix socket of `-k`, the temporary
 *   overlay of `-s`, and `/dev/nbdX` for `-c`/`-d`.
 * - `--allow-net`: the nbd and http protocol drivers (`nbd://`, `http://` images) and `-L`
 *   (list exports) connect with Deno's sockets.
 * - `--allow-ffi`: libc and io_uring (positional file I/O, fallocate, SEEK_DATA/SEEK_HOLE,
 *   O_DIRECT, the server's sockets as file descriptors, the kernel NBD ioctls of `-c`), and the
 *   data-plane Worker threads that use them.
 * - `--allow-env`: socket activation (LISTEN_PID/LISTEN_FDS, removed once read), TMPDIR for `-s`,
 *   and denbd's own knobs (DENBD_THREADS, DENBD_IO_URING_DISABLE, DENBD_PROGNAME, ...).
 * - `--allow-run`: `--fork` re-runs denbd in the background, since Deno cannot fork.
 */
export const DENBD_PERMISSIONS: readonly string[] = Object.freeze([
  "--allow-read",
  "--allow-write",
  "--allow-net",
  "--allow-ffi",
  "--allow-env",
  "--allow-run",
]);
