#!/usr/bin/env bash
# Network slot benchmark, one command (as root): builds, then measures slot creation (ours vs the
# naive E2B sequence, same run, ratio printed), Acquire latency and the egress proxy's cost, all inside throwaway network
# namespaces that are deleted afterwards. Extra flags go to the bench: --slots N --batch N --acquires N
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! bash scripts/build.sh >/tmp/net-bench-build.log 2>&1; then
  # Other projects may be mid-edit; tsc still emits ours. Say so rather than hide it.
  echo "bench/net: build reported errors (see /tmp/net-bench-build.log); running what was emitted" >&2
fi
node --enable-source-maps dist/bench/net/slot-bench.js "$@"
# The egress proxy's cost (connect latency, throughput) against going straight out.
exec node --enable-source-maps dist/bench/net/egress-proxy-bench.js
