import { spawn, type ChildProcess } from 'node:child_process';
import { readdir, readlink } from 'node:fs/promises';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { eventually } from '#test-kit';
import { watchProcessExit } from './process-exit-watch.js';
import { processStartTicks } from './process-identity.js';

/** Open pidfds of this process. */
async function pidfds(): Promise<number> {
  const targets = await Promise.all(
    (await readdir('/proc/self/fd')).map((fd) => readlink(`/proc/self/fd/${fd}`).catch(() => '')),
  );
  return targets.filter((t) => t.includes('pidfd')).length;
}

describe('watchProcessExit (adopted VMMs)', () => {
  const children: ChildProcess[] = [];
  afterEach(() => {
    for (const c of children.splice(0)) c.kill('SIGKILL');
    vi.restoreAllMocks();
  });

  it('holds no timer however many processes it watches, tells each exit once, and closes its fds', async () => {
    const intervals = vi.spyOn(globalThis, 'setInterval');
    const before = await pidfds();
    const exits: number[] = [];
    const stops: (() => void)[] = [];
    for (let i = 0; i < 50; i++) {
      const child = spawn('sleep', ['1000'], { stdio: 'ignore' });
      children.push(child);
      const pid = child.pid!;
      const startTicks = await eventually(async () => (await processStartTicks(pid)) ?? false, {
        timeoutMs: 5000,
        what: 'sleep started',
      });
      stops.push(watchProcessExit({ pid, startTicks }, () => exits.push(pid)));
    }
    expect(intervals).not.toHaveBeenCalled();
    expect(await pidfds()).toBe(before + 50);

    const victim = children[7]!;
    victim.kill('SIGKILL');
    await eventually(() => exits.includes(victim.pid!), { timeoutMs: 10_000, what: 'the exit told' });
    expect(exits).toEqual([victim.pid]);
    expect(await pidfds()).toBe(before + 49);

    for (const stop of stops) stop();
    expect(await pidfds()).toBe(before);
    for (const c of children) c.kill('SIGKILL');
    await new Promise((r) => setTimeout(r, 200));
    expect(exits).toEqual([victim.pid]);
    expect(intervals).not.toHaveBeenCalled();
  });

  it('tells at once when the pid now belongs to another process', async () => {
    const child = spawn('sleep', ['1000'], { stdio: 'ignore' });
    children.push(child);
    const startTicks = await eventually(async () => (await processStartTicks(child.pid!)) ?? false, {
      timeoutMs: 5000,
      what: 'started',
    });
    let exited = false;
    const stop = watchProcessExit({ pid: child.pid!, startTicks: startTicks - 1 }, () => (exited = true));
    await eventually(() => exited, { timeoutMs: 5000, what: 'a reused pid seen as gone' });
    stop();
  });
});
