/**
 * Linux AIO (`io_setup`/`io_submit`/`io_getevents`/`io_destroy`, the kernel's native AIO that
 * qemu's `aio=native` uses) through Deno FFI: syscall(2), as libc has no wrappers (libaio is a
 * separate library, and not needed for four calls).
 *
 * Why: like io_uring, one io_submit takes a whole tick's worth of reads and writes and each
 * completion carries its own result or -errno; unlike io_uring it works where io_uring is
 * disabled (io_uring_disabled, container seccomp policies that allow only the older interface).
 * The kernel does true asynchronous I/O only for O_DIRECT files, so callers open with O_DIRECT
 * and keep buffers, offsets and lengths aligned.
 *
 * Completions never block the event loop: every iocb carries IOCB_FLAG_RESFD, so the kernel
 * counts its completion on an eventfd, and while operations are in flight one read() of that
 * eventfd is parked on Deno's blocking pool. When it returns, the events are reaped with a
 * zero-timeout io_getevents (which does not sleep). The completion ring's head and tail (mapped
 * into this process at the aio_context_t address) are also looked at right after each
 * submission, so operations the kernel finished inline (errors, RWF_NOWAIT refusals) are reaped
 * without a thread round trip. Nothing is parked when nothing is in flight, so an idle context
 * never holds the process open.
 *
 * io_submit itself may sleep (block allocation, request queue full, inode lock): reads and writes
 * are submitted with RWF_NOWAIT (kernel 4.14) so the kernel completes them with -EAGAIN instead,
 * and the caller moves such an operation to the blocking pool. A kernel or filesystem that
 * refuses the flag gets operations without it.
 *
 * Results are io_event `res` values: a byte count on success, `-errno` on failure.
 *
 * @module
 */

import { EAGAIN, EFD_CLOEXEC, errno, libc, RWF_NOWAIT, strerror } from "./libc.ts";
import { BlockError } from "../lib/errors.ts";

// x86_64 syscall numbers.
const SYS_io_setup = 206n;
const SYS_io_destroy = 207n;
const SYS_io_getevents = 208n;
const SYS_io_submit = 209n;

export const IOCB_CMD_PREAD = 0;
export const IOCB_CMD_PWRITE = 1;
/** iocb.aio_flags: signal the completion on the eventfd in aio_resfd. */
const IOCB_FLAG_RESFD = 1;

/** struct iocb and struct io_event sizes (the same on every 64-bit architecture). */
const IOCB_SIZE = 64;
const EVENT_SIZE = 32;
/** struct aio_ring header: id, nr, head, tail, magic, ... (32 bytes) before the events. */
const AIO_RING_MAGIC = 0xa10a10a1;

const EINTR = 4;
const EOPNOTSUPP = 95;
const ESHUTDOWN = 108;
const ECANCELED = 125;
const EPERM = 1;

/** Largest length in one iocb: the kernel caps a read or write at 2 GiB - 4 KiB anyway. */
const MAX_OP_LEN = 1 << 30;
/** How long {@linkcode AioContext.close} waits for operations still in the kernel. */
const CLOSE_GRACE_MS = 1000;

/**
 * The environment variable that makes io_setup fail as if the kernel refused it, so the
 * refusal can be tested on any machine.
 */
export const DISABLE_ENV = "DENBD_LINUX_AIO_DISABLE";

export interface AioContextOptions {
  /** Operations in the kernel at once (io_setup's nr_events; default 256); more wait in JS. */
  readonly entries?: number;
  /** Submit reads and writes with RWF_NOWAIT (default true; see the module comment). */
  readonly nowait?: boolean;
}

/** Linux AIO cannot be used here: io_setup was refused (aio-max-nr reached, seccomp, ENOSYS). */
export class LinuxAioUnavailableError extends BlockError {
  constructor(errno: number, message: string) {
    super(errno, message);
    this.name = "LinuxAioUnavailableError";
  }
}

/** An operation waiting for a free slot. */
interface Backlogged {
  readonly op: number;
  readonly fd: number;
  readonly buf: Uint8Array;
  readonly offset: number;
  readonly resolve: (res: number) => void;
}

/**
 * Every open context of this thread, for a readiness loop that spins (as openRings in
 * ffi/io_uring.ts): it can stop as soon as one of them holds a completion.
 */
