/**
 * Trace points, as qemu's "log" trace backend prints them (the backend Debian's qemu-nbd 7.2 is
 * built with): one line per event, `NAME MESSAGE`, on stderr or in the `-T file=` file. Events
 * are declared once in `events.ts`; each has an `on` flag that call sites test before computing
 * any argument, so a disabled point costs one property load and nothing is formatted.
 *
 *     if (ev.nbd_trip.on) ev.nbd_trip.emit();
 *
 * Patterns follow qemu's trace_enable_events(): `*` and `?` globs, a leading `-` disables, a name
 * without glob characters must exist (else a warning).
 *
 * @module
 */

/** Where trace lines go: anything with a synchronous write (stderr or a file). */
export interface TraceSink {
  writeSync(p: Uint8Array): number;
}

const registry: TraceEvent<never[]>[] = [];
const byName = new Map<string, TraceEvent<never[]>>();
const encoder = new TextEncoder();
let sink: TraceSink = Deno.stderr;

/**
 * One trace point. `format` turns the arguments into the message; events qemu-nbd has that
 * denbd never fires are declared without one so `-T` accepts their names as qemu-nbd does.
 */
export class TraceEvent<A extends unknown[] = []> {
  /** qemu's event name (e.g. "nbd_trip"). */
  readonly name: string;
  /** Enabled: test this before building arguments. */
  on = false;
  readonly #format: ((...args: A) => string) | undefined;

  constructor(name: string, format?: (...args: A) => string) {
    if (byName.has(name)) throw new Error(`trace event ${name} declared twice`);
    this.name = name;
    this.#format = format;
    registry.push(this as unknown as TraceEvent<never[]>);
    byName.set(name, this as unknown as TraceEvent<never[]>);
  }

  /** Whether denbd ever fires this event. */
  get fired(): boolean {
    return this.#format !== undefined;
  }

  /** Write the event's line. Call only when `on` (the check is the caller's, to keep it free). */
  emit(...args: A): void {
    if (this.#format === undefined) return;
    writeLine(`${this.name} ${this.#format(...args)}\n`);
  }
}

function writeLine(line: string): void {
  const bytes = encoder.encode(line);
  try {
    let off = 0;
    while (off < bytes.length) off += sink.writeSync(bytes.subarray(off));
  } catch { /* a closed stderr must not take the server down */ }
}

/** Every declared event, in declaration order (the order `-T help` lists them in). */
export function traceEvents(): readonly TraceEvent<never[]>[] {
  return registry;
}

/** The event called `name`, if declared. */
export function findTraceEvent(name: string): TraceEvent<never[]> | undefined {
  return byName.get(name);
}

/** `*` matches any run of characters, `?` any one character (GLib's g_pattern_match_simple). */
export function globMatch(pattern: string, name: string): boolean {
  // Iterative matcher with one backtrack point: linear in practice, no recursion.
  let p = 0;
  let n = 0;
  let star = -1;
  let mark = 0;
  while (n < name.length) {
    const c = pattern[p];
    if (c === "?" || (c !== undefined && c !== "*" && c === name[n])) {
      p++;
      n++;
    } else if (c === "*") {
      star = p++;
      mark = n;
    } else if (star >= 0) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (pattern[p] === "*") p++;
  return p === pattern.length;
}

/** Whether `s` contains glob characters (qemu then matches instead of looking the name up). */
export function isPattern(s: string): boolean {
  return s.includes("*") || s.includes("?");
}

/**
 * Apply one enable line (`NAME`, `PATTERN`, `-NAME`, `-PATTERN`). Returns the warning qemu
 * would print for a name that is not declared, else undefined.
 */
export function enableEvents(line: string): string | undefined {
  const enable = !line.startsWith("-");
  const what = enable ? line : line.slice(1);
  if (!isPattern(what)) {
    const ev = byName.get(what);
    if (ev === undefined) return `trace event '${what}' does not exist`;
    ev.on = enable;
    return undefined;
  }
  for (const ev of registry) if (globMatch(what, ev.name)) ev.on = enable;
  return undefined;
}

/** What enableEvents would warn about, without changing any state. */
export function checkEnableLine(line: string): string | undefined {
  const what = line.startsWith("-") ? line.slice(1) : line;
  if (isPattern(what) || byName.has(what)) return undefined;
  return `trace event '${what}' does not exist`;
}

/** Disable every event (tests). */
export function disableAllEvents(): void {
  for (const ev of registry) ev.on = false;
}

/** Send trace lines to `s` (stderr by default); returns the previous sink. */
export function setTraceSink(s: TraceSink): TraceSink {
  const prev = sink;
  sink = s;
  return prev;
}
