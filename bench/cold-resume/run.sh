#!/usr/bin/env bash
# Cold resume from a bucket with real latency (issue 17): a 1 GiB build whose guest touches
# 100 MiB at start, resumed with an empty cache at 5 ms and 50 ms per bucket request, before
# (4 MiB chunks, demand only) and after (parallel coalesced fetches, read-ahead, recorded
# prefetch set) in the same run: time to the working set in, requests, bytes fetched vs touched.
#
#   bash bench/cold-resume/run.sh [--delays 5,50] [--size-mib 1024] [--touch-mib 100] [--run-kib 256-4096]
#       [--fault-window-kib 2048] [--chunk-kib 1024,256] [--bucket local|gcs]
#
# --bucket gcs uses fake-gcs-server (scripts/test-peers.sh builds it) behind a delaying TCP proxy.
set -euo pipefail
cd "$(dirname "$0")/../.."
case ${1:-} in -h|--help) sed -n '2,10p' "$0"; exit 0 ;; esac
if [[ " $* " == *" gcs "* || " $* " == *"--bucket=gcs"* ]]; then bash scripts/test-peers.sh >/dev/null; fi
[[ -f dist/bench/cold-resume/cold-resume-bench.js ]] || bash scripts/build.sh
echo "load: $(uptime)"
exec node --enable-source-maps dist/bench/cold-resume/cold-resume-bench.js "$@"
