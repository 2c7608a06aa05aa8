/**
 * The kernel NBD driver's generic-netlink family "nbd" (linux/nbd-netlink.h): connect a
 * /dev/nbdX to socket fds, reconfigure it with new sockets after a server restart (within its
 * dead-connection timeout), query status, disconnect. Message builders are pure; NbdNetlink
 * sends them.
 */
import {
  CTRL_ATTR_FAMILY_ID,
  CTRL_ATTR_FAMILY_NAME,
  CTRL_CMD_GETFAMILY,
  GENL_ID_CTRL,
  decodeAttributes,
  encodeGenlRequest,
  listAttributes,
  type NetlinkAttribute,
} from './netlink-message.js';
import { GenericNetlinkSocket } from './netlink-socket.js';

export const NBD_GENL_FAMILY_NAME = 'nbd';
export const NBD_GENL_VERSION = 1;

export const NbdCmd = { CONNECT: 1, DISCONNECT: 2, RECONFIGURE: 3, LINK_DEAD: 4, STATUS: 5 } as const;
export const NbdAttr = {
  INDEX: 1,
  SIZE_BYTES: 2,
  BLOCK_SIZE_BYTES: 3,
  TIMEOUT: 4,
  SERVER_FLAGS: 5,
  CLIENT_FLAGS: 6,
  SOCKETS: 7,
  DEAD_CONN_TIMEOUT: 8,
  DEVICE_LIST: 9,
  BACKEND_IDENTIFIER: 10,
} as const;
const NBD_SOCK_ITEM = 1;
const NBD_SOCK_FD = 1;
const NBD_DEVICE_ITEM = 1;
const NBD_DEVICE_INDEX = 1;
const NBD_DEVICE_CONNECTED = 2;
/** Client flags: the device disappears when disconnected / when the netlink socket closes. */
export const NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0;
export const NBD_CFLAG_DISCONNECT_ON_CLOSE = 1 << 1;

export interface NbdConnectOptions {
  /** Device index to use; absent lets the kernel pick (its choice comes back). */
  index?: number;
  sizeBytes: number;
  blockSize: number;
  /** Socket fds the kernel takes over (one per connection). */
  fds: number[];
  /** Request timeout, seconds. */
  timeoutSeconds: number;
  /**
   * Seconds the device waits for a reconfigure after every connection died, instead of
   * failing I/O: what lets a sandbox's disk outlive a block-server restart.
   */
  deadConnTimeoutSeconds: number;
  /** Transmission flags the server would have sent (HAS_FLAGS, SEND_FLUSH, ...). */
  serverFlags: number;
  clientFlags?: number;
  /** Shown in /sys/block/nbdX/backend; lets a restarted server find its devices. */
  backendIdentifier?: string;
}

function socketsAttribute(fds: number[]): NetlinkAttribute {
  return {
    type: NbdAttr.SOCKETS,
    nested: fds.map((fd) => ({ type: NBD_SOCK_ITEM, nested: [{ type: NBD_SOCK_FD, u32: fd }] })),
  };
}

export function encodeFamilyRequest(name: string, seq: number): Buffer {
  return encodeGenlRequest({
    family: GENL_ID_CTRL,
    command: CTRL_CMD_GETFAMILY,
    version: 1,
    seq,
    attributes: [{ type: CTRL_ATTR_FAMILY_NAME, string: name }],
  });
}

export function encodeConnect(family: number, seq: number, o: NbdConnectOptions): Buffer {
  const attributes: NetlinkAttribute[] = [];
  if (o.index !== undefined) attributes.push({ type: NbdAttr.INDEX, u32: o.index });
  attributes.push(
    { type: NbdAttr.SIZE_BYTES, u64: o.sizeBytes },
    { type: NbdAttr.BLOCK_SIZE_BYTES, u64: o.blockSize },
    { type: NbdAttr.TIMEOUT, u64: o.timeoutSeconds },
    { type: NbdAttr.DEAD_CONN_TIMEOUT, u64: o.deadConnTimeoutSeconds },
    { type: NbdAttr.SERVER_FLAGS, u64: o.serverFlags },
  );
  if (o.clientFlags !== undefined) attributes.push({ type: NbdAttr.CLIENT_FLAGS, u64: o.clientFlags });
  if (o.backendIdentifier) attributes.push({ type: NbdAttr.BACKEND_IDENTIFIER, string: o.backendIdentifier });
  attributes.push(socketsAttribute(o.fds));
  return encodeGenlRequest({ family, command: NbdCmd.CONNECT, version: NBD_GENL_VERSION, seq, attributes });
}

export function encodeReconfigure(
  family: number,
  seq: number,
  o: { index: number; fds: number[]; timeoutSeconds?: number; deadConnTimeoutSeconds?: number },
): Buffer {
  const attributes: NetlinkAttribute[] = [{ type: NbdAttr.INDEX, u32: o.index }];
  if (o.timeoutSeconds !== undefined) attributes.push({ type: NbdAttr.TIMEOUT, u64: o.timeoutSeconds });
  if (o.deadConnTimeoutSeconds !== undefined) {
    attributes.push({ type: NbdAttr.DEAD_CONN_TIMEOUT, u64: o.deadConnTimeoutSeconds });
  }
  attributes.push(socketsAttribute(o.fds));
  return encodeGenlRequest({ family, command: NbdCmd.RECONFIGURE, version: NBD_GENL_VERSION, seq, attributes });
}

