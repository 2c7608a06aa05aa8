import type { Socket } from 'node:net';
import type { Logger } from '#logging';
import { Http1Connection } from './http1-connection.js';
import { PortClosed, ProxyError, UpstreamFailed, UpstreamTimeout } from './proxy-errors.js';
import type { ProxyMetrics } from './proxy-metrics.js';
import type { RouteResolver } from './route-resolver.js';
import type { RouteTarget } from './route-target.js';
import { UpstreamPool } from './upstream-pool.js';

export interface Http1ForwarderOptions {
  resolver: RouteResolver;
  metrics: ProxyMetrics;
  logger: Logger;
  connectTimeoutMs: number;
  maxIdleUpstreamSockets: number;
  /** A client connection idle between requests this long is closed. */
  idleTimeoutMs?: number;
}

/** A connect error as the person at the other end should read it. */
export function upstreamError(err: NodeJS.ErrnoException | undefined, target: RouteTarget): ProxyError {
  if (err instanceof ProxyError) return err;
  const { sandboxId, port } = target;
  if (!err) return new UpstreamFailed(sandboxId, port, 'connection closed before an answer');
  if (err.code === 'ECONNREFUSED') return new PortClosed(sandboxId, port, err.code);
  if (err.code === 'ETIMEDOUT' || err.code === 'CONNECT_TIMEOUT') {
    return new UpstreamTimeout(sandboxId, port, 'no answer to connect');
  }
  return new UpstreamFailed(sandboxId, port, err.code ?? err.message);
}

/**
 * HTTP/1.1 through to the sandbox on raw sockets (http1-connection.ts): each request routed on
 * its own, bodies passed through both ways, upstream connections kept alive per sandbox port;
 * an Upgrade (WebSocket) becomes a byte tunnel after the handshake. This holds what the client
 * connections share: the route resolver, the upstream pool and the metrics.
 */
export class Http1Forwarder {
  readonly pool: UpstreamPool;
  readonly resolver: RouteResolver;
  readonly idleTimeoutMs: number;
  private readonly ok;
  private readonly headSeconds;

  constructor(private readonly o: Http1ForwarderOptions) {
    this.resolver = o.resolver;
    this.idleTimeoutMs = o.idleTimeoutMs ?? 620_000;
    this.pool = new UpstreamPool({ connectTimeoutMs: o.connectTimeoutMs, maxIdle: o.maxIdleUpstreamSockets });
    // Label children looked up once: a per-request label lookup costs more than the count.
    this.ok = o.metrics.requests.labels({ protocol: 'http1', result: 'ok' });
    this.headSeconds = o.metrics.responseSeconds.labels({ protocol: 'http1' });
  }

  /** A client connection whose first bytes (`first`) are not the h2 preface. */
  handleConnection(socket: Socket, first: Buffer): void {
    new Http1Connection(socket, this, first);
  }

  upstreamError(err: NodeJS.ErrnoException | undefined, target: RouteTarget): ProxyError {
    return upstreamError(err, target);
  }

  /** A final response head went to the client. */
  responded(started: number): void {
    this.ok.inc();
    this.headSeconds.observe((performance.now() - started) / 1000);
  }

  refused(e: ProxyError, upgrade: boolean): void {
    const protocol = upgrade ? 'websocket' : 'http1';
    this.o.metrics.requests.inc({ protocol, result: e.code });
    this.o.logger.info(
      { sandboxId: e.sandboxId, port: e.port, code: e.code },
      upgrade ? 'upgrade refused' : 'request refused',
    );
  }

  badRequest(): void {
    this.o.metrics.requests.inc({ protocol: 'http1', result: 'BAD_REQUEST' });
  }

  /** A client connection became a tunnel (101 Switching Protocols). */
  upgraded(client: Socket): void {
    this.o.metrics.requests.inc({ protocol: 'websocket', result: 'ok' });
    this.o.metrics.connections.inc({ protocol: 'websocket' });
    client.once('close', () => this.o.metrics.connections.dec({ protocol: 'websocket' }));
  }

  /** Idle pooled connections to an address whose sandbox left (its IP may go to another one). */
  dropIdle(hostIp: string): void {
    this.pool.dropIdle(hostIp);
  }

  close(): void {
    this.pool.close();
  }
}
