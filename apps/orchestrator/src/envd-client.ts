import { request } from 'node:http';
import { EnvdInitTimeout } from './orchestrator-errors.js';

/** What envd reports on GET /metrics (DESIGN.md §4). */
export interface EnvdMetrics {
  ts: number;
  cpu_count: number;
  cpu_used_pct: number;
  mem_total_mib: number;
  mem_used_mib: number;
}

/** The in-guest agent on port 49983, reached at the sandbox's host IP. */
export interface EnvdClient {
  /** POST /init with env vars, retried until 204 or `timeoutMs` passes. */
  init(hostIp: string, envVars: Record<string, string>, timeoutMs: number): Promise<void>;
  health(hostIp: string): Promise<boolean>;
  metrics(hostIp: string): Promise<EnvdMetrics | undefined>;
}

interface HttpAnswer {
  status: number;
  body: string;
}

export class HttpEnvdClient implements EnvdClient {
  constructor(
    private readonly port = 49983,
    private readonly attemptTimeoutMs = 500,
    private readonly retryDelayMs = 10,
  ) {}

  async init(hostIp: string, envVars: Record<string, string>, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const body = JSON.stringify({ envVars });
    let lastError = 'no attempt';
    while (Date.now() < deadline) {
      const budget = Math.max(50, Math.min(this.attemptTimeoutMs, deadline - Date.now()));
      try {
        const answer = await this.send(hostIp, 'POST', '/init', body, budget);
        if (answer.status === 204) return;
        lastError = `status ${answer.status}`;
      } catch (err) {
        lastError = (err as Error).message;
      }
      await new Promise((r) => setTimeout(r, this.retryDelayMs));
    }
    throw new EnvdInitTimeout(`${hostIp}:${this.port}`, timeoutMs, lastError);
  }

  async health(hostIp: string): Promise<boolean> {
    try {
      return (await this.send(hostIp, 'GET', '/health', undefined, 1000)).status === 204;
    } catch {
      return false;
    }
  }

  async metrics(hostIp: string): Promise<EnvdMetrics | undefined> {
    try {
      const answer = await this.send(hostIp, 'GET', '/metrics', undefined, 1000);
      if (answer.status !== 200) return undefined;
      return JSON.parse(answer.body) as EnvdMetrics;
    } catch {
      return undefined;
    }
  }

  private send(
    host: string,
    method: string,
    path: string,
    body: string | undefined,
    timeoutMs: number,
  ): Promise<HttpAnswer> {
    return new Promise((resolve, reject) => {
      const req = request(
        {
          host,
          port: this.port,
          method,
          path,
          agent: false,
          headers: body ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } : {},
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('error', reject);
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
        },
      );
      const timer = setTimeout(() => req.destroy(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
      req.on('close', () => clearTimeout(timer));
      req.on('error', reject);
      req.end(body);
    });
  }
}
