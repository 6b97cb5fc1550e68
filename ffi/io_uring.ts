/**
 * io_uring through Deno FFI: `io_uring_setup`/`io_uring_enter`/`io_uring_register` via
 * syscall(2) (libc has no wrappers), the SQ/CQ rings and the SQE array mmap'd and viewed as typed
 * arrays, head/tail published with Atomics.
 *
 * Why: one syscall submits a whole tick's worth of reads, writes, fsyncs and fallocates, the kernel
 * completes page-cache hits inline during that syscall, and each CQE carries its own -errno (the
 * thread engine has to repeat a failed call to learn errno).
 *
 * Completions must not block the event loop. While operations are in flight one call is parked
 * on Deno's blocking pool and resolves when completions arrive ({@linkcode CompletionWait}):
 * `"enter"` parks `io_uring_enter(GETEVENTS, min_complete=1)`, `"eventfd"` parks a read() of an
 * eventfd registered with IORING_REGISTER_EVENTFD. The CQ is also reaped right after every
 * submission, which catches everything the kernel finished inline. Nothing is parked when nothing
 * is in flight, so an idle ring never holds the process open; {@linkcode Ring.close} wakes a
 * parked call (a NOP, or an eventfd write) and unmaps only after it returned.
 *
 * Measured with scripts/engine_bench.ts (2 vCPUs, kernel 6.18): both waits cost the same, one
 * blocking-pool round trip per batch of completions (~30-40 us alone, ~500-650k completions/s
 * at depth 32, where a `nonblocking` FFI call per operation manages ~170-200k/s), and the same
 * on real disk I/O; "enter" used a little less CPU and needs no extra descriptor, so it is the
 * default.
 *
 * Results are CQE `res` values: a byte count (or 0) on success, `-errno` on failure. The caller
 * knows the path and offset, so it turns them into errors.
 *
 * @module
 */

import {
  EFD_CLOEXEC,
  errno,
  libc,
  MAP_POPULATE,
  MAP_SHARED,
  PROT_READ,
  PROT_WRITE,
  strerror,
} from "./libc.ts";
import { BlockError } from "../lib/errors.ts";

// x86_64 syscall numbers (the same on every architecture that uses the generic table).
const SYS_io_uring_setup = 425n;
const SYS_io_uring_enter = 426n;
const SYS_io_uring_register = 427n;

// mmap offsets; the CQ ring shares the SQ ring's mapping (IORING_FEAT_SINGLE_MMAP, required).
const IORING_OFF_SQ_RING = 0;
const IORING_OFF_SQES = 0x10000000;

const IORING_SETUP_CLAMP = 1 << 4;
/** Keep submitting the rest of a batch when one SQE is bad (5.18); retried without if refused. */
const IORING_SETUP_SUBMIT_ALL = 1 << 7;

const IORING_FEAT_SINGLE_MMAP = 1 << 0;
const IORING_FEAT_NODROP = 1 << 1;
const IORING_FEAT_SUBMIT_STABLE = 1 << 2;

const IORING_ENTER_GETEVENTS = 1n << 0n;

const IORING_REGISTER_EVENTFD = 4n;
const IORING_REGISTER_PROBE = 8n;
const IO_URING_OP_SUPPORTED = 1;

export const IORING_OP_NOP = 0;
export const IORING_OP_FSYNC = 3;
export const IORING_OP_ASYNC_CANCEL = 14;
export const IORING_OP_FALLOCATE = 17;
export const IORING_OP_READ = 22;
export const IORING_OP_WRITE = 23;
export const IORING_OP_POLL_ADD = 6;

/** sqe->flags: always go through a kernel worker (io-wq). */
const IOSQE_ASYNC = 1 << 4;
/** fsync_flags: fdatasync(2) rather than fsync(2). */
export const IORING_FSYNC_DATASYNC = 1;
const IORING_ASYNC_CANCEL_ALL = 1 << 0;
const IORING_ASYNC_CANCEL_ANY = 1 << 2;

/** Operations denbd submits; a kernel without one of them is treated as having no io_uring. */
const REQUIRED_OPS: readonly [number, string][] = [
  [IORING_OP_NOP, "NOP"],
  [IORING_OP_FSYNC, "FSYNC"],
  [IORING_OP_FALLOCATE, "FALLOCATE"],
  [IORING_OP_READ, "READ"],
  [IORING_OP_WRITE, "WRITE"],
];

