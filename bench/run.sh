#!/usr/bin/env bash
# npm run bench [area...]: each area measures ours against its real peer in one run and
# prints the ratio. Without arguments, every area in turn.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
areas=("$@")
[[ ${#areas[@]} -eq 0 ]] && areas=(dns nbd uffd net storage orchestrator density cold-resume cold-resume-node prefetch proxy)
for area in "${areas[@]}"; do
  [[ -x bench/$area/run.sh || -f bench/$area/run.sh ]] || { echo "bench: no bench/$area/run.sh" >&2; exit 2; }
  echo "== bench/$area"
  bash "bench/$area/run.sh"
done
