/**
 * TEST DOUBLE of Consul's KV HTTP API (no Consul agent is installable on this machine).
 *
 * Implements the documented semantics the agent relies on, from
 * https://developer.hashicorp.com/consul/api-docs/kv:
 * - `GET /v1/kv/:key` → 200 with a JSON array of `{LockIndex, Key, Flags, Value (base64), CreateIndex,
 *   ModifyIndex}`, 404 when absent; `?recurse` returns every key under the prefix; `?keys` returns
 *   only key names (with `?separator`); every answer carries `X-Consul-Index`.
 * - `PUT /v1/kv/:key` with the raw value as body → `true`/`false`; `?cas=0` creates only when the
 *   key does not exist; `?cas=N` (N > 0) writes only when the key's ModifyIndex is N; `?flags=`.
 * - `DELETE /v1/kv/:key` → `true`/`false`; `?cas=N` deletes only when ModifyIndex is N; `?recurse`.
 * Every write takes the next value of one store-wide index (Consul's Raft index).
 * `stop()` then `start()` on the same address simulates an outage with the data kept.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { unlink } from 'node:fs/promises';

interface Entry {
  value: Buffer;
  flags: number;
  createIndex: number;
  modifyIndex: number;
}

export class ConsulKvDouble {
  private readonly entries = new Map<string, Entry>();
  private index = 1;
  private server: Server | undefined;
  private boundPort: number | undefined;
  /**
   * Writes whose answer is lost: the write is applied, then the connection is dropped without a
   * reply, as when a client times out on a slow but working Consul.
   */
  loseAnswersToWrites = 0;
  /** Requests served, by method (tests use it to see the fallback listing happen). */
  readonly requests = { GET: 0, PUT: 0, DELETE: 0 } as Record<string, number>;

  /** `listen` is a Unix socket path or a TCP port on 127.0.0.1 (0 = ephemeral). */
  constructor(private readonly listen: string | number) {}

  /** The address in CONSUL_HTTP_ADDR form. */
  address = '';

  async start(): Promise<string> {
    const server = createServer((req, res) => this.handle(req, res));
    if (typeof this.listen === 'string') await unlink(this.listen).catch(() => undefined);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if (typeof this.listen === 'string') server.listen(this.listen, () => resolve());
      // A restart after an outage comes back on the same port.
      else server.listen(this.boundPort ?? this.listen, '127.0.0.1', () => resolve());
    });
    this.server = server;
    const bound = server.address();
    if (bound && typeof bound === 'object') this.boundPort = bound.port;
    this.address = typeof bound === 'string' ? `unix://${bound}` : `http://127.0.0.1:${bound?.port}`;
    return this.address;
  }

  async stop(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  value(key: string): string | undefined {
    return this.entries.get(key)?.value.toString();
  }

  keys(prefix = ''): string[] {
    return [...this.entries.keys()].filter((k) => k.startsWith(prefix)).sort();
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const url = new URL(req.url ?? '/', 'http://consul');
      const method = req.method ?? 'GET';
      this.requests[method] = (this.requests[method] ?? 0) + 1;
      if (!url.pathname.startsWith('/v1/kv/')) return this.reply(res, 404, 'not found', this.index);
      const key = decodeURIComponent(url.pathname.slice('/v1/kv/'.length));
      const q = url.searchParams;
      if (method === 'GET') return this.get(res, key, q);
      if (method === 'PUT') return this.put(res, key, q, Buffer.concat(chunks));
      if (method === 'DELETE') return this.del(res, key, q);
      this.reply(res, 405, 'method not allowed', this.index);
    });
  }

  private get(res: ServerResponse, key: string, q: URLSearchParams): void {
    if (q.has('keys')) {
      const separator = q.get('separator') ?? '';
      const out = new Set<string>();
      for (const k of this.keys(key)) {
        const cut = separator ? k.indexOf(separator, key.length) : -1;
        out.add(cut >= 0 ? k.slice(0, cut + separator.length) : k);
      }
      if (!out.size) return this.reply(res, 404, '', this.index);
      return this.reply(res, 200, JSON.stringify([...out]), this.maxIndex(this.keys(key)));
    }
    const keys = q.has('recurse') ? this.keys(key) : this.entries.has(key) ? [key] : [];
    if (!keys.length) return this.reply(res, 404, '', this.index);
    const body = keys.map((k) => {
      const e = this.entries.get(k)!;
      return {
        LockIndex: 0,
        Key: k,
        Flags: e.flags,
        Value: e.value.length ? e.value.toString('base64') : null,
        CreateIndex: e.createIndex,
        ModifyIndex: e.modifyIndex,
      };
    });
    this.reply(res, 200, JSON.stringify(body), this.maxIndex(keys));
  }

  private put(res: ServerResponse, key: string, q: URLSearchParams, value: Buffer): void {
    if (!key) return this.reply(res, 400, 'Missing key name', this.index);
    const existing = this.entries.get(key);
    const cas = q.get('cas');
    if (cas !== null) {
      if (!/^\d+$/.test(cas)) return this.reply(res, 400, 'Invalid CAS index', this.index);
      const want = Number(cas);
      const ok = want === 0 ? !existing : existing?.modifyIndex === want;
      if (!ok) return this.reply(res, 200, 'false', this.index);
    }
    const index = ++this.index;
    this.entries.set(key, {
      value,
      flags: Number(q.get('flags') ?? existing?.flags ?? 0),
      createIndex: existing?.createIndex ?? index,
      modifyIndex: index,
    });
    if (this.loseAnswersToWrites > 0) {
      this.loseAnswersToWrites--;
      res.socket?.destroy();
      return;
    }
    this.reply(res, 200, 'true', index);
  }

  private del(res: ServerResponse, key: string, q: URLSearchParams): void {
    if (q.has('recurse')) {
      for (const k of this.keys(key)) this.entries.delete(k);
      return this.reply(res, 200, 'true', ++this.index);
    }
    const cas = q.get('cas');
    const existing = this.entries.get(key);
    if (cas !== null) {
      if (!/^\d+$/.test(cas)) return this.reply(res, 400, 'Invalid CAS index', this.index);
      // Consul: a delete-CAS succeeds only on the exact ModifyIndex of an existing key.
      if (!existing || existing.modifyIndex !== Number(cas)) return this.reply(res, 200, 'false', this.index);
    }
    this.entries.delete(key);
    this.reply(res, 200, 'true', ++this.index);
  }

  private maxIndex(keys: string[]): number {
    return Math.max(1, ...keys.map((k) => this.entries.get(k)?.modifyIndex ?? 0));
  }

  private reply(res: ServerResponse, code: number, body: string, index: number): void {
    res.writeHead(code, {
      'content-type': code === 200 ? 'application/json' : 'text/plain',
      'x-consul-index': String(index),
      'x-consul-knownleader': 'true',
      'x-consul-lastcontact': '0',
    });
    res.end(body);
  }
}