const EPERM = 1;
const EINTR = 4;
const EAGAIN = 11;
const EBUSY = 16;
const ENOSYS = 38;
const ECANCELED = 125;
const ESHUTDOWN = 108;

/** user_data high word of internal requests (cancel, wake-up NOPs); operations use 0. */
const INTERNAL = 1;
/** CQ entries kept free for internal requests: close() queues at most three. */
const INTERNAL_RESERVE = 4;
/** sq_flags bit: CQEs wait in the kernel's overflow list. */
const IORING_SQ_CQ_OVERFLOW = 1 << 1;
/** How long {@linkcode Ring.close} waits for operations the kernel cannot cancel. */
const CLOSE_GRACE_MS = 1000;
/** Largest length in one SQE: the kernel caps a read or write at 2 GiB - 4 KiB anyway. */
const MAX_OP_LEN = 1 << 30;

/**
 * The environment variable that makes io_uring setup fail as if the kernel refused it
 * (io_uring_disabled), so the fallback to the thread engine can be tested on any machine.
 */
export const DISABLE_ENV = "DENBD_IO_URING_DISABLE";

/** How completions wake the event loop (see the module comment); measured in engine_bench.ts. */
export type CompletionWait = "enter" | "eventfd";

export interface RingOptions {
  /** SQ size (rounded up to a power of two by the kernel; default 256). */
  readonly entries?: number;
  /** Completion path (default "enter"). */
  readonly wait?: CompletionWait;
}

/** io_uring cannot be used here: disabled by sysctl or policy, too old a kernel, or seccomp. */
export class IoUringUnavailableError extends BlockError {
  constructor(errno: number, message: string) {
    super(errno, message);
    this.name = "IoUringUnavailableError";
  }
}

/** An operation waiting for a free slot (the SQ or the in-flight bound is full). */
interface Backlogged {
  readonly op: number;
  readonly fd: number;
  readonly buf: Uint8Array | undefined;
  readonly len: number;
  readonly offset: number;
  /** addr of FALLOCATE (the length), else unused. */
  readonly addr: number;
  readonly opFlags: number;
  readonly resolve: (res: number) => void;
}

interface Mapping {
  readonly ptr: Deno.PointerObject;
  readonly size: number;
}

/**
 * Every open ring of this thread: the transport's readiness loop (lib/net/readiness.ts) stops
 * spinning as soon as one of them holds a completion, so file I/O is never kept waiting.
 */
export const openRings: Set<Ring> = new Set();

/** A submission/completion queue pair with its own fd; see the module comment. */
export class Ring {
  /** SQ entries and CQ entries as the kernel sized them. */
  readonly sqEntries: number;
  readonly cqEntries: number;
  /** At most this many operations are in the kernel at once; more wait in a JS queue. */
  readonly maxInFlight: number;
  readonly wait: CompletionWait;

  readonly #fd: number;
  /** The same as a bigint, for syscall(2)'s long arguments. */
  readonly #fdArg: bigint;
  readonly #eventFd: number;
  readonly #maps: Mapping[];
  // SQ ring
  readonly #sqHead: Uint32Array;
  readonly #sqTail: Uint32Array;
  readonly #sqFlags: Uint32Array;
  readonly #sqMask: number;
  /** The SQE array as 32-bit words (16 per SQE). */
  readonly #sqes: Uint32Array;
  #sqTailLocal: number;
  #toSubmit = 0;
  // CQ ring
  readonly #cqHead: Uint32Array;
  readonly #cqTail: Uint32Array;
  readonly #cqMask: number;
  /** The CQE array as 32-bit words (4 per CQE: user_data lo/hi, res, flags). */
  readonly #cqesU32: Uint32Array;
  readonly #cqesI32: Int32Array;
  readonly #cqeBase: number;
  // Operations in the kernel, by slot (= user_data).
  readonly #resolvers: (((res: number) => void) | undefined)[];
  /** Buffers the kernel may still read or write: referenced until their CQE is reaped. */
  readonly #buffers: (Uint8Array | undefined)[];
  readonly #free: number[];
  #inFlight = 0;
  readonly #backlog: Backlogged[] = [];
  #backlogHead = 0;
  // Completion wait
  #flushQueued = false;
  #parked = false;
  readonly #eventBuf = new Uint8Array(8);
  #state: "open" | "closing" | "closed" = "open";
  #closeDeadline = 0;
  #closeTimer: ReturnType<typeof setTimeout> | undefined;
  #closed: PromiseWithResolvers<void> | undefined;

