import { chmodSync, lstatSync, mkdirSync } from 'node:fs';
import { unlink } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import type { Logger } from '#logging';
import { setSendBufferSize } from '#native';
import { Command } from '#nbd';
import { NbdConnection, type NbdRequestObserver } from './nbd-connection.js';
import type { NbdExport, NbdExportTable } from './nbd-export.js';

/** Big enough for a whole 1 MiB read reply (plus its header) in one write. */
const SEND_BUFFER_BYTES = 4 * 1024 * 1024;
const WRITE_HIGH_WATER_MARK = 8 * 1024 * 1024;

export interface NbdServerOptions {
  socketPath: string;
  exports: NbdExportTable;
  logger: Logger;
  observer?: NbdRequestObserver;
  socketMode?: number;
  maxPayload?: number;
}

/** Raised when the NBD socket path is held by a live server or is not a socket. */
export class NbdSocketInUse extends Error {
  readonly code = 'NBD_SOCKET_IN_USE';
  constructor(
    readonly path: string,
    reason: string,
  ) {
    super(`cannot serve NBD on ${path}: ${reason}`);
    this.name = 'NbdSocketInUse';
  }
}

/** Requests answered without error since the server started, over all its clients. */
export interface NbdServerCounts {
  reads: number;
  writes: number;
  flushes: number;
  bytesRead: number;
  bytesWritten: number;
}

/**
 * Listens on one Unix socket and runs an NbdConnection per client. Owns the listening socket
 * and every client socket: `close()` drops them all and removes the socket file.
 */
export class NbdServer {
  readonly socketPath: string;
  readonly counts: NbdServerCounts = { reads: 0, writes: 0, flushes: 0, bytesRead: 0, bytesWritten: 0 };
  private readonly connections = new Set<NbdConnection>();
  private readonly idleWaiters = new Set<() => void>();
  private listener: Server | undefined;

  private constructor(private readonly options: NbdServerOptions) {
    this.socketPath = options.socketPath;
  }

  static async listen(options: NbdServerOptions): Promise<NbdServer> {
    const nbd = new NbdServer(options);
    await nbd.startAccepting();
    return nbd;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  get accepting(): boolean {
    return this.listener !== undefined;
  }

  get requestsInFlight(): number {
    let n = 0;
    for (const c of this.connections) n += c.requestsInFlight;
    return n;
  }

  /** (Re)creates the socket file and accepts clients on it. */
  async startAccepting(): Promise<void> {
    if (this.listener) return;
    const { socketPath, logger } = this.options;
    await prepareSocketPath(socketPath);
    // Replies may queue up to this before the connection stops reading requests (backpressure).
    const listener = createServer({ highWaterMark: WRITE_HIGH_WATER_MARK }, (socket) => this.accept(socket));
    await new Promise<void>((resolve, reject) => {
      listener.once('error', reject);
      listener.listen(socketPath, () => {
        listener.off('error', reject);
        resolve();
      });
    });
    listener.on('error', (err) => logger.error({ err, socketPath }, 'nbd listener error'));
    this.listener = listener;
    chmodSync(socketPath, this.options.socketMode ?? 0o600);
  }

  /** Refuses new clients (the socket file goes away); existing ones keep being served. */
  async stopAccepting(): Promise<void> {
    const listener = this.listener;
    if (!listener) return;
    this.listener = undefined;
    // close() stops accepting at once; its callback would wait for every client to leave.
    listener.close();
    await unlink(this.socketPath).catch(() => undefined);
  }

  /**
   * Hands an already-connected socket to the export, skipping the handshake (the kernel's
   * side of /dev/nbdX speaks only the transmission phase).
   */
  adopt(socket: Socket, exportName: string): void {
    const found = this.options.exports.find(exportName);
    if (!found) throw new Error(`no export named ${JSON.stringify(exportName)} to adopt a socket into`);
    this.track(this.connect(socket, found));
  }

  /** Resolves true once no client is connected, false if `timeoutMs` passes first. */
  waitForIdle(timeoutMs: number): Promise<boolean> {
    if (this.connections.size === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const waiter = (): void => {
        clearTimeout(timer);
        this.idleWaiters.delete(waiter);
        resolve(true);
      };
      const timer = setTimeout(() => {
        this.idleWaiters.delete(waiter);
        resolve(false);
      }, timeoutMs);
      this.idleWaiters.add(waiter);
    });
  }

  /** Stops listening, drops every client and waits for their running requests to finish. */
  async close(): Promise<void> {
    const stopped = this.stopAccepting();
    const all = [...this.connections];
    for (const c of all) c.close();
    await Promise.all([stopped, ...all.map((c) => c.done)]);
  }

  private readonly observe: NbdRequestObserver = (event) => {
    if (event.error === 0) {
      const c = this.counts;
      if (event.command === Command.READ) {
        c.reads++;
        c.bytesRead += event.bytes;
      } else if (event.command === Command.WRITE) {
        c.writes++;
        c.bytesWritten += event.bytes;
      } else if (event.command === Command.FLUSH) {
        c.flushes++;
      }
    }
    this.options.observer?.(event);
  };

  private accept(socket: Socket): void {
    if (!this.listener) {
      socket.destroy();
      return;
    }
    this.track(this.connect(socket, undefined));
  }

  private connect(socket: Socket, negotiated: NbdExport | undefined): NbdConnection {
    return new NbdConnection({
      socket,
      exports: this.options.exports,
      logger: this.options.logger,
      observer: this.observe,
      ...(negotiated ? { negotiated } : {}),
      ...(this.options.maxPayload ? { maxPayload: this.options.maxPayload } : {}),
      tuneSocket: (fd) => {
        try {
          setSendBufferSize(fd, SEND_BUFFER_BYTES);
        } catch (err) {
          this.options.logger.debug({ err }, 'could not raise the NBD socket send buffer');
        }
      },
    });
  }

  private track(connection: NbdConnection): void {
    this.connections.add(connection);
    void connection.done.then(() => {
      this.connections.delete(connection);
      if (this.connections.size === 0) for (const waiter of [...this.idleWaiters]) waiter();
    });
  }
}

/**
 * The directory made and the path looked at on the event loop: every device open listens, and
 * these take microseconds where each trip through the libuv pool waits for a turn of the loop.
 */
async function prepareSocketPath(path: string): Promise<void> {
  mkdirSync(dirname(path), { recursive: true, mode: 0o750 });
  const existing = lstatSync(path, { throwIfNoEntry: false });
  if (!existing) return;
  if (!existing.isSocket()) throw new NbdSocketInUse(path, 'path exists and is not a socket');
  // A socket file left by a killed run is replaced; a live server's is not.
  const live = await new Promise<boolean>((resolve) => {
    const probe = connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new NbdSocketInUse(path, 'another process is serving on it');
  await unlink(path);
}
