#!/usr/bin/env bash
# uffd-server's Prepare alone (issue 17, the create's "prepare uffd" step): Prepare + Stop of a
# 128 MiB two-layer local build timed from the gRPC client, first sandbox of the build and with
# 10 others of it held, next to an empty round trip. Goal: p50 ≤ 4 ms.
#
#   bash bench/density/prepare.sh [--rounds 60] [--memory-mb 128] [--cpu-prof <dir>]
set -euo pipefail
cd "$(dirname "$0")/../.."
case ${1:-} in -h|--help) sed -n '2,6p' "$0"; exit 0 ;; esac
[[ -f dist/bench/density/prepare-bench.js && -f dist/apps/uffd-server/src/main.js ]] || bash scripts/build.sh
exec node --enable-source-maps dist/bench/density/prepare-bench.js "$@"
