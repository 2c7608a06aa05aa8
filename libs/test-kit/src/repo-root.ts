import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * The checkout, found upwards from this module: it runs from source (tests) and from dist/
 * (the orchestrator bench imports the node harness), so a fixed `../..` would be wrong in one.
 */
function findRepoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'sbx')) && existsSync(join(dir, 'package.json'))) return dir;
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`cannot find the repository root (./sbx) above ${import.meta.url}`);
    dir = parent;
  }
}

export const repoRoot = findRepoRoot();

/** The launcher operators and the node supervisor start every service with. */
export const sbx = join(repoRoot, 'sbx');

/**
 * The built entry of `./sbx <command>`, or undefined: a service (apps/<command>), a tool
 * (tools/<command>), else one of the CLI's own commands (tools/sbx: `node up`, `create`, …).
 */
export function builtEntry(command: string): string | undefined {
  const [entry] = [join('apps', command), join('tools', command)]
    .map((dir) => join(repoRoot, 'dist', dir, 'src/main.js'))
    .filter((main) => existsSync(main));
  if (entry) return entry;
  const cli = join(repoRoot, 'dist/tools/sbx/src/main.js');
  const isService = existsSync(join(repoRoot, 'apps', command)) || existsSync(join(repoRoot, 'tools', command));
  return !isService && existsSync(cli) ? cli : undefined;
}

/** Throws with how to fix it when a command's dist/ build is missing (the launcher runs dist/). */
export function requireBuilt(command: string): void {
  if (!builtEntry(command)) throw new Error(`${command} is not built: run bash scripts/build.sh first`);
}
