import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import type { SandboxConfig } from '#proto/orchestrator';
import { RouteState, type RouteEvent } from '#proto/sbx/routing';
import { AutoResume } from './auto-resume.js';
import { NoLifecycleEvents } from './lifecycle-events.js';
import { SandboxBusy, SandboxNotFound } from './orchestrator-errors.js';
import { PausedSandboxes } from './paused-sandboxes.js';
import { RouteFeed } from './route-feed.js';
import type { CreateRequest } from './sandbox-manager.js';
import type { Sandbox } from './sandbox.js';

/*
 * The routing catalogue as the manager drives it (publish when serving, unpublish first on
 * pause or stop, then the lifecycle event), over a map standing in for the manager's sandboxes.
 */

const logger = createLogger({ service: 'test', level: 'silent' });
let dir: string;
let sandboxes: Map<string, Sandbox>;
let paused: PausedSandboxes;
let feed: RouteFeed;

function config(id: string, extra: Partial<SandboxConfig> = {}): SandboxConfig {
  return { sandboxId: id, templateId: 'base', buildId: 'b0', envVars: {}, metadata: {}, ...extra } as SandboxConfig;
}

function sandbox(id: string, phase: string, extra: Partial<SandboxConfig> = {}): Sandbox {
  const sbx = {
    id,
    phase,
    config: config(id, extra),
    hostIp: '10.11.0.5',
    startTime: new Date(0),
    endTime: new Date(60_000),
  } as unknown as Sandbox;
  sandboxes.set(id, sbx);
  return sbx;
}

function entry(id: string) {
  return {
    sandboxId: id,
    nodeId: 'n',
    templateId: 'base',
    buildId: 'b0',
    hostIp: '10.11.0.5',
    guestIp: '',
    startTime: new Date(),
    endTime: new Date(),
  };
}

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'route-feed-'));
  sandboxes = new Map();
  paused = new PausedSandboxes(join(dir, 'paused.json'));
  feed = new RouteFeed({ inner: new NoLifecycleEvents(), paused, sandboxes: () => sandboxes, logger });
});

afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('RouteFeed', () => {
  it('sends the whole table first, then running → pausing → paused, with the ingress settings', async () => {
    const events: RouteEvent[] = [];
    const sbx = sandbox('a', 'running', {
      network: { ingress: { trafficAccessToken: 't', maskRequestHost: 'h:1' } },
      autoResume: { policy: 'any' },
    });
    const stop = feed.watch((e) => events.push(e));
    expect(events[0]).toMatchObject({
      reset: true,
      routes: [{ sandboxId: 'a', state: RouteState.ROUTE_STATE_RUNNING }],
    });
    expect(events[0]!.routes[0]).toMatchObject({
      trafficAccessToken: 't',
      maskRequestHost: 'h:1',
      autoResumePolicy: 'any',
    });

    (sbx as { phase: string }).phase = 'pausing';
    await feed.unpublish('a');
    sandboxes.delete('a');
    await feed.event('paused', 'a', { buildId: 'b1' });
    expect(events.slice(1).map((e) => e.routes[0]?.state)).toEqual([
      RouteState.ROUTE_STATE_PAUSING,
      RouteState.ROUTE_STATE_PAUSED,
    ]);
    expect(paused.get('a')).toMatchObject({ buildId: 'b1', timeoutMs: 60_000 });

    // Running again (resumed by anyone): no longer remembered as paused.
    sandbox('a', 'running');
    await feed.publish(entry('a'));
    expect(paused.get('a')).toBeUndefined();
    expect(events.at(-1)!.routes[0]!.state).toBe(RouteState.ROUTE_STATE_RUNNING);

    // Killed: removed.
    (sandboxes.get('a') as { phase: string }).phase = 'stopping';
    await feed.unpublish('a');
    sandboxes.delete('a');
    await feed.event('killed', 'a');
    expect(events.at(-1)).toEqual({ reset: false, routes: [], removed: ['a'] });
    stop();
    await feed.publish(entry('a'));
    expect(events.at(-1)).toEqual({ reset: false, routes: [], removed: ['a'] });
  });

  it('remembers paused sandboxes across a restart (the file)', async () => {
    sandbox('p', 'pausing');
    await feed.unpublish('p');
    sandboxes.delete('p');
    await feed.event('paused', 'p', { buildId: 'b9' });
    const again = new PausedSandboxes(join(dir, 'paused.json'));
    await again.load();
    expect(again.get('p')).toMatchObject({ buildId: 'b9', config: { sandboxId: 'p' } });
  });
});

describe('AutoResume', () => {
  it('resumes a paused sandbox with policy any once for concurrent asks, from its pause build', async () => {
    sandbox('r', 'pausing', { autoResume: { policy: 'any' } });
    await feed.unpublish('r');
    sandboxes.delete('r');
    await feed.event('paused', 'r', { buildId: 'b2' });
    const creates: CreateRequest[] = [];
    const resume = new AutoResume({
      feed,
      paused,
      pollMs: 5,
      logger,
      create: async (req) => {
        creates.push(req);
        await new Promise((r) => setTimeout(r, 20));
        sandbox('r', 'running');
        await feed.publish(entry('r'));
      },
    });
    const deadline = Date.now() + 5000;
    const routes = await Promise.all([1, 2, 3].map(() => resume.resume('r', deadline, true)));
    expect(routes.map((r) => r.state)).toEqual(Array(3).fill(RouteState.ROUTE_STATE_RUNNING));
    expect(creates).toHaveLength(1);
    expect(creates[0]!.config).toMatchObject({ buildId: 'b2', snapshot: true, sandboxId: 'r' });
    expect(creates[0]!.endTime.getTime() - creates[0]!.startTime.getTime()).toBe(60_000);
  });

  it('refuses a policy other than any, a caller without allow_resume, and an unknown id', async () => {
    for (const [id, policy] of [
      ['off1', 'off'],
      ['any1', 'any'],
    ] as const) {
      sandbox(id, 'pausing', { autoResume: { policy } });
      await feed.unpublish(id);
      sandboxes.delete(id);
      await feed.event('paused', id, { buildId: 'b3' });
    }
    const resume = new AutoResume({ feed, paused, logger, create: async () => undefined });
    const deadline = Date.now() + 1000;
    await expect(resume.resume('off1', deadline, true)).rejects.toThrow(SandboxBusy);
    await expect(resume.resume('any1', deadline, false)).rejects.toThrow(/allow_resume/);
    await expect(resume.resume('nope', deadline, true)).rejects.toThrow(SandboxNotFound);
  });

  it('waits for a starting sandbox, and gives up at the deadline naming its state', async () => {
    sandbox('s', 'creating');
    const resume = new AutoResume({ feed, paused, logger, pollMs: 5, create: async () => undefined });
    const waiting = resume.resume('s', Date.now() + 5000, false);
    setTimeout(() => ((sandboxes.get('s') as { phase: string }).phase = 'running'), 30);
    expect((await waiting).hostIp).toBe('10.11.0.5');
    sandbox('slow', 'creating');
    await expect(resume.resume('slow', Date.now() + 50, false)).rejects.toThrow(/starting/);
  });
});
