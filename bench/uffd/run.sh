#!/usr/bin/env bash
# Time to make guest memory present through userfaultfd, 1 and 2 faulting threads:
# uffd-server (serve-file, native engine, 2 MiB prefetch, async write-protect tracking) against
# a minimal C handler copying 4 KiB per fault and a C handler copying 2 MiB per fault, all in
# one run, with ratios. The guest is native/build/uffd-peer (anonymous memory, its own uffd).
#
#   bash bench/uffd/run.sh [--size-mib 1024] [--c4k-mib 256] [--repeat 3]
#
# Each cell is the best of --repeat runs (all samples are printed): on a shared, loaded machine
# single runs swing by several times, and the best run is the closest to what the code can do.
# Then the cost of each write-tracking mode (wp-async, wp-sync, present) on up to 256 MiB.
# The 4 KiB C handler is timed on --c4k-mib (default: the smaller of 256 and --size-mib) to keep
# the run bounded; its rate does not depend on the size. Needs a build (bash scripts/build.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
size_mib=1024
c4k_mib=""
repeat=3
while [[ $# -gt 0 ]]; do
  case $1 in
    --size-mib) size_mib=$2; shift 2 ;;
    --c4k-mib) c4k_mib=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $c4k_mib ]] || c4k_mib=$(( size_mib < 256 ? size_mib : 256 ))
make -s -C native
[[ -f dist/apps/uffd-server/src/main.js ]] || { echo "not built: run bash scripts/build.sh" >&2; exit 1; }

work=$(mktemp -d /tmp/uffd-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

memfile=$work/memfile
head -c $(( size_mib * 1048576 )) /dev/urandom > "$memfile"
head -c $(( c4k_mib * 1048576 )) "$memfile" > "$work/memfile-c4k"
cat "$memfile" "$work/memfile-c4k" > /dev/null # page cache warm for everyone

# wait_for <file> <text>
wait_for() {
  for _ in $(seq 1 400); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; exit 1
}

# run_peer <socket> <mib> <threads> [peer flags...] -> prints nanoseconds
run_peer() {
  local sock=$1 mib=$2 threads=$3; shift 3
  local out
  out=$(printf 'touch %s\nexit\n' "$threads" | native/build/uffd-peer --socket "$sock" --size $(( mib * 1048576 )) "$@")
  echo "$out" | awk '/^ns /{print $2}'
}

# handler <name> <mib> <threads>: start the handler, fault everything in, print MiB/s
measure() {
  local name=$1 mib=$2 threads=$3
  local sock=$work/$name-$threads.sock log=$work/$name-$threads.log
  case $name in
    c4k) native/build/uffd-c-handler --socket "$sock" --memfile "$work/memfile-c4k" --copy-bytes 4096 > "$log" 2>&1 & ;;
    c2m) native/build/uffd-c-handler --socket "$sock" --memfile "$memfile" --copy-bytes 2097152 > "$log" 2>&1 & ;;
    ours) ./sbx uffd-server serve-file --memfile "$memfile" --socket "$sock" --log-level warn > "$log" 2>&1 &
          ;;
  esac
  local hp=$!
  pids+=("$hp")
  if [[ $name == ours ]]; then
    for _ in $(seq 1 400); do [[ -S $sock ]] && break; sleep 0.05; done
  else
    wait_for "$log" listening
  fi
  local ns
  ns=$(run_peer "$sock" "$mib" "$threads" --tracking wp-async || true)
  if [[ -z $ns ]]; then
    kill -9 "$hp" 2>/dev/null || true
    echo "$name: the guest did not finish; handler log:" >&2
    cat "$log" >&2
    exit 1
  fi
  wait "$hp" || true
  awk -v ns="$ns" -v mib="$mib" 'BEGIN { printf "%.1f", mib / (ns / 1e9) }'
}

echo "uffd bench: ${size_mib} MiB (4 KiB C handler on ${c4k_mib} MiB), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
# best <name> <mib> <threads>: best of $repeat runs, samples to stderr
best() {
  local samples=() v
  for _ in $(seq 1 "$repeat"); do
    v=$(measure "$1" "$2" "$3")
    samples+=("$v")
  done
  echo "  $1 threads=$3 samples MiB/s: ${samples[*]}" >&2
  printf '%s\n' "${samples[@]}" | sort -g | tail -1
}

rows=()
for t in 1 2; do
  c4k=$(best c4k "$c4k_mib" "$t")
  c2m=$(best c2m "$size_mib" "$t")
  ours=$(best ours "$size_mib" "$t")
  rows+=("$(awk -v t="$t" -v a="$c4k" -v b="$c2m" -v o="$ours" \
    'BEGIN { printf "%-8s %14.1f %14.1f %14.1f %11.1fx %11.0f%%", t, a, b, o, o / a, 100 * o / b }')")
done
printf '%-8s %14s %14s %14s %12s %12s\n' threads 'C 4KiB MiB/s' 'C 2MiB MiB/s' 'ours MiB/s' 'ours/C4K' 'ours/C2M'
printf '%s\n' "${rows[@]}"
echo "goal: ours >= 10x C 4KiB and >= 50% of C 2MiB"

# What write tracking costs, per mode the VMM can give us (ours only): the guest reads all of
# memory, then writes one byte per page twice. Without write-protect (present) prefetch is off.
track_mib=$(( size_mib < 256 ? size_mib : 256 ))
echo
echo "write tracking on ${track_mib} MiB (ours): read all, then write every page twice"
printf '%-10s %12s %22s %22s\n' tracking 'read MiB/s' '1st write us/page' '2nd write us/page'
for mode in wp-async wp-sync none; do
  sock=$work/track-$mode.sock
  ./sbx uffd-server serve-file --memfile "$memfile" --socket "$sock" --log-level warn > "$work/track-$mode.log" 2>&1 &
  hp=$!
  pids+=("$hp")
  for _ in $(seq 1 400); do [[ -S $sock ]] && break; sleep 0.05; done
  out=$(printf 'touch 1\ntouchw 1\ntouchw 1\nexit\n' |
    native/build/uffd-peer --socket "$sock" --size $(( track_mib * 1048576 )) --tracking "$mode")
  wait "$hp" || true
  echo "$out" | awk -v m="$mode" -v mib="$track_mib" '/^ns /{ns[++n]=$2}
    END { pages = mib * 256; printf "%-10s %12.1f %22.2f %22.2f\n", (m == "none" ? "present" : m), mib / (ns[1] / 1e9), ns[2] / 1e3 / pages, ns[3] / 1e3 / pages }'
done
