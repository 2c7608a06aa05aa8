import { request } from 'node:http';
import { eventually, ServiceProcess } from '#test-kit';

export interface Reply {
  status: number;
  body: unknown;
  text: string;
}

/** One HTTP request over a Unix socket (Firecracker's API) or TCP (the guest agent). */
export function httpRequest(
  target: { socketPath: string } | { host: string; port: number },
  method: string,
  path: string,
  body?: unknown,
  timeoutMs = 30_000,
): Promise<Reply> {
  return new Promise((resolvePromise, reject) => {
    const payload =
      body === undefined ? undefined : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body));
    const req = request(
      {
        ...target,
        method,
        path,
        headers: payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {},
        timeout: timeoutMs,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          resolvePromise({ status: res.statusCode ?? 0, body: parseJson(text), text });
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${path} timed out`)));
    req.on('error', reject);
    req.end(payload);
  });
}

function parseJson(text: string): unknown {
  try {
    return text ? (JSON.parse(text) as unknown) : undefined;
  } catch {
    return undefined;
  }
}

/** Reads the raw bytes of a guest agent response. */
export function httpBytes(host: string, port: number, path: string): Promise<Buffer> {
  return new Promise((resolvePromise, reject) => {
    const req = request({ host, port, path, method: 'GET' }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () =>
        res.statusCode === 200
          ? resolvePromise(Buffer.concat(chunks))
          : reject(new Error(`GET ${path}: ${res.statusCode} ${Buffer.concat(chunks).toString()}`)),
      );
    });
    req.on('error', reject);
    req.end();
  });
}

/** A `./sbx vmm-sim` process started the way the orchestrator starts Firecracker, ready once its API answers. */
export class VmmSimProcess {
  private constructor(
    readonly service: ServiceProcess,
    readonly apiSock: string,
  ) {}

  /** `wrapper` runs ./sbx under another command (`ip netns exec <slot>`). */
  static async start(apiSock: string, extraArgs: string[] = [], wrapper: string[] = []): Promise<VmmSimProcess> {
    const service = await ServiceProcess.start({
      args: ['vmm-sim', '--api-sock', apiSock, ...extraArgs],
      wrapper,
      ready: (_proc, timeoutMs) =>
        eventually(() => httpRequest({ socketPath: apiSock }, 'GET', '/'), {
          timeoutMs,
          what: `an answer on ${apiSock}`,
        }),
      readyTimeoutMs: 20_000,
    });
    return new VmmSimProcess(service, apiSock);
  }

  get pid(): number {
    return this.service.pid;
  }

  get exited(): Promise<number | null> {
    return this.service.exited;
  }

  api(method: string, path: string, body?: unknown): Promise<Reply> {
    return httpRequest({ socketPath: this.apiSock }, method, path, body);
  }

  /** Calls the API and fails the test with Firecracker's fault message unless it answered 204/200. */
  async ok(method: string, path: string, body?: unknown): Promise<Reply> {
    const reply = await this.api(method, path, body);
    if (reply.status !== 204 && reply.status !== 200) {
      throw new Error(`${method} ${path} → ${reply.status} ${reply.text}\n${this.service.logs.slice(-40).join('\n')}`);
    }
    return reply;
  }

  /** Signals the VMM; SIGTERM is followed by SIGKILL after 10 s. */
  stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    return this.service.stop(signal);
  }
}

/**
 * Guest agent ports for tests, from below the kernel's ephemeral range (32768–60999 here) so
 * no socket bound to port 0 elsewhere in the suite can take one between our pick and our bind,
 * and from a block of 100 chosen by pid so test files running side by side do not meet.
 */
let nextGuestPort = 10_000 + (process.pid % 220) * 100;
export function pickGuestPort(): number {
  return nextGuestPort++;
}
