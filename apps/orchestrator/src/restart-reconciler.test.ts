import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { createReq, logger, makeHarness, type Harness } from '../test/recording-doubles.js';
import { reconcileOnStart } from './restart-reconciler.js';
import type { SandboxManager } from './sandbox-manager.js';
import type { SandboxStateFile } from './sandbox-state-store.js';

/*
 * The restart reconciler over the recording doubles: the services and VMMs outlive the
 * orchestrator (their sets are kept), a new manager reads the state files a killed one left.
 */

let root: string;
let h: Harness;
let restarted: SandboxManager | undefined;

beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'orch-reconcile-'));
  h = await makeHarness(root);
});

afterEach(async () => {
  await restarted?.shutdown('kill');
  restarted = undefined;
  await h.close();
  await rm(root, { recursive: true, force: true });
});

const statePath = (id: string) => join(root, 'data', 'sandboxes', id, 'state.json');

async function readState(id: string): Promise<SandboxStateFile> {
  return JSON.parse(await readFile(statePath(id), 'utf8')) as SandboxStateFile;
}

/**
 * The state file once a save saying envd answered has landed (the create answers before its
 * last save is written).
 */
async function savedAfterInit(id: string): Promise<SandboxStateFile> {
  let state: SandboxStateFile | undefined;
  await eventually(
    async () => {
      state = await readState(id);
      return state.envdInitialized === true;
    },
    { what: `${id}'s state file saying envd answered` },
  );
  return state!;
}

/** The orchestrator is killed (its sandboxes forgotten, nothing given back) and started again. */
async function killAndRestart() {
  h.manager.sandboxes.clear();
  restarted = h.newManager();
  return reconcileOnStart({
    manager: restarted,
    services: h.node,
    vmm: h.vmm,
    envd: h.envdClient,
    builds: h.builds,
    states: h.states,
    events: h.events,
    socketDir: join(root, 's'),
    logger,
    envdTimeoutMs: 200,
  });
}

describe('restart reconciler', () => {
  it('a sandbox whose state was written while envd /init was under way is adopted with /init sent again', async () => {
    await h.manager.create(createReq('answered'));
    await h.manager.create(createReq('cut'));
    // What the disk holds when the kill comes while /init is under way: `running`, /init not answered.
    const cut = await savedAfterInit('cut');
    expect(cut.phase).toBe('running');
    delete cut.envdInitialized;
    // Through the manager's store: it runs after any save of that sandbox still under way.
    await h.states.save(cut);
    // Said by a save behind the create's answer.
    await eventually(async () => (await readState('answered')).envdInitialized === true, {
      what: 'the state file saying envd answered',
    });
    h.envd.inits.length = 0;

    const report = await killAndRestart();
    expect(report.adopted.sort()).toEqual(['answered', 'cut']);
    expect(h.envd.inits).toEqual([cut.slot!.hostIp]);
    expect(
      restarted!
        .list()
        .map((s) => s.config.sandboxId)
        .sort(),
    ).toEqual(['answered', 'cut']);
    expect((await readState('cut')).envdInitialized).toBe(true);
  });

  it('one whose envd does not take /init again is cleaned up, not adopted', async () => {
    await h.manager.create(createReq('cut'));
    const cut = await savedAfterInit('cut');
    delete cut.envdInitialized;
    // Through the manager's store: it runs after any save of that sandbox still under way.
    await h.states.save(cut);
    h.envd.fails = true;

    const report = await killAndRestart();
    expect(report.adopted).toEqual([]);
    expect(report.cleaned.map((c) => c.sandboxId)).toEqual(['cut']);
    expect(report.cleaned[0]!.reason).toMatch(/adopt failed/);
    expect([...h.node.slotsInUse.keys()]).toEqual([]);
    expect([...h.node.devicesOpen]).toEqual([]);
    expect([...h.node.servings]).toEqual([]);
    expect([...h.vmm.running]).toEqual([]);
  });
});
