/**
 * Accepts clients on a TCP or unix socket and runs a session for each, with qemu-nbd's
 * lifecycle: at most `shared` clients at once (0 = unlimited; further clients wait in the
 * backlog), and without `persistent` the server stops once a client that completed negotiation
 * disconnects and no other client remains.
 *
 * @module
 */

import { serveConnection, type SessionOptions } from "./session.ts";
import { denbd_accept_failed } from "../trace/events.ts";

export type ListenAddress =
  | { readonly transport: "tcp"; readonly hostname: string; readonly port: number }
  | { readonly transport: "unix"; readonly path: string };

export interface ListenerOptions {
  readonly address: ListenAddress;
  readonly shared: number;
  readonly persistent: boolean;
  readonly session: SessionOptions;
}

/** A running server: `done` resolves when it stops (last client gone, or `stop()`). */
export class NbdListener {
  readonly #listener: Deno.Listener;
  readonly #options: ListenerOptions;
  readonly #conns = new Set<Deno.Conn>();
  #stopping = false;
  #slot: (() => void) | undefined;
  #resolveDone!: () => void;
  /** Resolves once the server has stopped and every session has ended. */
  readonly done: Promise<void>;

  constructor(options: ListenerOptions) {
    this.#options = options;
    const a = options.address;
    this.#listener = a.transport === "unix"
      ? Deno.listen({ transport: "unix", path: a.path })
      : Deno.listen({ transport: "tcp", hostname: a.hostname, port: a.port });
    this.done = new Promise((resolve) => this.#resolveDone = resolve);
    void this.#acceptLoop();
  }

  /** The bound address (the real port when 0 was asked). */
  get addr(): Deno.Addr {
    return this.#listener.addr;
  }

  /** Stop accepting and close every client connection. */
  stop(): void {
    if (this.#stopping) return;
    this.#stopping = true;
    try {
      this.#listener.close();
    } catch { /* already closed */ }
    for (const c of this.#conns) {
      try {
        c.close();
      } catch { /* already closed */ }
    }
    this.#slot?.();
    if (this.#conns.size === 0) this.#resolveDone();
  }

  async #acceptLoop(): Promise<void> {
    const limit = this.#options.shared;
    while (!this.#stopping) {
      if (limit > 0 && this.#conns.size >= limit) {
        await new Promise<void>((resolve) => this.#slot = resolve);
        this.#slot = undefined;
        continue;
      }
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch (e) {
        if (!this.#stopping && denbd_accept_failed.on) {
          denbd_accept_failed.emit(e instanceof Error ? e.message : String(e));
        }
        break;
      }
      if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
      this.#conns.add(conn);
      void this.#serve(conn);
    }
  }

  async #serve(conn: Deno.Conn): Promise<void> {
    const end = await serveConnection(conn, this.#options.session);
    this.#conns.delete(conn);
    const wake = this.#slot;
    this.#slot = undefined;
    wake?.();
    if (this.#stopping) {
      if (this.#conns.size === 0) this.#resolveDone();
      return;
    }
    if (end.negotiated && !this.#options.persistent && this.#conns.size === 0) this.stop();
  }
}
