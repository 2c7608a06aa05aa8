import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { BuildStore, LocalBackend } from '#storage';
import { processStartTime, SandboxRecords, type SandboxRecord } from './sandbox-record.js';
import { SandboxRegistry } from './sandbox-registry.js';

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'sandbox-record-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

function record(over: Partial<SandboxRecord>): SandboxRecord {
  return {
    version: 1,
    sandboxId: 'sbx-1',
    socketPath: join(dir, 'sbx-1.sock'),
    memfilePath: join(dir, 'memfile'),
    prefetchBytes: 0,
    peerPid: process.pid,
    peerStartTime: processStartTime(process.pid)!,
    uffdFd: 999,
    regions: [{ base: 0x10000000, size: 4096, offset: 0, pageSize: 4096 }],
    tracking: 'present',
    ...over,
  };
}

describe('sandbox records', () => {
  it('reads back what was written, drops unreadable and half-written files', () => {
    const records = new SandboxRecords(join(dir, 'state'));
    records.write(record({}));
    writeFileSync(join(records.dir, 'broken.json'), '{"version":');
    writeFileSync(join(records.dir, 'sbx-2.json.tmp'), '{}');
    const all = records.readAll();
    expect(all.filter((r) => 'sandboxId' in r)).toEqual([record({})]);
    expect(all.filter((r) => 'error' in r)).toHaveLength(1);
    expect(readdirSync(records.dir)).toEqual(['sbx-1.json']);
    records.remove('sbx-1');
    expect(readdirSync(records.dir)).toEqual([]);
  });

  it('a process start time tells a reused pid apart; a gone process has none', async () => {
    const child = spawn('sleep', ['30'], { stdio: 'ignore' });
    const start = processStartTime(child.pid!);
    expect(start).toMatch(/^\d+$/);
    expect(start).not.toBe(processStartTime(process.pid));
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    expect(processStartTime(child.pid!)).toBeUndefined();
  });

  it('adopt refuses, with the reason, a wp-sync sandbox, a gone VMM and a VMM without the recorded fd, and removes their records', async () => {
    const records = new SandboxRecords(join(dir, 'state'));
    const builds = new BuildStore({
      backend: new LocalBackend(dir),
      cacheDir: join(dir, 'cache'),
      owner: 'uffd-server',
    });
    records.write(record({ sandboxId: 'wp-sync', tracking: 'wp-sync' }));
    records.write(record({ sandboxId: 'gone', peerStartTime: '1' }));
    records.write(record({ sandboxId: 'no-fd' }));
    const registry = new SandboxRegistry({
      settings: {
        prefetchBytes: 0,
        readaheadWindows: 0,
        prefetchWithoutTracking: false,
        threadsPerSandbox: 1,
        handshakeTimeoutMs: 1000,
        maxSandboxes: 8,
        recordedPrefetch: true,
        prefetchRecordMs: 30_000,
      },
      builds,
      logger: createLogger({ service: 'uffd-server-test', level: 'silent' }),
      records,
    });
    const { adopted, dropped } = await registry.adopt();
    expect(adopted).toEqual([]);
    expect(Object.fromEntries(dropped.map((d) => [d.sandboxId, d.reason]))).toEqual({
      'wp-sync': expect.stringMatching(/wp-sync: the written pages were tracked in the earlier process/),
      gone: expect.stringMatching(/the VMM \(pid \d+\) is gone/),
      'no-fd': expect.stringMatching(/pidfd_getfd failed: EBADF \(fd 999\)/),
    });
    expect(readdirSync(records.dir)).toEqual([]);
    expect(registry.size).toBe(0);
    await builds.close();
  });
});
