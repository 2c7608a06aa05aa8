import { closeSync, fsyncSync, openSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import koffi from 'koffi';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileBlocks } from './file-blocks.js';
import { pageCacheReadAvailable, readFromPageCache } from '#native';

const POSIX_FADV_DONTNEED = 4;
const fadvise = koffi.load('libc.so.6').func('posix_fadvise', 'int', ['int', 'long', 'long', 'int']) as (
  fd: number,
  offset: number,
  length: number,
  advice: number,
) => number;

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'sbx-page-cache-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function data(size: number): Buffer {
  const out = Buffer.alloc(size);
  for (let i = 0; i < size; i++) out[i] = (i * 7 + (i >> 12)) & 0xff;
  return out;
}

describe('page cache reads', () => {
  it('copies cached bytes at once, and reads nothing the disk would have to supply', async () => {
    expect(pageCacheReadAvailable).toBe(true);
    const file = path.join(dir, 'f');
    const bytes = data(1 << 20);
    writeFileSync(file, bytes);
    const fd = openSync(file, 'r');
    try {
      const out = Buffer.alloc(4096);
      expect(readFromPageCache(fd, out, 0, 4096, 8192)).toBe(4096);
      expect(out.equals(bytes.subarray(8192, 12288))).toBe(true);
      // written back and dropped from the cache: RWF_NOWAIT must not wait for the disk
      fsyncSync(fd);
      expect(fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)).toBe(0);
      const cold = Buffer.alloc(4096, 0xee);
      expect(readFromPageCache(fd, cold, 0, 4096, 512 * 1024)).toBe(0);
      // FileBlocks falls back to the thread pool and still returns every byte
      const blocks = await FileBlocks.open(file);
      const viaBlocks = Buffer.alloc(70_000);
      fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
      await blocks.readAt(viaBlocks, 300_001);
      expect(viaBlocks.equals(bytes.subarray(300_001, 370_001))).toBe(true);
      await blocks.close();
    } finally {
      closeSync(fd);
    }
  });
});
