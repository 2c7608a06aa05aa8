#!/usr/bin/env bash
# Makes a fresh checkout runnable: Debian packages, npm dependencies, native helpers, build.
# Idempotent and quiet when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-packages.sh
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -f node_modules/.sbx-lock-hash || "$(cat node_modules/.sbx-lock-hash)" != "$lock_hash" ]]; then
  echo "bootstrap: installing npm dependencies (pinned by package-lock.json)"
  # Not `npm ci`: the registry this project installs from serves only this platform's
  # optional binaries (nx, rollup, esbuild), so the lock lacks the others and npm ci
  # refuses it as out of sync. `npm install` honours the lock's exact versions.
  npm install --no-fund --no-audit --loglevel=error
  echo "$lock_hash" > node_modules/.sbx-lock-hash
fi
bash scripts/build.sh
