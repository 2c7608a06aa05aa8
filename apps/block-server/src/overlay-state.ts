import { crc32 } from 'node:zlib';
import { DirtyBitmap } from '#storage';
import { OverlayStateInvalid } from './block-errors.js';

/**
 * `overlay.state`, the snapshot of an overlay's block maps (version 2, little endian):
 * magic "SBXCOW01", version u32, blockSize u32, size u64, generation u64, identity length u32,
 * identity (UTF-8), written-map length u64, zeroed-map length u64, both maps (DirtyBitmap
 * bytes), CRC-32 of everything before it. Pure functions: no files here.
 */
export interface OverlayState {
  blockSize: number;
  /** Device size in bytes. */
  size: number;
  /** What the overlay sits on (a build id, an image path): reopening over another base is refused. */
  identity: string;
  /** Counts snapshots; the journal names the one it applies to. */
  generation: number;
  /** Blocks whose bytes are in the overlay file. */
  written: DirtyBitmap;
  /** Blocks that read as zeros without stored data. */
  zeroed: DirtyBitmap;
}

const MAGIC = Buffer.from('SBXCOW01', 'ascii');
const VERSION = 2;
const HEAD_BYTES = 36;

export function encodeOverlayState(state: OverlayState): Buffer {
  const identity = Buffer.from(state.identity, 'utf8');
  const written = state.written.toBytes();
  const zeroed = state.zeroed.toBytes();
  const head = Buffer.alloc(HEAD_BYTES + identity.length + 16);
  MAGIC.copy(head, 0);
  head.writeUInt32LE(VERSION, 8);
  head.writeUInt32LE(state.blockSize, 12);
  head.writeBigUInt64LE(BigInt(state.size), 16);
  head.writeBigUInt64LE(BigInt(state.generation), 24);
  head.writeUInt32LE(identity.length, 32);
  identity.copy(head, HEAD_BYTES);
  head.writeBigUInt64LE(BigInt(written.length), HEAD_BYTES + identity.length);
  head.writeBigUInt64LE(BigInt(zeroed.length), HEAD_BYTES + identity.length + 8);
  const body = Buffer.concat([head, written, zeroed]);
  const sum = Buffer.alloc(4);
  sum.writeUInt32LE(crc32(body), 0);
  return Buffer.concat([body, sum]);
}

/**
 * Decodes a state file and checks it belongs to the overlay being opened (`expected`);
 * anything else throws OverlayStateInvalid naming the problem (`path` is only for the message).
 */
export function decodeOverlayState(
  bytes: Buffer,
  path: string,
  expected: { blockSize: number; size: number; identity: string },
): OverlayState {
  const fail = (problem: string): never => {
    throw new OverlayStateInvalid(path, problem);
  };
  if (bytes.length < HEAD_BYTES + 20 || !bytes.subarray(0, 8).equals(MAGIC)) fail('bad magic');
  const body = bytes.subarray(0, bytes.length - 4);
  if (crc32(body) !== bytes.readUInt32LE(bytes.length - 4)) fail('checksum mismatch (torn or corrupted)');
  if (bytes.readUInt32LE(8) !== VERSION) fail(`unknown version ${bytes.readUInt32LE(8)}`);
  const blockSize = bytes.readUInt32LE(12);
  const size = Number(bytes.readBigUInt64LE(16));
  const generation = Number(bytes.readBigUInt64LE(24));
  if (blockSize !== expected.blockSize) fail(`block size ${blockSize}, expected ${expected.blockSize}`);
  if (size !== expected.size) fail(`size ${size}, base is ${expected.size}`);
  const idLength = bytes.readUInt32LE(32);
  if (HEAD_BYTES + idLength + 16 > body.length) fail('identity runs past the file');
  const identity = bytes.toString('utf8', HEAD_BYTES, HEAD_BYTES + idLength);
  if (identity !== expected.identity) {
    fail(`made over ${JSON.stringify(identity)}, not ${JSON.stringify(expected.identity)}`);
  }
  const at = HEAD_BYTES + idLength + 16;
  const writtenLength = Number(bytes.readBigUInt64LE(at - 16));
  const zeroedLength = Number(bytes.readBigUInt64LE(at - 8));
  if (at + writtenLength + zeroedLength !== body.length) fail('bitmap lengths do not match the file');
  const blocks = Math.ceil(size / blockSize);
  try {
    const written = DirtyBitmap.fromBytes(body.subarray(at, at + writtenLength));
    const zeroed = DirtyBitmap.fromBytes(body.subarray(at + writtenLength));
    if (written.blockCount !== blocks || zeroed.blockCount !== blocks) fail(`bitmaps are not ${blocks} blocks`);
    return { blockSize, size, identity, generation, written, zeroed };
  } catch (err) {
    if (err instanceof OverlayStateInvalid) throw err;
    return fail((err as Error).message);
  }
}
