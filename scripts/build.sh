#!/usr/bin/env bash
# Builds what runs: the C helpers in native/ and the TypeScript into dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G 'native/c/lib/*.c' >/dev/null || compgen -G 'native/c/peers/*.c' >/dev/null; then
  make -s -C native
fi
npx tsc -p tsconfig.build.json
