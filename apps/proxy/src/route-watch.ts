import type { ClientReadableStream } from '@grpc/grpc-js';
import { dial } from '#grpc';
import type { Logger } from '#logging';
import { RoutingClient, type RouteEvent } from '#proto/sbx/routing';
import type { RouteTable } from './route-table.js';

export interface RouteWatchOptions {
  orchestratorSocket: string;
  table: RouteTable;
  logger: Logger;
  /** Reconnect backoff bounds (the orchestrator restarting, or not up yet). */
  minBackoffMs?: number;
  maxBackoffMs?: number;
}

/**
 * Keeps the route table in step with the orchestrator: one Watch stream, opened again (with a
 * short backoff) whenever it ends, so a restarted orchestrator's table replaces the old one.
 */
export class RouteWatch {
  private stream: ClientReadableStream<RouteEvent> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private backoffMs: number;
  private live = false;
  /** Watch streams opened so far (a reconnect adds one). */
  opened = 0;

  constructor(
    private readonly o: RouteWatchOptions,
    private readonly client: RoutingClient = dial(RoutingClient, o.orchestratorSocket),
  ) {
    this.backoffMs = o.minBackoffMs ?? 100;
  }

  get connected(): boolean {
    return this.live;
  }

  get routing(): RoutingClient {
    return this.client;
  }

  start(): void {
    if (this.stopped || this.stream) return;
    const stream = this.client.watch({});
    this.stream = stream;
    this.opened++;
    let ended = false;
    stream.on('data', (event: RouteEvent) => {
      if (event.reset) {
        this.live = true;
        this.backoffMs = this.o.minBackoffMs ?? 100;
        this.o.logger.info({ routes: event.routes.length }, 'route table received from the orchestrator');
      }
      this.o.table.apply(event);
    });
    const again = (why: string) => {
      if (ended) return;
      ended = true;
      this.live = false;
      this.stream = undefined;
      if (this.stopped) return;
      this.o.logger.warn({ why, retryInMs: this.backoffMs }, 'route watch lost; keeping the last table');
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.start();
      }, this.backoffMs);
      this.backoffMs = Math.min(this.backoffMs * 2, this.o.maxBackoffMs ?? 1000);
    };
    stream.on('error', (err: Error) => again(err.message));
    stream.on('end', () => again('stream ended'));
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.stream?.cancel();
    this.stream = undefined;
    this.client.close();
  }
}
