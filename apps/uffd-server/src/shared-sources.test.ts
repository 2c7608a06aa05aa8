import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mappings } from '#test-kit';
import { SharedSources } from './shared-sources.js';
import { SourceView } from './source-view.js';

describe('SharedSources', () => {
  let dir: string;
  let file: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'shared-sources-'));
    file = join(dir, 'memfile');
    writeFileSync(file, Buffer.alloc(64 * 1024, 3));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const mapped = () => mappings(process.pid).filter((m) => m.path === file).length;

  it('opens once for callers arriving together, and unmaps with the last holder', async () => {
    const sources = new SharedSources();
    let opens = 0;
    const open = async () => {
      opens++;
      await new Promise((r) => setTimeout(r, 10));
      return { view: SourceView.ofFile(file) };
    };
    const key = SharedSources.fileKey(file);
    const held = await Promise.all(Array.from({ length: 5 }, () => sources.acquire(key, open)));
    expect(opens).toBe(1);
    expect(held.filter((h) => h.opened)).toHaveLength(1);
    expect(new Set(held.map((h) => h.source.view)).size).toBe(1);
    expect(mapped()).toBe(1);
    for (const h of held.slice(1)) h.source.view.close();
    expect(mapped()).toBe(1);
    expect(sources.size).toBe(1);
    held[0]!.source.view.close();
    expect(mapped()).toBe(0);
    expect(sources.size).toBe(0);
    // Closed again: nothing happens (it is unmapped once).
    held[0]!.source.view.close();
    // The next caller maps it anew.
    const again = await sources.acquire(key, open);
    expect(again.opened).toBe(true);
    expect(opens).toBe(2);
    again.source.view.close();
  });

  it('does not keep a failed opening: every waiter gets the error, the next caller tries again', async () => {
    const sources = new SharedSources();
    let fail = true;
    const open = async () => {
      await new Promise((r) => setTimeout(r, 5));
      if (fail) throw new Error('no such build');
      return { view: SourceView.ofFile(file) };
    };
    const tries = await Promise.allSettled([sources.acquire('build:x', open), sources.acquire('build:x', open)]);
    expect(tries.map((t) => t.status)).toEqual(['rejected', 'rejected']);
    expect(sources.size).toBe(0);
    fail = false;
    const ok = await sources.acquire('build:x', open);
    expect(ok.opened).toBe(true);
    ok.source.view.close();
    expect(sources.size).toBe(0);
  });

  it('knows a plain file by its identity on disk: a new file at the same path is another source', () => {
    const before = SharedSources.fileKey(file);
    expect(SharedSources.fileKey(file)).toBe(before);
    rmSync(file);
    writeFileSync(file, Buffer.alloc(128 * 1024, 4));
    expect(SharedSources.fileKey(file)).not.toBe(before);
    expect(() => SharedSources.fileKey(join(dir, 'missing'))).toThrow(/ENOENT/);
  });
});
