/**
 * The `nbd` protocol's filename forms, as qemu 7.2 parses them (block/nbd.c
 * `nbd_parse_filename` / `nbd_parse_uri`, util/uri.c, util/qemu-sockets.c `inet_parse`), turned
 * into the driver's flat option keys (`server.type`, `server.path`, `server.host`,
 * `server.port`, `export`):
 *
 * - URIs (anything containing `://`): `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://...`,
 *   `nbd+unix:///EXPORT?socket=PATH`. Host, export and socket are percent-decoded, IPv6 literals
 *   lose their brackets, port 0 or none means 10809, user info and fragment are ignored.
 * - The legacy form: `nbd:unix:PATH[:exportname=NAME]`, `nbd:HOST:PORT[:exportname=NAME]`
 *   (no decoding; inet options such as `,to=N` after the port are checked and dropped).
 *
 * Bad filenames throw Error with qemu's message (for a prefix other than nbd, nbd+tcp and nbd+unix
 * that is qemu's "Unknown protocol", as the filename would never reach the nbd driver there). Some valid-looking ones yield no server at all
 * (`nbd:`, an empty `:exportname=`): qemu then fails at open with "NBD server address missing",
 * and so does the driver (nbd.ts).
 *
 * @module
 */

/** The NBD port qemu uses when none is given. */
export const NBD_DEFAULT_PORT = 10809;

const EN_OPTSTR = ":exportname=";
const BAD_URL = "No valid URL specified";

/** Parse an nbd filename into the driver's flat options. */
export function parseNbdFilename(filename: string): Record<string, string> {
  if (filename.includes("://")) return parseUri(filename);
  return parseLegacy(filename);
}

// ---------------------------------------------------------------------------------------------
// nbd:unix:PATH[:exportname=NAME] and nbd:HOST:PORT[:exportname=NAME]

function parseLegacy(filename: string): Record<string, string> {
  const out: Record<string, string> = {};
  let file = filename;
  const en = file.indexOf(EN_OPTSTR);
  if (en >= 0) {
    const name = file.slice(en + EN_OPTSTR.length);
    // qemu returns without setting any option here, so the open fails for want of a server.
    if (name === "") return out;
    file = file.slice(0, en);
    out["export"] = name;
  }
  if (!file.startsWith("nbd:")) {
    // Only nbd+unix: and nbd+tcp: without "//" reach qemu's nbd parser; other prefixes never
    // select the nbd driver at all.
    const proto = filename.slice(0, Math.max(0, filename.indexOf(":")));
    if (proto !== "nbd+unix" && proto !== "nbd+tcp") throw new Error(`Unknown protocol '${proto}'`);
    throw new Error("File name string for NBD must start with 'nbd:'");
  }
  const hostSpec = file.slice(4);
  if (hostSpec === "") return out;
  if (hostSpec.startsWith("unix:")) {
    out["server.type"] = "unix";
    out["server.path"] = hostSpec.slice(5);
    return out;
  }
  const { host, port } = inetParse(hostSpec);
  out["server.type"] = "inet";
  out["server.host"] = host;
  out["server.port"] = port;
  return out;
}

/**
 * qemu's `inet_parse`: `HOST:PORT`, `[IPV6]:PORT` or `:PORT`, host at most 64 and port at most
 * 32 characters (sscanf widths: a longer port is cut and the rest taken as options), then
 * `,`-separated options of which only `to=` is checked here.
 */
