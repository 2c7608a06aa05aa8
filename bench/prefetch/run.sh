#!/usr/bin/env bash
# Recorded prefetch (issue 15): faults and time to envd ready on the first resume of a build (no
# recorded set yet) and on the second (its set, recorded by the first, copied in), one node with
# the real services and the vmm-sim double, whose /init reads a working set before answering.
# Needs root (network namespaces).
#
#   bash bench/prefetch/run.sh [--size-mib 1024] [--touch-mib 100] [--rounds 3] [--window-kib 2048]
set -euo pipefail
cd "$(dirname "$0")/../.."
case ${1:-} in -h|--help) sed -n '2,7p' "$0"; exit 0 ;; esac
# Always (incremental): a stale dist would measure code without the recorded prefetch. tsc emits
# despite type errors elsewhere in the tree; those are reported, not fatal here.
bash scripts/build.sh || echo "bench/prefetch: the build reported errors (above); running what it emitted" >&2
echo "load: $(uptime)"
exec node --enable-source-maps dist/bench/prefetch/prefetch-bench.js "$@"
