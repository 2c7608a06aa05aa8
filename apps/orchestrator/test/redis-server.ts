import { Redis } from 'ioredis';
import { eventually, freeTcpPort, ServiceProcess } from '#test-kit';

export interface RedisUnderTest {
  process: ServiceProcess;
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
  const port = options.unixSocket ? 0 : await freeTcpPort();
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'];
  if (options.unixSocket) args.push('--unixsocket', options.unixSocket, '--unixsocketperm', '700');
  const where = options.unixSocket ? { path: options.unixSocket } : { port, host: '127.0.0.1' };
  const connect = () => {
    const r = new Redis(where);
    r.on('error', () => undefined);
    return r;
  };
  /** Ready once it answers PING. */
  const answers = async () => {
    const probe = new Redis({ ...where, lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    probe.on('error', () => undefined);
    try {
      await probe.connect();
      return (await probe.ping()) === 'PONG';
    } finally {
      probe.disconnect();
    }
  };
  const server = await ServiceProcess.start({
    name: 'redis-server',
    launcher: ['redis-server'],
    args,
    ready: (_proc, timeoutMs) => eventually(answers, { timeoutMs, what: 'redis-server to answer PING' }),
    readyTimeoutMs: 5000,
  });
  return {
    process: server,
    url: options.unixSocket ?? `redis://127.0.0.1:${port}`,
    connect,
    stop: async () => void (await server.stop()),
  };
}
