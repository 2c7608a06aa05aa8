#!/usr/bin/env bash
# DNS benchmark: dnsperf against our resolver and against dnsmasq serving the same records,
# same run, same load; prints queries/s for both and the ratio. Everything listens on loopback
# addresses and ports of its own; the host's resolver and /etc/resolv.conf are never touched.
#
# usage: bash bench/dns/run.sh [seconds per server, default 10, split in ROUNDS alternating rounds]
# env:   RECORDS (default 1000)  CLIENTS (dnsperf -c, default 8)  OUTSTANDING (dnsperf -q, default 200)
#        ROUNDS (default 2)  UDP_SOCKETS (ours, default 1)  UDP_RECEIVERS (ours, default 1)  UDP_ENGINE (ours: batch|dgram, default batch)
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-10}
records=${RECORDS:-1000}
clients=${CLIENTS:-8}
# 200 outstanding: with 500, dnsperf's opening burst overflows dnsmasq's default 208 KiB socket
# queue (about 300 queries lost), and each lost query holds an outstanding slot until its timeout,
# which would handicap the peer for the whole round. -t 2 frees such slots sooner anyway.
outstanding=${OUTSTANDING:-200}
ours_addr=127.0.0.61
peer_addr=127.0.0.62
ours_port=${OURS_PORT:-15353}
peer_port=${PEER_PORT:-15354}

for tool in dnsperf dig; do command -v $tool >/dev/null || { echo "bench/dns: $tool missing (bind9-dnsutils, dnsperf)" >&2; exit 1; }; done
dnsmasq=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)
[[ -x $dnsmasq ]] || { echo "bench/dns: dnsmasq missing (dnsmasq-base)" >&2; exit 1; }
[[ -f dist/apps/dns/src/main.js ]] || bash scripts/build.sh