export const openAioContexts: Set<AioContext> = new Set();

/** One Linux AIO context with its eventfd; see the module comment. */
export class AioContext {
  /** At most this many operations are in the kernel at once. */
  readonly maxInFlight: number;
  readonly #ctx: bigint;
  readonly #eventFd: number;
  /** The completion ring's header words (id, nr, head, tail, magic...), or undefined. */
  readonly #ringHeader: Uint32Array | undefined;
  #nowait: boolean;
  // One iocb per slot; aio_data holds the slot.
  readonly #iocbs: DataView;
  readonly #iocbAddr: number;
  /** iocb pointers for io_submit, in submission order. */
  readonly #ptrs: BigUint64Array<ArrayBuffer>;
  readonly #ptrsArg: bigint;
  readonly #events: DataView;
  readonly #eventsArg: bigint;
  readonly #zeroTimeoutArg: bigint;
  readonly #resolvers: (((res: number) => void) | undefined)[];
  /** Buffers the kernel may still read or write: referenced until their event is reaped. */
  readonly #buffers: (Uint8Array | undefined)[];
  readonly #free: number[];
  /** Slots prepared and not yet taken by io_submit, in order. */
  #unsubmitted: number[] = [];
  #inFlight = 0;
  readonly #backlog: Backlogged[] = [];
  #backlogHead = 0;
  #flushQueued = false;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #parked = false;
  readonly #eventBuf = new Uint8Array(8);
  #state: "open" | "closing" | "closed" = "open";
  #closeDeadline = 0;
  #closeTimer: ReturnType<typeof setTimeout> | undefined;
  #closed: PromiseWithResolvers<void> | undefined;
  // Kept referenced: their addresses are handed to the kernel.
  readonly #keep: Uint8Array[];

  /** Set up a context. Throws {@linkcode LinuxAioUnavailableError} when io_setup is refused. */
  constructor(options: AioContextOptions = {}) {
    const entries = options.entries ?? 256;
    this.#nowait = options.nowait ?? true;
    checkNotDisabled();
    const efd = libc().eventfd(0, EFD_CLOEXEC);
    if (efd < 0) {
      const err = errno();
      throw new LinuxAioUnavailableError(
        err,
        `failed to initialize event notifier: ${strerror(err)}`,
      );
    }
    const ctxBuf = new BigUint64Array(1);
    const r = Number(
      libc().syscall(SYS_io_setup, BigInt(entries), addressOf(ctxBuf), 0n, 0n, 0n, 0n),
    );
    if (r < 0) {
      const err = errno();
      libc().close(efd);
      throw new LinuxAioUnavailableError(
        err,
        `failed to create linux AIO context: ${strerror(err)}`,
      );
    }
    this.#ctx = ctxBuf[0]!;
    this.#eventFd = efd;
    this.#ringHeader = mapRingHeader(this.#ctx);
    this.maxInFlight = entries;
    const iocbs = new Uint8Array(entries * IOCB_SIZE);
    this.#iocbs = new DataView(iocbs.buffer);
    this.#iocbAddr = Number(addressOf(iocbs));
    this.#ptrs = new BigUint64Array(entries);
    this.#ptrsArg = addressOf(this.#ptrs);
    const events = new Uint8Array(entries * EVENT_SIZE);
    this.#events = new DataView(events.buffer);
    this.#eventsArg = addressOf(events);
    const zeroTimeout = new Uint8Array(16);
    this.#zeroTimeoutArg = addressOf(zeroTimeout);
    this.#keep = [iocbs, events, zeroTimeout, new Uint8Array(this.#ptrs.buffer)];
    this.#resolvers = new Array(entries).fill(undefined);
    this.#buffers = new Array(entries).fill(undefined);
    this.#free = Array.from({ length: entries }, (_, i) => entries - 1 - i);
    openAioContexts.add(this);
  }

  /** Operations submitted or queued and not yet completed. */
  get pending(): number {
    return this.#inFlight + this.#backlog.length - this.#backlogHead;
  }

  /** Whether completions wait in the ring, not yet reaped (a look at two ring words). */
  get hasCompletions(): boolean {
    return this.#state !== "closed" && this.#inFlight > 0 && this.#ringHasEvents();
  }

