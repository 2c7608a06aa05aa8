import {
  AccessDenied,
  PortClosed,
  ProxyError,
  ResumeFailed,
  RouteRequestInvalid,
  SandboxNotRunning,
  SandboxUnknown,
  UpstreamFailed,
  UpstreamTimeout,
} from './proxy-errors.js';

export interface ErrorResponse {
  status: number;
  body: string;
}

/**
 * The one place a refusal becomes an HTTP answer: a distinct status per cause and a short JSON
 * body naming the sandbox and port (E2B answers its proxy errors the same way).
 */
export function errorResponse(error: unknown): ErrorResponse {
  const status = statusOf(error);
  const e = error instanceof ProxyError ? error : undefined;
  const body = {
    code: e?.code ?? 'PROXY_ERROR',
    message: e ? e.message : 'internal proxy error',
    ...(e?.sandboxId !== undefined ? { sandboxId: e.sandboxId } : {}),
    ...(e?.port !== undefined ? { port: e.port } : {}),
  };
  return { status, body: JSON.stringify(body) + '\n' };
}

function statusOf(error: unknown): number {
  if (error instanceof RouteRequestInvalid) return 400;
  if (error instanceof AccessDenied) return 403;
  if (error instanceof SandboxUnknown) return 404;
  if (error instanceof SandboxNotRunning) return 409;
  if (error instanceof PortClosed) return 502;
  if (error instanceof UpstreamFailed) return 502;
  if (error instanceof ResumeFailed) return 503;
  if (error instanceof UpstreamTimeout) return 504;
  return 500;
}

/**
 * The same answer as a whole HTTP/1.1 response for a raw socket; `close` says the connection
 * ends after it (an upgrade refused), else it stays usable for the next request.
 */
export function rawErrorResponse(error: unknown, close = true): string {
  const { status, body } = errorResponse(error);
  return (
    `HTTP/1.1 ${status} ${REASONS[status] ?? 'Error'}\r\n` +
    'content-type: application/json\r\n' +
    `content-length: ${Buffer.byteLength(body)}\r\n` +
    (close ? 'connection: close\r\n\r\n' : '\r\n') +
    body
  );
}

const REASONS: Record<number, string> = {
  400: 'Bad Request',
  403: 'Forbidden',
  404: 'Not Found',
  409: 'Conflict',
  500: 'Internal Server Error',
  502: 'Bad Gateway',
  503: 'Service Unavailable',
  504: 'Gateway Timeout',
};
