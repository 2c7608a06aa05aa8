import { closeSync, mkdtempSync, openSync, rmSync, writeSync, ftruncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { dataExtents } from './file-extents.js';

const dir = mkdtempSync(join(tmpdir(), 'native-extents-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('data extents of a sparse file', () => {
  it('lists the pages written, zeros included, and nothing of the holes', () => {
    const path = join(dir, 'diff');
    const fd = openSync(path, 'w+');
    try {
      ftruncateSync(fd, 64 * 4096);
      writeSync(fd, Buffer.alloc(4096, 7), 0, 4096, 3 * 4096);
      // A page of zeros written is data: the guest wrote zeros there.
      writeSync(fd, Buffer.alloc(2 * 4096), 0, 2 * 4096, 10 * 4096);
      writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 63 * 4096);
      expect(dataExtents(fd)).toEqual([
        { start: 3 * 4096, end: 4 * 4096 },
        { start: 10 * 4096, end: 12 * 4096 },
        { start: 63 * 4096, end: 64 * 4096 },
      ]);
    } finally {
      closeSync(fd);
    }
    const empty = openSync(join(dir, 'empty'), 'w+');
    try {
      ftruncateSync(empty, 1 << 20);
      expect(dataExtents(empty)).toEqual([]);
    } finally {
      closeSync(empty);
    }
  });
});
