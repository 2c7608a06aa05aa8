import { sandboxLogger, type Logger } from '#logging';
import type { DnsServer } from '#proto/sbx/dns';
import { unaryHandlers } from '#service-kit';
import type { RecordTable } from './record-table.js';

/** The gRPC edge of the record table; its errors become status codes in the kit's one table. */
export function dnsControlService(table: RecordTable, logger: Logger): DnsServer {
  const handle = unaryHandlers({ logger });
  return {
    set: handle('set record', ({ name, ip }) => {
      const previous = table.get(name);
      const entry = table.set(name, ip);
      sandboxLogger(logger, entry.name).info({ ip, previousIp: previous?.ip }, 'dns record set');
      return {};
    }),
    remove: handle('remove record', ({ name, ip }) => {
      const current = table.get(name);
      const removed = table.remove(name, ip);
      sandboxLogger(logger, name.toLowerCase()).info(
        { ip, removed, currentIp: current?.ip },
        removed ? 'dns record removed' : 'dns record kept: it no longer points at this ip',
      );
      return { removed };
    }),
    list: handle('list records', () => ({ records: table.list().map(({ name, ip }) => ({ name, ip })) })),
  };
}