export function encodeDisconnect(family: number, seq: number, index: number): Buffer {
  return encodeGenlRequest({
    family,
    command: NbdCmd.DISCONNECT,
    version: NBD_GENL_VERSION,
    seq,
    attributes: [{ type: NbdAttr.INDEX, u32: index }],
  });
}

export function encodeStatus(family: number, seq: number, index?: number): Buffer {
  return encodeGenlRequest({
    family,
    command: NbdCmd.STATUS,
    version: NBD_GENL_VERSION,
    seq,
    attributes: index === undefined ? [] : [{ type: NbdAttr.INDEX, u32: index }],
  });
}

export interface NbdDeviceStatus {
  index: number;
  connected: boolean;
}

/** NBD_ATTR_DEVICE_LIST → [{index, connected}]. */
export function decodeDeviceList(attributes: Map<number, Buffer>): NbdDeviceStatus[] {
  const list = attributes.get(NbdAttr.DEVICE_LIST);
  if (!list) return [];
  return listAttributes(list)
    .filter(([type]) => type === NBD_DEVICE_ITEM)
    .map(([, item]) => {
      const fields = decodeAttributes(item);
      const index = fields.get(NBD_DEVICE_INDEX);
      const connected = fields.get(NBD_DEVICE_CONNECTED);
      if (!index || index.length < 4) throw new RangeError('NBD_DEVICE_ITEM without NBD_DEVICE_INDEX');
      return { index: index.readUInt32LE(0), connected: connected !== undefined && connected[0] !== 0 };
    });
}

/** Talks to the kernel's nbd family. Throws SyscallError ENOENT from `open` when the module is not loaded. */
export class NbdNetlink {
  private constructor(
    private readonly socket: GenericNetlinkSocket,
    readonly family: number,
  ) {}

  static open(): NbdNetlink {
    const socket = new GenericNetlinkSocket();
    try {
      return new NbdNetlink(socket, resolveFamily(socket, NBD_GENL_FAMILY_NAME));
    } catch (err) {
      socket.close();
      throw err;
    }
  }

  /** Returns the index of the connected device. */
  connect(options: NbdConnectOptions): number {
    const seq = this.socket.nextSeq();
    const replies = this.socket.exchange(encodeConnect(this.family, seq, options), seq, 'NBD_CMD_CONNECT');
    for (const reply of replies) {
      if (reply.kind !== 'genl') continue;
      const index = reply.attributes.get(NbdAttr.INDEX);
      if (index && index.length >= 4) return index.readUInt32LE(0);
    }
    if (options.index !== undefined) return options.index;
    throw new Error('NBD_CMD_CONNECT: the kernel did not say which device it connected');
  }

  reconfigure(options: {
    index: number;
    fds: number[];
    timeoutSeconds?: number;
    deadConnTimeoutSeconds?: number;
  }): void {
    const seq = this.socket.nextSeq();
    this.socket.exchange(encodeReconfigure(this.family, seq, options), seq, 'NBD_CMD_RECONFIGURE');
  }

  disconnect(index: number): void {
    const seq = this.socket.nextSeq();
    this.socket.exchange(encodeDisconnect(this.family, seq, index), seq, 'NBD_CMD_DISCONNECT');
  }

  status(index?: number): NbdDeviceStatus[] {
    const seq = this.socket.nextSeq();
    const replies = this.socket.exchange(encodeStatus(this.family, seq, index), seq, 'NBD_CMD_STATUS');
    return replies.flatMap((r) => (r.kind === 'genl' ? decodeDeviceList(r.attributes) : []));
  }

  close(): void {
    this.socket.close();
  }
}

/** Resolves a generic-netlink family name to its id through the controller. */
export function resolveFamily(socket: GenericNetlinkSocket, name: string): number {
  const seq = socket.nextSeq();
  const replies = socket.exchange(encodeFamilyRequest(name, seq), seq, `CTRL_CMD_GETFAMILY ${name}`);
  for (const reply of replies) {
    if (reply.kind !== 'genl') continue;
    const id = reply.attributes.get(CTRL_ATTR_FAMILY_ID);
    if (id && id.length >= 2) return id.readUInt16LE(0);
  }
  throw new Error(`generic netlink family ${name}: no id in the controller's reply`);
}

export { GenericNetlinkSocket, setSendBufferSize, unixSocketPair } from './netlink-socket.js';
export {
  decodeNetlinkMessages,
  encodeGenlRequest,
  encodeAttributes,
  decodeAttributes,
  listAttributes,
  type NetlinkAttribute,
  type NetlinkMessage,
} from './netlink-message.js';
