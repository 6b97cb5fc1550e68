/**
 * denbd: serve a disk image over NBD with qemu-nbd's command line.
 *
 * Only wiring here: command line → serve mode (lib/server.ts), `-L` and `-d`. `--fork`, and
 * `-c` without `-v` as in qemu-nbd, re-run this program in the background (Deno cannot fork) and
 * return once the child is listening (with -c: once the device is connected).
 *
 * @module
 */

import { CliError, formatCliError, PROGRAM } from "./lib/cli/errors.ts";
import { parseCommandLine, unsupportedOptions } from "./lib/cli/parse.ts";
import type { ServerOptions } from "./lib/cli/options.ts";
import { runServer } from "./lib/server.ts";
import { formatExportList, listExports } from "./lib/nbd/list_client.ts";
import type { ObjectLookup } from "./lib/objects/types.ts";
import type { TlsCredentials } from "./lib/tls/creds.ts";
import { libc, O_RDWR, openFile } from "./ffi/libc.ts";
import { DENBD_PERMISSIONS } from "./lib/permissions.ts";
import { systemNbdOps } from "./ffi/nbd_ioctl.ts";
import { DeviceError, disconnectDevice } from "./lib/kernel/nbd_device.ts";

/** Set in the --fork child: it reports readiness on stdout and then stays quiet there. */
const FORK_CHILD_ENV = "DENBD_FORK_CHILD";

function printError(msg: string): void {
  console.error(`${PROGRAM}: ${msg}`);
}

async function main(args: string[]): Promise<number> {
  let command;
  try {
    command = parseCommandLine(args);
  } catch (e) {
    if (e instanceof CliError) {
      Deno.stderr.writeSync(new TextEncoder().encode(formatCliError(e)));
      return 1;
    }
    throw e;
  }
  switch (command.kind) {
    case "help":
      console.log(command.text);
      return command.exitCode ?? 0;
    case "version":
      console.log(command.text);
      return 0;
    case "serve":
      break;
  }
  const options = command.options;
  if (options.list) return await listMode(options, command.objects);
  if (options.disconnect) return disconnectMode(options.file!);
  const unsupported = unsupportedOptions(options);
  if (unsupported.length > 0) {
    for (const msg of unsupported) printError(msg);
    return 1;
  }
  const forkChild = Deno.env.get(FORK_CHILD_ENV) === "1";
  // qemu-nbd -c without -v goes to the background too, once the device is connected.
  if (!forkChild && (options.fork || (options.connect !== undefined && !options.verbose))) {
    if (options.activation > 0) {
      // The background child is a new process: the inherited socket cannot follow it.
      printError("--fork with socket activation is not supported yet");
      return 1;
    }
    return await forkServer(args);
  }
  try {
    return await runServer(options, {
      error: (msg) => console.error(msg),
      ready: forkChild ? signalReady : undefined,
    }, command.objects);
  } catch (e) {
    printError(describeStartError(e));
    return 1;
  }
}

/** -d: disconnect the device (qemu's nbd_disconnect) and say so on stdout. */
function disconnectMode(device: string): number {
  try {
    disconnectDevice(systemNbdOps(), device);
  } catch (e) {
    printError(describeStartError(e));
    if (e instanceof DeviceError && e.hint !== undefined) console.error(e.hint);
    return 1;
  }
  console.log(`${device} disconnected`);
  return 0;
}

function describeStartError(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** -L: list the exports of a running server (unix socket with -k, else TCP -b/-p). */
async function listMode(options: ServerOptions, objects: ObjectLookup): Promise<number> {
  const address = options.socket !== undefined
    ? { transport: "unix" as const, path: options.socket }
    : { transport: "tcp" as const, hostname: options.bind, port: options.port };
  try {
    // The server's certificate must name --tls-hostname, else the -b address (none for -k).
    const tls = options.tlsCreds === undefined ? undefined : {
      creds: objects.get(options.tlsCreds)!.value as TlsCredentials,
      hostname: options.tlsHostname ??
        (options.socket === undefined ? options.bind : undefined),
    };
    const text = formatExportList(await listExports(address, tls));
    await Deno.stdout.write(new TextEncoder().encode(text));
    return 0;
  } catch (e) {
    printError(e instanceof Error ? e.message : String(e));
    return 1;
  }
}

/**
 * Descriptors that refer to our standard streams: 0-2 and the copies Deno's runtime keeps of
 * them (it duplicates stdio at start-up), recognised by device and inode, plus any pipe.
 */
function stdioDescriptors(): number[] {
  const st = new Uint8Array(144);
  const v = new DataView(st.buffer);
  const identity = (fd: number): { id: string; fifo: boolean } | undefined => {
    if (libc().fstat(fd, st) !== 0) return undefined;
    const mode = v.getUint32(24, true);
    return {
      id: `${v.getBigUint64(0, true)}:${v.getBigUint64(8, true)}`,
      fifo: (mode & 0o170000) === 0o010000,
    };
  };
  const stdio = new Set([0, 1, 2].map(identity).filter((i) => i !== undefined).map((i) => i!.id));
  const out = [0, 1, 2];
  for (let fd = 3; fd < 1024; fd++) {
    const i = identity(fd);
    if (i !== undefined && (i.fifo || stdio.has(i.id))) out.push(fd);
  }
  return out;
}

/**
 * In the --fork child: tell the parent we are listening, then point stdin, stdout and stderr at
 * /dev/null as qemu-nbd's daemon does, so a caller capturing our output is not held open.
 */
function signalReady(): void {
  Deno.stdout.writeSync(new TextEncoder().encode("ready\n"));
  try {
    const fd = openFile("/dev/null", O_RDWR);
    for (const target of stdioDescriptors()) if (target !== fd) libc().dup2(fd, target);
    libc().close(fd);
  } catch { /* keep the descriptors we have */ }
}

/**
 * --fork: start the same command without --fork as a background process and return once it is
 * listening (exit 0), or with its exit status if it fails first (its errors go to our stderr).
 */
async function forkServer(args: string[]): Promise<number> {
  const childArgs = args.filter((a) => a !== "--fork");
  const self = Deno.execPath();
  const viaDeno = /(^|\/)deno$/.test(self);
  const cmd = new Deno.Command(self, {
    args: viaDeno
      ? ["run", ...DENBD_PERMISSIONS, new URL(import.meta.url).pathname, ...childArgs]
      : childArgs,
    env: { [FORK_CHILD_ENV]: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  });
  const child = cmd.spawn();
  const reader = child.stdout.getReader();
  let seen = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    seen += new TextDecoder().decode(value);
    if (seen.includes("ready\n")) {
      reader.releaseLock();
      child.unref();
      return 0;
    }
  }
  const status = await child.status;
  return status.code === 0 ? 1 : status.code;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
