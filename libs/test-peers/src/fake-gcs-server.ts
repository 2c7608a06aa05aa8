import { freePort } from './free-port.js';
import { peerBinary } from './peer-binary.js';
import { PeerProcess } from './peer-process.js';

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
  ) {}

  /** `externalUrl`: the address in the resources' self links (a proxy's, when one stands in front). */
  static async start(options: { externalUrl?: string } = {}): Promise<FakeGcsServer> {
    const binary = peerBinary('fake-gcs-server');
    const port = await freePort();
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
    });
    const server = new FakeGcsServer(endpoint, process_);
    try {
      await process_.waitUntil('serving the JSON API', async () => (await fetch(`${endpoint}/storage/v1/b`)).ok);
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
    const res = await fetch(`${this.endpoint}/storage/v1/b`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ name }),
    });
    if (!res.ok) throw new Error(`fake-gcs-server: creating bucket ${name}: ${res.status} ${await res.text()}`);
  }

  /** Object names in a bucket under a prefix (for tests that check what was uploaded). */
  async list(bucket: string, prefix = ''): Promise<string[]> {
    const res = await fetch(`${this.endpoint}/storage/v1/b/${bucket}/o?prefix=${encodeURIComponent(prefix)}`);
    if (!res.ok) throw new Error(`fake-gcs-server: listing ${bucket}: ${res.status} ${await res.text()}`);
    const body = (await res.json()) as { items?: Array<{ name: string }> };
    return (body.items ?? []).map((i) => i.name).sort();
  }

  async stop(): Promise<void> {
    await this.process.stop();
  }
}
