import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { freeTcpPort } from '#test-kit';
import { peerBinary } from './peer-binary.js';
import { PeerProcess } from './peer-process.js';

const execFileAsync = promisify(execFile);

export interface FakeGcsServerOptions {
  /** The address in the resources' self links (a proxy's, when one stands in front). */
  externalUrl?: string;
  /** Run in this network namespace: services there reach it at `endpoint`, the test through nsenter. */
  netns?: string;
}

/**
 * fake-gcs-server (github.com/fsouza/fake-gcs-server), the GCS JSON and upload API in memory on
 * 127.0.0.1. Clients reach it through @google-cloud/storage's `apiEndpoint` (the endpoint);
 * STORAGE_EMULATOR_HOST does not work with @google-cloud/storage 7.22 (requests go to /b/... and
 * get 404) and would override apiEndpoint, so tests never set it.
 */
export class FakeGcsServer {
  private constructor(
    readonly endpoint: string,
    private readonly process: PeerProcess,
    private readonly netns: string | undefined,
  ) {}

  static async start(options: FakeGcsServerOptions = {}): Promise<FakeGcsServer> {
    const binary = peerBinary('fake-gcs-server');
    const port = await freeTcpPort();
    const endpoint = `http://127.0.0.1:${port}`;
    const process_ = new PeerProcess({
      name: 'fake-gcs-server',
      binary,
      args: [
        '-scheme',
        'http',
        '-host',
        '127.0.0.1',
        '-port',
        String(port),
        '-backend',
        'memory',
        '-external-url',
        options.externalUrl ?? endpoint,
        '-log-level',
        'warn',
      ],
      env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' },
      ...(options.netns ? { netns: options.netns } : {}),
    });
    const server = new FakeGcsServer(endpoint, process_, options.netns);
    try {
      await process_.waitUntil('serving the JSON API', async () => (await server.http('GET', '/storage/v1/b')).ok);
    } catch (err) {
      await process_.stop();
      throw err;
    }
    return server;
  }

  get logs(): readonly string[] {
    return this.process.logs;
  }

  async createBucket(name: string): Promise<void> {
    const res = await this.http('POST', '/storage/v1/b', JSON.stringify({ name }));
    if (!res.ok) throw new Error(`fake-gcs-server: creating bucket ${name}: ${res.status} ${res.body}`);
  }

  /** Object names in a bucket under a prefix (for tests that check what was uploaded). */
  async list(bucket: string, prefix = ''): Promise<string[]> {
    const res = await this.http('GET', `/storage/v1/b/${bucket}/o?prefix=${encodeURIComponent(prefix)}`);
    if (!res.ok) throw new Error(`fake-gcs-server: listing ${bucket}: ${res.status} ${res.body}`);
    const body = JSON.parse(res.body) as { items?: Array<{ name: string }> };
    return (body.items ?? []).map((i) => i.name).sort();
  }

  async stop(): Promise<void> {
    await this.process.stop();
  }

  /** One JSON API request, from this process or (in a namespace) through curl run there. */
  private async http(
    method: string,
    path: string,
    body?: string,
  ): Promise<{ ok: boolean; status: number; body: string }> {
    if (!this.netns) {
      const res = await fetch(`${this.endpoint}${path}`, {
        method,
        ...(body !== undefined ? { body, headers: { 'content-type': 'application/json' } } : {}),
      });
      const text = await res.text();
      return { ok: res.ok, status: res.status, body: text };
    }
    const args = ['-s', '-m', '10', '-X', method, '-w', '\n%{http_code}', `${this.endpoint}${path}`];
    if (body !== undefined) args.push('-H', 'content-type: application/json', '--data-binary', body);
    const { stdout } = await execFileAsync('nsenter', [`--net=/run/netns/${this.netns}`, '--', 'curl', ...args]);
    const cut = stdout.lastIndexOf('\n');
    const status = Number(stdout.slice(cut + 1));
    return { ok: status >= 200 && status < 300, status, body: stdout.slice(0, cut) };
  }
}
