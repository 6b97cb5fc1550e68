/**
 * The fixed-newstyle handshake as a pure state machine: `step(state, bytes)` consumes what it can
 * from the bytes buffered so far and returns the next state, the replies to send and an effect.
 * No I/O happens here, so tests and fuzzers drive it byte by byte.
 *
 * Behaviour matches qemu-nbd 7.2 (nbd/server.c): the option set, error choices (ERR_INVALID for
 * bad lengths, ERR_POLICY for STARTTLS without TLS, ERR_UNSUP for unknown options and keep
 * going), LIST_META_CONTEXT allowed before STRUCTURED_REPLY, INFO_BLOCK_SIZE always sent.
 *
 * @module
 */

import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_SEND_DF,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAX_BUFFER_SIZE,
  NBD_MAX_STRING_SIZE,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  optionName,
} from "./constants.ts";
import {
  decodeOptionHeader,
  encodeBlockSizeBody,
  encodeExportBody,
  encodeExportNameReply,
  encodeInfo,
  encodeMetaContext,
  encodeOptionReply,
  encodeServerEntry,
  OPTION_HEADER_SIZE,
  utf8,
  view,
} from "./wire.ts";
import { metaContextNames, type MetaSelection, parseMetaQueries } from "./meta_context.ts";

/** What the handshake knows about the one export (qemu-nbd serves exactly one). */
export interface ExportDescriptor {
  readonly name: string;
  readonly description: string | undefined;
  readonly size: number;
  /** Transmission flags without SEND_DF (added when structured replies are negotiated). */
  readonly flags: number;
  /** Request alignment: minimum block size reported to clients that ask for it. */
  readonly minBlock: number;
  /** Largest payload. */
  readonly maxBlock: number;
  /** qemu:allocation-depth offered (-A). */
  readonly allocationDepth: boolean;
  /** qemu:dirty-bitmap:NAME offered (-B). */
  readonly bitmaps: readonly string[];
}

/** Result of a successful handshake. */
export interface Negotiated {
  readonly export: ExportDescriptor;
  readonly structured: boolean;
  readonly meta: MetaSelection;
  /** Transmission flags as sent to the client. */
  readonly flags: number;
}

/** Mutable per-connection negotiation state (lives inside the machine's state). */
interface Context {
  readonly config: ExportDescriptor;
  readonly fixed: boolean;
  readonly noZeroes: boolean;
  structured: boolean;
  meta: MetaSelection;
  options: number;
  /** TLS is configured (--tls-creds): STARTTLS is required first, then refused as a repeat. */
  readonly tls: boolean;
  /** TLS is configured and the connection is not encrypted yet. */
  beforeTls: boolean;
}

/** The machine's states: a discriminated union, handled by an exhaustive switch. */
export type HandshakeState =
  /** Waiting for the client's 32-bit flags. */
  | { readonly kind: "clientFlags"; readonly config: ExportDescriptor; readonly tls: boolean }
  /** Waiting for the 16-byte header of the next option. */
  | { readonly kind: "optionHeader"; readonly ctx: Context }
  /** Waiting for all `length` bytes of an option we parse. */
  | {
    readonly kind: "optionData";
    readonly ctx: Context;
    readonly option: number;
    readonly length: number;
  }
  /** Discarding `remaining` bytes of an option we answer without reading, then sending `reply`. */
  | {
    readonly kind: "skip";
    readonly ctx: Context;
    readonly remaining: number;
    readonly replies: readonly Uint8Array[];
    /** After the replies: close (with this reason for the log, unless `clean`). */
    readonly close?: { readonly reason: string; readonly clean: boolean };
  }
  /** Negotiation finished or failed: nothing more is consumed. */
  | { readonly kind: "finished" };

export type Effect =
  /** More bytes are needed before anything else can happen. */
  | { readonly kind: "more" }
  /** Keep stepping: the state advanced. */
  | { readonly kind: "continue" }
  /** Enter transmission. */
  | { readonly kind: "go"; readonly negotiated: Negotiated }
  /**
   * Send the replies (STARTTLS's ACK), then run the TLS handshake on the connection before
   * stepping on; the state already holds nothing negotiated before it.
   */
  | { readonly kind: "starttls" }
  /** Close the connection after sending the replies (`reason` for the log). */
  | { readonly kind: "close"; readonly reason: string; readonly clean: boolean };

