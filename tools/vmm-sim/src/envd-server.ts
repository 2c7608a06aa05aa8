import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from '#logging';
import type { GuestDisk } from './guest-disk.js';
import type { GuestMemory } from './guest-memory.js';
import type { GuestNetns } from './guest-netns.js';
import { parseStartTouch, START_TOUCH_VAR, StartTouchInvalid } from './start-touch.js';

/**
 * The guest's agent: envd's HTTP API as the orchestrator uses it (POST /init → 204,
 * GET /health → 204, GET /metrics → JSON; seeds: sandbox/envd.go, checks.go, metrics.go),
 * plus `/_test/*` endpoints no real guest has, through which tests write, read and hash guest
 * memory and disk and read MMDS back. Memory goes through the vCPU thread (page faults into
 * the uffd-server), disk through the drive (NBD to the block-server). While the VM is paused,
 * requests wait, as they would against a frozen guest.
 */
export const ENVD_PORT = 49983;
const MAX_BODY_BYTES = 96 * 1024 * 1024;
const MAX_READ_BYTES = 64 * 1024 * 1024;
const DISK_CHUNK = 1024 * 1024;
/** Env var naming memory ranges `/init` reads before answering (`offset:length,...`, bytes): a guest's start. */
export const START_READ_VAR = 'SBX_SIM_START_READ';

/** What the start's touch (SBX_SIM_START_TOUCH) did, for `GET /_test/start`. */
export interface StartTouchReport {
  spec: string;
  bytes: number;
  pages: number;
  runs: number;
  /** h = h * 31 + byte over the first byte of each touched page, in touch order, mod 2^32. */
  checksum: number;
  ms: number;
  /** Guest pages present (bytes) just before and just after: faults' windows may bring more than touched. */
  residentBefore: number;
  residentAfter: number;
}

export interface GuestView {
  memory: GuestMemory;
  drives: ReadonlyMap<string, GuestDisk>;
  rootDriveId: string | undefined;
  vcpuCount: number;
  memSizeMib: number;
  envVars: Record<string, string>;
  mmds(): unknown;
  /** Runs `fn` once the VM runs (at once unless paused); pausing waits for it to finish. */
  whileRunning<T>(fn: () => Promise<T>): Promise<T>;
}

export class EnvdServer {
  private readonly sockets = new Set<import('node:net').Socket>();
  private cpuMark = { at: process.hrtime.bigint(), usage: process.cpuUsage() };
  /** The start's reads (SBX_SIM_START_READ), once per process. */
  private startRead: Promise<void> | undefined;
  /** The start's touch (SBX_SIM_START_TOUCH), once per process. */
  private startTouch: Promise<StartTouchReport> | undefined;
  private startTouchDone: StartTouchReport | undefined;

  private constructor(
    private readonly server: Server,
    private readonly guest: GuestView,
    private readonly logger: Logger,
  ) {
    server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
  }

  /**
   * Listens inside the guest namespace on every guest address (envd binds 0.0.0.0), or on
   * `listen` (host:port on loopback) when running outside a slot.
   */
  static async start(options: {
    guest: GuestView;
    logger: Logger;
    netns?: GuestNetns;
    listen?: { host: string; port: number };
  }): Promise<EnvdServer> {
    const server = createServer({ requestTimeout: 0, keepAliveTimeout: 5000 });
    const envd = new EnvdServer(server, options.guest, options.logger);
    server.on('request', (req, res) => void envd.handle(req, res));
    const listening = new Promise<void>((resolve, reject) => {
      server.once('listening', resolve);
      server.once('error', reject);
    });
    if (options.netns) {
      // With no host, net.Server.listen creates and binds its socket synchronously, so the
      // socket is made while this thread is inside the guest namespace.
      options.netns.run(() => server.listen(ENVD_PORT));
    } else if (options.listen) {
      server.listen(options.listen.port, options.listen.host);
    } else {
      throw new Error('envd needs a guest namespace or a listen address');
    }
    await listening;
    return envd;
  }

