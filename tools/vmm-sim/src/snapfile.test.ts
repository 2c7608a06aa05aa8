import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { SNAPFILE_FORMAT, SnapfileInvalid, decodeSnapfile, encodeSnapfile, type Snapfile } from './snapfile.js';

const sample: Snapfile = {
  format: SNAPFILE_FORMAT,
  version: 1,
  memSizeMib: 128,
  pageSize: 4096,
  vcpuCount: 2,
  smt: false,
  bootSeed: 12345,
  bootSource: { kernelImagePath: '/k', bootArgs: 'console=ttyS0' },
  drives: [{ driveId: 'rootfs', pathOnHost: '/fc-vm/rootfs.ext4', isRootDevice: true, isReadOnly: false }],
  networkInterfaces: [{ ifaceId: 'eth0', hostDevName: 'tap0' }],
  guestNetwork: { address: '169.254.0.21', prefixLength: 30, gateway: '169.254.0.22' },
  mmds: { instanceID: 'i' },
  envVars: { A: 'b' },
  createdAt: '2026-01-01T00:00:00.000Z',
};

describe('snapfile codec', () => {
  it('round-trips', () => {
    expect(decodeSnapfile(encodeSnapfile(sample))).toEqual(sample);
  });

  it('says what is wrong with a bad file', () => {
    expect(() => decodeSnapfile(Buffer.from('\x00\x01bincode'), '/s')).toThrow(/snapfile \/s is invalid: not JSON/);
    expect(() => decodeSnapfile(Buffer.from(JSON.stringify({ ...sample, format: 'x' })))).toThrow(/format is not/);
    expect(() => decodeSnapfile(Buffer.from(JSON.stringify({ ...sample, memSizeMib: 0 })))).toThrow(/memSizeMib/);
    expect(() => decodeSnapfile(Buffer.from(JSON.stringify({ ...sample, pageSize: 1000 })))).toThrow(/pageSize/);
    expect(() => decodeSnapfile(Buffer.from(JSON.stringify({ ...sample, extra: 1 })))).toThrow(SnapfileInvalid);
  });

  it('rejects mutated files with SnapfileInvalid, never another error (fuzz)', () => {
    const bytes = encodeSnapfile(sample);
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(bytes.length - 1), fc.integer({ min: 0, max: 255 })), { maxLength: 8 }),
        (edits) => {
          const copy = Buffer.from(bytes);
          for (const [at, v] of edits) copy[at] = v;
          try {
            decodeSnapfile(copy);
          } catch (err) {
            expect(err).toBeInstanceOf(SnapfileInvalid);
          }
        },
      ),
      { numRuns: 2000 },
    );
  });
});
