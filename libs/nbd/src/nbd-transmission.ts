/**
 * Transmission phase headers (proto.md "Transmission"): the 28-byte request and the 16-byte
 * simple reply. Pure functions; encoders can write into a caller's buffer so a hot loop
 * allocates nothing.
 */
import {
  REQUEST_HEADER_SIZE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_HEADER_SIZE,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from './nbd-constants.js';
import { NbdProtocolError } from './nbd-protocol-error.js';
import { asBuffer } from './nbd-handshake.js';

export interface RequestHeader {
  flags: number;
  type: number;
  /** Opaque to the server: echoed in the reply. */
  cookie: bigint;
  /**
   * Byte offset. Offsets past 2^53 lose precision but stay larger than any export we serve,
   * so range checks still reject them.
   */
  offset: number;
  length: number;
}

const TWO_32 = 0x1_0000_0000;

export function encodeRequestHeader(
  header: RequestHeader,
  target: Buffer = Buffer.alloc(REQUEST_HEADER_SIZE),
  at = 0,
): Buffer {
  target.writeUInt32BE(REQUEST_MAGIC, at);
  target.writeUInt16BE(header.flags & 0xffff, at + 4);
  target.writeUInt16BE(header.type & 0xffff, at + 6);
  target.writeBigUInt64BE(BigInt.asUintN(64, header.cookie), at + 8);
  target.writeUInt32BE(Math.floor(header.offset / TWO_32) >>> 0, at + 16);
  target.writeUInt32BE((header.offset % TWO_32) >>> 0, at + 20);
  target.writeUInt32BE(header.length >>> 0, at + 24);
  return target;
}

/** Decodes the request header at `at`; a wrong magic throws (the connection is out of step). */
export function decodeRequestHeader(buf: Uint8Array, at = 0): RequestHeader {
  const b = asBuffer(buf);
  if (b.length - at < REQUEST_HEADER_SIZE) {
    throw new RangeError(`request header needs ${REQUEST_HEADER_SIZE} bytes, ${b.length - at} available`);
  }
  const magic = b.readUInt32BE(at);
  if (magic !== REQUEST_MAGIC) {
    throw new NbdProtocolError('NBD_BAD_MAGIC', `request magic 0x${magic.toString(16)} is not 0x25609513`, { magic });
  }
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    cookie: b.readBigUInt64BE(at + 8),
    offset: b.readUInt32BE(at + 16) * TWO_32 + b.readUInt32BE(at + 20),
    length: b.readUInt32BE(at + 24),
  };
}

export interface SimpleReplyHeader {
  error: number;
  cookie: bigint;
}

export function encodeSimpleReplyHeader(
  error: number,
  cookie: bigint,
  target: Buffer = Buffer.alloc(SIMPLE_REPLY_HEADER_SIZE),
  at = 0,
): Buffer {
  target.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  target.writeUInt32BE(error >>> 0, at + 4);
  target.writeBigUInt64BE(BigInt.asUintN(64, cookie), at + 8);
  return target;
}

/** Client side. We never negotiate structured replies, so their magic is a protocol error too. */
export function decodeSimpleReplyHeader(buf: Uint8Array, at = 0): SimpleReplyHeader {
  const b = asBuffer(buf);
  if (b.length - at < SIMPLE_REPLY_HEADER_SIZE) {
    throw new RangeError(`reply header needs ${SIMPLE_REPLY_HEADER_SIZE} bytes, ${b.length - at} available`);
  }
  const magic = b.readUInt32BE(at);
  if (magic === STRUCTURED_REPLY_MAGIC) {
    throw new NbdProtocolError('NBD_BAD_REPLY', 'structured reply received but structured replies were not negotiated');
  }
  if (magic !== SIMPLE_REPLY_MAGIC) {
    throw new NbdProtocolError('NBD_BAD_MAGIC', `reply magic 0x${magic.toString(16)} is not 0x67446698`, { magic });
  }
  return { error: b.readUInt32BE(at + 4), cookie: b.readBigUInt64BE(at + 8) };
}
