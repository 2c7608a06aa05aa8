import { connect, type Socket } from 'node:net';

/** What an upstream connection reports to the client connection using it. */
export interface UpstreamUser {
  /**
   * Bytes read, in the connection's own read buffer (valid until the next read): return false
   * while something written from them is still queued, and resume the socket once it is flushed.
   */
  upstreamData(chunk: Buffer): boolean;
  upstreamEnd(): void;
  upstreamClose(err: NodeJS.ErrnoException | undefined): void;
  upstreamDrain(): void;
}

/**
 * One TCP connection to a sandbox port. Its listeners are set once and report to whichever
 * client connection uses it now (none while it waits in the pool), so lending it out per
 * request adds and removes no listeners.
 */
export class Upstream {
  user: UpstreamUser | undefined;
  /** It served a request before: it may have been closed by the guest while idle. */
  reused = false;
  private error: NodeJS.ErrnoException | undefined;

  constructor(
    readonly socket: Socket,
    readonly key: string,
    private readonly pool: UpstreamPool,
  ) {
    socket.on('end', () => {
      if (this.user) this.user.upstreamEnd();
      else socket.destroy();
    });
    socket.on('drain', () => this.user?.upstreamDrain());
    socket.on('error', (err: NodeJS.ErrnoException) => (this.error ??= err));
    socket.on('close', () => {
      this.pool.forget(this);
      const user = this.user;
      this.user = undefined;
      user?.upstreamClose(this.error);
    });
  }
}

export interface UpstreamPoolOptions {
  connectTimeoutMs: number;
  /** Idle connections kept per sandbox port. */
  maxIdle: number;
}

const READ_BUFFER_BYTES = 64 * 1024;

/**
 * Keep-alive connections to sandbox ports, per `hostIp:port`, reused last-in first-out (the
 * warmest first). Connections are opened without Nagle: a request head must not wait behind
 * the last ACK.
 */
export class UpstreamPool {
  private readonly idle = new Map<string, Upstream[]>();
  private readonly open = new Set<Upstream>();

  constructor(private readonly o: UpstreamPoolOptions) {}

  /** An idle connection to `hostIp:port`, or a new one (connecting; writes queue until then). */
  take(hostIp: string, port: number, user: UpstreamUser): Upstream {
    const key = `${hostIp}:${port}`;
    const list = this.idle.get(key);
    const pooled = list?.pop();
    if (pooled) {
      pooled.user = user;
      pooled.socket.resume();
      return pooled;
    }
    // Reads land in one buffer per connection (no allocation per read, no stream machinery);
    // the user pauses reading while a write from it is still queued.
    const buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
    const socket: Socket = connect({
      host: hostIp,
      port,
      noDelay: true,
      allowHalfOpen: true,
      onread: {
        buffer,
        callback: (n: number, buf: Buffer): boolean => {
          // Reads start after connect, when `up` is set.
          if (up.user) return up.user.upstreamData(buf.subarray(0, n));
          // Bytes from an idle connection answer nothing: it cannot be trusted for the next request.
          socket.destroy();
          return false;
        },
      },
    });
    const up: Upstream = new Upstream(socket, key, this);
    up.user = user;
    this.open.add(up);
    const timer = setTimeout(() => {
      const err = new Error('connect timeout') as NodeJS.ErrnoException;
      err.code = 'CONNECT_TIMEOUT';
      socket.destroy(err);
    }, this.o.connectTimeoutMs);
    socket.once('connect', () => clearTimeout(timer));
    socket.once('close', () => clearTimeout(timer));
    return up;
  }

  /** Back to the pool after a complete exchange, or closed when the pool for its port is full. */
  release(up: Upstream): void {
    up.user = undefined;
    up.reused = true;
    let list = this.idle.get(up.key);
    if (!list) this.idle.set(up.key, (list = []));
    if (list.length >= this.o.maxIdle || up.socket.destroyed) {
      up.socket.destroy();
      return;
    }
    list.push(up);
  }

  forget(up: Upstream): void {
    this.open.delete(up);
    const list = this.idle.get(up.key);
    const i = list ? list.indexOf(up) : -1;
    if (i >= 0) list!.splice(i, 1);
  }

  /** Idle connections to an address whose sandbox left (its IP may go to another one). */
  dropIdle(hostIp: string): void {
    for (const [key, list] of this.idle) {
      if (key.startsWith(`${hostIp}:`)) for (const up of [...list]) up.socket.destroy();
    }
  }

  /** Connections open now, idle or in use (tests count them for leaks). */
  get size(): number {
    return this.open.size;
  }

  close(): void {
    for (const up of [...this.open]) up.socket.destroy();
  }
}
