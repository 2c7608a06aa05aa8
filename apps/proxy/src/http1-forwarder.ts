import { Agent, request, type IncomingMessage, type ServerResponse } from 'node:http';
import { connect, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { Logger } from '#logging';
import type { SandboxRoute } from '#proto/sbx/routing';
import { TOKEN_HEADER } from './access-token.js';
import { errorResponse, rawErrorResponse } from './error-response.js';
import { forwardRequestHeaders, forwardResponseHeaders, rawHeader } from './forward-headers.js';
import { PortClosed, ProxyError, UpstreamFailed, UpstreamTimeout } from './proxy-errors.js';
import type { ProxyMetrics } from './proxy-metrics.js';
import type { RouteResolver } from './route-resolver.js';
import { routeTarget, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, type RouteTarget } from './route-target.js';

export interface Http1ForwarderOptions {
  resolver: RouteResolver;
  metrics: ProxyMetrics;
  logger: Logger;
  connectTimeoutMs: number;
  maxIdleUpstreamSockets: number;
}

/** A connect error as the person at the other end should read it. */
export function upstreamError(err: NodeJS.ErrnoException, target: RouteTarget): ProxyError {
  if (err instanceof ProxyError) return err;
  const { sandboxId, port } = target;
  if (err.code === 'ECONNREFUSED') return new PortClosed(sandboxId, port, err.code);
  if (err.code === 'ETIMEDOUT' || err.code === 'CONNECT_TIMEOUT') {
    return new UpstreamTimeout(sandboxId, port, 'no answer to connect');
  }
  return new UpstreamFailed(sandboxId, port, err.code ?? err.message);
}

/**
 * HTTP/1.1 through to the sandbox: each request routed on its own (a keep-alive client may
 * reach several sandboxes), bodies streamed both ways, upstream connections kept alive per
 * sandbox port; an Upgrade (WebSocket) becomes a byte tunnel after the handshake.
 */
export class Http1Forwarder {
  readonly agent: Agent;

  constructor(private readonly o: Http1ForwarderOptions) {
    // noDelay reaches net.createConnection: a request head must not wait on Nagle behind the last ACK.
    this.agent = new Agent({
      keepAlive: true,
      maxFreeSockets: o.maxIdleUpstreamSockets,
      scheduling: 'lifo',
      noDelay: true,
    } as ConstructorParameters<typeof Agent>[0]);
  }

  /** Idle pooled connections to an address whose sandbox left (its IP may go to another one). */
  dropIdle(hostIp: string): void {
    const free = this.agent.freeSockets as Record<string, Socket[] | undefined>;
    for (const [name, sockets] of Object.entries(free)) {
      if (name.startsWith(`${hostIp}:`)) for (const s of sockets ?? []) s.destroy();
    }
  }

  private target(raw: string[]): RouteTarget {
    return routeTarget(rawHeader(raw, 'host'), rawHeader(raw, SANDBOX_ID_HEADER), rawHeader(raw, SANDBOX_PORT_HEADER));
  }

  handleRequest(req: IncomingMessage, res: ServerResponse): void {
    const started = performance.now();
    let target: RouteTarget | undefined;
    const fail = (err: unknown) => {
      const e = err instanceof ProxyError ? err : upstreamError(err as NodeJS.ErrnoException, target!);
      this.o.metrics.requests.inc({ protocol: 'http1', result: e.code });
      if (res.headersSent) {
        res.destroy();
        return;
      }
      const { status, body } = errorResponse(e);
      this.o.logger.info({ sandboxId: e.sandboxId, port: e.port, status, code: e.code }, 'request refused');
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      res.end(body);
      // The request body is not wanted; keep the connection only if it is small enough to drain.
      req.resume();
    };
    try {
      target = this.target(req.rawHeaders);
    } catch (err) {
      fail(err);
      return;
    }
    const t = target;
    this.o.resolver
      .resolve(t, rawHeader(req.rawHeaders, TOKEN_HEADER))
      .then((route) => this.forward(req, res, t, route, started, fail, false), fail);
  }

  private forward(
    req: IncomingMessage,
    res: ServerResponse,
    target: RouteTarget,
    route: SandboxRoute,
    started: number,
    fail: (err: unknown) => void,
    retried: boolean,
  ): void {
    const headers = forwardRequestHeaders(req.rawHeaders, {
      maskHost: route.maskRequestHost,
      clientAddress: req.socket.remoteAddress,
      upgrade: false,
    });
    const upstream = request({
      host: route.hostIp,
      port: target.port,
      method: req.method,
      path: req.url,
      headers: headers as unknown as Record<string, string>,
      agent: this.agent,
      setHost: false,
    });
    let timer: NodeJS.Timeout | undefined;
    upstream.on('socket', (socket: Socket) => {
      if (!socket.connecting) return;
      timer = setTimeout(() => {
        const err = new Error('connect timeout') as NodeJS.ErrnoException;
        err.code = 'CONNECT_TIMEOUT';
        upstream.destroy(err);
      }, this.o.connectTimeoutMs);
      socket.once('connect', () => clearTimeout(timer));
    });
    const bodiless = !req.headers['content-length'] && !req.headers['transfer-encoding'];
    upstream.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      // A pooled connection the guest had closed: a request without a body is sent again once.
      if (!retried && upstream.reusedSocket && bodiless && err.code === 'ECONNRESET' && !res.headersSent) {
        this.forward(req, res, target, route, started, fail, true);
        return;
      }
      fail(err);
    });
    upstream.on('response', (up: IncomingMessage) => {
      res.writeHead(up.statusCode ?? 502, up.statusMessage, forwardResponseHeaders(up.rawHeaders));
      this.o.metrics.responseSeconds.observe({ protocol: 'http1' }, (performance.now() - started) / 1000);
      this.o.metrics.requests.inc({ protocol: 'http1', result: 'ok' });
      up.pipe(res);
      up.on('error', () => res.destroy());
      up.on('aborted', () => res.destroy());
    });
    // The client gave up: so does the request to the sandbox.
    res.on('close', () => {
      if (!res.writableFinished) upstream.destroy();
    });
    if (bodiless) upstream.end();
    else req.pipe(upstream);
  }

  /** An Upgrade request (WebSocket, or any other): handshake forwarded, then bytes both ways. */
  handleUpgrade(req: IncomingMessage, client: Duplex, head: Buffer): void {
    let target: RouteTarget | undefined;
    const fail = (err: unknown) => {
      const e = err instanceof ProxyError ? err : upstreamError(err as NodeJS.ErrnoException, target!);
      this.o.metrics.requests.inc({ protocol: 'websocket', result: e.code });
      this.o.logger.info({ sandboxId: e.sandboxId, port: e.port, code: e.code }, 'upgrade refused');
      if (client.writable) client.end(rawErrorResponse(e));
      else client.destroy();
    };
    client.on('error', () => undefined);
    try {
      target = this.target(req.rawHeaders);
    } catch (err) {
      fail(err);
      return;
    }
    const t = target;
    this.o.resolver.resolve(t, rawHeader(req.rawHeaders, TOKEN_HEADER)).then((route) => {
      if (client.destroyed) return;
      const upstream = connect({ host: route.hostIp, port: t.port, allowHalfOpen: true });
      const timer = setTimeout(() => {
        const err = new Error('connect timeout') as NodeJS.ErrnoException;
        err.code = 'CONNECT_TIMEOUT';
        upstream.destroy(err);
      }, this.o.connectTimeoutMs);
      const onConnectError = (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        fail(err);
      };
      upstream.once('error', onConnectError);
      // A side that closes without ending takes the other with it; a clean end goes through
      // pipe() so that what is still queued (a WebSocket close frame) is written first.
      client.once('close', () => {
        if (!upstream.writableEnded) upstream.destroy();
      });
      upstream.once('connect', () => {
        clearTimeout(timer);
        upstream.off('error', onConnectError);
        upstream.on('error', () => client.destroy());
        upstream.once('close', () => {
          if (!client.writableEnded) client.destroy();
        });
        upstream.setNoDelay(true);
        const headers = forwardRequestHeaders(req.rawHeaders, {
          maskHost: route.maskRequestHost,
          clientAddress: req.socket.remoteAddress,
          upgrade: true,
        });
        let text = `${req.method} ${req.url} HTTP/1.1\r\n`;
        for (let i = 0; i + 1 < headers.length; i += 2) text += `${headers[i]}: ${headers[i + 1]}\r\n`;
        upstream.write(text + '\r\n');
        if (head.length) upstream.write(head);
        this.o.metrics.requests.inc({ protocol: 'websocket', result: 'ok' });
        this.o.metrics.connections.inc({ protocol: 'websocket' });
        client.once('close', () => this.o.metrics.connections.dec({ protocol: 'websocket' }));
        upstream.pipe(client);
        client.pipe(upstream);
      });
    }, fail);
  }

  close(): void {
    this.agent.destroy();
  }
}
