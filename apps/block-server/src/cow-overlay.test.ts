import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MemoryBlocks } from '#storage';
import { CowOverlay } from './cow-overlay.js';

const BS = 4096;
let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cow-overlay-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function readAll(blocks: { size: number; readAt(t: Uint8Array, o: number): Promise<void> }): Promise<Buffer> {
  const out = Buffer.alloc(blocks.size);
  await blocks.readAt(out, 0);
  return out;
}

describe('CowOverlay over an in-memory base', () => {
  it('reads the base through, keeps writes in the overlay and never touches the base', async () => {
    const original = randomBytes(16 * BS);
    const base = new MemoryBlocks(original);
    const overlay = await CowOverlay.open({ base, dir: join(dir, 'o') });
    expect(await readAll(overlay)).toEqual(original);

    const patch = Buffer.alloc(100, 0xab);
    await overlay.writeAt(patch, 3 * BS + 10); // inside one block: read-modify-write
    await overlay.writeAt(Buffer.alloc(2 * BS, 0xcd), 5 * BS); // two whole blocks
    await overlay.writeAt(Buffer.alloc(BS, 0xef), 8 * BS - 7); // straddles blocks 7 and 8
    const expected = Buffer.from(original);
    patch.copy(expected, 3 * BS + 10);
    expected.fill(0xcd, 5 * BS, 7 * BS);
    expected.fill(0xef, 8 * BS - 7, 9 * BS - 7);
    expect(await readAll(overlay)).toEqual(expected);
    expect(base.bytes()).toEqual(original);
    expect([...overlay.written]).toEqual([3, 5, 6, 7, 8]);
    await overlay.close();
  });

  it('zeroAt marks whole blocks zero without storing, partial ends are written as zeros', async () => {
    const original = randomBytes(8 * BS);
    const overlay = await CowOverlay.open({ base: new MemoryBlocks(original), dir: join(dir, 'o') });
    await overlay.writeAt(Buffer.alloc(BS, 1), 2 * BS);
    await overlay.zeroAt(BS + 100, 3 * BS);
    const expected = Buffer.from(original);
    expected.fill(1, 2 * BS, 3 * BS);
    expected.fill(0, BS + 100, 4 * BS + 100);
    expect(await readAll(overlay)).toEqual(expected);
    expect([...overlay.zeroed]).toEqual([2, 3]);
    expect([...overlay.written]).toEqual([1, 4]);
    // Disk use: only the blocks stored, not the zeroed ones (the file is sparse).
    const used = (await stat(join(dir, 'o', 'overlay.img'))).blocks * 512;
    expect(used).toBeLessThanOrEqual(4 * BS);
    await overlay.close();
  });

  it('concurrent sector writes into one fresh block all land', async () => {
    const original = randomBytes(2 * BS);
    const overlay = await CowOverlay.open({ base: new MemoryBlocks(original), dir: join(dir, 'o') });
    const expected = Buffer.from(original);
    await Promise.all(
      Array.from({ length: 8 }, (_, i) => {
        const sector = Buffer.alloc(512, i + 1);
        sector.copy(expected, i * 512);
        return overlay.writeAt(sector, i * 512);
      }),
    );
    expect(await readAll(overlay)).toEqual(expected);
    await overlay.close();
  });

  it('a flushed overlay reopens with the same contents; a different base identity is refused', async () => {
    const original = randomBytes(8 * BS);
    const base = new MemoryBlocks(original);
    const first = await CowOverlay.open({ base, dir: join(dir, 'o'), identity: 'build-a' });
    await first.writeAt(Buffer.alloc(BS + 1, 7), 1000);
    await first.zeroAt(5 * BS, 2 * BS);
    await first.flush();
    const contents = await readAll(first);
    await first.close();

    const again = await CowOverlay.open({ base, dir: join(dir, 'o'), identity: 'build-a' });
    expect(await readAll(again)).toEqual(contents);
    await again.close();
    await expect(CowOverlay.open({ base, dir: join(dir, 'o'), identity: 'build-b' })).rejects.toMatchObject({
      code: 'OVERLAY_STATE_INVALID',
    });
  });

  it('a corrupted state file is refused with a reason, not trusted', async () => {
    const base = new MemoryBlocks(4 * BS);
    const overlay = await CowOverlay.open({ base, dir: join(dir, 'o') });
    await overlay.writeAt(Buffer.alloc(BS, 1), 0);
    await overlay.flush();
    await overlay.close();
    const path = join(dir, 'o', 'overlay.state');
    const bytes = await readFile(path);
    bytes[bytes.length - 10]! ^= 0xff;
    await writeFile(path, bytes);
    await expect(CowOverlay.open({ base, dir: join(dir, 'o') })).rejects.toThrow(/checksum/);
  });

  it('property: random writes, zeroes, flushes and reopens read like a flat copy', async () => {
    const size = 6 * BS + 1024; // a last block cut short
    const op = fc.oneof(
      fc.record({
        kind: fc.constant('write' as const),
        offset: fc.nat(size - 1),
        length: fc.integer({ min: 1, max: 3 * BS }),
        byte: fc.integer({ min: 0, max: 255 }),
      }),
      fc.record({
        kind: fc.constant('zero' as const),
        offset: fc.nat(size - 1),
        length: fc.integer({ min: 1, max: 4 * BS }),
      }),
      fc.record({ kind: fc.constant('reopen' as const) }),
    );
    let run = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 25 }), async (ops) => {
        const original = randomBytes(size);
        const base = new MemoryBlocks(original);
        const model = Buffer.from(original);
        const where = join(dir, `p${run++}`);
        let overlay = await CowOverlay.open({ base, dir: where });
        try {
          for (const o of ops) {
            if (o.kind === 'reopen') {
              await overlay.flush();
              await overlay.close();
              overlay = await CowOverlay.open({ base, dir: where });
              continue;
            }
            const length = Math.min(o.length, size - o.offset);
            if (o.kind === 'write') {
              await overlay.writeAt(Buffer.alloc(length, o.byte), o.offset);
              model.fill(o.byte, o.offset, o.offset + length);
            } else {
              await overlay.zeroAt(o.offset, length);
              model.fill(0, o.offset, o.offset + length);
            }
          }
          expect(await readAll(overlay)).toEqual(model);
          expect(base.bytes()).toEqual(original);
        } finally {
          await overlay.remove();
        }
      }),
      { numRuns: 25 },
    );
  });
});
