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

/** The built entry of `./sbx <command>` (apps/<command> or tools/<command>), or undefined. */
export function builtEntry(command: string): string | undefined {
  return ['apps', 'tools']
    .map((area) => join(repoRoot, 'dist', area, command, 'src/main.js'))
    .find((entry) => existsSync(entry));
}

/** Throws with how to fix it when a command's dist/ build is missing (the launcher runs dist/). */
export function requireBuilt(command: string): void {
  if (!builtEntry(command)) throw new Error(`${command} is not built: run bash scripts/build.sh first`);
}
