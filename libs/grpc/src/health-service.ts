import { status as GrpcStatus, type ServerWritableStream } from '@grpc/grpc-js';
import {
  HealthCheckResponse_ServingStatus as ServingStatus,
  type HealthCheckRequest,
  type HealthCheckResponse,
  type HealthServer,
} from '#proto/grpc/health/v1/health';

export { ServingStatus };

/**
 * grpc.health.v1 for one process. The empty service name is the process as a whole;
 * each served service is registered under its full name too.
 */
export class HealthService {
  private readonly statuses = new Map<string, ServingStatus>();
  private readonly watchers = new Set<{
    service: string;
    stream: ServerWritableStream<HealthCheckRequest, HealthCheckResponse>;
  }>();

  set(service: string, status: ServingStatus): void {
    if (this.statuses.get(service) === status) return;
    this.statuses.set(service, status);
    for (const watcher of this.watchers) {
      if (watcher.service === service) watcher.stream.write({ status });
    }
  }

  /** Marks every known service, and the process, as `status` (NOT_SERVING on shutdown). */
  setAll(status: ServingStatus): void {
    for (const service of [...this.statuses.keys(), '']) this.set(service, status);
  }

  get(service: string): ServingStatus | undefined {
    return this.statuses.get(service);
  }

  /** Ends every Watch stream, so a graceful shutdown is not held open by watchers. */
  endWatches(): void {
    for (const watcher of this.watchers) watcher.stream.end();
    this.watchers.clear();
  }

  readonly implementation: HealthServer = {
    check: (call, callback) => {
      const status = this.statuses.get(call.request.service);
      if (status === undefined) {
        callback({ code: GrpcStatus.NOT_FOUND, details: `unknown service "${call.request.service}"` });
        return;
      }
      callback(null, { status });
    },
    list: (_call, callback) => {
      const statuses: Record<string, HealthCheckResponse> = {};
      for (const [service, status] of this.statuses) statuses[service] = { status };
      callback(null, { statuses });
    },
    watch: (call) => {
      const service = call.request.service;
      const watcher = { service, stream: call };
      this.watchers.add(watcher);
      call.write({ status: this.statuses.get(service) ?? ServingStatus.SERVICE_UNKNOWN });
      call.on('cancelled', () => this.watchers.delete(watcher));
      call.on('close', () => this.watchers.delete(watcher));
    },
  };
}
