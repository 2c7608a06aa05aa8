import { status, type sendUnaryData, type ServerUnaryCall, type ServiceError } from '@grpc/grpc-js';
import { sandboxLogger, type Logger } from '#logging';
import type {
  DnsListRequest,
  DnsListResponse,
  DnsRecord,
  DnsRemoveResponse,
  DnsServer,
  DnsSetResponse,
} from '#proto/sbx/dns';
import { RecordInvalid, type RecordTable } from './record-table.js';

/** The gRPC edge of the record table: the only place its errors become status codes. */
export function dnsControlService(table: RecordTable, logger: Logger): DnsServer {
  const fail = (err: unknown): Partial<ServiceError> => {
    if (err instanceof RecordInvalid) return { code: status.INVALID_ARGUMENT, details: err.message };
    logger.error({ err }, 'dns control call failed');
    return { code: status.INTERNAL, details: `dns: ${(err as Error).message}` };
  };
  return {
    set(call: ServerUnaryCall<DnsRecord, DnsSetResponse>, callback: sendUnaryData<DnsSetResponse>) {
      const { name, ip } = call.request;
      try {
        const previous = table.get(name);
        const entry = table.set(name, ip);
        sandboxLogger(logger, entry.name).info({ ip, previousIp: previous?.ip }, 'dns record set');
        callback(null, {});
      } catch (err) {
        callback(fail(err), null);
      }
    },
    remove(call: ServerUnaryCall<DnsRecord, DnsRemoveResponse>, callback: sendUnaryData<DnsRemoveResponse>) {
      const { name, ip } = call.request;
      try {
        const current = table.get(name);
        const removed = table.remove(name, ip);
        sandboxLogger(logger, name.toLowerCase()).info(
          { ip, removed, currentIp: current?.ip },
          removed ? 'dns record removed' : 'dns record kept: it no longer points at this ip',
        );
        callback(null, { removed });
      } catch (err) {
        callback(fail(err), null);
      }
    },
    list(_call: ServerUnaryCall<DnsListRequest, DnsListResponse>, callback: sendUnaryData<DnsListResponse>) {
      callback(null, { records: table.list().map(({ name, ip }) => ({ name, ip })) });
    },
  };
}
