#!/usr/bin/env bash
# Checkpoint benchmark: guest-visible pause of a Checkpoint (VM paused → resumed in place) of a
# 1 GiB guest with 10% written, the whole call until uploaded, each step, and E2B's way (pause,
# then a new VM) for comparison. Needs root (network namespaces) and a build.
#
#   bash bench/orchestrator/checkpoint.sh [--size 1024] [--rounds 3]
set -euo pipefail
cd "$(dirname "$0")/../.."
case ${1:-} in -h|--help) sed -n '2,6p' "$0"; exit 0 ;; esac
[[ -f dist/bench/orchestrator/checkpoint-bench.js && -f dist/apps/orchestrator/src/main.js ]] || bash scripts/build.sh
exec node --enable-source-maps dist/bench/orchestrator/checkpoint-bench.js "$@"
