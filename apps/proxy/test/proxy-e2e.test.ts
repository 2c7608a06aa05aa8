/**
 * The ingress proxy end to end: a whole node (every service a real process in a throwaway
 * namespace), the proxy process, real clients (curl over HTTP/1.1 and h2c, a Python WebSocket
 * client) and real servers inside the sandboxes' guest networks.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import type { SandboxConfig } from '#proto/orchestrator';
import { eventually } from '#test-kit';
import { NodeDriver } from '../../orchestrator/test/node-driver.js';
import { missingPieces } from '../../orchestrator/test/node-under-test.js';
import { H2C_PORT, HTTP_PORT, pattern, ProxyNode, sha256, WS_PORT } from './proxy-node.js';

const missing = missingPieces() ?? (process.getuid?.() !== 0 ? 'root' : undefined);
if (missing) console.warn(`proxy e2e skipped: ${missing}`);

interface Info {
  method: string;
  url: string;
  httpVersion: string;
  headers: Record<string, string>;
}

/** The sum of every sample of metric `name` (any labels) in a Prometheus text page. */
function metricSum(text: string, name: string, labels = ''): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name) || !/^[a-z_]+(\{[^}]*\})? /.test(line)) continue;
    const [series, value] = [line.slice(0, line.lastIndexOf(' ')), line.slice(line.lastIndexOf(' ') + 1)];
    if (series.split('{')[0] === name && series.includes(labels)) sum += Number(value);
  }
  return sum;
}

