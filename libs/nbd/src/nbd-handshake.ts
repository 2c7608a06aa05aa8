/**
 * The fixed-newstyle handshake (proto.md "Fixed newstyle negotiation"), both directions, as
 * pure functions over buffers. Decoders of variable-length messages take whatever bytes have
 * arrived and return `undefined` until a whole message is there, so a socket loop can feed
 * them without knowing the format.
 */
import {
  EXPORT_NAME_REPLY_PADDING,
  EXPORT_NAME_REPLY_SIZE,
  GREETING_SIZE,
  HandshakeFlag,
  IHAVEOPT,
  InfoType,
  MAX_STRING_BYTES,
  NBDMAGIC,
  OLDSTYLE_MAGIC,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
} from './nbd-constants.js';
import { NbdProtocolError } from './nbd-protocol-error.js';

// ---------------------------------------------------------------- greeting and client flags

/** S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export function encodeServerGreeting(
  handshakeFlags: number = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
): Buffer {
  const out = Buffer.alloc(GREETING_SIZE);
  out.writeBigUInt64BE(NBDMAGIC, 0);
  out.writeBigUInt64BE(IHAVEOPT, 8);
  out.writeUInt16BE(handshakeFlags & 0xffff, 16);
  return out;
}

export interface ServerGreeting {
  handshakeFlags: number;
}

/** Client side: the 18-byte greeting, or undefined when fewer bytes have arrived. */
export function decodeServerGreeting(buf: Uint8Array): ServerGreeting | undefined {
  if (buf.length < GREETING_SIZE) return undefined;
  const b = asBuffer(buf);
  const magic = b.readBigUInt64BE(0);
  if (magic !== NBDMAGIC) throw new NbdProtocolError('NBD_BAD_MAGIC', `greeting magic ${hex(magic)} is not NBDMAGIC`);
  const second = b.readBigUInt64BE(8);
  if (second === OLDSTYLE_MAGIC) {
    throw new NbdProtocolError('NBD_BAD_MAGIC', 'server speaks oldstyle negotiation, only fixed newstyle is supported');
  }
  if (second !== IHAVEOPT) throw new NbdProtocolError('NBD_BAD_MAGIC', `greeting magic ${hex(second)} is not IHAVEOPT`);
  return { handshakeFlags: b.readUInt16BE(16) };
}

/** C: 32-bit client flags. */
export function encodeClientFlags(flags: number): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(flags >>> 0, 0);
  return out;
}

export function decodeClientFlags(buf: Uint8Array): number | undefined {
  if (buf.length < 4) return undefined;
  return asBuffer(buf).readUInt32BE(0);
}

// ---------------------------------------------------------------- option requests

export interface OptionRequest {
  option: number;
  /** A view into the input; copy it if the input buffer is reused. */
  data: Buffer;
  /** Bytes this message took from the input. */
  size: number;
}

/** C: IHAVEOPT, option, length, data. */
export function encodeOptionRequest(option: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const out = Buffer.alloc(OPTION_HEADER_SIZE + data.length);
  out.writeBigUInt64BE(IHAVEOPT, 0);
  out.writeUInt32BE(option >>> 0, 8);
  out.writeUInt32BE(data.length, 12);
  out.set(data, OPTION_HEADER_SIZE);
  return out;
}

/**
 * Server side: one option request, or undefined until all of it has arrived. A wrong magic
 * or a length past `maxDataBytes` throws: the peer is not speaking NBD (or is hostile) and
 * the connection cannot be resynchronised.
 */
export function decodeOptionRequest(buf: Uint8Array, maxDataBytes = 64 * 1024): OptionRequest | undefined {
  if (buf.length < OPTION_HEADER_SIZE) return undefined;
  const b = asBuffer(buf);
  const magic = b.readBigUInt64BE(0);
  if (magic !== IHAVEOPT) throw new NbdProtocolError('NBD_BAD_MAGIC', `option magic ${hex(magic)} is not IHAVEOPT`);
  const option = b.readUInt32BE(8);
  const length = b.readUInt32BE(12);
  if (length > maxDataBytes) {
    throw new NbdProtocolError(
      'NBD_OPTION_TOO_LARGE',
      `option ${option} carries ${length} bytes, limit ${maxDataBytes}`,
      {
        option,
        length,
      },
    );
  }
  if (buf.length < OPTION_HEADER_SIZE + length) return undefined;
  return {
    option,
    data: b.subarray(OPTION_HEADER_SIZE, OPTION_HEADER_SIZE + length),
    size: OPTION_HEADER_SIZE + length,
  };
}