  /**
   * Set up a ring. Throws {@linkcode IoUringUnavailableError} when the kernel refuses io_uring
   * or lacks an operation denbd needs.
   */
  constructor(options: RingOptions = {}) {
    this.wait = options.wait ?? "enter";
    const entries = options.entries ?? 256;
    checkNotDisabled();
    const params = new Uint8Array(120);
    const pv = new DataView(params.buffer);
    let fd = setup(entries, IORING_SETUP_CLAMP | IORING_SETUP_SUBMIT_ALL, params);
    if (fd === -22) fd = setup(entries, IORING_SETUP_CLAMP, params); // before 5.18
    if (fd < 0) throw unavailable(-fd, "io_uring_setup");
    const u32 = (o: number) => pv.getUint32(o, true);
    const features = u32(20);
    const maps: Mapping[] = [];
    try {
      const need = IORING_FEAT_SINGLE_MMAP | IORING_FEAT_NODROP | IORING_FEAT_SUBMIT_STABLE;
      if ((features & need) !== need) {
        throw new IoUringUnavailableError(
          ENOSYS,
          `io_uring on this kernel is too old (features 0x${features.toString(16)})`,
        );
      }
      probeOps(fd);
      this.sqEntries = u32(0);
      this.cqEntries = u32(4);
      // struct io_sqring_offsets at 40, struct io_cqring_offsets at 80.
      const sqArrayOff = u32(64);
      const cqesOff = u32(100);
      const ringSize = Math.max(sqArrayOff + this.sqEntries * 4, cqesOff + this.cqEntries * 16);
      const ring = mapRing(fd, ringSize, IORING_OFF_SQ_RING, maps);
      const sqes = mapRing(fd, this.sqEntries * 64, IORING_OFF_SQES, maps);
      const words = (off: number, n: number) => new Uint32Array(ring, off, n);
      this.#sqHead = words(u32(40), 1);
      this.#sqTail = words(u32(44), 1);
      this.#sqFlags = words(u32(56), 1);
      this.#sqMask = words(u32(48), 1)[0]!;
      // The indirection array is filled once with the identity: SQE i lives in slot i.
      const sqArray = words(sqArrayOff, this.sqEntries);
      for (let i = 0; i < this.sqEntries; i++) sqArray[i] = i;
      this.#sqes = new Uint32Array(sqes);
      this.#sqTailLocal = Atomics.load(this.#sqTail, 0);
      this.#cqHead = words(u32(80), 1);
      this.#cqTail = words(u32(84), 1);
      this.#cqMask = words(u32(88), 1)[0]!;
      this.#cqesU32 = new Uint32Array(ring);
      this.#cqesI32 = new Int32Array(ring);
      this.#cqeBase = cqesOff / 4;
      this.#eventFd = this.wait === "enter" ? -1 : registerEventFd(fd);
    } catch (e) {
      for (const m of maps) libc().munmap(m.ptr, BigInt(m.size));
      libc().close(fd);
      throw e;
    }
    this.#fd = fd;
    this.#fdArg = BigInt(fd);
    this.#maps = maps;
    // Never more in flight than the CQ holds, with room for our own cancel and NOPs, so
    // completions cannot overflow it (overflowed CQEs reach the ring only at the next GETEVENTS,
    // which the eventfd path never makes).
    this.maxInFlight = this.cqEntries - INTERNAL_RESERVE;
    this.#resolvers = new Array(this.maxInFlight).fill(undefined);
    this.#buffers = new Array(this.maxInFlight).fill(undefined);
    this.#free = Array.from({ length: this.maxInFlight }, (_, i) => this.maxInFlight - 1 - i);
    openRings.add(this);
  }

  /** Operations submitted or queued and not yet completed. */
  get pending(): number {
    return this.#inFlight + this.#backlog.length - this.#backlogHead;
  }

  /** Whether completions sit in the CQ, not yet reaped (a cheap look at two ring words). */
  get hasCompletions(): boolean {
    return this.#cqHead[0] !== Atomics.load(this.#cqTail, 0);
  }