function inetParse(str: string): { host: string; port: string } {
  let host: string;
  let rest: string;
  if (str.startsWith(":")) {
    host = "";
    rest = str.slice(1);
    if (rest === "" || rest.startsWith(",")) {
      throw new Error(`error parsing port in address '${str}'`);
    }
  } else if (str.startsWith("[")) {
    const m = /^\[([^\]]{1,64})\]:(?=[^,])/.exec(str);
    if (!m) throw new Error(`error parsing IPv6 address '${str}'`);
    host = m[1]!;
    rest = str.slice(m[0].length);
  } else {
    const m = /^([^:]{1,64}):(?=[^,])/.exec(str);
    if (!m) throw new Error(`error parsing address '${str}'`);
    host = m[1]!;
    rest = str.slice(m[0].length);
  }
  const port = /^[^,]{1,32}/.exec(rest)![0];
  const opts = rest.slice(port.length);
  const to = opts.indexOf(",to=");
  if (to >= 0 && !/^[+-]?\d+(?:$|,)/.test(opts.slice(to + 4).replace(/^\s+/, ""))) {
    throw new Error("error parsing to= argument");
  }
  return { host, port };
}

// ---------------------------------------------------------------------------------------------
// URIs

interface Uri {
  scheme: string;
  /** undefined without an authority; "" for an empty host. */
  server: string | undefined;
  /** undefined when absent (or empty, which qemu's parser refuses anyway). */
  port: number | undefined;
  path: string;
  query: string | undefined;
}

// RFC 3986 character classes, as util/uri.c checks them.
const UNRESERVED = "A-Za-z0-9\\-._~";
const SUB_DELIMS = "!$&'()*+,;=";
const PCT = "%[0-9A-Fa-f]{2}";
const PCHAR = `(?:[${UNRESERVED}${escapeClass(SUB_DELIMS)}:@]|${PCT})`;
const PATH_RE = new RegExp(`^(?:${PCHAR}|/)*$`);
const QUERY_RE = new RegExp(`^(?:${PCHAR}|[/?])*$`);
const USERINFO_RE = new RegExp(`^(?:[${UNRESERVED}${escapeClass(SUB_DELIMS)}:]|${PCT})*$`);
const REGNAME_RE = new RegExp(`^(?:[${UNRESERVED}${escapeClass(SUB_DELIMS)}]|${PCT})*$`);
const IPLITERAL_RE = new RegExp(`^\\[(?:[0-9A-Za-z:.\\-_~]|${PCT})+\\]$`);

function escapeClass(s: string): string {
  return s.replace(/[\\\]\[^-]/g, (c) => `\\${c}`);
}

function parseUri(filename: string): Record<string, string> {
  const u = splitUri(filename);
  if (u === undefined) throw new Error(BAD_URL);
  let isUnix: boolean;
  if (u.scheme === "nbd" || u.scheme === "nbd+tcp") isUnix = false;
  else if (u.scheme === "nbd+unix") isUnix = true;
  else throw new Error(`Unknown protocol '${u.scheme}'`);

  const out: Record<string, string> = {};
  let p = u.path;
  if (p.startsWith("/")) p = p.slice(1);
  const exportName = unescape(p);
  if (exportName === undefined) throw new Error(BAD_URL);
  if (exportName !== "") out["export"] = exportName;

  const params = queryParams(u.query ?? "");
  if (params === undefined) throw new Error(BAD_URL);
  if (params.length > 1 || (isUnix && params.length === 0) || (!isUnix && params.length > 0)) {
    throw new Error(BAD_URL);
  }
  if (isUnix) {
    const q = params[0]!;
    // qemu 7.2 crashes on `?socket` with no value; refusing it is the sane reading.
    if ((u.server !== undefined && u.server !== "") || u.port !== undefined) {
      throw new Error(BAD_URL);
    }
    if (q.name !== "socket" || q.value === undefined) throw new Error(BAD_URL);
    out["server.type"] = "unix";
    out["server.path"] = q.value;
    return out;
  }
  if (u.server === undefined || u.server === "") throw new Error(BAD_URL);
  out["server.type"] = "inet";
  out["server.host"] = u.server;
  out["server.port"] = String(u.port || NBD_DEFAULT_PORT);
  return out;
}

