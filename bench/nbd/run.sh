#!/usr/bin/env bash
# NBD benchmark: our block-server (standalone copy-on-write export) against nbdkit
# (file plugin + cow filter) on the same image, same run. fio's nbd engine for 4 KiB random
# read at queue depth 32 and 1 MiB sequential read, then nbdcopy of the whole device.
# Usage: bash bench/nbd/run.sh [image-size-MiB] [seconds-per-fio-run]
# READ_MODE=async measures ours reading through the libuv pool instead of pread on the loop.
# Then the disk export's dedup (dedup-bench.ts); alone: bash bench/nbd/run.sh dedup [--size-mib N ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ ${1:-} == dedup ]]; then
  shift
  [[ -f dist/bench/nbd/dedup-bench.js ]] || bash scripts/build.sh
  exec node dist/bench/nbd/dedup-bench.js "$@"
fi
size_mib=${1:-512}
seconds=${2:-10}
for tool in fio nbdkit nbdcopy python3; do
  command -v $tool >/dev/null || { echo "bench/nbd: $tool missing (Debian: fio nbdkit libnbd-bin)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "bench/nbd: this fio has no nbd engine" >&2; exit 1; }
[[ -f dist/apps/block-server/src/main.js ]] || bash scripts/build.sh

work=$(mktemp -d /tmp/bench-nbd.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== image: ${size_mib} MiB of random data in $work (page cache warm for both servers)"
head -c "$((size_mib * 1024 * 1024))" /dev/urandom >"$work/base.img"
cat "$work/base.img" >/dev/null

UV_THREADPOOL_SIZE=${UV_THREADPOOL_SIZE:-8} ./sbx block-server serve --base "$work/base.img" --socket "$work/ours.sock" \
  --overlay "$work/overlay" --read-mode "${READ_MODE:-sync}" --log-level warn &
pids+=($!)
nbdkit --foreground --unix "$work/kit.sock" --filter=cow file "$work/base.img" &
pids+=($!)
for s in ours kit; do
  for _ in $(seq 600); do [[ -S $work/$s.sock ]] && break; sleep 0.05; done
  [[ -S $work/$s.sock ]] || { echo "bench/nbd: $s did not start" >&2; exit 1; }
done

fio_run() { # server rw bs iodepth → "iops bw_bytes_per_s"
  fio --name=bench --ioengine=nbd --uri="nbd+unix:///?socket=$work/$1.sock" --rw="$2" --bs="$3" --iodepth="$4" \
    --size="${size_mib}M" --runtime="$seconds" --time_based --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' | python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; print(r["iops"], r["bw_bytes"])'
}
copy_run() { # server → MB/s
  local start end
  start=$(date +%s.%N)
  nbdcopy --requests=16 "nbd+unix:///?socket=$work/$1.sock" null:
  end=$(date +%s.%N)
  python3 -c "print($size_mib * 1048576 / ($end - $start))"
}

# Each test runs on both servers back to back, so a change in the machine's load hits both.
declare -A r
for s in ours kit; do read -r r[$s.rand_iops] _ < <(fio_run "$s" randread 4k 32); done
for s in ours kit; do read -r _ r[$s.seq_bw] < <(fio_run "$s" read 1M 8); done
for s in ours kit; do r[$s.copy_bw]=$(copy_run "$s"); done

python3 - "${r[ours.rand_iops]}" "${r[kit.rand_iops]}" "${r[ours.seq_bw]}" "${r[kit.seq_bw]}" \
  "${r[ours.copy_bw]}" "${r[kit.copy_bw]}" <<'PY'
import sys
v = list(map(float, sys.argv[1:]))
rows = [
    ("fio 4 KiB randread QD32 (IOPS)", v[0], v[1], 0.70, "{:,.0f}"),
    ("fio 1 MiB seq read QD8 (MB/s)", v[2] / 1e6, v[3] / 1e6, 1.00, "{:,.0f}"),
    ("nbdcopy whole device (MB/s)", v[4] / 1e6, v[5] / 1e6, None, "{:,.0f}"),
]
print()
print(f"{'test':34} {'ours':>10} {'nbdkit':>10} {'ratio':>7}  goal")
for name, ours, kit, goal, fmt in rows:
    ratio = ours / kit if kit else float("nan")
    g = f">= {goal:.0%}" + ("  ok" if ratio >= goal else "  MISSED") if goal else ""
    print(f"{name:34} {fmt.format(ours):>10} {fmt.format(kit):>10} {ratio:7.0%}  {g}")
PY
echo "(ours: --read-mode ${READ_MODE:-sync}; machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); shared with other work)"
[[ -f dist/bench/nbd/dedup-bench.js ]] || bash scripts/build.sh
node dist/bench/nbd/dedup-bench.js