  /**
   * Reap whatever completions are there now, on this thread, without waiting (the parked wait
   * finds them gone and parks again), and submit what they queued. For a readiness loop that
   * spins: a completion then costs no thread wake-up (as Ring.reapNow in ffi/io_uring.ts).
   */
  reapNow(): number {
    if (this.#state === "closed") return 0;
    const n = this.#reap();
    if (this.#unsubmitted.length > 0) this.#submit();
    return n;
  }

  /** True while a completion wait is parked on the blocking pool. */
  get parked(): boolean {
    return this.#parked;
  }

  /** Whether reads and writes still go in with RWF_NOWAIT (false once the kernel refused it). */
  get nowait(): boolean {
    return this.#nowait;
  }

  /** pread of `buf.length` bytes at `offset` (capped at 1 GiB); -EAGAIN: would have blocked. */
  read(fd: number, buf: Uint8Array, offset: number): Promise<number> {
    return this.#queue(IOCB_CMD_PREAD, fd, buf, offset);
  }

  /** pwrite of `buf` at `offset` (capped at 1 GiB); -EAGAIN: would have blocked. */
  write(fd: number, buf: Uint8Array, offset: number): Promise<number> {
    return this.#queue(IOCB_CMD_PWRITE, fd, buf, offset);
  }

  /**
   * Stop accepting operations (queued ones complete with -ESHUTDOWN), wait up to
   * {@linkcode CLOSE_GRACE_MS} for those in the kernel, then io_destroy (which cancels what is
   * left) and close the eventfd once no parked read can return into it. Buffers of operations
   * still unfinished then stay referenced for good.
   */
  close(): Promise<void> {
    if (this.#closed !== undefined) return this.#closed.promise;
    this.#closed = Promise.withResolvers<void>();
    this.#state = "closing";
    if (this.#retryTimer !== undefined) clearTimeout(this.#retryTimer);
    for (let i = this.#backlogHead; i < this.#backlog.length; i++) {
      this.#backlog[i]!.resolve(-ESHUTDOWN);
    }
    this.#backlog.length = this.#backlogHead = 0;
    for (const slot of this.#unsubmitted) this.#complete(slot, -ESHUTDOWN);
    this.#unsubmitted = [];
    this.#reap();
    if (this.#inFlight === 0 && !this.#parked) {
      this.#teardown();
    } else {
      // A wait parked for operations reaped since returns at their eventfd signal; nudge it
      // anyway when nothing is left.
      if (this.#inFlight === 0) libc().write(this.#eventFd, ONE, 8n);
      this.#closeDeadline = performance.now() + CLOSE_GRACE_MS;
      this.#park();
      this.#closeTimer = setTimeout(() => {
        this.#closeTimer = undefined;
        if (this.#state === "closing") libc().write(this.#eventFd, ONE, 8n);
      }, CLOSE_GRACE_MS + 10);
    }
    return this.#closed.promise;
  }

  #queue(op: number, fd: number, buf: Uint8Array, offset: number): Promise<number> {
    if (this.#state !== "open") return Promise.resolve(-ESHUTDOWN);
    const { promise, resolve } = Promise.withResolvers<number>();
    if (this.#free.length === 0 || this.#backlogHead < this.#backlog.length) {
      this.#backlog.push({ op, fd, buf, offset, resolve });
    } else {
      this.#prep(op, fd, buf, offset, resolve);
    }
    this.#scheduleFlush();
    return promise;
  }

  #scheduleFlush(): void {
    if (this.#flushQueued) return;
    this.#flushQueued = true;
    queueMicrotask(this.#flushTask);
  }

  readonly #flushTask = (): void => {
    this.#flushQueued = false;
    this.#retryTimer = undefined;
    if (this.#state === "open") this.#flush();
  };

  /** Fill the iocb of a free slot. */
  #prep(
    op: number,
    fd: number,
    buf: Uint8Array,
    offset: number,
    resolve: (res: number) => void,
  ): void {
    const slot = this.#free.pop()!;
    this.#resolvers[slot] = resolve;
    this.#buffers[slot] = buf;
    this.#inFlight++;
    const v = this.#iocbs;
    const o = slot * IOCB_SIZE;
    v.setBigUint64(o, BigInt(slot), true); // aio_data
    v.setUint32(o + 8, 0, true); // aio_key
    v.setUint32(o + 12, this.#nowait ? RWF_NOWAIT : 0, true); // aio_rw_flags
    v.setUint16(o + 16, op, true); // aio_lio_opcode
    v.setInt16(o + 18, 0, true); // aio_reqprio
    v.setUint32(o + 20, fd, true); // aio_fildes
    v.setBigUint64(o + 24, addressOf(buf), true); // aio_buf
    v.setBigUint64(o + 32, BigInt(Math.min(buf.length, MAX_OP_LEN)), true); // aio_nbytes
    v.setBigInt64(o + 40, BigInt(offset), true); // aio_offset
    v.setBigUint64(o + 48, 0n, true); // aio_reserved2
    v.setUint32(o + 56, IOCB_FLAG_RESFD, true); // aio_flags
    v.setUint32(o + 60, this.#eventFd, true); // aio_resfd
    this.#unsubmitted.push(slot);
  }

  /** Submit what is queued, reap what completed inline, and park a wait if needed. */
  #flush(): void {
    this.#submit();
    if (this.#ringHasEvents()) this.#reap();
    this.#park();
    // The kernel took nothing (EAGAIN) and nothing in flight will wake us: try again shortly.
    if (
      this.#unsubmitted.length > 0 && this.#inFlight === this.#unsubmitted.length &&
      this.#retryTimer === undefined
    ) {
      this.#retryTimer = setTimeout(this.#flushTask, 1);
    }
  }

  /** io_submit of the prepared iocbs, in order, as far as the kernel takes them. */
  #submit(): void {
    let at = 0;
    const queue = this.#unsubmitted;
    while (at < queue.length) {
      const n = queue.length - at;
      for (let i = 0; i < n; i++) {
        this.#ptrs[i] = BigInt(this.#iocbAddr + queue[at + i]! * IOCB_SIZE);
      }
      const r = Number(
        libc().syscall(SYS_io_submit, this.#ctx, BigInt(n), this.#ptrsArg, 0n, 0n, 0n),
      );
      if (r > 0) {
        at += r;
        continue;
      }
      const err = r < 0 ? errno() : EAGAIN;
      if (err === EINTR) continue;
      // Out of kernel resources: retried after the next completion (or the retry timer).
      if (err === EAGAIN) break;
      const slot = queue[at]!;
      const rwFlags = this.#iocbs.getUint32(slot * IOCB_SIZE + 12, true);
      if (err === EOPNOTSUPP && rwFlags !== 0) {
        // RWF_NOWAIT refused (a filesystem without FMODE_NOWAIT): do without from now on.
        this.#nowait = false;
        for (let i = at; i < queue.length; i++) {
          this.#iocbs.setUint32(queue[i]! * IOCB_SIZE + 12, 0, true);
        }
        continue;
      }
      // The first iocb was refused (EBADF, EINVAL, ...): it fails, the rest go on.
      at++;
      this.#complete(slot, -err);
    }
    this.#unsubmitted = at === queue.length ? [] : queue.slice(at);
  }

  #complete(slot: number, res: number): void {
    const resolve = this.#resolvers[slot]!;
    this.#resolvers[slot] = undefined;
    this.#buffers[slot] = undefined;
    this.#free.push(slot);
    this.#inFlight--;
    resolve(res);
  }

  /** A cheap look at the completion ring: head !== tail (true when the ring is not readable). */
  #ringHasEvents(): boolean {
    const h = this.#ringHeader;
    if (h === undefined) return true;
    return Atomics.load(h, 2) !== Atomics.load(h, 3);
  }

  /** Complete every event there is now (zero-timeout io_getevents); refill from the backlog. */
  #reap(): number {
    if (this.#state === "closed") return 0;
    let total = 0;
    for (let round = 0; round < 64; round++) {
      if (this.#inFlight === 0) break;
      const r = Number(
        libc().syscall(
          SYS_io_getevents,
          this.#ctx,
          0n,
          BigInt(this.maxInFlight),
          this.#eventsArg,
          this.#zeroTimeoutArg,
          0n,
        ),
      );
      if (r < 0) {
        if (errno() === EINTR) continue;
        break;
      }
      const v = this.#events;
      for (let i = 0; i < r; i++) {
        const slot = Number(v.getBigUint64(i * EVENT_SIZE, true));
        const res = Number(v.getBigInt64(i * EVENT_SIZE + 16, true));
        this.#complete(slot, res);
      }
      total += r;
      if (r < this.maxInFlight) break;
    }
    if (this.#backlogHead < this.#backlog.length) this.#drainBacklog();
    return total;
  }

  #drainBacklog(): void {
    const q = this.#backlog;
    while (this.#backlogHead < q.length && this.#free.length > 0) {
      const b = q[this.#backlogHead]!;
      q[this.#backlogHead++] = undefined!;
      this.#prep(b.op, b.fd, b.buf, b.offset, b.resolve);
    }
    if (this.#backlogHead === q.length) q.length = this.#backlogHead = 0;
    if (this.#unsubmitted.length > 0) this.#scheduleFlush();
  }

  /** Park one eventfd read on the blocking pool while anything is in the kernel. */
  #park = (): void => {
    if (this.#parked || this.#state === "closed") return;
    if (this.#inFlight - this.#unsubmitted.length <= 0 && this.#state === "open") return;
    this.#parked = true;
    libc().read_nb(this.#eventFd, this.#eventBuf, 8n).then(this.#woken, this.#wokenByError);
  };

  readonly #wokenByError = (): void => this.#woken(-1);

  readonly #woken = (r: number | bigint): void => {
    this.#parked = false;
    if (this.#state === "closed") return;
    const reaped = this.#reap();
    if (this.#state === "closing") {
      if (this.#inFlight === 0 || performance.now() >= this.#closeDeadline) {
        this.#teardown();
      } else {
        this.#park();
      }
      return;
    }
    // A wait that fails must not spin: try again in a moment.
    if (Number(r) < 0 && reaped === 0) setTimeout(this.#park, 1);
    else this.#flush();
  };

  /** io_destroy and close: only once no parked read can return into this context. */
  #teardown(): void {
    this.#state = "closed";
    openAioContexts.delete(this);
    if (this.#closeTimer !== undefined) clearTimeout(this.#closeTimer);
    for (let slot = 0; slot < this.#resolvers.length; slot++) {
      const resolve = this.#resolvers[slot];
      if (resolve === undefined) continue;
      // The kernel may still write into this buffer: never let it go.
      abandoned.push(this.#buffers[slot]);
      resolve(-ECANCELED);
    }
    if (this.#inFlight > 0) abandoned.push(...this.#keep);
    this.#resolvers.fill(undefined);
    this.#buffers.fill(undefined);
    this.#inFlight = 0;
    // io_destroy waits for operations the kernel could not cancel; by now there are none, or
    // they outlived the grace period and the wait is the kernel's.
    libc().syscall(SYS_io_destroy, this.#ctx, 0n, 0n, 0n, 0n, 0n);
    libc().close(this.#eventFd);
    this.#closed!.resolve();
  }
}

/** An eventfd increment of 1. */
const ONE = new Uint8Array(new BigUint64Array([1n]).buffer);

/** Buffers of operations abandoned at close (see {@linkcode AioContext.close}). */
const abandoned: (Uint8Array | undefined)[] = [];

function addressOf(buf: Uint8Array | BigUint64Array<ArrayBuffer>): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

/**
 * The aio_context_t is the address of the kernel's completion ring, mapped into this process;
 * its header is read only to tell whether events are waiting. Undefined when it does not look
 * like one (magic), which makes every check a syscall instead.
 */
function mapRingHeader(ctx: bigint): Uint32Array | undefined {
  const p = Deno.UnsafePointer.create(ctx);
  if (p === null) return undefined;
  const header = new Uint32Array(Deno.UnsafePointerView.getArrayBuffer(p, 32));
  return header[4] === AIO_RING_MAGIC ? header : undefined;
}

function checkNotDisabled(): void {
  let disabled = false;
  try {
    disabled = Deno.env.get(DISABLE_ENV) === "1";
  } catch {
    // No --allow-env: not disabled.
  }
  if (disabled) {
    throw new LinuxAioUnavailableError(
      EPERM,
      `failed to create linux AIO context: ${strerror(EPERM)} (disabled by ${DISABLE_ENV})`,
    );
  }
}
