import { chmod, lstat, mkdir, unlink } from 'node:fs/promises';
import { connect } from 'node:net';
import { dirname } from 'node:path';
import { Server, ServerCredentials, type ServiceDefinition, type UntypedServiceImplementation } from '@grpc/grpc-js';
import type { Logger } from '#logging';
import { HealthService as HealthServiceDefinition } from '#proto/grpc/health/v1/health';
import { HealthService, ServingStatus } from './health-service.js';

export interface ServedService {
  /** Full name, e.g. `sbx.v1.Dns`, under which health reports it. */
  name: string;
  definition: ServiceDefinition;
  implementation: UntypedServiceImplementation;
}

export interface GrpcServerOptions {
  /** `unix:///path/to.sock` or `host:port`. */
  address: string;
  services: ServedService[];
  logger: Logger;
  /** Unix socket permissions: 0600 (owner only) or 0660 (owner and group). */
  socketMode?: 0o600 | 0o660;
  /** Largest message accepted, bytes. */
  maxMessageBytes?: number;
}

export interface GrpcServerHandle {
  readonly health: HealthService;
  /** The bound address: the socket path, or `host:port` with the real port. */
  readonly address: string;
  readonly port: number | undefined;
  /** Stops accepting, lets running calls finish for up to `graceMs`, then cancels them. */
  shutdown(graceMs?: number): Promise<void>;
}

/** Raised when a control socket path is taken by a live server or is not a socket. */
export class SocketInUse extends Error {
  readonly code = 'SOCKET_IN_USE';
  constructor(
    readonly path: string,
    reason: string,
  ) {
    super(`cannot listen on ${path}: ${reason}`);
    this.name = 'SocketInUse';
  }
}

/**
 * Serves gRPC services plus grpc.health.v1 on a Unix socket (mode 0600/0660, never
 * world-writable) or TCP. A stale socket left by a crashed run is replaced; a live one is not.
 */
export async function startGrpcServer(options: GrpcServerOptions): Promise<GrpcServerHandle> {
  const maxBytes = options.maxMessageBytes ?? 64 * 1024 * 1024;
  const server = new Server({
    'grpc.max_receive_message_length': maxBytes,
    'grpc.max_send_message_length': maxBytes,
  });
  const health = new HealthService();
  server.addService(HealthServiceDefinition, health.implementation);
  for (const service of options.services) server.addService(service.definition, service.implementation);

  const socketPath = unixPath(options.address);
  if (socketPath) await prepareSocketPath(socketPath);

  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(options.address, ServerCredentials.createInsecure(), (err, boundPort) =>
      err ? reject(err) : resolve(boundPort),
    );
  });
  if (socketPath) await chmod(socketPath, options.socketMode ?? 0o600);

  health.set('', ServingStatus.SERVING);
  for (const service of options.services) health.set(service.name, ServingStatus.SERVING);
  const address = socketPath ?? options.address.replace(/:0$/, `:${port}`);
  options.logger.info({ address, services: options.services.map((s) => s.name) }, 'grpc serving');

  let stopping: Promise<void> | undefined;
  return {
    health,
    address,
    port: socketPath ? undefined : port,
    shutdown(graceMs = 5000) {
      stopping ??= (async () => {
        health.setAll(ServingStatus.NOT_SERVING);
        health.endWatches();
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => {
            server.forceShutdown();
            resolve();
          }, graceMs);
          server.tryShutdown(() => {
            clearTimeout(timer);
            resolve();
          });
        });
        if (socketPath) await unlink(socketPath).catch(() => undefined);
        options.logger.info({ address }, 'grpc stopped');
      })();
      return stopping;
    },
  };
}

function unixPath(address: string): string | undefined {
  if (address.startsWith('unix://')) return address.slice('unix://'.length);
  if (address.startsWith('unix:')) return address.slice('unix:'.length);
  return undefined;
}

async function prepareSocketPath(path: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o750 });
  const existing = await lstat(path).catch(() => undefined);
  if (!existing) return;
  if (!existing.isSocket()) throw new SocketInUse(path, 'path exists and is not a socket');
  if (await isListening(path)) throw new SocketInUse(path, 'another process is serving on it');
  await unlink(path);
}

/** Whether something accepts connections on the Unix socket `path` (a stale socket file does not). */
export function isListening(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(path);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}
