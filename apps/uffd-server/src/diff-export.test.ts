import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { close, copyToAddress, mapAnonymous, memfdCreate, munmap, pwrite } from '#native';
import { NIL_UUID, validateMappings, mergeMappings, baseMappings } from '#storage';
import { exportDiff } from './diff-export.js';

describe('exportDiff', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'uffd-diff-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it.each([4096, 2097152])('stores non-zero pages ascending, maps zero pages to nil (page %i)', async (page) => {
    const pages = 12;
    const memory = randomBytes(pages * page);
    for (const z of [3, 4, 9]) memory.fill(0, z * page, (z + 1) * page);
    const path = join(dir, 'memfile');
    writeFileSync(path, memory);
    const build = randomUUID();
    const diffPath = join(dir, 'diff');
    const dirty = [0, 1, 3, 4, 5, 9, 11];
    const r = await exportDiff({
      pages: dirty,
      pageSize: page,
      memorySize: memory.length,
      from: { kind: 'path', path },
      diffPath,
      buildId: build,
    });
    expect(r.storedPages).toBe(4);
    expect(r.zeroPages).toBe(3);
    expect(r.diffSize).toBe(4 * page);
    const diff = readFileSync(diffPath);
    expect(diff.equals(Buffer.concat([0, 1, 5, 11].map((p) => memory.subarray(p * page, (p + 1) * page))))).toBe(true);
    expect(r.mappings).toEqual([
      { offset: 0, length: 2 * page, buildId: build, buildStorageOffset: 0 },
      { offset: 3 * page, length: 2 * page, buildId: NIL_UUID, buildStorageOffset: 0 },
      { offset: 5 * page, length: page, buildId: build, buildStorageOffset: 2 * page },
      { offset: 9 * page, length: page, buildId: NIL_UUID, buildStorageOffset: 0 },
      { offset: 11 * page, length: page, buildId: build, buildStorageOffset: 3 * page },
    ]);
    validateMappings(mergeMappings(baseMappings(memory.length, randomUUID()), r.mappings), memory.length, page);
  });

  it('leaves pages equal to the parent to it, stores the rest, keeps zero pages nil', async () => {
    const page = 4096;
    const parent = randomBytes(8 * page);
    const memory = Buffer.from(parent);
    memory.fill(0x11, 2 * page, 3 * page); // changed
    memory.fill(0, 5 * page, 6 * page); // zeroed
    memory.fill(0x22, 7 * page, 8 * page); // changed
    const path = join(dir, 'memfile');
    writeFileSync(path, memory);
    const build = randomUUID();
    const diffPath = join(dir, 'diff');
    // The parent as the uffd-server holds it: mapped at its own offsets, fetched on demand.
    const address = mapAnonymous(parent.length);
    copyToAddress(address, parent);
    const ensured: [number, number][] = [];
    let r: Awaited<ReturnType<typeof exportDiff>>;
    try {
      r = await exportDiff({
        pages: [0, 1, 2, 3, 5, 7], // 0, 1 and 3 rewritten with what the parent holds
        pageSize: page,
        memorySize: memory.length,
        from: { kind: 'path', path },
        diffPath,
        buildId: build,
        parent: {
          address,
          allReady: false,
          ensure: async (offset, length) => void ensured.push([offset, length]),
        },
      });
    } finally {
      munmap(address, parent.length);
    }
    expect({ stored: r.storedPages, zero: r.zeroPages, deduped: r.dedupedPages }).toEqual({
      stored: 2,
      zero: 1,
      deduped: 3,
    });
    expect(
      readFileSync(diffPath).equals(Buffer.concat([memory.subarray(2 * page, 3 * page), memory.subarray(7 * page)])),
    ).toBe(true);
    expect(r.mappings).toEqual([
      { offset: 2 * page, length: page, buildId: build, buildStorageOffset: 0 },
      { offset: 5 * page, length: page, buildId: NIL_UUID, buildStorageOffset: 0 },
      { offset: 7 * page, length: page, buildId: build, buildStorageOffset: page },
    ]);
    // Only the written runs of the parent were fetched, each once.
    expect(ensured).toEqual([
      [0, 4 * page],
      [5 * page, page],
      [7 * page, page],
    ]);
  });

  it('reads from a memfd and handles runs longer than its copy window', async () => {
    const page = 4096;
    const pages = 5000; // ~20 MiB: more than one 16 MiB run
    const fd = memfdCreate('guest');
    const memory = randomBytes(pages * page);
    pwrite(fd, memory, 0);
    const diffPath = join(dir, 'diff');
    const all = Array.from({ length: pages }, (_, i) => i);
    const r = await exportDiff({
      pages: all,
      pageSize: page,
      memorySize: memory.length,
      from: { kind: 'fd', fd },
      diffPath,
      buildId: randomUUID(),
    });
    close(fd);
    expect(r.storedPages).toBe(pages);
    expect(readFileSync(diffPath).equals(memory)).toBe(true);
    expect(r.mappings).toHaveLength(1);
  });

  it('refuses a page past the memory', async () => {
    const path = join(dir, 'm');
    writeFileSync(path, Buffer.alloc(8192, 1));
    await expect(
      exportDiff({
        pages: [5],
        pageSize: 4096,
        memorySize: 8192,
        from: { kind: 'path', path },
        diffPath: join(dir, 'd'),
        buildId: randomUUID(),
      }),
    ).rejects.toThrow(/past the memory size/);
  });

  it('refuses a memory file shorter than a written page', async () => {
    const path = join(dir, 'm');
    writeFileSync(path, Buffer.alloc(4096, 1));
    await expect(
      exportDiff({
        pages: [0, 1],
        pageSize: 4096,
        memorySize: 8192,
        from: { kind: 'path', path },
        diffPath: join(dir, 'd'),
        buildId: randomUUID(),
      }),
    ).rejects.toThrow(/memory ends at 4096, before page 1/);
  });

  it('refuses pages out of order', async () => {
    const path = join(dir, 'm');
    writeFileSync(path, Buffer.alloc(8192, 1));
    await expect(
      exportDiff({
        pages: [1, 0],
        pageSize: 4096,
        memorySize: 8192,
        from: { kind: 'path', path },
        diffPath: join(dir, 'd'),
        buildId: randomUUID(),
      }),
    ).rejects.toThrow(/ascend/);
  });
});
