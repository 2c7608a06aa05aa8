import { status, type sendUnaryData, type ServerUnaryCall } from '@grpc/grpc-js';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { dial, startGrpcServer, type GrpcServerHandle } from '#grpc';
import { createLogger } from '#logging';
import {
  RouteState,
  RoutingClient,
  RoutingService,
  type ResumeRouteRequest,
  type SandboxRoute,
} from '#proto/sbx/routing';
import { AccessDenied, ResumeFailed, SandboxNotRunning, SandboxUnknown, UpstreamTimeout } from './proxy-errors.js';
import { RouteResolver } from './route-resolver.js';
import { RouteTable } from './route-table.js';

/*
 * The resolver against a real gRPC server on a Unix socket that serves sbx.v1.Routing the way
 * the orchestrator does: a DOUBLE of the orchestrator's Routing service with a scripted answer
 * per sandbox (the real one is exercised end to end in test/proxy-e2e.test.ts).
 */

const logger = createLogger({ service: 'test', level: 'silent' });
let dir: string;
let server: GrpcServerHandle;
let client: RoutingClient;
let table: RouteTable;
let calls: ResumeRouteRequest[];
let answer: (req: ResumeRouteRequest) => Promise<SandboxRoute | { code: status; details: string }>;

const route = (id: string, state: RouteState, extra: Partial<SandboxRoute> = {}): SandboxRoute => ({
  sandboxId: id,
  state,
  hostIp: state === RouteState.ROUTE_STATE_RUNNING ? '10.11.0.7' : '',
  autoResumePolicy: '',
  ...extra,
});

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'route-resolver-'));
  calls = [];
  answer = async () => ({ code: status.NOT_FOUND, details: 'not found' });
  server = await startGrpcServer({
    address: `unix://${join(dir, 'orch.sock')}`,
    services: [
      {
        name: 'sbx.v1.Routing',
        definition: RoutingService,
        implementation: {
          watch: () => undefined,
          resume: (call: ServerUnaryCall<ResumeRouteRequest, SandboxRoute>, cb: sendUnaryData<SandboxRoute>) => {
            calls.push(call.request);
            void answer(call.request).then((a) => ('code' in a ? cb(a, null) : cb(null, a)));
          },
        },
      },
    ],
    logger,
  });
  client = dial(RoutingClient, join(dir, 'orch.sock'));
  table = new RouteTable();
});

afterEach(async () => {
  client.close();
  await server.shutdown(1000);
  await rm(dir, { recursive: true, force: true });
});

const resolver = (resumeTimeoutMs = 5000) => new RouteResolver({ table, routing: client, resumeTimeoutMs, logger });
const target = (sandboxId: string) => ({ sandboxId, port: 8080 });

describe('RouteResolver', () => {
  it('answers a running sandbox from the table without asking the orchestrator', async () => {
    table.upsert(route('a', RouteState.ROUTE_STATE_RUNNING));
    expect((await resolver().resolve(target('a'), undefined)).hostIp).toBe('10.11.0.7');
    expect(calls).toEqual([]);
  });

  it('checks the token before anything else, a paused sandbox included (no resume without it)', async () => {
    table.upsert(route('p', RouteState.ROUTE_STATE_PAUSED, { trafficAccessToken: 'tok', autoResumePolicy: 'any' }));
    await expect(resolver().resolve(target('p'), undefined)).rejects.toThrow(AccessDenied);
    await expect(resolver().resolve(target('p'), 'nope')).rejects.toThrow(/wrong e2b-traffic-access-token/);
    expect(calls).toEqual([]);
  });

  it('refuses a paused sandbox whose policy is not any, without asking', async () => {
    table.upsert(route('off', RouteState.ROUTE_STATE_PAUSED, { autoResumePolicy: 'off' }));
    await expect(resolver().resolve(target('off'), undefined)).rejects.toThrow(SandboxNotRunning);
    expect(calls).toEqual([]);
  });

  it('resumes a paused sandbox once for concurrent requests, and remembers the running route', async () => {
    table.upsert(route('r', RouteState.ROUTE_STATE_PAUSED, { autoResumePolicy: 'any' }));
    answer = async (req) => {
      await new Promise((r) => setTimeout(r, 50));
      return route(req.sandboxId, RouteState.ROUTE_STATE_RUNNING);
    };
    const r = resolver();
    const all = await Promise.all([1, 2, 3, 4].map(() => r.resolve(target('r'), undefined)));
    expect(all.map((x) => x.hostIp)).toEqual(Array(4).fill('10.11.0.7'));
    expect(calls).toEqual([{ sandboxId: 'r', allowResume: true }]);
    expect(table.get('r')?.state).toBe(RouteState.ROUTE_STATE_RUNNING);
  });

  it('asks about an id it does not know without allowing a resume, and checks the token on the answer', async () => {
    answer = async (req) => route(req.sandboxId, RouteState.ROUTE_STATE_RUNNING, { trafficAccessToken: 't' });
    await expect(resolver().resolve(target('fresh'), undefined)).rejects.toThrow(AccessDenied);
    expect(calls).toEqual([{ sandboxId: 'fresh', allowResume: false }]);
    expect((await resolver().resolve(target('fresh'), 't')).hostIp).toBe('10.11.0.7');
  });

  it('translates the orchestrator answers into the errors a person reads', async () => {
    const cases: [status, new (...args: never[]) => Error][] = [
      [status.NOT_FOUND, SandboxUnknown],
      [status.FAILED_PRECONDITION, SandboxNotRunning],
      [status.INTERNAL, ResumeFailed],
    ];
    for (const [code, type] of cases) {
      table.upsert(route('x', RouteState.ROUTE_STATE_PAUSED, { autoResumePolicy: 'any' }));
      answer = async () => ({ code, details: 'scripted' });
      await expect(resolver().resolve(target('x'), undefined)).rejects.toThrow(type);
    }
    answer = () => new Promise(() => undefined);
    await expect(resolver(200).resolve(target('x'), undefined)).rejects.toThrow(UpstreamTimeout);
  });

  it('with the orchestrator away: an unknown id is 404, a paused one cannot be resumed (503)', async () => {
    await server.shutdown(1000);
    await expect(resolver().resolve(target('ghost'), undefined)).rejects.toThrow(SandboxUnknown);
    table.upsert(route('p2', RouteState.ROUTE_STATE_PAUSED, { autoResumePolicy: 'any' }));
    await expect(resolver().resolve(target('p2'), undefined)).rejects.toThrow(/orchestrator unavailable/);
  });
});