  address(): AddressInfo {
    return this.server.address() as AddressInfo;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      for (const s of this.sockets) s.destroy();
    });
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    try {
      const url = new URL(req.url ?? '/', 'http://guest');
      const body = await readBody(req);
      await this.guest.whileRunning(() => this.route(`${req.method ?? 'GET'} ${url.pathname}`, url, body, res));
    } catch (err) {
      const status = err instanceof BadRequest || err instanceof RangeError ? 400 : 500;
      if (status === 500) this.logger.error({ err, url: req.url }, 'guest request failed');
      if (!res.headersSent) json(res, status, { code: status, message: (err as Error).message });
      else res.destroy();
    }
  }

  private async route(route: string, url: URL, body: Buffer, res: ServerResponse): Promise<void> {
    {
      switch (route) {
        case 'POST /init':
          return this.init(body, res);
        case 'GET /health':
          res.writeHead(204).end();
          return;
        case 'GET /metrics':
          return json(res, 200, this.metrics());
        case 'GET /_test/mmds':
          return json(res, 200, this.guest.mmds() ?? {});
        case 'GET /_test/env':
          return json(res, 200, this.guest.envVars);
        case 'GET /_test/start':
          return json(res, 200, { touch: this.startTouchDone ?? null });
        case 'POST /_test/memory/write':
          return await this.memoryWrite(body, res);
        case 'GET /_test/memory/read':
          return await this.memoryRead(url, res);
        case 'GET /_test/memory/hash':
          return await this.memoryHash(url, res);
        case 'POST /_test/disk/write':
          return await this.diskWrite(url, body, res);
        case 'POST /_test/disk/flush':
          await this.drive(url).flush();
          res.writeHead(204).end();
          return;
        case 'GET /_test/disk/read':
          return await this.diskRead(url, res);
        case 'GET /_test/disk/hash':
          return await this.diskHash(url, res);
      }
      json(res, 404, { code: 404, message: `no route ${route}` });
    }
  }

  private async init(body: Buffer, res: ServerResponse): Promise<void> {
    const parsed = parseJsonObject(body);
    const envVars = parsed['envVars'];
    if (envVars !== undefined && envVars !== null) {
      if (typeof envVars !== 'object' || Array.isArray(envVars)) throw new BadRequest('envVars must be an object');
      for (const [k, v] of Object.entries(envVars as Record<string, unknown>)) {
        if (typeof v !== 'string') throw new BadRequest(`envVars.${k} must be a string`);
        this.guest.envVars[k] = v;
      }
    }
    // A guest's start, for benchmarks: the memory its processes read before envd answers. Once
    // per VMM process: an /init the orchestrator gave up on (500 ms per attempt) and sent again
    // waits for the same reads instead of starting them over.
    const startRead = this.guest.envVars[START_READ_VAR];
    if (startRead) {
      this.startRead ??= (async () => {
        for (const r of parseStartRead(startRead)) await this.guest.memory.hash(r.offset, r.length);
      })().catch((err: unknown) => {
        this.startRead = undefined;
        throw err;
      });
      await this.startRead;
    }
    const startTouch = this.guest.envVars[START_TOUCH_VAR];
    if (startTouch) {
      this.startTouch ??= this.touchAtStart(startTouch).catch((err: unknown) => {
        this.startTouch = undefined;
        throw err instanceof StartTouchInvalid ? new BadRequest(err.message) : err;
      });
      this.startTouchDone = await this.startTouch;
    }
    res.writeHead(204).end();
  }

  private async touchAtStart(spec: string): Promise<StartTouchReport> {
    const memory = this.guest.memory;
    const { runs, bytes } = parseStartTouch(spec, memory.size, memory.pageSize);
    const residentBefore = memory.residentBytes();
    const t0 = performance.now();
    const { pages, checksum } = await memory.touchRuns(runs);
    const ms = performance.now() - t0;
    const report = {
      spec,
      bytes,
      pages,
      runs: runs.length,
      checksum,
      ms,
      residentBefore,
      residentAfter: memory.residentBytes(),
    };
    this.logger.info({ ...report, ms: Math.round(ms) }, 'start touched its working set');
    return report;
  }

  private metrics(): Record<string, number> {
    const now = process.hrtime.bigint();
    const usage = process.cpuUsage();
    const wallUs = Number(now - this.cpuMark.at) / 1000;
    const cpuUs = usage.user - this.cpuMark.usage.user + (usage.system - this.cpuMark.usage.system);
    this.cpuMark = { at: now, usage };
    const pct = wallUs > 0 ? Math.min(100, (cpuUs / wallUs / this.guest.vcpuCount) * 100) : 0;
    return {
      ts: Math.floor(Date.now() / 1000),
      cpu_count: this.guest.vcpuCount,
      cpu_used_pct: Math.round(pct * 100) / 100,
      mem_total_mib: this.guest.memSizeMib,
      mem_used_mib: Math.ceil(this.guest.memory.residentBytes() / (1024 * 1024)),
    };
  }

  private async memoryWrite(body: Buffer, res: ServerResponse): Promise<void> {
    const w = parseWrite(body);
    if (w.data) await this.guest.memory.write(w.offset, w.data);
    else await this.guest.memory.fill(w.offset, w.length, w.pattern);
    res.writeHead(204).end();
  }

  private async memoryRead(url: URL, res: ServerResponse): Promise<void> {
    const { offset, length } = rangeQuery(url, MAX_READ_BYTES);
    const bytes = await this.guest.memory.read(offset, length);
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': bytes.length });
    res.end(bytes);
  }

  private async memoryHash(url: URL, res: ServerResponse): Promise<void> {
    const { offset, length } = rangeQuery(url, Number.MAX_SAFE_INTEGER);
    json(res, 200, { offset, length, sha256: await this.guest.memory.hash(offset, length) });
  }

  private drive(url: URL): GuestDisk {
    const id = url.searchParams.get('drive') ?? this.guest.rootDriveId;
    const disk = id === undefined ? undefined : this.guest.drives.get(id);
    if (!disk) throw new BadRequest(id === undefined ? 'the VM has no drive' : `no drive ${id}`);
    return disk;
  }

  private async diskWrite(url: URL, body: Buffer, res: ServerResponse): Promise<void> {
    const disk = this.drive(url);
    const w = parseWrite(body);
    if (w.data) await disk.writeAt(w.data, w.offset);
    else {
      for (let at = 0; at < w.length; at += DISK_CHUNK) {
        const n = Math.min(DISK_CHUNK, w.length - at);
        const chunk = Buffer.alloc(n);
        for (let i = 0; i < n; i += w.pattern.length)
          chunk.set(w.pattern.subarray(0, Math.min(w.pattern.length, n - i)), i);
        await disk.writeAt(chunk, w.offset + at);
      }
    }
    res.writeHead(204).end();
  }

  private async diskRead(url: URL, res: ServerResponse): Promise<void> {
    const disk = this.drive(url);
    const { offset, length } = rangeQuery(url, MAX_READ_BYTES);
    const bytes = Buffer.alloc(length);
    await disk.readAt(bytes, offset);
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': bytes.length });
    res.end(bytes);
  }

  private async diskHash(url: URL, res: ServerResponse): Promise<void> {
    const disk = this.drive(url);
    const { offset, length } = rangeQuery(url, Number.MAX_SAFE_INTEGER);
    if (offset + length > disk.size) throw new RangeError(`disk range past the end (${disk.size} bytes)`);
    const hash = createHash('sha256');
    const chunk = Buffer.alloc(Math.min(DISK_CHUNK, Math.max(length, 1)));
    for (let at = 0; at < length; at += chunk.length) {
      const view = chunk.subarray(0, Math.min(chunk.length, length - at));
      await disk.readAt(view, offset + at);
      hash.update(view);
    }
    json(res, 200, { offset, length, sha256: hash.digest('hex') });
  }
}

