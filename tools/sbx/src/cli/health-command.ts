import { parseArgs } from 'node:util';
import { dial, ServingStatus, unary } from '#grpc';
import { HealthClient } from '#proto/grpc/health/v1/health';

const usage = `usage: ./sbx health <socket path | host:port> [--service <name>] [--timeout-ms 2000]

One grpc.health.v1 Check, as a Consul or Nomad script check runs it: exits 0 when the
service answers SERVING, 2 otherwise (not serving, no answer, unknown service), printing why.`;

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: {
      service: { type: 'string', default: '' },
      'timeout-ms': { type: 'string', default: '2000' },
      help: { type: 'boolean', default: false },
    },
    allowPositionals: true,
    strict: true,
  });
  const target = positionals[0];
  if (values.help || !target) {
    console.log(usage);
    return values.help ? 0 : 2;
  }
  const client = dial(HealthClient, target);
  try {
    const res = await unary(client, client.check, { service: values.service }, Number(values['timeout-ms']));
    const status = ServingStatus[res.status] ?? String(res.status);
    console.log(`${target}: ${status}`);
    return res.status === ServingStatus.SERVING ? 0 : 2;
  } catch (err) {
    console.log(`${target}: no healthy answer: ${(err as Error).message}`);
    return 2;
  } finally {
    client.close();
  }
}
