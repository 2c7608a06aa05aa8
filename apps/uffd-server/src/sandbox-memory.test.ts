import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { UffdPeerProcess } from '#native';
import { ChunkCache, StorageUnavailable, type ChunkSource } from '#storage';
import { eventually } from '#test-kit';
import { RecordedPrefetch } from './recorded-prefetch.js';
import { SandboxMemory } from './sandbox-memory.js';
import { SourceView } from './source-view.js';

/**
 * A sandbox whose source is remote (a chunk cache mapped into the view, filled on demand): a
 * transient fetch failure is retried by the chunk cache while the fault waits, and only a
 * fetch that keeps failing fails the sandbox. The guest is a separate process (uffd-peer);
 * this process is the server.
 */
const SIZE = 8 * 1024 * 1024;

class FlakySource implements ChunkSource {
  calls = 0;
  constructor(
    private readonly bytes: Buffer,
    private failures: number,
  ) {}
  async readRange(offset: number, length: number): Promise<Buffer> {
    this.calls++;
    await new Promise((r) => setTimeout(r, 5));
    if (this.failures > 0) {
      this.failures--;
      throw new StorageUnavailable('read', 'memfile', new Error('timeout'));
    }
    return this.bytes.subarray(offset, offset + length);
  }
}

describe('SandboxMemory with a remote source', () => {
  let dir: string;
  let memfile: string;
  let bytes: Buffer;
  const cleanups: Array<() => unknown> = [];
  const logger = createLogger({ service: 'uffd-server-test', level: 'silent' });

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'uffd-sandbox-'));
    memfile = join(dir, 'memfile');
    bytes = randomBytes(SIZE);
    writeFileSync(memfile, bytes);
  });
  afterEach(async () => {
    for (const c of cleanups.reverse()) await c();
    cleanups.length = 0;
    rmSync(dir, { recursive: true, force: true });
  });

  async function start(
    source: FlakySource,
    attempts: number,
    prefetchSet?: number[],
    beforeHandshake?: (cache: ChunkCache) => Promise<unknown>,
  ) {
    const cache = await ChunkCache.open({
      source,
      size: SIZE,
      cachePath: join(dir, 'cache'),
      retry: { attempts, initialDelayMs: 5, maxDelayMs: 20, multiplier: 2 },
    });
    cleanups.push(() => cache.close());
    await beforeHandshake?.(cache);
    const view = SourceView.open(SIZE, [
      { offset: 0, length: 4096 * 16, file: undefined, fileOffset: 0 },
      { offset: 4096 * 16, length: SIZE - 4096 * 16, file: cache, fileOffset: 4096 * 16 },
    ]);
    const socketPath = join(dir, 'u.sock');
    let ended: SandboxMemory | undefined;
    const sandbox = new SandboxMemory({
      sandboxId: 'remote',
      socketPath,
      source: view,
      pageSize: 4096,
      prefetchBytes: 256 * 1024,
      readaheadWindows: 4,
      prefetchWithoutTracking: false,
      threads: 2,
      handshakeTimeoutMs: 10_000,
      logger,
      onEnded: (s) => (ended = s),
      ...(prefetchSet
        ? {
            recordedPrefetch: new RecordedPrefetch({
              blockSize: 4096,
              memorySize: SIZE,
              recordMs: 60_000,
              set: { blockSize: 4096, size: SIZE, blocks: prefetchSet },
              logger,
            }),
          }
        : {}),
    });
    cleanups.push(() => sandbox.stop());
    const peer = new UffdPeerProcess(['--socket', socketPath, '--size', String(SIZE), '--tracking', 'wp-async']);
    cleanups.push(() => peer.kill());
    return { sandbox, peer, ended: () => ended };
  }

  it('retries transient fetch failures while the fault waits, and the guest reads the right bytes', async () => {
    const source = new FlakySource(bytes, 2);
    const { sandbox, peer } = await start(source, 4);
    await peer.ready();
    expect(await peer.command(`check ${memfile} ${4096 * 16} 8192`)).toBe('ok');
    const st = sandbox.stats();
    expect(st.fetchRetries).toBe(2);
    expect(st.state).toBe('serving');
    // The nil range at the start reads as zeros, not as the file.
    const zeros = join(dir, 'zeros');
    writeFileSync(zeros, Buffer.alloc(4096 * 16));
    expect(await peer.command(`check ${zeros} 0 ${4096 * 16}`)).toBe('ok');
    await peer.exit();
  });

  it('the recorded-prefetch pass asks for what is not fetched yet, in its order, and the start then takes no fault', async () => {
    const source = new FlakySource(bytes, 1);
    // Pages in three chunks of the remote part, not in ascending order.
    const set = [1500, 1501, 900, 40, 41, 1900];
    const { sandbox, peer } = await start(source, 4, set);
    await peer.ready();
    await eventually(() => expect(sandbox.stats().recordedPrefetch).toMatchObject({ passDone: set.length }));
    const st = sandbox.stats();
    // The blocks, then the 256 KiB windows a fault on them installs: 4 windows of 64 pages in all.
    expect(st.recordedPrefetch).toMatchObject({
      passPages4k: 4 * 64,
      passAlreadyPresent: 0,
      setBlocks: set.length,
    });
    // The pass waited through a failed fetch: the set's 4 chunks, each fetched once, one of them
    // twice (the chunk cache retries the set's fetches itself, so no fault-path retry is counted).
    expect(source.calls).toBe(4 + 1);
    for (const p of [...set, 1530, 959]) expect(await peer.command(`check ${memfile} ${p * 4096} 4096`)).toBe('ok');
    expect(sandbox.stats()).toMatchObject({
      faults: 0,
      recordedPrefetch: { startFaults: 0, recordedBlocks: set.length },
    });
    expect(sandbox.stopRecording()).toMatchObject({ recording: false, recordedBlocks: set.length });
    await peer.exit();
  });

  it('set chunks fetched before the VMM connects (the Prepare-time bucket prefetch) are ready at once: no fetch event, no fault', async () => {
    const source = new FlakySource(bytes, 0);
    const set = [1500, 1501, 900, 40, 41, 1900];
    const { sandbox, peer } = await start(source, 4, set, (cache) =>
      cache.prefetch(set.map((b) => ({ offset: b * 4096, length: 4096 }))),
    );
    const fetchedBefore = source.calls;
    await peer.ready();
    await eventually(() => expect(sandbox.stats().recordedPrefetch).toMatchObject({ passDone: set.length }));
    expect(sandbox.stats()).toMatchObject({ fetchRequests: 0, faults: 0, recordedPrefetch: { passPages4k: 4 * 64 } });
    for (const p of [...set, 1530, 959]) expect(await peer.command(`check ${memfile} ${p * 4096} 4096`)).toBe('ok');
    expect(source.calls).toBe(fetchedBefore);
    await peer.exit();
  });

  it('fails the sandbox when a fetch still fails after every attempt', async () => {
    const source = new FlakySource(bytes, 100);
    const { sandbox, peer, ended } = await start(source, 3);
    await peer.ready();
    peer.child.stdin.write(`check ${memfile} ${SIZE / 2} 4096\n`);
    await eventually(() => expect(sandbox.state).toBe('failed'));
    expect(sandbox.error).toMatch(/source fetch of \[\d+, \d+\) failed: .*timeout/);
    expect(ended()).toBe(sandbox);
    // 3 attempts per chunk fetch, made by the chunk cache only (no retry loop above it)
    await sandbox.stop();
    expect(source.calls).toBeGreaterThanOrEqual(3);
    expect(source.calls % 3).toBe(0);
  });
});
