#!/usr/bin/env bash
# npm run soak: the long versions of the soak tests (npm test runs short ones), printing figures.
# SBX_SOAK_CYCLES: create → delete cycles (default 1000); SBX_SOAK_SANDBOXES: sandboxes writing
# while each service is killed in turn (default 20); SBX_SOAK_GENERATIONS: pause → resume chain
# length (default 100).
set -euo pipefail
cd "$(dirname "$0")/.."
export NX_DAEMON=false NX_NO_CLOUD=true
bash scripts/bootstrap.sh
export SBX_SOAK_CYCLES="${SBX_SOAK_CYCLES:-1000}" SBX_SOAK_SANDBOXES="${SBX_SOAK_SANDBOXES:-20}" \
  SBX_SOAK_GENERATIONS="${SBX_SOAK_GENERATIONS:-100}"
npx vitest run --reporter=default apps/orchestrator/test/soak.test.ts "$@"
