import { describe, expect, it } from 'vitest';
import { RouteState, type SandboxRoute } from '#proto/sbx/routing';
import { RouteTable } from './route-table.js';

const running = (id: string, hostIp: string): SandboxRoute => ({
  sandboxId: id,
  state: RouteState.ROUTE_STATE_RUNNING,
  hostIp,
  autoResumePolicy: '',
});

describe('RouteTable', () => {
  it('applies a whole table, then changes; a new whole table replaces it', () => {
    const table = new RouteTable();
    const changes: string[] = [];
    table.onChange((prev, cur) =>
      changes.push(`${prev?.sandboxId ?? '-'}@${prev?.hostIp ?? ''}>${cur?.hostIp ?? 'gone'}`),
    );
    expect(table.synced).toBe(false);
    table.apply({ reset: true, routes: [running('a', '10.11.0.1'), running('B', '10.11.0.2')], removed: [] });
    expect(table.synced).toBe(true);
    expect(table.get('a')?.hostIp).toBe('10.11.0.1');
    // Hosts arrive lower-cased.
    expect(table.get('b')?.hostIp).toBe('10.11.0.2');
    table.apply({ reset: false, routes: [running('a', '10.11.0.9')], removed: ['B'] });
    expect(table.get('a')?.hostIp).toBe('10.11.0.9');
    expect(table.get('b')).toBeUndefined();
    table.apply({ reset: true, routes: [running('c', '10.11.0.3')], removed: [] });
    expect(table.get('a')).toBeUndefined();
    expect(table.size).toBe(1);
    expect(changes).toEqual([
      '-@>10.11.0.1',
      '-@>10.11.0.2',
      'a@10.11.0.1>10.11.0.9',
      'B@10.11.0.2>gone',
      'a@10.11.0.9>gone',
      '-@>10.11.0.3',
    ]);
    expect(table.countByState()).toMatchObject({ running: 1, paused: 0 });
  });
});
