/**
 * `deno task demo`: create a sparse 1 GiB raw image with a little data in it, serve it with
 * denbd on a unix socket and on 127.0.0.1, and print the URIs and client commands to try.
 * Ctrl-C stops it.
 *
 * @module
 */

import { DENBD_PERMISSIONS } from "../lib/permissions.ts";

const dir = await Deno.makeTempDir({ prefix: "denbd-demo-" });
const image = `${dir}/demo.img`;
const file = await Deno.create(image);
await file.truncate(1024 * 1024 * 1024);
// A recognisable pattern at 1 MiB and at 512 MiB; everything else is a hole.
const pattern = new TextEncoder().encode("hello from denbd\n".repeat(4096));
await file.seek(1024 * 1024, Deno.SeekMode.Start);
await file.write(pattern);
await file.seek(512 * 1024 * 1024, Deno.SeekMode.Start);
await file.write(pattern);
file.close();

const port = Number(Deno.env.get("DENBD_DEMO_PORT") ?? "10809");
const main = new URL("../main.ts", import.meta.url).pathname;
const server = new Deno.Command(Deno.execPath(), {
  args: [
    "run",
    ...DENBD_PERMISSIONS,
    main,
    "-f",
    "raw",
    "-t",
    "-e",
    "0",
    "-b",
    "127.0.0.1",
    "-p",
    String(port),
    "-x",
    "demo",
    "-D",
    "denbd demo image",
    image,
  ],
}).spawn();

console.log(`Serving ${image} (1 GiB, sparse) as export 'demo'.
  URI: nbd://127.0.0.1:${port}/demo

Try, from another terminal:
  nbdinfo nbd://127.0.0.1:${port}/demo
  nbdinfo --map nbd://127.0.0.1:${port}/demo
  qemu-img map --output=json -f raw nbd://127.0.0.1:${port}/demo
  qemu-io -f raw -c 'read -v 1M 64' nbd://127.0.0.1:${port}/demo
  nbdcopy nbd://127.0.0.1:${port}/demo copy.img

Ctrl-C stops the server and removes ${dir}.`);

const stop = () => {
  try {
    server.kill("SIGTERM");
  } catch { /* already gone */ }
};
Deno.addSignalListener("SIGINT", stop);
Deno.addSignalListener("SIGTERM", stop);
const status = await server.status;
await Deno.remove(dir, { recursive: true });
Deno.exit(status.success || status.signal === "SIGTERM" ? 0 : status.code);
