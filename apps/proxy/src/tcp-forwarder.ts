import { connect, createServer, type Server, type Socket } from 'node:net';
import type { Logger } from '#logging';
import { upstreamError } from './http1-forwarder.js';
import { ProxyError } from './proxy-errors.js';
import type { TcpForward } from './proxy-config.js';
import type { ProxyMetrics } from './proxy-metrics.js';
import type { RouteResolver } from './route-resolver.js';

export interface TcpForwarderOptions {
  forward: TcpForward;
  host: string;
  resolver: RouteResolver;
  metrics: ProxyMetrics;
  logger: Logger;
  connectTimeoutMs: number;
}

/**
 * A node port forwarded as plain TCP to one sandbox port, for protocols without a Host (the
 * self-hosted operators' VNC forwarders). No token can travel in raw TCP, so a sandbox that
 * requires one is refused here. A refusal closes the connection (there is no way to say why
 * on the wire); the log says why.
 */
export class TcpForwarder {
  private constructor(
    private readonly sockets: Set<Socket>,
    private readonly server: Server,
    readonly port: number,
  ) {}

  static async start(o: TcpForwarderOptions): Promise<TcpForwarder> {
    const { sandboxId, port } = o.forward;
    const log = o.logger.child({ sandboxId, port, listenPort: o.forward.listenPort });
    const sockets = new Set<Socket>();
    // Half-open: one side's FIN is passed on while bytes still flow the other way.
    const server = createServer({ noDelay: true, pauseOnConnect: true, allowHalfOpen: true }, (client) => {
      sockets.add(client);
      client.once('close', () => sockets.delete(client));
      client.on('error', () => undefined);
      const refuse = (err: unknown) => {
        const e = err instanceof ProxyError ? err : upstreamError(err as NodeJS.ErrnoException, { sandboxId, port });
        o.metrics.requests.inc({ protocol: 'tcp', result: e.code });
        log.info({ code: e.code, reason: e.message }, 'tcp connection refused');
        client.destroy();
      };
      o.resolver.resolve({ sandboxId, port }, undefined).then((route) => {
        if (client.destroyed) return;
        const upstream = connect({ host: route.hostIp, port, noDelay: true, allowHalfOpen: true });
        const timer = setTimeout(
          () => upstream.destroy(Object.assign(new Error('connect timeout'), { code: 'CONNECT_TIMEOUT' })),
          o.connectTimeoutMs,
        );
        upstream.once('error', (err) => {
          clearTimeout(timer);
          refuse(err);
        });
        // A side that closes without ending (reset, error) takes the other with it; a clean end
        // reaches the other side through pipe() and lets what is still queued be written first.
        client.once('close', () => {
          if (!upstream.writableEnded) upstream.destroy();
        });
        upstream.once('connect', () => {
          clearTimeout(timer);
          upstream.removeAllListeners('error');
          upstream.on('error', () => client.destroy());
          upstream.once('close', () => {
            if (!client.writableEnded) client.destroy();
          });
          o.metrics.requests.inc({ protocol: 'tcp', result: 'ok' });
          o.metrics.connections.inc({ protocol: 'tcp' });
          client.once('close', () => o.metrics.connections.dec({ protocol: 'tcp' }));
          upstream.pipe(client);
          client.pipe(upstream);
          client.resume();
        });
      }, refuse);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(o.forward.listenPort, o.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const address = server.address();
    const self = new TcpForwarder(
      sockets,
      server,
      typeof address === 'object' && address ? address.port : o.forward.listenPort,
    );
    log.info({ port: self.port }, 'tcp forward listening');
    return self;
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
  }
}
