import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { Redis } from 'ioredis';

/** A free TCP port on loopback. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
    s.on('error', reject);
  });
}

export interface RedisUnderTest {
  process: ChildProcess;
  /** A redis URL for TCP, or the Unix socket path (ioredis takes either). */
  url: string;
  connect(): Redis;
  stop(): Promise<void>;
}

/**
 * A real redis-server (Debian's) without persistence for one test file, on a free loopback
 * port, or on a Unix socket (reachable from processes in other network namespaces).
 */
export async function startRedis(options: { unixSocket?: string } = {}): Promise<RedisUnderTest> {
  const port = options.unixSocket ? 0 : await freePort();
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'];
  if (options.unixSocket) args.push('--unixsocket', options.unixSocket, '--unixsocketperm', '700');
  const child = spawn('redis-server', args, { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const connect = () => {
    const r = options.unixSocket ? new Redis(options.unixSocket) : new Redis({ port, host: '127.0.0.1' });
    r.on('error', () => undefined);
    return r;
  };
  const probe = options.unixSocket
    ? new Redis({ path: options.unixSocket, lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null })
    : new Redis({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
  probe.on('error', () => undefined);
  let ready = false;
  for (let i = 0; i < 100 && !ready; i++) {
    try {
      await probe.connect();
      ready = (await probe.ping()) === 'PONG';
    } catch {
      probe.disconnect();
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  probe.disconnect();
  const stop = async () => {
    child.kill('SIGTERM');
    await exited;
  };
  if (!ready) {
    await stop();
    throw new Error('redis-server did not answer PING within 5 s');
  }
  return { process: child, url: options.unixSocket ?? `redis://127.0.0.1:${port}`, connect, stop };
}
