import { createServer as createH2Server, type Http2Server } from 'node:http2';
import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from '#logging';
import type { H2Forwarder } from './h2-forwarder.js';
import type { Http1Forwarder } from './http1-forwarder.js';
import type { ProxyMetrics } from './proxy-metrics.js';

// RFC 9113 §3.4: a client that knows the server speaks h2c starts with this preface.
const H2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');

export interface ProtocolListenerOptions {
  host: string;
  port: number;
  http1: Http1Forwarder;
  h2: H2Forwarder;
  metrics: ProxyMetrics;
  logger: Logger;
  idleTimeoutMs: number;
}

/**
 * One TCP port for HTTP/1.1 (with Upgrade) and HTTP/2 with prior knowledge: the first bytes of
 * each connection decide which server gets it (the h2 preface, or anything else).
 */
export class ProtocolListener {
  private constructor(
    private readonly sockets: Set<Socket>,
    private readonly server: Server,
    private readonly h2: Http2Server,
    readonly port: number,
  ) {}

  static async start(o: ProtocolListenerOptions): Promise<ProtocolListener> {
    const h2 = createH2Server({ settings: { enableConnectProtocol: false } });
    h2.on('stream', (stream, headers) => o.h2.handleStream(stream, headers, stream.session?.socket?.remoteAddress));
    h2.on('sessionError', () => undefined);
    h2.setTimeout(o.idleTimeoutMs);

    const sockets = new Set<Socket>();
    // Half-open as node:http's own servers are: a client may send its request, then FIN, then read.
    const server = createServer({ noDelay: true, allowHalfOpen: true }, (socket) => {
      sockets.add(socket);
      socket.once('close', () => sockets.delete(socket));
      socket.on('error', () => undefined);
      // A connection that never sends its first bytes would otherwise be held for ever.
      const silent = () => socket.destroy();
      socket.setTimeout(o.idleTimeoutMs, silent);
      let seen: Buffer = Buffer.alloc(0);
      const onData = (chunk: Buffer) => {
        seen = seen.length ? Buffer.concat([seen, chunk]) : chunk;
        const n = Math.min(seen.length, H2_PREFACE.length);
        const couldBeH2 = seen.subarray(0, n).equals(H2_PREFACE.subarray(0, n));
        if (couldBeH2 && seen.length < H2_PREFACE.length) return;
        socket.off('data', onData);
        socket.off('timeout', silent);
        socket.setTimeout(0);
        const protocol = couldBeH2 ? 'h2' : 'http1';
        o.metrics.connections.inc({ protocol });
        socket.once('close', () => o.metrics.connections.dec({ protocol }));
        if (couldBeH2) {
          socket.pause();
          socket.unshift(seen);
          // The h2 session reads the socket's handle itself and picks up the unshifted bytes;
          // resuming the JS stream here would steal frames from it.
          h2.emit('connection', socket);
        } else {
          // Our own HTTP/1.1 reader (http1-connection.ts) takes the bytes read so far as they are.
          o.http1.handleConnection(socket, seen);
        }
      };
      socket.on('data', onData);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(o.port, o.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const address = server.address();
    return new ProtocolListener(sockets, server, h2, typeof address === 'object' && address ? address.port : o.port);
  }

  get openConnections(): number {
    return this.sockets.size;
  }

  /** Stops listening and drops every client connection (in-flight requests with them). */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
  }
}
