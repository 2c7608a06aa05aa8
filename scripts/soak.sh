#!/usr/bin/env bash
# npm run soak: the long versions of the soak tests (npm test runs short ones), printing figures.
# SBX_SOAK_CYCLES overrides the number of create → delete cycles (default 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
export NX_DAEMON=false NX_NO_CLOUD=true
bash scripts/bootstrap.sh
export SBX_SOAK_CYCLES="${SBX_SOAK_CYCLES:-1000}"
npx vitest run --reporter=default apps/orchestrator/test/soak.test.ts "$@"