// ---------------------------------------------------------------- option replies

export interface OptionReplyMessage {
  option: number;
  type: number;
  data: Buffer;
  size: number;
}

/** S: reply magic, option, reply type, length, data. */
export function encodeOptionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const out = Buffer.alloc(OPTION_REPLY_HEADER_SIZE + data.length);
  out.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  out.writeUInt32BE(option >>> 0, 8);
  out.writeUInt32BE(type >>> 0, 12);
  out.writeUInt32BE(data.length, 16);
  out.set(data, OPTION_REPLY_HEADER_SIZE);
  return out;
}

/** An error reply carrying a human-readable message (the spec allows one in the data). */
export function encodeOptionErrorReply(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, stringBytes(message));
}

/** Client side: one option reply, or undefined until all of it has arrived. */
export function decodeOptionReply(buf: Uint8Array, maxDataBytes = 16 * 1024 * 1024): OptionReplyMessage | undefined {
  if (buf.length < OPTION_REPLY_HEADER_SIZE) return undefined;
  const b = asBuffer(buf);
  const magic = b.readBigUInt64BE(0);
  if (magic !== OPTION_REPLY_MAGIC) {
    throw new NbdProtocolError('NBD_BAD_MAGIC', `option reply magic ${hex(magic)} is wrong`);
  }
  const length = b.readUInt32BE(16);
  if (length > maxDataBytes) {
    throw new NbdProtocolError('NBD_OPTION_TOO_LARGE', `option reply carries ${length} bytes, limit ${maxDataBytes}`);
  }
  if (buf.length < OPTION_REPLY_HEADER_SIZE + length) return undefined;
  return {
    option: b.readUInt32BE(8),
    type: b.readUInt32BE(12),
    data: b.subarray(OPTION_REPLY_HEADER_SIZE, OPTION_REPLY_HEADER_SIZE + length),
    size: OPTION_REPLY_HEADER_SIZE + length,
  };
}

// ---------------------------------------------------------------- NBD_OPT_EXPORT_NAME

/** S: size, transmission flags, and 124 zero bytes unless both sides agreed on NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const out = Buffer.alloc(EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_REPLY_PADDING));
  writeU64(out, size, 0);
  out.writeUInt16BE(transmissionFlags & 0xffff, 8);
  return out;
}

export interface ExportNameReply {
  size: number;
  transmissionFlags: number;
  bytes: number;
}

export function decodeExportNameReply(buf: Uint8Array, noZeroes: boolean): ExportNameReply | undefined {
  const bytes = EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_REPLY_PADDING);
  if (buf.length < bytes) return undefined;
  const b = asBuffer(buf);
  return { size: readU64(b, 0, 'export size'), transmissionFlags: b.readUInt16BE(8), bytes };
}

// ---------------------------------------------------------------- NBD_OPT_INFO / NBD_OPT_GO

export interface InfoRequest {
  exportName: string;
  /** NBD_INFO_* types the client asked for. */
  requests: number[];
}

/** C: data of NBD_OPT_INFO / NBD_OPT_GO: name length, name, count, info types. */
export function encodeInfoRequest(exportName: string, requests: number[] = []): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const out = Buffer.alloc(4 + name.length + 2 + 2 * requests.length);
  out.writeUInt32BE(name.length, 0);
  out.set(name, 4);
  out.writeUInt16BE(requests.length, 4 + name.length);
  requests.forEach((r, i) => out.writeUInt16BE(r, 6 + name.length + 2 * i));
  return out;
}

/** Server side; throws NBD_BAD_OPTION_DATA when the lengths do not add up (→ NBD_REP_ERR_INVALID). */
export function decodeInfoRequest(data: Uint8Array): InfoRequest {
  const b = asBuffer(data);
  if (b.length < 6) throw badData(`info request is ${b.length} bytes, at least 6 needed`);
  const nameLength = b.readUInt32BE(0);
  if (nameLength > MAX_STRING_BYTES) throw badData(`export name of ${nameLength} bytes exceeds ${MAX_STRING_BYTES}`);
  if (4 + nameLength + 2 > b.length) throw badData(`export name length ${nameLength} runs past the option data`);
  const exportName = b.toString('utf8', 4, 4 + nameLength);
  const count = b.readUInt16BE(4 + nameLength);
  const expected = 4 + nameLength + 2 + 2 * count;
  if (expected !== b.length)
    throw badData(`info request with ${count} requests should be ${expected} bytes, is ${b.length}`);
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(b.readUInt16BE(6 + nameLength + 2 * i));
  return { exportName, requests };
}