class BadRequest extends Error {}

function json(res: ServerResponse, status: number, value: unknown): void {
  const text = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

async function readBody(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    total += chunk.length;
    if (total > MAX_BODY_BYTES) throw new BadRequest(`request body over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

function parseStartRead(value: string): Array<{ offset: number; length: number }> {
  return value.split(',').map((part) => {
    const [offset, length] = part.split(':').map(Number);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset! < 0 || length! <= 0)
      throw new BadRequest(`${START_READ_VAR}: "${part}" is not offset:length`);
    return { offset: offset!, length: length! };
  });
}

function parseJsonObject(body: Buffer): Record<string, unknown> {
  if (body.length === 0) return {};
  let value: unknown;
  try {
    value = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new BadRequest(`body is not JSON: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new BadRequest('body must be an object');
  return value as Record<string, unknown>;
}

function nonNegativeInt(value: unknown, name: string): number {
  const n = typeof value === 'string' && value.trim() !== '' ? Number(value) : value;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0)
    throw new BadRequest(`${name} must be a non-negative integer`);
  return n;
}

function rangeQuery(url: URL, max: number): { offset: number; length: number } {
  const offset = nonNegativeInt(url.searchParams.get('offset'), 'offset');
  const length = nonNegativeInt(url.searchParams.get('length'), 'length');
  if (length > max) throw new BadRequest(`length ${length} over the limit of ${max} bytes`);
  return { offset, length };
}

/** `{offset, dataBase64}` or `{offset, length, pattern}` where pattern is hex bytes repeated. */
function parseWrite(
  body: Buffer,
):
  | { offset: number; data: Buffer; length: number }
  | { offset: number; data?: undefined; length: number; pattern: Buffer } {
  const obj = parseJsonObject(body);
  const offset = nonNegativeInt(obj['offset'], 'offset');
  if (typeof obj['dataBase64'] === 'string') {
    const data = Buffer.from(obj['dataBase64'], 'base64');
    return { offset, data, length: data.length };
  }
  if (typeof obj['pattern'] === 'string') {
    const hex = obj['pattern'];
    if (!/^([0-9a-fA-F]{2})+$/.test(hex)) throw new BadRequest('pattern must be hex bytes, e.g. "deadbeef"');
    const length = nonNegativeInt(obj['length'], 'length');
    return { offset, length, pattern: Buffer.from(hex, 'hex') };
  }
  throw new BadRequest('give dataBase64, or pattern and length');
}
