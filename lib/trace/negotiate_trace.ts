/**
 * The negotiation trace points (`nbd_negotiate_*`), derived from the handshake machine's steps:
 * the state before a step, the bytes it looked at and what it produced (consumed bytes, replies,
 * effect). The machine stays pure and knows nothing of tracing; this observer decodes the option
 * data and replies again, and runs only when one of these events is enabled. The events and
 * their order follow qemu-nbd 7.2's nbd/server.c for the same client traffic.
 *
 * @module
 */

import type { HandshakeState, StepResult } from "../nbd/handshake.ts";
import {
  IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_MAX_STRING_SIZE,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_REPLY_MAGIC,
  NBD_OPT_SET_META_CONTEXT,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from "../nbd/constants.ts";
import * as ev from "./events.ts";

const NEGOTIATION_EVENTS = [
  ev.nbd_negotiate_send_rep_len,
  ev.nbd_negotiate_send_rep_err,
  ev.nbd_negotiate_send_rep_list,
  ev.nbd_negotiate_handle_export_name,
  ev.nbd_negotiate_handle_export_name_request,
  ev.nbd_negotiate_send_info,
  ev.nbd_negotiate_handle_info_requests,
  ev.nbd_negotiate_handle_info_request,
  ev.nbd_negotiate_handle_info_block_size,
  ev.nbd_negotiate_meta_context,
  ev.nbd_negotiate_meta_query_skip,
  ev.nbd_negotiate_meta_query_parse,
  ev.nbd_negotiate_meta_query_reply,
  ev.nbd_negotiate_options_flags,
  ev.nbd_negotiate_options_check_magic,
  ev.nbd_negotiate_options_check_option,
  ev.nbd_negotiate_new_style_size_flags,
  ev.nbd_negotiate_success,
];

/** Whether any event this observer emits is enabled (checked once per connection). */
export function negotiationTraced(): boolean {
  return NEGOTIATION_EVENTS.some((e) => e.on);
}

const REP_NAMES: Readonly<Record<number, string>> = {
  1: "ack",
  2: "server",
  3: "info",
  4: "meta context",
  [0x80000001]: "unsupported",
  [0x80000002]: "denied by policy",
  [0x80000003]: "invalid",
  [0x80000004]: "platform lacks support",
  [0x80000005]: "TLS required",
  [0x80000006]: "export unknown",
  [0x80000007]: "server shutting down",
  [0x80000008]: "block size required",
};
const INFO_NAMES = ["export", "name", "description", "block size"];
/** qemu 7.2's nbd_opt_lookup(): it has no names for PEEK_EXPORT and EXTENDED_HEADERS. */
const OPT_NAMES: Readonly<Record<number, string>> = {
  1: "export name",
  2: "abort",
  3: "list",
  5: "starttls",
  6: "info",
  7: "go",
  8: "structured reply",
  9: "list meta context",
  10: "set meta context",
};

function optionName(opt: number): string {
  return OPT_NAMES[opt] ?? "<unknown>";
}

/** qemu's nbd_rep_lookup() and nbd_info_lookup(). */
function repName(type: number): string {
  return REP_NAMES[type] ?? "<unknown>";
}
function infoName(info: number): string {
  return INFO_NAMES[info] ?? "<unknown>";
}

const decoder = new TextDecoder();
const text = (b: Uint8Array) => decoder.decode(b);
const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);

/** Emit the events for one handshake step (`input`: the bytes the step was given). */
export function traceNegotiationStep(
  before: HandshakeState,
  input: Uint8Array,
  res: StepResult,
): void {
  switch (before.kind) {
    case "clientFlags":
      if (res.consumed >= 4 && ev.nbd_negotiate_options_flags.on) {
        ev.nbd_negotiate_options_flags.emit(dv(input).getUint32(0));
      }
      break;
    case "optionHeader": {
      if (res.consumed < 16) break;
      const v = dv(input);
      const magic = v.getBigUint64(0);
      if (ev.nbd_negotiate_options_check_magic.on) ev.nbd_negotiate_options_check_magic.emit(magic);
      if (magic !== IHAVEOPT) break;
      const option = v.getUint32(8);
      if (ev.nbd_negotiate_options_check_option.on) {
        ev.nbd_negotiate_options_check_option.emit(option, optionName(option));
      }
      if (option === NBD_OPT_EXPORT_NAME && ev.nbd_negotiate_handle_export_name.on) {
        ev.nbd_negotiate_handle_export_name.emit();
      }
      break;
    }
    case "optionData":
      if (res.effect.kind !== "more") {
        traceOptionData(
          before.ctx.config.name,
          before.ctx.config.bitmaps,
          before.option,
          input
            .subarray(0, before.length),
        );
      }
      break;
    case "skip":
    case "finished":
      break;
  }
  for (const r of res.replies) traceReply(r);
  if (res.effect.kind === "go" && ev.nbd_negotiate_success.on) ev.nbd_negotiate_success.emit();
}

