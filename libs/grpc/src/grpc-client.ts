import {
  credentials,
  Metadata,
  type CallOptions,
  type Client,
  type ClientOptions,
  type ChannelCredentials,
  type ServiceError,
  status,
} from '@grpc/grpc-js';
import { HealthClient } from '#proto/grpc/health/v1/health';
import { ServingStatus } from './health-service.js';

type ClientConstructor<C> = new (address: string, creds: ChannelCredentials, options?: Partial<ClientOptions>) => C;

/** Dials a service on a Unix socket path (or `host:port`) with our channel defaults. */
export function dial<C extends Client>(Ctor: ClientConstructor<C>, target: string): C {
  const address = target.startsWith('/') ? `unix://${target}` : target;
  return new Ctor(address, credentials.createInsecure(), {
    'grpc.max_receive_message_length': 64 * 1024 * 1024,
    'grpc.max_send_message_length': 64 * 1024 * 1024,
    // Local control sockets: fail fast instead of minutes of reconnect backoff.
    'grpc.initial_reconnect_backoff_ms': 100,
    'grpc.max_reconnect_backoff_ms': 1000,
  });
}

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => unknown;

/**
 * How long a call whose channel is between reconnect attempts waits for it to connect before
 * failing: a little over the channel's longest backoff (dial's 1 s), so a peer that came back
 * is reached and one that is down still fails fast.
 */
const RECONNECT_WAIT_MS = 1500;

/** Calls one unary method as a promise, with a deadline. */
export async function unary<Req, Res>(
  client: Client,
  method: UnaryMethod<Req, Res>,
  request: Req,
  timeoutMs = 30_000,
): Promise<Res> {
  const deadline = Date.now() + timeoutMs;
  const call = () =>
    new Promise<Res>((resolve, reject) => {
      method.call(client, request, new Metadata(), { deadline }, (err, res) => (err ? reject(err) : resolve(res)));
    });
  try {
    return await call();
  } catch (err) {
    if (!neverSent(err)) throw err;
    // The peer was unreachable at the channel's last attempt (a service restarting) and the
    // channel fails calls until its next one. The request never left, so sending it again is
    // safe whatever it does: wait (bounded) for the channel to connect, then send it once more.
    const connected = await new Promise<boolean>((resolve) =>
      client.waitForReady(Math.min(deadline, Date.now() + RECONNECT_WAIT_MS), (e) => resolve(!e)),
    );
    if (!connected) throw err;
    return call();
  }
}

/** An UNAVAILABLE that grpc-js gives before a call reaches any connection. */
function neverSent(err: unknown): boolean {
  const e = err as Partial<ServiceError>;
  return e.code === status.UNAVAILABLE && /^No connection established/.test(e.details ?? '');
}

/** Polls grpc.health.v1 Check until `service` is SERVING or the timeout passes. */
export async function waitForServing(target: string, timeoutMs = 10_000, service = ''): Promise<void> {
  const client = dial(HealthClient, target);
  const deadline = Date.now() + timeoutMs;
  let lastError = 'no answer';
  try {
    while (Date.now() < deadline) {
      try {
        const res = await unary(client, client.check, { service }, Math.max(100, deadline - Date.now()));
        if (res.status === ServingStatus.SERVING) return;
        lastError = `status ${ServingStatus[res.status]}`;
      } catch (err) {
        lastError = (err as Error).message;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  } finally {
    client.close();
  }
  throw new Error(`${target} not serving after ${timeoutMs} ms: ${lastError}`);
}
