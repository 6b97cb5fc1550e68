/**
 * Data-plane threads: a fixed set of Workers, each with its own readiness loop, its own copy of
 * the export's block stack and many connections. The main thread accepts and hands each socket
 * (a descriptor number: descriptors are process-wide) to the least busy thread.
 *
 * ## One point of reference
 * With CAN_MULTI_CONN advertised, what one connection wrote must be visible to every other
 * after a flush. This module enforces the rule that makes that true:
 * - An export whose device keeps no state of its own above the kernel is **shareable**: a plain
 *   raw file (with the offset/size window and the option filters, which are stateless). Each
 *   thread opens its own stack over the same file; the kernel's page cache is the one point of
 *   reference, so every read on any thread sees every completed write, and FLUSH (fdatasync) on
 *   any descriptor of the file makes all of them durable.
 * - Every other device -- qcow2 (L2/refcount caches, allocation), `-s` overlays, protocol
 *   drivers (nbd, http), bitmaps -- has exactly **one owner**, the main thread, and all of its
 *   connections are served there ({@link threadShareable} says which is which).
 * - `-T` also keeps connections on the main thread, so the trace stays one ordered stream.
 *
 * @module
 */

import type { ImageFormat, ServerOptions } from "../cli/options.ts";
import type { SessionEnd } from "../nbd/session.ts";
import type { ConnectionHost } from "./listener.ts";
import { closeSocket } from "../../ffi/socket.ts";

/** Environment variable choosing the number of data-plane threads (0: serve on the main thread). */
export const THREADS_ENV = "DENBD_THREADS";

/** What a data-plane thread needs to open its own copy of the export. */
export interface WorkerInit {
  readonly kind: "init";
  readonly options: ServerOptions;
}

/** Messages from a data-plane thread. */
export type WorkerMessage =
  | { readonly kind: "ready" }
  | { readonly kind: "failed"; readonly message: string }
  | { readonly kind: "end"; readonly id: number; readonly negotiated: boolean }
  | { readonly kind: "closed" };

/** Messages to a data-plane thread. */
export type MainMessage =
  | WorkerInit
  | { readonly kind: "conn"; readonly id: number; readonly fd: number; readonly tcp: boolean }
  | { readonly kind: "stop" }
  | { readonly kind: "close" };

/**
 * Whether connections of this export may be served on any thread (see the module comment):
 * a raw image in a plain file, without -s, -B or -T.
 */
export function threadShareable(options: ServerOptions, format: ImageFormat): boolean {
  return format === "raw" && options.image.node === undefined && !options.snapshot &&
    options.bitmaps.length === 0 && options.trace.length === 0;
}

/**
 * How many data-plane threads to run: DENBD_THREADS, else one per core but one, the main
 * thread's (it accepts, and serves single-owner exports). Measured on 2 cores with the clients
 * on the same machine (`deno task bench`, 2026-12-02): one data thread matched or beat two on
 * every raw row (nbdcopy 4 connections: 3160 against 2800 MiB/s), since the clients need a core.
 */
export function threadCount(): number {
  const env = Deno.env.get(THREADS_ENV);
  if (env !== undefined && env !== "") {
    const n = Number(env);
    if (!Number.isInteger(n) || n < 0 || n > 256) {
      throw new Error(`${THREADS_ENV}=${env}: expected a thread count from 0 to 256`);
    }
    return n;
  }
  return Math.max(1, (navigator.hardwareConcurrency || 1) - 1);
}

interface Thread {
  readonly worker: Worker;
  readonly sessions: Map<number, (end: SessionEnd) => void>;
  ready: boolean;
  closed?: () => void;
}

/** The set of data-plane threads, as one connection host. */
export class DataPlane implements ConnectionHost {
  readonly #threads: Thread[] = [];
  #nextId = 1;
  #failed: string | undefined;
  /** whenReady callers, woken by the first ready thread or a failure. */
  #waiters: (() => void)[] = [];

  /** Start `count` threads opening the export described by `options`. */
  constructor(count: number, options: ServerOptions) {
    for (let i = 0; i < count; i++) {
      const worker = new Worker(new URL("./data_plane_worker.ts", import.meta.url), {
        type: "module",
        name: `denbd-data-${i}`,
      });
      const t: Thread = { worker, sessions: new Map(), ready: false };
      worker.onmessage = (e: MessageEvent<WorkerMessage>) => this.#onMessage(t, e.data);
      worker.onerror = (e) => {
        e.preventDefault();
        this.#failed ??= e.message;
        this.#wake();
        t.ready = false;
        for (const end of t.sessions.values()) end({ negotiated: false });
        t.sessions.clear();
        t.closed?.();
      };
      worker.postMessage({ kind: "init", options } satisfies MainMessage);
      this.#threads.push(t);
    }
  }

  /** Whether some thread is ready to take connections. */
  get ready(): boolean {
    return this.#threads.some((t) => t.ready);
  }

  /**
   * Resolves once a thread is ready, one failed, or `timeoutMs` passed: for a connection that
   * should not land on the main thread just because it came first (-c connects at once).
   */
  whenReady(timeoutMs: number): Promise<void> {
    if (this.ready || this.#failed !== undefined) return Promise.resolve();
    const { promise, resolve } = Promise.withResolvers<void>();
    const timer = setTimeout(resolve, timeoutMs);
    this.#waiters.push(() => {
      clearTimeout(timer);
      resolve();
    });
    return promise;
  }

  #wake(): void {
    const w = this.#waiters;
    this.#waiters = [];
    for (const f of w) f();
  }

  /** Why a thread could not start, if one failed (its connections go to the main thread). */
  get failure(): string | undefined {
    return this.#failed;
  }

  serve(fd: number, tcp: boolean): Promise<SessionEnd> {
    let best: Thread | undefined;
    for (const t of this.#threads) {
      if (t.ready && (best === undefined || t.sessions.size < best.sessions.size)) best = t;
    }
    if (best === undefined) {
      closeSocket(fd);
      return Promise.resolve({ negotiated: false });
    }
    const id = this.#nextId++;
    const { promise, resolve } = Promise.withResolvers<SessionEnd>();
    best.sessions.set(id, resolve);
    best.worker.postMessage({ kind: "conn", id, fd, tcp } satisfies MainMessage);
    return promise;
  }

  closeAll(): void {
    for (const t of this.#threads) t.worker.postMessage({ kind: "stop" } satisfies MainMessage);
  }

  /** Close every thread's device and end the threads (after their sessions ended). */
  async shutdown(): Promise<void> {
    await Promise.all(this.#threads.map((t) => {
      if (!t.ready) {
        t.worker.terminate();
        return Promise.resolve();
      }
      const { promise, resolve } = Promise.withResolvers<void>();
      t.closed = resolve;
      t.worker.postMessage({ kind: "close" } satisfies MainMessage);
      // A thread stuck in a system call must not keep the server from exiting.
      const timer = setTimeout(resolve, 5000);
      return promise.finally(() => {
        clearTimeout(timer);
        t.worker.terminate();
      });
    }));
  }

  #onMessage(t: Thread, m: WorkerMessage): void {
    switch (m.kind) {
      case "ready":
        t.ready = true;
        this.#wake();
        return;
      case "failed":
        this.#failed ??= m.message;
        this.#wake();
        return;
      case "end": {
        const end = t.sessions.get(m.id);
        t.sessions.delete(m.id);
        end?.({ negotiated: m.negotiated });
        return;
      }
      case "closed":
        t.ready = false;
        t.closed?.();
        return;
    }
  }
}
