/**
 * qemu's `rbd` protocol driver (block/rbd.c): a Ceph RBD image served through librbd, as a
 * block device.
 *
 * Behaviour matched with qemu 7.2 over Debian's librbd 1.16 (Ceph 16.2):
 * - options `pool`, `namespace`, `image`, `snapshot`, `conf`, `user`, `server.N.host` /
 *   `server.N.port` (joined into librados' `mon_host`), and the KEY=VALUE pairs of an `rbd:`
 *   filename handed to rados_conf_set in order; missing and unknown options get qemu's QAPI
 *   messages; open steps and their messages in qemu's order ("error opening pool rbd: No such
 *   file or directory", "error reading header from IMAGE: ...", "namespace 'ns' does not
 *   exist", ...);
 * - librbd's cache is on unless the cache mode bypasses the host cache (qemu sets `rbd_cache`
 *   from BDRV_O_NOCACHE); a snapshot is read-only ("rbd snapshots are read-only" for a
 *   writable open);
 * - the size is librbd's, rounded up to 512 bytes as every qemu node is; a write reaching past
 *   librbd's size first grows the image (qemu_rbd_start_co does the same);
 * - WRITE_ZEROES is rbd_aio_write_zeroes, with RBD_WRITE_ZEROES_FLAG_THICK_PROVISION unless the
 *   range may be unmapped; TRIM is rbd_aio_discard; FUA is a flush after the write (qemu's
 *   generic emulation, the driver has none);
 * - block status is rbd_diff_iterate2 over whole objects when the image has a valid fast-diff
 *   map: an object that exists is data, one that does not reads as a zero hole; without fast-diff
 *   (or for striped images and clones, where librbd 1.16's unaligned diff is wrong and qemu
 *   gives up) everything is data;
 * - a failed request is reported as qemu reports it ("rbd request failed: cmd 1 offset ...")
 *   and fails with librbd's errno.
 *
 * All connections of an export share this one open image. Requests are rbd_aio_* calls; librbd
 * signals their completions on an eventfd (rbd_set_image_notification), and while any is in
 * flight one read() of it is parked on Deno's blocking pool; when it returns, the finished
 * completions are taken with rbd_poll_io_events (which never waits) and their promises
 * resolved. Nothing is parked while idle, so an idle image never holds the process open.
 *
 * @module
 */

import {
  ceph,
  cephError,
  DIFF_CALLBACK,
  EVENT_TYPE_EVENTFD,
  RBD_FEATURE_FAST_DIFF,
  RBD_FEATURE_STRIPINGV2,
  RBD_FLAG_FAST_DIFF_INVALID,
  RBD_IMAGE_INFO_SIZE,
  RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
} from "../../../ffi/rbd.ts";
import { cString, EFD_CLOEXEC, errno, libc, strerror } from "../../../ffi/libc.ts";
import type { NodeOptions } from "../../cli/filename.ts";
import {
  type BlockDevice,
  BlockError,
  type Capabilities,
  Errno,
  type ExtentList,
  STATE_HOLE,
  STATE_ZERO,
  type WriteFlags,
  type ZeroFlags,
} from "../types.ts";
import { KEYVALUE_PAIRS } from "./rbd_filename.ts";

/** Context from the image opener. */
export interface RbdOpenContext {
  readonly writable: boolean;
  readonly warn: (m: string) => void;
  /** The cache mode bypasses the host cache (qemu's BDRV_O_NOCACHE): librbd's cache off. */
  readonly noCache: boolean;
}

/** BlockdevOptionsRbd members, in the order qemu's QAPI visitor checks them. */
const QAPI_KEYS = [
  "pool",
  "namespace",
  "image",
  "conf",
  "snapshot",
  "encrypt",
  "user",
  "auth-client-required",
  "key-secret",
  "server",
];
/** Members denbd does not act on yet: refused, never ignored. */
const NOT_YET = ["encrypt", "auth-client-required", "key-secret", "password-secret"];

