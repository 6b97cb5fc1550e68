/**
 * The trace points: qemu-nbd 7.2's `nbd_*` events under their qemu names and in the order
 * `qemu-nbd -T help` lists them, with the messages qemu's log backend prints, followed by the
 * few denbd-only points (`denbd_*`). Events qemu-nbd has but denbd never fires (the NBD client
 * side, TLS, AIO contexts) are declared without a message, so `-T NAME` accepts them as qemu-nbd
 * does and `-T help` lists them.
 *
 * Handles (qemu's name for the request cookie) are passed as bigint: they are u64 on the wire.
 *
 * @module
 */

import { TraceEvent } from "./trace.ts";

const hex = (n: number | bigint) => `0x${n.toString(16)}`;

// block/nbd.c, nbd/client.c, nbd/common.c: the client side, never fired by a server.
for (
  const name of [
    "nbd_parse_blockstatus_compliance",
    "nbd_structured_read_compliance",
    "nbd_read_reply_entry_fail",
    "nbd_co_request_fail",
    "nbd_client_handshake",
    "nbd_client_handshake_success",
    "nbd_reconnect_attempt",
    "nbd_reconnect_attempt_result",
    "nbd_send_option_request",
    "nbd_receive_option_reply",
    "nbd_server_error_msg",
    "nbd_reply_err_ignored",
    "nbd_receive_list",
    "nbd_opt_info_go_start",
    "nbd_opt_info_go_success",
    "nbd_opt_info_unknown",
    "nbd_opt_info_block_size",
    "nbd_receive_query_exports_start",
    "nbd_receive_query_exports_success",
    "nbd_receive_starttls_new_client",
    "nbd_receive_starttls_tls_handshake",
    "nbd_opt_meta_request",
    "nbd_opt_meta_reply",
    "nbd_start_negotiate",
    "nbd_receive_negotiate_magic",
    "nbd_receive_negotiate_server_flags",
    "nbd_receive_negotiate_name",
    "nbd_receive_negotiate_size_flags",
    "nbd_init_set_socket",
    "nbd_init_set_block_size",
    "nbd_init_set_size",
    "nbd_init_trailing_bytes",
    "nbd_init_set_readonly",
    "nbd_init_finish",
    "nbd_client_loop",
    "nbd_client_loop_ret",
    "nbd_client_clear_queue",
    "nbd_client_clear_socket",
    "nbd_send_request",
    "nbd_receive_simple_reply",
    "nbd_receive_structured_reply_chunk",
    "nbd_unknown_error",
  ]
) new TraceEvent(name);

