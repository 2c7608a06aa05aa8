import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { memoryView } from '#native';
import { MemoryBlocks } from '#storage';
import { SourceView } from './source-view.js';

describe('SourceView', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'uffd-view-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('lays files, zeros and copied sources out at their memory-file offsets', async () => {
    const a = join(dir, 'a');
    writeFileSync(a, randomBytes(5 * 4096));
    const remote = randomBytes(8 * 4096);
    const view = SourceView.open(6 * 4096, [
      { kind: 'file', offset: 0, length: 2 * 4096, path: a, fileOffset: 3 * 4096 },
      { kind: 'zero', offset: 2 * 4096, length: 4096 },
      { kind: 'blocks', offset: 3 * 4096, length: 3 * 4096, source: new MemoryBlocks(remote), sourceOffset: 4096 },
    ]);
    expect(view.allReady).toBe(false);
    await view.ensure(3 * 4096, 3 * 4096);
    const bytes = Buffer.from(memoryView(view.address, view.size));
    const expected = Buffer.concat([
      readFileSync(a).subarray(3 * 4096),
      Buffer.alloc(4096),
      remote.subarray(4096, 4 * 4096),
    ]);
    expect(bytes.equals(expected)).toBe(true);
    view.close();
  });

  it('refuses a data file shorter than its mapping and gaps in the layout', () => {
    const a = join(dir, 'short');
    writeFileSync(a, Buffer.alloc(4096));
    expect(() => SourceView.open(8192, [{ kind: 'file', offset: 0, length: 8192, path: a, fileOffset: 0 }])).toThrow(
      /4096 bytes, but bytes \[0, 8192\)/,
    );
    expect(() => SourceView.open(8192, [{ kind: 'zero', offset: 0, length: 4096 }])).toThrow(/cover 4096 of 8192/);
  });
});
