#!/usr/bin/env bash
# Ingress proxy benchmark: wrk against one HTTP server in a sandbox's guest (the VMM double's
# guest network, behind the slot's real NAT) four ways in the same run: directly at the
# sandbox's host IP, through our proxy on its native data path (the C relay) and on its Node
# data path (a second proxy, --data-path node), both routing by Host, and through Debian's nginx
# configured as a plain keep-alive reverse proxy to the same server. Prints requests/s, p99
# latency and proxy CPU per request for each and the ratios (goal: ours >= nginx in
# requests/s, <= 1 ms added p99 over direct).
# Needs root (network namespaces), wrk and nginx (scripts/system-packages.txt) and a build.
#
# Runs once per worker count (default 1 and 2): our proxy with --workers N (native: N relay
# threads in one process; node: N processes) against nginx with worker_processes N.
#
#   bash bench/proxy/run.sh [--seconds 10] [--rounds 2] [--connections 32] [--threads 2]
#       [--body-bytes 1024] [--workers 1,2]
set -euo pipefail
cd "$(dirname "$0")/../.."
case ${1:-} in -h|--help) sed -n '2,15p' "$0"; exit 0 ;; esac
for tool in wrk nginx curl; do
  command -v $tool >/dev/null || [[ -x /usr/sbin/$tool ]] || { echo "bench/proxy: $tool missing (scripts/system-packages.txt)" >&2; exit 1; }
done
[[ -f dist/bench/proxy/proxy-bench.js && -f dist/apps/proxy/src/main.js ]] || bash scripts/build.sh
exec node --enable-source-maps dist/bench/proxy/proxy-bench.js "$@"