/** qemu's RBDAIOCmd numbers, which its failure messages print. */
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISCARD = 2;
const CMD_FLUSH = 3;
const CMD_WRITE_ZEROES = 4;

/** qemu's BDRV_REQ_MAY_UNMAP and BDRV_REQ_FUA, printed as the flags of a failed request. */
const REQ_FUA = 0x10;
const REQ_MAY_UNMAP = 0x4;

/** Completions taken per rbd_poll_io_events call. */
const POLL_BATCH = 64;
/** Extents one rbd_diff_iterate2 call collects before it is stopped (bounds memory). */
const DIFF_MAX_EXTENTS = 1024;
/** The callback's return value that stops rbd_diff_iterate2 early (qemu uses the same idea). */
const DIFF_STOP = -9000;
/** Images with more objects than this (2 MiB of bits) get no known-objects cache. */
const MAX_TRACKED_OBJECTS = 1 << 24;
/** How long close waits for requests still inside librbd before it lets them go. */
const CLOSE_GRACE_MS = 2000;

const ONE = new Uint8Array(new BigUint64Array([1n]).buffer);

interface Pending {
  readonly resolve: (r: number) => void;
  /** The buffer librbd reads into or writes from: referenced until the completion is reaped. */
  readonly buf: Uint8Array | null;
}