/** Data of NBD_OPT_EXPORT_NAME: the bare name. */
export function decodeExportName(data: Uint8Array): string {
  if (data.length > MAX_STRING_BYTES) throw badData(`export name of ${data.length} bytes exceeds ${MAX_STRING_BYTES}`);
  return asBuffer(data).toString('utf8');
}

export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const out = Buffer.alloc(12);
  out.writeUInt16BE(InfoType.EXPORT, 0);
  writeU64(out, size, 2);
  out.writeUInt16BE(transmissionFlags & 0xffff, 10);
  return out;
}

export function encodeInfoName(name: string): Buffer {
  return Buffer.concat([u16(InfoType.NAME), stringBytes(name)]);
}

export function encodeInfoDescription(description: string): Buffer {
  return Buffer.concat([u16(InfoType.DESCRIPTION), stringBytes(description)]);
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const out = Buffer.alloc(14);
  out.writeUInt16BE(InfoType.BLOCK_SIZE, 0);
  out.writeUInt32BE(minimum, 2);
  out.writeUInt32BE(preferred, 6);
  out.writeUInt32BE(maximum, 10);
  return out;
}

export type Info =
  | { type: 'export'; size: number; transmissionFlags: number }
  | { type: 'name'; name: string }
  | { type: 'description'; description: string }
  | { type: 'block-size'; minimum: number; preferred: number; maximum: number }
  | { type: 'unknown'; infoType: number };

/** Client side: the data of one NBD_REP_INFO reply. */
export function decodeInfo(data: Uint8Array): Info {
  const b = asBuffer(data);
  if (b.length < 2) throw badReply(`NBD_REP_INFO of ${b.length} bytes`);
  const infoType = b.readUInt16BE(0);
  switch (infoType) {
    case InfoType.EXPORT:
      if (b.length !== 12) throw badReply(`NBD_INFO_EXPORT of ${b.length} bytes, expected 12`);
      return { type: 'export', size: readU64(b, 2, 'export size'), transmissionFlags: b.readUInt16BE(10) };
    case InfoType.NAME:
      return { type: 'name', name: b.toString('utf8', 2) };
    case InfoType.DESCRIPTION:
      return { type: 'description', description: b.toString('utf8', 2) };
    case InfoType.BLOCK_SIZE:
      if (b.length !== 14) throw badReply(`NBD_INFO_BLOCK_SIZE of ${b.length} bytes, expected 14`);
      return {
        type: 'block-size',
        minimum: b.readUInt32BE(2),
        preferred: b.readUInt32BE(6),
        maximum: b.readUInt32BE(10),
      };
    default:
      return { type: 'unknown', infoType };
  }
}

// ---------------------------------------------------------------- NBD_OPT_LIST

/** S: data of one NBD_REP_SERVER reply: name length, name (no description). */
export function encodeServerEntry(name: string): Buffer {
  const bytes = stringBytes(name);
  return Buffer.concat([u32(bytes.length), bytes]);
}

export function decodeServerEntry(data: Uint8Array): string {
  const b = asBuffer(data);
  if (b.length < 4) throw badReply(`NBD_REP_SERVER of ${b.length} bytes`);
  const length = b.readUInt32BE(0);
  if (4 + length > b.length) throw badReply(`NBD_REP_SERVER name length ${length} runs past the reply`);
  return b.toString('utf8', 4, 4 + length);
}

// ---------------------------------------------------------------- shared

export function asBuffer(buf: Uint8Array): Buffer {
  return Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
}

function writeU64(out: Buffer, value: number, at: number): void {
  out.writeBigUInt64BE(BigInt(value), at);
}

function readU64(b: Buffer, at: number, what: string): number {
  const value = b.readBigUInt64BE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw badReply(`${what} ${value} exceeds 2^53`);
  return Number(value);
}

function u16(value: number): Buffer {
  const out = Buffer.alloc(2);
  out.writeUInt16BE(value, 0);
  return out;
}

function u32(value: number): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(value, 0);
  return out;
}

/** UTF-8 bytes of a string, cut to the protocol's 4096-byte limit for strings. */
function stringBytes(s: string): Buffer {
  const bytes = Buffer.from(s, 'utf8');
  return bytes.length <= MAX_STRING_BYTES ? bytes : bytes.subarray(0, MAX_STRING_BYTES);
}

function hex(value: bigint): string {
  return '0x' + value.toString(16);
}

function badData(message: string): NbdProtocolError {
  return new NbdProtocolError('NBD_BAD_OPTION_DATA', message);
}

function badReply(message: string): NbdProtocolError {
  return new NbdProtocolError('NBD_BAD_REPLY', message);
}
