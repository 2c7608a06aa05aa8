import { createServer, connect, type Server, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';

/**
 * A TCP proxy on 127.0.0.1 that holds every piece of data a client sends for `delayMs` before
 * passing it on (in order), and passes answers back at once: each request over it (an HTTP
 * request to fake-gcs-server, say) takes `delayMs` longer, as against a bucket far away, while
 * requests on several connections still overlap and bandwidth is not cut.
 */
export class DelayProxy {
  private readonly sockets = new Set<Socket>();
  private readonly timers = new Set<NodeJS.Timeout>();

  private constructor(
    private readonly server: Server,
    readonly endpoint: string,
  ) {}

  static async start(target: { host: string; port: number }, delayMs: number): Promise<DelayProxy> {
    if (!Number.isFinite(delayMs) || delayMs < 0) throw new RangeError(`delay ${delayMs} ms invalid`);
    const holder: { proxy?: DelayProxy } = {};
    const server = createServer((client) => holder.proxy?.relay(client, target, delayMs));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    holder.proxy = new DelayProxy(server, `http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    return holder.proxy;
  }

  /** Closes the listener and every connection; data still held is dropped. */
  async stop(): Promise<void> {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private relay(client: Socket, target: { host: string; port: number }, delayMs: number): void {
    const upstream = connect(target.port, target.host);
    this.sockets.add(client);
    this.sockets.add(upstream);
    const end = () => {
      client.destroy();
      upstream.destroy();
      this.sockets.delete(client);
      this.sockets.delete(upstream);
    };
    client.on('error', end);
    upstream.on('error', end);
    client.on('close', end);
    upstream.on('close', end);
    // Held pieces leave in order: each at its own arrival time + delay.
    let lastDue = 0;
    const hold = (what: () => void) => {
      const due = Math.max(performance.now() + delayMs, lastDue);
      lastDue = due;
      const timer = setTimeout(
        () => {
          this.timers.delete(timer);
          what();
        },
        Math.max(0, due - performance.now()),
      );
      this.timers.add(timer);
    };
    client.on('data', (data) => hold(() => upstream.write(data)));
    client.on('end', () => hold(() => upstream.end()));
    upstream.pipe(client);
  }
}
