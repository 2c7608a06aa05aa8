/**
 * Every command the README lists answers through the launcher, `./sbx`, as a reader would
 * type it: a command known only to its module (or only to the README) fails here. What the
 * commands do against a running node is driven through `./sbx` in node-up.test.ts.
 */
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const exec = promisify(execFile);
const repo = resolve(__dirname, '../../..');
const sbx = join(repo, 'sbx');
const built = existsSync(join(repo, 'dist/tools/sbx/src/main.js'));
if (!built) console.warn('README command test skipped: run npm run build first');

/** The command names of the README's `./sbx` section: its table's first column and its service list. */
function readmeCommands(): string[] {
  const readme = readFileSync(join(repo, 'README.md'), 'utf8');
  const section = readme.split('## The `./sbx` CLI')[1]!.split('\n## ')[0]!;
  const names = new Set<string>();
  for (const line of section.split('\n')) {
    if (line.startsWith('| `')) {
      // A `\|` inside a cell is text, not a column break.
      const firstColumn = line.split(/(?<!\\)\|/)[1]!;
      for (const [, span] of firstColumn.matchAll(/`([^`]+)`/g)) names.add(span!.split(' ')[0]!);
    }
  }
  // "(each `serve --help`)" is a subcommand of the services, not a command of its own.
  const services = (/Services: (.*?)\. Operator/s.exec(section)?.[1] ?? '').replace(/\([^)]*\)/g, '');
  for (const [, span] of services.matchAll(/`([^`]+)`/g)) names.add(span!.split(' ')[0]!);
  return [...names];
}

describe.skipIf(!built)('README commands through ./sbx', () => {
  const names = readmeCommands();

  it('finds the commands in the README', () => {
    expect(names).toEqual(expect.arrayContaining(['create', 'inspect-header', 'inspect-data', 'health', 'node']));
  });

  it('lists every one of them in ./sbx --help', async () => {
    const listed = (await exec(sbx, ['--help'])).stdout;
    const names = listed
      .split('commands:')[1]!
      .match(/^ {2}\S+/gm)!
      .map((l) => l.trim());
    expect(names).toEqual(expect.arrayContaining(readmeCommands()));
  });

  it.each(names)('./sbx %s --help answers', async (name) => {
    const { stdout } = await exec(sbx, [name, '--help']);
    expect(stdout).toMatch(/usage/i);
  });

  it('refuses a command it does not have, naming it', async () => {
    const failed = await exec(sbx, ['no-such-command']).then(
      () => undefined,
      (err: { code: number; stderr: string }) => err,
    );
    expect(failed?.code).toBe(2);
    expect(failed?.stderr).toContain('unknown command "no-such-command"');
  });
});
