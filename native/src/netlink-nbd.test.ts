import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import {
  GENL_ID_CTRL,
  NLA_F_NESTED,
  decodeAttributes,
  decodeNetlinkMessages,
  encodeAttributes,
  listAttributes,
} from './netlink-message.js';
import {
  NbdAttr,
  NbdCmd,
  NbdNetlink,
  decodeDeviceList,
  encodeConnect,
  encodeDisconnect,
  encodeFamilyRequest,
  encodeReconfigure,
  encodeStatus,
  resolveFamily,
} from './netlink-nbd.js';
import { GenericNetlinkSocket } from './netlink-socket.js';

describe('netlink message encoding', () => {
  it('CTRL_CMD_GETFAMILY "nbd": golden bytes', () => {
    const bytes = encodeFamilyRequest('nbd', 7);
    expect(bytes.toString('hex')).toBe(
      '1c000000' +
        '1000' +
        '0500' +
        '07000000' +
        '00000000' + // nlmsghdr: len 28, GENL_ID_CTRL, REQUEST|ACK, seq 7
        '03' +
        '01' +
        '0000' + // genlmsghdr: CTRL_CMD_GETFAMILY v1
        '0800' +
        '0200' +
        '6e626400', // CTRL_ATTR_FAMILY_NAME "nbd\0"
    );
  });

  it('NBD_CMD_CONNECT carries size, block size, timeouts, flags and nested socket fds', () => {
    const bytes = encodeConnect(0x1f, 1, {
      index: 3,
      sizeBytes: 1 << 30,
      blockSize: 4096,
      fds: [9, 10],
      timeoutSeconds: 30,
      deadConnTimeoutSeconds: 120,
      serverFlags: 0x15d,
    });
    expect(bytes.readUInt32LE(0)).toBe(bytes.length);
    expect(bytes.readUInt16LE(4)).toBe(0x1f);
    expect(bytes[16]).toBe(NbdCmd.CONNECT);
    expect(bytes[17]).toBe(1);
    const attrs = decodeAttributes(bytes.subarray(20));
    expect(attrs.get(NbdAttr.INDEX)!.readUInt32LE(0)).toBe(3);
    expect(attrs.get(NbdAttr.SIZE_BYTES)!.readBigUInt64LE(0)).toBe(1n << 30n);
    expect(attrs.get(NbdAttr.BLOCK_SIZE_BYTES)!.readBigUInt64LE(0)).toBe(4096n);
    expect(attrs.get(NbdAttr.TIMEOUT)!.readBigUInt64LE(0)).toBe(30n);
    expect(attrs.get(NbdAttr.DEAD_CONN_TIMEOUT)!.readBigUInt64LE(0)).toBe(120n);
    expect(attrs.get(NbdAttr.SERVER_FLAGS)!.readBigUInt64LE(0)).toBe(0x15dn);
    // The sockets attribute is marked nested, and each item nests NBD_SOCK_FD.
    const raw = listAttributes(bytes.subarray(20));
    expect(raw.map(([t]) => t)).toContain(NbdAttr.SOCKETS);
    const socketsAt = bytes.indexOf(Buffer.from([NbdAttr.SOCKETS, NLA_F_NESTED >> 8]), 20);
    expect(socketsAt).toBeGreaterThan(20);
    const items = listAttributes(attrs.get(NbdAttr.SOCKETS)!);
    expect(items.map(([, item]) => decodeAttributes(item).get(1)!.readUInt32LE(0))).toEqual([9, 10]);
  });

  it('reconfigure, disconnect and status name the device', () => {
    for (const [bytes, cmd] of [
      [encodeReconfigure(0x20, 2, { index: 5, fds: [11], deadConnTimeoutSeconds: 60 }), NbdCmd.RECONFIGURE],
      [encodeDisconnect(0x20, 3, 5), NbdCmd.DISCONNECT],
      [encodeStatus(0x20, 4, 5), NbdCmd.STATUS],
    ] as const) {
      expect(bytes[16]).toBe(cmd);
      expect(decodeAttributes(bytes.subarray(20)).get(NbdAttr.INDEX)!.readUInt32LE(0)).toBe(5);
    }
    expect(encodeStatus(0x20, 4).length).toBe(20);
  });

  it('decodes acks, errors and a status device list', () => {
    const ack = Buffer.alloc(36);
    ack.writeUInt32LE(36, 0);
    ack.writeUInt16LE(2, 4);
    ack.writeUInt32LE(9, 8);
    const err = Buffer.from(ack);
    err.writeInt32LE(-2, 16);
    expect(decodeNetlinkMessages(Buffer.concat([ack, err]))).toEqual([
      { kind: 'ack', seq: 9 },
      { kind: 'error', seq: 9, errno: 2 },
    ]);
    const list = encodeAttributes([
      {
        type: NbdAttr.DEVICE_LIST,
        nested: [
          {
            type: 1,
            nested: [
              { type: 1, u32: 0 },
              { type: 2, u8: 1 },
            ],
          },
          {
            type: 1,
            nested: [
              { type: 1, u32: 1 },
              { type: 2, u8: 0 },
            ],
          },
        ],
      },
    ]);
    expect(decodeDeviceList(decodeAttributes(list))).toEqual([
      { index: 0, connected: true },
      { index: 1, connected: false },
    ]);
    expect(() => decodeNetlinkMessages(Buffer.from('ff000000', 'hex').subarray(0, 4))).not.toThrow();
    const lying = Buffer.from(ack);
    lying.writeUInt32LE(400, 0);
    expect(() => decodeNetlinkMessages(lying)).toThrow(/claims 400/);
  });
});

describe('generic netlink on this kernel', () => {
  it('resolves the controller family itself through a real netlink socket', () => {
    const socket = new GenericNetlinkSocket();
    try {
      expect(resolveFamily(socket, 'nlctrl')).toBe(GENL_ID_CTRL);
      expect(() => resolveFamily(socket, 'nosuchfam')).toThrow(expect.objectContaining({ code: 'ENOENT' }));
    } finally {
      socket.close();
    }
  });

  const hasNbd = existsSync('/sys/module/nbd');
  if (!hasNbd)
    console.warn('skipping kernel NBD netlink status test: the nbd module is not loaded (/sys/module/nbd absent)');
  it.skipIf(!hasNbd)('queries the status of /dev/nbd0 through the nbd family', () => {
    const nbd = NbdNetlink.open();
    try {
      const devices = nbd.status(0);
      expect(devices[0]?.index).toBe(0);
    } finally {
      nbd.close();
    }
  });
});
