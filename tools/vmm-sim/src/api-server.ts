import { existsSync, unlinkSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect } from 'node:net';
import type { Logger } from '#logging';
import { ApiFault } from './api-error.js';
import { MAX_PAYLOAD_BYTES, parseRequest } from './api-request.js';
import type { VmmController } from './vmm-controller.js';

/**
 * Firecracker's API socket: HTTP/1.1 with JSON bodies on a Unix socket. Requests are carried
 * out one at a time, in arrival order, as Firecracker's API thread hands each to the VMM and
 * waits for it. Errors are `{"fault_message": ...}` with 400 (413 for an MMDS store over its
 * limit); success is 204, or 200 with a body for GETs.
 */
export class ApiServer {
  private queue: Promise<unknown> = Promise.resolve();
  private readonly sockets = new Set<import('node:net').Socket>();

  private constructor(
    private readonly server: Server,
    private readonly path: string,
  ) {
    server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
  }

  static async listen(options: {
    path: string;
    controller: VmmController;
    logger: Logger;
    /** Called after the answer to a request Firecracker treats as fatal has been written. */
    onFatal: (fault: ApiFault) => void;
  }): Promise<ApiServer> {
    const { path, controller, logger, onFatal } = options;
    await removeStaleSocket(path);
    const server = createServer({ keepAliveTimeout: 0, requestTimeout: 0 });
    const api = new ApiServer(server, path);
    server.on('request', (req: IncomingMessage, res: ServerResponse) => {
      readBody(req).then(
        (body) => {
          api.queue = api.queue.then(() => api.serve(req, res, body, controller, logger, onFatal));
        },
        // The client went away before its request was whole: nothing to answer.
        () => res.destroy(),
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => {
        server.off('error', reject);
        resolve();
      });
    });
    return api;
  }

  private async serve(
    req: IncomingMessage,
    res: ServerResponse,
    body: Buffer | 'too-large',
    controller: VmmController,
    logger: Logger,
    onFatal: (fault: ApiFault) => void,
  ): Promise<void> {
    const method = req.method ?? 'GET';
    const path = req.url ?? '/';
    const started = process.hrtime.bigint();
    try {
      if (body === 'too-large') {
        throw new ApiFault(400, `Request payload with size larger than the limit of ${MAX_PAYLOAD_BYTES} bytes.`);
      }
      const action = parseRequest(method, path, body.length > 0 ? body : undefined);
      const result = await controller.handle(action);
      if (result.status === 204) {
        res.writeHead(204).end();
      } else {
        const text = JSON.stringify(result.body);
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
        res.end(text);
      }
      logger.info(
        { method, path, status: result.status, ms: Number(process.hrtime.bigint() - started) / 1e6 },
        'api request',
      );
    } catch (err) {
      const fault = err instanceof ApiFault ? err : new ApiFault(400, `Internal VMM error: ${(err as Error).message}`);
      if (!(err instanceof ApiFault)) logger.error({ err, method, path }, 'api request failed unexpectedly');
      const text = JSON.stringify({ fault_message: fault.faultMessage });
      logger.warn({ method, path, status: fault.status, fault: fault.faultMessage }, 'api request refused');
      res.writeHead(fault.status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
      res.end(text, () => {
        if (fault.fatal) onFatal(fault);
      });
    }
  }

  /**
   * Stops accepting, lets the request being carried out finish (a load half-way must be
   * able to release what it took) for up to `graceMs`, then drops the connections.
   */
  async close(graceMs = 10_000): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    await Promise.race([this.queue, new Promise((resolve) => setTimeout(resolve, graceMs).unref())]);
    for (const s of this.sockets) s.destroy();
    await closed;
    if (existsSync(this.path)) unlinkSync(this.path);
  }
}

async function readBody(req: IncomingMessage): Promise<Buffer | 'too-large'> {
  const chunks: Buffer[] = [];
  let total = 0;
  let tooLarge = false;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    total += chunk.length;
    if (total > MAX_PAYLOAD_BYTES) tooLarge = true;
    else chunks.push(chunk);
  }
  return tooLarge ? 'too-large' : Buffer.concat(chunks);
}

/** A socket file nobody answers on is left over from a dead VMM; a live one is refused. */
async function removeStaleSocket(path: string): Promise<void> {
  if (!existsSync(path)) return;
  const live = await new Promise<boolean>((resolve) => {
    const probe = connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new Error(`Failed to open the API socket at ${path}: another process is serving it`);
  unlinkSync(path);
}