  /**
   * Reap whatever completions are there now, on this thread, without waiting (the parked wait
   * finds them gone and parks again). The readiness loop calls it while it spins: a completion
   * then costs no thread wake-up.
   */
  reapNow(): number {
    if (this.#state === "closed") return 0;
    const n = this.#reap();
    if (this.#toSubmit > 0) this.#submit();
    return n;
  }

  /** True while a completion wait is parked on the blocking pool. */
  get parked(): boolean {
    return this.#parked;
  }

  /** read(2) of `buf.length` bytes at `offset` (capped at 1 GiB per call). */
  read(fd: number, buf: Uint8Array, offset: number): Promise<number> {
    return this.#queue(IORING_OP_READ, fd, buf, Math.min(buf.length, MAX_OP_LEN), offset, 0, 0);
  }

  /** write(2) of `buf` at `offset` (capped at 1 GiB per call). */
  write(fd: number, buf: Uint8Array, offset: number): Promise<number> {
    return this.#queue(IORING_OP_WRITE, fd, buf, Math.min(buf.length, MAX_OP_LEN), offset, 0, 0);
  }

  /**
   * One-shot poll(2) of `fd` for `events` (POLLIN, POLLOUT...): resolves with the ready events,
   * or a negative errno. The readiness loop of lib/net/ parks its sockets here.
   */
  poll(fd: number, events: number): Promise<number> {
    // poll32_events sits where the read/write flags do.
    return this.#queue(IORING_OP_POLL_ADD, fd, undefined, 0, 0, 0, events);
  }

  /** fdatasync(2), or fsync(2) when `datasync` is false. */
  fsync(fd: number, datasync = true): Promise<number> {
    const flags = datasync ? IORING_FSYNC_DATASYNC : 0;
    return this.#queue(IORING_OP_FSYNC, fd, undefined, 0, 0, 0, flags);
  }

  /** fallocate(2) with `mode` (FALLOC_FL_*). */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<number> {
    // The SQE carries the mode in `len` and the length in `addr`.
    return this.#queue(IORING_OP_FALLOCATE, fd, undefined, mode, offset, length, 0);
  }

  /**
   * A no-op round trip through the kernel. `viaWorker` (IOSQE_ASYNC) makes it complete from a
   * kernel worker like a real I/O instead of inline: engine_bench.ts times the completion path
   * with it.
   */
  nop(viaWorker = false): Promise<number> {
    const op = IORING_OP_NOP | (viaWorker ? IOSQE_ASYNC << 8 : 0);
    return this.#queue(op, -1, undefined, 0, 0, 0, 0);
  }

  /**
   * Stop accepting operations, cancel those in flight (they complete with -ECANCELED unless
   * they finish first), wake a parked wait, and unmap the rings once nothing can touch them.
   * Operations the kernel cannot cancel get {@linkcode CLOSE_GRACE_MS} to finish; after that
   * they are abandoned (resolved with -ECANCELED, their buffers kept referenced for good).
   */
  close(): Promise<void> {
    if (this.#closed !== undefined) return this.#closed.promise;
    this.#closed = Promise.withResolvers<void>();
    this.#state = "closing";
    for (let i = this.#backlogHead; i < this.#backlog.length; i++) {
      this.#backlog[i]!.resolve(-ECANCELED);
    }
    this.#backlog.length = this.#backlogHead = 0;
    this.#reap();
    if (this.#inFlight === 0 && !this.#parked) {
      this.#teardown();
    } else {
      this.#closeDeadline = performance.now() + CLOSE_GRACE_MS;
      this.#prepInternal(IORING_OP_ASYNC_CANCEL, IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_ANY);
      this.#submit();
      this.#wake();
      this.#park();
      // An operation that ignores cancellation keeps the wait parked: poke it after the grace.
      this.#closeTimer = setTimeout(() => {
        this.#closeTimer = undefined;
        if (this.#state === "closing") this.#wake();
      }, CLOSE_GRACE_MS + 10);
    }
    return this.#closed.promise;
  }

  /** Make the parked wait return. */
  #wake(): void {
    if (this.#eventFd >= 0) {
      libc().write(this.#eventFd, ONE, 8n);
      return;
    }
    // A NOP completes at once. Its CQE is not reaped here but left for the wait to find, so a
    // wait that reaches the kernel only now still returns.
    this.#prepInternal(IORING_OP_NOP, 0);
    this.#submit();
  }

  /** Queue one operation; `op` is the SQE's first word: the opcode, SQE flags in bits 8-15. */
  #queue(
    op: number,
    fd: number,
    buf: Uint8Array | undefined,
    len: number,
    offset: number,
    addr: number,
    opFlags: number,
  ): Promise<number> {
    if (this.#state !== "open") return Promise.resolve(-ESHUTDOWN);
    const { promise, resolve } = Promise.withResolvers<number>();
    if (
      this.#free.length === 0 || this.#backlogHead < this.#backlog.length || !this.#sqRoom()
    ) {
      this.#backlog.push({ op, fd, buf, len, offset, addr, opFlags, resolve });
    } else {
      this.#prep(op, fd, buf, len, offset, addr, opFlags, resolve);
    }
    if (!this.#flushQueued) {
      this.#flushQueued = true;
      queueMicrotask(this.#flushTask);
    }
    return promise;
  }

  readonly #flushTask = (): void => {
    this.#flushQueued = false;
    if (this.#state === "open") this.#flush();
  };

  /** Fill the next SQE for an operation in a free slot. */
  #prep(
    op: number,
    fd: number,
    buf: Uint8Array | undefined,
    len: number,
    offset: number,
    addr: number,
    opFlags: number,
    resolve: (res: number) => void,
  ): void {
    const slot = this.#free.pop()!;
    this.#resolvers[slot] = resolve;
    this.#buffers[slot] = buf;
    this.#inFlight++;
    if (buf !== undefined) addr = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
    this.#writeSqe(op, fd, len, offset, addr, opFlags, slot, 0);
  }

  /** A request of our own (cancel, wake-up NOP): not counted, its CQE is dropped. */
  #prepInternal(op: number, opFlags: number): void {
    if (this.#sqRoom()) this.#writeSqe(op, -1, 0, 0, 0, opFlags, 0, INTERNAL);
  }

  /**
   * Whether the SQ has a free entry, submitting what is queued to make one. It never reaps: a
   * completion handled here could start more preps in the middle of this one.
   */
  #sqRoom(): boolean {
    if (this.#sqTailLocal - Atomics.load(this.#sqHead, 0) < this.sqEntries) return true;
    this.#submit();
    return this.#sqTailLocal - Atomics.load(this.#sqHead, 0) < this.sqEntries;
  }

  #writeSqe(
    op: number,
    fd: number,
    len: number,
    offset: number,
    addr: number,
    opFlags: number,
    userLo: number,
    userHi: number,
  ): void {
    // The caller made sure there is room (#sqRoom).
    const w = this.#sqes;
    const i = (this.#sqTailLocal & this.#sqMask) * 16;
    w[i] = op; // opcode, flags (bits 8-15), ioprio = 0
    w[i + 1] = fd;
    w[i + 2] = offset >>> 0;
    w[i + 3] = Math.floor(offset / 0x100000000);
    w[i + 4] = addr >>> 0;
    w[i + 5] = Math.floor(addr / 0x100000000);
    w[i + 6] = len;
    w[i + 7] = opFlags;
    w[i + 8] = userLo;
    w[i + 9] = userHi;
    w.fill(0, i + 10, i + 16);
    this.#sqTailLocal = (this.#sqTailLocal + 1) >>> 0;
    Atomics.store(this.#sqTail, 0, this.#sqTailLocal);
    this.#toSubmit++;
  }

  /** Submit what is queued (one io_uring_enter), reap, and park a wait if needed. */
  #flush(): void {
    this.#submit();
    this.#reap();
    this.#park();
    // Nothing in flight to wake us, yet the kernel took nothing (EAGAIN): try again shortly.
    if (this.#toSubmit > 0 && this.#inFlight === 0) setTimeout(this.#flushTask, 1);
  }

  /** io_uring_enter for the queued SQEs, without waiting. */
  #submit(): void {
    while (this.#toSubmit > 0) {
      const r = Number(
        libc().syscall(
          SYS_io_uring_enter,
          this.#fdArg,
          BigInt(this.#toSubmit),
          0n,
          0n,
          0n,
          0n,
        ),
      );
      if (r > 0) {
        this.#toSubmit -= r;
        continue;
      }
      const err = r < 0 ? errno() : EAGAIN;
      if (err === EINTR) continue;
      // EAGAIN/EBUSY: the kernel is short of memory or completions; retried after the next
      // completion (the parked wait calls #flush).
      if (err !== EAGAIN && err !== EBUSY) this.#unqueue(-err);
      return;
    }
  }

  /**
   * The kernel refused the submission outright (a dead ring; not seen in practice): take the
   * unsubmitted SQEs back and complete their operations with `res`. Safe because only this
   * thread submits, so the kernel reads SQEs only inside our own io_uring_enter calls.
   */
  #unqueue(res: number): void {
    const w = this.#sqes;
    for (let k = this.#toSubmit; k > 0; k--) {
      const i = ((this.#sqTailLocal - k) & this.#sqMask) * 16;
      if (w[i + 9] === INTERNAL) continue;
      this.#complete(w[i + 8]!, res);
    }
    this.#sqTailLocal = (this.#sqTailLocal - this.#toSubmit) >>> 0;
    Atomics.store(this.#sqTail, 0, this.#sqTailLocal);
    this.#toSubmit = 0;
  }

  #complete(slot: number, res: number): void {
    const resolve = this.#resolvers[slot]!;
    this.#resolvers[slot] = undefined;
    this.#buffers[slot] = undefined;
    this.#free.push(slot);
    this.#inFlight--;
    resolve(res);
  }

  /** Complete every CQE in the ring; refill freed slots from the backlog. */
  #reap(): number {
    // Not expected (see maxInFlight), but CQEs in the kernel's overflow list reach the ring only
    // at a GETEVENTS, which the eventfd path never makes. min_complete 0: it does not wait.
    if ((Atomics.load(this.#sqFlags, 0) & IORING_SQ_CQ_OVERFLOW) !== 0) {
      libc().syscall(SYS_io_uring_enter, this.#fdArg, 0n, 0n, IORING_ENTER_GETEVENTS, 0n, 0n);
    }
    let head = this.#cqHead[0]!;
    const tail = Atomics.load(this.#cqTail, 0);
    if (head === tail) return 0;
    const u = this.#cqesU32;
    const base = this.#cqeBase;
    const mask = this.#cqMask;
    let n = 0;
    while (head !== tail) {
      const i = base + (head & mask) * 4;
      const slot = u[i]!;
      const internal = u[i + 1] === INTERNAL;
      const res = this.#cqesI32[i + 2]!;
      head = (head + 1) >>> 0;
      if (internal) continue;
      n++;
      this.#complete(slot, res);
    }
    Atomics.store(this.#cqHead, 0, head);
    if (this.#backlogHead < this.#backlog.length) this.#drainBacklog();
    return n;
  }

  #drainBacklog(): void {
    const q = this.#backlog;
    while (this.#backlogHead < q.length && this.#free.length > 0 && this.#sqRoom()) {
      const b = q[this.#backlogHead]!;
      q[this.#backlogHead++] = undefined!;
      this.#prep(b.op, b.fd, b.buf, b.len, b.offset, b.addr, b.opFlags, b.resolve);
    }
    if (this.#backlogHead === q.length) q.length = this.#backlogHead = 0;
    if (this.#toSubmit > 0 && !this.#flushQueued) {
      this.#flushQueued = true;
      queueMicrotask(this.#flushTask);
    }
  }

  /** Park one completion wait on the blocking pool while anything is in flight. */
  #park = (): void => {
    if (this.#parked || this.#state === "closed") return;
    if (this.#inFlight === 0 && this.#state === "open") return;
    this.#parked = true;
    if (this.wait === "enter") {
      libc().syscall_nb(SYS_io_uring_enter, this.#fdArg, 0n, 1n, IORING_ENTER_GETEVENTS, 0n, 0n)
        .then(this.#woken, this.#wokenByError);
    } else {
      libc().read_nb(this.#eventFd, this.#eventBuf, 8n).then(this.#woken, this.#wokenByError);
    }
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
    // A wait that fails (EINTR, or something worse) must not spin: try again in a moment.
    if (Number(r) < 0 && reaped === 0) setTimeout(this.#park, 1);
    else this.#flush();
  };

  /** Unmap and close: only once no parked call can return into this ring. */
  #teardown(): void {
    this.#state = "closed";
    openRings.delete(this);
    if (this.#closeTimer !== undefined) clearTimeout(this.#closeTimer);
    for (let slot = 0; slot < this.#resolvers.length; slot++) {
      const resolve = this.#resolvers[slot];
      if (resolve === undefined) continue;
      // The kernel may still write into this buffer after the ring is gone: never let it go.
      abandoned.push(this.#buffers[slot]);
      resolve(-ECANCELED);
    }
    this.#resolvers.fill(undefined);
    this.#buffers.fill(undefined);
    for (const m of this.#maps) libc().munmap(m.ptr, BigInt(m.size));
    libc().close(this.#fd);
    if (this.#eventFd >= 0) libc().close(this.#eventFd);
    this.#closed!.resolve();
  }
}

/** An eventfd increment of 1. */
const ONE = new Uint8Array(new BigUint64Array([1n]).buffer);

/** Buffers of operations abandoned at close (see {@linkcode Ring.close}). */
const abandoned: (Uint8Array | undefined)[] = [];

function setup(entries: number, flags: number, params: Uint8Array): number {
  params.fill(0);
  new DataView(params.buffer).setUint32(8, flags, true);
  const r = Number(
    libc().syscall(SYS_io_uring_setup, BigInt(entries), addressOf(params), 0n, 0n, 0n, 0n),
  );
  return r < 0 ? -errno() : r;
}

function addressOf(buf: Uint8Array): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

function mapRing(fd: number, size: number, offset: number, maps: Mapping[]): ArrayBuffer {
  const p = libc().mmap(
    null,
    BigInt(size),
    PROT_READ | PROT_WRITE,
    MAP_SHARED | MAP_POPULATE,
    fd,
    BigInt(offset),
  );
  if (p === null || Deno.UnsafePointer.value(p) === 0xffffffffffffffffn) {
    const err = errno();
    throw new BlockError(
      err,
      `mmap of io_uring ring at 0x${offset.toString(16)}: ${strerror(err)}`,
    );
  }
  maps.push({ ptr: p, size });
  return Deno.UnsafePointerView.getArrayBuffer(p, size);
}

/** Every operation in {@linkcode REQUIRED_OPS} must be supported (IORING_REGISTER_PROBE). */
function probeOps(fd: number): void {
  const probe = new Uint8Array(16 + 256 * 8);
  const r = Number(
    libc().syscall(
      SYS_io_uring_register,
      BigInt(fd),
      IORING_REGISTER_PROBE,
      addressOf(probe),
      256n,
      0n,
      0n,
    ),
  );
  if (r < 0) throw unavailable(errno(), "IORING_REGISTER_PROBE");
  const opsLen = probe[1]!;
  const missing = REQUIRED_OPS.filter(([op]) =>
    op >= opsLen || (probe[16 + op * 8 + 2]! & IO_URING_OP_SUPPORTED) === 0
  ).map(([, name]) => name);
  if (missing.length > 0) {
    throw new IoUringUnavailableError(
      ENOSYS,
      `io_uring on this kernel lacks ${missing.join(", ")}`,
    );
  }
}

function registerEventFd(fd: number): number {
  const efd = libc().eventfd(0, EFD_CLOEXEC);
  if (efd < 0) throw unavailable(errno(), "eventfd");
  const arg = new Int32Array([efd]);
  const r = Number(
    libc().syscall(
      SYS_io_uring_register,
      BigInt(fd),
      IORING_REGISTER_EVENTFD,
      addressOf(new Uint8Array(arg.buffer)),
      1n,
      0n,
      0n,
    ),
  );
  if (r < 0) {
    const err = errno();
    libc().close(efd);
    throw unavailable(err, "IORING_REGISTER_EVENTFD");
  }
  return efd;
}

/** The io_uring_disabled sysctl, or undefined where it does not exist (before 6.6). */
function ioUringDisabledSysctl(): number | undefined {
  try {
    return Number(Deno.readTextFileSync("/proc/sys/kernel/io_uring_disabled").trim());
  } catch {
    return undefined;
  }
}

function checkNotDisabled(): void {
  let forced = false;
  try {
    forced = (Deno.env.get(DISABLE_ENV) ?? "") !== "" && Deno.env.get(DISABLE_ENV) !== "0";
  } catch { /* no --allow-env: not forced */ }
  if (forced) {
    throw new IoUringUnavailableError(
      EPERM,
      `io_uring_setup: ${strerror(EPERM)} (disabled by ${DISABLE_ENV})`,
    );
  }
}

function unavailable(err: number, what: string): IoUringUnavailableError {
  let why = "";
  const sysctl = ioUringDisabledSysctl();
  if (sysctl !== undefined && sysctl !== 0) {
    why = ` (io_uring is disabled: /proc/sys/kernel/io_uring_disabled is ${sysctl})`;
  } else if (err === EPERM || err === ENOSYS) {
    why = " (the kernel or a seccomp policy refuses io_uring; see " +
      "/proc/sys/kernel/io_uring_disabled)";
  }
  return new IoUringUnavailableError(err, `${what}: ${strerror(err)}${why}`);
}
