import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NIL_UUID, validateMappings } from '#storage';
import { memfileHeader } from './template-builder.js';

const MiB = 1024 * 1024;
const ID = '33333333-3333-4333-8333-333333333333';

describe('template memfile header', () => {
  it('maps long zero runs to nil and keeps short ones in place, covering the file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'orch-tpl-'));
    try {
      const mem = Buffer.alloc(8 * MiB);
      mem.fill(1, 0, 4096); // data
      // 8 KiB of zeros, then data: too short to be worth a mapping of its own
      mem.fill(2, 3 * 4096, 4 * 4096);
      // then zeros until 5 MiB: a long run
      mem.fill(3, 5 * MiB, 5 * MiB + 4096);
      const path = join(dir, 'memfile');
      await writeFile(path, mem);
      const header = await memfileHeader(path, mem.length, ID);
      validateMappings(header.mappings, mem.length, 4096);
      expect(header.mappings).toEqual([
        { offset: 0, length: 4 * 4096, buildId: ID, buildStorageOffset: 0 },
        { offset: 4 * 4096, length: 5 * MiB - 4 * 4096, buildId: NIL_UUID, buildStorageOffset: 0 },
        { offset: 5 * MiB, length: 4096, buildId: ID, buildStorageOffset: 5 * MiB },
        { offset: 5 * MiB + 4096, length: 3 * MiB - 4096, buildId: NIL_UUID, buildStorageOffset: 0 },
      ]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