function traceOptionData(
  exportName: string,
  bitmaps: readonly string[],
  option: number,
  data: Uint8Array,
): void {
  const v = dv(data);
  if (option === NBD_OPT_EXPORT_NAME) {
    if (ev.nbd_negotiate_handle_export_name_request.on) {
      ev.nbd_negotiate_handle_export_name_request.emit(text(data));
    }
    return;
  }
  if (data.length < 4) return;
  const nameLen = v.getUint32(0);
  if (nameLen > NBD_MAX_STRING_SIZE || 4 + nameLen > data.length) return;
  const name = text(data.subarray(4, 4 + nameLen));
  let at = 4 + nameLen;
  if (option === NBD_OPT_INFO || option === NBD_OPT_GO) {
    if (ev.nbd_negotiate_handle_export_name_request.on) {
      ev.nbd_negotiate_handle_export_name_request.emit(name);
    }
    if (at + 2 > data.length) return;
    const count = v.getUint16(at);
    at += 2;
    if (ev.nbd_negotiate_handle_info_requests.on) ev.nbd_negotiate_handle_info_requests.emit(count);
    for (let i = 0; i < count && at + 2 <= data.length; i++, at += 2) {
      const t = v.getUint16(at);
      if (ev.nbd_negotiate_handle_info_request.on) {
        ev.nbd_negotiate_handle_info_request.emit(t, infoName(t));
      }
    }
    return;
  }
  if (option !== NBD_OPT_LIST_META_CONTEXT && option !== NBD_OPT_SET_META_CONTEXT) return;
  // qemu answers an unknown export before it reads the queries.
  if (name !== exportName || at + 4 > data.length) return;
  const count = v.getUint32(at);
  at += 4;
  if (ev.nbd_negotiate_meta_context.on) {
    ev.nbd_negotiate_meta_context.emit(optionName(option), name, count);
  }
  for (let i = 0; i < count && at + 4 <= data.length; i++) {
    const len = v.getUint32(at);
    at += 4;
    if (len > NBD_MAX_STRING_SIZE) {
      skip("length too long");
      at += len;
      continue;
    }
    if (at + len > data.length) return;
    traceQuery(text(data.subarray(at, at + len)), bitmaps);
    at += len;
  }
}

function parsed(q: string): void {
  if (ev.nbd_negotiate_meta_query_parse.on) ev.nbd_negotiate_meta_query_parse.emit(q);
}
function skip(reason: string): void {
  if (ev.nbd_negotiate_meta_query_skip.on) ev.nbd_negotiate_meta_query_skip.emit(reason);
}

/** One meta-context query: qemu traces the namespace, then the leaf it matched. */
function traceQuery(q: string, bitmaps: readonly string[]): void {
  const exact = (pattern: string, rest: string) => {
    if (rest === "") parsed("empty");
    else if (rest === pattern) parsed(pattern);
    else skip("pattern not matched");
  };
  if (q.startsWith("base:")) {
    parsed("base:");
    return exact("allocation", q.slice(5));
  }
  if (!q.startsWith("qemu:")) return skip("unknown namespace");
  parsed("qemu:");
  const rest = q.slice(5);
  if (rest === "") return parsed("empty");
  if (rest === "allocation-depth") return parsed("allocation-depth");
  if (!rest.startsWith("dirty-bitmap:")) return skip("unknown qemu context");
  parsed("dirty-bitmap:");
  const bm = rest.slice(13);
  if (bm === "") return parsed("empty");
  let found = false;
  for (const b of bitmaps) {
    if (b === bm) {
      parsed(b);
      found = true;
    } else skip("pattern not matched");
  }
  if (!found) skip("no dirty-bitmap match");
}

function traceReply(r: Uint8Array): void {
  const v = dv(r);
  if (r.length < 20 || v.getBigUint64(0) !== NBD_OPT_REPLY_MAGIC) {
    // The EXPORT_NAME reply: size and transmission flags, no option-reply header.
    if (r.length >= 10 && ev.nbd_negotiate_new_style_size_flags.on) {
      ev.nbd_negotiate_new_style_size_flags.emit(Number(v.getBigUint64(0)), v.getUint16(8));
    }
    return;
  }
  const option = v.getUint32(8);
  const type = v.getUint32(12);
  const len = v.getUint32(16);
  const body = r.subarray(20);
  const b = dv(body);
  if (type === NBD_REP_META_CONTEXT) {
    // qemu writes these replies directly, without nbd_negotiate_send_rep_len's trace.
    if (ev.nbd_negotiate_meta_query_reply.on && body.length >= 4) {
      ev.nbd_negotiate_meta_query_reply.emit(text(body.subarray(4)), b.getUint32(0));
    }
    return;
  }
  if (type === NBD_REP_INFO && body.length >= 2) {
    const info = b.getUint16(0);
    if (info === NBD_INFO_BLOCK_SIZE && body.length >= 14) {
      if (ev.nbd_negotiate_handle_info_block_size.on) {
        ev.nbd_negotiate_handle_info_block_size.emit(
          b.getUint32(2),
          b.getUint32(6),
          b.getUint32(10),
        );
      }
    } else if (info === NBD_INFO_EXPORT && body.length >= 12) {
      if (ev.nbd_negotiate_new_style_size_flags.on) {
        ev.nbd_negotiate_new_style_size_flags.emit(Number(b.getBigUint64(2)), b.getUint16(10));
      }
    }
    if (ev.nbd_negotiate_send_info.on) {
      ev.nbd_negotiate_send_info.emit(info, infoName(info), len - 2);
    }
  } else if (type === NBD_REP_SERVER && body.length >= 4) {
    const n = b.getUint32(0);
    if (ev.nbd_negotiate_send_rep_list.on && 4 + n <= body.length) {
      ev.nbd_negotiate_send_rep_list.emit(
        text(body.subarray(4, 4 + n)),
        text(body.subarray(4 + n)),
      );
    }
  } else if ((type & 0x80000000) !== 0 && ev.nbd_negotiate_send_rep_err.on) {
    ev.nbd_negotiate_send_rep_err.emit(text(body));
  }
  if (ev.nbd_negotiate_send_rep_len.on) {
    ev.nbd_negotiate_send_rep_len.emit(option, optionName(option), type, repName(type), len);
  }
}
