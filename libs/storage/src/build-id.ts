import { randomUUID } from 'node:crypto';
import { BuildIdInvalid } from './storage-errors.js';

/** The nil UUID: a mapping to it means "all zeros, not stored" (DESIGN.md §2). */
export const NIL_UUID = '00000000-0000-0000-0000-000000000000';

const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export function isBuildId(value: string): boolean {
  return UUID_PATTERN.test(value.toLowerCase());
}

/** Lowercases and checks a build id; throws BuildIdInvalid. */
export function normalizeBuildId(value: string): string {
  const lower = value.toLowerCase();
  if (!UUID_PATTERN.test(lower)) throw new BuildIdInvalid(value);
  return lower;
}

export function newBuildId(): string {
  return randomUUID();
}

/** The 16 bytes of a UUID in RFC 4122 order (the order Go's uuid.UUID holds and E2B writes). */
export function uuidToBytes(value: string): Buffer {
  const hex = normalizeBuildId(value).replaceAll('-', '');
  return Buffer.from(hex, 'hex');
}

/** Reads 16 bytes in RFC 4122 order as a lowercase UUID string. */
export function uuidFromBytes(bytes: Uint8Array, offset = 0): string {
  if (offset < 0 || offset + 16 > bytes.length) {
    throw new RangeError(`uuid needs 16 bytes at ${offset}, buffer has ${bytes.length}`);
  }
  const hex = Buffer.from(bytes.buffer, bytes.byteOffset + offset, 16).toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
