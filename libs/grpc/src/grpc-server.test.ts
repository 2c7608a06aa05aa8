import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { HealthClient } from '#proto/grpc/health/v1/health';
import { dial, ServingStatus, startGrpcServer, unary, waitForServing, SocketInUse } from '#grpc';
import { eventually } from '#test-kit';

const logger = createLogger({ service: 'test', level: 'silent' });
const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

async function tempSocket(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'grpc-test-'));
  dirs.push(dir);
  return join(dir, 'control.sock');
}

describe('gRPC over a Unix socket', () => {
  it('answers health checks, uses mode 0600 and removes the socket on shutdown', async () => {
    const path = await tempSocket();
    const server = await startGrpcServer({ address: `unix://${path}`, services: [], logger });
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    await waitForServing(path, 2000);
    const client = dial(HealthClient, path);
    const res = await unary(client, client.check, { service: '' });
    expect(res.status).toBe(ServingStatus.SERVING);
    await expect(unary(client, client.check, { service: 'no.such.Service' })).rejects.toThrow(/unknown service/);
    client.close();
    await server.shutdown(1000);
    await expect(stat(path)).rejects.toThrow(/ENOENT/);
  });

  it('a call made just after the server came back is served, not failed while the channel waits to reconnect', async () => {
    const path = await tempSocket();
    let server = await startGrpcServer({ address: `unix://${path}`, services: [], logger });
    const client = dial(HealthClient, path);
    try {
      expect((await unary(client, client.check, { service: '' })).status).toBe(ServingStatus.SERVING);
      await server.shutdown(1000);
      // The peer is down (a service restarting): this call fails and the channel starts its
      // reconnect backoff.
      await expect(unary(client, client.check, { service: '' }, 2000)).rejects.toThrow(/UNAVAILABLE/);
      server = await startGrpcServer({ address: `unix://${path}`, services: [], logger });
      // Back before the channel's next attempt: the request never left, so it is sent once the
      // channel connects (a pause right after a uffd-server restart failed here and lost its sandbox).
      expect((await unary(client, client.check, { service: '' })).status).toBe(ServingStatus.SERVING);
    } finally {
      client.close();
      await server.shutdown(1000);
    }
  });

  it('replaces a stale socket but refuses one a live server holds', async () => {
    const path = await tempSocket();
    const first = await startGrpcServer({ address: `unix://${path}`, services: [], logger, socketMode: 0o660 });
    expect((await stat(path)).mode & 0o777).toBe(0o660);
    await expect(startGrpcServer({ address: `unix://${path}`, services: [], logger })).rejects.toBeInstanceOf(
      SocketInUse,
    );
    await first.shutdown(1000);
    const second = await startGrpcServer({ address: `unix://${path}`, services: [], logger });
    await waitForServing(path, 2000);
    await second.shutdown(1000);
  });

  it('reports NOT_SERVING to watchers when shutting down', async () => {
    const path = await tempSocket();
    const server = await startGrpcServer({ address: `unix://${path}`, services: [], logger });
    const client = dial(HealthClient, path);
    const seen: ServingStatus[] = [];
    const stream = client.watch({ service: '' });
    const ended = new Promise<void>((resolve) => {
      stream.on('data', (m: { status: ServingStatus }) => seen.push(m.status));
      stream.on('end', () => resolve());
      stream.on('error', () => resolve());
    });
    await eventually(() => seen.length > 0, { what: 'the first health status' });
    await server.shutdown(1000);
    await ended;
    client.close();
    expect(seen[0]).toBe(ServingStatus.SERVING);
    expect(seen).toContain(ServingStatus.NOT_SERVING);
  });
});
