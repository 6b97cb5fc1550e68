/**
 * `-T/--trace [[enable=]PATTERN][,events=FILE][,file=FILE]` as qemu-nbd 7.2 reads it: qemu's
 * option syntax (the first value without a key is `enable`, `,,` escapes a comma, a bare `flag`
 * means `flag=on` with a deprecation warning, a later key overrides an earlier one, `id=` is
 * checked and ignored), `help` or `?` as the pattern lists the events, an events file holds one
 * pattern per line (`#` comments; like qemu, the last character of every line is dropped, which
 * is the newline except on a last line without one). Each `-T` sets the log file anew, so only
 * the last `-T` decides it; a `%d` in its name becomes the process ID.
 *
 * `parseTraceOption` runs while the command line is parsed (warnings and errors at the point
 * qemu-nbd gives them); `startTracing` applies the same options when the server starts.
 *
 * @module
 */

import "./events.ts";
import { checkEnableLine, enableEvents, setTraceSink, traceEvents } from "./trace.ts";

/** A -T argument qemu-nbd rejects; `location` is the "FILE" or "FILE:LINE" qemu names. */
export class TraceOptionError extends Error {
  readonly location: string | undefined;
  readonly hint: string | undefined;

  constructor(message: string, options: { location?: string; hint?: string } = {}) {
    super(message);
    this.name = "TraceOptionError";
    this.location = options.location;
    this.hint = options.hint;
  }
}

/** What one -T asks for. */
export interface TraceRequest {
  /** `help`/`?` was given as a pattern: list the events and exit 0. */
  readonly listEvents: boolean;
  /** `,help` was given as a flag: describe the -T keys. */
  readonly describeOptions: boolean;
  /** Enable lines in order (the enable= pattern first, then the events file's lines). */
  readonly lines: readonly string[];
  /** The log file (undefined: stderr), as given. */
  readonly file: string | undefined;
}

/** Warning output: `location` is set for lines of an events file ("FILE:LINE"). */
export type TraceWarn = (message: string, location?: string) => void;

/** What `-T x,help` prints: the keys -T takes. */
export const TRACE_OPTIONS_HELP = "trace options:\n  enable=<str>\n  events=<str>\n  file=<str>";

const KEYS: ReadonlySet<string> = new Set(["enable", "events", "file"]);
const ID_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;

/** Parse one -T argument, reading its events file; warnings go to `warn`. */
export function parseTraceOption(arg: string, warn: TraceWarn = () => {}): TraceRequest {
  const parsed = parseQemuOpts(arg, warn);
  const none = { lines: [], file: undefined };
  if (parsed === "help") return { listEvents: false, describeOptions: true, ...none };
  const lines: string[] = [];
  const enable = parsed.get("enable");
  if (enable !== undefined) {
    if (isHelp(enable)) return { listEvents: true, describeOptions: false, ...none };
    const w = checkEnableLine(enable);
    if (w !== undefined) warn(w);
    lines.push(enable);
  }
  const events = parsed.get("events");
  if (events !== undefined) {
    for (const [line, lineNo] of readEventsFile(events)) {
      if (isHelp(line)) return { listEvents: true, describeOptions: false, ...none };
      const w = checkEnableLine(line);
      if (w !== undefined) warn(w, `${events}:${lineNo}`);
      lines.push(line);
    }
  }
  return { listEvents: false, describeOptions: false, lines, file: parsed.get("file") };
}

/** `-T help`: every trace point's name, one per line, in declaration order. */
export function traceEventList(): string {
  return traceEvents().map((e) => e.name).join("\n");
}

/**
 * The log file name with `%d` replaced by `pid`; throws qemu's "Bad logfile template" for any
 * other use of `%`.
 */
export function expandLogfileName(file: string, pid: number): string {
  const at = file.indexOf("%");
  if (at < 0) return file;
  if (file[at + 1] !== "d" || file.includes("%", at + 2)) {
    throw new TraceOptionError(`Bad logfile template: ${file}`);
  }
  return file.slice(0, at) + String(pid) + file.slice(at + 2);
}

/**
 * Server start: enable what the -T arguments ask for (in order) and open the last one's log
 * file. Throws "Error opening logfile ..." as qemu-nbd does when the file cannot be created.
 */
