/**
 * Netlink and generic-netlink message encoding (linux/netlink.h, linux/genetlink.h) as pure
 * functions: header, attributes (TLV, 4-byte aligned, nestable), and parsing of replies,
 * acks and errors. Host byte order is little endian on every platform we run on.
 */

export const NLMSG_ERROR = 2;
export const NLMSG_DONE = 3;
export const NLM_F_REQUEST = 0x1;
export const NLM_F_MULTI = 0x2;
export const NLM_F_ACK = 0x4;
export const NLA_F_NESTED = 0x8000;
const NLA_TYPE_MASK = ~(NLA_F_NESTED | 0x4000) & 0xffff;

export const NLMSG_HDRLEN = 16;
export const GENL_HDRLEN = 4;
export const NLA_HDRLEN = 4;

/** The generic-netlink controller: resolves family names to ids. */
export const GENL_ID_CTRL = 0x10;
export const CTRL_CMD_GETFAMILY = 3;
export const CTRL_ATTR_FAMILY_ID = 1;
export const CTRL_ATTR_FAMILY_NAME = 2;

export type NetlinkAttribute =
  | { type: number; u8: number }
  | { type: number; u16: number }
  | { type: number; u32: number }
  | { type: number; u64: bigint | number }
  | { type: number; string: string }
  | { type: number; bytes: Uint8Array }
  | { type: number; nested: NetlinkAttribute[] };

export function align4(n: number): number {
  return (n + 3) & ~3;
}

/** Encodes attributes, each padded to 4 bytes. */
export function encodeAttributes(attrs: NetlinkAttribute[]): Buffer {
  return Buffer.concat(attrs.map(encodeAttribute));
}

function encodeAttribute(attr: NetlinkAttribute): Buffer {
  let payload: Buffer;
  let type = attr.type;
  if ('u8' in attr) payload = Buffer.from([attr.u8 & 0xff]);
  else if ('u16' in attr) {
    payload = Buffer.alloc(2);
    payload.writeUInt16LE(attr.u16, 0);
  } else if ('u32' in attr) {
    payload = Buffer.alloc(4);
    payload.writeUInt32LE(attr.u32 >>> 0, 0);
  } else if ('u64' in attr) {
    payload = Buffer.alloc(8);
    payload.writeBigUInt64LE(BigInt(attr.u64), 0);
  } else if ('string' in attr) payload = Buffer.from(attr.string + '\0', 'utf8');
  else if ('bytes' in attr) payload = Buffer.from(attr.bytes);
  else {
    payload = encodeAttributes(attr.nested);
    type |= NLA_F_NESTED;
  }
  const out = Buffer.alloc(align4(NLA_HDRLEN + payload.length));
  out.writeUInt16LE(NLA_HDRLEN + payload.length, 0);
  out.writeUInt16LE(type, 2);
  payload.copy(out, NLA_HDRLEN);
  return out;
}

export interface GenlRequest {
  family: number;
  command: number;
  version: number;
  seq: number;
  flags?: number;
  attributes?: NetlinkAttribute[];
}

/** nlmsghdr + genlmsghdr + attributes. */
export function encodeGenlRequest(request: GenlRequest): Buffer {
  const attrs = encodeAttributes(request.attributes ?? []);
  const out = Buffer.alloc(NLMSG_HDRLEN + GENL_HDRLEN + attrs.length);
  out.writeUInt32LE(out.length, 0);
  out.writeUInt16LE(request.family, 4);
  out.writeUInt16LE(request.flags ?? NLM_F_REQUEST | NLM_F_ACK, 6);
  out.writeUInt32LE(request.seq >>> 0, 8);
  out.writeUInt32LE(0, 12);
  out.writeUInt8(request.command, 16);
  out.writeUInt8(request.version, 17);
  attrs.copy(out, NLMSG_HDRLEN + GENL_HDRLEN);
  return out;
}

export type NetlinkMessage =
  | { kind: 'error'; seq: number; errno: number }
  | { kind: 'ack'; seq: number }
  | { kind: 'done'; seq: number }
  | { kind: 'genl'; seq: number; type: number; flags: number; command: number; attributes: Map<number, Buffer> };

/** Splits a datagram into messages. Attributes of genl messages are indexed by type (last wins). */
export function decodeNetlinkMessages(datagram: Uint8Array): NetlinkMessage[] {
  const buf = Buffer.from(datagram.buffer, datagram.byteOffset, datagram.byteLength);
  const out: NetlinkMessage[] = [];
  let at = 0;
  while (at + NLMSG_HDRLEN <= buf.length) {
    const length = buf.readUInt32LE(at);
    if (length < NLMSG_HDRLEN || at + length > buf.length) {
      throw new RangeError(`netlink message at ${at} claims ${length} bytes, ${buf.length - at} available`);
    }
    const type = buf.readUInt16LE(at + 4);
    const flags = buf.readUInt16LE(at + 6);
    const seq = buf.readUInt32LE(at + 8);
    if (type === NLMSG_ERROR) {
      if (length < NLMSG_HDRLEN + 4) throw new RangeError('truncated netlink error message');
      const error = buf.readInt32LE(at + NLMSG_HDRLEN);
      out.push(error === 0 ? { kind: 'ack', seq } : { kind: 'error', seq, errno: -error });
    } else if (type === NLMSG_DONE) {
      out.push({ kind: 'done', seq });
    } else {
      if (length < NLMSG_HDRLEN + GENL_HDRLEN) throw new RangeError('truncated generic netlink message');
      out.push({
        kind: 'genl',
        seq,
        type,
        flags,
        command: buf.readUInt8(at + NLMSG_HDRLEN),
        attributes: decodeAttributes(buf.subarray(at + NLMSG_HDRLEN + GENL_HDRLEN, at + length)),
      });
    }
    at += align4(length);
  }
  return out;
}

/** Attributes by type (nested flag stripped); decode a nested one by calling this on its payload. */
export function decodeAttributes(buf: Buffer): Map<number, Buffer> {
  const attrs = new Map<number, Buffer>();
  for (const [type, payload] of listAttributes(buf)) attrs.set(type, payload);
  return attrs;
}

/** Attributes in order, repeats kept (lists such as NBD_ATTR_DEVICE_LIST repeat one type). */
export function listAttributes(buf: Buffer): Array<[number, Buffer]> {
  const out: Array<[number, Buffer]> = [];
  let at = 0;
  while (at + NLA_HDRLEN <= buf.length) {
    const length = buf.readUInt16LE(at);
    if (length < NLA_HDRLEN || at + length > buf.length) {
      throw new RangeError(`attribute at ${at} claims ${length} bytes, ${buf.length - at} available`);
    }
    out.push([buf.readUInt16LE(at + 2) & NLA_TYPE_MASK, buf.subarray(at + NLA_HDRLEN, at + length)]);
    at += align4(length);
  }
  return out;
}
