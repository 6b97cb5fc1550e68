/**
 * librados and librbd (Ceph's client libraries, Debian's librados2 and librbd1) through Deno FFI:
 * one typed symbol table per library, the C prototype beside each symbol. Only what the rbd
 * protocol driver (lib/block/protocols/rbd.ts) needs: connect, open an image, the asynchronous
 * I/O calls with eventfd notification, and diff-iterate for block status.
 *
 * Calls that talk to the cluster and wait (connect, open, stat, diff-iterate, close) are
 * `nonblocking`: they run on Deno's blocking pool, so the event loop keeps serving meanwhile.
 * The rbd_aio_* calls only queue work inside librbd and return at once.
 *
 * Handles (rados_t, rados_ioctx_t, rbd_image_t, rbd_completion_t) are opaque pointers, kept as
 * Deno.PointerValue.
 *
 * @module
 */

import { BlockError } from "../lib/errors.ts";
import { strerror } from "./libc.ts";

const RADOS = {
  // int rados_create(rados_t *cluster, const char *id)
  rados_create: { parameters: ["buffer", "buffer"], result: "i32" },
  // int rados_conf_read_file(rados_t cluster, const char *path)
  rados_conf_read_file: { parameters: ["pointer", "buffer"], result: "i32", nonblocking: true },
  // int rados_conf_set(rados_t cluster, const char *option, const char *value)
  rados_conf_set: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  // int rados_connect(rados_t cluster)
  rados_connect: { parameters: ["pointer"], result: "i32", nonblocking: true },
  // int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx)
  rados_ioctx_create: {
    parameters: ["pointer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  // void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace)
  rados_ioctx_set_namespace: { parameters: ["pointer", "buffer"], result: "void" },
  // void rados_ioctx_destroy(rados_ioctx_t io)
  rados_ioctx_destroy: { parameters: ["pointer"], result: "void" },
  // void rados_shutdown(rados_t cluster)
  rados_shutdown: { parameters: ["pointer"], result: "void", nonblocking: true },
} as const satisfies Deno.ForeignLibraryInterface;

const RBD = {
  // int rbd_namespace_exists(rados_ioctx_t io, const char *namespace_name, bool *exists)
  rbd_namespace_exists: {
    parameters: ["pointer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  // int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name)
  rbd_open: {
    parameters: ["pointer", "buffer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  // int rbd_close(rbd_image_t image)
  rbd_close: { parameters: ["pointer"], result: "i32", nonblocking: true },
  // int rbd_stat(rbd_image_t image, rbd_image_info_t *info, size_t infosize)
  rbd_stat: { parameters: ["pointer", "buffer", "usize"], result: "i32", nonblocking: true },
  // int rbd_get_size(rbd_image_t image, uint64_t *size)
  rbd_get_size: { parameters: ["pointer", "buffer"], result: "i32" },
  // int rbd_get_features(rbd_image_t image, uint64_t *features)
  rbd_get_features: { parameters: ["pointer", "buffer"], result: "i32" },
  // int rbd_get_flags(rbd_image_t image, uint64_t *flags)
  rbd_get_flags: { parameters: ["pointer", "buffer"], result: "i32" },
  // int rbd_get_parent_info(rbd_image_t image, char *pool, size_t poollen, char *name,
  //                         size_t namelen, char *snap, size_t snaplen)  (deprecated, still there)
  rbd_get_parent_info: {
    parameters: ["pointer", "pointer", "usize", "pointer", "usize", "pointer", "usize"],
    result: "i32",
  },
  // int rbd_resize(rbd_image_t image, uint64_t size)
  rbd_resize: { parameters: ["pointer", "u64"], result: "i32", nonblocking: true },
  // int rbd_set_image_notification(rbd_image_t image, int fd, int type)
  rbd_set_image_notification: { parameters: ["pointer", "i32", "i32"], result: "i32" },
  // int rbd_poll_io_events(rbd_image_t image, rbd_completion_t *comps, int numcomp)
  rbd_poll_io_events: { parameters: ["pointer", "buffer", "i32"], result: "i32" },
  // int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c)
  rbd_aio_create_completion: { parameters: ["pointer", "pointer", "buffer"], result: "i32" },
  // ssize_t rbd_aio_get_return_value(rbd_completion_t c)
  rbd_aio_get_return_value: { parameters: ["pointer"], result: "isize" },
  // void rbd_aio_release(rbd_completion_t c)
  rbd_aio_release: { parameters: ["pointer"], result: "void" },
  // int rbd_aio_read(rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c)
  rbd_aio_read: { parameters: ["pointer", "u64", "usize", "buffer", "pointer"], result: "i32" },
  // int rbd_aio_write(rbd_image_t image, uint64_t off, size_t len, const char *buf,
  //                   rbd_completion_t c)
  rbd_aio_write: { parameters: ["pointer", "u64", "usize", "buffer", "pointer"], result: "i32" },
  // int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c)
  rbd_aio_discard: { parameters: ["pointer", "u64", "u64", "pointer"], result: "i32" },
  // int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
  //                          int zero_flags, int op_flags)
  rbd_aio_write_zeroes: {
    parameters: ["pointer", "u64", "usize", "pointer", "i32", "i32"],
    result: "i32",
  },
  // int rbd_aio_flush(rbd_image_t image, rbd_completion_t c)
  rbd_aio_flush: { parameters: ["pointer", "pointer"], result: "i32" },
  // int rbd_diff_iterate2(rbd_image_t image, const char *fromsnapname, uint64_t ofs,
  //                       uint64_t len, uint8_t include_parent, uint8_t whole_object,
  //                       int (*cb)(uint64_t, size_t, int, void *), void *arg)
  rbd_diff_iterate2: {
    parameters: ["pointer", "pointer", "u64", "u64", "u8", "u8", "function", "pointer"],
    result: "i32",
    nonblocking: true,
  },
} as const satisfies Deno.ForeignLibraryInterface;

/** rbd_set_image_notification type: the fd is an eventfd (EVENT_TYPE_EVENTFD). */
export const EVENT_TYPE_EVENTFD = 2;
/** rbd_aio_write_zeroes flag: keep the range allocated (RBD_WRITE_ZEROES_FLAG_THICK_PROVISION). */
export const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1;
/** Feature bits (RBD_FEATURE_*). */
export const RBD_FEATURE_STRIPINGV2 = 1n << 1n;
export const RBD_FEATURE_FAST_DIFF = 1n << 4n;
/** Image flag: the fast-diff map cannot be trusted (RBD_FLAG_FAST_DIFF_INVALID). */
export const RBD_FLAG_FAST_DIFF_INVALID = 1n << 1n;
/** sizeof(rbd_image_info_t) on 64-bit Linux; size @0, obj_size @8. */
export const RBD_IMAGE_INFO_SIZE = 160;

let rados: Deno.DynamicLibrary<typeof RADOS> | undefined;
let rbd: Deno.DynamicLibrary<typeof RBD> | undefined;

/**
 * The two libraries, opened on first use. Throws a BlockError (ENOTSUP) naming the package when
 * they are not installed.
 */
export function ceph(): {
  rados: Deno.DynamicLibrary<typeof RADOS>["symbols"];
  rbd: Deno.DynamicLibrary<typeof RBD>["symbols"];
} {
  try {
    rados ??= Deno.dlopen("librados.so.2", RADOS);
    rbd ??= Deno.dlopen("librbd.so.1", RBD);
  } catch (e) {
    throw new BlockError(
      95,
      `Could not load librbd (install the librbd1 and librados2 packages): ${(e as Error).message}`,
    );
  }
  return { rados: rados.symbols, rbd: rbd.symbols };
}

/** "MESSAGE: strerror" for a negative librados/librbd return code, as qemu's error_setg_errno. */
export function cephError(r: number, message: string): BlockError {
  return new BlockError(-r, `${message}: ${strerror(-r)}`);
}

/** The signature librbd calls back for each extent of rbd_diff_iterate2. */
export const DIFF_CALLBACK = {
  parameters: ["u64", "usize", "i32", "pointer"],
  result: "i32",
} as const satisfies Deno.UnsafeCallbackDefinition;