// nbd/server.c: negotiation.
export const nbd_negotiate_send_rep_len = new TraceEvent(
  "nbd_negotiate_send_rep_len",
  (opt: number, optName: string, type: number, typeName: string, len: number) =>
    `Reply opt=${opt} (${optName}), type=${type} (${typeName}), len=${len}`,
);
export const nbd_negotiate_send_rep_err = new TraceEvent(
  "nbd_negotiate_send_rep_err",
  (msg: string) => `sending error message "${msg}"`,
);
export const nbd_negotiate_send_rep_list = new TraceEvent(
  "nbd_negotiate_send_rep_list",
  (name: string, desc: string) => `Advertising export name '${name}' description '${desc}'`,
);
export const nbd_negotiate_handle_export_name = new TraceEvent(
  "nbd_negotiate_handle_export_name",
  () => "Checking length",
);
export const nbd_negotiate_handle_export_name_request = new TraceEvent(
  "nbd_negotiate_handle_export_name_request",
  (name: string) => `Client requested export '${name}'`,
);
export const nbd_negotiate_send_info = new TraceEvent(
  "nbd_negotiate_send_info",
  (info: number, name: string, length: number) =>
    `Sending NBD_REP_INFO type ${info} (${name}) with remaining length ${length}`,
);
export const nbd_negotiate_handle_info_requests = new TraceEvent(
  "nbd_negotiate_handle_info_requests",
  (requests: number) => `Client requested ${requests} items of info`,
);
export const nbd_negotiate_handle_info_request = new TraceEvent(
  "nbd_negotiate_handle_info_request",
  (request: number, name: string) => `Client requested info ${request} (${name})`,
);
export const nbd_negotiate_handle_info_block_size = new TraceEvent(
  "nbd_negotiate_handle_info_block_size",
  (min: number, preferred: number, max: number) =>
    `advertising minimum ${hex(min)}, preferred ${hex(preferred)}, maximum ${hex(max)}`,
);
export const nbd_negotiate_handle_starttls = new TraceEvent(
  "nbd_negotiate_handle_starttls",
  () => "Setting up TLS",
);
export const nbd_negotiate_handle_starttls_handshake = new TraceEvent(
  "nbd_negotiate_handle_starttls_handshake",
  () => "Starting TLS handshake",
);
export const nbd_negotiate_meta_context = new TraceEvent(
  "nbd_negotiate_meta_context",
  (optName: string, exportName: string, queries: number) =>
    `Client requested ${optName} for export ${exportName}, with ${queries} queries`,
);
export const nbd_negotiate_meta_query_skip = new TraceEvent(
  "nbd_negotiate_meta_query_skip",
  (reason: string) => `Skipping meta query: ${reason}`,
);
export const nbd_negotiate_meta_query_parse = new TraceEvent(
  "nbd_negotiate_meta_query_parse",
  (query: string) => `Parsed meta query '${query}'`,
);
export const nbd_negotiate_meta_query_reply = new TraceEvent(
  "nbd_negotiate_meta_query_reply",
  (context: string, id: number) => `Replying with meta context '${context}' id ${id}`,
);
export const nbd_negotiate_options_flags = new TraceEvent(
  "nbd_negotiate_options_flags",
  (flags: number) => `Received client flags ${hex(flags)}`,
);
export const nbd_negotiate_options_check_magic = new TraceEvent(
  "nbd_negotiate_options_check_magic",
  (magic: bigint) => `Checking opts magic ${hex(magic)}`,
);
export const nbd_negotiate_options_check_option = new TraceEvent(
  "nbd_negotiate_options_check_option",
  (option: number, name: string) => `Checking option ${option} (${name})`,
);
export const nbd_negotiate_begin = new TraceEvent(
  "nbd_negotiate_begin",
  () => "Beginning negotiation",
);
export const nbd_negotiate_new_style_size_flags = new TraceEvent(
  "nbd_negotiate_new_style_size_flags",
  (size: number, flags: number) => `advertising size ${size} and flags ${hex(flags)}`,
);
export const nbd_negotiate_success = new TraceEvent(
  "nbd_negotiate_success",
  () => "Negotiation succeeded",
);

