import { createServer as createH2Server, type Http2Server } from 'node:http2';
import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from '#logging';
import type { H2Forwarder } from './h2-forwarder.js';
import type { Http1Forwarder } from './http1-forwarder.js';
import type { ProxyMetrics } from './proxy-metrics.js';

// RFC 9113 §3.4: a client that knows the server speaks h2c starts with this preface.
const H2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
const EMPTY = Buffer.alloc(0);

/** Where new connections go before Node reads them (the native data path). */
export interface ConnectionRelay {
  /**
   * Takes a just-accepted, never-read socket (pauseOnConnect) away from Node; false leaves it
   * to this port (served from its first byte).
   */
  adopt(socket: Socket): boolean;
}

export interface ProtocolListenerOptions {
  host: string;
  port: number;
  http1: Http1Forwarder;
  h2: H2Forwarder;
  metrics: ProxyMetrics;
  logger: Logger;
  idleTimeoutMs: number;
  /** The native data path, or undefined when every connection is served here (`--data-path node`). */
  relay?: ConnectionRelay;
}

/**
 * One TCP port for HTTP/1.1 (with Upgrade) and HTTP/2 with prior knowledge: the first bytes of
 * each connection decide which server gets it (the h2 preface, or anything else).
 */
export class ProtocolListener {
  private closing = false;

  private constructor(
    private readonly sockets: Set<Socket>,
    private readonly server: Server,
    private readonly h2: Http2Server,
    readonly port: number,
    private readonly serveSocket: (socket: Socket, first: Buffer) => void,
  ) {}

  /**
   * A client connection the native relay gave back (see native-relay.ts) with the bytes it read
   * and did not forward: served here exactly like a connection accepted by this port.
   */
  serve(socket: Socket, seen: Buffer): void {
    if (this.closing) socket.destroy();
    else this.serveSocket(socket, seen);
  }

  static async start(o: ProtocolListenerOptions): Promise<ProtocolListener> {
    const h2 = createH2Server({ settings: { enableConnectProtocol: false } });
    h2.on('stream', (stream, headers) => o.h2.handleStream(stream, headers, stream.session?.socket?.remoteAddress));
    h2.on('sessionError', () => undefined);
    h2.setTimeout(o.idleTimeoutMs);

    const sockets = new Set<Socket>();
    const serve = (socket: Socket, first: Buffer) => {
      sockets.add(socket);
      socket.once('close', () => sockets.delete(socket));
      socket.on('error', () => undefined);
      // A connection that never sends its first bytes would otherwise be held for ever.
      const silent = () => socket.destroy();
      socket.setTimeout(o.idleTimeoutMs, silent);
      let seen: Buffer = first;
      const decide = (): boolean => {
        const n = Math.min(seen.length, H2_PREFACE.length);
        const couldBeH2 = seen.subarray(0, n).equals(H2_PREFACE.subarray(0, n));
        if (couldBeH2 && seen.length < H2_PREFACE.length) return false;
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
        return true;
      };
      if (seen.length && decide()) return;
      const onData = (chunk: Buffer) => {
        seen = seen.length ? Buffer.concat([seen, chunk]) : chunk;
        if (decide()) socket.off('data', onData);
      };
      socket.on('data', onData);
    };
    // Half-open as node:http's own servers are: a client may send its request, then FIN, then read.
    // With the native relay a connection goes to it before Node reads a byte of it.
    const relay = o.relay;
    const server = createServer(
      { noDelay: true, allowHalfOpen: true, pauseOnConnect: relay !== undefined },
      (socket) => {
        if (relay?.adopt(socket)) return;
        serve(socket, EMPTY);
        // Accepted paused for the relay: reading starts now.
        if (relay) socket.resume();
      },
    );
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(o.port, o.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const address = server.address();
    return new ProtocolListener(
      sockets,
      server,
      h2,
      typeof address === 'object' && address ? address.port : o.port,
      serve,
    );
  }

  get openConnections(): number {
    return this.sockets.size;
  }

  /** Stops listening and drops every client connection (in-flight requests with them). */
  async close(): Promise<void> {
    this.closing = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
  }
}
