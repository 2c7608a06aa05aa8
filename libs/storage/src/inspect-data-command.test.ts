import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { createMappings, mergeMappings, baseMappings } from './mappings.js';
import { encodeHeader } from './header-codec.js';
import { main } from './inspect-data-command.js';

const base = '11111111-1111-4111-8111-111111111111';
const child = '22222222-2222-4222-8222-222222222222';
const blockSize = 4096;

let bucket: string;
beforeAll(async () => {
  bucket = await mkdtemp(join(tmpdir(), 'inspect-data-'));
  // Base rootfs: 8 blocks, blocks 1 and 5 hold data.
  const image = Buffer.alloc(8 * blockSize);
  image.fill(7, 1 * blockSize, 1 * blockSize + 100);
  image.fill(9, 5 * blockSize, 6 * blockSize);
  await mkdir(join(bucket, base));
  await writeFile(join(bucket, base, 'rootfs.ext4'), image);
  // A child build whose diff holds block 3 (all 0xff) over the base.
  await mkdir(join(bucket, child));
  await writeFile(join(bucket, child, 'rootfs.ext4'), Buffer.alloc(blockSize, 0xff));
  const mappings = mergeMappings(baseMappings(image.length, base), createMappings([3], blockSize, child));
  const header = encodeHeader({
    metadata: { version: 3, blockSize, size: image.length, generation: 1, buildId: child, baseBuildId: base },
    mappings,
  });
  await writeFile(join(bucket, child, 'rootfs.ext4.header'), header);
});
afterAll(() => rm(bucket, { recursive: true, force: true }));

async function run(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const log = vi.spyOn(console, 'log').mockImplementation((s: string) => void out.push(s));
  const error = vi.spyOn(console, 'error').mockImplementation((s: string) => void err.push(s));
  try {
    const code = await main(args);
    return { code, out: out.join('\n'), err: err.join('\n') };
  } finally {
    log.mockRestore();
    error.mockRestore();
  }
}

describe('inspect-data', () => {
  it("counts empty and non-empty blocks of a build's own data", async () => {
    const { code, out } = await run(['--build', base, '--kind', 'rootfs', '--bucket', bucket, '--json']);
    expect(code).toBe(0);
    const report = JSON.parse(out) as { empty: number; nonEmpty: number; blocks: { nonZeroBytes: number }[] };
    expect(report.blocks.map((b) => b.nonZeroBytes)).toEqual([0, 100, 0, 0, 0, blockSize, 0, 0]);
    expect(report.nonEmpty).toBe(2);
  });

  it('reads through the layers with --layered', async () => {
    const { code, out } = await run(['--build', child, '--kind', 'rootfs', '--bucket', bucket, '--layered', '--json']);
    expect(code).toBe(0);
    const report = JSON.parse(out) as { blocks: { nonZeroBytes: number }[] };
    expect(report.blocks.map((b) => b.nonZeroBytes)).toEqual([0, 100, 0, blockSize, 0, blockSize, 0, 0]);
  });

  it('prints the seed layout as text and rejects a range past the end', async () => {
    const text = await run(['--build', base, '--kind', 'rootfs', '--bucket', bucket, '--start', '4', '--end', '6']);
    expect(text.out).toMatch(/5 +\[ +20480, +24576\) 4096 non-zero bytes/);
    expect(text.out).toMatch(/Empty inspected blocks: 1/);
    const bad = await run(['--build', base, '--kind', 'rootfs', '--bucket', bucket, '--end', '99']);
    expect(bad.code).toBe(2);
    expect(bad.err).toMatch(/outside \[0, 8\]/);
    expect((await run(['--build', base, '--kind', 'swap', '--bucket', bucket])).err).toMatch(/--kind must be/);
  });
});
