import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { lostSandboxes, ServiceLossWatch, type InstanceView, type ServiceSurvey } from './service-loss-watch.js';

const serving = (entries: [string, string][]): InstanceView => ({ reachable: true, sandboxes: new Map(entries) });

function survey(
  memory: InstanceView[],
  devices: InstanceView[],
  owners: Record<string, [number, number]>,
): ServiceSurvey {
  return {
    memory,
    devices,
    memoryInstanceOf: (id) => owners[id]?.[0],
    deviceInstanceOf: (id) => owners[id]?.[1],
  };
}

describe('lostSandboxes', () => {
  const owners: Record<string, [number, number]> = { a: [0, 0], b: [1, 1] };

  it('keeps sandboxes both instances still serve', () => {
    const s = survey(
      [serving([['a', 'serving']]), serving([['b', 'serving']])],
      [serving([['a', '']]), serving([['b', '']])],
      owners,
    );
    expect(lostSandboxes(['a', 'b'], s)).toEqual([]);
  });

  it('fails the sandboxes of a uffd-server that is unreachable or restarted, and only those', () => {
    const s = survey(
      [{ reachable: false, error: 'connect ECONNREFUSED' }, serving([])],
      [serving([['a', '']]), serving([['b', '']])],
      owners,
    );
    expect(lostSandboxes(['a', 'b'], s).map((l) => [l.sandboxId, l.service])).toEqual([
      ['a', 'uffd-server'],
      ['b', 'uffd-server'],
    ]);
    expect(lostSandboxes(['a'], s)[0]!.reason).toMatch(/unreachable/);
  });

  it('fails a sandbox whose memory serving failed; peer-gone is left to the VMM exit watch', () => {
    const s = survey(
      [serving([['a', 'failed']]), serving([['b', 'peer-gone']])],
      [serving([['a', '']]), serving([['b', '']])],
      owners,
    );
    expect(lostSandboxes(['a', 'b'], s).map((l) => l.sandboxId)).toEqual(['a']);
  });

  it('waits for an unreachable block-server but fails a sandbox whose device the instance no longer has', () => {
    const s = survey(
      [serving([['a', 'serving']]), serving([['b', 'serving']])],
      [{ reachable: false, error: 'down' }, serving([])],
      owners,
    );
    expect(lostSandboxes(['a', 'b'], s)).toEqual([
      { sandboxId: 'b', service: 'block-server', reason: 'block-server #1 no longer has its device' },
    ]);
  });

  it('concludes nothing from an instance that answered slowly or oddly', () => {
    const unknown: InstanceView = { reachable: 'unknown', error: 'deadline exceeded' };
    expect(lostSandboxes(['a', 'b'], survey([unknown, unknown], [unknown, unknown], owners))).toEqual([]);
  });
});

describe('ServiceLossWatch', () => {
  it('waits out a uffd-server restart: unreachable within the grace fails nothing, back and serving keeps it', async () => {
    const down: InstanceView = { reachable: false, error: 'connect ECONNREFUSED' };
    let memory: InstanceView = down;
    const failed: string[] = [];
    const watch = new ServiceLossWatch({
      intervalMs: 0,
      running: () => ['a'],
      survey: () => Promise.resolve(survey([memory], [serving([['a', '']])], { a: [0, 0] })),
      fail: (l) => Promise.resolve(void failed.push(`${l.sandboxId}: ${l.reason}`)),
      logger: pino({ level: 'silent' }),
      memoryDownGraceMs: 60_000,
    });
    expect(await watch.check()).toEqual([]);
    memory = serving([['a', 'serving']]);
    expect(await watch.check()).toEqual([]);
    memory = down;
    expect(await watch.check()).toEqual([]);
    expect(failed).toEqual([]);
  });

  it('fails the sandboxes of a uffd-server unreachable for longer than the grace', async () => {
    const failed: string[] = [];
    const watch = new ServiceLossWatch({
      intervalMs: 0,
      running: () => ['a'],
      survey: () =>
        Promise.resolve(
          survey([{ reachable: false, error: 'connect ECONNREFUSED' }], [serving([['a', '']])], { a: [0, 0] }),
        ),
      fail: (l) => Promise.resolve(void failed.push(l.reason)),
      logger: pino({ level: 'silent' }),
      memoryDownGraceMs: 0,
    });
    await watch.check();
    expect(failed).toEqual(['uffd-server #0 unreachable (connect ECONNREFUSED)']);
  });
});
