import { randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { UffdPeerProcess } from '#native';
import { BuildStore, encodeHeader, LocalBackend, NIL_UUID, type StorageBackend } from '#storage';
import { SandboxMemory } from './sandbox-memory.js';
import { SourceView } from './source-view.js';

/**
 * A two-layer build served from a bucket that is not a local directory (a LocalBackend behind a
 * wrapper stands in for GCS): the build store's layered file gives each layer's chunk cache,
 * whose sparse file is mapped into the source view and filled as faults ask.
 */
const SIZE = 8 * 1024 * 1024;
const PAGE = 4096;

function remoteLike(inner: LocalBackend): StorageBackend & { reads: number } {
  const counted = {
    reads: 0,
    location: 'remote-double',
    readRange: (p: string, o: number, l: number) => {
      counted.reads++;
      return inner.readRange(p, o, l);
    },
    read: (p: string) => inner.read(p),
    size: (p: string) => inner.size(p),
    exists: (p: string) => inner.exists(p),
    write: (p: string, d: Uint8Array) => inner.write(p, d),
    upload: (p: string, f: string) => inner.upload(p, f),
    download: (p: string, f: string) => inner.download(p, f),
    list: (p: string) => inner.list(p),
    delete: (p: string) => inner.delete(p),
    close: () => inner.close(),
  };
  return counted;
}

describe('memory layers through the build store', () => {
  let dir: string;
  const cleanups: Array<() => unknown> = [];
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'uffd-layers-'));
  });
  afterEach(async () => {
    for (const c of cleanups.reverse()) await c();
    cleanups.length = 0;
    rmSync(dir, { recursive: true, force: true });
  });

  it('serves base + diff + nil mappings byte for byte, fetching chunks on demand', async () => {
    const bucket = join(dir, 'bucket');
    const base = randomUUID();
    const diff = randomUUID();
    mkdirSync(join(bucket, base), { recursive: true });
    mkdirSync(join(bucket, diff), { recursive: true });
    const baseBytes = randomBytes(SIZE);
    const diffBytes = randomBytes(16 * PAGE);
    writeFileSync(join(bucket, base, 'memfile'), baseBytes);
    writeFileSync(join(bucket, diff, 'memfile'), diffBytes);
    const mappings = [
      { offset: 0, length: 100 * PAGE, buildId: base, buildStorageOffset: 0 },
      { offset: 100 * PAGE, length: 16 * PAGE, buildId: diff, buildStorageOffset: 0 },
      { offset: 116 * PAGE, length: 4 * PAGE, buildId: NIL_UUID, buildStorageOffset: 0 },
      { offset: 120 * PAGE, length: SIZE - 120 * PAGE, buildId: base, buildStorageOffset: 120 * PAGE },
    ];
    writeFileSync(
      join(bucket, diff, 'memfile.header'),
      encodeHeader({
        metadata: { version: 3, blockSize: PAGE, size: SIZE, generation: 1, buildId: diff, baseBuildId: base },
        mappings,
      }),
    );
    const expected = Buffer.from(baseBytes);
    diffBytes.copy(expected, 100 * PAGE);
    expected.fill(0, 116 * PAGE, 120 * PAGE);
    const expectedPath = join(dir, 'expected');
    writeFileSync(expectedPath, expected);

    const backend = remoteLike(new LocalBackend(bucket));
    const store = new BuildStore({ backend, cacheDir: join(dir, 'cache'), owner: 'uffd-server' });
    cleanups.push(() => store.close());
    const { file } = await store.openBuildFile(diff, 'memfile');
    const view = await SourceView.ofLayers(file);
    expect(view.allReady).toBe(false);
    expect(view.readyRanges()).toEqual([{ offset: 116 * PAGE, length: 4 * PAGE }]);
    const socketPath = join(dir, 'u.sock');
    const sandbox = new SandboxMemory({
      sandboxId: 'layers',
      socketPath,
      source: view,
      pageSize: PAGE,
      prefetchBytes: 2 * 1024 * 1024,
      readaheadWindows: 4,
      prefetchWithoutTracking: false,
      threads: 1,
      handshakeTimeoutMs: 10_000,
      logger: createLogger({ service: 'uffd-server-test', level: 'silent' }),
    });
    cleanups.push(() => sandbox.stop());
    const peer = new UffdPeerProcess(['--socket', socketPath, '--size', String(SIZE), '--tracking', 'wp-async']);
    cleanups.push(() => peer.kill());
    await peer.ready();
    expect(await peer.command(`check ${expectedPath} ${99 * PAGE} ${22 * PAGE}`)).toBe('ok');
    const readsSoFar = backend.reads;
    expect(readsSoFar).toBeGreaterThan(0);
    expect(readsSoFar).toBeLessThan(SIZE / (4 * 1024 * 1024) + 2); // chunks, not pages
    expect(await peer.command(`check ${expectedPath} 0 ${SIZE}`)).toBe('ok');
    expect(sandbox.stats().fetchRequests).toBeGreaterThan(0);
    await peer.exit();
  });
});
