import { createHash, randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { CRC32C } from '@google-cloud/storage';

/**
 * TEST DOUBLE of Google Cloud Storage, kept for one case only: resuming a resumable upload after
 * a chunk failed. The client then asks for the upload's status (`PUT` with `Content-Range:
 * bytes *\/total`), which GCS answers with 308 and the `Range` it holds; fake-gcs-server 1.56.1
 * (the real peer every other GCS test uses) answers 200 and finalizes the object, and the client
 * stops ("The server has 0 bytes..."). This small HTTP server implements the documented JSON and
 * media API subset @google-cloud/storage 7 uses (https://cloud.google.com/storage/docs/json_api):
 *   GET    /storage/v1/b/{bucket}/o/{object}                 object resource
 *   GET    /storage/v1/b/{bucket}/o/{object}?alt=media       media, `Range: bytes=a-b` → 206
 *   GET    /storage/v1/b/{bucket}/o?prefix=&pageToken=       list, paginated
 *   DELETE /storage/v1/b/{bucket}/o/{object}                 204, 404 when absent
 *   POST   /upload/storage/v1/b/{bucket}/o?uploadType=resumable&name=   session URI in Location
 *   PUT    {session URI}  `Content-Range: bytes a-b/total|*`  chunk → 308 + Range, last → 200 + resource;
 *                          `Content-Range: bytes *\/total|*` with no body → upload status
 * plus fault injection (`failNext`) and a request log so tests can count what the client did.
 */
export interface GcsDoubleObject {
  data: Buffer;
  generation: number;
  created: string;
}

interface UploadSession {
  bucket: string;
  name: string;
  received: Buffer[];
  receivedBytes: number;
  done: boolean;
}

export interface LoggedRequest {
  method: string;
  path: string;
  query: Record<string, string>;
  range: string | undefined;
  contentRange: string | undefined;
}

export interface Fault {
  /** Which requests the fault hits; all when absent. */
  match?: (r: LoggedRequest) => boolean;
  /** HTTP status to answer with, or 'hang' to never answer (a bucket timeout), or 'reset'. */
  status: number | 'hang' | 'reset';
}

export class GcsDouble {
  readonly buckets = new Map<string, Map<string, GcsDoubleObject>>();
  readonly requests: LoggedRequest[] = [];
  /** Page size of list responses (small, so pagination is exercised). */
  pageSize = 1000;
  private readonly faults: Fault[] = [];
  private readonly sessions = new Map<string, UploadSession>();
  private readonly hung = new Set<ServerResponse>();
  private server: Server | undefined;
  private generation = 1;
  endpoint = '';

  async start(): Promise<string> {
    this.server = createServer((req, res) => {
      this.handle(req, res).catch((err: unknown) => {
        if (!res.headersSent) this.error(res, 500, String(err));
        else res.destroy();
      });
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.endpoint = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this.endpoint;
  }

  async stop(): Promise<void> {
    for (const res of this.hung) res.destroy();
    this.hung.clear();
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  /** The next matching request fails as described (queued: one fault per call). */
  failNext(fault: Fault, times = 1): void {
    for (let i = 0; i < times; i++) this.faults.push(fault);
  }

  clearFaults(): void {
    this.faults.length = 0;
  }

  put(bucket: string, name: string, data: Buffer): void {
    this.bucket(bucket).set(name, {
      data: Buffer.from(data),
      generation: this.generation++,
      created: new Date().toISOString(),
    });
  }

  get(bucket: string, name: string): Buffer | undefined {
    return this.buckets.get(bucket)?.get(name)?.data;
  }

  count(predicate: (r: LoggedRequest) => boolean): number {
    return this.requests.filter(predicate).length;
  }

  private bucket(name: string): Map<string, GcsDoubleObject> {
    let b = this.buckets.get(name);
    if (b === undefined) {
      b = new Map();
      this.buckets.set(name, b);
    }
    return b;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', this.endpoint);
    const logged: LoggedRequest = {
      method: req.method ?? 'GET',
      path: url.pathname,
      query: Object.fromEntries(url.searchParams),
      range: req.headers.range,
      contentRange: req.headers['content-range'],
    };
    this.requests.push(logged);
    const body = await readBody(req);
    const faultIndex = this.faults.findIndex((f) => f.match === undefined || f.match(logged));
    if (faultIndex >= 0) {
      const [fault] = this.faults.splice(faultIndex, 1);
      if (fault!.status === 'hang') {
        this.hung.add(res);
        return;
      }
      if (fault!.status === 'reset') {
        req.socket.destroy();
        return;
      }
      this.error(res, fault!.status, 'injected fault');
      return;
    }

    let m = /^\/storage\/v1\/b\/([^/]+)\/o\/(.+)$/.exec(url.pathname);
    if (m !== null) {
      const bucket = decodeURIComponent(m[1]!);
      const name = decodeURIComponent(m[2]!);
      const obj = this.buckets.get(bucket)?.get(name);
      if (req.method === 'DELETE') {
        if (obj === undefined) return this.error(res, 404, `No such object: ${bucket}/${name}`);
        this.buckets.get(bucket)!.delete(name);
        res.writeHead(204).end();
        return;
      }
      if (req.method !== 'GET') return this.error(res, 405, 'method not allowed');
      if (obj === undefined) return this.error(res, 404, `No such object: ${bucket}/${name}`);
      if (url.searchParams.get('alt') === 'media') return this.media(req, res, obj);
      return this.json(res, 200, this.resource(bucket, name, obj));
    }

    m = /^\/storage\/v1\/b\/([^/]+)\/o$/.exec(url.pathname);
    if (m !== null && req.method === 'GET') {
      const bucket = decodeURIComponent(m[1]!);
      const prefix = url.searchParams.get('prefix') ?? '';
      const max = Math.min(this.pageSize, Number(url.searchParams.get('maxResults') ?? this.pageSize));
      const names = [...(this.buckets.get(bucket)?.keys() ?? [])].filter((n) => n.startsWith(prefix)).sort();
      const token = url.searchParams.get('pageToken');
      const start = token === null ? 0 : Number(Buffer.from(token, 'base64').toString());
      const page = names.slice(start, start + max);
      const out: Record<string, unknown> = {
        kind: 'storage#objects',
        items: page.map((n) => this.resource(bucket, n, this.buckets.get(bucket)!.get(n)!)),
      };
      if (start + max < names.length) out.nextPageToken = Buffer.from(String(start + max)).toString('base64');
      return this.json(res, 200, out);
    }

    m = /^\/upload\/storage\/v1\/b\/([^/]+)\/o$/.exec(url.pathname);
    if (m !== null && req.method === 'POST' && url.searchParams.get('uploadType') === 'resumable') {
      const name = url.searchParams.get('name');
      if (name === null || name === '') return this.error(res, 400, 'name required');
      const id = randomBytes(8).toString('hex');
      this.sessions.set(id, { bucket: decodeURIComponent(m[1]!), name, received: [], receivedBytes: 0, done: false });
      res.writeHead(200, { location: `${this.endpoint}${url.pathname}?uploadType=resumable&upload_id=${id}` }).end();
      return;
    }
    if (m !== null && req.method === 'PUT') {
      const session = this.sessions.get(url.searchParams.get('upload_id') ?? '');
      if (session === undefined) return this.error(res, 404, 'no such upload session');
      return this.uploadChunk(res, session, req.headers['content-range'], body);
    }
    this.error(res, 404, `the double does not serve ${req.method} ${url.pathname}`);
  }

  private uploadChunk(res: ServerResponse, s: UploadSession, contentRange: string | undefined, body: Buffer): void {
    if (s.done) return this.json(res, 200, this.resource(s.bucket, s.name, this.buckets.get(s.bucket)!.get(s.name)!));
    const cr = /^bytes (\*|(\d+)-(\d+|\*))\/(\d+|\*)$/.exec(contentRange ?? '');
    if (cr === null) return this.error(res, 400, `bad Content-Range: ${contentRange}`);
    const total = cr[4] === '*' ? undefined : Number(cr[4]);
    if (cr[1] !== '*') {
      const first = Number(cr[2]);
      if (first > s.receivedBytes) return this.error(res, 400, `chunk starts at ${first}, have ${s.receivedBytes}`);
      const fresh = body.subarray(s.receivedBytes - first);
      s.received.push(fresh);
      s.receivedBytes += fresh.length;
    }
    const complete =
      (total !== undefined && s.receivedBytes >= total) || (total === undefined && cr[3] === '*' && cr[1] !== '*');
    if (!complete) {
      if (s.receivedBytes > 0) res.setHeader('range', `bytes=0-${s.receivedBytes - 1}`);
      res.writeHead(308).end();
      return;
    }
    s.done = true;
    this.put(s.bucket, s.name, Buffer.concat(s.received));
    this.json(res, 200, this.resource(s.bucket, s.name, this.buckets.get(s.bucket)!.get(s.name)!));
  }

  private media(req: IncomingMessage, res: ServerResponse, obj: GcsDoubleObject): void {
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    const headers: Record<string, string> = {
      'content-type': 'application/octet-stream',
      'x-goog-generation': String(obj.generation),
    };
    if (range === null) {
      headers['x-goog-hash'] = `crc32c=${crc32c(obj.data)},md5=${md5(obj.data)}`;
      headers['content-length'] = String(obj.data.length);
      res.writeHead(200, headers).end(obj.data);
      return;
    }
    const start = Number(range[1]);
    const end = Math.min(range[2] === '' ? obj.data.length - 1 : Number(range[2]), obj.data.length - 1);
    if (start >= obj.data.length) {
      res.writeHead(416, { 'content-range': `bytes */${obj.data.length}` }).end();
      return;
    }
    headers['content-range'] = `bytes ${start}-${end}/${obj.data.length}`;
    headers['content-length'] = String(end - start + 1);
    res.writeHead(206, headers).end(obj.data.subarray(start, end + 1));
  }

  private resource(bucket: string, name: string, obj: GcsDoubleObject): Record<string, unknown> {
    return {
      kind: 'storage#object',
      id: `${bucket}/${name}/${obj.generation}`,
      name,
      bucket,
      generation: String(obj.generation),
      metageneration: '1',
      contentType: 'application/octet-stream',
      size: String(obj.data.length),
      md5Hash: md5(obj.data),
      crc32c: crc32c(obj.data),
      timeCreated: obj.created,
      updated: obj.created,
    };
  }

  private json(res: ServerResponse, status: number, body: unknown): void {
    res.writeHead(status, { 'content-type': 'application/json; charset=UTF-8' }).end(JSON.stringify(body));
  }

  private error(res: ServerResponse, status: number, message: string): void {
    this.json(res, status, {
      error: { code: status, message, errors: [{ message, domain: 'global', reason: 'double' }] },
    });
  }
}

function crc32c(data: Buffer): string {
  const c = new CRC32C();
  c.update(data);
  return c.toString();
}

function md5(data: Buffer): string {
  return createHash('md5').update(data).digest('base64');
}

async function readBody(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of req) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}
