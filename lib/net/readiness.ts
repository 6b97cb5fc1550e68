/**
 * The readiness loop of one thread: connections wait here until their socket can be read or
 * written, by spinning briefly and then parking in the kernel.
 *
 * - **Spin, then park.** A wait is not parked at once: after the thread has run everything
 *   runnable (a setImmediate tick, so the replies of the request just read are out), one poll(2)
 *   with a zero timeout over every waiting socket is retried up to a budget of rounds. In a VM a
 *   parked thread's wake-up costs more than a request (shared/prototypes/lean_nbd.ts: QD1 9.2k →
 *   15.5k IOPS), so a client that answers within the spin never pays it.
 * - **Adaptive budget.** A spin that found data doubles the budget (up to SPIN_MAX); one that did
 *   not halves it, down to zero, so an idle server spins once per burst and then sleeps (~0%
 *   CPU). A park that ends within SPIN_PROBE_US shows the client is fast again and restores a
 *   small budget.
 * - **Parking** is a one-shot io_uring POLL_ADD per socket where the kernel allows it (one
 *   parked io_uring_enter for all of them, on Deno's blocking pool), else epoll with
 *   EPOLLONESHOT and one parked epoll_wait. When the ring is full (more idle sockets than its
 *   completion queue), the rest park in epoll.
 *
 * Wake-ups may be spurious (a stale completion for a reused descriptor): callers retry their
 * read or write and wait again, which is why a wait resolves with nothing.
 *
 * @module
 */

import {
  EPOLL_CLOEXEC,
  EPOLL_CTL_ADD,
  EPOLL_CTL_DEL,
  EPOLL_CTL_MOD,
  EPOLLONESHOT,
  POLLERR,
  POLLHUP,
  POLLIN,
  POLLOUT,
  sock,
  SocketError,
} from "../../ffi/socket.ts";
import { EFD_CLOEXEC, errno, libc } from "../../ffi/libc.ts";
import { openRings, Ring } from "../../ffi/io_uring.ts";
import { openAioContexts } from "../../ffi/linux_aio.ts";

/** A file-I/O completion queue of this thread (an io_uring ring, a Linux AIO context). */
interface CompletionSource {
  readonly hasCompletions: boolean;
  reapNow(): number;
}
import { setImmediate } from "node:timers";

export { POLLIN, POLLOUT };

/** Most poll rounds one spin makes (~0.3 µs each for a few sockets, so ≤ ~0.6 ms). */
export const SPIN_MAX = 2048;
/** The budget a fast wake-up restores. */
const SPIN_PROBE = 64;
/** A park shorter than this means the peer answers fast: spinning would have caught it. */
const SPIN_PROBE_US = 300;
/** Entries of the poll ring: idle sockets beyond its completion queue park in epoll. */
const RING_ENTRIES = 2048;

/** Environment override of {@link SPIN_MAX} (0 turns spinning off), for measurements. */
export const SPIN_ENV = "DENBD_SPIN_ROUNDS";

function spinRounds(): number {
  const v = Deno.env.get(SPIN_ENV);
  const n = v === undefined ? NaN : Number(v);
  return Number.isInteger(n) && n >= 0 && n <= 1 << 20 ? n : SPIN_MAX;
}

export interface ReadinessOptions {
  /** false: park at once (tests). */
  readonly spin?: boolean;
  /** "epoll" even where io_uring works (tests). */
  readonly backend?: "auto" | "epoll";
}

interface Waiter {
  readonly fd: number;
  readonly events: number;
  readonly resolve: () => void;
  /** Where it is parked, once it is. */
  parked: "no" | "ring" | "epoll";
  done: boolean;
}

/** How a thread waits for its sockets. */
export interface ReadinessStats {
  readonly backend: "io_uring" | "epoll";
  spins: number;
  spinHits: number;
  parks: number;
}

/** One per thread; see the module comment. */
export class ReadinessLoop {
  readonly #pending: Waiter[] = [];
  #tickQueued = false;
  #budget = SPIN_MAX;
  #ring: Ring | undefined;
  #epoll: EpollParker | undefined;
  /** Waiters by fd and direction, for forget(). */
  readonly #byFd = new Map<number, Waiter[]>();
  readonly #pollfds = new Uint8Array(8 * 256);
  #closed = false;
  readonly stats: ReadinessStats;
  /** Time of the last park, for the fast-wake-up rule. */
  #parkedAt = 0;

