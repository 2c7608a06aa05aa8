import { describe, expect, it } from 'vitest';
import { RouteState, type SandboxRoute } from '#proto/sbx/routing';
import { RelayRouteMirror, type RelayRoutes } from './relay-route-mirror.js';
import { RouteTable } from './route-table.js';

/*
 * The mirror's decisions, against a DOUBLE of the relay's two route calls that records them
 * (what the C relay then does with a route is checked in native-relay.test.ts).
 */
class RecordingRelay implements RelayRoutes {
  readonly calls: string[] = [];
  readonly routes = new Map<string, string>();
  setRoute(id: string, hostIp: string, token: string, maskHost: string): void {
    // As the relay does: a masked Host it cannot write is refused (EINVAL).
    if (/[^\x21-\x7e]/.test(maskHost)) throw new Error('EINVAL');
    this.calls.push(`set ${id} ${hostIp} ${token || '-'} ${maskHost || '-'}`);
    this.routes.set(id, hostIp);
  }
  deleteRoute(id: string): void {
    this.calls.push(`delete ${id}`);
    this.routes.delete(id);
  }
}

const route = (
  id: string,
  state: RouteState,
  hostIp = '10.11.0.2',
  extra: Partial<SandboxRoute> = {},
): SandboxRoute => ({
  sandboxId: id,
  state,
  hostIp,
  autoResumePolicy: '',
  ...extra,
});
const { ROUTE_STATE_RUNNING: RUNNING, ROUTE_STATE_PAUSING: PAUSING, ROUTE_STATE_STARTING: STARTING } = RouteState;

describe('RelayRouteMirror', () => {
  it('gives the relay running sandboxes only, with their token and masked Host', () => {
    const table = new RouteTable();
    const relay = new RecordingRelay();
    const mirror = new RelayRouteMirror(table, relay);
    table.apply({
      reset: true,
      routes: [
        route('a', RUNNING, '10.11.0.2', { trafficAccessToken: 'tok', maskRequestHost: 'app:3000' }),
        route('b', STARTING, '10.11.0.3'),
        route('c', RouteState.ROUTE_STATE_PAUSED, ''),
      ],
      removed: [],
    });
    expect(relay.calls).toEqual(['set a 10.11.0.2 tok app:3000']);
    expect(mirror.size).toBe(1);
    // Starting → running: now the relay may forward to it.
    table.upsert(route('b', RUNNING, '10.11.0.3'));
    expect(relay.calls.at(-1)).toBe('set b 10.11.0.3 - -');
  });

  it('deletes a sandbox from the relay the moment it starts pausing or is removed', () => {
    const table = new RouteTable();
    const relay = new RecordingRelay();
    new RelayRouteMirror(table, relay);
    table.apply({ reset: true, routes: [route('a', RUNNING), route('b', RUNNING, '10.11.0.3')], removed: [] });
    relay.calls.length = 0;
    table.apply({ reset: false, routes: [route('a', PAUSING)], removed: [] });
    // Synchronously, within the watch event: no native request for a afterwards.
    expect(relay.calls).toEqual(['delete a']);
    table.apply({ reset: false, routes: [], removed: ['b'] });
    expect(relay.calls).toEqual(['delete a', 'delete b']);
    // A pausing sandbox that goes on to paused is not deleted twice.
    table.upsert(route('a', RouteState.ROUTE_STATE_PAUSED, ''));
    expect(relay.calls).toEqual(['delete a', 'delete b']);
    expect(relay.routes.size).toBe(0);
  });

  it('sets a route again when its address, token or masked Host changes, not otherwise', () => {
    const table = new RouteTable();
    const relay = new RecordingRelay();
    new RelayRouteMirror(table, relay);
    table.upsert(route('a', RUNNING));
    table.upsert(route('a', RUNNING));
    table.upsert(route('a', RUNNING, '10.11.0.9'));
    table.upsert(route('a', RUNNING, '10.11.0.9', { trafficAccessToken: 'new' }));
    table.upsert(route('a', RUNNING, '10.11.0.9', { trafficAccessToken: 'new', maskRequestHost: 'h' }));
    expect(relay.calls).toEqual([
      'set a 10.11.0.2 - -',
      'set a 10.11.0.9 - -',
      'set a 10.11.0.9 new -',
      'set a 10.11.0.9 new h',
    ]);
  });

  it('re-syncs on a whole table: what the new orchestrator does not list leaves the relay', () => {
    const table = new RouteTable();
    const relay = new RecordingRelay();
    new RelayRouteMirror(table, relay);
    table.apply({ reset: true, routes: [route('a', RUNNING), route('b', RUNNING, '10.11.0.3')], removed: [] });
    table.apply({ reset: true, routes: [route('b', PAUSING), route('c', RUNNING, '10.11.0.4')], removed: [] });
    expect([...relay.routes.keys()]).toEqual(['c']);
  });

  it('starts from what the table already holds, and leaves non-IPv4 addresses to the Node path', () => {
    const table = new RouteTable();
    table.upsert(route('a', RUNNING));
    table.upsert(route('v6', RUNNING, 'fd00::2'));
    const relay = new RecordingRelay();
    new RelayRouteMirror(table, relay);
    expect(relay.calls).toEqual(['set a 10.11.0.2 - -']);
  });

  it('leaves a sandbox the relay refuses to the Node path, dropping its older route', () => {
    const table = new RouteTable();
    const relay = new RecordingRelay();
    const mirror = new RelayRouteMirror(table, relay);
    table.upsert(route('a', RUNNING));
    table.upsert(route('a', RUNNING, '10.11.0.2', { maskRequestHost: 'bad host' }));
    expect(relay.calls).toEqual(['set a 10.11.0.2 - -', 'delete a']);
    expect(mirror.size).toBe(0);
    table.upsert(route('a', RUNNING, '10.11.0.2', { maskRequestHost: 'good' }));
    expect(relay.calls.at(-1)).toBe('set a 10.11.0.2 - good');
  });
});
