/**
 * `--help` and `--version` text. The layout follows qemu-nbd's (sections, a 28-column option
 * column) so its users find their way; the wording is denbd's own and only options denbd
 * implements are listed — add an id to {@linkcode HELP_SUPPORTED} when one lands.
 *
 * @module
 */

import { PROGRAM } from "./errors.ts";
import { supportedFormats } from "../block/formats.ts";

/** denbd's version. */
export const VERSION = "0.1.0";

/** The qemu-nbd release whose command line denbd accepts. */
export const QEMU_NBD_COMPAT = "7.2";

interface HelpEntry {
  /** The option's long name (or a short letter for those without one); keys HELP_SUPPORTED. */
  readonly id: string;
  /** The left column, e.g. "-p, --port=PORT". */
  readonly usage: string;
  /** The description, already split into lines. */
  readonly text: readonly string[];
}

interface HelpSection {
  /** undefined for the first, untitled group. */
  readonly title: string | undefined;
  readonly entries: readonly HelpEntry[];
}

/** Column where descriptions start, as in qemu-nbd's help. */
const TEXT_COLUMN = 28;
/** Widest help line. */
const HELP_WIDTH = 80;

/** A description split into lines that fit beside the option column. */
function wrapWords(text: string): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(" ")) {
    if (line !== "" && TEXT_COLUMN + line.length + 1 + word.length > HELP_WIDTH) {
      lines.push(line);
      line = word;
    } else {
      line = line === "" ? word : `${line} ${word}`;
    }
  }
  if (line !== "") lines.push(line);
  return lines;
}

/** Options shown by --help: grow this set as features land. */
export const HELP_SUPPORTED: ReadonlySet<string> = new Set([
  "help",
  "version",
  "port",
  "bind",
  "socket",
  "shared",
  "persistent",
  "export-name",
  "description",
  "offset",
  "read-only",
  "format",
  "nocache",
  "cache",
  "aio",
  "discard",
  "detect-zeroes",
  "allocation-depth",
  "list",
  "load-snapshot",
  "snapshot",
  "bitmap",
  "fork",
  "pid-file",
  "verbose",
  "trace",
  "image-opts",
  "handshake-limit",
  "connect",
  "disconnect",
  "connections",
  "dead-conn-timeout",
]);

