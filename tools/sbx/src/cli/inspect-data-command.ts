import { join, resolve } from 'node:path';
import { inspectDataMain } from '#storage';
import { defaultDataDir } from './node-target.js';

/**
 * `./sbx inspect-data`: the storage tool of libs/storage, reading the local node's bucket
 * (under `--data-dir`, like the other operator commands) unless `--bucket` or $SBX_BUCKET
 * names another.
 */
export async function main(argv: string[]): Promise<number> {
  const args: string[] = [];
  let dataDir: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--data-dir') {
      dataDir = argv[++i];
      if (!dataDir) {
        console.error('inspect-data: --data-dir needs a directory');
        return 2;
      }
    } else if (arg.startsWith('--data-dir=')) {
      dataDir = arg.slice('--data-dir='.length);
    } else {
      args.push(arg);
    }
  }
  const hasBucket = args.some((a) => a === '--bucket' || a.startsWith('--bucket='));
  if (!hasBucket && !process.env['SBX_BUCKET']) {
    args.push('--bucket', join(resolve(dataDir ?? defaultDataDir()), 'bucket'));
  }
  const code = await inspectDataMain(args);
  if (args.includes('--help')) {
    console.log('  --data-dir    the local node whose bucket to read (default .sbx/node, or $SBX_DATA_DIR)');
  }
  return code;
}
