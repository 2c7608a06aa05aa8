import { readFile, writeFile, mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** What `node up` records so the CLI can find the node it started. */
export interface NodeRecord {
  grpcPort: number;
  sockets: Record<string, string>;
  startedAt: string;
  pid: number;
  /** The ingress proxy, for `./sbx url`. */
  proxy?: { port: number; domain: string };
}

/** The repository root: this file is dist/tools/sbx/src/cli/node-target.js. */
export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../../../../..');

export function defaultDataDir(): string {
  return process.env['SBX_DATA_DIR'] || join(repoRoot, '.sbx/node');
}

export function nodeRecordPath(dataDir: string): string {
  return join(dataDir, 'node.json');
}

export async function writeNodeRecord(dataDir: string, record: NodeRecord): Promise<void> {
  await mkdir(dataDir, { recursive: true });
  await writeFile(nodeRecordPath(dataDir), JSON.stringify(record, null, 2) + '\n');
}

export async function readNodeRecord(dataDir: string): Promise<NodeRecord> {
  const path = nodeRecordPath(dataDir);
  try {
    return JSON.parse(await readFile(path, 'utf8')) as NodeRecord;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new Error(`no local node at ${dataDir} (${path} missing): start one with ./sbx node up, or pass --addr`, {
        cause: err,
      });
    }
    throw err;
  }
}

/**
 * `--addr host:port` wins; otherwise the local node recorded under `--data-dir`, reached on
 * the orchestrator's control socket (a path works whatever network namespace the node is in).
 */
export async function resolveGrpcAddress(options: { addr?: string; dataDir?: string }): Promise<string> {
  if (options.addr) return options.addr;
  const record = await readNodeRecord(resolve(options.dataDir ?? defaultDataDir()));
  const socket = record.sockets['orchestrator'];
  return socket ? socket : `127.0.0.1:${record.grpcPort}`;
}
