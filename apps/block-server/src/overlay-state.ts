import { crc32 } from 'node:zlib';
import { DirtyBitmap } from '#storage';
import { OverlayStateInvalid } from './block-errors.js';

/**
 * `overlay.state`, the snapshot of an overlay's block maps (little endian): magic "SBXCOW01",
 * version u32, blockSize u32, size u64, generation u64, identity length u32, identity (UTF-8),
 * written-map length u64, zeroed-map length u64, both maps (DirtyBitmap bytes), then in
 * version 3 only: checkpoint length u32, checkpoint (UTF-8), tracked-map length u64, tracked
 * map; CRC-32 of everything before it. Version 2 is written while the overlay has no
 * checkpoint (the same bytes as before checkpoints existed), version 3 after one. Pure
 * functions: no files here.
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
  /** The build of the last checkpoint export ('' = none since the overlay was made). */
  checkpoint: string;
  /** Blocks written or zeroed since that checkpoint (empty without one). */
  tracked: DirtyBitmap;
}

const MAGIC = Buffer.from('SBXCOW01', 'ascii');
const VERSION_MAPS = 2;
const VERSION_CHECKPOINT = 3;
const HEAD_BYTES = 36;

export function encodeOverlayState(state: OverlayState): Buffer {
  const identity = Buffer.from(state.identity, 'utf8');
  const written = state.written.toBytes();
  const zeroed = state.zeroed.toBytes();
  const head = Buffer.alloc(HEAD_BYTES + identity.length + 16);
  MAGIC.copy(head, 0);
  head.writeUInt32LE(state.checkpoint === '' ? VERSION_MAPS : VERSION_CHECKPOINT, 8);
  head.writeUInt32LE(state.blockSize, 12);
  head.writeBigUInt64LE(BigInt(state.size), 16);
  head.writeBigUInt64LE(BigInt(state.generation), 24);
  head.writeUInt32LE(identity.length, 32);
  identity.copy(head, HEAD_BYTES);
  head.writeBigUInt64LE(BigInt(written.length), HEAD_BYTES + identity.length);
  head.writeBigUInt64LE(BigInt(zeroed.length), HEAD_BYTES + identity.length + 8);
  const parts = [head, written, zeroed];
  if (state.checkpoint !== '') {
    const checkpoint = Buffer.from(state.checkpoint, 'utf8');
    const tracked = state.tracked.toBytes();
    const lengths = Buffer.alloc(12);
    lengths.writeUInt32LE(checkpoint.length, 0);
    lengths.writeBigUInt64LE(BigInt(tracked.length), 4);
    parts.push(lengths.subarray(0, 4), checkpoint, lengths.subarray(4), tracked);
  }
  const body = Buffer.concat(parts);
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
  const version = bytes.readUInt32LE(8);
  if (version !== VERSION_MAPS && version !== VERSION_CHECKPOINT) fail(`unknown version ${version}`);
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
  const mapsEnd = at + writtenLength + zeroedLength;
  if (version === VERSION_MAPS ? mapsEnd !== body.length : mapsEnd + 12 > body.length) {
    fail('bitmap lengths do not match the file');
  }
  let checkpoint = '';
  let trackedBytes: Buffer | undefined;
  if (version === VERSION_CHECKPOINT) {
    const checkpointLength = body.readUInt32LE(mapsEnd);
    const trackedAt = mapsEnd + 4 + checkpointLength + 8;
    if (checkpointLength === 0 || trackedAt > body.length) fail('checkpoint runs past the file');
    checkpoint = body.toString('utf8', mapsEnd + 4, mapsEnd + 4 + checkpointLength);
    if (trackedAt + Number(body.readBigUInt64LE(trackedAt - 8)) !== body.length) {
      fail('tracked map length does not match the file');
    }
    trackedBytes = body.subarray(trackedAt);
  }
  const blocks = Math.ceil(size / blockSize);
  try {
    const written = DirtyBitmap.fromBytes(body.subarray(at, at + writtenLength));
    const zeroed = DirtyBitmap.fromBytes(body.subarray(at + writtenLength, mapsEnd));
    const tracked = trackedBytes ? DirtyBitmap.fromBytes(trackedBytes) : new DirtyBitmap(blocks);
    if (written.blockCount !== blocks || zeroed.blockCount !== blocks || tracked.blockCount !== blocks) {
      fail(`bitmaps are not ${blocks} blocks`);
    }
    return { blockSize, size, identity, generation, written, zeroed, checkpoint, tracked };
  } catch (err) {
    if (err instanceof OverlayStateInvalid) throw err;
    return fail((err as Error).message);
  }
}
