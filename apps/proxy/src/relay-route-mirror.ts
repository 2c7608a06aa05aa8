import { isIPv4 } from 'node:net';
import type { Logger } from '#logging';
import { RouteState, type SandboxRoute } from '#proto/sbx/routing';
import type { RouteTable } from './route-table.js';

/** The route calls of the native relay (native-relay.ts): what it may forward on its own. */
export interface RelayRoutes {
  /**
   * A running sandbox the relay may forward to (replaces what it had for that id). Throws when
   * the relay cannot hold it (an id, token or masked Host outside what it accepts).
   */
  setRoute(sandboxId: string, hostIp: string, token: string, maskHost: string): void;
  /** No more native requests for that sandbox (its pooled upstream connections closed too). */
  deleteRoute(sandboxId: string): void;
}

/** The relay's copy of one sandbox, compared so that an unchanged route is not set again. */
function key(route: SandboxRoute): string {
  return `${route.hostIp}\0${route.trafficAccessToken ?? ''}\0${route.maskRequestHost ?? ''}`;
}

/**
 * Keeps the native relay's routes equal to the running routes of the table: a running sandbox
 * is set (host IP, traffic access token, masked Host), any other state or a removal deletes it,
 * synchronously in the table's own change event, so that a pause or delete stops new native
 * requests before the next event-loop turn (the relay hands such requests back to the Node
 * path, which asks the orchestrator). A whole table from the orchestrator re-syncs everything.
 */
export class RelayRouteMirror {
  /** What the relay holds now, by sandbox id. */
  private readonly mirrored = new Map<string, string>();

  constructor(
    private readonly table: RouteTable,
    private readonly relay: RelayRoutes,
    private readonly logger?: Logger,
  ) {
    table.onChange((previous, current) => this.changed(previous?.sandboxId ?? current!.sandboxId, current));
    table.onReset(() => this.resync());
    this.resync();
  }

  /** Sandboxes the relay may forward to now. */
  get size(): number {
    return this.mirrored.size;
  }

  private changed(sandboxId: string, current: SandboxRoute | undefined): void {
    // The relay's pool needs an IPv4 address; anything else stays with the Node path.
    if (current?.state === RouteState.ROUTE_STATE_RUNNING && isIPv4(current.hostIp)) {
      const k = key(current);
      if (this.mirrored.get(sandboxId) === k) return;
      try {
        this.relay.setRoute(sandboxId, current.hostIp, current.trafficAccessToken ?? '', current.maskRequestHost ?? '');
        this.mirrored.set(sandboxId, k);
        return;
      } catch (err) {
        // The Node path serves this sandbox alone; an older route in the relay must not stay.
        this.logger?.info({ sandboxId, err: (err as Error).message }, 'route left to the Node data path');
      }
    }
    if (this.mirrored.delete(sandboxId)) {
      this.relay.deleteRoute(sandboxId);
    }
  }

  /** Makes the relay hold exactly the table's running routes. */
  resync(): void {
    for (const id of [...this.mirrored.keys()]) {
      const route = this.table.get(id);
      if (route?.sandboxId !== id) this.changed(id, undefined);
    }
    for (const id of this.table.ids()) this.changed(id, this.table.get(id));
  }
}
