/**
 * Serve mode: options → block stack → listener, with qemu-nbd's lifecycle (pid file after the
 * socket is listening, --fork readiness, SIGTERM/SIGINT shut down cleanly, exit when the last
 * client leaves unless -t). SIGTERM, SIGINT and SIGHUP stop accepting, let in-flight requests finish,
 * flush and close the image (qcow2 dirty bit, bitmaps), remove the unix socket and exit 0, as
 * qemu-nbd does.
 *
 * @module
 */

import type { ServerOptions } from "./cli/options.ts";
import { openExportStack } from "./block/stack.ts";
import type { BlockDevice } from "./block/types.ts";
import type { ExportDescriptor } from "./nbd/handshake.ts";
import { describeExport, resolveExportBitmaps } from "./nbd/export.ts";
import { PROGRAM } from "./cli/errors.ts";
import { startTracing } from "./trace/trace_option.ts";
import type { ListenAddress } from "./net/address.ts";
import { type ConnectionHost, NbdListener } from "./net/listener.ts";
import { removeSocketFile } from "./net/listen.ts";
import { LocalHost } from "./net/local_host.ts";
import { DataPlane, threadCount, threadShareable } from "./net/data_plane.ts";
import { ReadinessLoop } from "./net/readiness.ts";
import { FIRST_ACTIVATION_FD } from "./cli/socket_activation.ts";
import type { ObjectLookup } from "./objects/types.ts";
import type { TlsUpgrade } from "./nbd/session.ts";
import { serverCredentials, serverTlsUpgrade } from "./tls/server_tls.ts";
import { attachDevice, type AttachedDevice } from "./kernel/device_client.ts";
import { DeviceError } from "./kernel/nbd_device.ts";

/** How the server talks to the outside world (stderr, readiness for --fork). */
export interface ServerIo {
  /** Error and warning output (stderr). */
  readonly error: (msg: string) => void;
  /**
   * Called once the socket is listening, or with -c once the device is connected (the --fork
   * child tells its parent).
   */
  readonly ready?: () => void;
}

/** Where qemu-nbd -c listens when -k does not say (its SOCKET_PATH). */
export function deviceSocketPath(device: string): string {
  return `/var/lock/qemu-nbd-${device.slice(device.lastIndexOf("/") + 1)}`;
}

/** How long -c waits for a data-plane thread before binding the device anyway. */
const DATA_PLANE_START_WAIT_MS = 10_000;

/**
 * Run the server until it stops; returns the process exit code. `objects` are the --object
 * objects the command line created (TLS credentials, authorization).
 */
