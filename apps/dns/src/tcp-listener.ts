import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from '#logging';
import { frameTcp } from './dns-codec.js';
import type { DnsResponder } from './dns-responder.js';
import { Transport } from './query-counters.js';

export interface TcpListenerOptions {
  host: string;
  /** 0 picks a free port. */
  port: number;
  responder: DnsResponder;
  logger: Logger;
  /** A connection with no complete query for this long is closed (RFC 7766 §6.2.3). */
  idleTimeoutMs: number;
  /** Connections beyond this are refused by the kernel backlog / closed at accept. */
  maxConnections: number;
}

/**
 * DNS over TCP (RFC 1035 §4.2.2, RFC 7766): two-byte length-prefixed messages, several queries
 * per connection (pipelined, answered in order), idle timeout, a bound on connections, and no
 * unbounded buffering: reading stops while the peer is not reading our answers.
 */
export class TcpListener {
  private readonly connections = new Set<Socket>();

  private boundPort = 0;

  private constructor(private readonly server: Server) {}

  get port(): number {
    return this.boundPort;
  }

  static async start(options: TcpListenerOptions): Promise<TcpListener> {
    const server = createServer({ noDelay: true });
    server.maxConnections = options.maxConnections;
    const listener = new TcpListener(server);
    server.on('connection', (socket) => listener.serve(socket, options));
    server.on('drop', (info) => options.logger.warn({ peer: info?.remoteAddress }, 'tcp connection limit reached'));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: options.host, port: options.port, exclusive: true }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => options.logger.error({ err }, 'tcp server error'));
    const address = server.address();
    listener.boundPort = typeof address === 'object' && address ? address.port : options.port;
    return listener;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  private serve(socket: Socket, options: TcpListenerOptions): void {
    this.connections.add(socket);
    socket.setTimeout(options.idleTimeoutMs, () => socket.destroy());
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.connections.delete(socket));
    let pending: Buffer | null = null;
    socket.on('data', (chunk: Buffer) => {
      let data: Buffer = pending === null ? chunk : Buffer.concat([pending, chunk]);
      pending = null;
      while (data.length >= 2) {
        const length = data.readUInt16BE(0);
        if (data.length < 2 + length) break;
        const msg = data.subarray(2, 2 + length);
        data = data.subarray(2 + length);
        let response: Buffer | null;
        try {
          response = options.responder.respond(msg, Transport.TCP);
        } catch (err) {
          options.logger.error({ err, bytes: msg.length }, 'tcp query failed');
          socket.destroy();
          return;
        }
        if (response !== null && !socket.write(frameTcp(response)) && !socket.isPaused()) {
          socket.pause();
          socket.once('drain', () => socket.resume());
        }
      }
      // Copy the partial tail: keeping a view would pin the whole chunk.
      if (data.length > 0) pending = Buffer.from(data);
    });
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const socket of this.connections) socket.destroy();
    await closed;
  }
}
