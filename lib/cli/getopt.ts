/**
 * A getopt_long work-alike (glibc semantics, argument permutation on): clustered short flags,
 * attached or separate option values (a value may start with '-'), `--name=value` and
 * `--name value`, unambiguous long-name prefixes, `--` ending the options, and options after
 * positional arguments. Errors carry glibc's wording.
 *
 * @module
 */

import { CliError, PROGRAM, TRY_HELP } from "./errors.ts";

/** One option: its long name, optional one-letter short name, and whether it takes a value. */
export interface OptionSpec<Id extends string = string> {
  readonly id: Id;
  readonly long: string;
  readonly short?: string;
  readonly hasArg: boolean;
  /**
   * Options outside qemu-nbd 7.2's table: matched by prefix only when no 7.2 option matches, so
   * every abbreviation qemu-nbd 7.2 accepts keeps its meaning.
   */
  readonly extension?: boolean;
}

/** One option occurrence, in command-line order. */
export interface OptionHit<Id extends string = string> {
  readonly spec: OptionSpec<Id>;
  readonly value: string | undefined;
}

function usageError(message: string): CliError {
  return new CliError(message, `${PROGRAM}: ${TRY_HELP}`);
}

/**
 * Walks `argv` like getopt_long: yields each option in order (so the caller can act on it, and
 * stop, before later options are even looked at) and returns the positional arguments.
 * Throws {@linkcode CliError} with glibc's message on a malformed option.
 */
export function* getopt<Id extends string>(
  argv: readonly string[],
  specs: readonly OptionSpec<Id>[],
): Generator<OptionHit<Id>, string[], void> {
  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === "--") {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      const name = eq < 0 ? arg.slice(2) : arg.slice(2, eq);
      const spec = findLong(arg, name, specs);
      if (spec.hasArg) {
        if (eq >= 0) {
          yield { spec, value: arg.slice(eq + 1) };
        } else if (i + 1 < argv.length) {
          yield { spec, value: argv[++i] };
        } else {
          throw usageError(`option '--${spec.long}' requires an argument`);
        }
      } else if (eq >= 0) {
        throw usageError(`option '--${spec.long}' doesn't allow an argument`);
      } else {
        yield { spec, value: undefined };
      }
      continue;
    }
    if (arg.startsWith("-") && arg.length > 1) {
      for (let j = 1; j < arg.length; j++) {
        const letter = arg[j] as string;
        const spec = specs.find((s) => s.short === letter);
        if (spec === undefined) throw usageError(`invalid option -- '${letter}'`);
        if (!spec.hasArg) {
          yield { spec, value: undefined };
          continue;
        }
        if (j + 1 < arg.length) {
          yield { spec, value: arg.slice(j + 1) };
        } else if (i + 1 < argv.length) {
          yield { spec, value: argv[++i] };
        } else {
          throw usageError(`option requires an argument -- '${letter}'`);
        }
        break;
      }
      continue;
    }
    positionals.push(arg); // permutation: keep scanning for options after it
  }
  return positionals;
}

/** Exact name first, then a unique prefix (7.2 options before extensions). */
function findLong<Id extends string>(
  arg: string,
  name: string,
  specs: readonly OptionSpec<Id>[],
): OptionSpec<Id> {
  const exact = specs.find((s) => s.long === name);
  if (exact !== undefined) return exact;
  for (const group of [specs.filter((s) => !s.extension), specs.filter((s) => s.extension)]) {
    const matches = group.filter((s) => s.long.startsWith(name));
    if (matches.length === 1) return matches[0] as OptionSpec<Id>;
    if (matches.length > 1) {
      const list = matches.map((s) => `'--${s.long}'`).join(" ");
      throw usageError(`option '${arg}' is ambiguous; possibilities: ${list}`);
    }
  }
  throw usageError(`unrecognized option '${arg}'`);
}
