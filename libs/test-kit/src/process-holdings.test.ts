import { closeSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { freeTcpPort } from './free-tcp-port.js';
import { mappings, openFds, steadyFdCount } from './process-holdings.js';

describe('what a process holds', () => {
  it('lists an open file among the fds until it is closed, and counts fds once steady', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'test-kit-fds-'));
    const file = join(dir, 'held');
    const fd = openSync(file, 'w');
    try {
      expect(openFds(process.pid)).toContain(file);
      expect(await steadyFdCount(process.pid, { reads: 2, intervalMs: 5 })).toBe(openFds(process.pid).length);
    } finally {
      closeSync(fd);
      rmSync(dir, { recursive: true, force: true });
    }
    expect(openFds(process.pid)).not.toContain(file);
  });

  it('reads mappings with their size and permissions', () => {
    const own = mappings(process.pid).find((m) => m.path === process.execPath);
    expect(own?.size).toBeGreaterThan(0);
    expect(own?.perms).toMatch(/^[r-][w-][x-][ps]$/);
  });

  it('finds a TCP port that can be bound', async () => {
    const port = await freeTcpPort();
    expect(port).toBeGreaterThan(0);
  });
});
