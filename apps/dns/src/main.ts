import { serviceMain } from '#service-kit';
import { dnsConfigSchema } from './dns-config.js';
import { startDns } from './dns-service.js';

export function main(argv: string[]): Promise<number> {
  return serviceMain('dns', argv, [
    {
      name: 'serve',
      about: `Authoritative DNS for sandbox names: an A query for {sandboxId} or {sandboxId}-{anything}
(any letter case, optionally under --zone) answers the sandbox's host IP with TTL 0.
Serves until SIGTERM or SIGINT.`,
      schema: dnsConfigSchema,
      run: startDns,
    },
  ]);
}