/** Split and validate an RFC 3986 URI; undefined where qemu's parser fails. */
function splitUri(s: string): Uri | undefined {
  const sm = /^([A-Za-z][A-Za-z0-9+.\-]*):/.exec(s);
  if (!sm) return undefined;
  let rest = s.slice(sm[0].length);
  const hash = rest.indexOf("#");
  if (hash >= 0) {
    if (!QUERY_RE.test(rest.slice(hash + 1))) return undefined;
    rest = rest.slice(0, hash);
  }
  let query: string | undefined;
  const qm = rest.indexOf("?");
  if (qm >= 0) {
    query = rest.slice(qm + 1);
    if (!QUERY_RE.test(query)) return undefined;
    rest = rest.slice(0, qm);
  }
  let server: string | undefined;
  let port: number | undefined;
  if (rest.startsWith("//")) {
    const slash = rest.indexOf("/", 2);
    let auth = slash >= 0 ? rest.slice(2, slash) : rest.slice(2);
    rest = slash >= 0 ? rest.slice(slash) : "";
    const at = auth.lastIndexOf("@");
    if (at >= 0) {
      if (!USERINFO_RE.test(auth.slice(0, at))) return undefined;
      auth = auth.slice(at + 1);
    }
    let hostPart = auth;
    if (auth.startsWith("[")) {
      const close = auth.indexOf("]");
      if (close < 0) return undefined;
      hostPart = auth.slice(0, close + 1);
      if (!IPLITERAL_RE.test(hostPart)) return undefined;
      const after = auth.slice(close + 1);
      if (after !== "" && !after.startsWith(":")) return undefined;
      const p = after === "" ? undefined : parsePort(after.slice(1));
      if (p === null) return undefined;
      port = p;
      const inner = unescape(hostPart.slice(1, -1));
      if (inner === undefined) return undefined;
      server = inner;
    } else {
      const colon = auth.indexOf(":");
      if (colon >= 0) {
        hostPart = auth.slice(0, colon);
        const p = parsePort(auth.slice(colon + 1));
        if (p === null) return undefined;
        port = p;
      }
      if (!REGNAME_RE.test(hostPart)) return undefined;
      server = unescape(hostPart);
      if (server === undefined) return undefined;
    }
  }
  if (!PATH_RE.test(rest)) return undefined;
  return { scheme: sm[1]!, server, port, path: rest, query };
}

/** Port digits, at most 65535; null when invalid (qemu refuses an empty port too). */
function parsePort(s: string): number | null {
  if (!/^\d+$/.test(s)) return null;
  const n = Number(s);
  return n > 65535 ? null : n;
}

/**
 * Percent-decode as util/uri.c does: bytes, not UTF-8 validated, cut at a decoded NUL (the
 * result is a C string). Undefined for a malformed escape.
 */
function unescape(s: string): string | undefined {
  if (!s.includes("%")) return s;
  const bytes: number[] = [];
  const enc = new TextEncoder();
  for (let i = 0; i < s.length;) {
    if (s[i] === "%") {
      const h = s.slice(i + 1, i + 3);
      if (!/^[0-9A-Fa-f]{2}$/.test(h)) return undefined;
      const b = parseInt(h, 16);
      if (b === 0) break;
      bytes.push(b);
      i += 3;
    } else {
      const cp = s.codePointAt(i)!;
      const ch = String.fromCodePoint(cp);
      for (const b of enc.encode(ch)) bytes.push(b);
      i += ch.length;
    }
  }
  return new TextDecoder().decode(new Uint8Array(bytes));
}

interface QueryParam {
  name: string;
  value: string | undefined;
}

/** util/uri.c `query_params_parse`: `&`- or `;`-separated, empty ones skipped, decoded. */
function queryParams(q: string): QueryParam[] | undefined {
  const out: QueryParam[] = [];
  for (const part of q.split(/[&;]/)) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const name = unescape(eq >= 0 ? part.slice(0, eq) : part);
    const value = eq >= 0 ? unescape(part.slice(eq + 1)) : undefined;
    if (name === undefined || (eq >= 0 && value === undefined)) return undefined;
    out.push({ name, value });
  }
  return out;
}
