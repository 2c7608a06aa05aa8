#!/usr/bin/env bash
# npm start: make the checkout runnable, then run the whole node on local defaults with a
# first sandbox created, paused and resumed (./sbx node up --demo). Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec ./sbx node up --demo "$@"