export async function runServer(
  options: ServerOptions,
  io: ServerIo,
  objects?: ObjectLookup,
): Promise<number> {
  // -T: qemu-nbd opens its trace log file before it opens the image.
  startTracing(options.trace);
  // qemu-nbd's error_report(): printed with or without -v; the rest are -T trace points.
  const report = (msg: string) => io.error(`${PROGRAM}: ${msg}`);
  const opened = await openExportStack(options, io.error, objects);
  const device = opened.device;
  let bitmaps: ReturnType<typeof resolveExportBitmaps>;
  try {
    // qemu-nbd serves -o/size through a raw node above the image, and its bitmap lookup does
    // not pass that node: every -B name is then "not found".
    const view = options.image.offset !== 0 || options.image.size !== undefined;
    bitmaps = resolveExportBitmaps(view ? {} : device, options.bitmaps);
  } catch (e) {
    await device.close();
    throw e;
  }
  const exp = describeServedExport(device, options);
  const address: ListenAddress = options.activation > 0
    ? { transport: "fd", fd: FIRST_ACTIVATION_FD }
    : options.socket !== undefined
    ? { transport: "unix", path: options.socket }
    : options.connect !== undefined
    ? { transport: "unix", path: deviceSocketPath(options.connect) }
    : { transport: "tcp", hostname: options.bind, port: options.port };
  // qemu unlinks an existing socket file before binding.
  if (address.transport === "unix") removeSocketFile(address.path);

  const loop = new ReadinessLoop();
  const local = new LocalHost(
    {
      export: exp,
      device,
      bitmaps,
      handshakeLimit: options.handshakeLimit,
      report,
      tls: serverTls(options, objects, loop),
    },
    loop,
  );
  let listener: NbdListener;
  let plane: DataPlane | undefined;
  try {
    // Connections go to the data-plane threads once one is ready; until then, and for exports
    // with a single owner, they are served here (data_plane.ts says why).
    const threads = threadShareable(options, opened.format) ? threadCount() : 0;
    listener = new NbdListener({
      address,
      shared: options.shared,
      persistent: options.persistent,
      loop,
      host: (): ConnectionHost => plane?.ready ? plane : local,
    });
    if (threads > 0) plane = new DataPlane(threads, options);
  } catch (e) {
    await loop.close();
    await device.close();
    throw e;
  }

  if (options.pidFile !== undefined) Deno.writeTextFileSync(options.pidFile, `${Deno.pid}\n`);

  const onSignal = () => listener.stop();
  const signals: Deno.Signal[] = ["SIGTERM", "SIGINT", "SIGHUP"];
  for (const s of signals) Deno.addSignalListener(s, onSignal);
  let exitCode = 0;
  let attached: AttachedDevice | undefined;
  try {
    if (options.connect !== undefined && address.transport === "unix") {
      // The kernel's connection comes at once: let it reach a data-plane thread (raw images),
      // not the main thread that would otherwise serve it for as long as the device is bound.
      await plane?.whenReady(DATA_PLANE_START_WAIT_MS);
      attached = await connectDevice(options, options.connect, address.path, loop, io, report);
      if (attached === undefined) {
        exitCode = 1;
        listener.stop();
      } else if (attached.done !== undefined) {
        // qemu-nbd's client thread ends the server once the device is disconnected.
        void attached.done.then((ok) => {
          if (!ok) exitCode = 1;
          listener.stop();
        });
      }
    } else {
      io.ready?.();
    }
    await listener.done;
    // Closing the connections ends NBD_DO_IT; let the device be cleared before exiting.
    if (attached?.done !== undefined) await boundedWait(attached.done, DEVICE_CLEAR_WAIT_MS);
  } finally {
    // The signal listeners stay until the device is closed: a SIGTERM during the shutdown must
    // not kill the process before the image's last metadata write (qed's clean header).
    await plane?.shutdown();
    await loop.close();
    try {
      await device.flush();
    } catch (e) {
      io.error(`flush at exit failed: ${e instanceof Error ? e.message : e}`);
    }
    try {
      await device.close();
    } finally {
      for (const s of signals) Deno.removeSignalListener(s, onSignal);
    }
    // The listener removed the unix socket when it stopped; the pid file stays, as qemu-nbd
    // leaves it.
  }
  return exitCode;
}

/** How long exit waits for the kernel to let go of a -c device. */
const DEVICE_CLEAR_WAIT_MS = 5000;

async function boundedWait(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([p, new Promise((resolve) => timer = setTimeout(resolve, ms))]);
  clearTimeout(timer);
}

/**
 * -c: bind the device to the server we just started. On failure the reason is reported in
 * qemu-nbd's words (a hint on the next line where denbd has one) and undefined returned.
 */
async function connectDevice(
  options: ServerOptions,
  device: string,
  socket: string,
  loop: ReadinessLoop,
  io: ServerIo,
  report: (msg: string) => void,
): Promise<AttachedDevice | undefined> {
  try {
    const attached = await attachDevice({
      device,
      socket,
      loop,
      connections: options.connections,
      deadConnTimeout: options.deadConnTimeout,
    });
    if (options.verbose) {
      io.error(`NBD device ${device} is now connected to ${options.file}`);
    }
    io.ready?.();
    return attached;
  } catch (e) {
    report(e instanceof Error ? e.message : String(e));
    if (e instanceof DeviceError && e.hint !== undefined) io.error(e.hint);
    return undefined;
  }
}

/** What the handshake advertises for the export the options name (here and in data threads). */
export function describeServedExport(
  device: BlockDevice,
  options: ServerOptions,
): ExportDescriptor {
  return describeExport(device, {
    name: options.exportName,
    description: options.description,
    shared: options.shared,
    allocationDepth: options.allocationDepth,
    bitmaps: options.bitmaps,
  });
}

/** The STARTTLS upgrade --tls-creds asks for, over `loop` (here and in data threads). */
export function serverTls(
  options: ServerOptions,
  objects: ObjectLookup | undefined,
  loop: ReadinessLoop,
): TlsUpgrade | undefined {
  if (options.tlsCreds === undefined) return undefined;
  if (objects === undefined) throw new Error("--tls-creds needs the --object objects");
  return serverTlsUpgrade(
    serverCredentials(objects, options.tlsCreds),
    objects,
    options.tlsAuthz,
    loop,
  );
}
