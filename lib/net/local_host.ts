/**
 * Connections served on this thread, over its readiness loop: every connection of an export
 * whose device has one owner (see data_plane.ts), and any connection when no data-plane thread
 * is running.
 *
 * @module
 */

import { serveConnection, type SessionEnd, type SessionOptions } from "../nbd/session.ts";
import { FdConn } from "./fd_conn.ts";
import type { ConnectionHost } from "./listener.ts";
import type { ReadinessLoop } from "./readiness.ts";

export class LocalHost implements ConnectionHost {
  readonly #session: SessionOptions;
  readonly #loop: ReadinessLoop;
  readonly #conns = new Set<FdConn>();

  constructor(session: SessionOptions, loop: ReadinessLoop) {
    this.#session = session;
    this.#loop = loop;
  }

  async serve(fd: number, tcp: boolean): Promise<SessionEnd> {
    const conn = new FdConn(fd, this.#loop, { tcp });
    this.#conns.add(conn);
    try {
      return await serveConnection(conn, this.#session);
    } finally {
      this.#conns.delete(conn);
      conn.close();
    }
  }

  closeAll(): void {
    for (const c of this.#conns) c.close();
  }
}
