/**
 * A fault-injecting HTTP proxy in front of a real Consul agent: requests are forwarded as they
 * are, but the answers to the next `loseAnswersToWrites` writes (PUT, DELETE) are dropped after
 * Consul applied them, the connection closed without a reply, as when a client gives up on a
 * slow but working Consul. The one fault a real agent cannot be asked for.
 */
import { createServer, request, type Server } from 'node:http';

export class LossyConsulProxy {
  loseAnswersToWrites = 0;
  /** The next this-many writes reach Consul only after `writeDelayMs` (a slow, loaded store). */
  delayWrites = 0;
  writeDelayMs = 0;
  /** Writes whose answer was dropped so far. */
  lost = 0;
  address = '';
  private server: Server | undefined;

  constructor(private readonly consulAddress: string) {}

  async start(): Promise<string> {
    const target = new URL(this.consulAddress);
    const server = createServer((req, res) => {
      if ((req.method === 'PUT' || req.method === 'DELETE') && this.delayWrites > 0) {
        this.delayWrites--;
        const body: Buffer[] = [];
        req.on('data', (d: Buffer) => body.push(d));
        req.once('end', () => {
          setTimeout(() => {
            const late = request(
              { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers },
              (answer) => {
                if (res.destroyed) return void answer.resume();
                res.writeHead(answer.statusCode ?? 502, answer.headers);
                answer.pipe(res);
              },
            );
            late.once('error', () => req.socket.destroy());
            late.end(Buffer.concat(body));
          }, this.writeDelayMs);
        });
        return;
      }
      const upstream = request(
        { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers },
        (answer) => {
          if ((req.method === 'PUT' || req.method === 'DELETE') && this.loseAnswersToWrites > 0) {
            this.loseAnswersToWrites--;
            this.lost++;
            answer.resume();
            req.socket.destroy();
            return;
          }
          res.writeHead(answer.statusCode ?? 502, answer.headers);
          answer.pipe(res);
        },
      );
      upstream.once('error', () => req.socket.destroy());
      req.pipe(upstream);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    this.server = server;
    const bound = server.address();
    this.address = `http://127.0.0.1:${typeof bound === 'object' && bound ? bound.port : 0}`;
    return this.address;
  }

  async stop(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}
