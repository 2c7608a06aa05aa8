import { createSocket, type RemoteInfo, type Socket } from 'node:dgram';
import { isIPv6 } from 'node:net';
import type { Logger } from '#logging';
import type { DnsResponder } from './dns-responder.js';
import { Transport } from './query-counters.js';

export interface DgramUdpListenerOptions {
  host: string;
  /** 0 picks a free port. */
  port: number;
  responder: DnsResponder;
  logger: Logger;
}

/**
 * UDP through Node's dgram socket: one JS callback and one send per datagram. The fallback where
 * the batch engine (recvmmsg/sendmmsg through libc) cannot load, and `--udp-engine dgram`.
 */
export class DgramUdpListener {
  private constructor(
    private readonly socket: Socket,
    readonly port: number,
  ) {}

  static async start(options: DgramUdpListenerOptions): Promise<DgramUdpListener> {
    const socket = createSocket({ type: isIPv6(options.host) ? 'udp6' : 'udp4' });
    const { responder, logger } = options;
    let lastError = 0;
    socket.on('message', (msg: Buffer, peer: RemoteInfo) => {
      let response: Buffer | null;
      try {
        response = responder.respond(msg, Transport.UDP);
      } catch (err) {
        // A bug, not bad input (the codec rejects that): keep serving, log at most once a second.
        const now = Date.now();
        if (now - lastError > 1000) {
          lastError = now;
          logger.error({ err, peer: `${peer.address}:${peer.port}`, bytes: msg.length }, 'udp query failed');
        }
        return;
      }
      if (response !== null) socket.send(response, peer.port, peer.address);
    });
    await new Promise<void>((resolve, reject) => {
      socket.once('error', reject);
      socket.bind({ address: options.host, port: options.port, exclusive: true }, () => {
        socket.off('error', reject);
        resolve();
      });
    });
    // After bind, send errors (ICMP unreachable reported as ECONNREFUSED, ENOBUFS) only concern one peer.
    socket.on('error', (err) => logger.warn({ err }, 'udp socket error'));
    return new DgramUdpListener(socket, socket.address().port);
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      try {
        this.socket.close(() => resolve());
      } catch {
        resolve();
      }
    });
  }
}
