import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { NetnsSwitch } from '#native';

/**
 * A fault-injecting HTTP proxy in front of fake-gcs-server (the real GCS JSON API peer): every
 * request is logged and forwarded, except those a queued fault hits, which get an HTTP status,
 * no answer at all (a bucket that hangs) or a reset connection — what fake-gcs-server cannot be
 * asked to do. `listPageSize` makes listings come back in small pages, as GCS does past 1000
 * objects. Resumable upload sessions come back through the proxy too (fake-gcs-server builds
 * their URL from the request's Host).
 */
export interface LoggedRequest {
  method: string;
  path: string;
  query: Record<string, string>;
  range: string | undefined;
  contentRange: string | undefined;
}

export interface Fault {
  /** Which requests the fault hits; all when absent. */
  match?: (r: LoggedRequest) => boolean;
  status: number | 'hang' | 'reset';
}

export class GcsFaultProxy {
  readonly requests: LoggedRequest[] = [];
  /** maxResults forced on listings that ask for more (0 = leave them alone). */
  listPageSize = 0;
  endpoint = '';
  private readonly faults: Fault[] = [];
  private readonly hung = new Set<ServerResponse>();
  private server: Server | undefined;
  private target: URL | undefined;

  /**
   * Listens first, so fake-gcs-server can be started with this endpoint as its external URL.
   * With `netns` (a namespace file such as /run/netns/x) the socket is made inside that network
   * namespace, for clients that run there; it still forwards from this process's namespace.
   */
  async listen(netns?: string): Promise<string> {
    const server = createServer((req, res) => this.handle(req, res));
    this.server = server;
    const listening = new Promise<void>((resolve) => server.once('listening', resolve));
    // listen() without a host binds synchronously, on the thread setns(2) switched.
    if (netns) {
      const inNetns = new NetnsSwitch();
      try {
        inNetns.run(netns, () => server.listen(0));
      } finally {
        inNetns.close();
      }
    } else server.listen(0, '127.0.0.1');
    await listening;
    this.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    return this.endpoint;
  }

  /** Lets every request a 'hang' fault holds go: their connections are reset (the client retries). */
  releaseHung(): void {
    for (const res of this.hung) res.destroy();
    this.hung.clear();
  }

  forwardTo(endpoint: string): void {
    this.target = new URL(endpoint);
  }

  async stop(): Promise<void> {
    for (const res of this.hung) res.destroy();
    this.hung.clear();
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  /** The next matching request fails as described (queued: one fault per call). */
  failNext(fault: Fault, times = 1): void {
    for (let i = 0; i < times; i++) this.faults.push(fault);
  }

  clearFaults(): void {
    this.faults.length = 0;
  }

  count(predicate: (r: LoggedRequest) => boolean): number {
    return this.requests.filter(predicate).length;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? '/', this.endpoint);
    const logged: LoggedRequest = {
      method: req.method ?? 'GET',
      path: url.pathname,
      query: Object.fromEntries(url.searchParams),
      range: req.headers.range,
      contentRange: req.headers['content-range'],
    };
    this.requests.push(logged);
    const faultIndex = this.faults.findIndex((f) => f.match === undefined || f.match(logged));
    if (faultIndex >= 0) {
      const [fault] = this.faults.splice(faultIndex, 1);
      req.resume();
      if (fault!.status === 'hang') {
        this.hung.add(res);
        res.once('close', () => this.hung.delete(res));
        return;
      }
      if (fault!.status === 'reset') {
        req.socket.destroy();
        return;
      }
      const body = JSON.stringify({ error: { code: fault!.status, message: 'injected fault' } });
      res.writeHead(fault!.status, { 'content-type': 'application/json' }).end(body);
      return;
    }
    const isList = req.method === 'GET' && /^\/storage\/v1\/b\/[^/]+\/o$/.test(url.pathname);
    if (isList && this.listPageSize > 0) {
      const asked = Number(url.searchParams.get('maxResults') ?? Infinity);
      url.searchParams.set('maxResults', String(Math.min(asked, this.listPageSize)));
    }
    const target = this.target;
    if (!target) {
      res.writeHead(503).end('proxy has no target yet');
      return;
    }
    const upstream = request(
      {
        host: target.hostname,
        port: target.port,
        method: req.method,
        path: url.pathname + url.search,
        // The client's Host is kept: fake-gcs-server builds resumable session URLs from it, so
        // the upload's chunks come back through this proxy.
        headers: req.headers,
      },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      },
    );
    upstream.once('error', () => req.socket.destroy());
    req.pipe(upstream);
  }
}
