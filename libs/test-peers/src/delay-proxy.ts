import { createServer, connect, type Server, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { NetnsSwitch } from '#native';

/** The start of an HTTP/1.x request (GCS range reads and uploads), counted by the proxy. */
const REQUEST_LINE = /(?:^|\r\n)(?:GET|HEAD|POST|PUT|PATCH|DELETE) \S+ HTTP\/1\.[01]\r\n/g;

/**
 * A TCP proxy on 127.0.0.1 that holds every piece of data a client sends for `delayMs` before
 * passing it on (in order), and passes answers back at once: each request over it (an HTTP
 * request to fake-gcs-server, say) takes `delayMs` longer, as against a bucket far away, while
 * requests on several connections still overlap and bandwidth is not cut.
 */
export class DelayProxy {
  /**
   * HTTP requests seen from clients (request lines at the start of a piece or after a CRLF) and
   * bytes answered to them (headers included): what a bucket behind this proxy was asked and sent.
   */
  readonly counters = { requests: 0, bytesAnswered: 0 };
  private readonly sockets = new Set<Socket>();
  private readonly timers = new Set<NodeJS.Timeout>();

  private constructor(
    private readonly server: Server,
    readonly endpoint: string,
  ) {}

  /**
   * With `netns` (a namespace file such as /run/netns/x) the listening socket is made inside that
   * network namespace, for clients there (a node's services); it still connects to `target` from
   * this process's namespace. `port` (default: any free one) lets proxies in several namespaces
   * share one endpoint (fake-gcs-server's external URL, which its upload sessions point to).
   */
  static async start(
    target: { host: string; port: number },
    delayMs: number,
    options: { netns?: string; port?: number } = {},
  ): Promise<DelayProxy> {
    if (!Number.isFinite(delayMs) || delayMs < 0) throw new RangeError(`delay ${delayMs} ms invalid`);
    const holder: { proxy?: DelayProxy } = {};
    // Half-open: a client's FIN is held and passed on after its data, not answered at once.
    const server = createServer({ allowHalfOpen: true }, (client) => holder.proxy?.relay(client, target, delayMs));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.once('listening', () => resolve());
      if (options.netns) {
        // listen() without a host binds synchronously, on the thread setns(2) switched.
        const inNetns = new NetnsSwitch();
        try {
          inNetns.run(options.netns, () => server.listen(options.port ?? 0));
        } finally {
          inNetns.close();
        }
      } else server.listen(options.port ?? 0, '127.0.0.1');
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
    const upstream = connect({ port: target.port, host: target.host, allowHalfOpen: true });
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
    // A clean close of the bucket's side ends the client's through the pipe (its answer flushed
    // first); destroying the client here could drop the answer's last bytes.
    upstream.on('close', () => this.sockets.delete(upstream));
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
    // Reading pauses while the bucket side has a backlog, so a large upload is not held whole
    // in memory; what was read still leaves in order after its delay.
    upstream.on('drain', () => client.resume());
    client.on('data', (data: Buffer) => {
      this.counters.requests += data.toString('latin1').match(REQUEST_LINE)?.length ?? 0;
      hold(() => {
        if (!upstream.write(data)) client.pause();
      });
    });
    // The client's close is passed on after the data it sent before it (held like that data).
    client.on('end', () => hold(() => upstream.end()));
    client.on('close', () => hold(end));
    upstream.on('data', (data: Buffer) => (this.counters.bytesAnswered += data.length));
    upstream.pipe(client);
  }
}
