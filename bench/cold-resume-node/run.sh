#!/usr/bin/env bash
# Cold resume of a whole node (issue 17): a 1 GiB sandbox, every page written, paused into the
# bucket, then resumed through the orchestrator's gRPC API on nodes with an empty cache, the bucket
# answering after 5 and 50 ms per request (local directory with SBX_BUCKET_REQUEST_DELAY_MS, and
# fake-gcs-server behind a delaying proxy), without and with the recorded prefetch set; the guest
# touches 100 MiB before envd answers. Prints time to envd ready, bucket requests, bytes fetched
# vs touched, against the goal (50 ms: ready ≤ 1.5 s, fetched ≤ 1.5x touched). Needs root.
#
#   bash bench/cold-resume-node/run.sh [--bucket local,gcs] [--delays 5,50] [--size-mib 1024]
#       [--touch-mib 100] [--run-kib 256-4096]
set -euo pipefail
cd "$(dirname "$0")/../.."
case ${1:-} in -h|--help) sed -n '2,11p' "$0"; exit 0 ;; esac
if [[ " $* " != *" --bucket local "* && " $* " != *"--bucket=local "* ]]; then bash scripts/test-peers.sh fake-gcs-server >/dev/null; fi
# Always (incremental): a stale dist would measure old code. tsc emits despite type errors
# elsewhere in the tree; those are reported, not fatal here.
bash scripts/build.sh || echo "bench/cold-resume-node: the build reported errors (above); running what it emitted" >&2
echo "load: $(uptime)"
exec node --enable-source-maps dist/bench/cold-resume-node/cold-resume-node-bench.js "$@"
