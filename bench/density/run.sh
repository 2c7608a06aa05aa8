#!/usr/bin/env bash
# Density benchmark (issue 17): the whole node on local defaults (./sbx node up, VMM double) in a
# throwaway netns, 100 sandboxes of 128 MiB created 10 at a time; per service RSS/PSS, fds and
# threads at 1 and at 100 running and per sandbox, idle CPU of all services, create p50/p99 at 1
# vs at 100 running; the VMM double's own cost apart; everything removed and checked. Then
# uffd-server's Prepare alone (prepare.sh, the create's "prepare uffd" step). Needs root.
#
#   bash bench/density/run.sh [--sandboxes 100] [--batch 10] [--memory-mb 128] [--creates 20]
#       [--idle-seconds 30] [--detail]
set -euo pipefail
cd "$(dirname "$0")/../.."
case ${1:-} in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac
[[ -f dist/bench/density/density-bench.js && -f dist/bench/density/prepare-bench.js && -f dist/apps/orchestrator/src/main.js ]] ||
  bash scripts/build.sh
# Every service and VMM of the node inherits this: 100 sandboxes hold a few thousand fds in all
# (the soft limit up to the hard one; a node for hundreds of sandboxes wants ≥ 65536, LimitNOFILE).
ulimit -n "$(ulimit -Hn)"
(( $(ulimit -n) >= 8192 )) || echo "density bench: ulimit -n $(ulimit -n) may be too low for 100 sandboxes" >&2
rc=0
node --enable-source-maps dist/bench/density/density-bench.js "$@" || rc=$?
echo
node --enable-source-maps dist/bench/density/prepare-bench.js || rc=1
exit "$rc"