const SECTIONS: readonly HelpSection[] = [
  {
    title: undefined,
    entries: [
      { id: "help", usage: "-h, --help", text: ["print this help, then exit"] },
      { id: "version", usage: "-V, --version", text: ["print the version, then exit"] },
    ],
  },
  {
    title: "Connection properties:",
    entries: [
      { id: "port", usage: "-p, --port=PORT", text: ["TCP port to listen on (default `10809')"] },
      {
        id: "bind",
        usage: "-b, --bind=IFACE",
        text: ["address to listen on (default `0.0.0.0')"],
      },
      {
        id: "socket",
        usage: "-k, --socket=PATH",
        text: ["listen on this unix socket (an absolute path)", "instead of TCP"],
      },
      {
        id: "shared",
        usage: "-e, --shared=NUM",
        text: ["serve up to NUM clients at a time (default '1',", "0 means no limit)"],
      },
      {
        id: "persistent",
        usage: "-t, --persistent",
        text: ["keep serving after the last client disconnects"],
      },
      {
        id: "verbose",
        usage: "-v, --verbose",
        text: [
          "say which I/O engine --aio fell back to; with -c",
          "stay in the foreground (errors are printed",
          "without -v too)",
        ],
      },
      {
        id: "export-name",
        usage: "-x, --export-name=NAME",
        text: ["name the export NAME (default: the empty name)"],
      },
      {
        id: "description",
        usage: "-D, --description=TEXT",
        text: ["give the export a description clients can read"],
      },
      {
        id: "handshake-limit",
        usage: "--handshake-limit=N",
        text: [
          "drop clients that have not finished negotiating",
          "after N seconds (default 10, 0 = never)",
        ],
      },
    ],
  },
  {
    title: "Exposing part of the image:",
    entries: [
      {
        id: "offset",
        usage: "-o, --offset=OFFSET",
        text: ["export the image from byte OFFSET on"],
      },
      {
        id: "allocation-depth",
        usage: "-A, --allocation-depth",
        text: ["report the allocation depth as block status"],
      },
      {
        id: "bitmap",
        usage: "-B, --bitmap=NAME",
        text: ["report a persistent dirty bitmap as block status"],
      },
    ],
  },
  {
    title: "General purpose options:",
    entries: [
      { id: "list", usage: "-L, --list", text: ["list the exports of another NBD server"] },
      { id: "object", usage: "--object type,id=ID,...", text: ["create an object (secret, TLS)"] },
      { id: "tls-creds", usage: "--tls-creds=ID", text: ["TLS credentials from an --object"] },
      { id: "tls-authz", usage: "--tls-authz=ID", text: ["TLS authorization from an --object"] },
      {
        id: "trace",
        usage: "-T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]",
        text: ["enable trace points (QEMU's event names;", "'-T help' lists them)"],
      },
      {
        id: "fork",
        usage: "--fork",
        text: ["run in the background; the parent exits once the", "server is listening"],
      },
      { id: "pid-file", usage: "--pid-file=PATH", text: ["write the server's process ID to PATH"] },
      {
        id: "selinux-label",
        usage: "--selinux-label=LABEL",
        text: ["SELinux label for the listening socket"],
      },
    ],
  },
  {
    title: "Kernel NBD client support:",
    entries: [
      {
        id: "connect",
        usage: "-c, --connect=DEV",
        text: ["attach FILE to the kernel NBD device DEV"],
      },
      {
        id: "disconnect",
        usage: "-d, --disconnect",
        text: ["detach the NBD device given as FILE"],
      },
      {
        id: "connections",
        usage: "--connections=N",
        text: [
          "with -c: bind DEV over netlink with N sockets",
          "(needs -e 0 or -e N or more; denbd only)",
        ],
      },
      {
        id: "dead-conn-timeout",
        usage: "--dead-conn-timeout=S",
        text: ["with --connections: fail I/O after S seconds", "without a live connection"],
      },
    ],
  },
  {
    title: "Block device options:",
    entries: [
      {
        id: "format",
        usage: "-f, --format=FORMAT",
        text: wrapWords(`image format: ${supportedFormats().join(", ")} (default: probe)`),
      },
      { id: "read-only", usage: "-r, --read-only", text: ["refuse writes from clients"] },
      {
        id: "snapshot",
        usage: "-s, --snapshot",
        text: ["send writes to a temporary overlay, leaving FILE", "untouched"],
      },
      {
        id: "load-snapshot",
        usage: "-l, --load-snapshot=SNAPSHOT_PARAM",
        text: [
          "export an internal snapshot of FILE, read-only;",
          "SNAPSHOT_PARAM is 'snapshot.id=[ID],",
          "snapshot.name=[NAME]' or '[ID_OR_NAME]'",
        ],
      },
      {
        id: "nocache",
        usage: "-n, --nocache",
        text: ["bypass the host page cache (--cache=none)"],
      },
      {
        id: "cache",
        usage: "    --cache=MODE",
        text: [
          "how the image file is cached: 'none', 'writeback'",
          "(default), 'writethrough', 'directsync' or 'unsafe'",
        ],
      },
      {
        id: "aio",
        usage: "    --aio=MODE",
        text: [
          "I/O engine: 'threads', 'io_uring' (default where",
          "the kernel allows it, else threads) or 'native'",
          "(Linux AIO; needs --cache=none or directsync)",
        ],
      },
      {
        id: "discard",
        usage: "    --discard=MODE",
        text: ["client discards: ignore (default) or unmap"],
      },
      {
        id: "detect-zeroes",
        usage: "    --detect-zeroes=MODE",
        text: ["turn zero-filled writes into zero requests:", "off (default), on, unmap"],
      },
      {
        id: "image-opts",
        usage: "    --image-opts",
        text: [
          "FILE is a list of image options, e.g.",
          "driver=raw,file.filename=PATH,offset=1M or",
          "driver=qcow2,file.driver=nbd,file.server.path=S",
        ],
      },
    ],
  },
];

/** What FILE may be, after the options (qemu's filename syntax). */
const FILE_FORMS = [
  "FILE is a path or one of qemu's filenames:",
  '  file:PATH  json:{"driver":"qcow2","file":{...}}  null-co://  null-aio://',
  "  nbd://HOST[:PORT]/EXPORT  nbd+unix:///EXPORT?socket=PATH",
  "  nbd:unix:PATH[:exportname=NAME]  nbd:HOST:PORT[:exportname=NAME]",
  "  http://URL  https://URL (read-only: use -r)",
];

function formatEntry(e: HelpEntry): string[] {
  const left = `  ${e.usage}`;
  const pad = " ".repeat(TEXT_COLUMN);
  const [firstText = "", ...rest] = e.text;
  const lines = left.length + 2 <= TEXT_COLUMN
    ? [left.padEnd(TEXT_COLUMN) + firstText]
    : [left, pad + firstText];
  return [...lines, ...rest.map((t) => pad + t)];
}

/** The --help text, listing only what denbd implements. */
export function helpText(): string {
  const lines = [
    `Usage: ${PROGRAM} [OPTIONS] FILE`,
    ...(HELP_SUPPORTED.has("list") ? [`  or:  ${PROGRAM} -L [OPTIONS]`] : []),
    `${PROGRAM}: serve a disk image over NBD (its formats: see -f)`,
  ];
  for (const section of SECTIONS) {
    const entries = section.entries.filter((e) => HELP_SUPPORTED.has(e.id));
    if (entries.length === 0) continue;
    lines.push("");
    if (section.title !== undefined) lines.push(section.title);
    for (const e of entries) lines.push(...formatEntry(e));
  }
  lines.push("", ...FILE_FORMS);
  return lines.join("\n") + "\n";
}

/** The --version text. */
export function versionText(): string {
  return `${PROGRAM} ${VERSION}\n` +
    `Accepts the command line of qemu-nbd ${QEMU_NBD_COMPAT}.\n`;
}
