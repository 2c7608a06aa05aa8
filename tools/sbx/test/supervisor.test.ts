import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { eventually } from '#test-kit';
import { Supervisor } from '../src/node/supervisor.js';
import type { ServiceSpec } from '../src/node/service-plan.js';

const fixture = resolve(__dirname, 'fixtures/health-service.mjs');
const logger = createLogger({ service: 'test', level: 'silent' });
const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function setup(specs: (dir: string) => ServiceSpec[]) {
  const dir = await mkdtemp(join(tmpdir(), 'supervisor-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const supervisor = new Supervisor({
    specs: specs(dir),
    // The fixture takes the service name as its first argument, like ./sbx does.
    launcher: [process.execPath, fixture],
    logDir: join(dir, 'logs'),
    logger,
    healthTimeoutMs: 10_000,
    maxBackoffMs: 400,
    stopGraceMs: 3000,
  });
  cleanups.push(() => supervisor.stop());
  return { dir, supervisor };
}

const isAlive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

describe('Supervisor', () => {
  it('starts services in dependency order, waits on health, stops them all', async () => {
    const { supervisor, dir } = await setup((d) => [
      { name: 'b', args: [join(d, 'b.sock')], healthTarget: join(d, 'b.sock'), dependsOn: ['a'] },
      { name: 'a', args: [join(d, 'a.sock')], healthTarget: join(d, 'a.sock'), dependsOn: [] },
    ]);
    await supervisor.start();
    const status = supervisor.status();
    expect(status.map((s) => [s.name, s.state])).toEqual([
      ['a', 'serving'],
      ['b', 'serving'],
    ]);
    const pids = status.map((s) => s.pid!);
    expect(pids.every(isAlive)).toBe(true);
    await supervisor.stop();
    expect(pids.some(isAlive)).toBe(false);
    expect(existsSync(join(dir, 'a.sock'))).toBe(false);
    expect(await readFile(join(dir, 'logs', 'a.log'), 'utf8')).toMatch(/grpc serving/);
  });

  it("runs each service in a process group of its own, so a terminal's Ctrl-C reaches only the supervisor", async () => {
    const { supervisor } = await setup((d) => [
      { name: 'a', args: [join(d, 'a.sock')], healthTarget: join(d, 'a.sock'), dependsOn: [] },
    ]);
    await supervisor.start();
    const pid = supervisor.status()[0]!.pid!;
    // /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces, so split after ')'.
    const pgrp = async (p: number) => Number((await readFile(`/proc/${p}/stat`, 'utf8')).split(') ')[1]!.split(' ')[2]);
    expect(await pgrp(pid)).toBe(pid);
    expect(await pgrp(pid)).not.toBe(await pgrp(process.pid));
  });

  it('restarts a crashed service with backoff', async () => {
    const { supervisor } = await setup((d) => [
      {
        name: 'flaky',
        args: [join(d, 'f.sock'), '--exit-after', '1500'],
        healthTarget: join(d, 'f.sock'),
        dependsOn: [],
      },
    ]);
    await supervisor.start();
    const firstPid = supervisor.status()[0]!.pid;
    await eventually(() => (supervisor.status()[0]!.restarts ?? 0) >= 2, { timeoutMs: 30_000 });
    const s = supervisor.status()[0]!;
    expect(s.lastExit).toBe('exit 3');
    expect(s.pid).not.toBe(firstPid);
  });

  it('keeps restarting a service whose restarts die before serving, until one comes up', async () => {
    const { supervisor, dir } = await setup((d) => [
      {
        name: 'stubborn',
        args: [join(d, 's.sock'), '--fail-while', join(d, 'broken')],
        healthTarget: join(d, 's.sock'),
        dependsOn: [],
      },
    ]);
    await supervisor.start();
    const first = supervisor.status()[0]!.pid!;
    await writeFile(join(dir, 'broken'), '');
    process.kill(first, 'SIGKILL');
    await eventually(() => supervisor.status()[0]!.restarts >= 2 && supervisor.status()[0]!.lastExit === 'exit 4', {
      timeoutMs: 30_000,
    });
    await rm(join(dir, 'broken'));
    await eventually(() => supervisor.status()[0]!.state === 'serving', { timeoutMs: 30_000 });
    expect(isAlive(supervisor.status()[0]!.pid!)).toBe(true);
  });

  it('fails start, and stops what it started, when a service never serves', async () => {
    const { supervisor, dir } = await setup((d) => [
      { name: 'ok', args: [join(d, 'ok.sock')], healthTarget: join(d, 'ok.sock'), dependsOn: [] },
      {
        name: 'dies',
        args: [join(d, 'x.sock'), '--exit-after', '0'],
        healthTarget: join(d, 'never.sock'),
        dependsOn: ['ok'],
      },
    ]);
    await expect(supervisor.start()).rejects.toThrow(/dies exited before serving/);
    expect(supervisor.status().find((s) => s.name === 'ok')!.state).toBe('stopped');
    expect(existsSync(join(dir, 'ok.sock'))).toBe(false);
  });

  it('rejects a dependency on an unknown service', async () => {
    await expect(
      setup(() => [{ name: 'a', args: [], healthTarget: '/nonexistent', dependsOn: ['ghost'] }]),
    ).rejects.toThrow(/unknown service ghost/);
  });
});
