/**
 * Origins of the remote formats: the one server that every server under test re-exports. An
 * `nbd-raw` origin is qemu-nbd on the raw master over a unix socket; `http-raw` and `http-qcow2`
 * are served by nginx on loopback (tests/interop/_nginx.ts) from a private directory holding the
 * master (hard link) or its qcow2 conversion. The `rbd` origin is a throwaway Ceph cluster
 * (tests/interop/_ceph.ts) in which every server gets its own import of the master, since rbd
 * rows write. An origin runs for all rows of its format, so every
 * server reads the very same origin; its CPU time is not counted to any server.
 *
 * @module
 */

import { startCeph } from "../../tests/interop/_ceph.ts";
import { startNginx } from "../../tests/interop/_nginx.ts";
import { prepareImage, warmPageCache } from "./images.ts";
import { NBD_ORIGIN_DEF, ServerHandle } from "./servers.ts";
import { FORMAT_INFO } from "./types.ts";
import type { ImageFormat } from "./types.ts";

/** A running origin. */
export interface Origin {
  /** What the servers under test open: an NBD URI or an HTTP URL. */
  readonly url: string;
  /** How it was started, for the report's notes. */
  readonly description: string;
  /** For origins whose servers write: a private image for server `id`, named as FILE. */
  privateImage?(id: string): Promise<string>;
  /** Stops the origin and removes its files (the master is kept). */
  stop(): Promise<void>;
}

/** Where an origin lives and what it serves. */
export interface OriginOptions {
  /** Work directory (sockets, logs, nginx's root). */
  readonly dir: string;
  /** The raw master image. */
  readonly master: string;
  /** How long the origin may take to accept a connection. */
  readonly timeoutMs: number;
}

/** Starts the origin of the remote `format`; throws with context when it cannot start. */
export async function startOrigin(format: ImageFormat, o: OriginOptions): Promise<Origin> {
  switch (FORMAT_INFO[format].remote) {
    case "nbd":
      return await startNbdOrigin(o);
    case "http":
      return await startHttpOrigin(format, o);
    case "rbd":
      return await startRbdOrigin(o);
    default:
      throw new Error(`${format} has no origin`);
  }
}

async function startNbdOrigin(o: OriginOptions): Promise<Origin> {
  const socket = `${o.dir}/origin.sock`;
  await warmPageCache(o.master);
  const h = await ServerHandle.start(
    NBD_ORIGIN_DEF,
    { socket, image: o.master, format: "raw" },
    { logFile: `${o.dir}/origin-qemu-nbd.log`, timeoutMs: o.timeoutMs },
  );
  if (h.failure) throw new Error(`NBD origin ${h.failure}`);
  return {
    url: `nbd+unix:///?socket=${socket}`,
    description: `\`${h.argv.join(" ")}\``,
    stop: () => h.stop(),
  };
}

async function startHttpOrigin(format: ImageFormat, o: OriginOptions): Promise<Origin> {
  const root = `${o.dir}/http`;
  await Deno.remove(root, { recursive: true }).catch(() => {});
  await Deno.mkdir(root, { recursive: true });
  const name = format === "http-qcow2" ? "disk.qcow2" : "disk.img";
  const file = `${root}/${name}`;
  if (format === "http-qcow2") await prepareImage(o.master, file, "qcow2");
  else await Deno.link(o.master, file); // Same bytes, no copy; nginx only reads it.
  await warmPageCache(file);
  const ngx = await startNginx({ root });
  return {
    url: ngx.url(`/${name}`),
    description: `nginx (1 worker, sendfile on) serving ${name} at ` +
      ngx.url(`/${name}`),
    stop: async () => {
      await ngx.stop();
      await Deno.remove(root, { recursive: true }).catch(() => {});
    },
  };
}

async function startRbdOrigin(o: OriginOptions): Promise<Origin> {
  const bytes = (await Deno.stat(o.master)).size;
  // Room for a copy per server (denbd and qemu-nbd, and extras) besides the OSD's own needs.
  const ceph = await startCeph({ memstoreBytes: Math.max(2 ** 30, 6 * bytes) });
  return {
    url: `rbd:rbd/bench:conf=${ceph.conf}`,
    description: "a Ceph cluster of one monitor and one memstore OSD on 127.0.0.1 " +
      "(tests/interop/_ceph.ts), each server's image an `rbd import` of the master",
    privateImage: async (id) => {
      await ceph.rbd("import", "--no-progress", o.master, `rbd/${id}`);
      return `rbd:rbd/${id}:conf=${ceph.conf}`;
    },
    stop: () => ceph.stop(),
  };
}
