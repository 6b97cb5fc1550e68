/**
 * Worker side of the inflate pool: decompresses one deflate cluster per message, off the server's
 * event loop. Messages: `{ id, src: Uint8Array, size }` in, `{ id, out: Uint8Array | null }` back.
 *
 * @module
 */

import { decompressCluster } from "./compressed.ts";

interface Job {
  readonly id: number;
  readonly type: number;
  readonly src: Uint8Array;
  readonly size: number;
}

const scope = self as unknown as {
  onmessage: ((e: MessageEvent<Job>) => void) | null;
  postMessage(msg: unknown, transfer: Transferable[]): void;
};

scope.onmessage = (e: MessageEvent<Job>) => {
  const { id, type, src, size } = e.data;
  const out = decompressCluster(type, src, size);
  scope.postMessage({ id, out }, out === null ? [] : [out.buffer as ArrayBuffer]);
};
