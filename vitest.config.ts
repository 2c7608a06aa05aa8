import { defineConfig } from 'vitest/config';

// Every nx project is a vitest project; `npx nx test <name>` runs one of them.
export default defineConfig({
  test: {
    projects: [
      'apps/*/vitest.config.ts',
      'libs/*/vitest.config.ts',
      'native/vitest.config.ts',
      'tools/*/vitest.config.ts',
      'deploy/*/vitest.config.ts',
    ],
    // Two cores: tests that start servers and namespaces run better two at a time than in a crowd.
    passWithNoTests: true,
    maxWorkers: 2,
    minWorkers: 1,
    reporters: ['default'],
  },
});