export function startTracing(args: readonly string[]): void {
  let file: string | undefined;
  for (const arg of args) {
    const req = parseTraceOption(arg);
    for (const line of req.lines) enableEvents(line);
    file = req.file;
  }
  if (file === undefined) return;
  const path = expandLogfileName(file, Deno.pid);
  try {
    setTraceSink(Deno.openSync(path, { write: true, create: true, truncate: true }));
  } catch (e) {
    throw new TraceOptionError(`Error opening logfile ${path}: ${osMessage(e)}`);
  }
}

function isHelp(s: string): boolean {
  return s === "help" || s === "?";
}

/**
 * qemu's option syntax for the "trace" list (implied key `enable`). Returns the last value of
 * each key, or "help" when a `help` flag asks for the key list.
 */
function parseQemuOpts(arg: string, warn: TraceWarn): Map<string, string> | "help" {
  const values = new Map<string, string>();
  const pairs: [string, string, boolean][] = []; // key, value, given as a bare flag
  let p = 0;
  let first = true;
  while (p < arg.length) {
    let len = 0;
    while (p + len < arg.length && arg[p + len] !== "=" && arg[p + len] !== ",") len++;
    if (arg[p + len] !== "=") {
      if (first) {
        const [value, next] = optValue(arg, p);
        pairs.push(["enable", value, false]);
        p = next;
      } else {
        const name = arg.slice(p, p + len);
        p += len;
        const [key, value] = name.startsWith("no") ? [name.slice(2), "off"] : [name, "on"];
        if (isHelp(key)) {
          // qemu stops at the help request; what follows is not looked at.
          return checkPairs(pairs, values, warn) ?? "help";
        }
        pairs.push([key, value, true]);
      }
    } else {
      const key = arg.slice(p, p + len);
      const [value, next] = optValue(arg, p + len + 1);
      pairs.push([key, value, false]);
      p = next;
    }
    first = false;
    if (arg[p] === ",") p++;
  }
  return checkPairs(pairs, values, warn) ?? values;
}

/** Validates `id=` first (as qemu does), then each key in order; fills `values`. */
function checkPairs(
  pairs: readonly [string, string, boolean][],
  values: Map<string, string>,
  warn: TraceWarn,
): undefined {
  for (const [key, value] of pairs) {
    if (key === "id" && !ID_RE.test(value)) {
      throw new TraceOptionError("Parameter 'id' expects an identifier", {
        hint: "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
      });
    }
  }
  for (const [key, value, flag] of pairs) {
    if (flag) {
      warn(`short-form boolean option '${key}' deprecated\nPlease use ${key}=${value} instead`);
    }
    if (key === "id") continue;
    if (!KEYS.has(key)) throw new TraceOptionError(`Invalid parameter '${key}'`);
    values.set(key, value);
  }
  return undefined;
}

/** A value up to the next single comma; `,,` stands for one comma. Returns [value, end]. */
function optValue(s: string, p: number): [string, number] {
  let out = "";
  while (p < s.length) {
    if (s[p] === ",") {
      if (s[p + 1] !== ",") break;
      p++;
    }
    out += s[p++];
  }
  return [out, p];
}

/** The enable lines of an events file with their line numbers, as qemu reads them. */
function readEventsFile(path: string): [string, number][] {
  let text: string;
  try {
    text = new TextDecoder().decode(Deno.readFileSync(path));
  } catch (e) {
    // fopen() succeeds on a directory and the first fgets() ends the loop: no lines, no error.
    if ((e as { code?: string }).code === "EISDIR") return [];
    throw new TraceOptionError(osMessage(e), { location: path });
  }
  const out: [string, number][] = [];
  let lineNo = 0;
  let at = 0;
  while (at < text.length) {
    const nl = text.indexOf("\n", at);
    const raw = nl < 0 ? text.slice(at) : text.slice(at, nl + 1);
    at += raw.length;
    lineNo++;
    if (raw.length <= 1) continue; // empty lines
    const line = raw.slice(0, -1); // qemu drops the last character, newline or not
    if (line.startsWith("#")) continue;
    out.push([line, lineNo]);
  }
  return out;
}

/** The strerror() text of a Deno OS error ("No such file or directory"). */
function osMessage(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  const m = /^(.*?) \(os error \d+\)/.exec(msg);
  return m ? m[1]! : msg;
}
