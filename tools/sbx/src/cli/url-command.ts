import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { defaultDataDir, readNodeRecord } from './node-target.js';

const USAGE = `usage: ./sbx url <sandboxId> <port> [--data-dir <dir>] [--domain <domain>] [--proxy-port <port>]

Prints the URL that reaches <port> of the sandbox through this node's ingress proxy:
http://{port}-{sandboxId}.{domain}:{proxy port}. Domain and proxy port come from the local
node (./sbx node up) unless given.`;

export async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        'data-dir': { type: 'string' },
        domain: { type: 'string' },
        'proxy-port': { type: 'string' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (err) {
    console.error(`url: ${(err as Error).message}\n\n${USAGE}`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const [sandboxId, portText] = positionals;
  if (!sandboxId || !portText || positionals.length > 2) {
    console.error(USAGE);
    return 2;
  }
  if (!/^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$/.test(sandboxId)) {
    console.error(`url: ${JSON.stringify(sandboxId)} is not a sandbox id (letters, digits, - and _; at most 63)`);
    return 2;
  }
  const port = Number(portText);
  if (!/^\d+$/.test(portText) || port < 1 || port > 65535) {
    console.error(`url: port must be 1–65535, got ${JSON.stringify(portText)}`);
    return 2;
  }
  let domain = values.domain;
  let proxyPort = values['proxy-port'] !== undefined ? Number(values['proxy-port']) : undefined;
  if (domain === undefined || proxyPort === undefined) {
    try {
      const record = await readNodeRecord(resolve(values['data-dir'] ?? defaultDataDir()));
      domain ??= record.proxy?.domain ?? 'localhost';
      proxyPort ??= record.proxy?.port ?? 5007;
    } catch (err) {
      console.error(`url: ${(err as Error).message} (or pass --domain and --proxy-port)`);
      return 1;
    }
  }
  if (!Number.isInteger(proxyPort) || proxyPort < 1 || proxyPort > 65535) {
    console.error(`url: --proxy-port must be 1–65535`);
    return 2;
  }
  const suffix = proxyPort === 80 ? '' : `:${proxyPort}`;
  console.log(`http://${port}-${sandboxId}.${domain.replace(/^\.|\.$/g, '')}${suffix}`);
  return 0;
}
