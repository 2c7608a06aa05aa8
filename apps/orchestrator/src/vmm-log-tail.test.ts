import { appendFile, mkdtemp, readdir, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
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

  it('holds no timer and one inotify fd however many VMM logs it follows; unwatchable ones share one timer', async () => {
    // Interval timers alive (unref'd ones are not in process.getActiveResourcesInfo()).
    const live = new Set<unknown>();
    const set = globalThis.setInterval;
    const clear = globalThis.clearInterval;
    vi.spyOn(globalThis, 'setInterval').mockImplementation(((...args: Parameters<typeof setInterval>) => {
      const t = set(...args);
      live.add(t);
      return t;
    }) as typeof setInterval);
    vi.spyOn(globalThis, 'clearInterval').mockImplementation((t) => {
      live.delete(t);
      clear(t);
    });
    const timers = () => live.size;
    const inotifyFds = async () => {
      const targets = await Promise.all(
        (await readdir('/proc/self/fd')).map((fd) => readlink(`/proc/self/fd/${fd}`).catch(() => '')),
      );
      return targets.filter((t) => t.includes('inotify')).length;
    };
    const { logger, lines } = recordingLogger();
    const timersBefore = timers();
    const tails: VmmLogTail[] = [];
    for (let i = 0; i < 100; i++) {
      const path = join(dir, `vmm${i}.stdout.log`);
      await writeFile(path, '');
      const tail = new VmmLogTail(path, logger, 'stdout', 3_600_000);
      tail.start();
      tails.push(tail);
    }
    expect(timers()).toBe(timersBefore);
    expect(await inotifyFds()).toBeLessThanOrEqual(1);
    await appendFile(join(dir, 'vmm42.stdout.log'), 'from vmm 42\n');
    await eventually(() => lines.includes('from vmm 42'), { timeoutMs: 10_000, what: 'the line of one VMM' });

    // Files not there yet: read by one shared round, whatever their number, until a watch can be set.
    const waiting: VmmLogTail[] = [];
    for (let i = 0; i < 50; i++) {
      const tail = new VmmLogTail(join(dir, `late${i}.log`), logger, 'stderr', 50);
      tail.start();
      waiting.push(tail);
    }
    expect(timers()).toBe(timersBefore + 1);
    await writeFile(join(dir, 'late7.log'), 'late line\n');
    await eventually(() => lines.includes('late line'), { timeoutMs: 10_000, what: 'the late file read' });
    await Promise.all([...tails, ...waiting].map((t) => t.stop()));
    expect(timers()).toBe(timersBefore);
    vi.restoreAllMocks();
  });
});
