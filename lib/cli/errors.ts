/**
 * The one error type of the command-line layer.
 *
 * @module
 */

/**
 * Program name used in messages. qemu-nbd prints the base name of `argv[0]`, and scripts (QEMU's
 * iotests among them) match on it: a compiled denbd started as `qemu-nbd` says "qemu-nbd". Under
 * `deno run`, argv[0] is Deno itself, so a wrapper names the program in `DENBD_PROGNAME`.
 */
export const PROGRAM = programName();

function programName(): string {
  try {
    const given = Deno.env.get("DENBD_PROGNAME");
    if (given) return given;
    if (!/(^|\/)deno$/.test(Deno.execPath())) {
      const argv0 = Deno.readTextFileSync("/proc/self/cmdline").split("\0")[0] ?? "";
      const base = argv0.slice(argv0.lastIndexOf("/") + 1);
      if (base !== "") return base;
    }
  } catch { /* no permission or no /proc: the default name */ }
  return "denbd";
}

/** The second line qemu-nbd prints after a getopt error and after "Invalid number of arguments". */
export const TRY_HELP = `Try \`${PROGRAM} --help' for more information.`;

/**
 * A command line qemu-nbd 7.2 would reject. `message` is what follows the "denbd: " prefix on the
 * first line; `hint` holds any further lines exactly as they are printed (prefix included where
 * qemu-nbd prints one). Use {@linkcode formatCliError} to get the whole stderr text; exit status 1.
 */
export class CliError extends Error {
  /** Further lines, printed as they are after the first one (no trailing newline). */
  readonly hint: string | undefined;
  /** A file (or "FILE:LINE") the message is about: qemu prints "denbd:FILE: message". */
  readonly location: string | undefined;

  constructor(message: string, hint?: string, location?: string) {
    super(message);
    this.name = "CliError";
    this.hint = hint;
    this.location = location;
  }
}

/** Everything qemu-nbd would write to stderr for this error, ending in a newline. */
export function formatCliError(err: CliError): string {
  const where = err.location === undefined ? "" : `:${err.location}`;
  return `${PROGRAM}${where}: ${err.message}\n` + (err.hint === undefined ? "" : `${err.hint}\n`);
}
