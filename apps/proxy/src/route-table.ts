import { RouteState, type RouteEvent, type SandboxRoute } from '#proto/sbx/routing';

export type RouteChange = (previous: SandboxRoute | undefined, current: SandboxRoute | undefined) => void;

/**
 * The proxy's copy of the orchestrator's routes, fed by the Watch stream. It survives an
 * orchestrator restart as it was (existing sandboxes stay routable) and is replaced whole by
 * the first event of the next watch.
 */
export class RouteTable {
  private readonly routes = new Map<string, SandboxRoute>();
  /** Host names reach us lower-cased (browsers, curl); sandbox ids may not be. */
  private readonly folded = new Map<string, string>();
  private syncedOnce = false;
  private readonly listeners: RouteChange[] = [];
  private readonly resetListeners: (() => void)[] = [];

  /** True once a whole table has arrived from the orchestrator. */
  get synced(): boolean {
    return this.syncedOnce;
  }

  get size(): number {
    return this.routes.size;
  }

  get(sandboxId: string): SandboxRoute | undefined {
    return this.routes.get(sandboxId) ?? this.routes.get(this.folded.get(sandboxId.toLowerCase()) ?? '');
  }

  /** Every sandbox id in the table, as the orchestrator spells it. */
  ids(): string[] {
    return [...this.routes.keys()];
  }

  countByState(): Record<string, number> {
    const counts: Record<string, number> = { running: 0, starting: 0, pausing: 0, paused: 0 };
    for (const r of this.routes.values()) {
      const name = RouteState[r.state]?.replace('ROUTE_STATE_', '').toLowerCase() ?? 'unspecified';
      counts[name] = (counts[name] ?? 0) + 1;
    }
    return counts;
  }

  /** Called for every route that changes or goes (closing pooled connections to an old address). */
  onChange(listener: RouteChange): void {
    this.listeners.push(listener);
  }

  /** Called once a whole table from the orchestrator has been applied (every watch's first event). */
  onReset(listener: () => void): void {
    this.resetListeners.push(listener);
  }

  apply(event: RouteEvent): void {
    if (event.reset) {
      const incoming = new Set(event.routes.map((r) => r.sandboxId));
      for (const id of [...this.routes.keys()]) if (!incoming.has(id)) this.remove(id);
      this.syncedOnce = true;
    }
    for (const route of event.routes) this.upsert(route);
    for (const id of event.removed) this.remove(id);
    if (event.reset) for (const l of this.resetListeners) l();
  }

  upsert(route: SandboxRoute): void {
    const previous = this.routes.get(route.sandboxId);
    this.routes.set(route.sandboxId, route);
    this.folded.set(route.sandboxId.toLowerCase(), route.sandboxId);
    if (
      !previous ||
      previous.hostIp !== route.hostIp ||
      previous.state !== route.state ||
      // The ingress policy is copied to the native relay (relay-route-mirror.ts).
      previous.trafficAccessToken !== route.trafficAccessToken ||
      previous.maskRequestHost !== route.maskRequestHost
    )
      this.emit(previous, route);
  }

  private remove(sandboxId: string): void {
    const previous = this.routes.get(sandboxId);
    if (!previous) return;
    this.routes.delete(sandboxId);
    if (this.folded.get(sandboxId.toLowerCase()) === sandboxId) this.folded.delete(sandboxId.toLowerCase());
    this.emit(previous, undefined);
  }

  private emit(previous: SandboxRoute | undefined, current: SandboxRoute | undefined): void {
    for (const l of this.listeners) l(previous, current);
  }
}
