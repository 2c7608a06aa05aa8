import {
  connect as h2connect,
  constants,
  type ClientHttp2Session,
  type IncomingHttpHeaders,
  type ServerHttp2Stream,
} from 'node:http2';
import type { Logger } from '#logging';
import type { SandboxRoute } from '#proto/sbx/routing';
import { TOKEN_HEADER } from './access-token.js';
import { errorResponse } from './error-response.js';
import { upstreamError } from './http1-forwarder.js';
import { ProxyError } from './proxy-errors.js';
import type { ProxyMetrics } from './proxy-metrics.js';
import type { RouteResolver } from './route-resolver.js';
import { routeTarget, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, type RouteTarget } from './route-target.js';

export interface H2ForwarderOptions {
  resolver: RouteResolver;
  metrics: ProxyMetrics;
  logger: Logger;
  connectTimeoutMs: number;
}

const DROPPED = new Set([TOKEN_HEADER, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, 'host', 'connection', 'keep-alive']);

function one(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value;
}

/**
 * HTTP/2 cleartext (prior knowledge) through to the sandbox as h2c, one upstream session per
 * sandbox port shared by every client stream: what envd's Connect/gRPC clients speak. Trailers
 * (grpc-status) are passed back.
 */
export class H2Forwarder {
  private readonly sessions = new Map<string, Promise<ClientHttp2Session>>();

  constructor(private readonly o: H2ForwarderOptions) {}

  /** Sessions to an address whose sandbox left. */
  dropSessions(hostIp: string): void {
    for (const [key, session] of this.sessions) {
      if (!key.startsWith(`${hostIp}:`)) continue;
      this.sessions.delete(key);
      void session.then(
        (s) => s.close(),
        () => undefined,
      );
    }
  }

  private session(hostIp: string, target: RouteTarget): Promise<ClientHttp2Session> {
    const key = `${hostIp}:${target.port}`;
    let p = this.sessions.get(key);
    if (p) return p;
    p = new Promise<ClientHttp2Session>((resolve, reject) => {
      const session = h2connect(`http://${hostIp}:${target.port}`);
      const forget = () => {
        if (this.sessions.get(key) === p) this.sessions.delete(key);
      };
      const timer = setTimeout(() => {
        const err = new Error('connect timeout') as NodeJS.ErrnoException;
        err.code = 'CONNECT_TIMEOUT';
        session.destroy(err);
      }, this.o.connectTimeoutMs);
      session.once('connect', () => {
        clearTimeout(timer);
        resolve(session);
      });
      session.on('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        forget();
        reject(upstreamError(err, target));
      });
      session.once('close', forget);
      session.once('goaway', forget);
    });
    this.sessions.set(key, p);
    return p;
  }

  handleStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, clientAddress: string | undefined): void {
    const started = performance.now();
    stream.on('error', () => undefined);
    let target: RouteTarget | undefined;
    const fail = (err: unknown) => {
      const e = err instanceof ProxyError ? err : upstreamError(err as NodeJS.ErrnoException, target!);
      this.o.metrics.requests.inc({ protocol: 'h2', result: e.code });
      if (stream.destroyed || stream.closed) return;
      if (stream.headersSent) {
        stream.close(constants.NGHTTP2_INTERNAL_ERROR);
        return;
      }
      const { status, body } = errorResponse(e);
      this.o.logger.info({ sandboxId: e.sandboxId, port: e.port, status, code: e.code }, 'h2 request refused');
      stream.respond({ ':status': status, 'content-type': 'application/json' });
      stream.end(body);
    };
    try {
      target = routeTarget(
        one(headers[':authority']) ?? one(headers['host']),
        one(headers[SANDBOX_ID_HEADER]),
        one(headers[SANDBOX_PORT_HEADER]),
      );
    } catch (err) {
      fail(err);
      return;
    }
    const t = target;
    this.o.resolver
      .resolve(t, one(headers[TOKEN_HEADER]))
      .then(async (route) =>
        this.forward(stream, headers, t, route, await this.session(route.hostIp, t), clientAddress, started),
      )
      .catch(fail);
  }

  private forward(
    stream: ServerHttp2Stream,
    headers: IncomingHttpHeaders,
    target: RouteTarget,
    route: SandboxRoute,
    session: ClientHttp2Session,
    clientAddress: string | undefined,
    started: number,
  ): void {
    if (stream.destroyed || stream.closed) return;
    const out: Record<string, string | string[]> = {};
    for (const [name, value] of Object.entries(headers)) {
      if (value === undefined || DROPPED.has(name)) continue;
      out[name] = value;
    }
    const authority = one(headers[':authority']) ?? one(headers['host']) ?? '';
    out[':authority'] = route.maskRequestHost || authority;
    const client = clientAddress?.replace(/^::ffff:/, '');
    const chain = [one(headers['x-forwarded-for']), client].filter(Boolean).join(', ');
    if (chain) out['x-forwarded-for'] = chain;
    out['x-forwarded-host'] = authority;
    out['x-forwarded-proto'] = 'http';
    const up = session.request(out, { endStream: stream.readableEnded });
    let trailers: IncomingHttpHeaders | undefined;
    up.on('trailers', (t: IncomingHttpHeaders) => (trailers = t));
    up.on('response', (h: IncomingHttpHeaders) => {
      const response: Record<string, string | string[]> = {};
      for (const [name, value] of Object.entries(h)) if (value !== undefined) response[name] = value;
      stream.respond(response, { waitForTrailers: true });
      this.o.metrics.responseSeconds.observe({ protocol: 'h2' }, (performance.now() - started) / 1000);
      this.o.metrics.requests.inc({ protocol: 'h2', result: 'ok' });
      up.pipe(stream);
    });
    stream.on('wantTrailers', () => {
      const t: Record<string, string | string[]> = {};
      for (const [name, value] of Object.entries(trailers ?? {})) if (value !== undefined) t[name] = value;
      stream.sendTrailers(t);
    });
    up.on('error', (err: NodeJS.ErrnoException) => {
      if (stream.headersSent) stream.close(constants.NGHTTP2_INTERNAL_ERROR);
      else {
        const e = upstreamError(err, target);
        this.o.metrics.requests.inc({ protocol: 'h2', result: e.code });
        const { status, body } = errorResponse(e);
        stream.respond({ ':status': status, 'content-type': 'application/json' });
        stream.end(body);
      }
    });
    stream.on('close', () => {
      if (!up.closed) up.close(constants.NGHTTP2_CANCEL);
    });
    if (!stream.readableEnded) stream.pipe(up);
  }

  close(): void {
    for (const p of this.sessions.values())
      void p.then(
        (s) => s.destroy(),
        () => undefined,
      );
    this.sessions.clear();
  }
}
