import type { Logger } from '#logging';
import type { SandboxConfig } from '#proto/orchestrator';
import { RouteState, type RouteEvent, type SandboxRoute } from '#proto/sbx/routing';
import type { CatalogueEntry, LifecycleEvents, LifecycleEventType } from './lifecycle-events.js';
import type { PausedSandboxes } from './paused-sandboxes.js';
import type { Sandbox } from './sandbox.js';

export interface RouteFeedOptions {
  /** Where the catalogue and events go as before (Redis, or nowhere). */
  inner: LifecycleEvents;
  paused: PausedSandboxes;
  /** The manager's sandboxes (read when an event arrives: the manager is built after the feed). */
  sandboxes: () => Map<string, Sandbox>;
  logger: Logger;
}

type Watcher = (event: RouteEvent) => void;

/**
 * The node's routing catalogue for the ingress proxy. It sits where the Redis catalogue is fed
 * (the manager publishes a sandbox once it serves and unpublishes it first thing when it pauses
 * or stops), so a route exists exactly while the catalogue says the sandbox is reachable, and a
 * pause or delete reaches the proxy before the VM stops. Paused sandboxes are remembered
 * (PausedSandboxes) for resume on request.
 */
export class RouteFeed implements LifecycleEvents {
  private readonly watchers = new Set<Watcher>();
  /** Config and run length of sandboxes being paused, until their `paused` event names the build. */
  private readonly pausing = new Map<string, { config: SandboxConfig; timeoutMs: number }>();

  constructor(private readonly o: RouteFeedOptions) {}

  async publish(entry: CatalogueEntry): Promise<void> {
    await this.o.inner.publish(entry);
    this.pausing.delete(entry.sandboxId);
    await this.o.paused.delete(entry.sandboxId);
    this.changed(entry.sandboxId);
  }

  async unpublish(sandboxId: string): Promise<void> {
    const sbx = this.o.sandboxes().get(sandboxId);
    if (sbx?.phase === 'pausing') {
      this.pausing.set(sandboxId, {
        config: sbx.config,
        timeoutMs: Math.max(1000, sbx.endTime.getTime() - sbx.startTime.getTime()),
      });
    }
    this.changed(sandboxId);
    await this.o.inner.unpublish(sandboxId);
  }

  async event(type: LifecycleEventType, sandboxId: string, fields: Record<string, string> = {}): Promise<void> {
    const pausing = this.pausing.get(sandboxId);
    this.pausing.delete(sandboxId);
    if (type === 'paused' && pausing && fields['buildId']) {
      await this.o.paused
        .set({ sandboxId, buildId: fields['buildId'], ...pausing, pausedAt: new Date().toISOString() })
        .catch((err: unknown) =>
          this.o.logger.warn({ sandboxId, err: (err as Error).message }, 'paused sandbox not recorded'),
        );
    }
    if (type === 'killed') await this.o.paused.delete(sandboxId);
    this.changed(sandboxId);
    await this.o.inner.event(type, sandboxId, fields);
  }

  async close(): Promise<void> {
    this.watchers.clear();
    await this.o.inner.close();
  }

  /** The route of one sandbox now, or undefined when the node has none to offer. */
  route(sandboxId: string): SandboxRoute | undefined {
    const sbx = this.o.sandboxes().get(sandboxId);
    if (sbx && sbx.config !== undefined) {
      const state = {
        creating: RouteState.ROUTE_STATE_STARTING,
        running: RouteState.ROUTE_STATE_RUNNING,
        pausing: RouteState.ROUTE_STATE_PAUSING,
      }[sbx.phase as string];
      if (state === undefined) return undefined;
      return toRoute(sandboxId, state, state === RouteState.ROUTE_STATE_RUNNING ? sbx.hostIp : '', sbx.config);
    }
    if (sbx) return toRoute(sandboxId, RouteState.ROUTE_STATE_STARTING, '', undefined);
    const paused = this.o.paused.get(sandboxId);
    return paused ? toRoute(sandboxId, RouteState.ROUTE_STATE_PAUSED, '', paused.config) : undefined;
  }

  /** Every route now: running, starting and pausing sandboxes, then paused ones. */
  routes(): SandboxRoute[] {
    const out = new Map<string, SandboxRoute>();
    for (const id of this.o.sandboxes().keys()) {
      const r = this.route(id);
      if (r) out.set(id, r);
    }
    for (const p of this.o.paused.list()) if (!out.has(p.sandboxId)) out.set(p.sandboxId, this.route(p.sandboxId)!);
    return [...out.values()];
  }

  /** Sends the whole table, then every change, to `watcher` until the returned function is called. */
  watch(watcher: Watcher): () => void {
    watcher({ reset: true, routes: this.routes(), removed: [] });
    this.watchers.add(watcher);
    return () => this.watchers.delete(watcher);
  }

  get watcherCount(): number {
    return this.watchers.size;
  }

  /** Tells every watcher what `sandboxId` looks like now. */
  changed(sandboxId: string): void {
    const route = this.route(sandboxId);
    const event: RouteEvent = route
      ? { reset: false, routes: [route], removed: [] }
      : { reset: false, routes: [], removed: [sandboxId] };
    for (const w of this.watchers) {
      try {
        w(event);
      } catch (err) {
        this.o.logger.warn({ sandboxId, err: (err as Error).message }, 'route watcher failed');
      }
    }
  }
}

function toRoute(
  sandboxId: string,
  state: RouteState,
  hostIp: string,
  config: SandboxConfig | undefined,
): SandboxRoute {
  const ingress = config?.network?.ingress;
  return {
    sandboxId,
    state,
    hostIp,
    ...(ingress?.trafficAccessToken !== undefined ? { trafficAccessToken: ingress.trafficAccessToken } : {}),
    ...(ingress?.maskRequestHost !== undefined ? { maskRequestHost: ingress.maskRequestHost } : {}),
    autoResumePolicy: config?.autoResume?.policy ?? '',
  };
}
