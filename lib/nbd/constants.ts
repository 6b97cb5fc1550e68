/**
 * NBD wire constants, spelled as in the protocol document (doc/proto.md) so one grep finds the
 * spec, qemu, nbdkit and denbd.
 *
 * @module
 */

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Transmission flags.
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// Option reply types.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
export const NBD_REP_ERR_UNSUP = REP_ERR + 1;
export const NBD_REP_ERR_POLICY = REP_ERR + 2;
export const NBD_REP_ERR_INVALID = REP_ERR + 3;
export const NBD_REP_ERR_PLATFORM = REP_ERR + 4;
export const NBD_REP_ERR_TLS_REQD = REP_ERR + 5;
export const NBD_REP_ERR_UNKNOWN = REP_ERR + 6;
export const NBD_REP_ERR_SHUTDOWN = REP_ERR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const NBD_REP_ERR_TOO_BIG = REP_ERR + 9;

// NBD_REP_INFO types.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Commands.
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// Command flags.
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// Structured reply.
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

// Error numbers on the wire.
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Longest string (export name, description, context name) the protocol allows. */
export const NBD_MAX_STRING_SIZE = 4096;
/** Largest READ/WRITE payload, as qemu-nbd (32 MiB). */
export const NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024;
/** Extents per block-status chunk, as qemu (2^20 bytes of descriptors). */
export const NBD_MAX_BLOCK_STATUS_EXTENTS = (1 << 20) / 8;

/** Meta-context ids as qemu assigns them. */
export const META_ID_BASE_ALLOCATION = 0;
export const META_ID_ALLOCATION_DEPTH = 1;

export const NBD_REQUEST_SIZE = 28;
export const NBD_SIMPLE_REPLY_SIZE = 16;
export const NBD_CHUNK_HEADER_SIZE = 20;

const OPTION_NAMES: Record<number, string> = {
  [NBD_OPT_EXPORT_NAME]: "export name",
  [NBD_OPT_ABORT]: "abort",
  [NBD_OPT_LIST]: "list",
  [NBD_OPT_PEEK_EXPORT]: "peek export",
  [NBD_OPT_STARTTLS]: "starttls",
  [NBD_OPT_INFO]: "info",
  [NBD_OPT_GO]: "go",
  [NBD_OPT_STRUCTURED_REPLY]: "structured reply",
  [NBD_OPT_LIST_META_CONTEXT]: "list meta context",
  [NBD_OPT_SET_META_CONTEXT]: "set meta context",
  [NBD_OPT_EXTENDED_HEADERS]: "extended headers",
};

/** Human name of an option, for messages. */
export function optionName(opt: number): string {
  return OPTION_NAMES[opt] ?? "<unknown>";
}

const COMMAND_NAMES = [
  "read",
  "write",
  "disconnect",
  "flush",
  "trim",
  "cache",
  "write zeroes",
  "block status",
];

/** Human name of a command, for messages. */
export function commandName(cmd: number): string {
  return COMMAND_NAMES[cmd] ?? "<unknown>";
}

/** Map an errno from the block layer to the NBD error sent on the wire (as qemu's table does). */
export function nbdErrno(errno: number): number {
  switch (errno) {
    case 0:
      return 0;
    case 1: // EPERM
    case 30: // EROFS
      return NBD_EPERM;
    case 5:
      return NBD_EIO;
    case 12:
      return NBD_ENOMEM;
    case 28: // ENOSPC
    case 122: // EDQUOT
    case 27: // EFBIG
      return NBD_ENOSPC;
    case 75:
      return NBD_EOVERFLOW;
    case 95:
      return NBD_ENOTSUP;
    case 108:
      return NBD_ESHUTDOWN;
    default:
      return NBD_EINVAL;
  }
}
