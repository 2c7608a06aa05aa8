import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { memoryView } from '#native';
import { ChunkCache, FileBlocks } from '#storage';
import { SourceView } from './source-view.js';

describe('SourceView', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'uffd-view-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('maps complete files, zeros and chunk caches at their memory-file offsets; a cache range is valid once ensured', async () => {
    const a = join(dir, 'a');
    writeFileSync(a, randomBytes(5 * 4096));
    const remote = randomBytes(8 * 4096);
    const complete = await FileBlocks.open(a);
    const cached = await ChunkCache.open({
      source: { readRange: async (o, l) => remote.subarray(o, o + l) },
      size: remote.length,
      cachePath: join(dir, 'cache'),
      chunkSize: 4096,
    });
    const view = SourceView.open(6 * 4096, [
      { offset: 0, length: 2 * 4096, file: complete, fileOffset: 3 * 4096 },
      { offset: 2 * 4096, length: 4096, file: undefined, fileOffset: 0 },
      { offset: 3 * 4096, length: 3 * 4096, file: cached, fileOffset: 4096 },
    ]);
    expect(view.allReady).toBe(false);
    // the chunk cache still fetches 4 KiB at a time: the fault window is cut to that
    expect(view.fetchUnit).toBe(4096);
    const local = SourceView.open(2 * 4096, [{ offset: 0, length: 2 * 4096, file: complete, fileOffset: 0 }]);
    expect(local.fetchUnit).toBeUndefined();
    local.close();
    expect(view.readyRanges()).toEqual([
      { offset: 0, length: 2 * 4096 },
      { offset: 2 * 4096, length: 4096 },
    ]);
    await view.ensure(3 * 4096, 3 * 4096);
    const bytes = Buffer.from(memoryView(view.address, view.size));
    const expected = Buffer.concat([
      readFileSync(a).subarray(3 * 4096),
      Buffer.alloc(4096),
      remote.subarray(4096, 4 * 4096),
    ]);
    expect(bytes.equals(expected)).toBe(true);
    // A cache the build cache closed while mapped fails the fetch instead of filling another file.
    await cached.close();
    await expect(view.ensure(3 * 4096, 4096)).rejects.toThrow(/closed/);
    view.close();
    await complete.close();
  });

  it('refuses a data file shorter than its mapping and gaps in the layout', () => {
    const a = join(dir, 'short');
    writeFileSync(a, Buffer.alloc(4096));
    const file = { path: a, complete: true, ensure: async () => undefined };
    expect(() => SourceView.open(8192, [{ offset: 0, length: 8192, file, fileOffset: 0 }])).toThrow(
      /4096 bytes, but bytes \[0, 8192\)/,
    );
    expect(() => SourceView.open(8192, [{ offset: 0, length: 4096, file: undefined, fileOffset: 0 }])).toThrow(
      /cover 4096 of 8192/,
    );
  });
});
