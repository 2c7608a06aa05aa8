/**
 * A net-agent start that fails at its last step (the control socket is held by a live server)
 * gives back what the earlier steps made: the node's nft table, forwarding rules and the slots
 * the pool began to create. Checked by the node namespace looking exactly as before.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sbx } from '#test-kit';
import { NodeNamespace, run } from './node-namespace.js';

const isRoot = process.getuid?.() === 0;
let node: NodeNamespace;
let dir: string;
let holder: Server;

beforeAll(async () => {
  if (!isRoot) return;
  dir = await mkdtemp(join(tmpdir(), 'net-agent-rollback-'));
  node = await NodeNamespace.create('r');
  holder = createServer();
  await new Promise<void>((resolve) => holder.listen(join(dir, 'taken.sock'), resolve));
});

afterAll(async () => {
  holder?.close();
  if (node) await node.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe.skipIf(!isRoot)('net-agent start', () => {
  it('rolls back the node table and the slots it made when the control socket is taken', async () => {
    const before = await node.snapshot();
    const out = await run('nsenter', [
      `--net=${node.nsPath(node.node)}`,
      sbx,
      'net-agent',
      'serve',
      ...['--control-socket', join(dir, 'taken.sock'), '--metrics-port', '0', '--pool-new-size', '4'],
      ...['--namespace-prefix', node.slotPrefix, '--node-id', node.prefix],
    ]);
    expect(out.code).toBe(1);
    expect(out.stderr).toMatch(/another process is serving on it/);
    expect(await node.snapshot()).toEqual(before);
  });
});
