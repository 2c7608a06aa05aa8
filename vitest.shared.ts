import { fileURLToPath } from 'node:url';
import { defineProject, type UserWorkspaceConfig } from 'vitest/config';

// Prints the logs of the service processes a failed test ran (libs/test-kit).
const logsOnFailure = fileURLToPath(new URL('./libs/test-kit/src/logs-on-failure.ts', import.meta.url));

/**
 * One nx project's vitest settings. Tests import the TypeScript sources through the
 * package.json "imports" map's `source` condition; the built services run from dist/.
 */
export function projectConfig(name: string, overrides: UserWorkspaceConfig['test'] = {}): UserWorkspaceConfig {
  return defineProject({
    resolve: { conditions: ['source'] },
    ssr: { resolve: { conditions: ['source'], externalConditions: ['source'] } },
    test: {
      name,
      include: ['src/**/*.test.ts', 'test/**/*.test.ts'],
      environment: 'node',
      pool: 'forks',
      testTimeout: 60_000,
      hookTimeout: 60_000,
      setupFiles: [logsOnFailure],
      ...overrides,
    },
  });
}
