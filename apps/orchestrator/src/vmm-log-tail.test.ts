import { appendFile, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { Logger } from '#logging';
import { eventually } from '#test-kit';
import { VmmLogTail } from './vmm-log-tail.js';

/** A logger that keeps what it was given. */
function recordingLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  const take = (_fields: unknown, msg: string) => void lines.push(msg);
  return { logger: { info: take, warn: take } as unknown as Logger, lines };
}

describe('VmmLogTail', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmm-log-tail-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('follows the file as it is written, with no timer due (inotify), and reads the rest on stop', async () => {
    const path = join(dir, 'vmm.stdout.log');
    await writeFile(path, '');
    const { logger, lines } = recordingLogger();
    // The safety-net timer never fires during the test: only a change notice can deliver.
    const tail = new VmmLogTail(path, logger, 'stdout', 3_600_000);
    tail.start();
    await appendFile(path, 'first line\nsecond ');
    await eventually(() => lines.includes('first line'), { timeoutMs: 10_000, what: 'the first line logged' });
    await appendFile(path, 'half\nlast line without newline');
    await tail.stop();
    expect(lines).toEqual(['first line', 'second half', 'last line without newline']);
  });

  it('starts on a file that is not there yet and stops cleanly', async () => {
    const { logger, lines } = recordingLogger();
    const tail = new VmmLogTail(join(dir, 'missing.log'), logger, 'stderr', 3_600_000);
    tail.start();
    await tail.stop();
    expect(lines).toEqual([]);
  });
});