export interface StepResult {
  readonly state: HandshakeState;
  /** Bytes of the input consumed. */
  readonly consumed: number;
  readonly replies: readonly Uint8Array[];
  readonly effect: Effect;
}

/**
 * Largest option payload buffered whole. qemu disconnects above 32 MiB (CVE-2017-15119); option
 * payloads we parse are far smaller (a name ≤ 4096 plus requests), so larger ones are answered
 * without being held in memory.
 */
export const MAX_PARSED_OPTION = 1024 * 1024;
/** Options accepted on one connection before it is closed (the handshake time limit also bounds it). */
export const MAX_OPTIONS = 4096;

const MORE: Effect = { kind: "more" };
const CONTINUE: Effect = { kind: "continue" };
const FINISHED: HandshakeState = { kind: "finished" };

/**
 * The initial state; the caller sends `encodeGreeting()` first. With `tls` (qemu-nbd's
 * --tls-creds) every option but STARTTLS is refused until the connection is encrypted.
 */
export function initialState(config: ExportDescriptor, tls = false): HandshakeState {
  return { kind: "clientFlags", config, tls };
}

function noMeta(): MetaSelection {
  return { baseAllocation: false, allocationDepth: false, bitmaps: [], count: 0 };
}

function close(
  reason: string,
  replies: Uint8Array[] = [],
  consumed = 0,
  clean = false,
): StepResult {
  return { state: FINISHED, consumed, replies, effect: { kind: "close", reason, clean } };
}

function errorReply(option: number, type: number, message: string): Uint8Array {
  return encodeOptionReply(option, type, utf8(message));
}

