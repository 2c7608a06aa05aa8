import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadEnvFile, parseEnvFile } from './env-file.js';

const dir = mkdtempSync(join(tmpdir(), 'sbx-env-file-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('SBX_ENV_FILE', () => {
  it('reads KEY=value lines, JSON-quoted values intact, blank and # lines skipped', () => {
    const tricky = 'p"a#s s\\\nword=1';
    expect(
      parseEnvFile(`\n# comment\nSBX_BUCKET="gs://b"\nSBX_DNS_TTL=30\nSBX_NOTE=${JSON.stringify(tricky)}\n`),
    ).toEqual({
      SBX_BUCKET: 'gs://b',
      SBX_DNS_TTL: '30',
      SBX_NOTE: tricky,
    });
  });

  it('fills the environment at start; what the environment already has wins', () => {
    const file = join(dir, 'sbx.env');
    writeFileSync(file, 'SBX_A="from file"\nSBX_B="from file"\n');
    const env: NodeJS.ProcessEnv = { SBX_ENV_FILE: file, SBX_B: 'from job' };
    loadEnvFile(env);
    expect(env).toMatchObject({ SBX_A: 'from file', SBX_B: 'from job' });
    writeFileSync(file, 'SBX_A="changed"\n');
    const again: NodeJS.ProcessEnv = { SBX_ENV_FILE: file };
    loadEnvFile(again);
    expect(again['SBX_A']).toBe('changed');
  });

  it('names the file and line of bad input, and a missing file', () => {
    expect(() => parseEnvFile('OK=1\nnot a line\n', '/x/sbx.env')).toThrow('/x/sbx.env:2: not KEY=value');
    expect(() => parseEnvFile('K="unterminated\n', '/x/sbx.env')).toThrow(/sbx.env:1: K: a quoted value/);
    expect(() => loadEnvFile({ SBX_ENV_FILE: join(dir, 'missing') })).toThrow(/SBX_ENV_FILE .*missing: ENOENT/);
    expect(() => loadEnvFile({})).not.toThrow();
  });
});