// nbd/server.c: transmission.
export const nbd_receive_request = new TraceEvent(
  "nbd_receive_request",
  (magic: number, flags: number, type: number, from: number, len: number) =>
    `Got request: { magic = ${hex(magic)}, .flags = ${hex(flags)}, .type = ${
      hex(type)
    }, from = ${from}, len = ${len} }`,
);
new TraceEvent("nbd_blk_aio_attached"); // qemu's AIO contexts have no counterpart
new TraceEvent("nbd_blk_aio_detach");
export const nbd_co_send_simple_reply = new TraceEvent(
  "nbd_co_send_simple_reply",
  (handle: bigint, error: number, errName: string, len: number) =>
    `Send simple reply: handle = ${handle}, error = ${error} (${errName}), len = ${len}`,
);
export const nbd_co_send_structured_done = new TraceEvent(
  "nbd_co_send_structured_done",
  (handle: bigint) => `Send structured reply done: handle = ${handle}`,
);
export const nbd_co_send_structured_read = new TraceEvent(
  "nbd_co_send_structured_read",
  // qemu prints the buffer's address; there is no such pointer to show here.
  (handle: bigint, offset: number, len: number) =>
    `Send structured read data reply: handle = ${handle}, offset = ${offset}, data = (nil), len = ${len}`,
);
export const nbd_co_send_structured_read_hole = new TraceEvent(
  "nbd_co_send_structured_read_hole",
  (handle: bigint, offset: number, len: number) =>
    `Send structured read hole reply: handle = ${handle}, offset = ${offset}, len = ${len}`,
);
export const nbd_co_send_extents = new TraceEvent(
  "nbd_co_send_extents",
  (handle: bigint, extents: number, id: number, length: number, last: boolean) =>
    `Send block status reply: handle = ${handle}, extents = ${extents}, context = ${id} (extents cover ${length} bytes, last chunk = ${
      last ? 1 : 0
    })`,
);
export const nbd_co_send_structured_error = new TraceEvent(
  "nbd_co_send_structured_error",
  (handle: bigint, error: number, errName: string, msg: string) =>
    `Send structured error reply: handle = ${handle}, error = ${error} (${errName}), msg = '${msg}'`,
);
export const nbd_co_receive_request_decode_type = new TraceEvent(
  "nbd_co_receive_request_decode_type",
  (handle: bigint, type: number, name: string) =>
    `Decoding type: handle = ${handle}, type = ${type} (${name})`,
);
export const nbd_co_receive_request_payload_received = new TraceEvent(
  "nbd_co_receive_request_payload_received",
  (handle: bigint, len: number) => `Payload received: handle = ${handle}, len = ${len}`,
);
export const nbd_co_receive_align_compliance = new TraceEvent(
  "nbd_co_receive_align_compliance",
  (op: string, from: number, len: number, align: number) =>
    `client sent non-compliant unaligned ${op} request: from=${hex(from)}, len=${hex(len)}, align=${
      hex(align)
    }`,
);
export const nbd_trip = new TraceEvent("nbd_trip", () => "Reading request");
export const nbd_handshake_timer_cb = new TraceEvent(
  "nbd_handshake_timer_cb",
  () => "client took too long to negotiate",
);
new TraceEvent("nbd_connect_thread_sleep"); // nbd/client-connection.c

// denbd's own points: diagnostics qemu-nbd has no counterpart for.
export const denbd_accept_failed = new TraceEvent(
  "denbd_accept_failed",
  (msg: string) => `accept failed: ${msg}`,
);
export const denbd_request_failed = new TraceEvent(
  "denbd_request_failed",
  (handle: bigint, command: string, msg: string) =>
    `request failed: handle = ${handle}, command = ${command}: ${msg}`,
);
/**
 * The default engine fell back to threads (io_uring unavailable). A trace point, not a -v line:
 * qemu-nbd -v prints nothing of the kind, and QEMU's iotests compare -v output byte for byte.
 */
export const denbd_engine_fallback = new TraceEvent(
  "denbd_engine_fallback",
  (msg: string) => msg,
);
export const denbd_internal_error = new TraceEvent(
  "denbd_internal_error",
  (detail: string) => `unexpected exception (a denbd bug): ${detail}`,
);

/** qemu's nbd_err_lookup(): the name of an NBD error number in trace messages. */
export function nbdErrName(err: number): string {
  return NBD_ERR_NAMES[err] ?? "<unknown>";
}

const NBD_ERR_NAMES: Readonly<Record<number, string>> = {
  0: "success",
  1: "EPERM",
  5: "EIO",
  12: "ENOMEM",
  22: "EINVAL",
  28: "ENOSPC",
  75: "EOVERFLOW",
  95: "ENOTSUP",
  108: "ESHUTDOWN",
};

/** The 64-bit handle (cookie) from its two halves, for trace messages only. */
export function handleOf(hi: number, lo: number): bigint {
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
}
