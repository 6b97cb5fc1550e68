/**
 * The one place that turns open options (--aio, --cache) into a file engine: the thread engine,
 * io_uring, or Linux AIO, wrapped in the O_DIRECT engine for --cache=none|directsync. It imports
 * every engine; the engines import only file_engine.ts's interface and the thread engine.
 *
 * @module
 */

import { IoUringUnavailableError } from "../../ffi/io_uring.ts";
import { LinuxAioUnavailableError } from "../../ffi/linux_aio.ts";
import { libc, O_RDONLY, O_RDWR, openFile } from "../../ffi/libc.ts";
import { BlockError, Errno } from "../errors.ts";
import { AioFileEngine } from "./aio_engine.ts";
import { DirectFileEngine } from "./direct_engine.ts";
import { type FileEngine, type OpenOptions, ThreadFileEngine } from "./file_engine.ts";
import { UringFileEngine } from "./uring_engine.ts";

/** Why io_uring could not be set up, once it failed ("auto" then stops trying). */
let uringUnavailable: string | undefined;
let fallbackReported = false;

/**
 * Open an image file with the engine `options.aio` asks for, wrapped in the O_DIRECT engine for
 * `direct`. "io_uring" fails when io_uring cannot be set up; "auto" then falls back to threads.
 * "native" (Linux AIO) needs `direct`, as in qemu.
 */
export function openFileEngine(path: string, options: OpenOptions): FileEngine {
  const { writable, direct } = options;
  const aio = options.aio ?? "threads";
  if (aio === "native") return openNative(path, options);
  if (aio !== "threads" && uringUnavailable === undefined) {
    const uring = (fd?: number) => new UringFileEngine(path, { writable, direct, fd });
    try {
      return direct ? new DirectFileEngine(path, writable, { inner: uring }) : uring();
    } catch (e) {
      if (!(e instanceof IoUringUnavailableError)) throw e;
      uringUnavailable = e.message;
    }
  }
  if (aio === "io_uring") {
    throw new BlockError(
      Errno.ENOTSUP,
      `Could not use --aio=io_uring for '${path}': ${uringUnavailable}`,
    );
  }
  if (aio === "auto" && !fallbackReported) {
    fallbackReported = true;
    options.log?.(`io_uring is not available (${uringUnavailable}); using the thread engine`);
  }
  if (direct) return new DirectFileEngine(path, writable);
  return new ThreadFileEngine(path, options);
}

/**
 * qemu-nbd 7.2's file driver under aio=native: it opens the file first (so "Could not open"
 * wins), then refuses a descriptor without O_DIRECT, then sets up Linux AIO; each failure fails
 * the open, with no fallback.
 */
function openNative(path: string, options: OpenOptions): FileEngine {
  const { writable, direct } = options;
  if (!direct) {
    if (options.fd === undefined) libc().close(openFile(path, writable ? O_RDWR : O_RDONLY));
    throw new BlockError(
      Errno.EINVAL,
      "aio=native was specified, but it requires cache.direct=on, which was not specified.",
    );
  }
  try {
    return new DirectFileEngine(path, writable, {
      inner: (fd) => new AioFileEngine(path, { writable, direct: true, fd }),
    });
  } catch (e) {
    if (!(e instanceof LinuxAioUnavailableError)) throw e;
    throw new BlockError(e.errno, `Unable to use native AIO: ${e.message}`);
  }
}
