import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { NIL_UUID } from './build-id.js';
import { decodeHeader, HEADER_MAPPING_BYTES, type Header } from './header-codec.js';
import type { BuildMapping } from './mappings.js';
import { openBackend } from './open-backend.js';
import { HeaderInvalid, ObjectNotFound } from './storage-errors.js';

const USAGE = `usage: ./sbx inspect-header <file | gs://bucket/{buildId}/{memfile|rootfs.ext4}.header> [--json]

Prints a build header (DESIGN.md §2, E2B's uncompressed format v1-v3): its metadata, every
mapping, and how much of the file each build holds. Exits 1 when the header is invalid.
  --json   one JSON object instead of text`;

export interface BuildShare {
  buildId: string;
  role: 'current' | 'base' | 'zeros' | 'layer';
  blocks: number;
  bytes: number;
  percent: number;
}

/** Per-build share of the file, in order of first appearance (seed cmd/inspect-header). */
export function summarizeHeader(header: Header): BuildShare[] {
  const bytes = new Map<string, number>();
  for (const m of header.mappings) bytes.set(m.buildId, (bytes.get(m.buildId) ?? 0) + m.length);
  const { buildId, baseBuildId, blockSize, size } = header.metadata;
  return [...bytes].map(([id, b]) => ({
    buildId: id,
    role: id === buildId ? 'current' : id === baseBuildId ? 'base' : id === NIL_UUID ? 'zeros' : 'layer',
    blocks: Math.ceil(b / blockSize),
    bytes: b,
    percent: (b / size) * 100,
  }));
}

/** One line per mapping, laid out like the seed's BuildMap.Format. */
export function formatMapping(m: BuildMapping, blockSize: number): string {
  const blocks = `${m.offset / blockSize}-${Math.ceil((m.offset + m.length) / blockSize)}`;
  const pad = (n: number) => String(n).padStart(11);
  return `${blocks.padEnd(14)} [${pad(m.offset)},${pad(m.offset + m.length)}) = [${pad(m.buildStorageOffset)},${pad(
    m.buildStorageOffset + m.length,
  )}) in ${m.buildId}, ${m.length} B`;
}

export function formatHeader(header: Header, source: string): string {
  const md = header.metadata;
  const mib = (n: number) => Math.floor(n / 1024 / 1024);
  const storageKiB = Math.floor((header.mappings.length * HEADER_MAPPING_BYTES) / 1024);
  const lines = [
    '',
    'METADATA',
    '========',
    `Path               ${source}`,
    `Version            ${md.version}`,
    `Generation         ${md.generation}`,
    `Build ID           ${md.buildId}`,
    `Base build ID      ${md.baseBuildId}`,
    `Size               ${md.size} B (${mib(md.size)} MiB)`,
    `Block size         ${md.blockSize} B`,
    `Blocks             ${Math.ceil(md.size / md.blockSize)}`,
    '',
    `MAPPING (${header.mappings.length} maps, uses ${storageKiB === 0 ? '<1 KiB' : `${storageKiB} KiB`} in storage)`,
    '=======',
    ...header.mappings.map((m) => formatMapping(m, md.blockSize)),
    '',
    'MAPPING SUMMARY',
    '===============',
    ...summarizeHeader(header).map(
      (s) =>
        `${s.buildId}${s.role === 'current' || s.role === 'base' ? ` (${s.role})` : s.role === 'zeros' ? ' (zeros)' : ''}: ${
          s.blocks
        } blocks, ${mib(s.bytes)} MiB (${s.percent.toFixed(2)}%)`,
    ),
  ];
  return lines.join('\n') + '\n';
}

async function load(source: string): Promise<Buffer> {
  if (!source.startsWith('gs://')) return readFile(source);
  const rest = source.slice(5);
  const slash = rest.indexOf('/');
  if (slash <= 0) throw new RangeError(`${source}: expected gs://bucket/<object path>`);
  const backend = openBackend(`gs://${rest.slice(0, slash)}`);
  try {
    return await backend.read(rest.slice(slash + 1));
  } finally {
    await backend.close();
  }
}

export async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: { json: { type: 'boolean', default: false }, help: { type: 'boolean', short: 'h', default: false } },
      allowPositionals: true,
      strict: true,
    });
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}\n`);
    return 2;
  }
  if (parsed.values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const [source, ...extra] = parsed.positionals;
  if (source === undefined || extra.length > 0) {
    process.stderr.write(`${USAGE}\n`);
    return 2;
  }
  let header: Header;
  try {
    header = decodeHeader(await load(source));
  } catch (err) {
    const reason =
      err instanceof HeaderInvalid || err instanceof ObjectNotFound
        ? err.message
        : (err as NodeJS.ErrnoException).code === 'ENOENT'
          ? `no such file: ${source}`
          : (err as Error).message;
    process.stderr.write(`inspect-header: ${source}: ${reason}\n`);
    return 1;
  }
  if (parsed.values.json) {
    process.stdout.write(`${JSON.stringify({ source, ...header, summary: summarizeHeader(header) }, null, 2)}\n`);
  } else {
    process.stdout.write(formatHeader(header, source));
  }
  return 0;
}
