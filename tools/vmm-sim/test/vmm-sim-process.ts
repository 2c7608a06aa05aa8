import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { request } from 'node:http';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');

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

/** A `./sbx vmm-sim` process started the way the orchestrator starts Firecracker. */
export class VmmSimProcess {
  readonly output: string[] = [];
  exitCode: number | null | undefined = undefined;
  readonly exited: Promise<number | null>;

  private constructor(
    readonly child: ChildProcess,
    readonly apiSock: string,
  ) {
    child.stdout?.on('data', (c: Buffer) => this.output.push(c.toString()));
    child.stderr?.on('data', (c: Buffer) => this.output.push(c.toString()));
    this.exited = new Promise((res) =>
      child.on('exit', (code, signal) => res((this.exitCode = code ?? (signal ? -1 : null)))),
    );
  }

  static async start(apiSock: string, extraArgs: string[] = [], wrapper: string[] = []): Promise<VmmSimProcess> {
    if (!existsSync(join(repoRoot, 'dist/tools/vmm-sim/src/main.js'))) {
      throw new Error('vmm-sim is not built: run bash scripts/build.sh');
    }
    const argv = [...wrapper, join(repoRoot, 'sbx'), 'vmm-sim', '--api-sock', apiSock, ...extraArgs];
    const child = spawn(argv[0] ?? '', argv.slice(1), { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
    const proc = new VmmSimProcess(child, apiSock);
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline) {
      if (proc.exitCode !== undefined) throw new Error(`vmm-sim exited at start:\n${proc.output.join('')}`);
      if (existsSync(apiSock)) {
        try {
          await proc.api('GET', '/');
          return proc;
        } catch {
          // not accepting yet
        }
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    child.kill('SIGKILL');
    throw new Error(`vmm-sim did not open ${apiSock}:\n${proc.output.join('')}`);
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  api(method: string, path: string, body?: unknown): Promise<Reply> {
    return httpRequest({ socketPath: this.apiSock }, method, path, body);
  }

  /** Calls the API and fails the test with Firecracker's fault message unless it answered 204/200. */
  async ok(method: string, path: string, body?: unknown): Promise<Reply> {
    const reply = await this.api(method, path, body);
    if (reply.status !== 204 && reply.status !== 200) {
      throw new Error(`${method} ${path} → ${reply.status} ${reply.text}\n${this.output.join('').slice(-3000)}`);
    }
    return reply;
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    if (this.exitCode === undefined) this.child.kill(signal);
    return this.exited;
  }
}

/** Waits until `check` holds, polling; throws with `what` when it never does. */
export async function eventually<T>(
  what: string,
  check: () => Promise<T | undefined> | T | undefined,
  timeoutMs = 15_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await check();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}`);
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