// Every check runs on both data paths: the C relay with Node handoffs (the default), and Node alone.
describe.skipIf(missing !== undefined).each(['native', 'node'] as const)(
  'ingress proxy through a whole node (%s data path)',
  (dataPath) => {
    let px: ProxyNode;
    let driver: NodeDriver;
    let work: string;
    const url = (port: number, id: string, path: string) => `http://${port}-${id}.sbx.test${path}`;
    const native = dataPath === 'native';
    const metrics = () => px.node.inNode('curl', ['-s', 'http://127.0.0.1:9465/metrics']);
    /** Connections the relay gave back to the Node path so far (0 on the Node path). */
    const handoffs = async () => metricSum(await metrics(), 'sbx_proxy_native_handoffs_total');

    beforeAll(async () => {
      px = await ProxyNode.start(native ? 'pxn' : 'pxj', ['--data-path', dataPath]);
      expect(px.proxyLogs.join('\n')).toContain(`data path ${dataPath}`);
      // No Redis here: NodeDriver's event reads are not used.
      driver = new NodeDriver(px.node, undefined as never);
      work = await mkdtemp(join(tmpdir(), 'proxy-e2e-'));
      await driver.create('web');
      await px.startGuestServers('web');
    }, 240_000);

    afterAll(async () => {
      await px?.stop();
      if (work) await rm(work, { recursive: true, force: true });
    }, 120_000);

    async function json<T>(args: string[]): Promise<{ status: number; body: T }> {
      const out = await px.curl([...args, '-w', '\n%{http_code}']);
      const cut = out.stdout.lastIndexOf('\n');
      const text = out.stdout.slice(0, cut);
      return { status: Number(out.stdout.slice(cut + 1)), body: (text ? JSON.parse(text) : undefined) as T };
    }

    it('forwards HTTP/1.1 by Host, keeps the client connection alive, and by the header pair', async () => {
      const out = await px.curl(['-v', url(HTTP_PORT, 'web', '/info'), url(HTTP_PORT, 'web', '/info?second')]);
      expect(out.code, out.stderr).toBe(0);
      const [first, second] = out.stdout.split('}{').map((s, i) => JSON.parse(i === 0 ? s + '}' : '{' + s) as Info);
      expect(first!.headers['host']).toBe('8080-web.sbx.test');
      expect(first!.httpVersion).toBe('1.1');
      expect(second!.url).toBe('/info?second');
      // curl says when it sends the second request on the first connection.
      expect(out.stderr).toMatch(/Re-using existing connection/);

      const byHeader = await json<Info>([
        '-H',
        'e2b-sandbox-id: web',
        '-H',
        `e2b-sandbox-port: ${HTTP_PORT}`,
        'http://anything.example/info',
      ]);
      expect(byHeader.status).toBe(200);
      expect(byHeader.body.headers['host']).toBe('anything.example');
      expect(byHeader.body.headers['e2b-sandbox-id']).toBeUndefined();
    });

    it('speaks h2c with a client that asks for it (prior knowledge), end to end', async () => {
      const out = await px.curl(['--http2-prior-knowledge', '-w', '\n%{http_version}', url(H2C_PORT, 'web', '/info')]);
      expect(out.code, out.stderr).toBe(0);
      const cut = out.stdout.lastIndexOf('\n');
      expect(out.stdout.slice(cut + 1)).toBe('2');
      const info = JSON.parse(out.stdout.slice(0, cut)) as Info;
      expect(info.httpVersion).toBe('2.0');
      expect(info.headers[':authority']).toBe('8081-web.sbx.test');
    });

    it("reaches envd's /health as 49983-{id}", async () => {
      const out = await px.curl(['-o', '/dev/null', '-w', '%{http_code}', url(49983, 'web', '/health')]);
      expect(out.stdout).toBe('204');
    });

    it('streams a large download and upload byte for byte (HTTP/1.1 and h2c)', async () => {
      const size = 48 * 1024 * 1024;
      const expected = sha256(pattern(0, size));
      for (const [port, extra] of [
        [HTTP_PORT, []],
        [H2C_PORT, ['--http2-prior-knowledge']],
      ] as const) {
        const down = await px.curlRaw([...extra, url(port, 'web', `/download?bytes=${size}`)]);
        expect(down.code, down.stderr).toBe(0);
        expect(down.stdout.length).toBe(size);
        expect(sha256(down.stdout)).toBe(expected);
      }
      const upload = randomBytes(40 * 1024 * 1024);
      const file = join(work, 'upload.bin');
      await writeFile(file, upload);
      for (const extra of [[], ['--http2-prior-knowledge']]) {
        const port = extra.length ? H2C_PORT : HTTP_PORT;
        const up = await json<{ bytes: number; sha256: string }>([
          ...extra,
          '--data-binary',
          `@${file}`,
          '-H',
          'content-type: application/octet-stream',
          url(port, 'web', '/upload'),
        ]);
        expect(up.status).toBe(200);
        expect(up.body).toEqual({ bytes: upload.length, sha256: sha256(upload) });
      }
    });

    it('carries a WebSocket through: 10 000 messages echoed by a server in the guest', async () => {
      const out = await px.webSocketEcho(`ws://${WS_PORT}-web.sbx.test/echo`, 10_000);
      expect(out.stderr).toBe('');
      expect(out.stdout.trim()).toBe('ok 10000');
    });

    it('answers readable errors: bad Host 400, unknown sandbox 404, closed port 502', async () => {
      const bad = await json<Record<string, unknown>>(['http://no-port-here.sbx.test/']);
      expect(bad.status).toBe(400);
      expect(bad.body['code']).toBe('BAD_ROUTE');
      const badPort = await json<Record<string, unknown>>(['http://99999-web.sbx.test/']);
      expect(badPort.status).toBe(400);

      const unknown = await json<Record<string, unknown>>([url(8080, 'nosuchsandbox', '/')]);
      expect(unknown.status).toBe(404);
      expect(unknown.body).toMatchObject({ code: 'SANDBOX_NOT_FOUND', sandboxId: 'nosuchsandbox', port: 8080 });

      const closed = await json<Record<string, unknown>>([url(8099, 'web', '/')]);
      expect(closed.status).toBe(502);
      expect(closed.body).toMatchObject({ code: 'PORT_CLOSED', sandboxId: 'web', port: 8099 });

      // The same answers over h2c.
      const h2 = await json<Record<string, unknown>>(['--http2-prior-knowledge', url(8080, 'nosuchsandbox', '/')]);
      expect(h2.status).toBe(404);
    });

    it('requires the traffic access token and shows the guest the masked Host', async () => {
      const token = `tok-${randomUUID()}`;
      const ingress: Partial<SandboxConfig> = {
        network: { ingress: { trafficAccessToken: token, maskRequestHost: 'app.internal:3000' } },
      };
      await driver.create('locked', ingress);
      await px.startGuestServers('locked');
      const target = url(HTTP_PORT, 'locked', '/info');

      const handedBefore = await handoffs();
      const none = await json<Record<string, unknown>>([target]);
      expect(none.status).toBe(403);
      expect(none.body).toMatchObject({ code: 'ACCESS_DENIED', sandboxId: 'locked', port: HTTP_PORT });
      const wrong = await json<Record<string, unknown>>(['-H', `e2b-traffic-access-token: ${token}x`, target]);
      expect(wrong.status).toBe(403);
      // The relay refuses neither itself: it gives both connections to the Node path, which answers 403.
      if (native) expect(await handoffs()).toBeGreaterThanOrEqual(handedBefore + 2);
      const ws = await px.webSocketEcho(`ws://${WS_PORT}-locked.sbx.test/`, 1);
      expect(ws.code).not.toBe(0);
      expect(ws.stderr).toMatch(/403/);

      const ok = await json<Info>(['-H', `e2b-traffic-access-token: ${token}`, target]);
      expect(ok.status).toBe(200);
      expect(ok.body.headers['host']).toBe('app.internal:3000');
      expect(ok.body.headers['x-forwarded-host']).toBe('8080-locked.sbx.test');
      expect(ok.body.headers['e2b-traffic-access-token']).toBeUndefined();
      const h2 = await json<Info>([
        '--http2-prior-knowledge',
        '-H',
        `e2b-traffic-access-token: ${token}`,
        url(H2C_PORT, 'locked', '/info'),
      ]);
      expect(h2.body.headers[':authority']).toBe('app.internal:3000');
      // A keep-alive stream of requests, each reaching the guest with the head it must see; on the
      // native path every one is carried by the relay (none handed back).
      const page = await metrics();
      const [carriedBefore, handedBeforeStream] = [
        metricSum(page, 'sbx_proxy_native_requests_total'),
        metricSum(page, 'sbx_proxy_native_handoffs_total'),
      ];
      const stream = await px.curl([
        '-v',
        '-H',
        `e2b-traffic-access-token: ${token}`,
        ...Array.from({ length: 30 }, (_, i) => url(HTTP_PORT, 'locked', `/info?n=${i}`)),
      ]);
      expect(stream.code, stream.stderr).toBe(0);
      const infos = stream.stdout.split('}{').map((t, i, all) => {
        const text = (i === 0 ? '' : '{') + t + (i === all.length - 1 ? '' : '}');
        return JSON.parse(text) as Info;
      });
      expect(infos.map((i) => i.url)).toEqual(Array.from({ length: 30 }, (_, i) => `/info?n=${i}`));
      for (const info of infos) {
        expect(info.headers['host']).toBe('app.internal:3000');
        expect(info.headers['x-forwarded-host']).toBe('8080-locked.sbx.test');
        expect(info.headers['e2b-traffic-access-token']).toBeUndefined();
      }
      expect(stream.stderr.match(/Re-using existing connection/g)?.length).toBe(29);
      if (native) {
        const after = await metrics();
        expect(metricSum(after, 'sbx_proxy_native_requests_total')).toBeGreaterThanOrEqual(carriedBefore + 30);
        expect(metricSum(after, 'sbx_proxy_native_handoffs_total')).toBe(handedBeforeStream);
      }
      // The token never reaches a log line.
      expect(px.proxyLogs.join('\n')).not.toContain(token);
      expect(px.node.logs('orchestrator').join('\n')).not.toContain(token);
    });

    it('resumes a paused sandbox on the first requests (one resume for all), memory and disk unchanged', async () => {
      await driver.create('sleepy', { autoResume: { policy: 'any' } });
      await driver.create('stays', { autoResume: { policy: 'off' } });
      const ip = (await px.node.footprint())['dns']!.find((r) => r.startsWith('sleepy='))!.split('=')[1]!;
      const mem = randomBytes(256 * 1024);
      const disk = randomBytes(128 * 1024);
      await px.node.writeMemory(ip, 1 << 20, mem);
      await px.node.writeDisk(ip, 1 << 20, disk);
      await driver.pause('sleepy', randomUUID());
      await driver.pause('stays', randomUUID());
      expect(await driver.listIds()).not.toContain('sleepy');

      const off = await json<Record<string, unknown>>([url(49983, 'stays', '/health')]);
      expect(off.status).toBe(409);
      expect(off.body).toMatchObject({ code: 'SANDBOX_NOT_RUNNING', sandboxId: 'stays' });

      const handedBefore = await handoffs();
      const health = await Promise.all(
        Array.from({ length: 6 }, () =>
          px.curl(['-o', '/dev/null', '-w', '%{http_code}', url(49983, 'sleepy', '/health')]),
        ),
      );
      expect(health.map((h) => h.stdout)).toEqual(Array(6).fill('204'));
      expect(await driver.listIds()).toContain('sleepy');
      const resumes = px.node.logs('orchestrator').filter((l) => l.includes('resuming on request'));
      expect(resumes.length).toBe(1);
      // The relay had no route for the paused sandbox: each connection went to the Node path.
      if (native) expect(await handoffs()).toBeGreaterThanOrEqual(handedBefore + 6);

      // Read back through the proxy itself: the guest's memory and disk as they were.
      const memBack = await px.curlRaw([
        url(49983, 'sleepy', `/_test/memory/read?offset=${1 << 20}&length=${mem.length}`),
      ]);
      expect(sha256(memBack.stdout)).toBe(sha256(mem));
      const diskBack = await px.curlRaw([
        url(49983, 'sleepy', `/_test/disk/read?offset=${1 << 20}&length=${disk.length}`),
      ]);
      expect(sha256(diskBack.stdout)).toBe(sha256(disk));
    });

    it('restarting the proxy drops in-flight connections, serves new ones at once, leaves sandboxes alone', async () => {
      const before = { ids: await driver.listIds(), vmms: await px.node.vmmPids() };
      const inFlight = await px.curlInFlight(['-o', '/dev/null', url(HTTP_PORT, 'web', '/drip?ms=50&bytes=67108864')]);
      await eventually(
        async () => {
          const metrics = await px.node.inNode('curl', ['-s', 'http://127.0.0.1:9465/metrics']);
          // On the native path the relay holds it.
          const held = native
            ? /^sbx_proxy_native_client_connections(\{[^}]*\})? [1-9]/m
            : /^sbx_proxy_client_connections\{[^}]*protocol="http1"[^}]*\} [1-9]/m;
          return held.test(metrics);
        },
        { what: 'the download in flight through the proxy' },
      );
      expect(await px.stopProxy('SIGTERM')).toBe(0);
      const code = await inFlight.exited;
      expect(code).not.toBe(0); // curl: transfer closed with bytes remaining
      await px.startProxy();
      const after = await px.curl(['-o', '/dev/null', '-w', '%{http_code}', url(HTTP_PORT, 'web', '/info')]);
      expect(after.stdout).toBe('200');
      expect(await driver.listIds()).toEqual(before.ids);
      expect(await px.node.vmmPids()).toEqual(before.vmms);
    });

    it('restarting the orchestrator keeps proxied connections flowing, and the routes come back', async () => {
      const size = 24 * 1024 * 1024;
      const file = join(work, 'through-restart.bin');
      // About 6 s of data at 64 KiB / 16 ms: the orchestrator is killed and started meanwhile.
      const download = await px.curlInFlight(['-o', file, url(HTTP_PORT, 'web', `/drip?ms=16&bytes=${size}`)]);
      const ws = px.webSocketEcho(`ws://${WS_PORT}-web.sbx.test/`, 5000);
      const opened = px.proxyLogs.filter((l) => l.includes('route table received')).length;
      await px.node.killOrchestrator();
      await px.node.startOrchestrator();
      expect(await download.exited).toBe(0);
      const got = await readFile(file);
      expect(got.length).toBe(size);
      expect(sha256(got)).toBe(sha256(pattern(0, size)));
      expect((await ws).stdout.trim()).toBe('ok 5000');
      await eventually(() => px.proxyLogs.filter((l) => l.includes('route table received')).length > opened, {
        what: 'the route watch reopened',
      });
      // A delete reaches the proxy through the new watch at once: no new connection to it.
      await unary(px.node.client, px.node.client.delete, { sandboxId: 'locked' }, 60_000);
      const gone = await json<Record<string, unknown>>([url(HTTP_PORT, 'locked', '/info')]);
      expect(gone.status).toBe(404);
    });
  },
);
