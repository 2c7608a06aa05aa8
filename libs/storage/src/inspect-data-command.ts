import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { BuildStore } from './build-store.js';
import { normalizeBuildId } from './build-id.js';
import { buildObjectPath, type BuildDataFile } from './object-paths.js';
import { openBackend } from './open-backend.js';

const USAGE = `usage: ./sbx inspect-data --build <buildId> --kind memfile|rootfs [--bucket <dir|gs://bucket>]
                         [--start <block>] [--end <block>] [--block-size <bytes>] [--layered] [--json]

Reads a build's data block by block and says which blocks hold data and which are empty
(like the seed's cmd/inspect-data). By default it reads the build's own data object (its diff,
or the full image of a base build); --layered reads the file the build's header describes,
through every layer below it.
  --bucket      a local directory or gs://bucket (default $SBX_BUCKET)
  --start/--end block range, end exclusive (default: the first 64 blocks)
  --block-size  default 4096 (rootfs) or the header's block size (memfile)`;

interface BlockReport {
  block: number;
  offset: number;
  nonZeroBytes: number;
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      build: { type: 'string' },
      kind: { type: 'string' },
      bucket: { type: 'string', default: process.env['SBX_BUCKET'] ?? '' },
      start: { type: 'string', default: '0' },
      end: { type: 'string' },
      'block-size': { type: 'string' },
      layered: { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const fail = (message: string) => {
    console.error(`inspect-data: ${message}\n\n${USAGE}`);
    return 2;
  };
  if (!values.build) return fail('--build is required');
  const buildId = normalizeBuildId(values.build);
  const file: BuildDataFile | undefined =
    values.kind === 'memfile' ? 'memfile' : values.kind === 'rootfs' ? 'rootfs.ext4' : undefined;
  if (!file) return fail(`--kind must be memfile or rootfs, got "${values.kind ?? ''}"`);
  if (!values.bucket) return fail('--bucket (or SBX_BUCKET) is required');

  const backend = openBackend(values.bucket);
  const scratch = values.layered ? await mkdtemp(join(tmpdir(), 'inspect-data-')) : undefined;
  const store = scratch ? new BuildStore({ backend, cacheDir: scratch, owner: 'inspect-data' }) : undefined;
  try {
    let size: number;
    let headerBlockSize: number | undefined;
    let read: (target: Buffer, offset: number) => Promise<void>;
    if (store) {
      const opened = await store.openBuildFile(buildId, file);
      size = opened.header.metadata.size;
      headerBlockSize = opened.header.metadata.blockSize;
      read = (target, offset) => opened.file.readAt(target, offset);
    } else {
      const path = buildObjectPath(buildId, file);
      size = await backend.size(path);
      read = async (target, offset) => {
        (await backend.readRange(path, offset, target.length)).copy(target);
      };
    }
    const blockSize = Number(values['block-size'] ?? headerBlockSize ?? 4096);
    if (!Number.isInteger(blockSize) || blockSize <= 0) return fail('--block-size must be a positive integer');
    const blocks = Math.ceil(size / blockSize);
    const start = Number(values.start);
    const end = values.end === undefined ? Math.min(blocks, start + 64) : Number(values.end);
    if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end > blocks || start > end) {
      return fail(`block range [${values.start}, ${values.end ?? 'start+64'}) is outside [0, ${blocks}]`);
    }
    const reports: BlockReport[] = [];
    const buffer = Buffer.alloc(blockSize);
    for (let block = start; block < end; block++) {
      const offset = block * blockSize;
      const view = buffer.subarray(0, Math.min(blockSize, size - offset));
      await read(view, offset);
      let nonZero = 0;
      for (const byte of view) if (byte !== 0) nonZero++;
      reports.push({ block, offset, nonZeroBytes: nonZero });
    }
    const empty = reports.filter((r) => r.nonZeroBytes === 0).length;
    const summary = {
      buildId,
      file,
      layered: values.layered,
      size,
      blockSize,
      inspected: reports.length,
      empty,
      nonEmpty: reports.length - empty,
    };
    if (values.json) {
      console.log(JSON.stringify({ ...summary, blocks: reports }, null, 2));
      return 0;
    }
    const lines = ['', 'METADATA', '========'];
    lines.push(`Build ID           ${buildId}`, `File               ${file}${values.layered ? ' (layered)' : ''}`);
    lines.push(`Size               ${size} B (${Math.floor(size / 2 ** 20)} MiB)`, `Block size         ${blockSize} B`);
    lines.push('', 'DATA', '====');
    for (const r of reports) {
      const range = `[${String(r.offset).padStart(11)},${String(r.offset + blockSize).padStart(11)})`;
      lines.push(
        `${String(r.block).padEnd(10)} ${range} ${r.nonZeroBytes ? `${r.nonZeroBytes} non-zero bytes` : 'EMPTY'}`,
      );
    }
    lines.push('', 'SUMMARY', '=======');
    lines.push(`Empty inspected blocks: ${empty}`, `Non-empty inspected blocks: ${reports.length - empty}`);
    lines.push(`Total inspected blocks: ${reports.length}`);
    console.log(lines.join('\n'));
    return 0;
  } finally {
    await store?.close();
    if (scratch) await rm(scratch, { recursive: true, force: true });
  }
}
