/**
 * `-L` / `--list`: connect to an NBD server as a client, list its exports with their size, flags,
 * block sizes and meta contexts, and print them in qemu-nbd 7.2's layout.
 *
 * @module
 */

import {
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_OPT_ABORT,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from "./constants.ts";
import { nameQuery, OptionClient, optionReplyError } from "./client.ts";
import type { ServerAddress } from "../net/address.ts";
import { view } from "./wire.ts";
import type { ByteConn } from "./conn_io.ts";
import { NBD_OPT_STARTTLS } from "./constants.ts";
import type { TlsCredentials } from "../tls/creds.ts";
import { TlsConn } from "../tls/tls_conn.ts";
import { connectSocket } from "../net/connect.ts";
import { FdConn } from "../net/fd_conn.ts";
import { ReadinessLoop } from "../net/readiness.ts";

/** -L over TLS: client credentials and the name the server's certificate must carry. */
export interface ListTls {
  readonly creds: TlsCredentials;
  readonly hostname: string | undefined;
}

/** One export as a listing shows it. */
export interface ListedExport {
  name: string;
  description: string;
  size: number;
  flags: number;
  minBlock: number;
  optBlock: number;
  maxBlock: number;
  contexts: string[];
}

/** Flag names by bit, as qemu-nbd -L prints them. */
const FLAG_NAMES: [number, string][] = [
  [1, "readonly"],
  [2, "flush"],
  [3, "fua"],
  [4, "rotational"],
  [5, "trim"],
  [6, "zeroes"],
  [7, "df"],
  [8, "multi"],
  [9, "resize"],
  [10, "cache"],
  [11, "fast-zero"],
];

/** The listing in qemu-nbd 7.2's format. */
export function formatExportList(list: readonly ListedExport[]): string {
  let s = `exports available: ${list.length}\n`;
  for (const e of list) {
    s += ` export: '${e.name}'\n`;
    if (e.description !== "") s += `  description: ${e.description}\n`;
    s += `  size:  ${e.size}\n`;
    const names = FLAG_NAMES.filter(([bit]) => e.flags & (1 << bit)).map(([, n]) => ` ${n}`).join(
      "",
    );
    s += `  flags: 0x${e.flags.toString(16)} (${names} )\n`;
    if (e.minBlock !== 0) {
      s += `  min block: ${e.minBlock}\n  opt block: ${e.optBlock}\n  max block: ${e.maxBlock}\n`;
    }
    if (e.contexts.length > 0) {
      s += `  available meta contexts: ${e.contexts.length}\n`;
      for (const c of e.contexts) s += `   ${c}\n`;
    }
  }
  return s;
}

const decoder = new TextDecoder();

/** Connect (with TLS when `tls` is given), list every export with its details, say goodbye. */
export async function listExports(
  address: ServerAddress,
  tls?: ListTls,
): Promise<ListedExport[]> {
  if (tls === undefined) {
    const conn = address.transport === "unix"
      ? await Deno.connect({ transport: "unix", path: address.path })
      : await Deno.connect({ transport: "tcp", hostname: address.hostname, port: address.port });
    try {
      return await listOver(conn, undefined);
    } finally {
      try {
        conn.close();
      } catch { /* closed */ }
    }
  }
  // GnuTLS needs the socket's descriptor: connect through FFI and wait in a readiness loop.
  const loop = new ReadinessLoop({ spin: false });
  let conn: FdConn | undefined;
  let secure: TlsConn | undefined;
  try {
    const fd = await connectSocket(address, loop);
    const plain = conn = new FdConn(fd, loop, { tcp: address.transport === "tcp" });
    return await listOver(plain, async () =>
      secure = await TlsConn.start(plain, loop, "client", {
        creds: tls.creds,
        hostname: tls.hostname,
      }));
  } finally {
    (secure ?? conn)?.close();
    await loop.close();
  }
}

/** The listing over `plain`, after STARTTLS and `startTls` when that is given. */
async function listOver(
  plain: ByteConn,
  startTls: (() => Promise<ByteConn>) | undefined,
): Promise<ListedExport[]> {
  let c = new OptionClient(plain);
  const greeting = await c.greet();
  if (greeting.style !== "newstyle" || !greeting.fixed) {
    throw new Error(
      startTls ? "Server does not support STARTTLS" : "Server is not a fixed-newstyle NBD server",
    );
  }
  if (startTls !== undefined) {
    await c.send(NBD_OPT_STARTTLS);
    const r = await c.reply(NBD_OPT_STARTTLS);
    if (r.type >= 0x80000000) throw optionReplyError(NBD_OPT_STARTTLS, r);
    if (r.type !== NBD_REP_ACK) {
      throw new Error(
        `Server answered option ${NBD_OPT_STARTTLS} (starttls) with unexpected reply ${r.type}`,
      );
    }
    c = new OptionClient(await startTls());
  }
  await c.send(NBD_OPT_STRUCTURED_REPLY);
  const structured = (await c.reply(NBD_OPT_STRUCTURED_REPLY)).type === NBD_REP_ACK;

  await c.send(NBD_OPT_LIST);
  const list: ListedExport[] = [];
  for (let i = 0; i < 1_000_000; i++) {
    const r = await c.reply(NBD_OPT_LIST);
    if (r.type === NBD_REP_ACK) break;
    if (r.type >= 0x80000000) throw optionReplyError(NBD_OPT_LIST, r);
    if (r.type !== NBD_REP_SERVER) {
      throw new Error(`Server does not support listing exports (reply 0x${r.type.toString(16)})`);
    }
    const len = view(r.data).getUint32(0);
    list.push({
      name: decoder.decode(r.data.subarray(4, 4 + len)),
      description: decoder.decode(r.data.subarray(4 + len)),
      size: 0,
      flags: 0,
      minBlock: 0,
      optBlock: 0,
      maxBlock: 0,
      contexts: [],
    });
  }

  for (const e of list) {
    const req = new Uint8Array(4);
    view(req).setUint16(0, 1);
    view(req).setUint16(2, NBD_INFO_BLOCK_SIZE);
    await c.send(NBD_OPT_INFO, nameQuery(e.name, req));
    for (let i = 0; i < 1000; i++) {
      const r = await c.reply(NBD_OPT_INFO);
      if (r.type !== NBD_REP_INFO) break; // ACK, or an error: keep what we have
      const v = view(r.data);
      const t = v.getUint16(0);
      if (t === NBD_INFO_EXPORT && r.data.length >= 12) {
        e.size = Number(v.getBigUint64(2));
        e.flags = v.getUint16(10);
      } else if (t === NBD_INFO_BLOCK_SIZE && r.data.length >= 14) {
        e.minBlock = v.getUint32(2);
        e.optBlock = v.getUint32(6);
        e.maxBlock = v.getUint32(10);
      } else if (t === NBD_INFO_DESCRIPTION && e.description === "") {
        e.description = decoder.decode(r.data.subarray(2));
      }
    }
    if (structured) {
      await c.send(NBD_OPT_LIST_META_CONTEXT, nameQuery(e.name, new Uint8Array(4)));
      for (let i = 0; i < 1_000_000; i++) {
        const r = await c.reply(NBD_OPT_LIST_META_CONTEXT);
        if (r.type !== NBD_REP_META_CONTEXT) break;
        e.contexts.push(decoder.decode(r.data.subarray(4)));
      }
    }
  }
  await c.send(NBD_OPT_ABORT);
  return list;
}
