/**
 * A fresh clone stays clean after the README's two commands (`npm start`, `npm test`): the
 * bootstrap's `npm install` must not rewrite package-lock.json (it did, adding the other
 * platforms' optional binaries the registry serves), and everything the commands write is
 * ignored by git. The full check (clone, `npm run bootstrap`, `git status`) takes a minute;
 * this one asks npm the same question about the lock without installing anything.
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';

const exec = promisify(execFile);
const repo = resolve(__dirname, '../../..');
const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

describe('a fresh clone after npm start and npm test', () => {
  it("keeps package-lock.json as committed when the bootstrap's npm install resolves it", async () => {
    const dir = await mkdtemp(join(tmpdir(), 'lock-check-'));
    dirs.push(dir);
    await copyFile(join(repo, 'package.json'), join(dir, 'package.json'));
    await copyFile(join(repo, 'package-lock.json'), join(dir, 'package-lock.json'));
    await exec('npm', ['install', '--package-lock-only', '--ignore-scripts', '--no-audit', '--no-fund'], {
      cwd: dir,
    });
    const rewritten = await readFile(join(dir, 'package-lock.json'), 'utf8');
    const committed = await readFile(join(repo, 'package-lock.json'), 'utf8');
    expect(rewritten === committed, 'npm install rewrites package-lock.json: commit the lock it writes').toBe(true);
  }, 120_000);

  it('has git ignore what the commands write (dependencies, build, node data, logs)', async () => {
    const written = ['node_modules/x', 'dist/x.js', 'native/build/x.so', '.sbx/node/node.json', '.nx/x', 'npm.log'];
    const { stdout } = await exec('git', ['check-ignore', ...written], { cwd: repo });
    expect(stdout.trim().split('\n')).toEqual(written);
  });
});