work=$(mktemp -d /tmp/sbx-bench-dns.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The same records for both: sandbox ids and their `{id}-{port}` names. dnsmasq needs each name
# listed; ours answers both from one record per sandbox.
record_args=()
: >"$work/dnsmasq.conf"
: >"$work/queries.txt"
for i in $(seq 1 "$records"); do
  id=$(printf 'i%07xsbx' "$i")
  ip="10.11.$((i / 250)).$((i % 250 + 1))"
  record_args+=(--record "$id=$ip")
  printf 'address=/%s/%s\naddress=/%s-49983/%s\n' "$id" "$ip" "$id" "$ip" >>"$work/dnsmasq.conf"
  printf '%s A\n%s-49983 A\n' "$id" "$id" >>"$work/queries.txt"
done

./sbx dns serve --listen "$ours_addr:$ours_port" --control-socket none --metrics-port 0 --log-level warn \
  --udp-sockets "${UDP_SOCKETS:-1}" --udp-receivers "${UDP_RECEIVERS:-1}" --udp-engine "${UDP_ENGINE:-batch}" "${record_args[@]}" >"$work/ours.log" 2>&1 &
ours_pid=$!
pids+=($ours_pid)
"$dnsmasq" --no-daemon --no-resolv --no-hosts --bind-interfaces --conf-file="$work/dnsmasq.conf" \
  --listen-address="$peer_addr" --port="$peer_port" --pid-file= --log-facility="$work/dnsmasq.log" 2>>"$work/dnsmasq.log" &
peer_pid=$!
pids+=($peer_pid)

wait_answer() {
  for _ in $(seq 1 100); do
    if [[ $(dig @"$1" -p "$2" +short +time=1 +tries=1 "$3" A 2>/dev/null) == "$4" ]]; then return 0; fi
    sleep 0.1
  done
  echo "bench/dns: $1:$2 does not answer $3" >&2
  cat "$work"/*.log >&2
  exit 1
}
first=$(printf 'i%07xsbx' 1)
wait_answer "$ours_addr" "$ours_port" "$first-49983" 10.11.0.2
wait_answer "$peer_addr" "$peer_port" "$first-49983" 10.11.0.2

cpu_ticks() { # pid → user+system clock ticks of the process (all its threads)
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}
run() { # addr port seconds [server pid] → dnsperf output, plus the server's CPU ticks used
  local before=0
  [[ -n ${4:-} ]] && before=$(cpu_ticks "$4")
  dnsperf -s "$1" -p "$2" -d "$work/queries.txt" -l "$3" -c "$clients" -q "$outstanding" -t 2 2>&1
  [[ -n ${4:-} ]] && echo "  Server CPU ticks: $(($(cpu_ticks "$4") - before))"
  return 0
}
field() { sed -n "s/^ *$1: *\([0-9.]*\).*/\1/p" | head -1; }

rounds=${ROUNDS:-2}
per_round=$(( seconds / rounds > 0 ? seconds / rounds : 1 ))
echo "== dns benchmark: $records records, $((records * 2)) names, dnsperf -c $clients -q $outstanding," \
  "$rounds alternating rounds of ${per_round}s per server"
echo "   machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) (shared; numbers vary with other work)"
# Warm both (JIT, caches), then alternate so a change in the machine's load hits both alike.
run "$peer_addr" "$peer_port" 1 >/dev/null
run "$ours_addr" "$ours_port" 1 >/dev/null

hz=$(getconf CLK_TCK)
declare -A total_done total_time total_ticks total_latency
for name in dnsmasq ours; do total_done[$name]=0; total_time[$name]=0; total_ticks[$name]=0; total_latency[$name]=0; done
report() { # name round output
  local qps done runtime ticks lat lost codes
  qps=$(field 'Queries per second' <<<"$3")
  done=$(field 'Queries completed' <<<"$3")
  runtime=$(field 'Run time (s)' <<<"$3")
  ticks=$(field 'Server CPU ticks' <<<"$3")
  lat=$(field 'Average Latency (s)' <<<"$3")
  lost=$(sed -n 's/^ *Queries lost: *\(.*\)$/\1/p' <<<"$3")
  codes=$(sed -n 's/^ *Response codes: *\(.*\)$/\1/p' <<<"$3")
  printf '  round %d %-8s %9.0f q/s   avg latency %7.3f ms   server CPU %5.2f us/query   lost %s   [%s]\n' "$2" "$1" "$qps" \
    "$(awk "BEGIN{print $lat*1000}")" "$(awk "BEGIN{print $ticks * 1e6 / $hz / ($done > 0 ? $done : 1)}")" "$lost" "$codes"
  total_done[$1]=$((total_done[$1] + done))
  total_time[$1]=$(awk "BEGIN{print ${total_time[$1]} + $runtime}")
  total_ticks[$1]=$((total_ticks[$1] + ticks))
  total_latency[$1]=$(awk "BEGIN{print ${total_latency[$1]} + $lat * $done}")
}
for round in $(seq 1 "$rounds"); do
  report dnsmasq "$round" "$(run "$peer_addr" "$peer_port" "$per_round" "$peer_pid")"
  report ours "$round" "$(run "$ours_addr" "$ours_port" "$per_round" "$ours_pid")"
done
summary() { # name → "qps latency_ms cpu_us"
  awk -v d="${total_done[$1]}" -v t="${total_time[$1]}" -v k="${total_ticks[$1]}" -v l="${total_latency[$1]}" -v hz="$hz" \
    'BEGIN { printf "%.0f %.3f %.2f", d / t, (d ? l / d : 0) * 1000, (d ? k * 1e6 / hz / d : 0) }'
}
read -r peer_qps peer_lat peer_cpu <<<"$(summary dnsmasq)"
read -r ours_qps ours_lat ours_cpu <<<"$(summary ours)"
echo "== totals"
printf '%-8s %9s q/s   avg latency %s ms   server CPU %s us/query\n' dnsmasq "$peer_qps" "$peer_lat" "$peer_cpu"
printf '%-8s %9s q/s   avg latency %s ms   server CPU %s us/query\n' ours "$ours_qps" "$ours_lat" "$ours_cpu"
awk -v o="$ours_qps" -v p="$peer_qps" 'BEGIN { printf "ratio ours/dnsmasq, queries/s: %.2f (goal >= 1.00)\n", o / p }'
awk -v o="$ours_cpu" -v p="$peer_cpu" 'BEGIN { printf "ratio dnsmasq/ours, server CPU per query: %.2f (> 1: ours uses less)\n", p / o }'