/** Advance the machine over `input` (the bytes buffered so far). */
export function step(state: HandshakeState, input: Uint8Array): StepResult {
  switch (state.kind) {
    case "clientFlags": {
      if (input.length < 4) return { state, consumed: 0, replies: [], effect: MORE };
      const flags = view(input).getUint32(0);
      const unknown = flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
      if (unknown !== 0) {
        return close(`Unknown client flags 0x${unknown.toString(16)} received`, [], 4);
      }
      const ctx: Context = {
        config: state.config,
        fixed: (flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0,
        noZeroes: (flags & NBD_FLAG_C_NO_ZEROES) !== 0,
        structured: false,
        meta: noMeta(),
        options: 0,
        tls: state.tls,
        beforeTls: state.tls,
      };
      return { state: { kind: "optionHeader", ctx }, consumed: 4, replies: [], effect: CONTINUE };
    }
    case "optionHeader":
      return stepHeader(state.ctx, input);
    case "optionData": {
      if (input.length < state.length) return { state, consumed: 0, replies: [], effect: MORE };
      return handleOption(state.ctx, state.option, input.subarray(0, state.length), state.length);
    }
    case "skip": {
      const n = Math.min(state.remaining, input.length);
      if (n < state.remaining) {
        return {
          state: { ...state, remaining: state.remaining - n },
          consumed: n,
          replies: [],
          effect: n ? CONTINUE : MORE,
        };
      }
      if (state.close) {
        return close(state.close.reason, [...state.replies], n, state.close.clean);
      }
      return {
        state: { kind: "optionHeader", ctx: state.ctx },
        consumed: n,
        replies: state.replies,
        effect: CONTINUE,
      };
    }
    case "finished":
      return {
        state,
        consumed: 0,
        replies: [],
        effect: { kind: "close", reason: "handshake finished", clean: true },
      };
  }
}

function stepHeader(ctx: Context, input: Uint8Array): StepResult {
  if (input.length < OPTION_HEADER_SIZE) {
    return { state: { kind: "optionHeader", ctx }, consumed: 0, replies: [], effect: MORE };
  }
  const h = decodeOptionHeader(input);
  if (!h.magicOk) return close("Bad magic received", [], OPTION_HEADER_SIZE);
  if (h.length > NBD_MAX_BUFFER_SIZE) {
    return close(
      `len (${h.length}) is larger than max len (${NBD_MAX_BUFFER_SIZE})`,
      [],
      OPTION_HEADER_SIZE,
    );
  }
  if (++ctx.options > MAX_OPTIONS) return close("too many options", [], OPTION_HEADER_SIZE);

  const skip = (
    replies: Uint8Array[],
    closeAfter?: { reason: string; clean: boolean },
  ): StepResult => ({
    state: { kind: "skip", ctx, remaining: h.length, replies, close: closeAfter },
    consumed: OPTION_HEADER_SIZE,
    replies: [],
    effect: CONTINUE,
  });
  const parse = (): StepResult => ({
    state: { kind: "optionData", ctx, option: h.option, length: h.length },
    consumed: OPTION_HEADER_SIZE,
    replies: [],
    effect: CONTINUE,
  });
  const unexpectedLength = () =>
    skip([
      errorReply(
        h.option,
        NBD_REP_ERR_INVALID,
        `option '${optionName(h.option)}' has unexpected length`,
      ),
    ]);

  if (ctx.beforeTls) {
    if (!ctx.fixed) return close(`Unsupported option 0x${hex(h.option)}`, [], OPTION_HEADER_SIZE);
    const notYet = `Option 0x${hex(h.option)} not permitted before TLS`;
    switch (h.option) {
      case NBD_OPT_STARTTLS: {
        if (h.length) {
          // A client that cannot start TLS correctly is dropped (after the error reply).
          const why = `option '${optionName(h.option)}' has unexpected length`;
          return skip([errorReply(h.option, NBD_REP_ERR_INVALID, why)], {
            reason: why,
            clean: false,
          });
        }
        // Nothing negotiated in plain text survives the upgrade (nothing can be, but be sure).
        ctx.beforeTls = false;
        ctx.structured = false;
        ctx.meta = noMeta();
        return {
          state: { kind: "optionHeader", ctx },
          consumed: OPTION_HEADER_SIZE,
          replies: [encodeOptionReply(h.option, NBD_REP_ACK)],
          effect: { kind: "starttls" },
        };
      }
      case NBD_OPT_EXPORT_NAME:
        // No error reply is possible: drop the connection.
        return close(notYet, [], OPTION_HEADER_SIZE);
      case NBD_OPT_ABORT:
        // Refused like the rest, then the client is gone anyway: not an error in the log.
        return skip([errorReply(h.option, NBD_REP_ERR_TLS_REQD, notYet)], {
          reason: "client sent NBD_OPT_ABORT",
          clean: true,
        });
      default:
        return skip([errorReply(h.option, NBD_REP_ERR_TLS_REQD, notYet)]);
    }
  }

  if (!ctx.fixed) {
    // Old (non-fixed) newstyle clients may only send EXPORT_NAME.
    if (h.option !== NBD_OPT_EXPORT_NAME) {
      return close(
        `Unsupported option ${h.option} (${optionName(h.option)})`,
        [],
        OPTION_HEADER_SIZE,
      );
    }
  }

  switch (h.option) {
    case NBD_OPT_EXPORT_NAME:
      if (h.length > NBD_MAX_STRING_SIZE) {
        return close("Bad length received", [], OPTION_HEADER_SIZE);
      }
      return parse();
    case NBD_OPT_ABORT:
      // The spec asks for an ACK; the client may hang up before reading it.
      return close(
        "client sent NBD_OPT_ABORT",
        [encodeOptionReply(h.option, NBD_REP_ACK)],
        OPTION_HEADER_SIZE,
        true,
      );
    case NBD_OPT_LIST:
      if (h.length) return unexpectedLength();
      return skip([
        encodeOptionReply(
          h.option,
          NBD_REP_SERVER,
          encodeServerEntry(ctx.config.name, ctx.config.description),
        ),
        encodeOptionReply(h.option, NBD_REP_ACK),
      ]);
    case NBD_OPT_STARTTLS:
      if (h.length) return unexpectedLength();
      if (ctx.tls) {
        return skip([errorReply(h.option, NBD_REP_ERR_INVALID, "TLS already enabled")]);
      }
      return skip([errorReply(h.option, NBD_REP_ERR_POLICY, "TLS not configured")]);
    case NBD_OPT_STRUCTURED_REPLY:
      if (h.length) return unexpectedLength();
      if (ctx.structured) {
        return skip([
          errorReply(h.option, NBD_REP_ERR_INVALID, "structured reply already negotiated"),
        ]);
      }
      ctx.structured = true;
      return skip([encodeOptionReply(h.option, NBD_REP_ACK)]);
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
    case NBD_OPT_LIST_META_CONTEXT:
      if (h.length > MAX_PARSED_OPTION) return unexpectedLength();
      return parse();
    case NBD_OPT_SET_META_CONTEXT:
      if (!ctx.structured) {
        return skip([
          errorReply(
            h.option,
            NBD_REP_ERR_INVALID,
            "request option 'set meta context' when structured reply is not negotiated",
          ),
        ]);
      }
      if (h.length > MAX_PARSED_OPTION) {
        ctx.meta = noMeta();
        return skip([errorReply(h.option, NBD_REP_ERR_TOO_BIG, "too many meta context queries")]);
      }
      return parse();
    default:
      return skip([
        errorReply(
          h.option,
          NBD_REP_ERR_UNSUP,
          `Unsupported option ${h.option} (${optionName(h.option)})`,
        ),
      ]);
  }
}

function hex(n: number): string {
  return n.toString(16);
}

function transmissionFlags(ctx: Context): number {
  return ctx.config.flags | (ctx.structured ? NBD_FLAG_SEND_DF : 0);
}

function handleOption(
  ctx: Context,
  option: number,
  data: Uint8Array,
  consumed: number,
): StepResult {
  const next = (replies: Uint8Array[]): StepResult => ({
    state: { kind: "optionHeader", ctx },
    consumed,
    replies,
    effect: CONTINUE,
  });
  const invalid = (msg: string) => next([errorReply(option, NBD_REP_ERR_INVALID, msg)]);

  switch (option) {
    case NBD_OPT_EXPORT_NAME: {
      // No error reply is possible for EXPORT_NAME: an unknown name drops the connection.
      if (!sameName(data, ctx.config.name)) return close("export not found", [], consumed);
      const negotiated = finish(ctx);
      return {
        state: FINISHED,
        consumed,
        replies: [encodeExportNameReply(ctx.config.size, negotiated.flags, ctx.noZeroes)],
        effect: { kind: "go", negotiated },
      };
    }
    case NBD_OPT_INFO:
    case NBD_OPT_GO: {
      const req = parseInfoRequest(data);
      if (typeof req === "string") return invalid(req);
      if (!sameName(req.name, ctx.config.name)) {
        return next([
          errorReply(option, NBD_REP_ERR_UNKNOWN, `export '${sanitize(req.name)}' not present`),
        ]);
      }
      const cfg = ctx.config;
      const replies: Uint8Array[] = [];
      if (req.wantName) {
        replies.push(encodeOptionReply(option, NBD_REP_INFO, encodeInfo(NBD_INFO_NAME, req.name)));
      }
      if (cfg.description !== undefined) {
        replies.push(
          encodeOptionReply(
            option,
            NBD_REP_INFO,
            encodeInfo(NBD_INFO_DESCRIPTION, utf8(cfg.description)),
          ),
        );
      }
      // qemu always sends BLOCK_SIZE; the real minimum only to clients that will obey it
      // (they asked, or this is INFO), 1 otherwise for old clients.
      const min = option === NBD_OPT_INFO || req.wantBlockSize ? cfg.minBlock : 1;
      replies.push(
        encodeOptionReply(
          option,
          NBD_REP_INFO,
          encodeInfo(
            NBD_INFO_BLOCK_SIZE,
            encodeBlockSizeBody(min, Math.max(4096, min), cfg.maxBlock),
          ),
        ),
      );
      const flags = transmissionFlags(ctx);
      replies.push(
        encodeOptionReply(
          option,
          NBD_REP_INFO,
          encodeInfo(NBD_INFO_EXPORT, encodeExportBody(cfg.size, flags)),
        ),
      );
      if (option === NBD_OPT_INFO && !req.wantBlockSize && cfg.minBlock > 1) {
        replies.push(
          errorReply(
            option,
            NBD_REP_ERR_BLOCK_SIZE_REQD,
            "request NBD_INFO_BLOCK_SIZE to use this export",
          ),
        );
        return next(replies);
      }
      replies.push(encodeOptionReply(option, NBD_REP_ACK));
      if (option === NBD_OPT_INFO) return next(replies);
      return {
        state: FINISHED,
        consumed,
        replies,
        effect: { kind: "go", negotiated: finish(ctx) },
      };
    }
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT: {
      const isSet = option === NBD_OPT_SET_META_CONTEXT;
      if (isSet) ctx.meta = noMeta(); // SET replaces the previous selection even when it fails
      const parsed = parseMetaQueries(data, isSet, ctx.config);
      if (typeof parsed === "string") return invalid(parsed);
      if (!sameName(parsed.exportName, ctx.config.name)) {
        return next([
          errorReply(
            option,
            NBD_REP_ERR_UNKNOWN,
            `export '${sanitize(parsed.exportName)}' not present`,
          ),
        ]);
      }
      const replies = metaContextNames(parsed.selection, ctx.config).map(([id, name]) =>
        encodeOptionReply(option, NBD_REP_META_CONTEXT, encodeMetaContext(isSet ? id : 0, name))
      );
      replies.push(encodeOptionReply(option, NBD_REP_ACK));
      if (isSet) ctx.meta = parsed.selection;
      return next(replies);
    }
    default:
      // Only options routed to "optionData" by stepHeader arrive here.
      return next([
        errorReply(
          option,
          NBD_REP_ERR_UNSUP,
          `Unsupported option ${option} (${optionName(option)})`,
        ),
      ]);
  }
}

function finish(ctx: Context): Negotiated {
  return {
    export: ctx.config,
    structured: ctx.structured,
    // Block status needs structured replies; a selection made without them is void.
    meta: ctx.structured ? ctx.meta : noMeta(),
    flags: transmissionFlags(ctx),
  };
}

interface InfoRequest {
  readonly name: Uint8Array;
  readonly wantName: boolean;
  readonly wantBlockSize: boolean;
}

/** Parse INFO/GO data: u32 name length, name, u16 count, count × u16 info types. */
function parseInfoRequest(data: Uint8Array): InfoRequest | string {
  if (data.length < 4) return "Inconsistent lengths in option";
  const v = view(data);
  const nameLen = v.getUint32(0);
  if (nameLen > NBD_MAX_STRING_SIZE) return `Invalid name length: ${nameLen}`;
  if (4 + nameLen + 2 > data.length) return "Inconsistent lengths in option";
  const name = data.subarray(4, 4 + nameLen);
  const count = v.getUint16(4 + nameLen);
  if (4 + nameLen + 2 + 2 * count !== data.length) {
    return `option '${optionName(NBD_OPT_GO)}' has unexpected length`;
  }
  let wantName = false;
  let wantBlockSize = false;
  for (let i = 0; i < count; i++) {
    const t = v.getUint16(4 + nameLen + 2 + 2 * i);
    if (t === NBD_INFO_NAME) wantName = true;
    else if (t === NBD_INFO_BLOCK_SIZE) wantBlockSize = true;
  }
  return { name, wantName, wantBlockSize };
}

const nameEncoder = new TextEncoder();

function sameName(bytes: Uint8Array, name: string): boolean {
  const want = nameEncoder.encode(name);
  if (want.length !== bytes.length) return false;
  for (let i = 0; i < want.length; i++) if (want[i] !== bytes[i]) return false;
  return true;
}

/** A client-supplied name made safe to echo: printable, at most 80 characters (as qemu). */
function sanitize(bytes: Uint8Array): string {
  const s = new TextDecoder().decode(bytes).replace(/[^\x20-\x7e]/g, "?");
  return s.length > 80 ? s.slice(0, 80) + "..." : s;
}