  constructor(options: ReadinessOptions = {}) {
    this.#spinMax = options.spin === false ? 0 : spinRounds();
    this.#budget = this.#spinMax;
    if (options.backend !== "epoll") {
      try {
        this.#ring = new Ring({ entries: RING_ENTRIES });
      } catch {
        this.#ring = undefined; // io_uring unavailable (or disabled): epoll only
      }
    }
    this.stats = { backend: this.#ring ? "io_uring" : "epoll", spins: 0, spinHits: 0, parks: 0 };
  }

  readonly #spinMax: number;

  /** Resolves when `fd` is ready for `events` (POLLIN or POLLOUT), or on a hang-up or error. */
  wait(fd: number, events: number): Promise<void> {
    if (this.#closed) return Promise.resolve();
    const { promise, resolve } = Promise.withResolvers<void>();
    const w: Waiter = { fd, events, resolve, parked: "no", done: false };
    this.#pending.push(w);
    let list = this.#byFd.get(fd);
    if (list === undefined) this.#byFd.set(fd, list = []);
    list.push(w);
    this.#queueTick();
    return promise;
  }

  /** Wake every wait on `fd` (it is being closed) and drop it from epoll. */
  forget(fd: number): void {
    const list = this.#byFd.get(fd);
    if (list !== undefined) {
      this.#byFd.delete(fd);
      for (const w of list) this.#finish(w);
    }
    this.#epoll?.forget(fd);
  }

  /** Stop: every wait resolves, the ring and epoll are released. */
  async close(): Promise<void> {
    this.#closed = true;
    for (const list of this.#byFd.values()) for (const w of list) this.#finish(w);
    this.#byFd.clear();
    this.#pending.length = 0;
    this.#epoll?.close();
    await this.#ring?.close();
  }

  #finish(w: Waiter): void {
    if (w.done) return;
    w.done = true;
    const list = this.#byFd.get(w.fd);
    if (list !== undefined) {
      const i = list.indexOf(w);
      if (i >= 0) list.splice(i, 1);
      if (list.length === 0) this.#byFd.delete(w.fd);
    }
    w.resolve();
  }

  #queueTick(): void {
    if (this.#tickQueued) return;
    this.#tickQueued = true;
    setImmediate(this.#tick);
  }

  readonly #tick = (): void => {
    this.#tickQueued = false;
    if (this.#closed) return;
    const waiting = this.#pending.filter((w) => !w.done);
    this.#pending.length = 0;
    if (waiting.length === 0) return;
    if (this.#parkedAt !== 0 && this.#spinMax > 0 && this.#budget < SPIN_PROBE) {
      if ((performance.now() - this.#parkedAt) * 1000 < SPIN_PROBE_US) {
        this.#budget = Math.min(SPIN_PROBE, this.#spinMax);
      }
    }
    this.#parkedAt = 0;
    if (this.#budget > 0 && waiting.length <= 256 && this.#spin(waiting)) return;
    this.#parkedAt = performance.now();
    for (const w of waiting) if (!w.done) this.#park(w);
  };

  /** Poll the waiting sockets up to the budget; true when some were ready (and resolved). */
  #spin(waiting: Waiter[]): boolean {
    const n = waiting.length;
    const v = new DataView(this.#pollfds.buffer);
    for (let i = 0; i < n; i++) {
      v.setInt32(i * 8, waiting[i]!.fd, true);
      v.setInt16(i * 8 + 4, waiting[i]!.events, true);
      v.setInt16(i * 8 + 6, 0, true);
    }
    this.stats.spins++;
    const poll = sock().poll;
    const buf = this.#pollfds;
    const rounds = this.#budget;
    // File I/O in flight on this thread: its completion must not wait for the spin to end.
    let busy: CompletionSource[] | undefined;
    for (const ring of openRings) {
      if (ring !== this.#ring && ring.pending > 0) (busy ??= []).push(ring);
    }
    for (const ctx of openAioContexts) if (ctx.pending > 0) (busy ??= []).push(ctx);
    let ready = 0;
    for (let r = 0; r < rounds && ready === 0; r++) {
      ready = poll(buf, BigInt(n), 0);
      if (busy !== undefined && ready === 0 && busy.some((b) => b.hasCompletions)) {
        // Reap here (no wake-up of the parked wait needed), let their continuations run, and
        // come back to the sockets after them.
        for (const b of busy) b.reapNow();
        for (const w of waiting) if (!w.done) this.#pending.push(w);
        this.#queueTick();
        return true;
      }
    }
    if (ready <= 0) {
      this.#budget = this.#budget < 32 ? 0 : this.#budget >> 1;
      return false;
    }
    this.stats.spinHits++;
    this.#budget = Math.min(this.#spinMax, this.#budget * 2 + 16);
    for (let i = 0; i < n; i++) {
      const w = waiting[i]!;
      if (v.getInt16(i * 8 + 6, true) !== 0) this.#finish(w);
      else this.#pending.push(w);
    }
    if (this.#pending.length > 0) this.#queueTick();
    return true;
  }

  #park(w: Waiter): void {
    this.stats.parks++;
    const ring = this.#ring;
    if (ring !== undefined && ring.pending < ring.maxInFlight) {
      w.parked = "ring";
      void ring.poll(w.fd, w.events | POLLERR | POLLHUP).then(() => this.#finish(w));
      return;
    }
    w.parked = "epoll";
    this.#epoll ??= new EpollParker();
    this.#epoll.park(w.fd, w.events, () => this.#finish(w));
  }
}

/** epoll with one-shot registrations and one parked epoll_wait on the blocking pool. */
class EpollParker {
  readonly #epfd: number;
  readonly #wakeFd: number;
  /** Per fd: the union of the events waited for, and their callbacks. */
  readonly #fds = new Map<number, { events: number; registered: boolean; done: (() => void)[] }>();
  readonly #events = new Uint8Array(12 * 64);
  readonly #ev = new Uint8Array(12);
  #waiting = false;
  #closed = false;

  constructor() {
    this.#epfd = sock().epoll_create1(EPOLL_CLOEXEC);
    if (this.#epfd < 0) throw new SocketError(errno(), "epoll_create1");
    this.#wakeFd = libc().eventfd(0, EFD_CLOEXEC);
    if (this.#wakeFd < 0) throw new SocketError(errno(), "eventfd");
    this.#ctl(EPOLL_CTL_ADD, this.#wakeFd, POLLIN);
  }

  park(fd: number, events: number, done: () => void): void {
    let e = this.#fds.get(fd);
    if (e === undefined) this.#fds.set(fd, e = { events: 0, registered: false, done: [] });
    e.events |= events;
    e.done.push(done);
    // EPOLLONESHOT: armed again (MOD) after each event.
    if (!e.registered) {
      e.registered = this.#ctl(EPOLL_CTL_ADD, fd, e.events | EPOLLONESHOT);
      if (!e.registered) return this.#fire(fd); // not pollable (closed): wake it
    } else if (!this.#ctl(EPOLL_CTL_MOD, fd, e.events | EPOLLONESHOT)) {
      return this.#fire(fd);
    }
    if (!this.#waiting) void this.#waitLoop();
  }

  forget(fd: number): void {
    const e = this.#fds.get(fd);
    if (e === undefined) return;
    if (e.registered) this.#ctl(EPOLL_CTL_DEL, fd, 0);
    this.#fds.delete(fd);
  }

  close(): void {
    this.#closed = true;
    libc().write(this.#wakeFd, new Uint8Array(new BigUint64Array([1n]).buffer), 8n);
  }

  #ctl(op: number, fd: number, events: number): boolean {
    const v = new DataView(this.#ev.buffer);
    v.setUint32(0, events >>> 0, true); // struct epoll_event is packed: events @0, data @4
    v.setUint32(4, fd, true);
    v.setUint32(8, 0, true);
    return sock().epoll_ctl(this.#epfd, op, fd, this.#ev) === 0;
  }

  #fire(fd: number): void {
    const e = this.#fds.get(fd);
    if (e === undefined) return;
    const done = e.done;
    e.done = [];
    e.events = 0;
    for (const d of done) d();
  }

  async #waitLoop(): Promise<void> {
    this.#waiting = true;
    try {
      while (!this.#closed) {
        let anyWaiting = false;
        for (const e of this.#fds.values()) if (e.done.length > 0) anyWaiting = true;
        if (!anyWaiting) return;
        const n = await sock().epoll_wait_nb(this.#epfd, this.#events, 64, -1);
        if (n < 0) continue; // EINTR
        const v = new DataView(this.#events.buffer);
        for (let i = 0; i < n; i++) {
          const fd = v.getUint32(i * 12 + 4, true);
          if (fd !== this.#wakeFd) this.#fire(fd);
        }
      }
    } finally {
      this.#waiting = false;
      if (this.#closed) {
        libc().close(this.#wakeFd);
        libc().close(this.#epfd);
      }
    }
  }
}
