#!/usr/bin/env bash
# The whole suite, as CI runs it: bootstrap, static checks, then every project's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export NX_DAEMON=false NX_NO_CLOUD=true
bash scripts/bootstrap.sh
echo "== format (prettier --check)"
npx prettier --check . --log-level warn
echo "== lint (eslint)"
npx eslint . --max-warnings 0
echo "== types (tsc)"
npx tsc -p tsconfig.json
echo "== generated protobuf code is current"
bash scripts/gen-proto.sh --check
echo "== test peers (fake-gcs-server, consul, nomad: built once per machine, see scripts/test-peers.sh)"
bash scripts/test-peers.sh >/dev/null
echo "== tests (vitest, every nx project)"
report=$(mktemp)
trap 'rm -f "$report"' EXIT
status=0
npx vitest run --reporter=default --reporter=json --outputFile.json="$report" "$@" || status=$?
node scripts/test-summary.mjs "$report" || true
exit $status
