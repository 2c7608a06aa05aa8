/**
 * Numbers of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md). Everything on the wire
 * is big endian. Names follow the spec without the `NBD_` prefix.
 */

/** "NBDMAGIC": first 8 bytes the server sends. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle magic, also the prefix of every option request. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Magic of every option reply. */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
/** Old-style negotiation magic; we never send it, clients reject servers that do. */
export const OLDSTYLE_MAGIC = 0x00420281861253n;

export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server → client, 16 bits). */
export const HandshakeFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags (client → server, 32 bits). */
export const ClientFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Option types (NBD_OPT_*). */
export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const REP_ERR = 0x80000000;

/** Option reply types (NBD_REP_*); errors have bit 31 set. */
export const OptionReply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: (REP_ERR | 1) >>> 0,
  ERR_POLICY: (REP_ERR | 2) >>> 0,
  ERR_INVALID: (REP_ERR | 3) >>> 0,
  ERR_PLATFORM: (REP_ERR | 4) >>> 0,
  ERR_TLS_REQD: (REP_ERR | 5) >>> 0,
  ERR_UNKNOWN: (REP_ERR | 6) >>> 0,
  ERR_SHUTDOWN: (REP_ERR | 7) >>> 0,
  ERR_BLOCK_SIZE_REQD: (REP_ERR | 8) >>> 0,
  ERR_TOO_BIG: (REP_ERR | 9) >>> 0,
  ERR_EXT_HEADER_REQD: (REP_ERR | 10) >>> 0,
} as const;

export function isOptionReplyError(type: number): boolean {
  return (type & REP_ERR) !== 0;
}

/** Information types inside NBD_REP_INFO and NBD_OPT_INFO/GO requests. */
export const InfoType = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags (16 bits, sent with the export size). */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

/** Request types (NBD_CMD_*). */
export const Command = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** Command flags (16 bits in the request header). */
export const CommandFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

/** Error values of replies: the spec restricts them to this set (Linux errno numbers). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export const GREETING_SIZE = 18;
export const CLIENT_FLAGS_SIZE = 4;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_HEADER_SIZE = 16;
/** EXPORT_NAME reply: size (8) + flags (2) + 124 reserved zero bytes unless NO_ZEROES. */
export const EXPORT_NAME_REPLY_SIZE = 10;
export const EXPORT_NAME_REPLY_PADDING = 124;
/** Strings (export names, messages) MUST be no longer than 4096 bytes (proto.md "Conventions"). */
export const MAX_STRING_BYTES = 4096;
