/**
 * rtnetlink messages (rtnetlink(7), netlink(7)) for the few operations a slot's namespace needs:
 * bring a link up, add an IPv4 address, add a default route; and the acks that answer them.
 * Pure functions: encoding and decoding only, no sockets.
 */
import { parseIpv4 } from './ipv4.js';
import { TypedError } from '#service-kit';

export const NLMSG_ERROR = 2;
export const RTM_NEWLINK = 16;
export const RTM_NEWADDR = 20;
export const RTM_NEWROUTE = 24;
const NLM_F_REQUEST = 0x1;
const NLM_F_ACK = 0x4;
const NLM_F_EXCL = 0x200;
const NLM_F_CREATE = 0x400;
const AF_UNSPEC = 0;
const AF_INET = 2;
const IFF_UP = 0x1;
const IFA_ADDRESS = 1;
const IFA_LOCAL = 2;
const RTA_OIF = 4;
const RTA_GATEWAY = 5;
const RT_TABLE_MAIN = 254;
const RTPROT_BOOT = 3;
const RT_SCOPE_UNIVERSE = 0;
const RTN_UNICAST = 1;
const NLMSG_HDRLEN = 16;

export class NetlinkMessageInvalid extends TypedError {
  readonly code = 'NETLINK_MESSAGE_INVALID';
  constructor(
    readonly offset: number,
    reason: string,
  ) {
    super(`malformed netlink message at byte ${offset}: ${reason}`);
  }
}

function align4(n: number): number {
  return (n + 3) & ~3;
}

function attr(type: number, data: Buffer): Buffer {
  const out = Buffer.alloc(align4(4 + data.length));
  out.writeUInt16LE(4 + data.length, 0);
  out.writeUInt16LE(type, 2);
  data.copy(out, 4);
  return out;
}

function ipv4Bytes(address: string): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(parseIpv4(address), 0);
  return b;
}

function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(value, 0);
  return b;
}

function message(type: number, flags: number, seq: number, body: Buffer[]): Buffer {
  const payload = Buffer.concat(body);
  const header = Buffer.alloc(NLMSG_HDRLEN);
  header.writeUInt32LE(NLMSG_HDRLEN + payload.length, 0);
  header.writeUInt16LE(type, 4);
  header.writeUInt16LE(flags | NLM_F_REQUEST | NLM_F_ACK, 6);
  header.writeUInt32LE(seq, 8);
  header.writeUInt32LE(0, 12);
  return Buffer.concat([header, payload, Buffer.alloc(align4(payload.length) - payload.length)]);
}

/** `ip link set <ifindex> up` */
export function linkUp(seq: number, ifindex: number): Buffer {
  const ifinfo = Buffer.alloc(16);
  ifinfo.writeUInt8(AF_UNSPEC, 0);
  ifinfo.writeInt32LE(ifindex, 4);
  ifinfo.writeUInt32LE(IFF_UP, 8);
  ifinfo.writeUInt32LE(IFF_UP, 12);
  return message(RTM_NEWLINK, 0, seq, [ifinfo]);
}

/** `ip addr add <address>/<prefix> dev <ifindex>` */
export function addAddress(seq: number, ifindex: number, address: string, prefix: number): Buffer {
  const ifaddr = Buffer.alloc(8);
  ifaddr.writeUInt8(AF_INET, 0);
  ifaddr.writeUInt8(prefix, 1);
  ifaddr.writeUInt8(0, 2);
  ifaddr.writeUInt8(RT_SCOPE_UNIVERSE, 3);
  ifaddr.writeUInt32LE(ifindex, 4);
  const ip = ipv4Bytes(address);
  return message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq, [ifaddr, attr(IFA_LOCAL, ip), attr(IFA_ADDRESS, ip)]);
}

/** `ip route add default via <gateway> dev <ifindex>` */
export function addDefaultRoute(seq: number, gateway: string, ifindex: number): Buffer {
  const rt = Buffer.alloc(12);
  rt.writeUInt8(AF_INET, 0);
  rt.writeUInt8(0, 1); // dst_len 0: the default route
  rt.writeUInt8(RT_TABLE_MAIN, 4);
  rt.writeUInt8(RTPROT_BOOT, 5);
  rt.writeUInt8(RT_SCOPE_UNIVERSE, 6);
  rt.writeUInt8(RTN_UNICAST, 7);
  return message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq, [
    rt,
    attr(RTA_GATEWAY, ipv4Bytes(gateway)),
    attr(RTA_OIF, u32(ifindex)),
  ]);
}

export interface NetlinkAck {
  seq: number;
  /** 0 for success, else a positive errno. */
  errno: number;
}

/** The acks (NLMSG_ERROR messages) in a buffer read from the socket; other messages are skipped. */
export function parseAcks(buf: Buffer): NetlinkAck[] {
  const acks: NetlinkAck[] = [];
  let off = 0;
  while (off + NLMSG_HDRLEN <= buf.length) {
    const len = buf.readUInt32LE(off);
    if (len < NLMSG_HDRLEN || off + len > buf.length) throw new NetlinkMessageInvalid(off, `length ${len}`);
    const type = buf.readUInt16LE(off + 4);
    const seq = buf.readUInt32LE(off + 8);
    if (type === NLMSG_ERROR) {
      if (len < NLMSG_HDRLEN + 4) throw new NetlinkMessageInvalid(off, 'error message without a code');
      acks.push({ seq, errno: -buf.readInt32LE(off + NLMSG_HDRLEN) || 0 });
    }
    off += align4(len);
  }
  if (off !== buf.length && off < buf.length) throw new NetlinkMessageInvalid(off, 'trailing bytes');
  return acks;
}
