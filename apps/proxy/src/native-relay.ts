import { isIPv4, type Socket } from 'node:net';
import type { Logger } from '#logging';
import { close as closeFd, HttpRelay, httpRelayAvailable, type HttpRelayStats, type RelayHandoff } from '#native';
import type { ConnectionRelay } from './protocol-listener.js';
import { RelayRouteMirror, type RelayRoutes } from './relay-route-mirror.js';
import type { RouteTable } from './route-table.js';
import { detachSocketFd, socketFromFd } from './socket-fd.js';

export type DataPath = 'native' | 'node';

const EMPTY = Buffer.alloc(0);

/** `--data-path` as asked, or the default: native when libsbxnative has the relay. */
export function chooseDataPath(asked: DataPath | undefined): DataPath {
  const available = httpRelayAvailable();
  if (asked === 'native' && !available) {
    throw new Error('--data-path native: libsbxnative.so has no HTTP relay (sbx_relay_*); rebuild it: make -C native');
  }
  return asked ?? (available ? 'native' : 'node');
}

export interface NativeRelayOptions {
  threads: number;
  clientIdleTimeoutMs: number;
  upstreamConnectTimeoutMs: number;
  upstreamIdleTimeoutMs: number;
  table: RouteTable;
  logger: Logger;
  /** A connection the relay gives back, with the bytes it read and did not forward: the Node path serves it. */
  onHandoff(socket: Socket, seen: Buffer): void;
}

/**
 * The native data path (`--data-path native`): the C relay of libsbxnative (sbx_http_relay.c)
 * carries well-formed keep-alive HTTP/1.1 requests to running sandboxes on its own threads.
 * Each accepted connection goes to it before Node reads a byte; whatever it does not carry
 * (an h2 preface, an upgrade, a sandbox it has no route for, a refused token, a bad head) comes
 * back at a request boundary as a descriptor plus the bytes it read, and the Node path serves
 * it from there exactly as a fresh connection, so errors, resume on request, h2c and upgrades
 * are the Node path's alone. The relay's routes follow the route table (relay-route-mirror.ts).
 */
export class NativeRelay implements ConnectionRelay, RelayRoutes {
  private readonly relay: HttpRelay;
  private readonly mirror: RelayRouteMirror;
  private closed = false;

  constructor(private readonly o: NativeRelayOptions) {
    this.relay = new HttpRelay({
      threads: o.threads,
      clientIdleTimeoutMs: o.clientIdleTimeoutMs,
      upstreamConnectTimeoutMs: o.upstreamConnectTimeoutMs,
      upstreamIdleTimeoutMs: o.upstreamIdleTimeoutMs,
    });
    try {
      this.relay.onHandoff((h) => this.handoff(h));
      this.mirror = new RelayRouteMirror(o.table, this, o.logger);
    } catch (err) {
      this.relay.destroy();
      throw err;
    }
  }

  /** Sandboxes the relay forwards to now. */
  get routes(): number {
    return this.mirror.size;
  }

  adopt(socket: Socket): boolean {
    const address = socket.remoteAddress?.replace(/^::ffff:/, '');
    // The relay writes X-Forwarded-For for IPv4 clients only; others keep the Node path's header.
    if (this.closed || !address || !isIPv4(address)) return false;
    let fd: number;
    try {
      fd = detachSocketFd(socket);
    } catch (err) {
      // The client left before this callback ran: nothing to serve.
      this.o.logger.debug({ err }, 'accepted connection gone before the relay took it');
      socket.destroy();
      return true;
    }
    try {
      this.relay.adopt(fd, address);
    } catch (err) {
      // Not taken (the relay is out of room, say): the Node path serves it from its first byte.
      this.o.logger.warn({ err }, 'relay did not adopt a connection; served by the Node path');
      this.notAdopted++;
      this.serveFd(fd, EMPTY);
    }
    return true;
  }

  private handoff(h: RelayHandoff): void {
    this.serveFd(h.fd, h.bytes);
  }

  /** A client descriptor back to the Node path, with the bytes already read from it. */
  private serveFd(fd: number, bytes: Buffer): void {
    let socket: Socket;
    try {
      socket = socketFromFd(fd);
    } catch (err) {
      this.o.logger.warn({ err }, 'relay handoff not a TCP socket; closed');
      closeFd(fd);
      return;
    }
    if (this.closed) {
      socket.destroy();
      return;
    }
    try {
      this.o.onHandoff(socket, bytes);
    } catch (err) {
      // Thrown into the notify fd's poll callback it would end the process: this client alone goes.
      this.o.logger.error({ err }, 'relay handoff could not be served; connection closed');
      socket.destroy();
    }
  }

  setRoute(sandboxId: string, hostIp: string, token: string, maskHost: string): void {
    if (!this.closed) this.relay.setRoute(sandboxId, hostIp, token, maskHost);
  }

  deleteRoute(sandboxId: string): void {
    if (!this.closed) this.relay.deleteRoute(sandboxId);
  }

  /** Connections the relay refused to adopt (served by the Node path instead). */
  notAdopted = 0;

  /** The relay's own counters (requests, connections, upstreams, handoffs), read when metrics are scraped. */
  stats(): HttpRelayStats | undefined {
    return this.closed ? undefined : this.relay.stats();
  }

  /** Closes every connection the relay holds and joins its threads; later handoffs are refused. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.relay.destroy();
  }
}
