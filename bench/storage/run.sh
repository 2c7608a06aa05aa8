#!/usr/bin/env bash
# Storage benchmark: our layered build reader against qemu-img bench on the same chain as a
# qcow2 backing chain. Usage: bash bench/storage/run.sh [--size-mib 128] [--generations 10] ...
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in qemu-img qemu-io; do
  command -v $tool >/dev/null || { echo "bench/storage: $tool missing (Debian: qemu-utils)" >&2; exit 1; }
done
[[ -f dist/bench/storage/layered-read-bench.js ]] || bash scripts/build.sh
exec node dist/bench/storage/layered-read-bench.js "$@"
