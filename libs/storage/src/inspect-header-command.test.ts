import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { NIL_UUID } from './build-id.js';
import { encodeHeader, type Header } from './header-codec.js';
import { main } from './inspect-header-command.js';

const BUILD = '11223344-5566-7788-99aa-bbccddeeff00';
const BASE = 'a0a1a2a3-b0b1-c0c1-d0d1-e0e1e2e3e4e5';
const header: Header = {
  metadata: { version: 2, blockSize: 4096, size: 16384, generation: 3, buildId: BUILD, baseBuildId: BASE },
  mappings: [
    { offset: 0, length: 8192, buildId: BASE, buildStorageOffset: 0 },
    { offset: 8192, length: 4096, buildId: BUILD, buildStorageOffset: 0 },
    { offset: 12288, length: 4096, buildId: NIL_UUID, buildStorageOffset: 0 },
  ],
};

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'sbx-inspect-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function run(argv: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const o = vi.spyOn(process.stdout, 'write').mockImplementation((s) => ((out += String(s)), true));
  const e = vi.spyOn(process.stderr, 'write').mockImplementation((s) => ((err += String(s)), true));
  try {
    return { code: await main(argv), out, err };
  } finally {
    o.mockRestore();
    e.mockRestore();
  }
}

describe('inspect-header', () => {
  it('prints metadata, mappings and the per-build summary', async () => {
    const file = path.join(dir, 'memfile.header');
    await writeFile(file, encodeHeader(header));
    const { code, out } = await run([file]);
    expect(code).toBe(0);
    expect(out).toContain('Version            2');
    expect(out).toContain('Generation         3');
    expect(out).toContain(`Build ID           ${BUILD}`);
    expect(out).toContain('Blocks             4');
    expect(out).toContain('MAPPING (3 maps, uses <1 KiB in storage)');
    expect(out).toContain(`2-3            [       8192,      12288) = [          0,       4096) in ${BUILD}, 4096 B`);
    expect(out).toContain(`${BASE} (base): 2 blocks, 0 MiB (50.00%)`);
    expect(out).toContain(`${BUILD} (current): 1 blocks, 0 MiB (25.00%)`);
    expect(out).toContain(`${NIL_UUID} (zeros): 1 blocks, 0 MiB (25.00%)`);
  });

  it('prints JSON with --json', async () => {
    const file = path.join(dir, 'j.header');
    await writeFile(file, encodeHeader(header));
    const { code, out } = await run([file, '--json']);
    expect(code).toBe(0);
    const parsed = JSON.parse(out) as Header & { summary: Array<{ buildId: string; blocks: number }> };
    expect(parsed.metadata).toEqual(header.metadata);
    expect(parsed.mappings).toEqual(header.mappings);
    expect(parsed.summary.map((s) => [s.buildId, s.blocks])).toEqual([
      [BASE, 2],
      [BUILD, 1],
      [NIL_UUID, 1],
    ]);
  });

  it('exits 1 naming the problem for an invalid header, 2 for bad usage', async () => {
    const file = path.join(dir, 'bad.header');
    const bytes = encodeHeader(header);
    await writeFile(file, bytes.subarray(0, bytes.length - 40));
    const bad = await run([file]);
    expect(bad.code).toBe(1);
    expect(bad.err).toMatch(/cover \[0, 12288\) but the file size is 16384/);
    expect((await run([path.join(dir, 'absent')])).err).toMatch(/no such file/);
    expect((await run([])).code).toBe(2);
    expect((await run(['--bogus'])).code).toBe(2);
    expect((await run(['--help'])).out).toMatch(/usage: \.\/sbx inspect-header/);
  });
});