/** Splits the `server.N.host` / `server.N.port` options into qemu's mon_host string. */
function monHost(opts: NodeOptions): string | undefined {
  const hosts: string[] = [];
  for (let i = 0;; i++) {
    const host = opts[`server.${i}.host`];
    const port = opts[`server.${i}.port`];
    if (host === undefined && port === undefined) break;
    if (host === undefined) {
      throw new BlockError(Errno.EINVAL, `Parameter 'server[${i}].host' is missing`);
    }
    if (port === undefined) {
      throw new BlockError(Errno.EINVAL, `Parameter 'server[${i}].port' is missing`);
    }
    hosts.push(host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`);
  }
  return hosts.length > 0 ? hosts.join(";") : undefined;
}

/** Checks the options as qemu's BlockdevOptionsRbd visitor does. */
function checkOptions(opts: NodeOptions): void {
  for (const k of NOT_YET) {
    if (Object.keys(opts).some((o) => o === k || o.startsWith(`${k}.`))) {
      throw new BlockError(Errno.ENOTSUP, `Option '${k}' of the 'rbd' driver is not supported yet`);
    }
  }
  if (opts["pool"] === undefined) throw new BlockError(Errno.EINVAL, "Parameter 'pool' is missing");
  if (opts["image"] === undefined) {
    throw new BlockError(Errno.EINVAL, "Parameter 'image' is missing");
  }
  for (const k of Object.keys(opts)) {
    if (k === KEYVALUE_PAIRS) continue;
    if (QAPI_KEYS.includes(k)) continue;
    if (/^server\.\d+\.(host|port)$/.test(k)) continue;
    throw new BlockError(Errno.EINVAL, `Parameter '${k}' is unexpected`);
  }
}

function keyValuePairs(opts: NodeOptions): string[] {
  const text = opts[KEYVALUE_PAIRS];
  if (text === undefined) return [];
  const list = JSON.parse(text) as unknown;
  if (!Array.isArray(list) || list.some((v) => typeof v !== "string") || list.length % 2 !== 0) {
    throw new BlockError(Errno.EINVAL, "Invalid rbd key/value pairs");
  }
  return list as string[];
}

/** A C string argument, or null for an absent one. */
function cOpt(s: string | undefined): Uint8Array<ArrayBuffer> | null {
  return s === undefined ? null : cString(s);
}

function ptrOf(cell: BigUint64Array): Deno.PointerValue {
  return Deno.UnsafePointer.create(cell[0]!);
}

/**
 * Opens `opts` (the rbd driver's options: from `--image-opts`, `json:` or a parsed `rbd:`
 * filename) with qemu's steps and messages.
 */
export async function openRbdProtocol(opts: NodeOptions, ctx: RbdOpenContext): Promise<RbdDevice> {
  checkOptions(opts);
  const pool = opts["pool"]!;
  const image = opts["image"]!;
  const namespace = opts["namespace"];
  const snapshot = opts["snapshot"];
  const pairs = keyValuePairs(opts);
  const mon = monHost(opts);
  const { rados, rbd } = ceph();
  const cell = new BigUint64Array(1);
  const cellBytes = new Uint8Array(cell.buffer);
  let r = rados.rados_create(cellBytes, cOpt(opts["user"]));
  if (r < 0) throw cephError(r, "error initializing");
  const cluster = ptrOf(cell);
  let io: Deno.PointerValue = null;
  let img: Deno.PointerValue = null;
  try {
    // Without conf= the default places are tried and their absence is no error (qemu's rule).
    r = await rados.rados_conf_read_file(cluster, cOpt(opts["conf"]));
    if (opts["conf"] !== undefined && r < 0) {
      throw cephError(r, `error reading conf file ${opts["conf"]}`);
    }
    for (let i = 0; i < pairs.length; i += 2) {
      const key = pairs[i]!;
      r = rados.rados_conf_set(cluster, cString(key), cString(pairs[i + 1]!));
      if (r < 0) {
        throw new BlockError(Errno.EINVAL, `invalid conf option ${key}: ${strerror(-r)}`);
      }
    }
    if (mon !== undefined) {
      r = rados.rados_conf_set(cluster, cString("mon_host"), cString(mon));
      if (r < 0) throw cephError(r, "error setting mon_host");
    }
    rados.rados_conf_set(cluster, cString("rbd_cache"), cString(ctx.noCache ? "false" : "true"));
    r = await rados.rados_connect(cluster);
    if (r < 0) throw cephError(r, "error connecting");
    r = await rados.rados_ioctx_create(cluster, cString(pool), cellBytes);
    if (r < 0) throw cephError(r, `error opening pool ${pool}`);
    io = ptrOf(cell);
    if (namespace !== undefined && namespace.length > 0) {
      const exists = new Uint8Array(1);
      r = await rbd.rbd_namespace_exists(io, cString(namespace), exists);
      if (r < 0) throw cephError(r, "error checking namespace");
      if (exists[0] === 0) {
        throw new BlockError(Errno.ENOENT, `namespace '${namespace}' does not exist`);
      }
    }
    rados.rados_ioctx_set_namespace(io, cOpt(namespace));
    r = await rbd.rbd_open(io, cString(image), cellBytes, cOpt(snapshot));
    if (r < 0) throw cephError(r, `error reading header from ${image}`);
    img = ptrOf(cell);
    const info = new Uint8Array(RBD_IMAGE_INFO_SIZE);
    r = await rbd.rbd_stat(img, info, BigInt(RBD_IMAGE_INFO_SIZE));
    if (r < 0) throw cephError(r, `error getting image info from ${image}`);
    const v = new DataView(info.buffer);
    const size = v.getBigUint64(0, true);
    const objectSize = v.getBigUint64(8, true);
    if (snapshot !== undefined && ctx.writable) {
      throw new BlockError(Errno.EPERM, "rbd snapshots are read-only");
    }
    if (size > BigInt(Number.MAX_SAFE_INTEGER) - 512n || objectSize === 0n) {
      throw new BlockError(Errno.EFBIG, `Image ${image} is larger than denbd supports (2^53)`);
    }
    const dev = new RbdDevice({
      cluster,
      io,
      image: img,
      name: image,
      size: Number(size),
      objectSize: Number(objectSize),
      writable: ctx.writable,
      warn: ctx.warn,
    });
    return dev;
  } catch (e) {
    if (img !== null) await rbd.rbd_close(img);
    if (io !== null) rados.rados_ioctx_destroy(io);
    await rados.rados_shutdown(cluster);
    throw e;
  }
}

interface RbdHandles {
  readonly cluster: Deno.PointerValue;
  readonly io: Deno.PointerValue;
  readonly image: Deno.PointerValue;
  readonly name: string;
  /** librbd's size in bytes. */
  readonly size: number;
  readonly objectSize: number;
  readonly writable: boolean;
  readonly warn: (m: string) => void;
}

/** One open RBD image; see the module comment. */
export class RbdDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  readonly objectSize: number;
  readonly #h: RbdHandles;
  readonly #rbd = ceph().rbd;
  /** librbd's size (the device's is rounded up to 512). */
  #imageSize: number;
  readonly #eventFd: number;
  readonly #pending = new Map<bigint, Pending>();
  readonly #cell = new BigUint64Array(1);
  readonly #cellBytes = new Uint8Array(this.#cell.buffer);
  readonly #comps = new BigUint64Array(POLL_BATCH);
  readonly #compsBytes = new Uint8Array(this.#comps.buffer);
  readonly #eventBuf = new Uint8Array(8);
  #parked = false;
  #closing = false;
  /** The image is closed: the eventfd goes once no parked read can return into it. */
  #released = false;
  #fdClosed = false;
  #closed: Promise<void> | undefined;
  /** Serialises diff-iterate calls (their callback state is shared) and resizes. */
  #diffLock: Promise<unknown> = Promise.resolve();
  #resizeLock: Promise<unknown> = Promise.resolve();
  readonly #diffCb: Deno.UnsafeCallback<typeof DIFF_CALLBACK>;
  /** Extents collected by the running diff-iterate: flat offset, length pairs. */
  #diffRuns: number[] = [];

  constructor(h: RbdHandles) {
    this.#h = h;
    this.#imageSize = h.size;
    this.size = Math.ceil(h.size / 512) * 512;
    this.objectSize = h.objectSize;
    const objects = Math.ceil(this.size / h.objectSize);
    this.#exists = objects <= MAX_TRACKED_OBJECTS ? new Uint8Array((objects + 7) >> 3) : undefined;
    this.caps = {
      writable: h.writable,
      flush: true,
      trim: h.writable,
      zero: h.writable,
      fastZero: h.writable,
      extents: true,
      minBlock: 1,
    };
    const efd = libc().eventfd(0, EFD_CLOEXEC);
    if (efd < 0) throw new BlockError(errno(), `eventfd: ${strerror(errno())}`);
    const r = this.#rbd.rbd_set_image_notification(h.image, efd, EVENT_TYPE_EVENTFD);
    if (r < 0) {
      libc().close(efd);
      throw cephError(r, "rbd_set_image_notification");
    }
    this.#eventFd = efd;
    this.#diffCb = new Deno.UnsafeCallback(DIFF_CALLBACK, (offs, len, exists) => {
      if (exists === 0) return 0;
      const o = Number(offs);
      const l = Number(len);
      const runs = this.#diffRuns;
      const n = runs.length;
      if (n > 0 && runs[n - 2]! + runs[n - 1]! === o) runs[n - 1]! += l;
      else {
        if (n >= DIFF_MAX_EXTENTS * 2) return DIFF_STOP;
        runs.push(o, l);
      }
      return 0;
    });
  }

  /** Requests inside librbd. */
  get inFlight(): number {
    return this.#pending.size;
  }

  // --- asynchronous requests ---

  /**
   * Creates a completion, starts the request with it and resolves with librbd's return value
   * (bytes or -errno). `start` returns the rbd_aio_* call's own result.
   */
  #submit(
    buf: Uint8Array | null,
    start: (c: Deno.PointerValue) => number,
  ): Promise<number> {
    if (this.#closing) return Promise.resolve(-Errno.ESHUTDOWN);
    const rbd = this.#rbd;
    let r = rbd.rbd_aio_create_completion(null, null, this.#cellBytes);
    if (r < 0) return Promise.resolve(r);
    const key = this.#cell[0]!;
    const c = Deno.UnsafePointer.create(key);
    r = start(c);
    if (r < 0) {
      rbd.rbd_aio_release(c);
      return Promise.resolve(r);
    }
    const { promise, resolve } = Promise.withResolvers<number>();
    this.#pending.set(key, { resolve, buf });
    // With others in flight, some may be done already: take them now (rbd_poll_io_events does
    // not wait) rather than after the parked read's thread round trip.
    if (this.#pending.size > 1) this.#reap();
    this.#park();
    return promise;
  }

  /** Parks one read of the eventfd while requests are in flight. */
  #park(): void {
    if (this.#parked || this.#pending.size === 0) return;
    this.#parked = true;
    void libc().read_nb(this.#eventFd, this.#eventBuf, 8n).then(() => {
      this.#parked = false;
      if (this.#fdClosed) return;
      if (this.#released) {
        this.#fdClosed = true;
        libc().close(this.#eventFd);
        return;
      }
      this.#reap();
      this.#park();
    });
  }

  /** Takes every finished completion (never waits) and resolves its request. */
  #reap(): void {
    const rbd = this.#rbd;
    for (;;) {
      const n = rbd.rbd_poll_io_events(this.#h.image, this.#compsBytes, POLL_BATCH);
      if (n <= 0) return;
      for (let i = 0; i < n; i++) {
        const key = this.#comps[i]!;
        const c = Deno.UnsafePointer.create(key);
        const ret = Number(rbd.rbd_aio_get_return_value(c));
        rbd.rbd_aio_release(c);
        const p = this.#pending.get(key);
        if (p === undefined) continue;
        this.#pending.delete(key);
        p.resolve(ret);
      }
      if (n < POLL_BATCH) return;
    }
  }

  /** Throws qemu's report for a failed request (and prints it, as qemu does). */
  #failed(cmd: number, offset: number, bytes: number, flags: number, r: number): never {
    this.#h.warn(
      `rbd request failed: cmd ${cmd} offset ${offset} bytes ${bytes} flags ${flags} ` +
        `task.ret ${r} (${strerror(-r)})`,
    );
    throw new BlockError(-r, `rbd request failed: ${strerror(-r)}`);
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    // Past librbd's size (the 512-byte rounding) there is nothing to read: zeroes.
    const inImage = Math.max(0, Math.min(buf.length, this.#imageSize - offset));
    if (inImage < buf.length) buf.fill(0, inImage);
    if (inImage === 0) return;
    const part = inImage === buf.length ? buf : buf.subarray(0, inImage);
    const img = this.#h.image;
    const r = await this.#submit(
      part,
      (c) => this.#rbd.rbd_aio_read(img, BigInt(offset), BigInt(inImage), part, c),
    );
    if (r < 0) this.#failed(CMD_READ, offset, buf.length, 0, r);
    if (r < inImage) part.fill(0, r); // qemu pads a short read with zeroes
  }

  async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    await this.#growFor(offset + buf.length);
    const img = this.#h.image;
    const r = await this.#submit(
      buf,
      (c) => this.#rbd.rbd_aio_write(img, BigInt(offset), BigInt(buf.length), buf, c),
    );
    if (r < 0) this.#failed(CMD_WRITE, offset, buf.length, flags.fua ? REQ_FUA : 0, r);
    if (buf.length > 0) this.#markExists(offset, offset + buf.length);
    if (flags.fua) await this.flush();
  }

  async flush(): Promise<void> {
    const img = this.#h.image;
    const r = await this.#submit(null, (c) => this.#rbd.rbd_aio_flush(img, c));
    if (r < 0) this.#failed(CMD_FLUSH, 0, 0, 0, r);
  }

  async trim(offset: number, length: number, _flags: WriteFlags): Promise<void> {
    const end = Math.min(offset + length, this.#imageSize);
    if (end <= offset) return;
    const img = this.#h.image;
    this.#forgetExists(offset, end);
    const r = await this.#submit(
      null,
      (c) => this.#rbd.rbd_aio_discard(img, BigInt(offset), BigInt(end - offset), c),
    ).finally(() => this.#forgetExists(offset, end));
    if (r < 0) this.#failed(CMD_DISCARD, offset, length, 0, r);
  }

  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.#growFor(offset + length);
    const zeroFlags = flags.noHole ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0;
    const img = this.#h.image;
    this.#forgetExists(offset, offset + length);
    const r = await this.#submit(
      null,
      (c) => this.#rbd.rbd_aio_write_zeroes(img, BigInt(offset), BigInt(length), c, zeroFlags, 0),
    ).finally(() => this.#forgetExists(offset, offset + length));
    if (r < 0) {
      const qflags = (flags.noHole ? 0 : REQ_MAY_UNMAP) | (flags.fua ? REQ_FUA : 0);
      this.#failed(CMD_WRITE_ZEROES, offset, length, qflags, r);
    }
    if (flags.fua) await this.flush();
  }

  cache(): Promise<void> {
    return Promise.resolve();
  }

  /** qemu grows the image before a write past librbd's size (here: into the 512 rounding). */
  async #growFor(end: number): Promise<void> {
    if (end <= this.#imageSize) return;
    const run = this.#resizeLock.then(async () => {
      if (end <= this.#imageSize) return;
      const r = await this.#rbd.rbd_resize(this.#h.image, BigInt(end));
      if (r < 0) throw cephError(r, "rbd resize");
      this.#imageSize = end;
    });
    this.#resizeLock = run.catch(() => {});
    await run;
  }

  // --- block status ---

  /**
   * Objects known to exist: librbd's diff said so, or a write through this device completed
   * there. Block status of a sparse read is asked for every read, and an rbd_diff_iterate2 per
   * read halves sequential throughput; an object that exists stays so until a discard or zeroing
   * (which clear it here), so data is reported from this set. Absence is never cached: a write
   * by another client could fill the object, and a stale "hole" would hide its data from reads.
   * A stale "exists" (another client discarded the object) only reports zeroes as data.
   * One bit per object; undefined for images with more than {@link MAX_TRACKED_OBJECTS}.
   */
  #exists: Uint8Array | undefined;
  /** Bumped by every discard and zeroing, so a diff that overlapped one is not recorded. */
  #existsGen = 0;

  #knownToExist(index: number): boolean {
    const bits = this.#exists;
    return bits !== undefined && (bits[index >> 3]! & (1 << (index & 7))) !== 0;
  }

  /** Marks the objects of `[start, end)` as existing. */
  #markExists(start: number, end: number): void {
    const bits = this.#exists;
    if (bits === undefined || end <= start) return;
    const last = Math.floor((end - 1) / this.objectSize);
    for (let i = Math.floor(start / this.objectSize); i <= last; i++) bits[i >> 3]! |= 1 << (i & 7);
  }

  /** Forgets the objects of `[start, end)` (a discard or zeroing may remove them). */
  #forgetExists(start: number, end: number): void {
    this.#existsGen++;
    const bits = this.#exists;
    if (bits === undefined || end <= start) return;
    const last = Math.floor((end - 1) / this.objectSize);
    for (let i = Math.floor(start / this.objectSize); i <= last; i++) {
      bits[i >> 3]! &= ~(1 << (i & 7));
    }
  }

  /** Whether the fast-diff map can answer block status (qemu_rbd_co_block_status's checks). */
  #diffUsable(): boolean {
    const rbd = this.#rbd;
    const img = this.#h.image;
    if (rbd.rbd_get_features(img, this.#cellBytes) < 0) return false;
    const features = this.#cell[0]!;
    if ((features & RBD_FEATURE_FAST_DIFF) === 0n) return false;
    if (rbd.rbd_get_flags(img, this.#cellBytes) < 0) return false;
    if ((this.#cell[0]! & RBD_FLAG_FAST_DIFF_INVALID) !== 0n) return false;
    // librbd before 1.17 reports wrong offsets for unaligned diffs of striped images and
    // clones; qemu then reports everything as data.
    if ((features & RBD_FEATURE_STRIPINGV2) !== 0n) return false;
    const parent = rbd.rbd_get_parent_info(img, null, 0n, null, 0n, null, 0n);
    return parent === -Errno.ENOENT;
  }

  extents(offset: number, length: number, out: ExtentList): Promise<void> {
    const run = this.#diffLock.then(() => this.#extents(offset, length, out));
    this.#diffLock = run.catch(() => {});
    return run;
  }

  async #extents(offset: number, length: number, out: ExtentList): Promise<void> {
    const end = offset + length;
    if (this.#closing || !this.#diffUsable()) {
      out.add(length, 0);
      return;
    }
    const obj = this.objectSize;
    const imageEnd = Math.min(end, this.#imageSize);
    let pos = offset;
    while (pos < imageEnd && !out.full) {
      // Objects known to exist are data without asking librbd (see #exists).
      if (this.#knownToExist(Math.floor(pos / obj))) {
        const next = Math.min((Math.floor(pos / obj) + 1) * obj, imageEnd);
        out.add(next - pos, 0);
        pos = next;
        continue;
      }
      // Whole objects from the one holding pos (librbd 1.16 needs an object-aligned start).
      const from = pos - (pos % obj);
      const gen = this.#existsGen;
      this.#diffRuns = [];
      const r = await this.#rbd.rbd_diff_iterate2(
        this.#h.image,
        null,
        BigInt(from),
        BigInt(imageEnd - from),
        1,
        1,
        this.#diffCb.pointer,
        null,
      );
      const runs = this.#diffRuns;
      this.#diffRuns = [];
      if (r < 0 && r !== DIFF_STOP) {
        // qemu falls back to "all data" when the diff fails.
        out.add(imageEnd - pos, 0);
        pos = imageEnd;
        break;
      }
      // A discard or zeroing that overlapped the diff may have removed objects it saw.
      if (gen === this.#existsGen) {
        for (let i = 0; i < runs.length; i += 2) {
          this.#markExists(runs[i]!, runs[i]! + runs[i + 1]!);
        }
      }
      let scanned = imageEnd;
      if (r === DIFF_STOP && runs.length > 0) {
        scanned = runs[runs.length - 2]! + runs[runs.length - 1]!;
      }
      for (let i = 0; i < runs.length && pos < scanned; i += 2) {
        const s = Math.max(runs[i]!, pos);
        const e = Math.min(runs[i]! + runs[i + 1]!, imageEnd);
        if (e <= pos) continue;
        if (s > pos) out.add(s - pos, STATE_HOLE | STATE_ZERO);
        out.add(e - s, 0);
        pos = e;
      }
      const stop = Math.min(scanned, imageEnd);
      if (pos < stop) {
        out.add(stop - pos, STATE_HOLE | STATE_ZERO);
        pos = stop;
      }
    }
    // The 512-byte rounding past librbd's size: qemu's generic layer reads it as zeroes.
    if (pos < end && !out.full) out.add(end - pos, STATE_HOLE | STATE_ZERO);
  }

  close(): Promise<void> {
    this.#closed ??= this.#close();
    return this.#closed;
  }

  async #close(): Promise<void> {
    this.#closing = true;
    await this.#diffLock;
    // Requests still inside librbd (an OSD that does not answer) get a grace period, then are
    // let go: their buffers stay referenced and the handles are not freed under them.
    const deadline = performance.now() + CLOSE_GRACE_MS;
    while (this.#pending.size > 0 && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
    }
    if (this.#pending.size > 0) {
      for (const p of this.#pending.values()) p.resolve(-Errno.ESHUTDOWN);
      return;
    }
    this.#diffCb.close();
    const { rados } = ceph();
    await this.#rbd.rbd_close(this.#h.image);
    rados.rados_ioctx_destroy(this.#h.io);
    await rados.rados_shutdown(this.#h.cluster);
    this.#released = true;
    if (this.#parked) {
      libc().write(this.#eventFd, ONE, 8n);
    } else {
      this.#fdClosed = true;
      libc().close(this.#eventFd);
    }
  }
}
