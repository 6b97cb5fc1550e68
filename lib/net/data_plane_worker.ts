/**
 * One data-plane thread (a Worker; see data_plane.ts): opens its own copy of a shareable
 * export's block stack, then serves the connections the main thread hands it over its own
 * readiness loop, and reports each session's end.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { openExportStack } from "../block/stack.ts";
import type { BlockDevice } from "../block/types.ts";
import { describeServedExport, serverTls } from "../server.ts";
import { createObjects } from "../objects/registry.ts";
import type { SessionOptions } from "../nbd/session.ts";
import { PROGRAM } from "../cli/errors.ts";
import { closeSocket } from "../../ffi/socket.ts";
import type { MainMessage, WorkerMessage } from "./data_plane.ts";
import { LocalHost } from "./local_host.ts";
import { ReadinessLoop } from "./readiness.ts";

let device: BlockDevice | undefined;
let host: LocalHost | undefined;
let loop: ReadinessLoop | undefined;
const sessions = new Set<Promise<unknown>>();

function post(m: WorkerMessage): void {
  self.postMessage(m);
}

self.onmessage = async (e: MessageEvent<MainMessage>) => {
  const m = e.data;
  switch (m.kind) {
    case "init": {
      const options = m.options;
      try {
        // The main thread printed the open's warnings already.
        const opened = await openExportStack(options, () => {});
        device = opened.device;
        const exp = describeServedExport(device, options);
        loop = new ReadinessLoop();
        // TLS credentials are GnuTLS objects of this thread: rebuilt from the --object texts.
        const objects = options.tlsCreds === undefined ? undefined : createObjects(options.objects);
        const session: SessionOptions = {
          export: exp,
          device,
          handshakeLimit: options.handshakeLimit,
          report: (msg) => console.error(`${PROGRAM}: ${msg}`),
          tls: serverTls(options, objects, loop),
        };
        host = new LocalHost(session, loop);
        post({ kind: "ready" });
      } catch (err) {
        post({ kind: "failed", message: err instanceof Error ? err.message : String(err) });
      }
      return;
    }
    case "conn": {
      if (host === undefined) {
        closeSocket(m.fd);
        post({ kind: "end", id: m.id, negotiated: false });
        return;
      }
      const p = host.serve(m.fd, m.tcp).then(
        (end) => post({ kind: "end", id: m.id, negotiated: end.negotiated }),
        () => post({ kind: "end", id: m.id, negotiated: false }),
      );
      sessions.add(p);
      void p.finally(() => sessions.delete(p));
      return;
    }
    case "stop":
      host?.closeAll();
      return;
    case "close":
      host?.closeAll();
      await Promise.all(sessions);
      await device?.close().catch(() => {});
      await loop?.close();
      post({ kind: "closed" });
      return;
  }
};
