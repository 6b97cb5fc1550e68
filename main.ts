/**
 * denbd: serve a disk image over NBD with qemu-nbd's command line.
 *
 * Only wiring here: command line → serve mode (lib/server.ts). `--fork` re-runs this program
 * in the background (Deno cannot fork) and returns once the child is listening.
 *
 * @module
 */

import { CliError, formatCliError } from "./lib/cli/errors.ts";
import { parseCommandLine, unsupportedOptions } from "./lib/cli/parse.ts";
import type { ServerOptions } from "./lib/cli/options.ts";
import { runServer } from "./lib/server.ts";

const PROGRAM = "denbd";
/** Set in the --fork child: it reports readiness on stdout and then stays quiet there. */
const FORK_CHILD_ENV = "DENBD_FORK_CHILD";
/** The permissions denbd runs with (the same set as `deno task start` and `deno task compile`). */
const PERMISSIONS = [
  "--allow-read",
  "--allow-write",
  "--allow-net",
  "--allow-ffi",
  "--allow-env",
  "--allow-run",
];

function printError(msg: string): void {
  console.error(`${PROGRAM}: ${msg}`);
}

async function main(args: string[]): Promise<number> {
  let command;
  try {
    command = parseCommandLine(args);
  } catch (e) {
    if (e instanceof CliError) {
      console.error(formatCliError(e));
      return 1;
    }
    throw e;
  }
  switch (command.kind) {
    case "help":
    case "version":
      console.log(command.text);
      return 0;
    case "serve":
      break;
  }
  const options = command.options;
  const unsupported = unsupportedOptions(options);
  if (unsupported.length > 0) {
    for (const msg of unsupported) printError(msg);
    return 1;
  }
  if (options.fork) return await forkServer(args);
  const forkChild = Deno.env.get(FORK_CHILD_ENV) === "1";
  try {
    return await runServer(options, {
      error: (msg) => console.error(msg),
      ready: forkChild ? signalReady : undefined,
    });
  } catch (e) {
    printError(describeStartError(e, options));
    return 1;
  }
}

function describeStartError(e: unknown, options: ServerOptions): string {
  const msg = e instanceof Error ? e.message : String(e);
  if (e instanceof Deno.errors.AddrInUse) {
    const where = options.socket ?? `${options.bind}:${options.port}`;
    return `Failed to bind socket to ${where}: Address already in use`;
  }
  return msg;
}

/** In the --fork child: tell the parent we are listening, then detach stdout. */
function signalReady(): void {
  Deno.stdout.writeSync(new TextEncoder().encode("ready\n"));
  try {
    Deno.stdout.close();
  } catch { /* parent already gone */ }
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
      ? ["run", ...PERMISSIONS, new URL(import.meta.url).pathname, ...childArgs]
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
