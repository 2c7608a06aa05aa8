#!/usr/bin/env bash
# Orchestrator benchmark: create-from-snapshot latency (p50/p99) and pause time of 256 MiB and
# 1 GiB guests with 10% of memory written, each step's share, through SandboxService against
# the real services and the vmm-sim double. Needs root (network namespaces) and a build.
#
#   bash bench/orchestrator/run.sh [--sizes 256,1024] [--creates 20] [--pauses 3]
#       [--modes upstream-diff,upstream-diff-noprefetch,upstream-present,wp-async] [--read-percent 0]
#       [--vmm-pool 2]   (VMMs started ahead; 0 = every create starts its own)
# Without arguments (as `npm run bench` calls it) the checkpoint bench (checkpoint.sh) follows.
set -euo pipefail
cd "$(dirname "$0")/../.."
case ${1:-} in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac
[[ -f dist/bench/orchestrator/create-pause-bench.js && -f dist/apps/orchestrator/src/main.js ]] || bash scripts/build.sh
node --enable-source-maps dist/bench/orchestrator/create-pause-bench.js "$@"
if [[ $# -eq 0 ]]; then bash bench/orchestrator/checkpoint.sh; fi
