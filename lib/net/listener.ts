/**
 * Accepts clients on the listening descriptors and hands each to a connection host (this thread
 * or a data-plane thread), with qemu-nbd's lifecycle: at most `shared` clients at once (0 =
 * unlimited; further clients wait in the backlog), and without `persistent` the server stops
 * once a client that completed negotiation disconnects and no other client remains.
 *
 * @module
 */

import { closeSocket, EAGAIN, EINTR, sock, SOCK_CLOEXEC, SOCK_NONBLOCK } from "../../ffi/socket.ts";
import { errno, strerror } from "../../ffi/libc.ts";
import { denbd_accept_failed } from "../trace/events.ts";
import type { SessionEnd } from "../nbd/session.ts";
import type { ListenAddress } from "./address.ts";
import { listenOn, type ListenSocket, removeSocketFile } from "./listen.ts";
import { POLLIN, type ReadinessLoop } from "./readiness.ts";

/** Where accepted connections are served. */
export interface ConnectionHost {
  /** Serve the connected socket `fd` (this host owns it from now on) until the session ends. */
  serve(fd: number, tcp: boolean): Promise<SessionEnd>;
  /** Close every connection it serves (the server is stopping). */
  closeAll(): void;
}

export interface ListenerOptions {
  readonly address: ListenAddress;
  readonly shared: number;
  readonly persistent: boolean;
  /** Picks the host for each new connection. */
  readonly host: () => ConnectionHost;
  /** This thread's readiness loop (accept waits in it). */
  readonly loop: ReadinessLoop;
}

const ECONNABORTED = 103;
const EMFILE = 24;
const ENFILE = 23;
const ENOBUFS = 105;
const ENOMEM = 12;

/** A running server: `done` resolves when it stops (last client gone, or `stop()`). */
export class NbdListener {
  readonly #sockets: ListenSocket[];
  readonly #options: ListenerOptions;
  readonly #hosts = new Set<ConnectionHost>();
  #clients = 0;
  #stopping = false;
  #slot: (() => void)[] = [];
  #resolveDone!: () => void;
  /** Resolves once the server has stopped and every session has ended. */
  readonly done: Promise<void>;

  /** Binds and listens (throws a BindError or SocketError) and starts accepting. */
  constructor(options: ListenerOptions) {
    this.#options = options;
    this.#sockets = listenOn(options.address);
    this.done = new Promise((resolve) => this.#resolveDone = resolve);
    for (const s of this.#sockets) void this.#acceptLoop(s);
  }

  /** The bound TCP port (the real one when 0 was asked), or 0 for a unix socket. */
  get port(): number {
    return this.#sockets[0]?.port ?? 0;
  }

  /** Clients connected now. */
  get clients(): number {
    return this.#clients;
  }

  /** Stop accepting and close every client connection. */
  stop(): void {
    if (this.#stopping) return;
    this.#stopping = true;
    for (const s of this.#sockets) {
      this.#options.loop.forget(s.fd);
      closeSocket(s.fd);
    }
    // Nobody can connect any more: take the socket file away now rather than after the image is
    // flushed and closed, so a client that tries in between is told ENOENT, as with qemu-nbd
    // (whose exit is quick), not ECONNREFUSED (iotest nbd-reconnect-on-open tells them apart).
    const a = this.#options.address;
    if (a.transport === "unix") removeSocketFile(a.path);
    for (const h of this.#hosts) h.closeAll();
    this.#wakeSlots();
    if (this.#clients === 0) this.#resolveDone();
  }

  #wakeSlots(): void {
    const waiting = this.#slot;
    this.#slot = [];
    for (const w of waiting) w();
  }

  async #acceptLoop(ls: ListenSocket): Promise<void> {
    const limit = this.#options.shared;
    const s = sock();
    while (!this.#stopping) {
      if (limit > 0 && this.#clients >= limit) {
        await new Promise<void>((resolve) => this.#slot.push(resolve));
        continue;
      }
      const fd = s.accept4(ls.fd, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        const err = errno();
        if (this.#stopping) break;
        if (err === EAGAIN) {
          await this.#options.loop.wait(ls.fd, POLLIN);
          continue;
        }
        if (err === EINTR || err === ECONNABORTED) continue;
        if (denbd_accept_failed.on) denbd_accept_failed.emit(strerror(err));
        if (err === EMFILE || err === ENFILE || err === ENOBUFS || err === ENOMEM) {
          // Out of descriptors or memory: the client stays in the backlog; try again shortly.
          await new Promise((resolve) => setTimeout(resolve, 50));
          continue;
        }
        break;
      }
      this.#clients++;
      void this.#serve(fd, ls.tcp);
    }
  }

  async #serve(fd: number, tcp: boolean): Promise<void> {
    const host = this.#options.host();
    this.#hosts.add(host);
    let end: SessionEnd;
    try {
      end = await host.serve(fd, tcp);
    } catch {
      end = { negotiated: false };
    }
    this.#clients--;
    this.#wakeSlots();
    if (this.#stopping) {
      if (this.#clients === 0) this.#resolveDone();
      return;
    }
    if (end.negotiated && !this.#options.persistent && this.#clients === 0) this.stop();
  }
}
